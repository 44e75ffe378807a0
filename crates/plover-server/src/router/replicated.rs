//! The router of a cluster node: every write goes through the replicated log first.
//!
//! ```text
//! request --record--> Replicated::submit --Entry--> appender (cluster/replica.rs)
//!                                                     --> JetStream stream PLOVER_LOG
//! every node: applier (cluster/replica.rs) --Entry, in the stream's order--> Router::apply
//!    --> the one shard (ShardRequest::Log) --> commit thread (CommitItem::Applied)
//!    --> fjall, with the entry's position --> answers (entries from this node) and delivery
//! ```
//!
//! The stream is the cluster's order of writes. Each node applies all of it, in that order,
//! through one shard whose decisions depend only on the entries and on what earlier entries
//! wrote (no clock, no time-based budget), so every node's store holds the same
//! conversations, seqs and user logs. A write is answered once its entry is in the stream
//! (a quorum of NATS servers, fsynced) and this node applied it, so `Sent` carries the
//! message's seq and the sender's log position, and the sender's next read sees its write.
//! Each node delivers the events of every entry to the devices connected to it: that is the
//! cross-node delivery, and a node that missed an event finds it in its store, as a lagging
//! device does on one node.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

use super::pipeline::{CommitItem, Position, Reply, Sent};
use super::shard::{MarksRequest, MemberOp, MembershipRequest, SendRequest, ShardRequest};
use super::timing::Stamps;
use super::{BODY_BYTES_IN_FLIGHT, Router, RouterError};
use crate::persist::{Recorded, SideWrite, Store, StoreError, Writer};
use plover_proto::{ClientMsgId, ConversationId};

/// Entries waiting for the appender before writers wait: about two appends' worth.
pub const LOG_QUEUE: usize = 1024;

/// One write, as the replicated log carries it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Record {
    /// A message to sequence.
    Send {
        /// The conversation.
        conversation: ConversationId,
        /// The sender.
        from: String,
        /// The device it came from.
        device: String,
        /// Its client id (idempotency).
        id: ClientMsgId,
        /// The opaque body.
        body: bytes::Bytes,
        /// Server time at the entry node, Unix ms.
        ts: u64,
    },
    /// A member's marks.
    Marks {
        /// The conversation.
        conversation: ConversationId,
        /// The user.
        user: String,
        /// Delivered up to.
        delivered: u64,
        /// Read up to.
        read: u64,
    },
    /// A membership change, retention change or deletion.
    Membership {
        /// The conversation.
        conversation: ConversationId,
        /// Who asks.
        by: String,
        /// The device it came from.
        device: String,
        /// The change.
        op: MemberOp,
        /// The event's id and time.
        id: ClientMsgId,
        /// Server time at the entry node, Unix ms.
        ts: u64,
    },
    /// A device's acknowledged log position.
    Cursor {
        /// The user.
        user: String,
        /// The device it came from.
        device: String,
        /// The acknowledged position.
        cursor: u64,
    },
    /// A side write (a new user or direct conversation, pushers, last seen, cleared history,
    /// retention sweeps), as recorded by the node that made it.
    Write(Recorded),
    /// Nothing: answered once this node applied everything before it.
    Barrier,
    /// A message that references stored objects (`SendWith`).
    SendWith {
        /// The conversation.
        conversation: ConversationId,
        /// The sender.
        from: String,
        /// The device it came from.
        device: String,
        /// Its client id (idempotency).
        id: ClientMsgId,
        /// The opaque body.
        body: bytes::Bytes,
        /// Server time at the entry node, Unix ms.
        ts: u64,
        /// The objects.
        objects: Vec<plover_proto::ObjectId>,
    },
}

/// An entry of the replicated log: a record, and who waits for it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// The process that appended it (random at each start), so that only it answers.
    pub origin: u64,
    /// Its number in that process.
    pub tag: u64,
    /// The write.
    pub record: Record,
}

/// Who waits for an entry of this process.
enum Waiting {
    Send {
        reply: Reply,
        stamps: Stamps,
        origin: u64,
        held: tokio::sync::OwnedSemaphorePermit,
    },
    Change(Reply),
    Done(oneshot::Sender<Result<(), StoreError>>),
    Barrier(oneshot::Sender<()>),
}

/// Allocates conversation ids cluster-wide (blocking).
pub type Allocate = Box<dyn Fn() -> Result<ConversationId, StoreError> + Send + Sync>;

/// The router's side of the replicated log.
pub(crate) struct Replicated {
    boot: u64,
    next: AtomicU64,
    /// `None` once the appender is gone: nothing waits any more, and nothing new is queued.
    waiting: Mutex<Option<HashMap<u64, Waiting>>>,
    log: mpsc::Sender<Entry>,
    allocate: Allocate,
}

