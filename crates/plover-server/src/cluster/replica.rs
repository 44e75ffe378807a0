//! The cluster's replicated log: one JetStream stream that every node appends its writes to
//! and applies, whole and in order, to its own store (`router/replicated.rs` says why that
//! keeps every node's store the same).
//!
//! - The **appender** takes the router's entries, as many as are queued (up to
//!   [`APPEND_ENTRIES`] or [`APPEND_BYTES`]), and appends them as one JetStream message: the
//!   log's group commit. One append is in flight at a time, so a node's entries keep the
//!   order its writers gave them. An append that fails (no quorum during a NATS server's
//!   loss, a timeout) is sent again with the same `Nats-Msg-Id` for up to
//!   [`APPEND_PATIENCE`]: JetStream drops the copy if the first one was stored.
//! - The **applier** reads the stream with an ordered consumer from the entry after the last
//!   one the store holds, checks each message's checksum (a corrupt message stops the node's
//!   applying: skipping it would make its store differ from the others'), and hands the
//!   entries to [`Router::apply`].

use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use futures_util::StreamExt;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::{ClusterError, log};
use crate::config::ClusterConfig;
use crate::persist::StoreError;
use crate::router::{Allocate, Entry, Router};

/// The stream.
pub const STREAM: &str = "PLOVER_LOG";
/// Its one subject.
pub const SUBJECT: &str = "plover.log";
/// Most entries in one append.
pub const APPEND_ENTRIES: usize = 512;
/// Bytes of bodies (about) past which an append takes no more entries: well under NATS's
/// default largest message (1 MiB).
pub const APPEND_BYTES: usize = 512 * 1024;
/// How long a failed append is tried again before its writers are told it failed.
pub const APPEND_PATIENCE: Duration = Duration::from_secs(20);
/// How long the applier waits for the next message before it asks whether the log has more.
const STALL: Duration = Duration::from_secs(2);
/// The object store of snapshots, and the name of the latest.
pub const SNAPSHOTS: &str = "plover_snapshots";
const LATEST: &str = "latest";
/// How often the node holding shard 0 looks whether a snapshot is due.
const SNAPSHOT_CHECK: Duration = Duration::from_secs(5);
/// The key of the next conversation id in the cluster bucket.
const NEXT_CONVERSATION: &str = "next_conversation";

/// A node's handle on the log.
#[derive(Clone)]
pub struct Replica {
    js: jetstream::Context,
    settings: kv::Store,
    snapshots: object_store::ObjectStore,
    node: String,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("node", &self.node).finish()
    }
}

impl Replica {
    /// Binds the stream (creating it on first use with `cluster.replicas` replicas in files)
    /// and the cluster bucket that hands out conversation ids.
    pub async fn open(
        js: jetstream::Context,
        config: &ClusterConfig,
    ) -> Result<Self, ClusterError> {
        let settings =
            super::bucket(js.clone(), super::ownership::CLUSTER_BUCKET, None, config).await?;
        let wanted = stream::Config {
            name: STREAM.to_owned(),
            description: Some("plover: every write of the cluster, in order".into()),
            subjects: vec![SUBJECT.to_owned()],
            num_replicas: config.replicas,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + super::STARTUP_PATIENCE;
        loop {
            match js.get_or_create_stream(wanted.clone()).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "JetStream not ready for the log stream; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(ClusterError::js("log stream", format!("{STREAM}: {e}"))),
            }
        }
        let snapshots = loop {
            let wanted = object_store::Config {
                bucket: SNAPSHOTS.to_owned(),
                description: Some("plover: snapshots of the store, for nodes that join".into()),
                num_replicas: config.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            };
            match js.create_object_store(wanted).await {
                Ok(store) => break store,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "JetStream not ready for the snapshots; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(ClusterError::js("snapshots", format!("{SNAPSHOTS}: {e}"))),
            }
        };
        Ok(Self {
            js,
            settings,
            snapshots,
            node: config.node.clone(),
        })
    }

