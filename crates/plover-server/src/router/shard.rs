//! A sequencer shard: the single owner of a set of conversations.
//!
//! Each shard is an OS thread (it reads the store, which blocks) fed by a bounded channel. It
//! owns, for each of its conversations, the last sequence number, the members and their roles,
//! and every member's delivered/read marks. For a send it checks membership, answers a retry of
//! a client id with the original sequence number, assigns the next one, and queues the message
//! for the commit thread; membership changes and marks go the same way, so a conversation's
//! messages, membership events and receipts are ordered by one owner.
//!
//! The states are a bounded cache ([`Generations`]): a conversation unused for a while is
//! dropped and loaded from the store again when next used, but never while something it
//! queued may still be on its way to the store.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use tokio::sync::{mpsc, oneshot};

use super::RouterError;
use super::cache::Generations;
use super::pipeline::{CommitItem, ERASED, MembershipWrite, Position, Reply, Sent};
use super::timing::Stamps;
use crate::metrics::names;
use crate::persist::{ConversationRecord, MemberRecord, Store, tombstone};
use plover_proto::{
    ClientMsgId, ConversationChange, ConversationId, ConversationKind, Message, Receipt, Retention,
};

/// A request to a shard.
pub(super) enum ShardRequest {
    Send(SendRequest),
    Marks(MarksRequest),
    Membership(MembershipRequest),
    /// An entry of the cluster's replicated log, at `at`: handled as `request`, and the item
    /// it makes carries `at` to the commit thread, which records it as applied in the same
    /// batch (`replicated.rs`).
    Log {
        at: Position,
        request: Box<ShardRequest>,
    },
    /// Hands an item to the commit thread in its turn (a replicated cursor or barrier).
    Pass(CommitItem),
    /// A replicated side write: committed before the next request is handled, since later
    /// requests may read what it wrote (a new user, a new direct conversation).
    Write {
        write: crate::persist::SideWrite,
        reply: Option<oneshot::Sender<Result<(), crate::persist::StoreError>>>,
    },
    Stop,
}

/// A member reports that messages reached a device (`delivered`) or were read (`read`).
pub(super) struct MarksRequest {
    pub(super) conversation: ConversationId,
    pub(super) user: String,
    pub(super) delivered: u64,
    pub(super) read: u64,
}

/// One message to sequence.
pub(super) struct SendRequest {
    pub(super) conversation: ConversationId,
    pub(super) from: String,
    pub(super) device: String,
    pub(super) id: ClientMsgId,
    pub(super) body: bytes::Bytes,
    pub(super) reply: Reply,
    /// When its frame arrived and when it was handed to this shard.
    pub(super) stamps: Stamps,
    /// The sending connection's feed (see [`Delivery::origin`]), 0 if it has none.
    pub(super) origin: u64,
    /// The body's share of the bytes in flight.
    pub(super) held: tokio::sync::OwnedSemaphorePermit,
    /// Its server time, Unix ms, when it was taken elsewhere (a cluster's entry node); 0 for
    /// now.
    pub(super) ts: u64,
    /// Whether this node offers it to the members' pushers (in a cluster, only the node
    /// where it was sent does).
    pub(super) notify: bool,
    /// The stored objects it references (`SendWith`), checked by the caller.
    pub(super) objects: Vec<plover_proto::ObjectId>,
}

/// A change to a group's membership.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum MemberOp {
    /// Create the group with this record (its members, the creator an admin).
    Create(ConversationRecord),
    /// Add a member (admins).
    Add(String),
    /// Remove a member (admins; removing oneself is leaving).
    Remove(String),
    /// Leave.
    Leave,
    /// Make a member an admin (admins).
    Promote(String),
    /// Set the retention policy (a group's admins; either member of a direct conversation).
    Retention(Retention),
    /// Delete one of the caller's own messages for everyone.
    Delete(u64),
}

/// A membership change to sequence; answered with its seq, or 0 when it changed nothing.
pub(super) struct MembershipRequest {
    pub(super) conversation: ConversationId,
    pub(super) by: String,
    pub(super) device: String,
    pub(super) op: MemberOp,
    pub(super) reply: Reply,
    /// The event's id and server time (0: now), chosen where the change was asked for, so
    /// that every node of a cluster stores the same event.
    pub(super) id: ClientMsgId,
    pub(super) ts: u64,
}

