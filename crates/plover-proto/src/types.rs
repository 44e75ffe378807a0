//! Values shared by several frames: identifiers, error codes, messages and events.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A conversation's id. Direct conversations and (later) groups share one id space.
pub type ConversationId = u64;

/// The client-chosen id of a message, used to make retries idempotent (a random 128-bit value).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientMsgId(pub [u8; 16]);

impl ClientMsgId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        // The OS random source failing is not something a client can recover from sensibly;
        // fall back to the clock so that an id is still unique enough to be useful.
        if getrandom::fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            bytes = nanos.to_le_bytes();
        }
        Self(bytes)
    }
}

impl fmt::Debug for ClientMsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A conversation this user has not accepted yet (a message request), in `Requests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRequest {
    /// The conversation.
    pub conversation: ConversationId,
    /// Who started it, or added this user to it, sharing no conversation with them.
    pub from: String,
}

/// A bearer token (a JWT) as `Hello` carries it: on the wire, a string; in `Debug` output
/// (and so in any log of a frame), only its length, never the token.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(pub String);

impl Token {
    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes, redacted>)", self.0.len())
    }
}

impl From<String> for Token {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Token {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// A stored object's id: the SHA-256 of its bytes (which the SDK encrypts first, so the id
/// of a file says nothing of its contents and two uploads of one file are not linkable).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// The id as 64 lowercase hex digits (how paths, logs and the CLI show it).
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut id = [0u8; 32];
        for (out, pair) in id.iter_mut().zip(bytes.chunks_exact(2)) {
            let text = std::str::from_utf8(pair).ok()?;
            *out = u8::from_str_radix(text, 16).ok()?;
        }
        Some(Self(id))
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// A numeric error code, used both in `Error` frames and as the QUIC application close code.
///
/// It travels as a plain number so that a client meeting a code newer than itself can still
/// decode the frame and show the message that comes with it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// Normal close: the client or server is done.
    pub const NORMAL: Self = Self(0);
    /// The server is shutting down; reconnect later.
    pub const SHUTDOWN: Self = Self(1);
    /// A frame could not be decoded (garbage, truncated at stream end, trailing bytes).
    pub const BAD_FRAME: Self = Self(2);
    /// A frame announced a length above the negotiated maximum.
    pub const FRAME_TOO_LARGE: Self = Self(3);
    /// A valid frame arrived where it is not allowed (wrong stream or wrong state).
    pub const UNEXPECTED_FRAME: Self = Self(4);
    /// The client speaks a protocol version this server does not.
    pub const UNSUPPORTED_VERSION: Self = Self(5);
    /// No `Hello` arrived within the authentication timeout.
    pub const AUTH_TIMEOUT: Self = Self(6);
    /// The token is empty.
    pub const TOKEN_MISSING: Self = Self(7);
    /// The token has expired.
    pub const TOKEN_EXPIRED: Self = Self(8);
    /// The token is malformed, forged, or signed with another algorithm.
    pub const TOKEN_INVALID: Self = Self(9);
    /// The caller is not a member of the conversation.
    pub const NOT_MEMBER: Self = Self(10);
    /// The named user has never connected to this server.
    pub const UNKNOWN_USER: Self = Self(11);
    /// No such conversation.
    pub const UNKNOWN_CONVERSATION: Self = Self(12);
    /// A request's fields are out of range (empty body, bad name, limit too high, ...).
    pub const INVALID_REQUEST: Self = Self(13);
    /// The store cannot accept writes (a failed fsync); nothing was acknowledged.
    pub const UNAVAILABLE: Self = Self(14);
    /// The server hit a bug or an I/O error it did not expect.
    pub const INTERNAL: Self = Self(15);
    /// A limit of the connection was exceeded (connections, streams, in-flight sends).
    pub const LIMIT: Self = Self(16);
    /// The caller may not do or see this (presence of a stranger, a non-admin changing a
    /// group's members).
    pub const FORBIDDEN: Self = Self(17);
    /// The same device connected again: this (older) connection is closed. Do not reconnect
    /// automatically; the device's newer connection is the live one.
    pub const REPLACED: Self = Self(18);
    /// The control stream ended without a clean finish (reset, or the server could not write
    /// on it): the connection ends with it.
    pub const CONTROL_CLOSED: Self = Self(19);
    /// The node is stopping and sends the client to another node of its cluster: the close
    /// reason is that node's address (`host:port`); connect there (then the usual list).
    pub const MOVED: Self = Self(20);
    /// No such object, or none this user may read (the two are one answer, so that an id
    /// says nothing to a stranger).
    pub const NOT_FOUND: Self = Self(21);
    /// The token was revoked by the operator (`plover token revoke`): refused at `Hello`, and
    /// the close code of the connections it had opened. Do not reconnect with the same token.
    pub const TOKEN_REVOKED: Self = Self(22);
    /// The operator closed this connection (`plover admin disconnect`, `remove-device`,
    /// `delete-user`). A client may reconnect; a removed device starts over.
    pub const DISCONNECTED: Self = Self(23);

    /// The constant's name, for logs and CLI messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::NORMAL => "normal",
            Self::SHUTDOWN => "shutdown",
            Self::BAD_FRAME => "bad_frame",
            Self::FRAME_TOO_LARGE => "frame_too_large",
            Self::UNEXPECTED_FRAME => "unexpected_frame",
            Self::UNSUPPORTED_VERSION => "unsupported_version",
            Self::AUTH_TIMEOUT => "auth_timeout",
            Self::TOKEN_MISSING => "token_missing",
            Self::TOKEN_EXPIRED => "token_expired",
            Self::TOKEN_INVALID => "token_invalid",
            Self::NOT_MEMBER => "not_member",
            Self::UNKNOWN_USER => "unknown_user",
            Self::UNKNOWN_CONVERSATION => "unknown_conversation",
            Self::INVALID_REQUEST => "invalid_request",
            Self::UNAVAILABLE => "unavailable",
            Self::INTERNAL => "internal",
            Self::LIMIT => "limit",
            Self::FORBIDDEN => "forbidden",
            Self::REPLACED => "replaced",
            Self::CONTROL_CLOSED => "control_closed",
            Self::MOVED => "moved",
            Self::NOT_FOUND => "not_found",
            Self::TOKEN_REVOKED => "token_revoked",
            Self::DISCONNECTED => "disconnected",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a conversation stream is opened for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// An existing conversation by id.
    Conversation(ConversationId),
    /// The direct conversation with this user (the same one whichever side names it).
    Direct(String),
}

/// The kind of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationKind {
    /// Between exactly two users.
    Direct,
    /// A titled group with admins.
    Group,
}

/// How long a conversation's message bodies stay on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Retention {
    /// Until the sender deletes them (the default).
    #[default]
    Keep,
    /// Until every member has at least one device that received them (or the configured
    /// maximum age, 30 days by default, for those that never are).
    UntilDelivered,
    /// For this many seconds after the server accepted them (disappearing messages).
    Ttl(u64),
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retention::Keep => f.write_str("keep"),
            Retention::UntilDelivered => f.write_str("until-delivered"),
            Retention::Ttl(secs) => write!(
                f,
                "ttl={}",
                humantime::format_duration(std::time::Duration::from_secs(*secs))
            ),
        }
    }
}

/// Why a retention policy's text is not one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RetentionParseError {
    /// Not `keep`, `until-delivered` or `ttl=<duration>`.
    #[error("{0:?} is not a retention policy (keep, until-delivered, ttl=<duration>)")]
    Unknown(String),
    /// The duration after `ttl=` does not parse.
    #[error("bad ttl {text:?}: {source}")]
    BadTtl {
        /// The text after `ttl=`.
        text: String,
        /// Why it does not parse.
        source: humantime::DurationError,
    },
    /// A ttl under one second.
    #[error("a ttl is at least one second")]
    TtlTooShort,
}

impl std::str::FromStr for Retention {
    type Err = RetentionParseError;

    /// `keep`, `until-delivered`, or `ttl=<duration>` (`ttl=7d`, `ttl=10s`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "keep" => Ok(Retention::Keep),
            "until-delivered" | "until_delivered" => Ok(Retention::UntilDelivered),
            _ => match s.strip_prefix("ttl=") {
                Some(text) => {
                    let d = humantime::parse_duration(text).map_err(|source| {
                        RetentionParseError::BadTtl {
                            text: text.to_owned(),
                            source,
                        }
                    })?;
                    if d.as_secs() == 0 {
                        return Err(RetentionParseError::TtlTooShort);
                    }
                    Ok(Retention::Ttl(d.as_secs()))
                }
                None => Err(RetentionParseError::Unknown(s.to_owned())),
            },
        }
    }
}

/// A change of the conversation itself (membership, retention) or what became of a message.
/// Changes take their place in the conversation's sequence like messages (with an empty body),
/// so every member sees them in order with the messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationChange {
    /// The group was created (always seq 1) by `from`, who is its first admin.
    Created {
        /// Its title.
        title: String,
        /// Every member, the creator included, sorted, when there are at most
        /// [`INLINE_MEMBERS`]; else empty (page them with `Members`), so that the event
        /// always fits in a frame.
        members: Vec<String>,
    },
    /// `from` added `user`.
    Added {
        /// The new member.
        user: String,
    },
    /// `from` removed `user`.
    Removed {
        /// The former member.
        user: String,
    },
    /// `from` left. If they were the last admin, `promoted` became one.
    Left {
        /// The member made admin in their place, if any.
        promoted: Option<String>,
    },
    /// `from` made `user` an admin.
    Promoted {
        /// The new admin.
        user: String,
    },
    /// `from` set the retention policy.
    Retention {
        /// The new policy.
        policy: Retention,
    },
    /// This message's body was removed (deleted by its sender, or by the retention policy);
    /// the tombstone keeps its seq, sender and time.
    Erased,
}

/// One stored message, as delivered and as served by history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The conversation it belongs to.
    pub conversation: ConversationId,
    /// Its position in the conversation (1, 2, 3, ...).
    pub seq: u64,
    /// The sender's user id.
    pub from: String,
    /// The sender's device.
    pub device: String,
    /// Server time of acceptance, Unix milliseconds. Informative only: order is `seq`.
    pub ts: u64,
    /// The client's id for the message.
    pub id: ClientMsgId,
    /// The opaque payload (empty for a membership change).
    pub body: Bytes,
    /// Set when this entry is a membership change rather than a message.
    pub change: Option<ConversationChange>,
}

impl Message {
    /// Bytes of an encoded frame around one message (an `Event` or a one-message history
    /// page): tags, the log position or request id, lengths.
    pub const FRAME_OVERHEAD: usize = 64;

    /// The message as it can travel in a frame of at most `max_frame` bytes. Every message
    /// made today fits (bodies are below `max_body`, names and titles are bounded, `Created`
    /// lists members only up to [`INLINE_MEMBERS`]); one that does not, such as a `Created`
    /// stored with a long member list by an older version, is cut rather than left to fail
    /// its frame forever: a `Created` loses its member list (page with `Members`), anything
    /// else becomes its tombstone.
    pub fn fit(self, max_frame: u32) -> Message {
        let room = (max_frame as usize).saturating_sub(Self::FRAME_OVERHEAD);
        let size = |m: &Message| postcard::to_stdvec(m).map_or(usize::MAX, |v| v.len());
        if size(&self) <= room {
            return self;
        }
        if let Some(ConversationChange::Created { title, .. }) = &self.change {
            let cut = Message {
                change: Some(ConversationChange::Created {
                    title: title.clone(),
                    members: Vec::new(),
                }),
                ..self.clone()
            };
            if size(&cut) <= room {
                return cut;
            }
        }
        Message {
            body: Bytes::new(),
            change: Some(ConversationChange::Erased),
            ..self
        }
    }
}

/// A member's delivery and read marks in a conversation: high-water sequence numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The conversation.
    pub conversation: ConversationId,
    /// The member the marks are of.
    pub user: String,
    /// Every message up to this seq has reached at least one of the member's devices.
    pub delivered: u64,
    /// The member has read every message up to this seq.
    pub read: u64,
}

/// Something that happened and concerns a user: one entry of their sync log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A message in one of the user's conversations (including their own, for their other devices).
    Message(Message),
    /// A member's marks moved: sent to the other members (delivered and read) and to the
    /// member's own devices (read), so unread counts agree everywhere.
    Receipt(Receipt),
    /// The sender deleted a message for everyone: remove its body locally too.
    Deleted {
        /// The conversation.
        conversation: ConversationId,
        /// The message.
        seq: u64,
        /// Who deleted it (its sender).
        by: String,
    },
}

impl Event {
    /// The conversation the event belongs to, which picks the stream it travels on.
    pub fn conversation(&self) -> ConversationId {
        match self {
            Event::Message(m) => m.conversation,
            Event::Receipt(r) => r.conversation,
            Event::Deleted { conversation, .. } => *conversation,
        }
    }
}

/// One member's marks, as listed with a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// The member.
    pub user: String,
    /// Delivered up to this seq.
    pub delivered: u64,
    /// Read up to this seq.
    pub read: u64,
}

/// Conversations of at most this many members are listed with their members and marks
/// inline; larger groups are paged with `Members`.
pub const INLINE_MEMBERS: usize = 32;

/// A conversation as listed for one of its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationInfo {
    /// Its id.
    pub conversation: ConversationId,
    /// Direct or group.
    pub kind: ConversationKind,
    /// A group's title (empty for direct conversations).
    pub title: String,
    /// How many members it has.
    pub member_count: u32,
    /// Every member, sorted, when there are at most [`INLINE_MEMBERS`]; else empty.
    pub members: Vec<String>,
    /// The sequence number of its latest message (0 when empty).
    pub last_seq: u64,
    /// Members' marks, by user: all of them up to [`INLINE_MEMBERS`] members, else only the
    /// caller's.
    pub marks: Vec<Marks>,
    /// Messages after the caller's read mark (sending counts as reading what came before).
    pub unread: u64,
    /// How long message bodies stay on the server.
    pub retention: Retention,
}

/// A member as paged by `Members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The user.
    pub user: String,
    /// Whether they are an admin.
    pub admin: bool,
    /// The seq of their joining.
    pub since: u64,
    /// Delivered up to.
    pub delivered: u64,
    /// Read up to.
    pub read: u64,
}

