//! Shard ownership: one owner per shard at a time, by a lease in the `plover_shards` bucket.
//!
//! Conversations hash to a fixed number of shards, chosen when the cluster is first created
//! (`cluster.shards`, stored under `shards` in the `plover_cluster` bucket; a later node with
//! another setting uses the stored one). Each shard's lease is the key `s<N>`, holding the
//! owner's id, written with a per-key TTL of `cluster.lease`:
//!
//! - a node **acquires** a shard by creating its key (a create fails if a live lease
//!   exists), and **renews** it every third of the lease by an update that expects the
//!   revision it holds. The revision is the lease's fencing epoch: whoever wrote it last is
//!   the owner, and nobody else can write it without reading it first.
//! - A node that finds its expected revision gone (the lease expired while it was paused or
//!   cut off, and another node took it) has been **deposed**: it drops the shard at once.
//!   One that cannot renew for a whole lease (NATS away) drops it too, since the lease may
//!   have passed on meanwhile.
//! - **Balance**: every node aims at its fair share, `ceil(shards / live nodes)`, counting
//!   the nodes of the `plover_nodes` bucket. A node under its share takes free shards (a
//!   dead node's leases free themselves by their TTL); a node over its share gives shards
//!   back only while another live node is under its share (a node joining), and at most
//!   [`MAX_MOVES`] per round each way, so a join or a loss moves a bounded number of shards.
//! - A node that stops gives its leases back at once (a delete at the revision it holds).

use async_nats::jetstream::{self, context::PublishErrorKind, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

use super::{ClusterError, nodes};
use crate::config::ClusterConfig;

/// The bucket of the cluster's fixed settings.
pub const CLUSTER_BUCKET: &str = "plover_cluster";
/// The bucket of the shards' leases.
pub const SHARDS_BUCKET: &str = "plover_shards";
/// Most shards one node takes, and gives back, in one round.
pub const MAX_MOVES: usize = 4;

/// A lease's value (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The owning node.
    pub node: String,
    /// When it took the shard, in ms since the Unix epoch.
    pub since_ms: u64,
}

/// The key of a shard's lease.
pub fn key(shard: u32) -> String {
    format!("s{shard}")
}

/// A shard this node holds: the revision it wrote last (the epoch) and when.
#[derive(Debug, Clone, Copy)]
struct Held {
    revision: u64,
    renewed: Instant,
    since_ms: u64,
}

/// This node's side of shard ownership.
pub struct Ownership {
    js: jetstream::Context,
    leases: kv::Store,
    node: String,
    shards: u32,
    lease: Duration,
    /// The shards held, by shard. A std `Mutex`: map operations only, never across an await.
    held: Mutex<BTreeMap<u32, Held>>,
    /// Set when the node drains: it gives every shard back and takes none.
    draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("node", &self.node)
            .field("shards", &self.shards)
            .finish()
    }
}

