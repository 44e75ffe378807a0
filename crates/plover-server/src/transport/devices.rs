//! Which connection each (user, device) holds: one live connection per device, and at most
//! `limits.connections_per_user` per user.
//!
//! A device's second connection replaces the first (closed with `replaced`): two connections
//! of one device would share, and overwrite, the one cursor the server keeps for it, and a
//! phone that reconnected before its old connection timed out would otherwise count twice.
//! A user past the cap is refused with `limit`, so one token cannot take the server's
//! connection budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::requests::Refusal;
use crate::cluster::Registry;
use plover_proto::ErrorCode;

/// One live connection of a device.
#[derive(Debug)]
struct Held {
    device: String,
    id: usize,
    conn: quinn::Connection,
}

/// The registry. A std `Mutex`: every operation is a few map updates, never held across an
/// await, and a connection takes it twice in its life (claim, release).
#[derive(Debug)]
pub(crate) struct Devices {
    users: Mutex<HashMap<String, Vec<Held>>>,
    per_user: usize,
    /// The cluster's connection registry, told of every claim, heartbeat and release.
    registry: Option<Arc<Registry>>,
}

/// A device's claim on its connection; released when dropped (if not replaced meanwhile).
#[derive(Debug)]
pub(crate) struct Claim {
    devices: Arc<Devices>,
    user: String,
    device: String,
    id: usize,
}

impl Devices {
    /// A registry allowing `per_user` connections to each user.
    pub(crate) fn new(per_user: usize, registry: Option<Arc<Registry>>) -> Self {
        Self {
            users: Mutex::new(HashMap::new()),
            per_user: per_user.max(1),
            registry,
        }
    }

    /// Closes every device's connection with `moved`, sending them to `to` in turn (a
    /// stopping node spreads its devices over the others instead of sending all to one).
    pub(crate) fn move_all(&self, to: &[String]) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        for (held, target) in users.values().flatten().zip(to.iter().cycle()) {
            held.conn
                .close(quinn::VarInt::from(ErrorCode::MOVED.0), target.as_bytes());
        }
    }

    /// Closes up to `n` devices' connections with `moved`, sending them to `to` in turn (a
    /// draining node, a few at a time). Returns how many it closed and how many are left
    /// after them; with no address to send them to, none is closed.
    pub(crate) fn move_some(&self, n: usize, to: &[String]) -> (usize, usize) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        // A closed connection stays here until its task has wound down: not counted, not
        // closed again.
        let open = || {
            users
                .values()
                .flatten()
                .filter(|h| h.conn.close_reason().is_none())
        };
        let held = open().count();
        if to.is_empty() {
            return (0, held);
        }
        let mut moved = 0usize;
        for (h, target) in open().take(n).zip(to.iter().cycle()) {
            h.conn
                .close(quinn::VarInt::from(ErrorCode::MOVED.0), target.as_bytes());
            moved = moved.saturating_add(1);
        }
        (moved, held.saturating_sub(moved))
    }

    /// Closes `user`'s connections on this node (or only `device`'s) with `code`; returns
    /// how many it closed.
    pub(crate) fn close(
        &self,
        user: &str,
        device: Option<&str>,
        code: ErrorCode,
        reason: &str,
    ) -> usize {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0usize;
        for h in users.get(user).into_iter().flatten() {
            if device.is_some_and(|d| d != h.device) || h.conn.close_reason().is_some() {
                continue;
            }
            h.conn.close(quinn::VarInt::from(code.0), reason.as_bytes());
            closed = closed.saturating_add(1);
        }
        closed
    }

    /// The devices of `user` connected to this node.
    pub(crate) fn connected(&self, user: &str) -> Vec<String> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users
            .get(user)
            .into_iter()
            .flatten()
            .filter(|h| h.conn.close_reason().is_none())
            .map(|h| h.device.clone())
            .collect()
    }

    /// The device is alive (it sent a heartbeat).
    pub(crate) fn heartbeat(&self, user: &str, device: &str) {
        if let Some(registry) = &self.registry {
            registry.heartbeat(user, device);
        }
    }

    /// Registers `conn` as the device's connection: closes the device's previous one with
    /// `replaced`, or refuses with `limit` when the user holds the most connections allowed
    /// on other devices.
    pub(crate) fn claim(
        self: &Arc<Self>,
        user: &str,
        device: &str,
        conn: &quinn::Connection,
    ) -> Result<Claim, Refusal> {
        let id = conn.stable_id();
        let replaced = {
            let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            let held = users.entry(user.to_owned()).or_default();
            let previous = held.iter().position(|h| h.device == device);
            if previous.is_none() && held.len() >= self.per_user {
                return Err(Refusal::new(
                    ErrorCode::LIMIT,
                    format!(
                        "{user} already holds {} connections, the most allowed \
                         (limits.connections_per_user); close one, or reconnect a device \
                         that is already connected (its new connection replaces the old)",
                        held.len()
                    ),
                ));
            }
            let new = Held {
                device: device.to_owned(),
                id,
                conn: conn.clone(),
            };
            match previous {
                Some(i) => held.get_mut(i).map(|slot| std::mem::replace(slot, new)),
                None => {
                    held.push(new);
                    None
                }
            }
        };
        if let Some(registry) = &self.registry {
            registry.connected(user, device, id as u64);
        }
        if let Some(old) = replaced {
            tracing::debug!(%user, %device, "a new connection of the device replaces the old");
            old.conn.close(
                quinn::VarInt::from(ErrorCode::REPLACED.0),
                b"this device connected again; this connection is replaced",
            );
        }
        Ok(Claim {
            devices: self.clone(),
            user: user.to_owned(),
            device: device.to_owned(),
            id,
        })
    }

    fn release(&self, claim: &Claim) {
        if let Some(registry) = &self.registry {
            registry.disconnected(&claim.user, &claim.device, claim.id as u64);
        }
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = users.get_mut(&claim.user) {
            held.retain(|h| !(h.device == claim.device && h.id == claim.id));
            if held.is_empty() {
                users.remove(&claim.user);
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.devices.release(self);
    }
}