struct ConvState {
    last_seq: u64,
    record: ConversationRecord,
    names: Arc<[String]>,
    /// Each member's (delivered, read) marks.
    marks: HashMap<String, (u64, u64)>,
    /// Under `until_delivered`: every body up to here has been removed.
    erased: u64,
    /// Which policy held when (a change applies to the messages after it).
    policies: crate::persist::Policies,
    /// The number of the last commit item queued for this conversation (see
    /// [`Owned::queued`]): until it is surely durable, the store cannot rebuild this state.
    queued: u64,
}

type IdemKey = (ConversationId, String, ClientMsgId);

/// Something to commit and who hears of it.
type Recipients<T> = (T, Arc<[String]>);

/// Limits a shard enforces.
#[derive(Debug, Clone, Copy)]
pub(super) struct ShardLimits {
    /// Most members a group may have.
    pub(super) max_group: usize,
    /// Largest conversation whose receipts are pushed to every member.
    pub(super) receipt_fanout: usize,
}

pub(super) struct Shard {
    pub(super) store: Arc<Store>,
    pub(super) rx: mpsc::Receiver<ShardRequest>,
    pub(super) commit: SyncSender<CommitItem>,
    /// How many recently sequenced client ids to remember: see [`Shard::recent_capacity`].
    pub(super) recent_capacity: usize,
    /// How many members the conversation states held may have in all (see [`Generations`]).
    pub(super) cached_members: usize,
    /// The shard's number, for its metrics.
    pub(super) index: usize,
    /// Each user's budget of store writes (`limits.writes_per_second`), charged here where
    /// a message's fan-out is known.
    pub(super) writes: Arc<super::limiter::SendLimiter>,
    pub(super) limits: ShardLimits,
    /// In a cluster every node runs this shard over the same replicated log, and must decide
    /// everything alike: no time-based budget (the entry node charges its own), and a read
    /// of a stored message waits for what was queued before it.
    pub(super) replicated: bool,
}

pub(super) use crate::clock::now_ms;

/// The shard's state.
struct Owned {
    convs: Generations<ConversationId, ConvState>,
    /// Commit items this shard has queued so far.
    queued: u64,
    /// Client ids sequenced recently, so that a retry of a message still in flight (not yet
    /// in the store) is recognised.
    recent: HashMap<IdemKey, Sent>,
    order: VecDeque<IdemKey>,
}

impl Shard {
    /// How many recent ids a shard must remember: more than can be in flight between it and
    /// durability. The commit channel holds at most `channel` items and one batch at most
    /// `batch`; once a shard has queued more than `channel + batch` items after a message,
    /// the commit thread has taken items queued after it into a later batch than the
    /// message's, so the message's batch has been committed (or the store has failed and
    /// refuses everything). From then on the store itself answers retries.
    pub(super) fn recent_capacity(channel: usize, batch: usize) -> usize {
        channel + batch + 1
    }

