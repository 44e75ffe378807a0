//! What the shards hand the commit thread, and what comes back: the items of the pipeline
//! between sequencing (`shard.rs`) and group commit (`commit.rs`).

use std::sync::Arc;
use tokio::sync::oneshot;

use super::RouterError;
use super::timing::{Stamps, Traced};
use crate::persist::{SideWrite, StoreError};
use plover_proto::{Message, Receipt};

/// The watermark of the last seq whose body retention removed (`until_delivered`).
pub(super) const ERASED: &str = "erased";

/// The answer to a send: the message's place in its conversation.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Sequence number in the conversation.
    pub seq: u64,
    /// Server time of acceptance, Unix ms.
    pub ts: u64,
    /// Position of the message in the sender's own log; 0 when not known (a retry, or an
    /// answer that is not a message).
    pub log: u64,
    /// Where the message's time went, for the answer to record once written (live sends
    /// only).
    pub timing: Option<Arc<Traced>>,
}

/// Where an answer goes.
pub(super) type Reply = oneshot::Sender<Result<Sent, RouterError>>;

/// What a membership change writes besides its event.
pub(super) struct MembershipWrite {
    /// The conversation's new record.
    pub(super) record: crate::persist::ConversationRecord,
    /// Users to index as members.
    pub(super) added: Vec<String>,
    /// Users no longer members.
    pub(super) removed: Vec<String>,
    /// Message requests it opens (a user added by someone who shared no conversation with
    /// them: (user, who asked)) or ends (a removed member: (user, `None`)).
    pub(super) requests: Vec<(String, Option<String>)>,
    /// The retention history after a policy change.
    pub(super) policies: Option<crate::persist::Policies>,
}

/// Where an entry sits in the cluster's replicated log: the JetStream message (its stream
/// sequence) and the entry's index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    pub(crate) seq: u64,
    pub(crate) index: u32,
}

/// Work for the commit thread.
pub(super) enum CommitItem {
    /// Store a message (or membership event) and append it to each recipient's log.
    Message {
        msg: Message,
        recipients: Arc<[String]>,
        membership: Option<Box<MembershipWrite>>,
        /// The objects it references (`SendWith`).
        refs: Option<Box<crate::persist::MediaRefs>>,
        reply: Reply,
        /// When the send reached its shard (for the ack latency metric).
        since: std::time::Instant,
        /// The stage stamps of a `Send` (none for a membership change).
        stamps: Option<Stamps>,
        /// The sending connection's feed, which gets the message in the answer instead.
        origin: u64,
        /// The body's share of the bytes in flight ([`super::BODY_BYTES_IN_FLIGHT`]),
        /// released once the batch is done.
        held: Option<tokio::sync::OwnedSemaphorePermit>,
        /// Whether to offer it to the recipients' pushers.
        notify: bool,
        /// The sender had not accepted the conversation (a message request): answering
        /// accepts it.
        answered: bool,
    },
    /// A member's marks moved: store them and append the receipt to each recipient's log;
    /// under `until_delivered`, remove the bodies of the seq range everyone now has.
    Marks {
        receipt: Receipt,
        recipients: Arc<[String]>,
        /// Recipients who may not see the member's read mark (the member has not accepted
        /// the conversation, or blocked them): their receipt says read 0.
        masked: Vec<String>,
        erase: Option<(u64, u64)>,
    },
    /// A sender deleted a message for everyone: store the tombstone, tell every member.
    Deleted {
        tombstone: Message,
        recipients: Arc<[String]>,
        reply: Reply,
    },
    /// Answer `reply` once everything queued before it is durable (a retry of a message that
    /// is still in flight).
    Wait { sent: Sent, reply: Reply },
    /// A device acknowledged its cursor.
    Cursor {
        user: String,
        device: String,
        cursor: u64,
    },
    /// Answer once everything queued before it is committed (reads that must see earlier
    /// writes, such as a device's cursor acknowledged on its previous connection).
    Barrier(oneshot::Sender<()>),
    /// A write off the hot path (a new user, a direct conversation, pushers, pending
    /// notifications, last seen...): it joins the batch and shares its fsync; the answer
    /// says whether that batch is durable.
    Side {
        write: SideWrite,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// The item an entry of the replicated log made (cluster): committed with the entry's
    /// position, so a restarted node resumes after the last entry it wrote.
    Applied { item: Box<CommitItem>, at: Position },
    /// Finish the current batch and stop.
    Stop,
}

/// The `kind` labels of [`names::COMMIT_ITEMS`], indexed by [`CommitItem::kind`].
pub(super) const KINDS: [&str; 7] = [
    "message", "marks", "deleted", "wait", "cursor", "barrier", "side",
];

impl CommitItem {
    /// Which of [`KINDS`] the item is (`Stop` counts as a barrier).
    pub(super) fn kind(&self) -> usize {
        match self {
            CommitItem::Applied { item, .. } => item.kind(),
            CommitItem::Message { .. } => 0,
            CommitItem::Marks { .. } => 1,
            CommitItem::Deleted { .. } => 2,
            CommitItem::Wait { .. } => 3,
            CommitItem::Cursor { .. } => 4,
            CommitItem::Barrier(_) | CommitItem::Stop => 5,
            CommitItem::Side { .. } => 6,
        }
    }

    /// About how many writes the item costs.
    pub(super) fn work(&self) -> usize {
        match self {
            CommitItem::Applied { item, .. } => item.work(),
            CommitItem::Message { recipients, .. } => 3 + recipients.len(),
            CommitItem::Marks {
                recipients, erase, ..
            } => 1 + recipients.len() + erase.map_or(0, |(a, b)| (b - a + 1) as usize),
            CommitItem::Deleted { recipients, .. } => 1 + recipients.len(),
            CommitItem::Wait { .. }
            | CommitItem::Cursor { .. }
            | CommitItem::Barrier(_)
            | CommitItem::Side { .. }
            | CommitItem::Stop => 1,
        }
    }
}
