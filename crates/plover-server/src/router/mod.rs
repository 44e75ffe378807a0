//! Sessions, sequencing, group commit, fan-out and catch-up. Knows nothing of QUIC.
//!
//! ```text
//! connection task --send--> shard (thread, owns its conversations: membership, retries, seq)
//!                                 --> commit thread (one batch, one fsync, log positions)
//!                                        --> sender's ack
//!                                        --> Sessions::deliver -> each device's bounded queue
//!                                                                   -> DeviceFeed -> transport
//! ```

mod cache;
mod commit;
mod feed;
mod gate;
mod limiter;
mod pipeline;
mod presence;
mod replicated;
mod retention;
mod sessions;
mod shard;
#[cfg(test)]
mod tests;
pub mod timing;

use std::collections::HashMap;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

pub use feed::DeviceFeed;
pub use pipeline::Sent;
pub use presence::{PUSH_QUEUE, Presence, PresenceGuard, Push, Relay};
pub use replicated::{Allocate, Entry, LOG_QUEUE, Record};
pub use sessions::{Delivery, Sessions};
pub use shard::MemberOp;

use crate::auth::valid_name;
use crate::config::Config;
use crate::persist::{ConversationRecord, MemberRecord};
use crate::persist::{Store, StoreError, Writer};
use commit::CommitThread;
use pipeline::CommitItem;
use plover_proto::{
    ClientMsgId, ConversationId, ConversationInfo, ConversationKind, ErrorCode, INLINE_MEMBERS,
    Marks, MemberInfo, Message, Target,
};
use plover_proto::{Pusher, Retention};
pub(crate) use retention::expire;
use shard::{
    MarksRequest, MembershipRequest, SendRequest, Shard, ShardLimits, ShardRequest, now_ms,
};

/// Requests a shard's channel holds before senders wait: enough to keep the shard busy while
/// the connection tasks refill it, small enough to be a real bound.
const SHARD_QUEUE: usize = 4096;
/// Items the commit channel holds before shards wait.
const COMMIT_QUEUE: usize = 8192;
/// Bytes of message bodies between the connections and the store (in the shard and commit
/// queues and the batch being written), across all senders. The queues are bounded in items
/// (4,096 and 8,192), which in bodies of 60 KiB would be 720 MiB; past this many bytes a
/// sender waits for the store instead. 64 MiB is over a second of the commit thread's
/// throughput with any body size.
const BODY_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

/// Errors of the router, each mapped to a wire code by [`RouterError::code`].
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The caller is not a member of the conversation (or it does not exist: the two are not
    /// told apart, so ids cannot be probed).
    #[error("not a member of conversation {0}")]
    NotMember(ConversationId),
    /// No direct conversation with that user exists and creation was not asked for.
    #[error("no conversation with {0}")]
    NoConversation(String),
    /// The named user has never connected.
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    /// A request's fields are out of range.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do or see this.
    #[error("{0}")]
    Forbidden(String),
    /// A configured limit would be exceeded (the size of a group).
    #[error("{0}")]
    Limit(String),
    /// The store refuses writes after a failed write or fsync.
    #[error("the server cannot store messages right now (storage failure); nothing was stored")]
    Unavailable,
    /// The router is stopping.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A message names a stored object that does not exist (any more): the collector
    /// removed it, or is removing it.
    #[error("no object {0}")]
    NoObject(plover_proto::ObjectId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug or an unexpected condition.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RouterError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotMember(_) => ErrorCode::NOT_MEMBER,
            Self::NoConversation(_) => ErrorCode::UNKNOWN_CONVERSATION,
            Self::UnknownUser(_) => ErrorCode::UNKNOWN_USER,
            Self::Invalid(_) => ErrorCode::INVALID_REQUEST,
            Self::Forbidden(_) => ErrorCode::FORBIDDEN,
            Self::Limit(_) => ErrorCode::LIMIT,
            Self::NoObject(_) => ErrorCode::NOT_FOUND,
            Self::Unavailable
            | Self::Store(StoreError::Poisoned)
            | Self::Store(StoreError::Cluster(_)) => ErrorCode::UNAVAILABLE,
            Self::ShuttingDown => ErrorCode::SHUTDOWN,
            Self::Store(_) | Self::Internal(_) => ErrorCode::INTERNAL,
        }
    }
}

/// A conversation a stream is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Its id.
    pub conversation: ConversationId,
    /// Direct or group.
    pub kind: ConversationKind,
    /// A group's title.
    pub title: String,
    /// How many members it has.
    pub member_count: u32,
    /// Its members, sorted (empty above [`INLINE_MEMBERS`]).
    pub members: Vec<String>,
    /// A group's admins, sorted (empty above [`INLINE_MEMBERS`]).
    pub admins: Vec<String>,
    /// Its latest stored message.
    pub last_seq: u64,
}

/// A device that started syncing: where it resumes, the log's head, and its feed.
#[derive(Debug)]
pub struct Subscription {
    /// The position delivery resumes after.
    pub cursor: u64,
    /// The head of the user's log at subscription time.
    pub head: u64,
    /// The events.
    pub feed: DeviceFeed,
}

/// Slots of [`MembershipEpochs`]: enough that a change in one conversation invalidates few
/// others' cached member lists, small enough to be a fixed 8 KiB.
const EPOCH_SLOTS: usize = 1024;

