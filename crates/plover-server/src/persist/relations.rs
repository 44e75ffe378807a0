//! Relations between users (`relations` keyspace): who blocked whom, and the conversations a
//! user has not accepted yet (message requests).
//!
//! Keys, each starting with one letter; user names never hold a 0 byte
//! ([`crate::auth::valid_name`]), so a 0 ends one:
//! - `b` blocker 0 blocked -> empty: `blocker` blocked `blocked`;
//! - `r` blocked 0 blocker -> empty: the same, looked up from the other side;
//! - `q` conversation (8 bytes) user -> the user who asked: `user` was brought into the
//!   conversation by someone who shared none with them, and has not accepted it yet;
//! - `p` user 0 conversation (8 bytes) -> the user who asked: the same, by user.

use plover_proto::ConversationId;

use super::batch::{Ks, StoreBatch};
use super::{Store, StoreError};

pub(super) fn pair(letter: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + a.len() + b.len());
    k.push(letter);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn prefix(letter: u8, a: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + a.len());
    k.push(letter);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k
}

pub(super) fn request_key(conv: ConversationId, user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + user.len());
    k.push(b'q');
    k.extend_from_slice(&conv.to_be_bytes());
    k.extend_from_slice(user.as_bytes());
    k
}

pub(super) fn requests_key(user: &str, conv: ConversationId) -> Vec<u8> {
    let mut k = prefix(b'p', user);
    k.extend_from_slice(&conv.to_be_bytes());
    k
}

/// The names after a `pair` prefix.
fn names_after(store: &Store, start: Vec<u8>) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for guard in store.relations.prefix(&start) {
        let key = guard.key()?;
        if let Some(name) = key.get(start.len()..) {
            out.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(out)
}

impl Store {
    /// Whether `blocker` blocked `blocked`.
    pub fn blocks(&self, blocker: &str, blocked: &str) -> Result<bool, StoreError> {
        Ok(self.relations.get(pair(b'b', blocker, blocked))?.is_some())
    }

    /// Whether either of two users blocked the other.
    pub fn blocked_between(&self, a: &str, b: &str) -> Result<bool, StoreError> {
        Ok(self.blocks(a, b)? || self.blocks(b, a)?)
    }

    /// The users `user` blocked, in name order.
    pub fn blocked_by(&self, user: &str) -> Result<Vec<String>, StoreError> {
        names_after(self, prefix(b'b', user))
    }

    /// The users who blocked `user`, in name order.
    pub fn blockers_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        names_after(self, prefix(b'r', user))
    }

    /// Who asked, if `user` has not accepted `conv` yet.
    pub fn request(&self, conv: ConversationId, user: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .relations
            .get(request_key(conv, user))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Whether `viewer` may see `subject`'s presence and last seen: neither blocked the
    /// other, and they share a conversation that `subject` has accepted.
    pub fn sees_presence(&self, viewer: &str, subject: &str) -> Result<bool, StoreError> {
        if self.blocked_between(viewer, subject)? {
            return Ok(false);
        }
        let theirs: std::collections::HashSet<ConversationId> =
            self.conversations_of(viewer)?.into_iter().collect();
        for conv in self.conversations_of(subject)? {
            if theirs.contains(&conv) && self.request(conv, subject)?.is_none() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Everyone `user` blocked or who blocked `user`: between them, no presence or typing
    /// goes either way.
    pub fn blocked_either_way(
        &self,
        user: &str,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut out: std::collections::HashSet<String> =
            self.blocked_by(user)?.into_iter().collect();
        out.extend(self.blockers_of(user)?);
        Ok(out)
    }

    /// The conversations `user` has not accepted yet, with who asked.
    pub fn requests_of(&self, user: &str) -> Result<Vec<(ConversationId, String)>, StoreError> {
        let start = prefix(b'p', user);
        let mut out = Vec::new();
        for guard in self.relations.prefix(&start) {
            let (key, value) = guard.into_inner()?;
            if let Some(conv) = key
                .get(start.len()..)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
            {
                out.push((conv, String::from_utf8_lossy(&value).into_owned()));
            }
        }
        Ok(out)
    }
}

impl StoreBatch<'_> {
    /// `blocker` blocks (`true`) or unblocks `blocked`.
    pub fn put_block(&mut self, blocker: &str, blocked: &str, on: bool) {
        let (forward, backward) = (pair(b'b', blocker, blocked), pair(b'r', blocked, blocker));
        if on {
            self.insert(Ks::Relations, forward, Vec::new());
            self.insert(Ks::Relations, backward, Vec::new());
        } else {
            self.remove(Ks::Relations, forward);
            self.remove(Ks::Relations, backward);
        }
    }

    /// `user` has a request in `conv` from `from` (`Some`), or no longer (`None`).
    pub fn put_request(&mut self, conv: ConversationId, user: &str, from: Option<&str>) {
        match from {
            Some(from) => {
                self.insert(Ks::Relations, request_key(conv, user), from.as_bytes());
                self.insert(Ks::Relations, requests_key(user, conv), from.as_bytes());
            }
            None => {
                self.remove(Ks::Relations, request_key(conv, user));
                self.remove(Ks::Relations, requests_key(user, conv));
            }
        }
    }
}