impl Replicated {
    pub(super) fn new(log: mpsc::Sender<Entry>, allocate: Allocate) -> Self {
        Self {
            // A process id that the entries of an earlier run of this node cannot carry.
            boot: boot_id(),
            next: AtomicU64::new(1),
            waiting: Mutex::new(Some(HashMap::new())),
            log,
            allocate,
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Option<HashMap<u64, Waiting>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new entry, its waiter registered; `None` once the appender is gone.
    fn entry(&self, record: Record, waiting: Option<Waiting>) -> Option<Entry> {
        let tag = self.next.fetch_add(1, Ordering::Relaxed);
        let mut map = self.waiting();
        let map = map.as_mut()?;
        if let Some(w) = waiting {
            map.insert(tag, w);
        }
        Some(Entry {
            origin: self.boot,
            tag,
            record,
        })
    }

    fn forget(&self, tag: u64) {
        if let Some(map) = self.waiting().as_mut() {
            map.remove(&tag);
        }
    }

    /// Queues a record for the log; its waiter hears of it once it is applied here.
    async fn submit(&self, record: Record, waiting: Option<Waiting>) -> Result<(), RouterError> {
        let entry = self
            .entry(record, waiting)
            .ok_or(RouterError::ShuttingDown)?;
        let tag = entry.tag;
        if self.log.send(entry).await.is_err() {
            self.forget(tag);
            return Err(RouterError::ShuttingDown);
        }
        Ok(())
    }

    /// The appender stopped: every waiter is answered (the router is shutting down) and
    /// nothing new is queued.
    pub(crate) fn close(&self) {
        let Some(waiting) = self.waiting().take() else {
            return;
        };
        for (_, w) in waiting {
            match w {
                Waiting::Send { reply, .. } | Waiting::Change(reply) => {
                    let _ = reply.send(Err(RouterError::ShuttingDown));
                }
                Waiting::Done(reply) => {
                    let _ = reply.send(Err(StoreError::Stopped));
                }
                Waiting::Barrier(_) => {}
            }
        }
    }

    /// The appender could not append these entries (NATS unreachable past its retries): their
    /// writers are told nothing was stored, though an append whose answer was lost may still
    /// be applied later (a retried send with the same id is then answered with its seq).
    pub(crate) fn failed(&self, tags: impl IntoIterator<Item = (u64, u64)>, why: &str) {
        let mut waiting = self.waiting();
        let Some(waiting) = waiting.as_mut() else {
            return;
        };
        for (origin, tag) in tags {
            if origin != self.boot {
                continue;
            }
            let unavailable = || {
                StoreError::Cluster(format!(
                    "the cluster log did not take the write ({why}); nothing was acknowledged"
                ))
            };
            match waiting.remove(&tag) {
                Some(Waiting::Send { reply, .. }) | Some(Waiting::Change(reply)) => {
                    let _ = reply.send(Err(RouterError::Store(unavailable())));
                }
                Some(Waiting::Done(reply)) => {
                    let _ = reply.send(Err(unavailable()));
                }
                Some(Waiting::Barrier(_)) | None => {}
            }
        }
    }

    fn take(&self, entry: &Entry) -> Option<Waiting> {
        if entry.origin != self.boot {
            return None;
        }
        self.waiting().as_mut()?.remove(&entry.tag)
    }
}

/// A random id for this process (it needs no cryptographic quality, only a negligible
/// chance of repeating): the first half of a random client message id.
fn boot_id() -> u64 {
    let id = ClientMsgId::random().0;
    u64::from_le_bytes([id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7]])
}

/// The writer of a cluster node: a side write is recorded, appended to the log, and answered
/// once this node applied it.
pub(super) struct ReplicatedWriter {
    pub(super) store: std::sync::Arc<Store>,
    pub(super) replicated: std::sync::Arc<Replicated>,
}

impl Writer for ReplicatedWriter {
    fn write(&self, write: SideWrite) -> Result<(), StoreError> {
        let mut recorder = self.store.recorder();
        write(&mut recorder);
        let recorded = recorder.recorded().unwrap_or_default();
        if recorded.ops.is_empty() {
            return Ok(());
        }
        let (reply, done) = oneshot::channel();
        let entry = self
            .replicated
            .entry(Record::Write(recorded), Some(Waiting::Done(reply)))
            .ok_or(StoreError::Stopped)?;
        let tag = entry.tag;
        if self.replicated.log.blocking_send(entry).is_err() {
            self.replicated.forget(tag);
            return Err(StoreError::Stopped);
        }
        done.blocking_recv().map_err(|_| StoreError::Stopped)?
    }

    fn allocate_conversation(&self) -> Option<Result<ConversationId, StoreError>> {
        Some((self.replicated.allocate)())
    }
}

impl Router {
    /// Whether this router is a cluster node's (its writes go through the log).
    pub fn in_cluster(&self) -> bool {
        self.replicated().is_some()
    }

