//! Many plover nodes on NATS JetStream: the engine check, the nodes bucket (service
//! discovery) and the connection registry.
//!
//! With no `[cluster]` section none of this runs: one node on its embedded store, as before.
//! With one, [`Cluster::join`] connects to NATS and refuses to go on unless the engine is one
//! plover can trust with acknowledged writes (JetStream on, nats-server 2.12.3 or later, and
//! `sync_interval: always` on every server named in `cluster.monitor`: by default NATS
//! acknowledges before it fsyncs). Then:
//!
//! - [`nodes`]: each node keeps a record of itself (id, advertise address, zone, load) in the
//!   `plover_nodes` bucket under a per-key TTL, refreshed while it runs and removed when it
//!   stops: the design's service discovery, which `plover nodes` lists.
//! - [`registry`]: which node holds each (user, device), with the device's last heartbeat,
//!   in the `plover_devices` bucket under a per-key TTL: the design's connections table.
//! - [`ownership`]: one owner per shard at a time, by leases with fencing epochs.
//! - [`log`]: a shard's replicated log, fenced appends with checksummed records.
//!
//! Every bucket is a JetStream stream with `cluster.replicas` replicas: no consensus or
//! replication of plover's own.

pub mod log;
pub mod nodes;
pub mod ownership;
pub mod registry;
mod relay;
pub mod replica;

use async_nats::jetstream::{self, kv};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

use crate::config::ClusterConfig;
pub use nodes::NodeRecord;
pub use ownership::Ownership;
pub use registry::Registry;
pub use replica::Replica;

/// A JetStream context (async-nats's), as [`connect`] returns it.
pub type JetStream = jetstream::Context;

/// The oldest nats-server plover runs on: 2.12.3 fixed the acknowledged-write losses Jepsen
/// found in 2.12.1 (nats-server issues 7545, 7549, 7556).
pub const MIN_NATS: (u64, u64, u64) = (2, 12, 3);

/// The bucket of node records.
pub const NODES_BUCKET: &str = "plover_nodes";
/// The bucket of the connection registry.
pub const DEVICES_BUCKET: &str = "plover_devices";

/// Why a node cannot join (or keep up with) its cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No NATS server in `cluster.nats` answered.
    #[error("cannot reach NATS at {urls}: {error}")]
    Unreachable {
        /// The configured servers.
        urls: String,
        /// Why (the message says it; not chained again as a source).
        error: async_nats::ConnectError,
    },
    /// The server answered but JetStream is off (or this account has none).
    #[error(
        "NATS at {urls} has no JetStream for this account ({reason}): start nats-server with a `jetstream {{ ... }}` block"
    )]
    NoJetStream {
        /// The configured servers.
        urls: String,
        /// What the server said.
        reason: String,
    },
    /// The server is older than [`MIN_NATS`].
    #[error(
        "nats-server {found} is too old: plover needs 2.12.3 or later (earlier versions can lose acknowledged writes)"
    )]
    TooOld {
        /// The version it reported.
        found: String,
    },
    /// A monitoring endpoint could not be read.
    #[error(
        "cannot read {url}: {reason} (cluster.monitor names each NATS server's monitoring address, checked for sync_interval)"
    )]
    Monitor {
        /// The `/varz` address.
        url: String,
        /// Why.
        reason: String,
    },
    /// A server acknowledges writes before they are on disk.
    #[error(
        "the NATS server at {url} does not fsync every write: set `sync_interval: always` in its jetstream block (by default NATS acknowledges before it fsyncs)"
    )]
    NotSyncAlways {
        /// The `/varz` address.
        url: String,
    },
    /// A JetStream request failed.
    #[error("JetStream {what}: {reason}")]
    JetStream {
        /// What was asked.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
}

impl ClusterError {
    fn js(what: &'static str, e: impl std::fmt::Display) -> Self {
        Self::JetStream {
            what,
            reason: e.to_string(),
        }
    }
}

/// Where this node sends a new client instead of serving it, from the other nodes' records
/// (refreshed every third of `node_ttl` by [`Cluster::run`]) and the zone the client asked
/// for in `Hello`.
#[derive(Debug, Clone, Default)]
pub struct Redirect(Arc<std::sync::Mutex<Placement>>);

/// What [`Redirect::target`] decides from.
#[derive(Debug, Default)]
struct Placement {
    /// The other live nodes that take clients (not draining), least loaded first.
    others: Vec<NodeRecord>,
    /// This node's zone.
    zone: Option<String>,
    /// Devices on this node at the last look.
    mine: u64,
    /// `cluster.rebalance_above` (0: never).
    above: u64,
    /// This node is draining: every new client goes elsewhere, if there is an elsewhere.
    draining: bool,
}