    pub(super) fn run(mut self) {
        let mut owned = Owned {
            // A state's memory is mostly per member: names, roles, marks.
            convs: Generations::new(self.cached_members, |state: &ConvState| state.names.len()),
            queued: 0,
            recent: HashMap::new(),
            order: VecDeque::new(),
        };
        while let Some(request) = self.rx.blocking_recv() {
            let (at, request) = match request {
                ShardRequest::Log { at, request } => (Some(at), *request),
                other => (None, other),
            };
            let conversation = match &request {
                ShardRequest::Send(req) => req.conversation,
                ShardRequest::Marks(req) => req.conversation,
                ShardRequest::Membership(req) => req.conversation,
                _ => 0,
            };
            let mut wait = None;
            let item = match request {
                ShardRequest::Send(req) => self.sequence(req, &mut owned),
                ShardRequest::Marks(req) => self.marks(req, &mut owned),
                ShardRequest::Membership(req) => self.membership(req, &mut owned),
                ShardRequest::Pass(item) => Some(item),
                ShardRequest::Write { write, reply } => {
                    let (done, landed) = oneshot::channel();
                    wait = Some((landed, reply));
                    Some(CommitItem::Side { write, reply: done })
                }
                ShardRequest::Log { .. } => {
                    tracing::error!("a log entry nested in a log entry; ignored");
                    None
                }
                ShardRequest::Stop => break,
            };
            let Some(item) = item else {
                continue;
            };
            let item = match at {
                Some(at) => CommitItem::Applied {
                    item: Box::new(item),
                    at,
                },
                None => item,
            };
            if self.commit.send(item).is_err() {
                // The commit thread is gone: the router is shutting down. The reply inside the
                // item was dropped, which the sender sees as `ShuttingDown`.
                break;
            }
            owned.queued += 1;
            if let Some(state) = owned.convs.get_mut(&conversation) {
                state.queued = owned.queued;
            }
            if let Some((landed, reply)) = wait {
                let result = landed
                    .blocking_recv()
                    .unwrap_or(Err(crate::persist::StoreError::Stopped));
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Waits until everything this shard queued is committed (or failed), so that the store
    /// answers reads of it.
    fn settle(&self) {
        let (done, landed) = oneshot::channel();
        if self.commit.send(CommitItem::Barrier(done)).is_ok() {
            let _ = landed.blocking_recv();
        }
    }

    fn gauge(&self, convs: &Generations<ConversationId, ConvState>) {
        let shard = self.index.to_string();
        metrics::gauge!(names::CACHED_CONVERSATIONS, "shard" => shard.clone())
            .set(convs.len() as f64);
        metrics::gauge!(names::CACHED_MEMBERS, "shard" => shard).set(convs.weight() as f64);
    }

    /// Makes room for one more conversation state. A state may go once the commit thread has
    /// surely committed the last item it queued: by the argument of
    /// [`Shard::recent_capacity`], once more than that many items have been queued after it.
    fn make_room(&self, owned: &mut Owned) {
        let durable = owned.queued.saturating_sub(self.recent_capacity as u64);
        let dropped = owned.convs.make_room(|state| state.queued > durable);
        if dropped > 0 {
            metrics::counter!(names::CACHE_DROPS, "cache" => "conversations")
                .increment(dropped as u64);
            tracing::debug!(
                dropped,
                held = owned.convs.len(),
                "conversation states dropped"
            );
        }
    }

    /// The state of a conversation, loaded from the store on first use.
    fn state<'a>(
        &self,
        owned: &'a mut Owned,
        conv: ConversationId,
    ) -> Result<&'a mut ConvState, RouterError> {
        if !owned.convs.contains_key(&conv) {
            let state = self.load(conv)?;
            self.make_room(owned);
            owned.convs.insert(conv, state);
            self.gauge(&owned.convs);
        }
        owned
            .convs
            .get_mut(&conv)
            .ok_or_else(|| RouterError::Internal("a held state vanished".into()))
    }

    fn load(&self, conv: ConversationId) -> Result<ConvState, RouterError> {
        let record = self
            .store
            .conversation(conv)?
            .ok_or(RouterError::NotMember(conv))?;
        let marks = self
            .store
            .marks(conv)?
            .into_iter()
            .map(|(user, d, r)| (user, (d, r)))
            .collect();
        Ok(ConvState {
            last_seq: self.store.last_seq(conv)?,
            names: record.names().into(),
            erased: self.store.watermark(ERASED, conv)?,
            policies: self.store.policies(conv)?,
            record,
            marks,
            queued: 0,
        })
    }

    fn sequence(&mut self, req: SendRequest, owned: &mut Owned) -> Option<CommitItem> {
        let dequeued = std::time::Instant::now();
        if self.store.is_poisoned() {
            let _ = req.reply.send(Err(RouterError::Unavailable));
            return None;
        }
        let key: IdemKey = (req.conversation, req.from, req.id);
        if let Some(sent) = owned.recent.get(&key) {
            return Some(CommitItem::Wait {
                sent: sent.clone(),
                reply: req.reply,
            });
        }
        let state = match self.state(owned, req.conversation) {
            Ok(s) => s,
            Err(e) => {
                let _ = req.reply.send(Err(e));
                return None;
            }
        };
        if !state.record.is_member(&key.1) {
            let _ = req
                .reply
                .send(Err(RouterError::NotMember(req.conversation)));
            return None;
        }
        match self.store.idempotent(key.0, &key.1, &key.2) {
            Ok(Some((seq, ts))) => {
                let _ = req.reply.send(Ok(Sent {
                    seq,
                    ts,
                    log: 0,
                    timing: None,
                }));
                return None;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = req.reply.send(Err(e.into()));
                return None;
            }
        }

        // Nobody writes across a block in a direct conversation (a retry of a message sent
        // before the block was answered above, as it was then). (In a cluster the node that
        // takes the message checks, before the log: every node must apply it alike.)
        if !self.replicated
            && state.record.kind == ConversationKind::Direct
            && let Err(e) = direct_allowed(&self.store, &key.1, &state.names)
        {
            let _ = req.reply.send(Err(e));
            return None;
        }

        // On one node, the objects it references must still be stored when it takes a seq:
        // the collector moves an object out of `o` before it deletes anything, then waits
        // for every shard (`Router::settle_all`) and looks for references again, so a message
        // either is refused here or is seen there. (In a cluster the check at `SendWith` and
        // the collector's wait for the log stand in; ARCHITECTURE.md, "Media".)
        if !self.replicated {
            for object in &req.objects {
                match self.store.object(object) {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        let _ = req.reply.send(Err(RouterError::NoObject(*object)));
                        return None;
                    }
                    Err(e) => {
                        let _ = req.reply.send(Err(e.into()));
                        return None;
                    }
                }
            }
        }

        // A message writes itself, its idempotency key, the sender's marks and a log entry
        // per member: charged before it is given a seq, so a refusal leaves nothing behind.
        let cost = 3 + state.names.len();
        if !self.replicated && !self.writes.allow_n(&key.1, cost as f64) {
            let _ = req.reply.send(Err(write_limit(&self.writes, cost)));
            return None;
        }
        state.last_seq += 1;
        let sent = Sent {
            seq: state.last_seq,
            ts: if req.ts > 0 { req.ts } else { now_ms() },
            log: 0,
            timing: None,
        };
        let msg = Message {
            conversation: key.0,
            seq: sent.seq,
            from: key.1.clone(),
            device: req.device,
            ts: sent.ts,
            id: key.2,
            body: req.body,
            change: None,
        };
        // Sending counts as having read (and received) everything up to one's own message.
        state.marks.insert(msg.from.clone(), (sent.seq, sent.seq));
        // Writing in a conversation one has not accepted (a message request) accepts it.
        let answered = match self.store.request(key.0, &msg.from) {
            Ok(request) => request.is_some(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a message request; it stays");
                false
            }
        };
        let recipients = state.names.clone();
        // Its references to objects; under `until_delivered` they stay until every other
        // member fetched the objects (the body may go before that).
        let refs = (!req.objects.is_empty()).then(|| {
            let pending = match state.record.retention {
                Retention::UntilDelivered => recipients
                    .iter()
                    .filter(|m| **m != msg.from)
                    .cloned()
                    .collect(),
                _ => Vec::new(),
            };
            Box::new(crate::persist::MediaRefs {
                objects: req.objects,
                pending,
            })
        });
        owned.recent.insert(key.clone(), sent.clone());
        owned.order.push_back(key);
        while owned.order.len() > self.recent_capacity {
            if let Some(old) = owned.order.pop_front() {
                owned.recent.remove(&old);
            }
        }
        Some(CommitItem::Message {
            msg,
            recipients,
            membership: None,
            refs,
            answered,
            reply: req.reply,
            since: req.stamps.queued,
            stamps: Some(Stamps {
                dequeued,
                sequenced: std::time::Instant::now(),
                ..req.stamps
            }),
            origin: req.origin,
            held: Some(req.held),
            notify: req.notify,
        })
    }

