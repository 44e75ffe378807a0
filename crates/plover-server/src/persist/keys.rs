//! Key layouts. Integers are big-endian so that byte order is numeric order; names (checked by
//! [`crate::auth::valid_name`], so they never hold a NUL) end with a 0 byte so that no name's
//! keys fall inside another name's range ("al" vs "alice").

use plover_proto::{ClientMsgId, ConversationId};

/// `messages`: conversation ++ seq.
pub(crate) fn message(conv: ConversationId, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&conv.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The prefix of every message of a conversation.
pub(crate) fn message_prefix(conv: ConversationId) -> [u8; 8] {
    conv.to_be_bytes()
}

/// A name followed by its terminator: the prefix of everything keyed by that name.
pub(crate) fn name_prefix(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

/// `log`: user ++ 0 ++ position.
pub(crate) fn log(user: &str, pos: u64) -> Vec<u8> {
    let mut k = name_prefix(user);
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

/// `member_of`: user ++ 0 ++ conversation.
pub(crate) fn member_of(user: &str, conv: ConversationId) -> Vec<u8> {
    let mut k = name_prefix(user);
    k.extend_from_slice(&conv.to_be_bytes());
    k
}

/// `direct`: the smaller name ++ 0 ++ the larger name.
pub(crate) fn direct(a: &str, b: &str) -> Vec<u8> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut k = name_prefix(lo);
    k.extend_from_slice(hi.as_bytes());
    k
}

/// `idempotency`: conversation ++ sender ++ 0 ++ client id.
pub(crate) fn idempotency(conv: ConversationId, sender: &str, id: &ClientMsgId) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + sender.len() + 1 + 16);
    k.extend_from_slice(&conv.to_be_bytes());
    k.extend_from_slice(sender.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0);
    k
}

/// `devices`: user ++ 0 ++ device.
pub(crate) fn device(user: &str, device: &str) -> Vec<u8> {
    let mut k = name_prefix(user);
    k.extend_from_slice(device.as_bytes());
    k
}

/// `receipts`, `cleared`: conversation ++ user.
pub(crate) fn conv_user(conv: ConversationId, user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + user.len());
    k.extend_from_slice(&conv.to_be_bytes());
    k.extend_from_slice(user.as_bytes());
    k
}

/// `watermarks`: name ++ 0 ++ conversation.
pub(crate) fn watermark(name: &str, conv: ConversationId) -> Vec<u8> {
    let mut k = name_prefix(name);
    k.extend_from_slice(&conv.to_be_bytes());
    k
}

/// Reads a big-endian u64 from the last 8 bytes of a key or the first 8 of a value.
pub(crate) fn tail_u64(bytes: &[u8]) -> Option<u64> {
    let start = bytes.len().checked_sub(8)?;
    Some(u64::from_be_bytes(bytes[start..].try_into().ok()?))
}

/// Reads a big-endian u64 from the first 8 bytes.
pub(crate) fn head_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_do_not_nest() {
        let al = name_prefix("al");
        assert!(!log("alice", 1).starts_with(&al));
        assert!(log("al", 1).starts_with(&al));
    }

    #[test]
    fn direct_key_is_symmetric() {
        assert_eq!(direct("bob", "alice"), direct("alice", "bob"));
    }

    #[test]
    fn integer_keys_sort_numerically() {
        assert!(message(1, 255) < message(1, 256));
        assert!(message(1, u64::MAX) < message(2, 0));
        assert_eq!(tail_u64(&log("x", 77)), Some(77));
    }
}
