//! Sessions, sequencing, group commit, fan-out and catch-up. Knows nothing of QUIC.
//!
//! ```text
//! connection task --send--> shard (thread, owns its conversations: membership, retries, seq)
//!                                 --> commit thread (one batch, one fsync, log positions)
//!                                        --> sender's ack
//!                                        --> Sessions::deliver -> each device's bounded queue
//!                                                                   -> DeviceFeed -> transport
//! ```

mod commit;
mod feed;
mod presence;
mod sessions;
mod shard;

use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

pub use commit::Sent;
pub use feed::DeviceFeed;
pub use presence::{PUSH_QUEUE, Presence, PresenceGuard, Push};
pub use sessions::{Delivery, Sessions};

use crate::auth::valid_name;
use crate::config::Config;
use crate::framing::{
    ClientMsgId, ConversationId, ConversationInfo, ErrorCode, Marks, Message, Target,
};
use crate::persist::{Store, StoreError};
use commit::{CommitItem, CommitThread};
use shard::{MarksRequest, SendRequest, Shard, ShardRequest, now_ms};

/// Requests a shard's channel holds before senders wait: enough to keep the shard busy while
/// the connection tasks refill it, small enough to be a real bound.
const SHARD_QUEUE: usize = 4096;
/// Items the commit channel holds before shards wait.
const COMMIT_QUEUE: usize = 8192;

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
    /// The caller may not see this.
    #[error("{0}")]
    Forbidden(String),
    /// The store refuses writes after a failed write or fsync.
    #[error("the server cannot store messages right now (storage failure); nothing was stored")]
    Unavailable,
    /// The router is stopping.
    #[error("the server is shutting down")]
    ShuttingDown,
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
            Self::Unavailable | Self::Store(StoreError::Poisoned) => ErrorCode::UNAVAILABLE,
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
    /// Its members, sorted.
    pub members: Vec<String>,
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

struct Inner {
    store: Arc<Store>,
    sessions: Arc<Sessions>,
    presence: Arc<Presence>,
    shards: Vec<mpsc::Sender<ShardRequest>>,
    commit: SyncSender<CommitItem>,
    /// Serialises check-and-create of direct conversations; held only around blocking store
    /// calls on a `spawn_blocking` thread, never across an await.
    directory: Mutex<()>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    commit_thread: Mutex<Option<JoinHandle<()>>>,
    outbound_queue: usize,
    history_page: u32,
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RouterError> + Send + 'static,
) -> Result<T, RouterError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RouterError::Internal(e.to_string()))?
}

