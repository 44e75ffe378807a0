//! The server's one typed configuration.
//!
//! Read from a TOML file (`plover serve --config FILE`) with unknown keys refused, then
//! overridden by command-line flags. Every default below says why it is what it is;
//! `plover.example.toml` at the repository root lists every key.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of its allowed range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// When a message counts as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The ack waits for an fsync of the batch holding the message (group commit). The default:
    /// "sent" must survive a power cut.
    #[default]
    Sync,
    /// The ack waits only for the OS page cache. Survives a process crash; a power cut loses
    /// at most the last `store.buffered_sync` (100 ms) of acknowledged writes, since a
    /// thread of the router syncs the journal that often. For benchmarks and test rigs.
    Buffered,
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP address to listen on. Loopback by default: exposing a server is a deliberate act.
    pub listen: SocketAddr,
    /// Directory of the store and the token secret.
    pub data: PathBuf,
    /// Directory where the dev certificate is generated when `tls` names none.
    pub certs: PathBuf,
    /// This server's id, sent in `Welcome`. Defaults to the host name.
    pub server_id: Option<String>,
    /// TLS material.
    pub tls: TlsConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// Protocol and resource limits.
    pub limits: Limits,
    /// QUIC transport settings.
    pub transport: TransportSettings,
    /// The store.
    pub store: StoreConfig,
    /// Presence and typing.
    pub presence: PresenceConfig,
    /// Retention sweeps.
    pub retention: RetentionConfig,
    /// Push notifications.
    pub push: PushConfig,
    /// Metrics and health endpoints.
    pub metrics: MetricsConfig,
    /// Many nodes on NATS JetStream. Absent: one node on its embedded store.
    pub cluster: Option<ClusterConfig>,
    /// Images and files: where their bytes are kept, and the limits on them.
    pub media: MediaConfig,
}

/// Where stored objects live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaStore {
    /// Files under `media.dir` (default `<data>/media/objects`).
    Fs,
    /// An S3-compatible store (`[media.s3]`).
    S3,
}

/// Images and files (ARCHITECTURE.md, "Media").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Where objects live: `fs` (the default) or `s3`. A cluster's nodes must share one
    /// store: `s3`, or `fs` on a directory they all see.
    pub store: MediaStore,
    /// The `fs` store's directory. Default: `<data>/media/objects`.
    pub dir: Option<PathBuf>,
    /// The S3 store, for `store = "s3"`.
    pub s3: Option<S3Config>,
    /// The largest object, in bytes. 100 MiB: a phone's video, not a film.
    pub max_size: u64,
    /// Bytes of stored objects one user may keep (objects not yet removed by the collector;
    /// uploads under way are bounded by `max_size` and `expire_after` instead). 10 GiB.
    pub quota: u64,
    /// Uploads one user may start per hour (resuming one counts again). 600.
    pub uploads_per_hour: u32,
    /// Bytes a second one user's uploads may send, together (the server reads no faster:
    /// QUIC's flow control holds the client back). 10 MiB/s: above what a phone sends,
    /// and what keeps one fast client from taking the server's CPU and disk from everyone's
    /// messages (BENCHMARKS.md, "Media").
    pub upload_rate: u64,
    /// Bytes a second one user's downloads may take, together. 20 MiB/s: a 100 MiB video
    /// in five seconds, while a download at full speed would take the server's CPU from
    /// everyone's messages (BENCHMARKS.md, "Media").
    pub download_rate: u64,
    /// An unfinished upload, or a stored object no message references, is removed after
    /// this. 24 h: time to resume across a night without a connection.
    #[serde(with = "humantime_serde")]
    pub expire_after: Duration,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            store: MediaStore::Fs,
            dir: None,
            s3: None,
            max_size: 100 * 1024 * 1024,
            quota: 10 * 1024 * 1024 * 1024,
            uploads_per_hour: 600,
            upload_rate: 10 * 1024 * 1024,
            download_rate: 20 * 1024 * 1024,
            expire_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// An S3-compatible object store. Credentials come from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), never from this file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// Its endpoint (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:8333`).
    pub endpoint: Option<String>,
    /// Its region.
    #[serde(default = "S3Config::default_region")]
    pub region: String,
}

