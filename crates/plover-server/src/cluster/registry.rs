//! The connection registry: which node holds each (user, device), in the `plover_devices`
//! bucket.
//!
//! The connection tasks tell the [`Registry`] when a device connects, heartbeats and leaves;
//! those calls only update a map under a std `Mutex` (a few map operations, never held across
//! an await), so a slow or unreachable NATS never holds up a connection. One task writes the
//! map to the bucket: a new device at once, then each entry again every third of its TTL
//! while the device stays connected (with the time of its last heartbeat; a device that stops
//! heartbeating is dropped by the transport's idle timeout), and a departed device's entry is
//! deleted, but only if it is still the one this node wrote (a device that moved on to another
//! node keeps that node's entry). The TTL is three heartbeat intervals: a node that dies takes
//! its devices' entries with it within that time.
//!
//! Keys are `<user>.<device>`, each hex-encoded (user and device names may hold characters
//! a key cannot), so one user's devices share the prefix `<user>.`.

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::{ClusterError, DEVICES_BUCKET, put_with_ttl};

/// One device's entry in the bucket (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// The node holding the device's connection.
    pub node: String,
    /// The connection's id on that node.
    pub conn: u64,
    /// When the device connected, in ms since the Unix epoch.
    pub since_ms: u64,
    /// The device's last heartbeat (or its connection), in ms since the Unix epoch.
    pub heartbeat_ms: u64,
}

/// Registry writes in flight at once.
const IN_FLIGHT: usize = 64;

/// A device connected to this node, as the registry holds it.
#[derive(Debug)]
struct Local {
    conn: u64,
    since_ms: u64,
    heartbeat_ms: u64,
    /// The revision this node last wrote and when; `None` until the first write lands.
    written: Option<(u64, Instant)>,
}

#[derive(Debug, Default)]
struct State {
    devices: HashMap<String, Local>,
    /// Entries to delete: key and the revision this node wrote (deleted only if unchanged).
    gone: Vec<(String, u64)>,
}