/// Counters of membership changes, one per slot of conversations (by id). The commit thread
/// bumps a conversation's slot once a change to its members is durable; a cache of member
/// lists (each connection's, for typing) keeps the slot's value from before it read the
/// members, and reads them again once the value moved. So a cached list never outlives a
/// committed change, whichever connection made it.
pub(crate) struct MembershipEpochs(Box<[std::sync::atomic::AtomicU64]>);

impl MembershipEpochs {
    fn new() -> Self {
        Self((0..EPOCH_SLOTS).map(|_| Default::default()).collect())
    }

    fn slot(&self, conversation: ConversationId) -> &std::sync::atomic::AtomicU64 {
        &self.0[(conversation % EPOCH_SLOTS as u64) as usize]
    }

    /// The current epoch of a conversation's slot.
    pub(crate) fn get(&self, conversation: ConversationId) -> u64 {
        self.slot(conversation)
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks a conversation's members as changed.
    fn bump(&self, conversation: ConversationId) {
        self.slot(conversation)
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

struct Inner {
    store: Arc<Store>,
    /// Every store call made for a request goes through it (see `gate.rs`).
    gate: gate::Gate,
    /// Side writes, through the commit thread.
    writer: Arc<dyn Writer>,
    epochs: Arc<MembershipEpochs>,
    sessions: Arc<Sessions>,
    presence: Arc<Presence>,
    notifier: Arc<crate::push::Notifier>,
    shards: Vec<mpsc::Sender<ShardRequest>>,
    commit: SyncSender<CommitItem>,
    /// Serialises check-and-create of direct conversations; held only around blocking store
    /// calls on a `spawn_blocking` thread, never across an await.
    directory: Mutex<()>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// In `buffered` durability, the thread that syncs the journal, and what stops it.
    syncer: Mutex<Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>>,
    commit_thread: Mutex<Option<JoinHandle<()>>>,
    outbound_queue: usize,
    history_page: u32,
    /// The largest frame: what one page of history can carry.
    max_frame: u32,
    max_group: usize,
    limiter: limiter::SendLimiter,
    /// Where pushers may point, and how many a user may have.
    push: crate::config::PushConfig,
    /// Bytes of bodies in flight (see [`BODY_BYTES_IN_FLIGHT`]).
    bodies: Arc<tokio::sync::Semaphore>,
    /// A cluster node's replicated log (`replicated.rs`); `None` on one node.
    replicated: Option<Arc<replicated::Replicated>>,
    /// Bytes of other nodes' bodies between the log and the store (cluster). Not `bodies`:
    /// this node's sends hold those while they wait for the applier, which must never wait
    /// for them in turn.
    applied_bodies: Arc<tokio::sync::Semaphore>,
    /// Connections to close (revoked tokens, removed devices, an operator's disconnect):
    /// the transport listens and closes this node's.
    kicks: tokio::sync::broadcast::Sender<crate::persist::Kick>,
}

/// The router handle; cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Router(..)")
    }
}

impl Router {
    /// Starts the shard threads and the commit thread over `store`.
    ///
    /// Must be called within a tokio runtime (the notifier's task starts here).
    pub fn start(store: Arc<Store>, config: &Config) -> Result<Self, RouterError> {
        Self::start_with(store, config, None)
    }

    /// Starts the router of a cluster node: every write goes through the replicated log
    /// (`replicated.rs`). The entries to append come out of the returned receiver (the
    /// cluster's appender); the cluster's applier hands them back through [`Router::apply`].
    /// `allocate` gives cluster-wide conversation ids.
    pub fn start_replicated(
        store: Arc<Store>,
        config: &Config,
        allocate: Allocate,
    ) -> Result<(Self, mpsc::Receiver<Entry>), RouterError> {
        let (tx, rx) = mpsc::channel(LOG_QUEUE);
        let replicated = Arc::new(replicated::Replicated::new(tx, allocate));
        Ok((Self::start_with(store, config, Some(replicated))?, rx))
    }