impl S3Config {
    fn default_region() -> String {
        "us-east-1".into()
    }
}

/// Many nodes on NATS JetStream (ARCHITECTURE.md, "Cluster").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS servers to connect to (`nats://host:port`); any one of them will do, the client
    /// learns the others from it.
    pub nats: Vec<String>,
    /// The monitoring address of every NATS server of the cluster (`http://host:8222`): the
    /// node reads each one's `/varz` at start and refuses to run unless JetStream fsyncs
    /// every write (`sync_interval: always`), which NATS does not tell its clients.
    pub monitor: Vec<String>,
    /// This node's id, unique in the cluster: 1-64 characters of A-Z a-z 0-9 _ -.
    pub node: String,
    /// Where clients reach this node (`host:port`). Defaults to the listen address.
    #[serde(default)]
    pub advertise: Option<String>,
    /// The node's zone, for clients that ask for one.
    #[serde(default)]
    pub zone: Option<String>,
    /// Replicas of every bucket and stream. 3: an acknowledged write survives the loss of
    /// any one NATS server. 1 only for a single development NATS server.
    #[serde(default = "ClusterConfig::default_replicas")]
    pub replicas: usize,
    /// How long a node's record outlives its last refresh (refreshed every third of it): a
    /// node that dies leaves the list within this. 10 s: a few missed refreshes are not a
    /// death, and clients are not sent to a dead node for long.
    #[serde(default = "ClusterConfig::default_node_ttl", with = "humantime_serde")]
    pub node_ttl: Duration,
    /// Conversation shards of the cluster, fixed when its first node creates it (later nodes
    /// use the stored count). 64: a fair share stays even for up to a few dozen nodes, and
    /// each shard is one lease to renew.
    #[serde(default = "ClusterConfig::default_shards")]
    pub shards: u32,
    /// A shard lease's time to live, renewed every third of it: how long a dead node's
    /// shards wait before another takes them, and how long a paused owner may go unnoticed.
    /// 5 s: well past a garbage-collection pause or a NATS leader change, short enough for
    /// a failover of a few seconds.
    #[serde(default = "ClusterConfig::default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How long to wait for NATS at start before refusing to run.
    #[serde(
        default = "ClusterConfig::default_connect_timeout",
        with = "humantime_serde"
    )]
    pub connect_timeout: Duration,
    /// Messages of the replicated log between two snapshots of the store. The node holding
    /// shard 0 writes a snapshot to the `plover_snapshots` object store every this many, then
    /// removes the log before it, so the log stays bounded and a node that joins (or was away
    /// past the removal) loads the snapshot and applies only what follows. 0: never.
    #[serde(default = "ClusterConfig::default_snapshot_every")]
    pub snapshot_every: u64,
    /// A node holding this many more connected devices than the least loaded live node
    /// answers new clients' `Hello` with `moved` and that node's address, until the gap
    /// closes (looked at every third of `node_ttl`). 0: never.
    #[serde(default = "ClusterConfig::default_rebalance_above")]
    pub rebalance_above: u64,
    /// Devices a draining node (SIGUSR1) sends elsewhere per second. 500: each one costs the
    /// node it goes to a handshake, a token check and a catch-up, so a node of 100,000
    /// devices drains in under four minutes without a reconnection storm on the others.
    #[serde(default = "ClusterConfig::default_drain_rate")]
    pub drain_rate: u32,
}

impl ClusterConfig {
    /// The settings a tool needs to reach a cluster's NATS servers, and nothing else.
    pub fn client(nats: Vec<String>) -> Self {
        Self {
            nats,
            monitor: Vec::new(),
            node: String::new(),
            advertise: None,
            zone: None,
            replicas: Self::default_replicas(),
            node_ttl: Self::default_node_ttl(),
            shards: Self::default_shards(),
            lease: Self::default_lease(),
            connect_timeout: Self::default_connect_timeout(),
            snapshot_every: Self::default_snapshot_every(),
            rebalance_above: Self::default_rebalance_above(),
            drain_rate: Self::default_drain_rate(),
        }
    }