impl Ownership {
    /// Binds the buckets and reads (or, for the cluster's first node, sets) the shard count.
    pub async fn new(js: jetstream::Context, config: &ClusterConfig) -> Result<Self, ClusterError> {
        let settings = super::bucket(js.clone(), CLUSTER_BUCKET, None, config).await?;
        let wanted = config.shards.to_string();
        // Only the first node's create succeeds; everyone reads what it stored.
        if settings
            .create("shards", wanted.clone().into_bytes().into())
            .await
            .is_ok()
        {
            info!(shards = config.shards, "created the cluster's shard map");
        }
        // A bucket just created may answer "no responders" for a moment (its stream's
        // direct get is not up yet on a busy cluster): try again for a while.
        let deadline = tokio::time::Instant::now() + super::STARTUP_PATIENCE;
        let stored = loop {
            match settings.get("shards").await {
                Ok(stored) => break stored,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "cannot read the shard count yet; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(ClusterError::js("read the shard count", e)),
            }
        }
        .ok_or_else(|| ClusterError::js("read the shard count", "it is missing"))?;
        let shards: u32 = std::str::from_utf8(&stored)
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| ClusterError::js("read the shard count", "it is not a number"))?;
        if shards != config.shards {
            info!(
                shards,
                configured = config.shards,
                "the cluster's shard count was fixed when it was created; cluster.shards is not used"
            );
        }
        let leases = super::bucket(js.clone(), SHARDS_BUCKET, Some(config.lease), config).await?;
        Ok(Self {
            js,
            leases,
            node: config.node.clone(),
            shards,
            lease: config.lease,
            held: Mutex::default(),
            draining: false.into(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster's shard count.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard a conversation belongs to.
    pub fn shard_of(&self, conversation: plover_proto::ConversationId) -> u32 {
        u32::try_from(conversation % u64::from(self.shards)).unwrap_or(0)
    }

    /// The shards this node holds with their epochs (lease revisions), in shard order.
    pub fn owned(&self) -> Vec<(u32, u64)> {
        self.held()
            .iter()
            .map(|(shard, h)| (*shard, h.revision))
            .collect()
    }

    /// Renews, takes and gives back leases every third of the lease, forever.
    pub async fn run(&self) {
        let mut tick = tokio::time::interval(self.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.renew().await;
            if let Err(e) = self.balance().await {
                warn!(error = %e, "shard balance round failed");
            }
        }
    }

    /// Renews every held lease at the revision held; drops those that moved on (deposed) or
    /// could not be renewed for a whole lease.
    pub async fn renew(&self) {
        let held: Vec<(u32, Held)> = self.held().iter().map(|(s, h)| (*s, *h)).collect();
        for (shard, h) in held {
            let value = self.value(h.since_ms);
            // The lease runs from when JetStream stores the write, which is after this: a
            // lease counted from here ends no later than the one NATS keeps.
            let sent = Instant::now();
            let renewed = super::publish_ttl(
                &self.js,
                SHARDS_BUCKET,
                &key(shard),
                value,
                self.lease,
                Some(h.revision),
            )
            .await
            .map_err(Renewal::from);
            let mut held = self.held();
            match renewed {
                Ok(revision) => {
                    held.insert(
                        shard,
                        Held {
                            revision,
                            renewed: sent,
                            since_ms: h.since_ms,
                        },
                    );
                }
                // Also when an earlier renewal was stored but its answer lost: the shard is
                // then free again once that lease ends. Safe, if not the quickest.
                Err(Renewal::Deposed) => {
                    held.remove(&shard);
                    warn!(
                        shard,
                        epoch = h.revision,
                        "deposed: the shard's lease moved on"
                    );
                    metrics::counter!(crate::metrics::names::SHARDS_LOST).increment(1);
                }
                Err(Renewal::Failed(e)) if h.renewed.elapsed() >= self.lease => {
                    held.remove(&shard);
                    warn!(shard, error = %e, "gave up a shard whose lease could not be renewed in time");
                    metrics::counter!(crate::metrics::names::SHARDS_LOST).increment(1);
                }
                Err(Renewal::Failed(e)) => {
                    debug!(shard, error = %e, "lease renewal failed; trying again");
                }
            }
        }
        metrics::gauge!(crate::metrics::names::SHARDS_OWNED).set(self.held().len() as f64);
    }

    fn value(&self, since_ms: u64) -> bytes::Bytes {
        let lease = Lease {
            node: self.node.clone(),
            since_ms,
        };
        serde_json::to_vec(&lease).unwrap_or_default().into()
    }

    /// From now on this node holds no shard: gives back those it holds, and takes none
    /// again (a draining node).
    pub async fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.release_all().await;
    }

    /// Whether [`Ownership::drain`] was called.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One round of taking free shards up to the fair share and giving back shards over it
    /// while another node is under it. Draining nodes count for nothing: they hold no share.
    pub async fn balance(&self) -> Result<(), ClusterError> {
        if self.draining() {
            self.release_all().await;
            return Ok(());
        }
        let live = nodes::list(&self.js).await?;
        let mut live: Vec<String> = live
            .into_iter()
            .filter(|r| !r.draining)
            .map(|r| r.node)
            .collect();
        if !live.contains(&self.node) {
            live.push(self.node.clone());
        }
        let n = u32::try_from(live.len()).unwrap_or(u32::MAX).max(1);
        let fair = usize::try_from(self.shards.div_ceil(n)).unwrap_or(usize::MAX);
        let (owners, free) = self.survey().await?;
        let mine = self.held().len();
        if mine < fair {
            // Start at a place of this node's own, so that nodes joining together do not all
            // race for the same free shards.
            let offset = self.node.bytes().map(usize::from).sum::<usize>();
            let mut free = free;
            if !free.is_empty() {
                let at = offset % free.len();
                free.rotate_left(at);
            }
            for shard in free.into_iter().take((fair - mine).min(MAX_MOVES)) {
                self.acquire(shard).await;
            }
        } else if mine > fair {
            let someone_short = live
                .iter()
                .filter(|node| **node != self.node)
                .any(|node| owners.get(node).copied().unwrap_or(0) < fair);
            if someone_short {
                let give: Vec<(u32, Held)> = self
                    .held()
                    .iter()
                    .rev()
                    .take((mine - fair).min(MAX_MOVES))
                    .map(|(s, h)| (*s, *h))
                    .collect();
                for (shard, h) in give {
                    self.release(shard, h.revision).await;
                }
            }
        }
        Ok(())
    }

    /// Who holds each shard now: the count per node, and the shards nobody holds.
    async fn survey(&self) -> Result<(HashMap<String, usize>, Vec<u32>), ClusterError> {
        let mut owners: HashMap<String, usize> = HashMap::new();
        let mut free = Vec::new();
        // Up to 16 reads in flight, answers in shard order.
        let entries: Vec<_> = futures_util::stream::iter(0..self.shards)
            .map(|shard| async move { (shard, self.leases.entry(key(shard)).await) })
            .buffered(16)
            .collect()
            .await;
        for (shard, entry) in entries {
            let entry = entry.map_err(|e| ClusterError::js("read a lease", e))?;
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    match serde_json::from_slice::<Lease>(&e.value) {
                        Ok(lease) => *owners.entry(lease.node).or_default() += 1,
                        Err(_) => free.push(shard),
                    }
                }
                _ => free.push(shard),
            }
        }
        Ok((owners, free))
    }