/// Datagrams a client sends (RFC 9221): may be lost, never stored, never retransmitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientDatagram {
    /// The user is typing in this conversation; repeat every few seconds while it lasts.
    Typing {
        /// The conversation.
        conversation: ConversationId,
    },
}

/// Datagrams the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerDatagram {
    /// `user` is typing in `conversation`. Show it for a few seconds unless repeated.
    Typing {
        /// The conversation.
        conversation: ConversationId,
        /// Who is typing.
        user: String,
    },
}

/// Where a device's push notifications go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pusher {
    /// A push gateway speaking the Matrix Push Gateway API (as Sygnal does), which forwards to
    /// APNs or FCM.
    Gateway {
        /// The gateway's base URL (`/_matrix/push/v1/notify` is appended unless present).
        url: String,
        /// The app id the gateway knows (which APNs/FCM credentials to use).
        app_id: String,
        /// The device's push key (its APNs or FCM token).
        pushkey: String,
    },
    /// A UnifiedPush or Web Push endpoint: the notification is POSTed to it, encrypted per
    /// RFC 8291 when the device gave its keys.
    WebPush {
        /// The endpoint URL.
        endpoint: String,
        /// The device's P-256 public key (uncompressed point, base64url), for RFC 8291.
        p256dh: Option<String>,
        /// The device's 16-byte authentication secret (base64url), for RFC 8291.
        auth: Option<String>,
    },
}