    fn default_drain_rate() -> u32 {
        500
    }

    fn default_rebalance_above() -> u64 {
        1000
    }

    fn default_snapshot_every() -> u64 {
        10_000
    }

    fn default_shards() -> u32 {
        64
    }
    fn default_lease() -> Duration {
        Duration::from_secs(5)
    }

    fn default_replicas() -> usize {
        3
    }
    fn default_node_ttl() -> Duration {
        Duration::from_secs(10)
    }
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(5)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.nats.is_empty() {
            return invalid("cluster.nats must name at least one NATS server");
        }
        if self.monitor.is_empty() {
            return invalid(
                "cluster.monitor must name the monitoring address of every NATS server \
                 (http://host:8222), to check that each fsyncs every write",
            );
        }
        let node_ok = !self.node.is_empty()
            && self.node.len() <= 64
            && self
                .node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !node_ok {
            return invalid("cluster.node must be 1-64 characters of A-Z a-z 0-9 _ -");
        }
        if !(1..=5).contains(&self.replicas) {
            return invalid("cluster.replicas must be between 1 and 5");
        }
        if self.node_ttl < Duration::from_secs(3) {
            return invalid("cluster.node_ttl must be at least 3s");
        }
        if !(1..=4096).contains(&self.shards) {
            return invalid("cluster.shards must be between 1 and 4096");
        }
        if self.lease < Duration::from_secs(3) {
            return invalid("cluster.lease must be at least 3s");
        }
        if self.connect_timeout.is_zero() {
            return invalid("cluster.connect_timeout must be positive");
        }
        if self.drain_rate == 0 {
            return invalid("cluster.drain_rate must be at least 1 device per second");
        }
        if self.zone.as_ref().is_some_and(|z| !valid_zone(z)) {
            return invalid("cluster.zone must be 1-64 characters of A-Z a-z 0-9 . _ -");
        }
        Ok(())
    }
}

/// Whether `zone` is a zone name (as a node's `cluster.zone` and a client's `Hello.zone`
/// must be): 1-64 characters of A-Z a-z 0-9 . _ -.
pub fn valid_zone(zone: &str) -> bool {
    (1..=64).contains(&zone.len())
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Metrics and health endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// TCP address for `/metrics`, `/healthz` and `/readyz` over plain HTTP. Off by default;
    /// keep it on loopback or a private network: it is not authenticated.
    pub listen: Option<SocketAddr>,
    /// Record each message's time per stage (`plover_stage_seconds{stage}`). On: it costs
    /// a few clock reads and histogram updates per message (BENCHMARKS.md, "Stage latency"),
    /// and it is what attributes a tail to its stage in the run that shows it.
    pub stages: bool,
    /// A message slower than this, from its frame to its answer or to a device, is logged
    /// once with its stage breakdown. 50 ms: half the design's 100 ms budget.
    #[serde(with = "humantime_serde")]
    pub slow_message: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            stages: true,
            slow_message: Duration::from_millis(50),
        }
    }
}

