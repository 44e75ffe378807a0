//! Service discovery: each node's record in the `plover_nodes` bucket.
//!
//! A node writes its record (id, the address clients reach it at, its zone and its load) when
//! it joins and again every third of `cluster.node_ttl`; the record carries that TTL, so a
//! node that dies without a word drops out of the list within `node_ttl`, and one that stops
//! removes its record at once.

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

use super::{ClusterError, NODES_BUCKET, Ownership, Registry, put_with_ttl};
use crate::config::ClusterConfig;

/// What a node says of itself (JSON in the bucket, keyed by the node id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's id (`cluster.node`).
    pub node: String,
    /// Where clients reach it (`cluster.advertise`, `host:port`).
    pub advertise: String,
    /// Its zone, if configured.
    pub zone: Option<String>,
    /// Devices connected to it.
    pub connections: u64,
    /// Shards whose lease it holds.
    #[serde(default)]
    pub shards: u32,
    /// The CPU it used over the last interval, in cores (1.0 = one core busy); `None` where
    /// the platform does not say.
    pub cpu: Option<f64>,
    /// When it started, in ms since the Unix epoch.
    pub started_ms: u64,
    /// When it wrote this record, in ms since the Unix epoch.
    pub updated_ms: u64,
    /// Its plover version.
    pub version: String,
    /// Whether it is draining (sending its devices elsewhere before it stops): it takes no
    /// new clients and no shards.
    #[serde(default)]
    pub draining: bool,
}

impl NodeRecord {
    /// Whether the record missed a refresh (it is rewritten every third of `ttl`; one older
    /// than two thirds missed one): its node may be dead and only waiting out the TTL, so
    /// it is the last place to send clients. Judged by this node's clock against the
    /// writer's, so skewed clocks only make every record look stale alike.
    pub fn stale(&self, ttl: Duration, now_ms: u64) -> bool {
        let limit = u64::try_from((ttl * 2 / 3).as_millis()).unwrap_or(u64::MAX);
        now_ms.saturating_sub(self.updated_ms) > limit
    }
}

/// Writes this node's record until dropped.
pub(super) struct Announcer {
    js: jetstream::Context,
    record: NodeRecord,
    ttl: Duration,
    registry: Arc<Registry>,
    ownership: Arc<Ownership>,
}

impl Announcer {
    pub(super) fn new(
        js: jetstream::Context,
        config: &ClusterConfig,
        advertise: String,
        registry: Arc<Registry>,
        ownership: Arc<Ownership>,
    ) -> Self {
        let now = crate::clock::now_ms();
        Self {
            js,
            ttl: config.node_ttl,
            registry,
            ownership,
            record: NodeRecord {
                node: config.node.clone(),
                advertise,
                zone: config.zone.clone(),
                connections: 0,
                shards: 0,
                cpu: None,
                started_ms: now,
                updated_ms: now,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                draining: false,
            },
        }
    }

    /// Writes the record every third of its TTL, and at once when `now` is notified (the
    /// node starts draining), forever. A failed write is logged and tried again at the next
    /// tick: the record lives a whole TTL, so two misses are harmless.
    pub(super) async fn run(mut self, now: Arc<tokio::sync::Notify>) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cpu = CpuMeter::start();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = now.notified() => {}
            }
            self.record.draining = self.ownership.draining();
            self.record.connections = self.registry.local_count() as u64;
            self.record.shards = u32::try_from(self.ownership.owned().len()).unwrap_or(u32::MAX);
            self.record.cpu = cpu.cores();
            self.record.updated_ms = crate::clock::now_ms();
            let value = match serde_json::to_vec(&self.record) {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "cannot encode this node's record");
                    continue;
                }
            };
            if let Err(e) = put_with_ttl(
                &self.js,
                NODES_BUCKET,
                &self.record.node,
                value.into(),
                self.ttl,
            )
            .await
            {
                warn!(error = %e, "could not refresh this node's record");
            }
        }
    }
}

/// Removes a node's record (at its shutdown).
pub(super) async fn remove(nodes: &kv::Store, node: &str) -> Result<(), ClusterError> {
    nodes
        .purge(node)
        .await
        .map_err(|e| ClusterError::js("remove node record", e))
}

/// Every live node's record, sorted by id.
pub async fn list(js: &jetstream::Context) -> Result<Vec<NodeRecord>, ClusterError> {
    let nodes = js
        .get_key_value(NODES_BUCKET)
        .await
        .map_err(|e| ClusterError::js("nodes bucket", e))?;
    let mut keys = nodes
        .keys()
        .await
        .map_err(|e| ClusterError::js("list nodes", e))?;
    let mut records = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| ClusterError::js("list nodes", e))?;
        let Some(value) = nodes
            .get(key.as_str())
            .await
            .map_err(|e| ClusterError::js("read node", e))?
        else {
            continue;
        };
        match serde_json::from_slice::<NodeRecord>(&value) {
            Ok(r) => records.push(r),
            Err(e) => warn!(%key, error = %e, "unreadable node record"),
        }
    }
    records.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(records)
}

/// The process's CPU use between two readings, in cores.
struct CpuMeter {
    at: Instant,
    cpu: Option<Duration>,
}

impl CpuMeter {
    fn start() -> Self {
        Self {
            at: Instant::now(),
            cpu: process_cpu(),
        }
    }

    /// Cores used since the last reading (or the start), and starts a new interval.
    fn cores(&mut self) -> Option<f64> {
        let (now, cpu) = (Instant::now(), process_cpu());
        let wall = now.duration_since(self.at).as_secs_f64();
        let used = match (self.cpu, cpu) {
            (Some(before), Some(after)) if wall > 0.0 => {
                Some(after.saturating_sub(before).as_secs_f64() / wall)
            }
            _ => None,
        };
        (self.at, self.cpu) = (now, cpu);
        used.map(|c| (c * 100.0).round() / 100.0)
    }
}

/// CPU time this process has used (all threads).
fn process_cpu() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        let secs = u64::try_from(t.tv_sec).ok()?;
        let nanos = u32::try_from(t.tv_nsec).ok()?;
        Some(Duration::new(secs, nanos))
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}