    /// Before the router starts: when the log no longer holds the entries that follow this
    /// store's position (they were removed after a snapshot, while this node was away or
    /// before it first joined), replaces the store with the latest snapshot, whose position
    /// the log follows on from. `dir` holds the download meanwhile.
    pub async fn restore_if_behind(
        &self,
        store: &std::sync::Arc<crate::persist::Store>,
        dir: &std::path::Path,
    ) -> Result<(), ClusterError> {
        let failed = |e: &dyn std::fmt::Display| ClusterError::js("load a snapshot", e);
        let mut stream = self.js.get_stream(STREAM).await.map_err(|e| failed(&e))?;
        let first = stream
            .info()
            .await
            .map_err(|e| failed(&e))?
            .state
            .first_sequence;
        let needed = store
            .applied()
            .map_err(|e| failed(&e))?
            .map_or(1, |(seq, _)| seq);
        if first <= 1 || needed >= first {
            return Ok(());
        }
        info!(
            needed,
            first, "the log before this store's next entry is gone; loading the latest snapshot"
        );
        let started = std::time::Instant::now();
        let mut object = self.snapshots.get(LATEST).await.map_err(|e| failed(&e))?;
        let path = dir.join("snapshot.incoming");
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| failed(&e))?;
        let bytes = tokio::io::copy(&mut object, &mut file)
            .await
            .map_err(|e| failed(&e))?;
        file.sync_all().await.map_err(|e| failed(&e))?;
        drop(file);
        let (s, p) = (store.clone(), path.clone());
        let at = tokio::task::spawn_blocking(move || s.import(&p))
            .await
            .map_err(|e| failed(&e))?
            .map_err(|e| failed(&e))?;
        let _ = tokio::fs::remove_file(&path).await;
        if at.0 + 1 < first {
            return Err(failed(&format!(
                "the latest snapshot holds the log up to {}, but the log now starts at {first}",
                at.0
            )));
        }
        info!(
            seq = at.0,
            bytes,
            seconds = started.elapsed().as_secs_f64(),
            "loaded the latest snapshot"
        );
        Ok(())
    }

    /// While this node holds shard 0: every `every` log messages, writes a snapshot of the
    /// store to the `plover_snapshots` object store, then removes the log before the
    /// previous snapshot's position (nodes a little behind keep what they need). Forever.
    pub async fn snapshots(
        self,
        store: std::sync::Arc<crate::persist::Store>,
        ownership: std::sync::Arc<super::Ownership>,
        every: u64,
        dir: std::path::PathBuf,
    ) {
        if every == 0 {
            return;
        }
        let position = |info: &object_store::ObjectInfo| {
            info.metadata.get("seq").and_then(|s| s.parse::<u64>().ok())
        };
        let mut last = match self.snapshots.info(LATEST).await {
            Ok(info) => position(&info).unwrap_or(0),
            Err(_) => 0,
        };
        let mut tick = tokio::time::interval(SNAPSHOT_CHECK);
        loop {
            tick.tick().await;
            if !ownership.owned().iter().any(|(shard, _)| *shard == 0) {
                continue;
            }
            // Another node may have written one since.
            if let Ok(info) = self.snapshots.info(LATEST).await
                && let Some(seq) = position(&info)
            {
                last = last.max(seq);
            }
            let applied = match store.applied() {
                Ok(Some((seq, _))) => seq,
                _ => continue,
            };
            if applied < last + every {
                continue;
            }
            match self.snapshot(&store, &dir).await {
                Ok(at) => {
                    // Keep the log since the previous snapshot: a node a little behind
                    // reads on without loading this one.
                    if last > 1 {
                        match self.js.get_stream(STREAM).await {
                            Ok(stream) => match stream.purge().sequence(last).await {
                                Ok(p) => info!(
                                    before = last,
                                    removed = p.purged,
                                    "removed the log before the previous snapshot"
                                ),
                                Err(e) => warn!(error = %e, "could not remove the old log"),
                            },
                            Err(e) => warn!(error = %e, "could not remove the old log"),
                        }
                    }
                    last = at;
                }
                Err(e) => warn!(error = %e, "could not write a snapshot"),
            }
        }
    }

    /// Writes one snapshot; returns the log position it holds.
    async fn snapshot(
        &self,
        store: &std::sync::Arc<crate::persist::Store>,
        dir: &std::path::Path,
    ) -> Result<u64, String> {
        let started = std::time::Instant::now();
        let path = dir.join("snapshot.outgoing");
        let (s, p) = (store.clone(), path.clone());
        let at = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::create(&p).map_err(|e| e.to_string())?;
            s.export(std::io::BufWriter::new(file))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??
        .ok_or("the store holds no entry of the log yet")?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| e.to_string())?;
        let meta = object_store::ObjectMetadata {
            name: LATEST.to_owned(),
            description: Some(format!("the store after log entry {}.{}", at.0, at.1)),
            metadata: [
                ("seq".to_owned(), at.0.to_string()),
                ("index".to_owned(), at.1.to_string()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let info = self
            .snapshots
            .put(meta, &mut file)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tokio::fs::remove_file(&path).await;
        info!(
            seq = at.0,
            bytes = info.size,
            seconds = started.elapsed().as_secs_f64(),
            "wrote a snapshot"
        );
        Ok(at.0)
    }

    /// Cluster-wide conversation ids, for the router's writer (a blocking call: it runs on
    /// the router's blocking threads). A compare-and-set on one key of the cluster bucket.
    pub fn allocator(&self) -> Allocate {
        let handle = tokio::runtime::Handle::current();
        let settings = self.settings.clone();
        Box::new(move || handle.block_on(allocate(&settings)))
    }

    /// The stream sequence of the log's last message (0 when empty).
    pub async fn last(&self) -> Result<u64, ClusterError> {
        let mut stream = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| ClusterError::js("log stream", e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| ClusterError::js("log stream", e))?;
        Ok(info.state.last_sequence)
    }

    /// Appends the router's entries until the router stops.
    pub async fn append(self, mut entries: mpsc::Receiver<Entry>, router: Router) {
        // However this task ends (the router stopped, or it was aborted at shutdown), the
        // writers still waiting are answered.
        struct Closing(Router);
        impl Drop for Closing {
            fn drop(&mut self) {
                self.0.log_closed();
            }
        }
        let closing = Closing(router);
        let router = &closing.0;
        let boot = plover_proto::ClientMsgId::random().0;
        let boot = u64::from_le_bytes(boot[..8].try_into().unwrap_or_default());
        let mut appended = 0u64;
        while let Some(first) = entries.recv().await {
            let mut bytes = size(&first);
            let mut batch = vec![first];
            while batch.len() < APPEND_ENTRIES && bytes < APPEND_BYTES {
                match entries.try_recv() {
                    Ok(entry) => {
                        bytes += size(&entry);
                        batch.push(entry);
                    }
                    Err(_) => break,
                }
            }
            appended += 1;
            let id = format!("{}-{boot:016x}-{appended}", self.node);
            let started = std::time::Instant::now();
            match self.publish(&id, &batch).await {
                Ok(()) => {
                    metrics::histogram!(crate::metrics::names::LOG_APPEND_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!(crate::metrics::names::LOG_APPEND_ENTRIES)
                        .record(batch.len() as f64);
                }
                Err(why) => {
                    error!(error = %why, entries = batch.len(), "cannot append to the cluster log");
                    router.log_failed(batch.iter().map(|e| (e.origin, e.tag)), &why);
                }
            }
        }
    }

    async fn publish(&self, id: &str, batch: &[Entry]) -> Result<(), String> {
        let record = postcard::to_stdvec(batch).map_err(|e| e.to_string())?;
        let payload = log::seal(&record);
        let deadline = tokio::time::Instant::now() + APPEND_PATIENCE;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
            let answer = match self
                .js
                .publish_with_headers(SUBJECT, headers, payload.clone())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "append to the cluster log failed; sending it again");
                    metrics::counter!(crate::metrics::names::LOG_APPEND_RETRIES).increment(1);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Applies the log to the router's store, from the entry after the last one it holds,
    /// until the router stops or the log holds a corrupt message. `ready` is told once
    /// everything the log held at the start has been handed to the router.
    pub async fn apply(self, router: Router, ready: oneshot::Sender<()>) {
        if let Err(e) = self.apply_inner(&router, ready).await {
            error!(error = %e, "this node stopped applying the cluster log");
        }
    }

    async fn apply_inner(&self, router: &Router, ready: oneshot::Sender<()>) -> Result<(), String> {
        let mut next = match router.applied().map_err(|e| e.to_string())? {
            Some((seq, index)) => (seq, index + 1),
            None => (1, 0),
        };
        let target = self.last().await.map_err(|e| e.to_string())?;
        let mut ready = Some(ready);
        if target < next.0 {
            ready.take().map(|r| r.send(()));
        } else {
            info!(
                from = next.0,
                to = target,
                "catching up with the cluster log"
            );
        }
        loop {
            let consumer = async {
                let stream = self
                    .js
                    .get_stream_no_info(STREAM)
                    .await
                    .map_err(|e| e.to_string())?;
                let consumer = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: next.0,
                        },
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                consumer.messages().await.map_err(|e| e.to_string())
            };
            let mut messages = match consumer.await {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "cannot read the cluster log; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                // A consumer whose server died may go quiet without an error: when nothing
                // came for a while, look at the stream, and read again if it has more.
                let message = match tokio::time::timeout(STALL, messages.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(_) => match self.last().await {
                        Ok(last) if last >= next.0 => {
                            warn!(
                                at = next.0,
                                last, "the cluster log's reader stalled; reading again"
                            );
                            break;
                        }
                        _ => continue,
                    },
                };
                let message = match message {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "reading the cluster log failed; reading on");
                        break;
                    }
                };
                let seq = match message.info() {
                    Ok(info) => info.stream_sequence,
                    Err(e) => {
                        warn!(error = %e, "a log message without its sequence; reading on");
                        break;
                    }
                };
                if seq < next.0 {
                    continue;
                }
                if seq > next.0 {
                    // Removed after a snapshot while this node was that far behind: it cannot
                    // go on without loading the snapshot, which it does at its next start.
                    let why = format!(
                        "the cluster log before {seq} was removed while this node still needed {}; \
                         restart it to load the latest snapshot",
                        next.0
                    );
                    router.store().poison(&why);
                    return Err(why);
                }
                let entries: Vec<Entry> = log::open(&message.payload)
                    .and_then(|record| postcard::from_bytes(&record).ok())
                    .ok_or_else(|| {
                        format!(
                            "the cluster log's message {seq} is corrupt (checksum or encoding); \
                             this node's store stays at the message before it"
                        )
                    })?;
                let from = if seq == next.0 { next.1 } else { 0 };
                router
                    .apply(seq, from, entries)
                    .await
                    .map_err(|e| e.to_string())?;
                next = (seq + 1, 0);
                metrics::gauge!(crate::metrics::names::LOG_APPLIED).set(seq as f64);
                if seq >= target
                    && let Some(r) = ready.take()
                {
                    // Serve once the store holds it all, not just once it is queued.
                    router.settled().await.map_err(|e| e.to_string())?;
                    info!(at = seq, "caught up with the cluster log");
                    let _ = r.send(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// About how many bytes an entry takes in an append.
fn size(entry: &Entry) -> usize {
    match &entry.record {
        crate::router::Record::Send { body, .. } => body.len() + 96,
        crate::router::Record::SendWith { body, objects, .. } => {
            body.len() + 96 + 32 * objects.len()
        }
        crate::router::Record::Write(w) => {
            w.ops
                .iter()
                .map(|op| op.key.len() + op.value.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
                + 32
        }
        _ => 96,
    }
}

/// The next conversation id: the counter in the cluster bucket, moved by compare-and-set.
async fn allocate(settings: &kv::Store) -> Result<u64, StoreError> {
    let failed =
        |e: &dyn std::fmt::Display| StoreError::Cluster(format!("no conversation id: {e}"));
    for _ in 0..100 {
        let entry = settings
            .entry(NEXT_CONVERSATION)
            .await
            .map_err(|e| failed(&e))?;
        let taken = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let next: u64 = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| failed(&"the counter is not a number"))?;
                settings
                    .update(NEXT_CONVERSATION, (next + 1).to_string().into(), e.revision)
                    .await
                    .map(|_| next)
                    .ok()
            }
            _ => settings
                .create(NEXT_CONVERSATION, "2".into())
                .await
                .map(|_| 1)
                .ok(),
        };
        if let Some(id) = taken {
            return Ok(id);
        }
    }
    Err(failed(&"too many nodes allocating at once"))
}