impl Pusher {
    /// What identifies the pusher for unregistering: the push key or the endpoint.
    pub fn key(&self) -> &str {
        match self {
            Pusher::Gateway { pushkey, .. } => pushkey,
            Pusher::WebPush { endpoint, .. } => endpoint,
        }
    }

    /// Where its notifications are posted: the gateway's URL or the endpoint.
    pub fn url(&self) -> &str {
        match self {
            Pusher::Gateway { url, .. } => url,
            Pusher::WebPush { endpoint, .. } => endpoint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(members: usize) -> Message {
        Message {
            conversation: 7,
            seq: 1,
            from: "owner".into(),
            device: "phone".into(),
            ts: 1,
            id: ClientMsgId([1; 16]),
            body: Bytes::new(),
            change: Some(ConversationChange::Created {
                title: "t".into(),
                members: (0..members).map(|i| format!("{i:064}")).collect(),
            }),
        }
    }

    #[test]
    fn a_message_that_fits_is_left_as_it_is() {
        let m = created(INLINE_MEMBERS);
        assert_eq!(m.clone().fit(crate::DEFAULT_MAX_FRAME), m);
    }

    #[test]
    fn an_oversized_created_loses_its_member_list_and_anything_else_its_body() {
        let max = crate::DEFAULT_MAX_FRAME;
        let cut = created(1024).fit(max);
        assert_eq!(
            cut.change,
            Some(ConversationChange::Created {
                title: "t".into(),
                members: Vec::new()
            })
        );
        let big = Message {
            body: Bytes::from(vec![0u8; 4096]),
            change: None,
            ..created(0)
        };
        let cut = big.fit(1024);
        assert!(cut.body.is_empty() && cut.change == Some(ConversationChange::Erased));
        assert_eq!((cut.seq, cut.from.as_str()), (1, "owner"));
    }
}