/// Push notifications.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// How long a burst of messages to an offline user is gathered into one notification. A
    /// second: long enough for a typed burst, short enough to feel immediate.
    #[serde(with = "humantime_serde")]
    pub coalesce: Duration,
    /// One HTTP request's time limit: a slow gateway costs a delivery slot this long at most.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per notification and pusher before giving up.
    pub retries: u32,
    /// The first retry's delay, doubled at each further attempt.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// HTTP requests to gateways in flight at once; the rest wait their turn. At most 4 of
    /// them go to one host, so a dead gateway cannot take them all.
    pub concurrency: usize,
    /// Offers queued between the commit thread and the notifier before new ones are dropped.
    pub queue: usize,
    /// Lets pushers post over plain http and to loopback, private, link-local and
    /// unique-local addresses. Off: a user's pusher could otherwise make the server probe
    /// its own network. On only for development and tests with local receivers.
    pub allow_private_targets: bool,
    /// Pushers one user may register; a new one past it is refused with `limit`. Ten: a
    /// person's devices and apps, while stale registrations cannot pile up (one message
    /// once caused 350 requests).
    pub max_pushers: usize,
    /// The contact Web Push services see in the server's VAPID tokens (RFC 8292: `mailto:`
    /// or `https:`), so that they can reach the operator about its traffic. Set it to a
    /// real address in production.
    pub vapid_subject: String,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            coalesce: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            retries: 5,
            retry_base: Duration::from_secs(1),
            concurrency: 16,
            queue: 10_000,
            allow_private_targets: false,
            max_pushers: 10,
            vapid_subject: "mailto:postmaster@localhost".into(),
        }
    }
}

/// Retention sweeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// How often expired bodies are removed from the store. Reads never serve an expired body
    /// whatever this is; it only bounds how long one stays on disk. A minute keeps the sweep's
    /// cost negligible.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Under `until_delivered`, how long a body waits for a member who never comes back.
    #[serde(with = "humantime_serde")]
    pub max_undelivered: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_secs(60),
            max_undelivered: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Presence and typing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// How long a user must stay gone before peers are told: a phone switching networks
    /// reconnects within a second or two and should not flicker offline.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
    /// Typing indicators a connection may send per second; more are dropped. Clients repeat
    /// the indicator every few seconds, so a handful a second is already generous.
    pub typing_per_second: u32,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            debounce: Duration::from_secs(2),
            typing_per_second: 5,
        }
    }
}

/// TLS material.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. With `key`; when both are unset a self-signed dev certificate in
    /// `certs` is used (generated on first start).
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

/// Token verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The HS256 secret. Unset: a random secret is generated into `<data>/secret.key` on first
    /// start and kept there, which is what `plover token` reads.
    pub secret: Option<String>,
    /// How long a new connection has to complete the handshake and send `Hello`. Five seconds
    /// is plenty for a phone on a bad network and short enough that idle sockets cost little.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// An identity provider's public keys in PEM files (Ed25519, P-256 or RSA): its EdDSA,
    /// ES256 and RS256 tokens are accepted besides plover's own.
    pub public_keys: Vec<PathBuf>,
    /// An identity provider's JWKS document: a file, or an https URL (plain http only to
    /// this machine). Read again every `jwks_refresh`, and when a token names an unknown
    /// `kid`.
    pub jwks: Option<String>,
    /// How often the JWKS is read again.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// The `iss` an identity provider's tokens must carry; unset: not checked.
    pub issuer: Option<String>,
    /// The `aud` values an identity provider's token may carry (one must match).
    pub audience: Vec<String>,
    /// The claim of an identity provider's token that names the plover user.
    pub user_claim: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret: None,
            timeout: Duration::from_secs(5),
            public_keys: Vec::new(),
            jwks: None,
            jwks_refresh: Duration::from_secs(600),
            issuer: None,
            audience: vec![crate::auth::AUDIENCE.to_owned()],
            user_claim: "sub".to_owned(),
        }
    }
}