    pub(super) fn replicated(&self) -> Option<&std::sync::Arc<Replicated>> {
        self.inner.replicated.as_ref()
    }

    /// A send, through the log.
    pub(super) async fn send_replicated(
        &self,
        replicated: &Replicated,
        request: SendRequest,
    ) -> Result<(), RouterError> {
        // A message without objects keeps the entry it always had.
        let record = if request.objects.is_empty() {
            Record::Send {
                conversation: request.conversation,
                from: request.from,
                device: request.device,
                id: request.id,
                body: request.body,
                ts: super::now_ms(),
            }
        } else {
            Record::SendWith {
                conversation: request.conversation,
                from: request.from,
                device: request.device,
                id: request.id,
                body: request.body,
                ts: super::now_ms(),
                objects: request.objects,
            }
        };
        let waiting = Waiting::Send {
            reply: request.reply,
            stamps: request.stamps,
            origin: request.origin,
            held: request.held,
        };
        replicated.submit(record, Some(waiting)).await
    }

    /// Marks, through the log (fire and forget, as on one node).
    pub(super) async fn marks_replicated(
        &self,
        replicated: &Replicated,
        request: MarksRequest,
    ) -> Result<(), RouterError> {
        let record = Record::Marks {
            conversation: request.conversation,
            user: request.user,
            delivered: request.delivered,
            read: request.read,
        };
        replicated.submit(record, None).await
    }

    /// A membership change, through the log.
    pub(super) async fn change_replicated(
        &self,
        replicated: &Replicated,
        request: MembershipRequest,
    ) -> Result<(), RouterError> {
        let record = Record::Membership {
            conversation: request.conversation,
            by: request.by,
            device: request.device,
            op: request.op,
            id: request.id,
            ts: super::now_ms(),
        };
        replicated
            .submit(record, Some(Waiting::Change(request.reply)))
            .await
    }

    /// A cursor, through the log; dropped when the log's queue is full (the device's next
    /// ack carries a later one).
    pub(super) fn ack_replicated(
        &self,
        replicated: &Replicated,
        user: &str,
        device: &str,
        cursor: u64,
    ) {
        let entry = replicated.entry(
            Record::Cursor {
                user: user.to_owned(),
                device: device.to_owned(),
                cursor,
            },
            None,
        );
        if let Some(entry) = entry {
            let _ = replicated.log.try_send(entry);
        }
    }

    /// Waits until this node applied everything the log held when it was called (a device's
    /// cursor acknowledged on another node, a message sent there).
    pub(super) async fn barrier_replicated(
        &self,
        replicated: &Replicated,
    ) -> Result<(), RouterError> {
        let (reply, done) = oneshot::channel();
        replicated
            .submit(Record::Barrier, Some(Waiting::Barrier(reply)))
            .await?;
        done.await.map_err(|_| RouterError::ShuttingDown)
    }