impl Redirect {
    /// The address to send a new client to, or `None` to serve it here.
    ///
    /// - A client that asked for another zone than this node's goes to the least loaded node
    ///   of that zone, if one is up (if none is, it is served here: better served far away
    ///   than not at all).
    /// - A draining node sends every client to the least loaded node of the client's zone
    ///   (the one it asked for, or this node's), or of any zone.
    /// - A node holding `rebalance_above` more devices than the least loaded node of its
    ///   zone sends new clients there. Load never moves a client to another zone.
    pub fn target(&self, asked: Option<&str>) -> Option<String> {
        let p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let of_zone = |zone: Option<&str>| p.others.iter().find(|n| n.zone.as_deref() == zone);
        let zone = p.zone.as_deref();
        if let Some(asked) = asked.filter(|a| Some(*a) != zone)
            && let Some(n) = of_zone(Some(asked))
        {
            return Some(n.advertise.clone());
        }
        let near = of_zone(zone);
        if p.draining {
            return near.or(p.others.first()).map(|n| n.advertise.clone());
        }
        near.filter(|n| p.above > 0 && p.mine >= n.connections.saturating_add(p.above))
            .map(|n| n.advertise.clone())
    }

    /// Sends every new client elsewhere from now on.
    fn drain(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).draining = true;
    }

    /// Takes the other nodes' records: draining nodes are left out, and the rest ordered
    /// fresh before stale (see [`NodeRecord::stale`]), then least loaded first.
    fn update(&self, mut others: Vec<NodeRecord>, mine: u64, draining: bool, ttl: Duration) {
        let now = crate::clock::now_ms();
        others.retain(|n| !n.draining);
        others.sort_by_key(|n| (n.stale(ttl, now), n.connections));
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let was = p.above > 0 && !p.draining && Self::overloaded(&p);
        (p.others, p.mine, p.draining) = (others, mine, draining);
        let is = p.above > 0 && !p.draining && Self::overloaded(&p);
        match (was, is) {
            (false, true) => info!("sending new clients to a less loaded node"),
            (true, false) => info!("taking new clients again"),
            _ => {}
        }
    }

    fn overloaded(p: &Placement) -> bool {
        p.others
            .iter()
            .find(|n| n.zone == p.zone)
            .is_some_and(|n| p.mine >= n.connections.saturating_add(p.above))
    }
}

/// A node's place in its cluster: the NATS connection, the buckets and this node's record.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    nodes: kv::Store,
    registry: Arc<Registry>,
    ownership: Arc<Ownership>,
    redirect: Redirect,
    /// Wakes the announcer (this node's record changed: it drains).
    announce: Arc<tokio::sync::Notify>,
    /// Wakes [`Cluster::place`].
    replace: tokio::sync::Notify,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.config.node)
            .finish()
    }
}