impl Router {
    /// Starts the shard threads and the commit thread over `store`.
    pub fn start(store: Arc<Store>, config: &Config) -> Result<Self, RouterError> {
        let sessions = Arc::new(Sessions::default());
        let (commit_tx, commit_rx) = sync_channel(COMMIT_QUEUE);
        let commit = CommitThread {
            store: store.clone(),
            sessions: sessions.clone(),
            rx: commit_rx,
            max_batch: config.store.commit_batch,
        };
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| RouterError::Internal(format!("cannot start thread: {e}")))
        };
        let commit_thread = spawn("plover-commit".into(), Box::new(move || commit.run()))?;
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        for i in 0..config.store.shards {
            let (tx, rx) = mpsc::channel(SHARD_QUEUE);
            let shard = Shard {
                store: store.clone(),
                rx,
                commit: commit_tx.clone(),
                recent_capacity: Shard::recent_capacity(COMMIT_QUEUE, config.store.commit_batch),
            };
            threads.push(spawn(
                format!("plover-shard-{i}"),
                Box::new(move || shard.run()),
            )?);
            shards.push(tx);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                presence: Arc::new(Presence::new(store.clone(), config.presence.debounce)),
                store,
                sessions,
                shards,
                commit: commit_tx,
                directory: Mutex::new(()),
                threads: Mutex::new(threads),
                commit_thread: Mutex::new(Some(commit_thread)),
                outbound_queue: config.limits.outbound_queue,
                history_page: config.limits.history_page,
            }),
        })
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

    /// Records a user at their first authenticated connection.
    pub async fn ensure_user(&self, user: &str) -> Result<(), RouterError> {
        let store = self.inner.store.clone();
        let user = user.to_owned();
        blocking(move || {
            store.ensure_user(&user, now_ms())?;
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
        blocking(move || router.open_blocking(&user, target, create)).await
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
                        let _guard = self
                            .inner
                            .directory
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        match store.direct_between(user, &peer)? {
                            Some(id) => id,
                            None => store.create_direct(user, &peer, now_ms())?,
                        }
                    }
                }
            }
        };
        let record = store
            .conversation(conversation)?
            .ok_or(RouterError::NotMember(conversation))?;
        if !record.members.iter().any(|m| m == user) {
            return Err(RouterError::NotMember(conversation));
        }
        Ok(Opened {
            conversation,
            members: record.members,
            last_seq: store.last_seq(conversation)?,
        })
    }

    /// Sequences a message. Waits while the shard's queue is full (backpressure), then returns
    /// a receiver that yields the answer once the message is durable.
    pub async fn send(
        &self,
        conversation: ConversationId,
        from: &str,
        device: &str,
        id: ClientMsgId,
        body: bytes::Bytes,
    ) -> Result<oneshot::Receiver<Result<Sent, RouterError>>, RouterError> {
        let (reply, rx) = oneshot::channel();
        let shard = &self.inner.shards[(conversation % self.inner.shards.len() as u64) as usize];
        let request = SendRequest {
            conversation,
            from: from.to_owned(),
            device: device.to_owned(),
            id,
            body,
            reply,
        };
        shard
            .send(ShardRequest::Send(request))
            .await
            .map_err(|_| RouterError::ShuttingDown)?;
        Ok(rx)
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
        let shard = &self.inner.shards[(conversation % self.inner.shards.len() as u64) as usize];
        shard
            .send(ShardRequest::Marks(MarksRequest {
                conversation,
                user: user.to_owned(),
                delivered,
                read,
            }))
            .await
            .map_err(|_| RouterError::ShuttingDown)
    }

    /// The members of a conversation, if `user` is one of them.
    pub async fn members(
        &self,
        user: &str,
        conversation: ConversationId,
    ) -> Result<Arc<[String]>, RouterError> {
        let store = self.inner.store.clone();
        let user = user.to_owned();
        blocking(move || {
            let record = store
                .conversation(conversation)?
                .ok_or(RouterError::NotMember(conversation))?;
            if !record.members.contains(&user) {
                return Err(RouterError::NotMember(conversation));
            }
            Ok(record.members.into())
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
        blocking(move || {
            let record = store
                .conversation(conversation)?
                .ok_or(RouterError::NotMember(conversation))?;
            if !record.members.contains(&user) {
                return Err(RouterError::NotMember(conversation));
            }
            Ok(store.history(conversation, before, after, limit as usize)?)
        })
        .await
    }

    /// The caller's conversations, by id.
    pub async fn conversations(&self, user: &str) -> Result<Vec<ConversationInfo>, RouterError> {
        let store = self.inner.store.clone();
        let user = user.to_owned();
        blocking(move || {
            let mut out = Vec::new();
            for conversation in store.conversations_of(&user)? {
                let Some(record) = store.conversation(conversation)? else {
                    continue;
                };
                let last_seq = store.last_seq(conversation)?;
                let marks: Vec<Marks> = store
                    .marks(conversation)?
                    .into_iter()
                    .map(|(user, delivered, read)| Marks {
                        user,
                        delivered,
                        read,
                    })
                    .collect();
                let read = marks.iter().find(|m| m.user == user).map_or(0, |m| m.read);
                out.push(ConversationInfo {
                    conversation,
                    kind: record.kind,
                    members: record.members,
                    last_seq,
                    marks,
                    unread: last_seq.saturating_sub(read),
                });
            }
            Ok(out)
        })
        .await
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
        let (barrier, landed) = oneshot::channel();
        let commit = self.inner.commit.clone();
        blocking(move || {
            commit
                .send(CommitItem::Barrier(barrier))
                .map_err(|_| RouterError::ShuttingDown)
        })
        .await?;
        landed.await.map_err(|_| RouterError::ShuttingDown)?;
        let store = self.inner.store.clone();
        let (u, d) = (user.to_owned(), device.to_owned());
        let (stored, head) =
            blocking(move || Ok((store.device_cursor(&u, &d)?, store.log_head(&u)?))).await?;
        let cursor = cursor.or(stored).unwrap_or(0).min(head);
        let feed = DeviceFeed::new(
            user.to_owned(),
            cursor,
            registration,
            rx,
            lagging,
            self.inner.store.clone(),
        );
        Ok(Subscription { cursor, head, feed })
    }

    /// Records that a device has every event up to `cursor`.
    ///
    /// Advisory and never blocking: when the commit queue is full the ack is dropped, and the
    /// device's next ack (which carries a later cursor) takes its place.
    pub fn ack(&self, user: &str, device: &str, cursor: u64) {
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
        if !self.inner.store.is_poisoned() {
            self.inner.presence.record_all_last_seen();
            self.inner.store.flush()?;
        }
        Ok(())
    }
}
