//! What an operator reads and changes about accounts (`plover admin`, `plover token revoke`):
//! the users, their devices, revoked tokens, and the "kick" entries that tell every node of
//! a cluster to close a user's (or a device's) connections.
//!
//! In the `relations` keyspace:
//! - `v` user -> Unix seconds: every token of the user issued at or before it is refused;
//! - `v` user 0 device -> the same for one device;
//! - `k` user 0 device (empty: every device) -> close code (2 bytes) and Unix ms: the
//!   connections to close. Written through the log in a cluster, so that each node closes
//!   its own (`Recorded::kicks`); kept, each overwriting the last of its key.

use plover_proto::ErrorCode;

use super::batch::{Ks, Recorded, Space, StoreBatch};
use super::records::PUSHER_WITH_DEVICE;
use super::{Store, StoreError, decode, keys};

/// Connections to close: a user's, or one device's, with a close code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kick {
    /// The user.
    pub user: String,
    /// One device, or every device of the user.
    pub device: Option<String>,
    /// The close code.
    pub code: ErrorCode,
}

/// `letter` user, or with a device, `letter` user 0 device (as [`super::relations`]'s pairs).
fn named(letter: u8, user: &str, device: Option<&str>) -> Vec<u8> {
    match device {
        Some(device) => super::relations::pair(letter, user, device),
        None => [&[letter][..], user.as_bytes()].concat(),
    }
}

/// Always with the 0 (an empty device: all of them), so that the key parses one way.
fn kick_key(user: &str, device: Option<&str>) -> Vec<u8> {
    named(b'k', user, Some(device.unwrap_or("")))
}

impl Store {
    /// Every user, in name order.
    pub fn users(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for guard in self.users.iter() {
            out.push(String::from_utf8_lossy(&guard.key()?).into_owned());
        }
        Ok(out)
    }

    /// A user's devices (those that ever acknowledged a position), with their cursors.
    pub fn devices_of(&self, user: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let start = keys::name_prefix(user);
        let mut out = Vec::new();
        for guard in self.devices.prefix(&start) {
            let (key, value) = guard.into_inner()?;
            if let Some(device) = key.get(start.len()..) {
                out.push((
                    String::from_utf8_lossy(device).into_owned(),
                    keys::head_u64(&value).unwrap_or(0),
                ));
            }
        }
        Ok(out)
    }

    /// The keys of the pushers `device` of `user` registered.
    pub fn pusher_keys_of_device(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for guard in self.pushers.prefix(keys::name_prefix(user)) {
            let (key, value) = guard.into_inner()?;
            if let Some((&PUSHER_WITH_DEVICE, rest)) = value.split_first() {
                let (registered, _): (String, plover_proto::Pusher) = decode("pushers", rest)?;
                if registered == device {
                    out.push(key.to_vec());
                }
            }
        }
        Ok(out)
    }

    /// The latest revocation that covers `device` of `user` (Unix seconds): tokens issued at
    /// or before it are refused.
    pub fn revoked(&self, user: &str, device: &str) -> Result<Option<u64>, StoreError> {
        let read = |key: Vec<u8>| -> Result<Option<u64>, StoreError> {
            Ok(self.relations.get(key)?.and_then(|v| keys::head_u64(&v)))
        };
        let all = read(named(b'v', user, None))?;
        let one = read(named(b'v', user, Some(device)))?;
        Ok(all.max(one))
    }
}

impl Store {
    /// Every record of `user`'s account that `delete-user` removes: the user, last seen,
    /// devices and cursors, pushers and pending notifications, notification settings, the
    /// sync log, conversation index entries, blocks either way and requests. (Revocations
    /// stay, so that the account's old tokens stay refused.)
    pub fn account_keys(&self, user: &str) -> Result<Vec<(Ks, Vec<u8>)>, StoreError> {
        use super::relations::{pair, request_key, requests_key};
        let mut out = vec![
            (Ks::Users, user.as_bytes().to_vec()),
            (Ks::Presence, user.as_bytes().to_vec()),
        ];
        let prefix = keys::name_prefix(user);
        for (ks, space) in [
            (Ks::Devices, &self.devices),
            (Ks::Pushers, &self.pushers),
            (Ks::PendingPush, &self.pending_push),
            (Ks::PushContent, &self.push_content),
            (Ks::Log, &self.log),
            (Ks::MemberOf, &self.member_of),
        ] {
            for guard in space.prefix(&prefix) {
                out.push((ks, guard.key()?.to_vec()));
            }
        }
        for other in self.blocked_by(user)? {
            out.push((Ks::Relations, pair(b'b', user, &other)));
            out.push((Ks::Relations, pair(b'r', &other, user)));
        }
        for other in self.blockers_of(user)? {
            out.push((Ks::Relations, pair(b'b', &other, user)));
            out.push((Ks::Relations, pair(b'r', user, &other)));
        }
        for (conv, _) in self.requests_of(user)? {
            out.push((Ks::Relations, request_key(conv, user)));
            out.push((Ks::Relations, requests_key(user, conv)));
        }
        Ok(out)
    }
}

impl StoreBatch<'_> {
    /// Removes the keys [`Store::account_keys`] listed.
    pub fn forget_account(&mut self, keys: Vec<(Ks, Vec<u8>)>) {
        for (ks, key) in keys {
            self.remove(ks, key);
        }
    }

    /// Refuses every token of `user` (or of one device) issued at or before `at_secs`.
    pub fn put_revocation(&mut self, user: &str, device: Option<&str>, at_secs: u64) {
        self.insert(
            Ks::Relations,
            named(b'v', user, device),
            at_secs.to_be_bytes(),
        );
    }

    /// Asks every node to close `user`'s connections (or one device's) with `code`.
    pub fn put_kick(&mut self, user: &str, device: Option<&str>, code: ErrorCode, at_ms: u64) {
        let mut value = Vec::with_capacity(10);
        value.extend_from_slice(&code.0.to_be_bytes());
        value.extend_from_slice(&at_ms.to_be_bytes());
        self.insert(Ks::Relations, kick_key(user, device), value);
    }

    /// Forgets a device: its cursor and the pushers it registered.
    pub fn remove_device(&mut self, user: &str, device: &str, pushers: Vec<Vec<u8>>) {
        self.remove(Ks::Devices, keys::device(user, device));
        for key in pushers {
            self.remove_key(Space::Pushers, key);
        }
    }
}

impl Recorded {
    /// The connections a replicated write asks every node to close (`put_kick`).
    pub fn kicks(&self) -> Vec<Kick> {
        let mut out = Vec::new();
        for op in &self.ops {
            if op.ks != Ks::Relations || op.key.first() != Some(&b'k') {
                continue;
            }
            let (Some(value), Some(rest)) = (&op.value, op.key.get(1..)) else {
                continue;
            };
            let Some(split) = rest.iter().position(|b| *b == 0) else {
                continue;
            };
            let (user, device) = (&rest[..split], &rest[split + 1..]);
            let code = value
                .get(..2)
                .and_then(|b| b.try_into().ok())
                .map_or(ErrorCode::NORMAL, |b| ErrorCode(u16::from_be_bytes(b)));
            out.push(Kick {
                user: String::from_utf8_lossy(user).into_owned(),
                device: (!device.is_empty()).then(|| String::from_utf8_lossy(device).into_owned()),
                code,
            });
        }
        out
    }
}