    /// Tries to take a free shard.
    async fn acquire(&self, shard: u32) {
        let since_ms = crate::clock::now_ms();
        let sent = Instant::now();
        match self
            .leases
            .create_with_ttl(key(shard), self.value(since_ms), self.lease)
            .await
        {
            Ok(revision) => {
                info!(shard, epoch = revision, "took a shard");
                self.held().insert(
                    shard,
                    Held {
                        revision,
                        renewed: sent,
                        since_ms,
                    },
                );
            }
            // Another node was quicker, or NATS is away: the next round looks again.
            Err(e) => debug!(shard, error = %e, "shard not taken"),
        }
    }

    /// Gives a shard back (to a node under its share, or at shutdown).
    async fn release(&self, shard: u32, revision: u64) {
        self.held().remove(&shard);
        match self
            .leases
            .delete_expect_revision(key(shard), Some(revision))
            .await
        {
            Ok(()) => info!(shard, "gave a shard back"),
            Err(e) => debug!(shard, error = %e, "shard given back by its TTL instead"),
        }
    }

    /// Gives back every shard held (at shutdown): others take them at once instead of
    /// waiting out the leases.
    pub async fn release_all(&self) {
        let held: Vec<(u32, u64)> = self.owned();
        for (shard, revision) in held {
            self.release(shard, revision).await;
        }
    }
}

/// Why a lease was not renewed.
#[derive(Debug)]
pub(super) enum Renewal {
    /// The lease's revision moved on: another node holds it, or it expired.
    Deposed,
    /// NATS did not answer, or refused for another reason.
    Failed(ClusterError),
}

impl From<jetstream::context::PublishError> for Renewal {
    fn from(e: jetstream::context::PublishError) -> Self {
        if e.kind() == PublishErrorKind::WrongLastSequence {
            Self::Deposed
        } else {
            Self::Failed(ClusterError::js("renew a lease", e))
        }
    }
}

impl std::fmt::Display for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Deposed => f.write_str("deposed: the lease moved on"),
            Self::Failed(e) => e.fmt(f),
        }
    }
}