impl Cluster {
    /// Connects, checks the engine, and binds (creating if needed) the buckets. `heartbeat`
    /// is the devices' heartbeat interval, from which the registry's TTL follows.
    pub async fn join(config: &ClusterConfig, heartbeat: Duration) -> Result<Self, ClusterError> {
        let js = connect(config).await?;
        let client = js.client();
        check_monitors(&config.monitor).await?;
        let nodes = bucket(js.clone(), NODES_BUCKET, Some(config.node_ttl), config).await?;
        let devices = bucket(js.clone(), DEVICES_BUCKET, Some(heartbeat), config).await?;
        let ownership = Arc::new(Ownership::new(js.clone(), config).await?);
        let registry = Arc::new(Registry::new(
            js.clone(),
            devices,
            config.node.clone(),
            heartbeat,
        ));
        info!(node = %config.node, "joined the cluster");
        Ok(Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                client,
                js,
                nodes,
                registry,
                ownership,
                redirect: Redirect(Arc::new(std::sync::Mutex::new(Placement {
                    zone: config.zone.clone(),
                    above: config.rebalance_above,
                    ..Placement::default()
                }))),
                announce: Arc::default(),
                replace: tokio::sync::Notify::new(),
            }),
        })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.inner.config.node
    }

    /// What clients are told to reach this node at: `cluster.advertise`, or the address the
    /// listener is bound to.
    pub fn advertise_or(&self, bound: std::net::SocketAddr) -> String {
        self.inner
            .config
            .advertise
            .clone()
            .unwrap_or_else(|| bound.to_string())
    }

    /// The connection registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// Where this node sends new clients, kept up to date by [`Cluster::run`].
    pub fn redirect(&self) -> &Redirect {
        &self.inner.redirect
    }

    /// Reads the other nodes' records every third of `node_ttl` (and at once when the
    /// node starts draining) and keeps the redirect up to date with them. Forever.
    async fn place(&self) {
        let config = &self.inner.config;
        let mut tick = tokio::time::interval(config.node_ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.replace.notified() => {}
            }
            let Ok(mut nodes) = nodes::list(&self.inner.js).await else {
                continue;
            };
            nodes.retain(|n| n.node != config.node);
            let mine = self.inner.registry.local_count() as u64;
            let draining = self.inner.ownership.draining();
            self.inner
                .redirect
                .update(nodes, mine, draining, config.node_ttl);
        }
    }

    /// Starts draining: this node gives back its shards, says so in its record (so no other
    /// node sends clients here), and sends every new client elsewhere. Moving the devices
    /// already here is the transport's part (`Listener::run`).
    pub async fn drain(&self) {
        info!(node = %self.inner.config.node, "draining: giving back shards, sending new clients elsewhere");
        self.inner.redirect.drain();
        self.inner.ownership.drain().await;
        self.inner.announce.notify_one();
        self.inner.replace.notify_one();
    }

    /// Devices a draining node sends elsewhere per second (`cluster.drain_rate`).
    pub fn drain_rate(&self) -> u32 {
        self.inner.config.drain_rate
    }

    /// Makes `presence` cluster-wide (`relay.rs`): the returned task relays until dropped.
    pub fn relay(&self, presence: Arc<crate::router::Presence>) -> tokio::task::JoinHandle<()> {
        relay::start(
            self.inner.client.clone(),
            self.inner.js.clone(),
            self.inner.config.node.clone(),
            presence,
            self.inner.config.node_ttl,
        )
    }

    /// The addresses of the other live nodes, least loaded (by connected devices) first:
    /// where this node's clients go when it stops. Empty when there is none or NATS does not
    /// answer within a second.
    pub async fn elsewhere(&self) -> Vec<String> {
        let listed = tokio::time::timeout(Duration::from_secs(1), nodes::list(&self.inner.js));
        let Ok(Ok(mut nodes)) = listed.await else {
            return Vec::new();
        };
        nodes.retain(|n| n.node != self.inner.config.node && !n.draining);
        // A record that missed a refresh may be a dead node's, waiting out its TTL: last.
        let (ttl, now) = (self.inner.config.node_ttl, crate::clock::now_ms());
        nodes.sort_by_key(|n| (n.stale(ttl, now), n.connections));
        nodes.into_iter().map(|n| n.advertise).collect()
    }

    /// Binds the cluster's replicated log (`replica.rs`).
    pub async fn replica(&self) -> Result<Replica, ClusterError> {
        Replica::open(self.inner.js.clone(), &self.inner.config).await
    }

    /// This node's shard leases.
    pub fn ownership(&self) -> &Arc<Ownership> {
        &self.inner.ownership
    }

    /// Keeps this node's record (announcing `advertise`) and the registry up to date until
    /// `shutdown`, then removes both (a node that dies instead leaves them to their TTL).
    pub async fn run(self, advertise: String, shutdown: impl Future<Output = ()>) {
        let inner = &self.inner;
        info!(node = %inner.config.node, %advertise, "announcing this node");
        let announcer = nodes::Announcer::new(
            inner.js.clone(),
            &inner.config,
            advertise,
            inner.registry.clone(),
            inner.ownership.clone(),
        );
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {}
            () = announcer.run(inner.announce.clone()) => {}
            () = inner.registry.clone().run() => {}
            () = inner.ownership.run() => {}
            () = self.place() => {}
        }
        // Leaving cleanly only saves the others waiting out the TTLs: with NATS away it
        // must not hold up the shutdown.
        let leave = async {
            inner.ownership.release_all().await;
            if let Err(e) = nodes::remove(&inner.nodes, &inner.config.node).await {
                warn!(error = %e, "could not remove this node's record; it expires with its TTL");
            }
            inner.registry.remove_all().await;
            if let Err(e) = inner.client.flush().await {
                warn!(error = %e, "NATS flush at shutdown");
            }
        };
        if tokio::time::timeout(LEAVE_WITHIN, leave).await.is_err() {
            warn!("left the cluster without removing everything: the TTLs will");
        }
    }
}

/// How long a stopping node tries to give back its shards and remove its records.
const LEAVE_WITHIN: Duration = Duration::from_secs(5);