/// Protocol and resource limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame body either side may send. 64 KiB holds any chat message with room to
    /// spare while keeping a hostile frame cheap to refuse.
    pub max_frame: u32,
    /// Largest message body. Leaves room under `max_frame` for the frame's other fields.
    pub max_body: u32,
    /// Concurrent connections. Each idle connection costs tens of KB (see FACTS.md).
    pub max_connections: usize,
    /// Connections one user may hold at once, one per device (a device's new connection
    /// replaces its old one). 16: a person's phone, tablet, desktops and browsers with room
    /// to spare, while one stolen or runaway token cannot take the server's connections.
    pub connections_per_user: usize,
    /// Conversation streams a client may have open at once (plus its control stream). quinn
    /// sets up state for the whole limit per connection, so keep it small.
    pub max_streams: u32,
    /// Delivery streams the server keeps open towards one device. The least recently used is
    /// closed past this.
    pub max_delivery_streams: usize,
    /// Events queued towards one device before it is switched to catch-up from the store.
    pub outbound_queue: usize,
    /// Sends one conversation stream may have in flight before the server stops reading it.
    pub inflight_sends: usize,
    /// Most messages one history page may hold.
    pub history_page: u32,
    /// Writes a user may make per second, across their devices, with bursts of twice that:
    /// messages, and also new conversations, group and retention changes, deletions, history
    /// clearing and pusher changes. Past it the request is refused with `limit`. Far above
    /// any person's typing, low enough that a runaway client cannot take a node's whole write
    /// capacity whatever it floods with.
    pub sends_per_second: u32,
    /// Store writes a user's requests may cause per second, with bursts of twice that: a
    /// message costs its fan-out (a log entry per member, plus three), a receipt one per
    /// member told, a membership change likewise. 2,000: more than the send limit allows in
    /// direct messages (five writes each), 57 messages a second to a group of 32, two to a
    /// group of 1,000 (bursts of twice that). Measured with `plover bench flood --flood-kinds
    /// group` (a sender to 500 members beside 100 users at 1,000 msgs/s): others' p99 went
    /// 2.5-3.3x the quiet run's with 10,000, 1.4-1.9x with 2,000.
    pub writes_per_second: u32,
    /// Frames one connection may send per second, with bursts of twice that; a `History`,
    /// `ListConversations` or `Members` request counts for the work it asks (1 + limit/10,
    /// 1 + limit/10, 1 + limit/20). Past it the server reads the connection more slowly,
    /// and QUIC flow control holds the client back: nothing is refused. 1,000: five times
    /// what the send limit lets a device write, so only a flood meets it (`Ack`, `Read`,
    /// `History` floods: `plover bench flood`).
    pub frames_per_second: u32,
    /// Most members a group may have. WhatsApp's figure: large enough for a community, small
    /// enough that one message's fan-out (a log entry per member) stays a few milliseconds.
    pub max_group: usize,
    /// Largest conversation whose delivered/read receipts are pushed to every member. Above
    /// it, receipts are stored and served on request (`plover receipts`), since pushing them
    /// would cost members² events per message.
    pub receipt_fanout: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: plover_proto::DEFAULT_MAX_FRAME,
            max_body: 60 * 1024,
            max_connections: 100_000,
            connections_per_user: 16,
            max_streams: 16,
            max_delivery_streams: 32,
            outbound_queue: 1024,
            inflight_sends: 256,
            history_page: 500,
            sends_per_second: 200,
            writes_per_second: 2_000,
            frames_per_second: 1_000,
            max_group: 1024,
            receipt_fanout: 32,
        }
    }
}

/// QUIC transport settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSettings {
    /// A connection silent for this long is closed. Also how soon a vanished phone is noticed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Heartbeat interval announced to clients (they send `Ping` and QUIC keep-alives this
    /// often). A third of the idle timeout, so two lost heartbeats do not drop a connection.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Bytes one stream may have unread. Two maximum frames, so a full frame never stalls.
    pub stream_window: u32,
    /// Bytes one connection may have unread across its streams: bounds per-connection memory.
    pub connection_window: u32,
    /// Handshakes under way past which new, unvalidated addresses must first answer a QUIC
    /// Retry (address validation). 0 = always. 256 is more than a node sees in normal churn
    /// and well below what a handshake flood reaches.
    pub retry_above: usize,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            stream_window: 128 * 1024,
            connection_window: 1024 * 1024,
            retry_above: 256,
        }
    }
}