    fn start_with(
        store: Arc<Store>,
        config: &Config,
        replicated: Option<Arc<replicated::Replicated>>,
    ) -> Result<Self, RouterError> {
        let sessions = Arc::new(Sessions::default());
        let gate = gate::Gate::new(gate::BLOCKING_REQUESTS);
        // Every write off the hot path goes through the commit thread and its fsync.
        let (commit_tx, commit_rx) = sync_channel(COMMIT_QUEUE);
        let writer: Arc<dyn Writer> = match &replicated {
            None => Arc::new(commit::CommitWriter(commit_tx.clone())),
            Some(r) => Arc::new(replicated::ReplicatedWriter {
                store: store.clone(),
                replicated: r.clone(),
            }),
        };
        // A cluster node applies the log in its order through one shard (`replicated.rs`).
        let shard_count = if replicated.is_some() {
            1
        } else {
            config.store.shards
        };
        let presence = Arc::new(Presence::new(
            store.clone(),
            config.presence.debounce,
            gate.clone(),
            writer.clone(),
        ));
        let online = presence.clone();
        let vapid =
            crate::push::vapid::Vapid::load_or_create(&config.data, &config.push.vapid_subject)
                .map_err(|e| RouterError::Internal(e.to_string()))?;
        let notifier = crate::push::Notifier::start(
            store.clone(),
            config.push.clone(),
            Arc::new(vapid),
            writer.clone(),
            Box::new(move |user: &str| online.is_online(user)),
        )?;
        let epochs = Arc::new(MembershipEpochs::new());
        let commit = CommitThread {
            store: store.clone(),
            epochs: epochs.clone(),
            sessions: sessions.clone(),
            notifier: notifier.clone(),
            rx: commit_rx,
            max_batch: config.store.commit_batch,
            cached_logs: config.store.cached_logs,
        };
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| RouterError::Internal(format!("cannot start thread: {e}")))
        };
        let commit_thread = spawn("plover-commit".into(), Box::new(move || commit.run()))?;
        let syncer = match config.store.durability {
            crate::config::Durability::Sync => None,
            crate::config::Durability::Buffered => {
                let (stop, stopped) = std::sync::mpsc::channel::<()>();
                let (store, every) = (store.clone(), config.store.buffered_sync);
                let thread = spawn(
                    "plover-sync".into(),
                    Box::new(move || {
                        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                            stopped.recv_timeout(every)
                        {
                            if store.is_poisoned() || store.sync().is_err() {
                                return;
                            }
                        }
                    }),
                )?;
                Some((stop, thread))
            }
        };
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        // Writes per user, fan-out included: charged by the shards, which know the members.
        let writes = Arc::new(limiter::SendLimiter::new(config.limits.writes_per_second));
        for i in 0..shard_count {
            let (tx, rx) = mpsc::channel(SHARD_QUEUE);
            let shard = Shard {
                store: store.clone(),
                rx,
                commit: commit_tx.clone(),
                recent_capacity: Shard::recent_capacity(COMMIT_QUEUE, config.store.commit_batch),
                cached_members: config.store.cached_members / shard_count,
                index: i,
                writes: writes.clone(),
                limits: ShardLimits {
                    max_group: config.limits.max_group,
                    receipt_fanout: config.limits.receipt_fanout,
                },
                replicated: replicated.is_some(),
            };
            threads.push(spawn(
                format!("plover-shard-{i}"),
                Box::new(move || shard.run()),
            )?);
            shards.push(tx);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                gate,
                writer,
                epochs,
                presence,
                notifier,
                store,
                sessions,
                shards,
                commit: commit_tx,
                directory: Mutex::new(()),
                threads: Mutex::new(threads),
                syncer: Mutex::new(syncer),
                commit_thread: Mutex::new(Some(commit_thread)),
                outbound_queue: config.limits.outbound_queue,
                history_page: config.limits.history_page,
                max_frame: config.limits.max_frame,
                max_group: config.limits.max_group,
                limiter: limiter::SendLimiter::new(config.limits.sends_per_second),
                push: config.push.clone(),
                bodies: Arc::new(tokio::sync::Semaphore::new(BODY_BYTES_IN_FLIGHT)),
                replicated,
                applied_bodies: Arc::new(tokio::sync::Semaphore::new(BODY_BYTES_IN_FLIGHT)),
                kicks: tokio::sync::broadcast::channel(256).0,
            }),
        })
    }

    /// The shard that owns a conversation.
    fn shard(&self, conversation: ConversationId) -> &mpsc::Sender<ShardRequest> {
        &self.inner.shards[(conversation % self.inner.shards.len() as u64) as usize]
    }

    /// Waits until every message sequenced before the call is in the store: a barrier goes
    /// through each shard (behind what it sequenced) and then the commit thread. In a
    /// cluster, first until this node applied what the log held when it was called.
    pub async fn settle_all(&self) -> Result<(), RouterError> {
        if let Some(replicated) = self.replicated() {
            self.barrier_replicated(replicated).await?;
        }
        let mut landed = Vec::with_capacity(self.inner.shards.len());
        for shard in &self.inner.shards {
            let (reply, done) = oneshot::channel();
            shard
                .send(ShardRequest::Pass(CommitItem::Barrier(reply)))
                .await
                .map_err(|_| RouterError::ShuttingDown)?;
            landed.push(done);
        }
        for done in landed {
            done.await.map_err(|_| RouterError::ShuttingDown)?;
        }
        Ok(())
    }

    /// The store (for health checks and tools).
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// The registry of online devices.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.inner.sessions
    }

    /// The presence registry.
    pub fn presence(&self) -> &Arc<Presence> {
        &self.inner.presence
    }

    /// Takes one write from `user`'s budget (`limits.sends_per_second`, bursts of twice that):
    /// messages, new conversations, group changes, pushers and history clearing all write to
    /// the store, so a runaway or hostile client is held back whichever it floods with.
    fn charge(&self, user: &str, doing: &str) -> Result<(), RouterError> {
        if self.inner.limiter.allow(user) {
            return Ok(());
        }
        metrics::counter!(crate::metrics::names::WRITES_REFUSED, "budget" => "requests")
            .increment(1);
        Err(RouterError::Limit(format!(
            "{doing} faster than {} writes a second; slow down and retry (a send with the same id)",
            self.inner.limiter.rate()
        )))
    }

    /// Registers a pusher for `user` from `device`. Its URL must be an allowed target
    /// (`push/target.rs`); it replaces a pusher with the same key, and a gateway pusher of the
    /// same app that the same device registered before (an app reinstalled, a push token
    /// renewed); past `push.max_pushers` others it is refused with `limit`.
    pub async fn register_pusher(
        &self,
        user: &str,
        device: &str,
        pusher: Pusher,
    ) -> Result<(), RouterError> {
        check_pusher(&pusher)?;
        self.charge(user, "registering pushers")?;
        let notifier = self.inner.notifier.clone();
        let store = self.inner.store.clone();
        let (allow_private, max) = (
            self.inner.push.allow_private_targets,
            self.inner.push.max_pushers,
        );
        let (user, device) = (user.to_owned(), device.to_owned());
        self.inner
            .gate
            .run(move || {
                crate::push::target::check_url(pusher.url(), allow_private)
                    .map_err(RouterError::Invalid)?;
                let same_app = |old: &Pusher| match (old, &pusher) {
                    (Pusher::Gateway { app_id: a, .. }, Pusher::Gateway { app_id: b, .. }) => {
                        a == b
                    }
                    _ => false,
                };
                let mut replaced = Vec::new();
                let mut others = 0;
                for (by, old) in store.pusher_records(&user)? {
                    if old.key() == pusher.key() {
                        continue;
                    }
                    if by.as_deref() == Some(device.as_str()) && same_app(&old) {
                        replaced.push(old.key().to_owned());
                    } else {
                        others += 1;
                    }
                }
                if others >= max {
                    return Err(RouterError::Limit(format!(
                        "{user} has {others} pushers, the most allowed (push.max_pushers); \
                         remove one first"
                    )));
                }
                for key in replaced {
                    notifier.unregister(&user, &key)?;
                }
                Ok(notifier.register(&user, &device, &pusher)?)
            })
            .await
    }

    /// Removes a pusher by key; returns whether it existed.
    pub async fn unregister_pusher(&self, user: &str, key: &str) -> Result<bool, RouterError> {
        let notifier = self.inner.notifier.clone();
        let (user, key) = (user.to_owned(), key.to_owned());
        self.inner
            .gate
            .run(move || Ok(notifier.unregister(&user, &key)?))
            .await
    }

    /// A user's pushers.
    pub async fn pushers(&self, user: &str) -> Result<Vec<Pusher>, RouterError> {
        let notifier = self.inner.notifier.clone();
        let user = user.to_owned();
        self.inner
            .gate
            .run(move || Ok(notifier.pushers(&user)?))
            .await
    }

    /// Opts a conversation the user belongs to in or out of bodies in their notifications.
    pub async fn push_content(
        &self,
        user: &str,
        conversation: ConversationId,
        include: bool,
    ) -> Result<(), RouterError> {
        self.charge(user, "changing push settings")?;
        self.members(user, conversation).await?;
        let notifier = self.inner.notifier.clone();
        let user = user.to_owned();
        self.inner
            .gate
            .run(move || Ok(notifier.set_content(&user, conversation, include)?))
            .await
    }

    /// Connections this node must close, as they are asked for (revocations, removed
    /// devices, disconnects; in a cluster, from any node).
    pub fn kicks(&self) -> tokio::sync::broadcast::Receiver<crate::persist::Kick> {
        self.inner.kicks.subscribe()
    }

    /// Tells this node's transport to close connections.
    pub(crate) fn kick(&self, kick: crate::persist::Kick) {
        let _ = self.inner.kicks.send(kick);
    }

    /// Reads `user`'s pushers again (an operator removed some).
    pub async fn refresh_pushers(&self, user: &str) -> Result<(), RouterError> {
        let notifier = self.inner.notifier.clone();
        let users = vec![user.to_owned()];
        self.inner
            .gate
            .run(move || Ok(notifier.refresh(&users)?))
            .await
    }

    /// `user` blocks (`on`) or unblocks `other`. Blocking someone unknown is refused as
    /// `unknown_user`; blocking twice, or unblocking someone not blocked, changes nothing.
    pub async fn block(&self, user: &str, other: &str, on: bool) -> Result<(), RouterError> {
        if !valid_name(other) || other == user {
            return Err(RouterError::Invalid(format!(
                "{other:?} is not another user's name"
            )));
        }
        self.charge(user, "blocking")?;
        let (store, writer) = (self.inner.store.clone(), self.inner.writer.clone());
        let (user, other) = (user.to_owned(), other.to_owned());
        self.inner
            .gate
            .run(move || {
                if !store.user_exists(&other)? {
                    return Err(RouterError::UnknownUser(other));
                }
                if store.blocks(&user, &other)? == on {
                    return Ok(());
                }
                writer.write(Box::new(move |b| b.put_block(&user, &other, on)))?;
                tracing::info!(target: "plover::relations", blocked = on, "a user changed a block");
                Ok(())
            })
            .await
    }

    /// The users `user` blocked, in name order.
    pub async fn blocked(&self, user: &str) -> Result<Vec<String>, RouterError> {
        let user = user.to_owned();
        self.with_store(move |store, _| Ok(store.blocked_by(&user)?))
            .await
    }

    /// `user` accepts `conversation`, a message request (nothing changes if it is not one).
    pub async fn accept(
        &self,
        user: &str,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        self.charge(user, "accepting")?;
        let (store, writer) = (self.inner.store.clone(), self.inner.writer.clone());
        let user = user.to_owned();
        self.inner
            .gate
            .run(move || {
                member_record(&store, conversation, &user)?;
                if store.request(conversation, &user)?.is_none() {
                    return Ok(());
                }
                writer.write(Box::new(move |b| b.put_request(conversation, &user, None)))?;
                Ok(())
            })
            .await
    }

    /// The conversations `user` has not accepted yet, with who asked.
    pub async fn requests(&self, user: &str) -> Result<Vec<(ConversationId, String)>, RouterError> {
        let user = user.to_owned();
        self.with_store(move |store, _| Ok(store.requests_of(&user)?))
            .await
    }

    /// Runs `f` on the blocking pool with the store and its writer (side writes that go
    /// through the replicated log in a cluster), among the router's bounded blocking work.
    pub async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store, &dyn Writer) -> Result<T, RouterError> + Send + 'static,
    ) -> Result<T, RouterError> {
        let (store, writer) = (self.inner.store.clone(), self.inner.writer.clone());
        self.inner.gate.run(move || f(&store, &*writer)).await
    }

    /// Records a user at their first authenticated connection.
    pub async fn ensure_user(&self, user: &str) -> Result<(), RouterError> {
        let (store, writer) = (self.inner.store.clone(), self.inner.writer.clone());
        let user = user.to_owned();
        self.inner
            .gate
            .run(move || {
                store.ensure_user(&*writer, &user, now_ms())?;
                Ok(())
            })
            .await
    }

    /// Binds a stream to a conversation the caller belongs to.
    pub async fn open(
        &self,
        user: &str,
        target: Target,
        create: bool,
    ) -> Result<Opened, RouterError> {
        let router = self.clone();
        let user = user.to_owned();
        self.inner
            .gate
            .run(move || router.open_blocking(&user, target, create))
            .await
    }

    fn open_blocking(
        &self,
        user: &str,
        target: Target,
        create: bool,
    ) -> Result<Opened, RouterError> {
        let store = &self.inner.store;
        let conversation = match target {
            Target::Conversation(id) => id,
            Target::Direct(peer) => {
                if !valid_name(&peer) {
                    return Err(RouterError::Invalid(format!(
                        "{peer:?} is not a valid user name"
                    )));
                }
                if peer == user {
                    return Err(RouterError::Invalid(
                        "a direct conversation needs two different users".into(),
                    ));
                }
                match store.direct_between(user, &peer)? {
                    Some(id) => id,
                    None if !create => return Err(RouterError::NoConversation(peer)),
                    None => {
                        if !store.user_exists(&peer)? {
                            return Err(RouterError::UnknownUser(peer));
                        }
                        if store.blocks(user, &peer)? {
                            return Err(RouterError::Forbidden(format!(
                                "you blocked {peer}; unblock them to write to them"
                            )));
                        }
                        // The same answer as any refusal: it does not say that `peer`
                        // blocked `user`.
                        if store.blocks(&peer, user)? {
                            return Err(RouterError::Forbidden(shard::NOT_ALLOWED.into()));
                        }
                        let _guard = self
                            .inner
                            .directory
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        match store.direct_between(user, &peer)? {
                            Some(id) => id,
                            None => {
                                self.charge(user, "starting conversations")?;
                                // From a stranger, it is a request until `peer` answers.
                                let request = !store.share_conversation(user, &peer)?;
                                store.create_direct(
                                    &*self.inner.writer,
                                    user,
                                    &peer,
                                    now_ms(),
                                    request,
                                )?
                            }
                        }
                    }
                }
            }
        };
        let record = member_record(store, conversation, user)?;
        let inline = record.members.len() <= INLINE_MEMBERS;
        Ok(Opened {
            conversation,
            kind: record.kind,
            member_count: record.members.len() as u32,
            members: if inline { record.names() } else { Vec::new() },
            admins: if inline { record.admins() } else { Vec::new() },
            title: record.title,
            last_seq: store.last_seq(conversation)?,
        })
    }

    /// Sequences a message. Waits while the shard's queue is full (backpressure), then returns
    /// a receiver that yields the answer once the message is durable. `origin` is the sending
    /// connection's feed ([`DeviceFeed::id`], 0 for none), which skips the message: the answer
    /// carries its position in the sender's log instead.
    pub async fn send(
        &self,
        conversation: ConversationId,
        from: &str,
        device: &str,
        id: ClientMsgId,
        body: bytes::Bytes,
        origin: u64,
    ) -> Result<oneshot::Receiver<Result<Sent, RouterError>>, RouterError> {
        self.send_referencing(conversation, from, device, id, body, Vec::new(), origin)
            .await
    }

    /// [`Router::send`] of a message that references stored objects (`SendWith`; the
    /// caller checked that the sender uploaded them): the message's references are written
    /// with it.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_referencing(
        &self,
        conversation: ConversationId,
        from: &str,
        device: &str,
        id: ClientMsgId,
        body: bytes::Bytes,
        objects: Vec<plover_proto::ObjectId>,
        origin: u64,
    ) -> Result<oneshot::Receiver<Result<Sent, RouterError>>, RouterError> {
        // The first of the message's stage stamps: its frame was decoded just before.
        let arrived = std::time::Instant::now();
        self.charge(from, "sending")?;
        let share = u32::try_from(body.len().clamp(1, BODY_BYTES_IN_FLIGHT)).unwrap_or(u32::MAX);
        let held = self
            .inner
            .bodies
            .clone()
            .acquire_many_owned(share)
            .await
            .map_err(|_| RouterError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        let shard = self.shard(conversation);
        let request = SendRequest {
            conversation,
            from: from.to_owned(),
            device: device.to_owned(),
            id,
            body,
            reply,
            stamps: timing::Stamps::new(arrived),
            origin,
            held,
            ts: 0,
            notify: true,
            objects,
        };
        if let Some(replicated) = self.replicated() {
            // The block check the shard makes on one node, made here before the log (not for
            // the retry of a message already stored: it gets its answer, as on one node).
            if let Some(record) = self.inner.store.conversation(conversation)?
                && record.kind == ConversationKind::Direct
                && self
                    .inner
                    .store
                    .idempotent(conversation, from, &id)?
                    .is_none()
            {
                shard::direct_allowed(&self.inner.store, from, &record.names())?;
            }
            self.send_replicated(replicated, request).await?;
            return Ok(rx);
        }
        shard
            .send(ShardRequest::Send(request))
            .await
            .map_err(|_| RouterError::ShuttingDown)?;
        Ok(rx)
    }

    /// Hides a conversation's history up to `up_to` from `user` only; returns the mark now in
    /// force (marks never move back).
    pub async fn clear_history(
        &self,
        user: &str,
        conversation: ConversationId,
        up_to: u64,
    ) -> Result<u64, RouterError> {
        self.charge(user, "clearing history")?;
        let (store, writer) = (self.inner.store.clone(), self.inner.writer.clone());
        let user = user.to_owned();
        self.inner
            .gate
            .run(move || {
                member_record(&store, conversation, &user)?;
                let up_to = up_to.min(store.last_seq(conversation)?);
                Ok(store.set_cleared(&*writer, conversation, &user, up_to)?)
            })
            .await
    }

    /// Removes the bodies that retention policies say must go: `ttl` messages past their time
    /// and `until_delivered` messages older than `max_undelivered`. Returns how many bodies it
    /// removed. Blocking; the server runs it every `retention.sweep_interval`.
    pub fn sweep_blocking(&self, max_undelivered: std::time::Duration) -> Result<u64, RouterError> {
        retention::sweep(
            &self.inner.store,
            &*self.inner.writer,
            now_ms(),
            max_undelivered,
        )
    }

    /// Moves `user`'s delivered and read marks in a conversation forward. Fire and forget:
    /// marks only move forward, so a lost one is superseded by the next.
    pub async fn marks(
        &self,
        conversation: ConversationId,
        user: &str,
        delivered: u64,
        read: u64,
    ) -> Result<(), RouterError> {
        let request = MarksRequest {
            conversation,
            user: user.to_owned(),
            delivered,
            read,
        };
        if let Some(replicated) = self.replicated() {
            return self.marks_replicated(replicated, request).await;
        }
        self.shard(conversation)
            .send(ShardRequest::Marks(request))
            .await
            .map_err(|_| RouterError::ShuttingDown)
    }

    /// The membership epoch of a conversation (see `MembershipEpochs`): read it before
    /// [`Router::members`], and read the members again once it differs.
    pub fn membership_epoch(&self, conversation: ConversationId) -> u64 {
        self.inner.epochs.get(conversation)
    }

    /// The members of a conversation, if `user` is one of them.
    pub async fn members(
        &self,
        user: &str,
        conversation: ConversationId,
    ) -> Result<Arc<[String]>, RouterError> {
        let store = self.inner.store.clone();
        let user = user.to_owned();
        self.inner
            .gate
            .run(move || {
                let record = member_record(&store, conversation, &user)?;
                Ok(record.names().into())
            })
            .await
    }

    /// A page of a conversation the caller belongs to, oldest first.
    pub async fn history(
        &self,
        user: &str,
        conversation: ConversationId,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<Message>, bool), RouterError> {
        if limit == 0 || limit > self.inner.history_page {
            return Err(RouterError::Invalid(format!(
                "limit must be between 1 and {}",
                self.inner.history_page
            )));
        }
        let store = self.inner.store.clone();
        let user = user.to_owned();
        let max_bytes = self.inner.max_frame as usize;
        self.inner
            .gate
            .run(move || {
                let record = member_record(&store, conversation, &user)?;
                // A member reads from their joining on, and not what they cleared for themselves.
                let since = record.member(&user).map_or(1, |m| m.since);
                let from = since.max(store.cleared(conversation, &user)? + 1);
                // Decode no more than a frame can carry: the page is cut to one frame anyway.
                let (page, more) =
                    store.history(conversation, before, after, limit as usize, from, max_bytes)?;
                let now = now_ms();
                // Each message under the policy it was sent under.
                let policies = store.policies(conversation)?;
                let page = page
                    .into_iter()
                    .map(|m| {
                        let policy = policies.at(m.seq, record.retention);
                        expire(m, policy, now)
                    })
                    .collect();
                Ok((page, more))
            })
            .await
    }

    /// A page of the caller's conversations with ids above `after`, by id, and whether more
    /// follow.
    pub async fn conversations(
        &self,
        user: &str,
        after: ConversationId,
        limit: usize,
    ) -> Result<(Vec<ConversationInfo>, bool), RouterError> {
        let store = self.inner.store.clone();
        let user = user.to_owned();
        self.inner
            .gate
            .run(move || {
                let mut out = Vec::new();
                let ids: Vec<ConversationId> = store
                    .conversations_of(&user)?
                    .into_iter()
                    .filter(|c| *c > after)
                    .collect();
                let more = ids.len() > limit;
                for conversation in ids.into_iter().take(limit) {
                    let Some(record) = store.conversation(conversation)? else {
                        continue;
                    };
                    let last_seq = store.last_seq(conversation)?;
                    let inline = record.members.len() <= INLINE_MEMBERS;
                    let mut marks = Vec::new();
                    for (member, delivered, read) in store.marks(conversation)? {
                        if !record.is_member(&member) || !(inline || member == user) {
                            continue;
                        }
                        let read = if shard::read_hidden(&store, conversation, &user, &member)? {
                            0
                        } else {
                            read
                        };
                        marks.push(Marks {
                            user: member,
                            delivered,
                            read,
                        });
                    }
                    let read = marks.iter().find(|m| m.user == user).map_or(0, |m| m.read);
                    out.push(ConversationInfo {
                        conversation,
                        kind: record.kind,
                        member_count: record.members.len() as u32,
                        members: if inline { record.names() } else { Vec::new() },
                        title: record.title,
                        last_seq,
                        marks,
                        unread: last_seq.saturating_sub(read),
                        retention: record.retention,
                    });
                }
                Ok((out, more))
            })
            .await
    }

    /// A page of a conversation's members (name order, after `after`) with their roles and
    /// marks, for a caller who is a member; and whether more follow.
    pub async fn members_page(
        &self,
        user: &str,
        conversation: ConversationId,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<MemberInfo>, bool), RouterError> {
        let store = self.inner.store.clone();
        let (user, after) = (user.to_owned(), after.to_owned());
        self.inner
            .gate
            .run(move || {
                let record = member_record(&store, conversation, &user)?;
                let mut marks: HashMap<String, (u64, u64)> = store
                    .marks(conversation)?
                    .into_iter()
                    .map(|(u, d, r)| (u, (d, r)))
                    .collect();
                let rest: Vec<_> = record
                    .members
                    .iter()
                    .filter(|m| m.user.as_str() > after.as_str())
                    .collect();
                let more = rest.len() > limit;
                let mut page = Vec::new();
                for m in rest.into_iter().take(limit) {
                    let (delivered, read) = marks.remove(&m.user).unwrap_or((0, 0));
                    let read = if shard::read_hidden(&store, conversation, &user, &m.user)? {
                        0
                    } else {
                        read
                    };
                    page.push(MemberInfo {
                        user: m.user.clone(),
                        admin: m.admin,
                        since: m.since,
                        delivered,
                        read,
                    });
                }
                Ok((page, more))
            })
            .await
    }

    /// Creates a group of `creator` (its first admin) and `members`; returns its id.
    pub async fn create_group(
        &self,
        creator: &str,
        device: &str,
        title: &str,
        members: &[String],
        retention: Retention,
    ) -> Result<ConversationId, RouterError> {
        self.charge(creator, "creating groups")?;
        shard::check_retention(retention)?;
        if title.is_empty() || title.len() > 200 {
            return Err(RouterError::Invalid(
                "a group title is 1 to 200 bytes".into(),
            ));
        }
        let mut names: Vec<String> = members.to_vec();
        names.push(creator.to_owned());
        names.sort();
        names.dedup();
        if let Some(bad) = names.iter().find(|n| !valid_name(n)) {
            return Err(RouterError::Invalid(format!(
                "{bad:?} is not a valid user name"
            )));
        }
        if names.len() > self.inner.max_group {
            return Err(RouterError::Limit(format!(
                "a group of {} members exceeds the limit of {}",
                names.len(),
                self.inner.max_group
            )));
        }
        let router = self.clone();
        let record = ConversationRecord {
            kind: ConversationKind::Group,
            title: title.to_owned(),
            members: names
                .iter()
                .map(|user| MemberRecord {
                    user: user.clone(),
                    admin: user == creator,
                    since: 1,
                })
                .collect(),
            created_ms: now_ms(),
            retention,
        };
        let conversation = self
            .inner
            .gate
            .run(move || {
                let store = &router.inner.store;
                for name in &names {
                    if !store.user_exists(name)? {
                        return Err(RouterError::UnknownUser(name.clone()));
                    }
                }
                let _guard = router
                    .inner
                    .directory
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                Ok(store.allocate_conversation(&*router.inner.writer)?)
            })
            .await?;
        self.change(conversation, creator, device, MemberOp::Create(record))
            .await?;
        Ok(conversation)
    }

    /// Carries out a membership change in a group; returns the seq of its event, or 0 when it
    /// changed nothing (already a member, not a member, already an admin).
    pub async fn membership(
        &self,
        conversation: ConversationId,
        by: &str,
        device: &str,
        op: MemberOp,
    ) -> Result<u64, RouterError> {
        self.charge(by, "changing the conversation")?;
        self.change(conversation, by, device, op).await
    }

    /// `user` leaves a group on an operator's behalf (`admin delete-user`): as `Leave`, not
    /// charged to the user's budget (an account in many groups would run out of it).
    pub async fn leave_for_operator(
        &self,
        conversation: ConversationId,
        user: &str,
    ) -> Result<u64, RouterError> {
        self.change(conversation, user, "operator", MemberOp::Leave)
            .await
    }

    /// A membership change through the conversation's shard, already charged for.
    async fn change(
        &self,
        conversation: ConversationId,
        by: &str,
        device: &str,
        op: MemberOp,
    ) -> Result<u64, RouterError> {
        let (reply, rx) = oneshot::channel();
        let request = MembershipRequest {
            conversation,
            by: by.to_owned(),
            device: device.to_owned(),
            op,
            reply,
            id: ClientMsgId::random(),
            ts: 0,
        };
        match self.replicated() {
            Some(replicated) => self.change_replicated(replicated, request).await?,
            None => self
                .shard(conversation)
                .send(ShardRequest::Membership(request))
                .await
                .map_err(|_| RouterError::ShuttingDown)?,
        }
        let sent = rx.await.map_err(|_| RouterError::ShuttingDown)??;
        Ok(sent.seq)
    }

    /// Starts event delivery to a device after `cursor` (or after the position the device
    /// last acknowledged, when `None`). A cursor past the head is clamped to the head.
    pub async fn subscribe(
        &self,
        user: &str,
        device: &str,
        cursor: Option<u64>,
    ) -> Result<Subscription, RouterError> {
        // Register first, read positions second: see `feed.rs` for why this order loses nothing.
        let (registration, rx, lagging) = self
            .inner
            .sessions
            .register(user, self.inner.outbound_queue);
        // Let the cursor acknowledged on the device's previous connection land first.
        // Queued without parking a thread on a full commit queue: a reconnect storm waits
        // here as futures, and leaves the blocking pool to `Open` and `History`. In a
        // cluster that connection may have been on another node: wait for this node to
        // apply what the log held.
        if let Some(replicated) = self.replicated() {
            self.barrier_replicated(replicated).await?;
        }
        let (barrier, landed) = oneshot::channel();
        let mut item = CommitItem::Barrier(barrier);
        loop {
            match self.inner.commit.try_send(item) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) => {
                    item = back;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                Err(TrySendError::Disconnected(_)) => return Err(RouterError::ShuttingDown),
            }
        }
        landed.await.map_err(|_| RouterError::ShuttingDown)?;
        let store = self.inner.store.clone();
        let (u, d) = (user.to_owned(), device.to_owned());
        let (stored, head) = self
            .inner
            .gate
            .run(move || Ok((store.device_cursor(&u, &d)?, store.log_head(&u)?)))
            .await?;
        let cursor = cursor.or(stored).unwrap_or(0).min(head);
        let feed = DeviceFeed::new(
            user.to_owned(),
            cursor,
            registration,
            rx,
            lagging,
            self.inner.store.clone(),
            self.inner.gate.clone(),
        );
        Ok(Subscription { cursor, head, feed })
    }

    /// Records that a device has every event up to `cursor`.
    ///
    /// Advisory and never blocking: when the commit queue is full the ack is dropped, and the
    /// device's next ack (which carries a later cursor) takes its place.
    pub fn ack(&self, user: &str, device: &str, cursor: u64) {
        if let Some(replicated) = self.replicated() {
            return self.ack_replicated(replicated, user, device, cursor);
        }
        let item = CommitItem::Cursor {
            user: user.to_owned(),
            device: device.to_owned(),
            cursor,
        };
        match self.inner.commit.try_send(item) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Stops the shards, commits what they queued, stops the commit thread and flushes the
    /// store. Blocking: call it from `spawn_blocking` or a plain thread.
    pub fn shutdown_blocking(&self) -> Result<(), RouterError> {
        self.inner.notifier.stop();
        for shard in &self.inner.shards {
            let _ = shard.blocking_send(ShardRequest::Stop);
        }
        let threads = std::mem::take(
            &mut *self
                .inner
                .threads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for t in threads {
            let _ = t.join();
        }
        let _ = self.inner.commit.send(CommitItem::Stop);
        let commit = self
            .inner
            .commit_thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(t) = commit {
            let _ = t.join();
        }
        let syncer = self
            .inner
            .syncer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some((stop, thread)) = syncer {
            drop(stop);
            let _ = thread.join();
        }
        if !self.inner.store.is_poisoned() {
            // In a cluster, last seen goes through the log like every write (at each
            // disconnect); a write to this store alone would make it differ from the others.
            if self.replicated().is_none() {
                self.inner.presence.record_all_last_seen();
            }
            self.inner.store.flush()?;
        }
        Ok(())
    }
}

/// Refuses pushers whose URLs are not http(s) or whose fields are absurdly long.
fn check_pusher(pusher: &Pusher) -> Result<(), RouterError> {
    let url_ok =
        |u: &str| (u.starts_with("https://") || u.starts_with("http://")) && u.len() <= 2048;
    let ok = match pusher {
        Pusher::Gateway {
            url,
            app_id,
            pushkey,
        } => {
            url_ok(url)
                && !app_id.is_empty()
                && app_id.len() <= 256
                && !pushkey.is_empty()
                && pushkey.len() <= 4096
        }
        Pusher::WebPush {
            endpoint,
            p256dh,
            auth,
        } => {
            url_ok(endpoint)
                && p256dh.is_some() == auth.is_some()
                && p256dh.as_ref().is_none_or(|k| k.len() <= 256)
                && auth.as_ref().is_none_or(|k| k.len() <= 64)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(RouterError::Invalid(
            "a pusher needs an http(s) URL (at most 2048 bytes), and for a gateway an app id and a push key; p256dh and auth go together".into(),
        ))
    }
}

/// A conversation's record, if `user` is a member (otherwise `NotMember`, whether or not the
/// conversation exists, so ids cannot be probed).
fn member_record(
    store: &Store,
    conversation: ConversationId,
    user: &str,
) -> Result<ConversationRecord, RouterError> {
    store
        .conversation(conversation)?
        .filter(|r| r.is_member(user))
        .ok_or(RouterError::NotMember(conversation))
}