/// Connects to `config.nats` and checks the server's version and JetStream.
///
/// NATS servers started at the same moment as the node (the README's commands) may not
/// listen yet, and a JetStream cluster that has just formed answers with timeouts until it
/// has a leader: the connection is tried again for `connect_timeout`, and JetStream for
/// 30 s. A server without JetStream is refused at once.
pub async fn connect(config: &ClusterConfig) -> Result<jetstream::Context, ClusterError> {
    let urls = config.nats.join(",");
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let client = loop {
        let connected = async_nats::ConnectOptions::new()
            .name(format!("plover {}", config.node))
            .connection_timeout(config.connect_timeout)
            .connect(config.nats.as_slice())
            .await;
        match connected {
            Ok(client) => break client,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => {
                return Err(ClusterError::Unreachable {
                    urls: urls.clone(),
                    error,
                });
            }
        }
    };
    let version = client.server_info().version;
    if !at_least(&version, MIN_NATS) {
        return Err(ClusterError::TooOld { found: version });
    }
    let js = jetstream::new(client);
    let deadline = tokio::time::Instant::now() + STARTUP_PATIENCE;
    loop {
        let Err(e) = js.query_account().await else {
            return Ok(js);
        };
        // A timeout, or 10008 ("JetStream temporarily unavailable"), is a cluster still
        // electing its leader; anything else (no responders: JetStream off) is final.
        let settling = match e.kind() {
            jetstream::context::AccountErrorKind::TimedOut => true,
            jetstream::context::AccountErrorKind::JetStream(js_error) => {
                js_error.error_code().0 == 10008
            }
            _ => false,
        };
        if !settling || tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::NoJetStream {
                urls,
                reason: e.to_string(),
            });
        }
        warn!(error = %e, "JetStream not ready; trying again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether a `major.minor.patch[-suffix]` version is at least `min`.
fn at_least(version: &str, min: (u64, u64, u64)) -> bool {
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let mut parts = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    found >= min
}

/// Reads each server's `/varz` and refuses any whose JetStream does not fsync every write.
async fn check_monitors(monitors: &[String]) -> Result<(), ClusterError> {
    for base in monitors {
        let url = format!("{}/varz", base.trim_end_matches('/'));
        let fetched = url.clone();
        let varz = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, String> {
            let agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .new_agent();
            let mut response = agent.get(&fetched).call().map_err(|e| e.to_string())?;
            response
                .body_mut()
                .read_json::<serde_json::Value>()
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| ClusterError::Monitor {
            url: url.clone(),
            reason: e.to_string(),
        })?
        .map_err(|reason| ClusterError::Monitor {
            url: url.clone(),
            reason,
        })?;
        let config = &varz["jetstream"]["config"];
        if config.is_null() {
            return Err(ClusterError::Monitor {
                url,
                reason: "it reports no JetStream".into(),
            });
        }
        if config["sync_always"].as_bool() != Some(true) {
            return Err(ClusterError::NotSyncAlways { url });
        }
    }
    Ok(())
}

/// Binds a key-value bucket, creating it on first use: one entry per key, `replicas`
/// copies. With `ttl` (a hint of the keys' lifetime), keys may carry a time to live of their
/// own (`Nats-TTL`, written by [`publish_ttl`]) and an expiry leaves a delete marker, so that
/// readers and watchers see it.
pub(crate) async fn bucket(
    js: jetstream::Context,
    name: &str,
    ttl: Option<Duration>,
    config: &ClusterConfig,
) -> Result<kv::Store, ClusterError> {
    let settings = kv::Config {
        bucket: name.to_owned(),
        description: format!("plover {name}"),
        history: 1,
        num_replicas: config.replicas,
        storage: jetstream::stream::StorageType::File,
        // How long an expiry's delete marker itself stays: long enough for every node to
        // read it at least once.
        limit_markers: ttl.map(|t| t.max(Duration::from_secs(60))),
        ..Default::default()
    };
    // A JetStream cluster that has just formed (its servers started together, as the
    // README's do) answers with timeouts until its peers are current, and nodes starting
    // together race to create the same buckets: try again for a while before refusing.
    let deadline = tokio::time::Instant::now() + STARTUP_PATIENCE;
    loop {
        match js.create_or_update_key_value(settings.clone()).await {
            Ok(store) => return Ok(store),
            Err(e) if tokio::time::Instant::now() < deadline => {
                warn!(bucket = name, error = %e, "JetStream not ready; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(ClusterError::js("key-value bucket", format!("{name}: {e}")));
            }
        }
    }
}

/// How long a starting node waits for JetStream to create or bind its buckets.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);

/// Writes `value` at `key` of `bucket` with a time to live (whole seconds, at least 1): the
/// key disappears unless written again before then. With `expect`, only if the key's
/// revision is still that one (compare-and-set). Returns the new revision.
pub(crate) async fn publish_ttl(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
    value: bytes::Bytes,
    ttl: Duration,
    expect: Option<u64>,
) -> Result<u64, jetstream::context::PublishError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_TTL,
        ttl.as_secs().max(1).to_string().as_str(),
    );
    if let Some(revision) = expect {
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            revision.to_string().as_str(),
        );
    }
    let ack = js
        .publish_with_headers(format!("$KV.{bucket}.{key}"), headers, value)
        .await?
        .await?;
    Ok(ack.sequence)
}