    /// Moves a member's marks forward (never back, never past the last message) and queues
    /// the change; returns nothing when the marks did not move.
    fn marks(&mut self, req: MarksRequest, owned: &mut Owned) -> Option<CommitItem> {
        if self.store.is_poisoned() {
            return None;
        }
        let fanout = self.limits.receipt_fanout;
        let state = match self.state(owned, req.conversation) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "marks for an unknown conversation");
                return None;
            }
        };
        if !state.record.is_member(&req.user) {
            return None;
        }
        let (delivered, read) = state.marks.get(&req.user).copied().unwrap_or((0, 0));
        // Reading implies having received.
        let new_read = read.max(req.read.min(state.last_seq));
        let new_delivered = delivered
            .max(req.delivered.min(state.last_seq))
            .max(new_read);
        if (new_delivered, new_read) == (delivered, read) {
            return None;
        }
        let read_moved = new_read != read;
        // The other members learn of every move while the conversation is small; in a large
        // group that would be members² events per message, so there the marks are stored and
        // served on request, and only the member's own devices are told their read state.
        // (In a large group that is at most the member, decided without walking the members:
        // a group of 1000 sends up to 1000 marks per message.)
        let recipients: Arc<[String]> = if state.names.len() <= fanout {
            state
                .names
                .iter()
                .filter(|m| **m != req.user || read_moved)
                .cloned()
                .collect()
        } else if read_moved {
            Arc::from([req.user.clone()])
        } else {
            Arc::from([])
        };
        // The marks record and a log entry per member told. Past the budget the move is
        // dropped before it changes anything; the device's next report carries it.
        if !self.replicated
            && !self
                .writes
                .allow_n(&req.user, (1 + recipients.len()) as f64)
        {
            tracing::debug!(user = %req.user, "marks dropped: over the write budget");
            return None;
        }
        state
            .marks
            .insert(req.user.clone(), (new_delivered, new_read));
        // Who may not see this member's read mark: everyone, while the member has not
        // accepted the conversation (a message request); else those the member blocked.
        let masked = if !read_moved || recipients.iter().all(|r| *r == req.user) {
            Vec::new()
        } else {
            match hidden_from(&self.store, req.conversation, &req.user, &recipients) {
                Ok(masked) => masked,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read relations; read mark hidden");
                    recipients
                        .iter()
                        .filter(|r| **r != req.user)
                        .cloned()
                        .collect()
                }
            }
        };
        let erase = erasable(state);
        if self.replicated && erase.is_some() {
            // The commit thread erases bodies it reads from the store: the messages queued
            // just before must be there, on every node alike, however its batches fall.
            self.settle();
        }
        Some(CommitItem::Marks {
            receipt: Receipt {
                conversation: req.conversation,
                user: req.user,
                delivered: new_delivered,
                read: new_read,
            },
            recipients,
            masked,
            erase,
        })
    }

    /// Deletes one of `by`'s messages for everyone: a tombstone in its place, and a
    /// `Deleted` event for every member's devices.
    fn delete(
        &mut self,
        conv: ConversationId,
        by: &str,
        seq: u64,
        owned: &mut Owned,
    ) -> Result<Option<Recipients<Message>>, RouterError> {
        let state = self.state(owned, conv)?;
        if !state.record.is_member(by) {
            return Err(RouterError::NotMember(conv));
        }
        let names = state.names.clone();
        let msg = self.store.message(conv, seq)?.ok_or_else(|| {
            RouterError::Invalid(format!("no message {seq} in conversation {conv}"))
        })?;
        if msg.from != by || msg.change.is_some() && msg.change != Some(ConversationChange::Erased)
        {
            return Err(RouterError::Forbidden(
                "only a message's sender can delete it for everyone".into(),
            ));
        }
        if msg.change.is_some() {
            // Already gone.
            return Ok(None);
        }
        Ok(Some((tombstone(&msg), names)))
    }

    /// Carries out a membership change, or answers why not.
    fn membership(&mut self, req: MembershipRequest, owned: &mut Owned) -> Option<CommitItem> {
        if self.store.is_poisoned() {
            let _ = req.reply.send(Err(RouterError::Unavailable));
            return None;
        }
        // The change's record, its event and a log entry per member.
        let members = match &req.op {
            MemberOp::Create(record) => record.members.len(),
            _ => self
                .state(owned, req.conversation)
                .map_or(0, |s| s.names.len()),
        };
        if !self.replicated && !self.writes.allow_n(&req.by, (3 + members) as f64) {
            let _ = req.reply.send(Err(write_limit(&self.writes, 3 + members)));
            return None;
        }
        if let MemberOp::Delete(seq) = req.op {
            if self.replicated {
                // The message may have been queued just before: read it from the store only
                // once it is there, as every node does.
                self.settle();
            }
            return match self.delete(req.conversation, &req.by, seq, owned) {
                Ok(Some((tombstone, recipients))) => Some(CommitItem::Deleted {
                    tombstone,
                    recipients,
                    reply: req.reply,
                }),
                Ok(None) => {
                    let _ = req.reply.send(Ok(Sent {
                        seq: 0,
                        ts: 0,
                        log: 0,
                        timing: None,
                    }));
                    None
                }
                Err(e) => {
                    let _ = req.reply.send(Err(e));
                    None
                }
            };
        }
        match self.change(&req.op, req.conversation, &req.by, owned) {
            Ok(Some((seq, change, write, recipients))) => {
                let ts = if req.ts > 0 { req.ts } else { now_ms() };
                let msg = Message {
                    conversation: req.conversation,
                    seq,
                    from: req.by,
                    device: req.device,
                    ts,
                    id: req.id,
                    body: bytes::Bytes::new(),
                    change: Some(change),
                };
                Some(CommitItem::Message {
                    msg,
                    recipients,
                    membership: Some(Box::new(write)),
                    refs: None,
                    answered: false,
                    reply: req.reply,
                    since: std::time::Instant::now(),
                    stamps: None,
                    origin: 0,
                    held: None,
                    notify: false,
                })
            }
            Ok(None) => {
                let _ = req.reply.send(Ok(Sent {
                    seq: 0,
                    ts: 0,
                    log: 0,
                    timing: None,
                }));
                None
            }
            Err(e) => {
                let _ = req.reply.send(Err(e));
                None
            }
        }
    }

    /// Applies `op` to the conversation's state. Returns the event's seq, the change, what to
    /// write, and who hears of it; `None` when nothing changes.
    #[expect(
        clippy::type_complexity,
        reason = "a private tuple read once by the caller"
    )]
    fn change(
        &self,
        op: &MemberOp,
        conv: ConversationId,
        by: &str,
        owned: &mut Owned,
    ) -> Result<Option<(u64, ConversationChange, MembershipWrite, Arc<[String]>)>, RouterError>
    {
        let max_group = self.limits.max_group;
        if let MemberOp::Create(record) = op {
            if owned.convs.contains_key(&conv) || self.store.conversation(conv)?.is_some() {
                return Err(RouterError::Internal(format!("conversation {conv} exists")));
            }
            // As for `Add`: nobody may bring in someone who blocked them, and strangers come
            // in as requests.
            let mut requests = Vec::new();
            for member in record.names().into_iter().filter(|m| m != by) {
                if self.store.blocks(&member, by)? {
                    return Err(RouterError::Forbidden(NOT_ALLOWED.into()));
                }
                if !self.store.share_conversation(by, &member)? {
                    requests.push((member, Some(by.to_owned())));
                }
            }
            let names: Arc<[String]> = record.names().into();
            let state = ConvState {
                last_seq: 1,
                record: record.clone(),
                names: names.clone(),
                marks: HashMap::new(),
                erased: 0,
                policies: crate::persist::Policies::default(),
                queued: 0,
            };
            self.make_room(owned);
            owned.convs.insert(conv, state);
            self.gauge(&owned.convs);
            // A large group's members would not fit in one event (1,024 names of 64 bytes
            // are 66 KB): they are paged with `Members` instead, as for `Opened`.
            let inline = record.members.len() <= plover_proto::INLINE_MEMBERS;
            let change = ConversationChange::Created {
                title: record.title.clone(),
                members: if inline { record.names() } else { Vec::new() },
            };
            let write = MembershipWrite {
                record: record.clone(),
                added: record.names(),
                removed: Vec::new(),
                requests,
                policies: None,
            };
            return Ok(Some((1, change, write, names)));
        }

        let store = self.store.clone();
        let state = self.state(owned, conv)?;
        let is_group = state.record.kind == ConversationKind::Group;
        if !is_group && !matches!(op, MemberOp::Retention(_)) {
            return Err(RouterError::Invalid(format!(
                "conversation {conv} is not a group"
            )));
        }
        let actor = state
            .record
            .member(by)
            .ok_or(RouterError::NotMember(conv))?
            .clone();
        // In a direct conversation both members are equals; in a group, admins decide.
        let must_be_admin = |what: &str| {
            if actor.admin || !is_group {
                Ok(())
            } else {
                Err(RouterError::Forbidden(format!("only admins can {what}")))
            }
        };
        let seq = state.last_seq + 1;
        let before: Arc<[String]> = state.names.clone();
        let mut record = state.record.clone();
        let mut requests = Vec::new();
        let mut policies = None;
        let (change, added, removed) = match op {
            MemberOp::Create(_) | MemberOp::Delete(_) => unreachable_create()?,
            MemberOp::Retention(policy) => {
                must_be_admin("change the retention policy")?;
                check_retention(*policy)?;
                if record.retention == *policy {
                    return Ok(None);
                }
                // Not retroactive: the new policy holds for the messages after this event.
                policies = Some(state.policies.changed(seq + 1, record.retention, *policy));
                record.retention = *policy;
                let change = ConversationChange::Retention { policy: *policy };
                (change, Vec::new(), Vec::new())
            }
            MemberOp::Add(user) => {
                must_be_admin("add members")?;
                if record.is_member(user) {
                    return Ok(None);
                }
                if record.members.len() >= max_group {
                    return Err(RouterError::Limit(format!(
                        "the group has {} members, the most allowed",
                        record.members.len()
                    )));
                }
                if !store.user_exists(user)? {
                    return Err(RouterError::UnknownUser(user.clone()));
                }
                // The same answer as for anything else not allowed: it does not tell `by`
                // that `user` blocked them.
                if store.blocks(user, by)? {
                    return Err(RouterError::Forbidden(NOT_ALLOWED.into()));
                }
                // Someone who shares no conversation with `user` brings them in as a request.
                if !store.share_conversation(by, user)? {
                    requests.push((user.clone(), Some(by.to_owned())));
                }
                record.upsert(MemberRecord {
                    user: user.clone(),
                    admin: false,
                    since: seq,
                });
                let change = ConversationChange::Added { user: user.clone() };
                (change, vec![user.clone()], Vec::new())
            }
            MemberOp::Remove(user) if user == by => leave(&mut record, by),
            MemberOp::Remove(user) => {
                must_be_admin("remove members")?;
                if !record.remove(user) {
                    return Ok(None);
                }
                let change = ConversationChange::Removed { user: user.clone() };
                (change, Vec::new(), vec![user.clone()])
            }
            MemberOp::Leave => leave(&mut record, by),
            MemberOp::Promote(user) => {
                must_be_admin("promote members")?;
                let Some(member) = record.member(user) else {
                    return Err(RouterError::Invalid(format!("{user} is not a member")));
                };
                if member.admin {
                    return Ok(None);
                }
                let mut member = member.clone();
                member.admin = true;
                record.upsert(member);
                let change = ConversationChange::Promoted { user: user.clone() };
                (change, Vec::new(), Vec::new())
            }
        };
        let after: Arc<[String]> = record.names().into();
        // Everyone who was or is a member hears of it: a removed member learns of the removal,
        // and nothing after it.
        let recipients: Arc<[String]> = if removed.is_empty() {
            after.clone()
        } else {
            before
        };
        for user in &removed {
            state.marks.remove(user);
            if store.request(conv, user)?.is_some() {
                requests.push((user.clone(), None));
            }
        }
        state.last_seq = seq;
        state.record = record.clone();
        state.names = after;
        if let Some(p) = &policies {
            state.policies = p.clone();
        }
        let write = MembershipWrite {
            record,
            added,
            removed,
            requests,
            policies,
        };
        Ok(Some((seq, change, write, recipients)))
    }
}

