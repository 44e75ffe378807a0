//! A sequencer shard: the single owner of a set of conversations.
//!
//! Each shard is an OS thread (it reads the store, which blocks) fed by a bounded channel. For
//! every send it checks membership, answers retries of a client id with the original sequence
//! number, assigns the next sequence number, and queues the message for the commit thread.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

use super::RouterError;
use super::commit::{CommitItem, Reply, Sent};
use crate::framing::{ClientMsgId, ConversationId, Message};
use crate::persist::Store;

/// A request to a shard.
pub(super) enum ShardRequest {
    Send(SendRequest),
    Marks(MarksRequest),
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
}

struct ConvState {
    last_seq: u64,
    members: Arc<[String]>,
    /// Each member's (delivered, read) marks.
    marks: HashMap<String, (u64, u64)>,
}

type IdemKey = (ConversationId, String, ClientMsgId);

pub(super) struct Shard {
    pub(super) store: Arc<Store>,
    pub(super) rx: mpsc::Receiver<ShardRequest>,
    pub(super) commit: SyncSender<CommitItem>,
    /// Client ids sequenced recently, so that a retry of a message still in flight (not yet
    /// in the store) is recognised. An entry may leave only once its message is surely
    /// committed: see [`Shard::recent_capacity`].
    pub(super) recent_capacity: usize,
}

/// Unix milliseconds now.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
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
        let mut convs: HashMap<ConversationId, ConvState> = HashMap::new();
        let mut recent: HashMap<IdemKey, Sent> = HashMap::new();
        let mut order: VecDeque<IdemKey> = VecDeque::new();
        while let Some(request) = self.rx.blocking_recv() {
            let item = match request {
                ShardRequest::Send(req) => self.sequence(req, &mut convs, &mut recent, &mut order),
                ShardRequest::Marks(req) => self.marks(req, &mut convs),
                ShardRequest::Stop => break,
            };
            let Some(item) = item else {
                continue;
            };
            if self.commit.send(item).is_err() {
                // The commit thread is gone: the router is shutting down. The reply inside the
                // item was dropped, which the sender sees as `ShuttingDown`.
                break;
            }
        }
    }

    /// Moves a member's marks forward (never back, never past the last message) and queues
    /// the change; returns nothing when the marks did not move.
    fn marks(
        &mut self,
        req: MarksRequest,
        convs: &mut HashMap<ConversationId, ConvState>,
    ) -> Option<CommitItem> {
        if self.store.is_poisoned() {
            return None;
        }
        let state = match convs.get_mut(&req.conversation) {
            Some(s) => s,
            None => match self.load(req.conversation) {
                Ok(s) => convs.entry(req.conversation).or_insert(s),
                Err(e) => {
                    tracing::debug!(error = %e, "marks for an unknown conversation");
                    return None;
                }
            },
        };
        if !state.members.contains(&req.user) {
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
        state
            .marks
            .insert(req.user.clone(), (new_delivered, new_read));
        Some(CommitItem::Marks {
            receipt: crate::framing::Receipt {
                conversation: req.conversation,
                user: req.user,
                delivered: new_delivered,
                read: new_read,
            },
            read_moved: new_read != read,
            members: state.members.clone(),
        })
    }

    fn sequence(
        &mut self,
        req: SendRequest,
        convs: &mut HashMap<ConversationId, ConvState>,
        recent: &mut HashMap<IdemKey, Sent>,
        order: &mut VecDeque<IdemKey>,
    ) -> Option<CommitItem> {
        if self.store.is_poisoned() {
            let _ = req.reply.send(Err(RouterError::Unavailable));
            return None;
        }
        let state = match convs.get_mut(&req.conversation) {
            Some(s) => s,
            None => match self.load(req.conversation) {
                Ok(s) => convs.entry(req.conversation).or_insert(s),
                Err(e) => {
                    let _ = req.reply.send(Err(e));
                    return None;
                }
            },
        };
        if !state.members.contains(&req.from) {
            let _ = req
                .reply
                .send(Err(RouterError::NotMember(req.conversation)));
            return None;
        }

        let key: IdemKey = (req.conversation, req.from, req.id);
        if let Some(sent) = recent.get(&key) {
            return Some(CommitItem::Wait {
                sent: *sent,
                reply: req.reply,
            });
        }
        match self.store.idempotent(key.0, &key.1, &key.2) {
            Ok(Some((seq, ts))) => {
                let _ = req.reply.send(Ok(Sent { seq, ts }));
                return None;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = req.reply.send(Err(e.into()));
                return None;
            }
        }

        state.last_seq += 1;
        let sent = Sent {
            seq: state.last_seq,
            ts: now_ms(),
        };
        let msg = Message {
            conversation: key.0,
            seq: sent.seq,
            from: key.1.clone(),
            device: req.device,
            ts: sent.ts,
            id: key.2,
            body: req.body,
        };
        // Sending counts as having read (and received) everything up to one's own message.
        state.marks.insert(msg.from.clone(), (sent.seq, sent.seq));
        recent.insert(key.clone(), sent);
        order.push_back(key);
        while order.len() > self.recent_capacity {
            if let Some(old) = order.pop_front() {
                recent.remove(&old);
            }
        }
        Some(CommitItem::Message {
            msg,
            members: state.members.clone(),
            reply: req.reply,
        })
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
            members: record.members.into(),
            marks,
        })
    }
}