/// [`publish_ttl`] without an expected revision, its error as the cluster's.
pub(crate) async fn put_with_ttl(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
    value: bytes::Bytes,
    ttl: Duration,
) -> Result<u64, ClusterError> {
    publish_ttl(js, bucket, key, value, ttl, None)
        .await
        .map_err(|e| ClusterError::js("put", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        assert!(at_least("2.15.1", MIN_NATS));
        assert!(at_least("2.12.3", MIN_NATS));
        assert!(at_least("2.12.10-beta", MIN_NATS));
        assert!(!at_least("2.12.1", MIN_NATS));
        assert!(!at_least("2.9.10", MIN_NATS));
        assert!(!at_least("garbage", MIN_NATS));
    }

    fn record(node: &str, zone: Option<&str>, connections: u64) -> NodeRecord {
        NodeRecord {
            node: node.into(),
            advertise: format!("{node}:4433"),
            zone: zone.map(str::to_owned),
            connections,
            shards: 0,
            cpu: None,
            started_ms: 0,
            updated_ms: crate::clock::now_ms(),
            version: String::new(),
            draining: false,
        }
    }

    const TTL: Duration = Duration::from_secs(10);

    fn placed(zone: Option<&str>, above: u64) -> Redirect {
        Redirect(Arc::new(std::sync::Mutex::new(Placement {
            zone: zone.map(str::to_owned),
            above,
            ..Placement::default()
        })))
    }

    #[test]
    fn zones_first_then_load_and_never_across_zones_for_load() {
        let r = placed(Some("west"), 10);
        let mut drained = record("w3", Some("west"), 0);
        drained.draining = true;
        let others = vec![
            record("e1", Some("east"), 50),
            record("e2", Some("east"), 20),
            record("w2", Some("west"), 30),
            drained,
        ];
        r.update(others.clone(), 35, false, TTL);
        // Another zone, asked for: its least loaded node. This node's zone, none, or one
        // nobody serves: here (35 is not 10 above w2's 30).
        assert_eq!(r.target(Some("east")).as_deref(), Some("e2:4433"));
        assert_eq!(r.target(Some("west")), None);
        assert_eq!(r.target(None), None);
        assert_eq!(r.target(Some("north")), None);
        // 40 is 10 above w2 (and the draining w3 takes nobody): new clients go to w2, never
        // to the emptier east for load.
        r.update(others.clone(), 40, false, TTL);
        assert_eq!(r.target(None).as_deref(), Some("w2:4433"));
        assert_eq!(r.target(Some("east")).as_deref(), Some("e2:4433"));
        // Draining: everyone goes, to this zone first.
        r.update(others, 0, true, TTL);
        assert_eq!(r.target(None).as_deref(), Some("w2:4433"));
        assert_eq!(r.target(Some("north")).as_deref(), Some("w2:4433"));
        // Draining with no node of this zone left: any zone.
        r.update(vec![record("e1", Some("east"), 5)], 0, true, TTL);
        assert_eq!(r.target(None).as_deref(), Some("e1:4433"));
        // A node that missed a refresh (dead, perhaps) comes after the fresh ones.
        let mut quiet = record("w9", Some("west"), 0);
        quiet.updated_ms = quiet.updated_ms.saturating_sub(8_000);
        r.update(vec![quiet, record("w2", Some("west"), 30)], 0, true, TTL);
        assert_eq!(r.target(None).as_deref(), Some("w2:4433"));
        // Alone: nowhere to go, even draining.
        r.update(Vec::new(), 100, true, TTL);
        assert_eq!(r.target(None), None);
        // Rebalancing off.
        let off = placed(None, 0);
        off.update(vec![record("n2", None, 0)], 1_000_000, false, TTL);
        assert_eq!(off.target(None), None);
    }
}