/// The refusal of a request whose writes exceed the user's budget.
fn write_limit(writes: &super::limiter::SendLimiter, cost: usize) -> RouterError {
    metrics::counter!(names::WRITES_REFUSED, "budget" => "writes").increment(1);
    RouterError::Limit(format!(
        "this costs {cost} store writes and the budget is {} a second (limits.writes_per_second; \
         a message costs a log entry per member); slow down and retry (a send with the same id)",
        writes.rate()
    ))
}

/// Refuses a retention policy no conversation may have: a `ttl` of 0 would remove every
/// message as it arrives.
pub(crate) fn check_retention(policy: Retention) -> Result<(), RouterError> {
    if policy == Retention::Ttl(0) {
        return Err(RouterError::Invalid(
            "a ttl of 0 seconds would remove every message as it arrives; the shortest is 1 s"
                .into(),
        ));
    }
    Ok(())
}

/// What a request refused because of a block answers, whichever side blocked: the same as
/// any other refusal, so that it does not tell the blocked user.
pub(crate) const NOT_ALLOWED: &str = "not allowed";

/// Refuses a message from `from` in a direct conversation of `members` when either blocked
/// the other: the blocker is told, the blocked user only gets [`NOT_ALLOWED`].
pub(crate) fn direct_allowed(
    store: &Store,
    from: &str,
    members: &[String],
) -> Result<(), RouterError> {
    let Some(peer) = members.iter().find(|m| *m != from) else {
        return Ok(());
    };
    if store.blocks(from, peer)? {
        return Err(RouterError::Forbidden(format!(
            "you blocked {peer}; unblock them to write to them"
        )));
    }
    if store.blocks(peer, from)? {
        return Err(RouterError::Forbidden(NOT_ALLOWED.into()));
    }
    Ok(())
}