/// The store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// When a message counts as sent.
    pub durability: Durability,
    /// Most writes in one group commit: large enough to amortise an fsync over many messages,
    /// small enough that one batch is a fraction of a millisecond of work.
    pub commit_batch: usize,
    /// Sequencer shards (threads). One per core is the sensible most.
    pub shards: usize,
    /// Conversation states (last seq, members, marks) held in memory across all shards,
    /// counted in members (a direct conversation counts 2, a group its size): the least
    /// recently used beyond this are read from the store again when next needed. About
    /// 340 bytes of heap each (BENCHMARKS.md, "Bounded caches").
    pub cached_members: usize,
    /// Users whose sync-log head the commit thread holds in memory, likewise.
    pub cached_logs: usize,
    /// In `buffered` durability, how often the journal is synced: the most acknowledged
    /// writes a power cut can take. 100 ms: a tenth of a second of messages, for a fsync
    /// ten times a second whatever the load.
    #[serde(with = "humantime_serde")]
    pub buffered_sync: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            commit_batch: 1024,
            shards: 2,
            cached_members: 250_000,
            cached_logs: 1_000_000,
            buffered_sync: Duration::from_millis(100),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            data: PathBuf::from("./plover-data"),
            certs: PathBuf::from("./certs"),
            server_id: None,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            transport: TransportSettings::default(),
            store: StoreConfig::default(),
            presence: PresenceConfig::default(),
            retention: RetentionConfig::default(),
            push: PushConfig::default(),
            metrics: MetricsConfig::default(),
            cluster: None,
            media: MediaConfig::default(),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.limits.max_frame < 1024 {
            return invalid("limits.max_frame must be at least 1024");
        }
        if self.limits.max_body == 0
            || self.limits.max_body.saturating_add(512) > self.limits.max_frame
        {
            return invalid("limits.max_body must be positive and at least 512 below max_frame");
        }
        if self.cluster.is_some() && self.limits.max_body > 256 * 1024 {
            // An append carries up to 512 KiB of entries plus the last one taken, and NATS
            // takes messages of at most 1 MiB by default.
            return invalid(
                "in a cluster, limits.max_body must be at most 256 KiB (every write goes \
                 through NATS, whose messages are at most 1 MiB)",
            );
        }
        if self.media.max_size == 0 || self.media.quota < self.media.max_size {
            return invalid("media.max_size must be positive and media.quota at least max_size");
        }
        if self.media.uploads_per_hour == 0
            || self.media.upload_rate == 0
            || self.media.download_rate == 0
            || self.media.expire_after < Duration::from_secs(60)
        {
            return invalid(
                "media.uploads_per_hour, media.upload_rate and media.download_rate must be \
                 positive and media.expire_after at least 1m",
            );
        }
        if self.media.store == MediaStore::S3 && self.media.s3.is_none() {
            return invalid("media.store = \"s3\" needs a [media.s3] section with its bucket");
        }
        if self.limits.max_streams == 0 || self.limits.max_streams > 1024 {
            return invalid("limits.max_streams must be between 1 and 1024");
        }
        if self.limits.outbound_queue == 0 || self.limits.inflight_sends == 0 {
            return invalid("limits.outbound_queue and limits.inflight_sends must be positive");
        }
        if self.limits.max_delivery_streams == 0 || self.limits.history_page == 0 {
            return invalid("limits.max_delivery_streams and limits.history_page must be positive");
        }
        if self.limits.sends_per_second == 0 {
            return invalid("limits.sends_per_second must be positive");
        }
        if self.limits.max_group < 2 {
            return invalid("limits.max_group must be at least 2");
        }
        if self.store.commit_batch == 0 || self.store.shards == 0 {
            return invalid("store.commit_batch and store.shards must be positive");
        }
        if self.store.cached_members < 2 * self.store.shards || self.store.cached_logs < 2 {
            return invalid(
                "store.cached_members must be at least 2 per shard and store.cached_logs at least 2",
            );
        }
        if self.transport.heartbeat.is_zero()
            || self.transport.heartbeat >= self.transport.idle_timeout
        {
            return invalid("transport.heartbeat must be positive and below idle_timeout");
        }
        if self.auth.timeout.is_zero() || self.auth.timeout > Duration::from_secs(600) {
            return invalid("auth.timeout must be positive and at most 10 minutes");
        }
        if self.push.retries == 0 || self.push.concurrency == 0 || self.push.queue == 0 {
            return invalid("push.retries, push.concurrency and push.queue must be positive");
        }
        if self.retention.sweep_interval.is_zero() {
            return invalid("retention.sweep_interval must be positive");
        }
        if self.presence.typing_per_second == 0 {
            return invalid("presence.typing_per_second must be positive");
        }
        if (self.tls.cert.is_some()) != (self.tls.key.is_some()) {
            return invalid("tls.cert and tls.key go together");
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_to_the_defaults() {
        let text = include_str!("../../../plover.example.toml");
        let parsed: Config = toml::from_str(text).expect("example parses");
        parsed.validate().expect("example is valid");
        let default = Config::default();
        assert_eq!(parsed.listen, default.listen);
        assert_eq!(parsed.limits.max_frame, default.limits.max_frame);
        assert_eq!(
            parsed.transport.idle_timeout,
            default.transport.idle_timeout
        );
        assert_eq!(parsed.store.durability, default.store.durability);
        assert_eq!(parsed.media.max_size, default.media.max_size);
        assert_eq!(parsed.media.quota, default.media.quota);
        assert_eq!(parsed.media.expire_after, default.media.expire_after);
        assert_eq!(parsed.media.store, default.media.store);
    }

    #[test]
    fn an_s3_store_needs_its_bucket() {
        let config: Config = toml::from_str("[media]\nstore = \"s3\"\n").expect("parses");
        let e = config.validate().expect_err("no bucket");
        assert!(e.to_string().contains("[media.s3]"), "{e}");
        let config: Config =
            toml::from_str("[media]\nstore = \"s3\"\n[media.s3]\nbucket = \"b\"\n")
                .expect("parses");
        config.validate().expect("valid");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<Config>("listne = \"127.0.0.1:1\"").expect_err("typo");
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn a_cluster_section_is_checked() {
        let text = r#"
            [cluster]
            nats = ["nats://127.0.0.1:4222"]
            monitor = ["http://127.0.0.1:8222"]
            node = "n1"
        "#;
        let c: Config = toml::from_str(text).expect("parses");
        c.validate().expect("valid");
        let cluster = c.cluster.as_ref().expect("cluster");
        assert_eq!(cluster.replicas, 3);
        assert_eq!(cluster.node_ttl, Duration::from_secs(10));
        let bad: Config = toml::from_str(&text.replace("\"n1\"", "\"n 1\"")).expect("parses");
        assert!(bad.validate().is_err());
        let none: Config =
            toml::from_str(&text.replace("monitor = [\"http://127.0.0.1:8222\"]", "monitor = []"))
                .expect("parses");
        let err = none.validate().expect_err("no monitor");
        assert!(err.to_string().contains("cluster.monitor"), "{err}");
        for (extra, named) in [
            ("shards = 0", "cluster.shards"),
            ("lease = \"1s\"", "cluster.lease"),
            ("replicas = 7", "cluster.replicas"),
            ("node_ttl = \"1s\"", "cluster.node_ttl"),
        ] {
            let c: Config = toml::from_str(&format!("{text}{extra}\n")).expect("parses");
            let err = c.validate().expect_err(extra);
            assert!(err.to_string().contains(named), "{extra}: {err}");
        }
        assert_eq!(cluster.snapshot_every, 10_000);
        let mut big = c.clone();
        big.limits.max_frame = 1024 * 1024;
        big.limits.max_body = 512 * 1024;
        let err = big.validate().expect_err("bodies past what NATS carries");
        assert!(err.to_string().contains("max_body"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let mut c = Config::default();
        c.limits.max_body = c.limits.max_frame;
        assert!(c.validate().is_err());
    }
}