    /// Applies the entries of one message of the replicated log (stream sequence `seq`) from
    /// index `from` on, in order. Waits while the shard's queue is full.
    pub async fn apply(&self, seq: u64, from: u32, entries: Vec<Entry>) -> Result<(), RouterError> {
        let Some(replicated) = self.replicated() else {
            return Err(RouterError::Internal("not a cluster node".into()));
        };
        let shard = self.shard(0).clone();
        for (index, entry) in entries.into_iter().enumerate().skip(from as usize) {
            let at = Position {
                seq,
                index: index as u32,
            };
            let waiting = replicated.take(&entry);
            let record = match entry.record {
                Record::Send {
                    conversation,
                    from,
                    device,
                    id,
                    body,
                    ts,
                } => Record::SendWith {
                    conversation,
                    from,
                    device,
                    id,
                    body,
                    ts,
                    objects: Vec::new(),
                },
                other => other,
            };
            let request = match record {
                Record::SendWith {
                    conversation,
                    from,
                    device,
                    id,
                    body,
                    ts,
                    objects,
                } => {
                    let (reply, stamps, origin, held, notify) = match waiting {
                        Some(Waiting::Send {
                            reply,
                            stamps,
                            origin,
                            held,
                        }) => (reply, stamps, origin, held, true),
                        _ => {
                            let share = u32::try_from(body.len().clamp(1, BODY_BYTES_IN_FLIGHT))
                                .unwrap_or(u32::MAX);
                            let held = self
                                .inner
                                .applied_bodies
                                .clone()
                                .acquire_many_owned(share)
                                .await
                                .map_err(|_| RouterError::ShuttingDown)?;
                            let (reply, _) = oneshot::channel::<Result<Sent, RouterError>>();
                            let stamps = Stamps::new(std::time::Instant::now());
                            (reply, stamps, 0, held, false)
                        }
                    };
                    ShardRequest::Send(SendRequest {
                        conversation,
                        from,
                        device,
                        id,
                        body,
                        reply,
                        stamps,
                        origin,
                        held,
                        ts,
                        notify,
                        objects,
                    })
                }
                // Made a `SendWith` above.
                Record::Send { .. } => {
                    return Err(RouterError::Internal(
                        "a Send entry left unconverted".into(),
                    ));
                }
                Record::Marks {
                    conversation,
                    user,
                    delivered,
                    read,
                } => ShardRequest::Marks(MarksRequest {
                    conversation,
                    user,
                    delivered,
                    read,
                }),
                Record::Membership {
                    conversation,
                    by,
                    device,
                    op,
                    id,
                    ts,
                } => {
                    let reply = match waiting {
                        Some(Waiting::Change(reply)) => reply,
                        _ => oneshot::channel().0,
                    };
                    ShardRequest::Membership(MembershipRequest {
                        conversation,
                        by,
                        device,
                        op,
                        reply,
                        id,
                        ts,
                    })
                }
                Record::Cursor {
                    user,
                    device,
                    cursor,
                } => ShardRequest::Pass(CommitItem::Cursor {
                    user,
                    device,
                    cursor,
                }),
                Record::Write(recorded) => {
                    let mut reply = match waiting {
                        Some(Waiting::Done(reply)) => Some(reply),
                        _ => None,
                    };
                    // An operator asked every node to close connections: this node closes
                    // its own once the write (a revocation, say) is in its store.
                    let kicks = recorded.kicks();
                    if !kicks.is_empty() {
                        let (done, written) = oneshot::channel();
                        let (waiter, router) = (reply.take(), self.clone());
                        tokio::spawn(async move {
                            let result = written.await.unwrap_or(Err(StoreError::Stopped));
                            if result.is_ok() {
                                for kick in kicks {
                                    router.kick(kick);
                                }
                            }
                            if let Some(w) = waiter {
                                let _ = w.send(result);
                            }
                        });
                        reply = Some(done);
                    }
                    // Pushers changed (on any node): this node's notifier reads them again
                    // once they are written, so that it can notify for what it takes.
                    let users = recorded.push_users();
                    if !users.is_empty() {
                        let (done, written) = oneshot::channel();
                        let (waiter, notifier) = (reply.take(), self.inner.notifier.clone());
                        tokio::spawn(async move {
                            let result = written.await.unwrap_or(Err(StoreError::Stopped));
                            if result.is_ok() {
                                let read =
                                    tokio::task::spawn_blocking(move || notifier.refresh(&users))
                                        .await;
                                if !matches!(read, Ok(Ok(()))) {
                                    tracing::warn!("pushers changed elsewhere could not be read");
                                }
                            }
                            if let Some(w) = waiter {
                                let _ = w.send(result);
                            }
                        });
                        reply = Some(done);
                    }
                    let write: SideWrite = Box::new(move |batch| {
                        if let Err(e) = batch.apply_recorded(&recorded) {
                            tracing::error!(error = %e, "a replicated write could not be checked");
                        }
                    });
                    ShardRequest::Write { write, reply }
                }
                Record::Barrier => {
                    let reply = match waiting {
                        Some(Waiting::Barrier(reply)) => reply,
                        _ => oneshot::channel().0,
                    };
                    ShardRequest::Pass(CommitItem::Barrier(reply))
                }
            };
            shard
                .send(ShardRequest::Log {
                    at,
                    request: Box::new(request),
                })
                .await
                .map_err(|_| RouterError::ShuttingDown)?;
        }
        Ok(())
    }

    /// The cluster's appender could not append these entries (origin, tag): see
    /// `Replicated::failed`.
    pub fn log_failed(&self, entries: impl IntoIterator<Item = (u64, u64)>, why: &str) {
        if let Some(r) = self.replicated() {
            r.failed(entries, why);
        }
    }

    /// Waits until everything handed to [`Router::apply`] so far is committed to the store.
    pub async fn settled(&self) -> Result<(), RouterError> {
        let (reply, done) = oneshot::channel();
        self.shard(0)
            .send(ShardRequest::Pass(CommitItem::Barrier(reply)))
            .await
            .map_err(|_| RouterError::ShuttingDown)?;
        done.await.map_err(|_| RouterError::ShuttingDown)
    }

    /// The cluster's appender stopped: see `Replicated::close`.
    pub fn log_closed(&self) {
        if let Some(r) = self.replicated() {
            r.close();
        }
    }

    /// The last entry this node's store holds (stream sequence, index), if any.
    pub fn applied(&self) -> Result<Option<(u64, u32)>, RouterError> {
        Ok(self.inner.store.applied()?)
    }
}