/// This node's side of the connection registry.
pub struct Registry {
    js: jetstream::Context,
    store: kv::Store,
    node: String,
    ttl: Duration,
    state: Mutex<State>,
    wake: Notify,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("node", &self.node)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The bucket key of a user's device.
pub fn key(user: &str, device: &str) -> String {
    format!("{}.{}", hex(user), hex(device))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Where a device is connected, if anywhere in the cluster.
pub async fn lookup(
    js: &jetstream::Context,
    user: &str,
    device: &str,
) -> Result<Option<DeviceEntry>, ClusterError> {
    let store = js
        .get_key_value(DEVICES_BUCKET)
        .await
        .map_err(|e| ClusterError::js("devices bucket", e))?;
    let Some(value) = store
        .get(key(user, device))
        .await
        .map_err(|e| ClusterError::js("read device entry", e))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&value)
        .map(Some)
        .map_err(|e| ClusterError::js("read device entry", e))
}

impl Registry {
    pub(super) fn new(
        js: jetstream::Context,
        store: kv::Store,
        node: String,
        heartbeat: Duration,
    ) -> Self {
        Self {
            js,
            store,
            node,
            ttl: heartbeat.saturating_mul(3).max(Duration::from_secs(3)),
            state: Mutex::default(),
            wake: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device connected here on connection `conn`; it replaces any earlier connection of
    /// the same device on this node.
    pub fn connected(&self, user: &str, device: &str, conn: u64) {
        let now = crate::clock::now_ms();
        let previous = self.state().devices.insert(
            key(user, device),
            Local {
                conn,
                since_ms: now,
                heartbeat_ms: now,
                written: None,
            },
        );
        if let Some(p) = previous {
            debug!(
                previous = p.conn,
                conn, "registry: a device's new connection"
            );
        }
        self.wake.notify_one();
    }

    /// The device sent a heartbeat.
    pub fn heartbeat(&self, user: &str, device: &str) {
        if let Some(local) = self.state().devices.get_mut(&key(user, device)) {
            local.heartbeat_ms = crate::clock::now_ms();
        }
    }

    /// Connection `conn` of the device ended (nothing changes if a newer one replaced it).
    pub fn disconnected(&self, user: &str, device: &str, conn: u64) {
        let key = key(user, device);
        let mut state = self.state();
        if state.devices.get(&key).is_none_or(|l| l.conn != conn) {
            return;
        }
        if let Some(Local {
            written: Some((revision, _)),
            ..
        }) = state.devices.remove(&key)
        {
            state.gone.push((key, revision));
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Devices connected to this node.
    pub fn local_count(&self) -> usize {
        self.state().devices.len()
    }

    /// Writes the map to the bucket: on every change, and every third of the TTL.
    pub(super) async fn run(self: std::sync::Arc<Self>) {
        let refresh = self.ttl / 3;
        loop {
            let _ = tokio::time::timeout(refresh, self.wake.notified()).await;
            self.sync(refresh).await;
        }
    }

    /// One pass: new and due entries written, departed ones deleted.
    async fn sync(&self, refresh: Duration) {
        let (puts, gone) = {
            let mut state = self.state();
            let puts: Vec<(String, DeviceEntry)> = state
                .devices
                .iter()
                .filter(|(_, l)| l.written.is_none_or(|(_, at)| at.elapsed() >= refresh))
                .map(|(k, l)| {
                    let entry = DeviceEntry {
                        node: self.node.clone(),
                        conn: l.conn,
                        since_ms: l.since_ms,
                        heartbeat_ms: l.heartbeat_ms,
                    };
                    (k.clone(), entry)
                })
                .collect();
            (puts, std::mem::take(&mut state.gone))
        };
        // Many at once (a reconnecting crowd must not register one round trip at a time),
        // at most `IN_FLIGHT` requests in flight.
        futures_util::stream::iter(gone)
            .for_each_concurrent(IN_FLIGHT, |(key, revision)| async move {
                // Only the entry this node wrote: if the device has since connected
                // elsewhere, the revision moved on and that node's entry stays.
                if let Err(e) = self
                    .store
                    .delete_expect_revision(&key, Some(revision))
                    .await
                {
                    debug!(%key, error = %e, "registry entry not removed (moved on, or NATS away)");
                }
            })
            .await;
        // One warning a pass, not one a device: with NATS away every write fails.
        let failed = std::sync::atomic::AtomicUsize::new(0);
        let last_error = Mutex::new(None);
        futures_util::stream::iter(puts)
            .for_each_concurrent(IN_FLIGHT, |(key, entry)| async {
                if let Err(e) = self.write(key, entry).await {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    *last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            })
            .await;
        let failed = failed.into_inner();
        if let Some(e) = last_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            warn!(failed, error = %e, "could not write registry entries; trying again");
        }
    }

    /// Writes one device's entry and notes its revision or, if the device left meanwhile,
    /// queues the entry's removal. An entry that was not written is tried again next pass.
    async fn write(&self, key: String, entry: DeviceEntry) -> Result<(), ClusterError> {
        let value =
            serde_json::to_vec(&entry).map_err(|e| ClusterError::js("encode an entry", e))?;
        let revision = put_with_ttl(&self.js, DEVICES_BUCKET, &key, value.into(), self.ttl).await?;
        let mut state = self.state();
        if let Some(local) = state.devices.get_mut(&key)
            && local.conn == entry.conn
        {
            local.written = Some((revision, Instant::now()));
        } else {
            // The device left while its entry was being written.
            state.gone.push((key, revision));
            drop(state);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Deletes every entry this node wrote (at shutdown).
    pub(super) async fn remove_all(&self) {
        {
            let mut state = self.state();
            let written: Vec<(String, u64)> = state
                .devices
                .drain()
                .filter_map(|(k, l)| l.written.map(|(rev, _)| (k, rev)))
                .collect();
            state.gone.extend(written);
        }
        self.sync(Duration::MAX).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hex_and_share_the_users_prefix() {
        assert_eq!(key("bob", "phone"), "626f62.70686f6e65");
        assert!(key("bob", "laptop").starts_with("626f62."));
        // Characters a bucket key cannot hold become hex digits.
        assert_eq!(key("a b", "é"), "612062.c3a9");
    }
}
