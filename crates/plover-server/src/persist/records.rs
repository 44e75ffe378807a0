//! The records the store keeps: sync log entries, conversation records and their members,
//! pending notifications.

use serde::{Deserialize, Serialize};

use plover_proto::{ConversationChange, ConversationId, ConversationKind, Message, Retention};

/// One entry of a user's sync log. Entries refer to records rather than copy them, so that a
/// deletion (later: retention) has one place to act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogEntry {
    /// A message in one of the user's conversations.
    Message {
        /// The conversation.
        conversation: ConversationId,
        /// The message's sequence number.
        seq: u64,
    },
    /// A message deleted for everyone by its sender.
    Deleted {
        /// The conversation.
        conversation: ConversationId,
        /// The message.
        seq: u64,
        /// Its sender.
        by: String,
    },
    /// A member's marks as they were at this point (small enough to keep inline).
    Receipt {
        /// The conversation.
        conversation: ConversationId,
        /// The member.
        user: String,
        /// Delivered up to.
        delivered: u64,
        /// Read up to.
        read: u64,
    },
}

/// A member of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The user.
    pub user: String,
    /// May change the group's members.
    pub admin: bool,
    /// The first seq the member may read (their joining); earlier history is not served to them.
    pub since: u64,
}

/// A notification waiting to go out to a user's pushers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPush {
    /// Messages it covers.
    pub count: u64,
    /// The latest message's conversation.
    pub conversation: ConversationId,
    /// The latest message's seq.
    pub seq: u64,
    /// The latest message's sender.
    pub sender: String,
    /// The latest message's body, when the user opted this conversation in.
    pub body: Option<bytes::Bytes>,
    /// When the first of them arrived, Unix ms.
    pub first_ms: u64,
}

/// What the store knows about a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRecord {
    /// Direct or group.
    pub kind: ConversationKind,
    /// A group's title (empty for direct conversations).
    pub title: String,
    /// Members, sorted by user.
    pub members: Vec<MemberRecord>,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// How long message bodies stay.
    pub retention: Retention,
}

/// What a message becomes when its body is removed: the same seq, sender, device and time,
/// an empty body, and `change` = `Erased`.
pub fn tombstone(msg: &Message) -> Message {
    Message {
        body: bytes::Bytes::new(),
        change: Some(ConversationChange::Erased),
        ..msg.clone()
    }
}

/// Whether a message's body is still there (not a tombstone, not a membership event).
pub fn has_body(msg: &Message) -> bool {
    msg.change.is_none()
}

impl ConversationRecord {
    /// A member's entry.
    pub fn member(&self, user: &str) -> Option<&MemberRecord> {
        self.members
            .binary_search_by(|m| m.user.as_str().cmp(user))
            .ok()
            .map(|i| &self.members[i])
    }

    /// Whether `user` is a member.
    pub fn is_member(&self, user: &str) -> bool {
        self.member(user).is_some()
    }

    /// The members' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.user.clone()).collect()
    }

    /// The admins' names, sorted.
    pub fn admins(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.admin)
            .map(|m| m.user.clone())
            .collect()
    }

    /// Adds or replaces a member, keeping the list sorted.
    pub fn upsert(&mut self, member: MemberRecord) {
        match self
            .members
            .binary_search_by(|m| m.user.as_str().cmp(&member.user))
        {
            Ok(i) => self.members[i] = member,
            Err(i) => self.members.insert(i, member),
        }
    }

    /// Removes a member; returns whether they were one.
    pub fn remove(&mut self, user: &str) -> bool {
        match self.members.binary_search_by(|m| m.user.as_str().cmp(user)) {
            Ok(i) => {
                self.members.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// The first byte of a pusher record that carries its device: `(device, pusher)` follows.
/// Records from before start with the `Pusher` variant's index (0 or 1), never this.
pub(super) const PUSHER_WITH_DEVICE: u8 = 0xff;