/// Whether `viewer` may not see `member`'s read mark in `conv` (listings): the rule of
/// [`hidden_from`], for one viewer. (Delivered marks are shown.)
pub(super) fn read_hidden(
    store: &Store,
    conv: ConversationId,
    viewer: &str,
    member: &str,
) -> Result<bool, crate::persist::StoreError> {
    Ok(viewer != member
        && (store.request(conv, member)?.is_some() || store.blocks(member, viewer)?))
}

/// The recipients of `user`'s marks in `conv` who may not see their read mark: all but
/// `user` while `user` has not accepted the conversation, else those `user` blocked.
fn hidden_from(
    store: &Store,
    conv: ConversationId,
    user: &str,
    recipients: &[String],
) -> Result<Vec<String>, RouterError> {
    if store.request(conv, user)?.is_some() {
        return Ok(recipients.iter().filter(|r| *r != user).cloned().collect());
    }
    let blocked = store.blocked_by(user)?;
    if blocked.is_empty() {
        return Ok(Vec::new());
    }
    Ok(recipients
        .iter()
        .filter(|r| blocked.contains(r))
        .cloned()
        .collect())
}

/// Under `until_delivered`, the range of seqs that every member has now received and whose
/// bodies are not yet removed.
fn erasable(state: &mut ConvState) -> Option<(u64, u64)> {
    // The commit thread erases only the messages whose own policy is `until_delivered`.
    if !state
        .policies
        .any(state.record.retention, Retention::UntilDelivered)
    {
        return None;
    }
    let everyone = state
        .names
        .iter()
        .map(|m| state.marks.get(m).map_or(0, |(d, _)| *d))
        .min()
        .unwrap_or(0);
    if everyone <= state.erased {
        return None;
    }
    let range = (state.erased + 1, everyone);
    state.erased = everyone;
    Some(range)
}

/// `Create` and `Delete` are handled before an existing state is looked up.
fn unreachable_create() -> Result<(ConversationChange, Vec<String>, Vec<String>), RouterError> {
    Err(RouterError::Internal("create of an existing group".into()))
}

/// `by` leaves; if no admin remains, the longest-standing member becomes one.
fn leave(
    record: &mut ConversationRecord,
    by: &str,
) -> (ConversationChange, Vec<String>, Vec<String>) {
    record.remove(by);
    let mut promoted = None;
    let heir = record
        .members
        .iter()
        .min_by(|a, b| a.since.cmp(&b.since).then_with(|| a.user.cmp(&b.user)))
        .cloned();
    if let Some(heir) = heir.filter(|_| !record.members.iter().any(|m| m.admin)) {
        promoted = Some(heir.user.clone());
        record.upsert(MemberRecord {
            admin: true,
            ..heir
        });
    }
    (
        ConversationChange::Left { promoted },
        Vec::new(),
        vec![by.to_owned()],
    )
}
