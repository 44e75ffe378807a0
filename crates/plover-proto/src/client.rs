//! Frames a client sends.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::types::{ClientMsgId, ObjectId, Pusher, Retention, Target, Token};

/// Every frame a client may send, on any stream.
///
/// The control stream takes `Hello` first, then `Ping`, `Sync`, `Ack` and `ListConversations`.
/// A conversation stream takes `Open` first, then `Send` and `History`. Anything else is answered
/// with an `Error` (code `UNEXPECTED_FRAME`). Variant order is the wire format: append, never
/// reorder (the pinned vectors below fail if you do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Opens the session: protocol version, bearer token, this device's name, and the zone
    /// the client would rather be served in.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the client.
        version: u16,
        /// A JWT: minted by `plover token`, or by an identity provider the server trusts.
        /// Never shown in `Debug` output.
        token: Token,
        /// The device's stable name (1 to 64 characters of `[A-Za-z0-9._-]`).
        device: String,
        /// The zone the client would rather be served in (a cluster node of another zone
        /// sends it to a node of this one, if one is up); `None`: any. New in version 3: a
        /// version 2 `Hello` ends after `device` (see [`ClientFrame::decode_first`]).
        zone: Option<String>,
    },
    /// Liveness probe; answered with `Pong` carrying the same nonce.
    Ping {
        /// Any value; echoed back.
        nonce: u64,
    },
    /// Starts event delivery after the given position of the user's sync log.
    Sync {
        /// The last position this device has; `None` uses the position the server last saw
        /// this device acknowledge.
        cursor: Option<u64>,
    },
    /// The device has every event up to and including `cursor`.
    Ack {
        /// A position of the user's sync log.
        cursor: u64,
    },
    /// Asks for a page of the caller's conversations, by id.
    ListConversations {
        /// Echoed in the answer.
        request: u32,
        /// Only conversations with a larger id (0: from the start).
        after: u64,
        /// At most this many (capped at 100).
        limit: u32,
    },
    /// First frame of a conversation stream.
    Open {
        /// Which conversation.
        target: Target,
        /// Whether a direct conversation that does not exist yet may be created.
        create: bool,
    },
    /// Sends a message in the stream's conversation.
    Send {
        /// The client's id; a retry with the same id gets the original answer.
        id: ClientMsgId,
        /// The opaque payload.
        body: Bytes,
    },
    /// Asks for a page of the stream's conversation, oldest first.
    History {
        /// Echoed in the answer.
        request: u32,
        /// Only messages with `seq < before`.
        before: Option<u64>,
        /// Only messages with `seq > after`.
        after: Option<u64>,
        /// At most this many (capped by the server's limit).
        limit: u32,
    },
    /// Every message up to `up_to` reached this device (the SDK sends it on receipt). On a
    /// conversation or delivery stream.
    Delivered {
        /// A sequence number of the stream's conversation.
        up_to: u64,
    },
    /// The user has read every message up to `up_to`. On a conversation or delivery stream.
    Read {
        /// A sequence number of the stream's conversation.
        up_to: u64,
    },
    /// Asks whether `user` is online, or when they were last seen.
    Presence {
        /// Echoed in the answer.
        request: u32,
        /// Whom to ask about; refused unless the two share a conversation.
        user: String,
    },
    /// Creates a group with the caller as its first admin. On the control stream.
    CreateGroup {
        /// Echoed in the answer.
        request: u32,
        /// The group's title (1 to 200 bytes).
        title: String,
        /// The other members (users who have connected at least once).
        members: Vec<String>,
        /// How long message bodies stay on the server.
        retention: Retention,
    },
    /// Adds a member (admins only). On the group's conversation stream.
    AddMember {
        /// Echoed in the answer.
        request: u32,
        /// Who.
        user: String,
    },
    /// Removes a member (admins only). On the group's conversation stream.
    RemoveMember {
        /// Echoed in the answer.
        request: u32,
        /// Who.
        user: String,
    },
    /// Leaves the group. On the group's conversation stream.
    Leave {
        /// Echoed in the answer.
        request: u32,
    },
    /// Makes a member an admin (admins only). On the group's conversation stream.
    Promote {
        /// Echoed in the answer.
        request: u32,
        /// Who.
        user: String,
    },
    /// Asks for a page of the stream's conversation's members, with roles and marks.
    Members {
        /// Echoed in the answer.
        request: u32,
        /// Only members whose name sorts after this ("" from the start).
        after: String,
        /// At most this many (capped at 200).
        limit: u32,
    },
    /// Deletes one of the caller's own messages for everyone. On a conversation stream.
    Delete {
        /// Echoed in the answer.
        request: u32,
        /// The message.
        seq: u64,
    },
    /// Hides the conversation's history up to `up_to` from the caller only. On a conversation
    /// stream.
    ClearHistory {
        /// Echoed in the answer.
        request: u32,
        /// The last seq to hide.
        up_to: u64,
    },
    /// Sets the retention policy (either member of a direct conversation; a group's admins).
    SetRetention {
        /// Echoed in the answer.
        request: u32,
        /// The new policy.
        policy: Retention,
    },
    /// Registers where this device's notifications go (replacing one with the same key).
    /// On the control stream; answered with `Done`.
    RegisterPusher {
        /// Echoed in the answer.
        request: u32,
        /// Where.
        pusher: Pusher,
    },
    /// Removes a pusher by its key (push key or endpoint). On the control stream; `Done`.
    UnregisterPusher {
        /// Echoed in the answer.
        request: u32,
        /// The push key or endpoint.
        key: String,
    },
    /// Lists the user's pushers. On the control stream; answered with `Pushers`.
    ListPushers {
        /// Echoed in the answer.
        request: u32,
    },
    /// Opts a conversation in or out of message bodies in notifications (off by default:
    /// bodies may be end-to-end encrypted). On the control stream; `Done`.
    PushContent {
        /// Echoed in the answer.
        request: u32,
        /// The conversation.
        conversation: u64,
        /// Whether notifications carry the body.
        include: bool,
    },
    /// First frame of an upload stream: the object's size and id (the SHA-256 of its
    /// bytes). Answered with `UploadReady { offset }`: the client then sends the object's
    /// bytes from `offset` on, raw (no frames), and finishes the stream; the server answers
    /// `Uploaded` once it checked and stored them, or `Error`.
    Upload {
        /// The object's size in bytes.
        size: u64,
        /// The SHA-256 of its bytes.
        object: ObjectId,
    },
    /// First frame of a download stream: a range of an object the caller uploaded
    /// (`conversation` 0), or one that message `seq` of `conversation` references. Answered
    /// with `DownloadReady` and the range's bytes, raw, then the end of the stream; or
    /// `Error` (`not_found` for an object that does not exist or that the caller may not
    /// read, alike).
    Download {
        /// The object.
        object: ObjectId,
        /// The conversation whose message references it; 0: one the caller uploaded.
        conversation: u64,
        /// That message's seq (ignored when `conversation` is 0).
        seq: u64,
        /// The first byte wanted.
        offset: u64,
        /// How many bytes (0: to the end).
        length: u64,
    },
    /// `Send` of a message that references uploaded objects (at most 16, each uploaded by
    /// the sender): the members may download them from this message on.
    SendWith {
        /// The client's id; a retry with the same id gets the original answer.
        id: ClientMsgId,
        /// The opaque body (with the SDK's content format, an attachment pointer).
        body: Bytes,
        /// The objects it references.
        objects: Vec<ObjectId>,
    },
    /// Blocks a user: they can no longer start a direct conversation with this user, write in
    /// theirs, add them to a group, or see their presence, typing or read marks; this user no
    /// longer gets theirs. On the control stream; answered with `Done` (seq 0).
    Block {
        /// Echoed in the answer.
        request: u32,
        /// The user to block.
        user: String,
    },
    /// Lifts a block. On the control stream; `Done` (seq 0).
    Unblock {
        /// Echoed in the answer.
        request: u32,
        /// The user to unblock.
        user: String,
    },
    /// Lists the users this user blocked. On the control stream; answered with `Blocked`.
    ListBlocked {
        /// Echoed in the answer.
        request: u32,
    },
    /// Accepts a message request: a conversation someone who shared none with this user
    /// started or added them to. Writing in it accepts it too. On the control stream;
    /// `Done` (seq 0).
    Accept {
        /// Echoed in the answer.
        request: u32,
        /// The conversation.
        conversation: u64,
    },
    /// Lists this user's message requests. On the control stream; answered with `Requests`.
    ListRequests {
        /// Echoed in the answer.
        request: u32,
    },
}

/// `Hello` as protocol version 2 sent it, without `zone`.
#[derive(Deserialize)]
enum HelloV2 {
    Hello {
        version: u16,
        token: Token,
        device: String,
    },
}

impl ClientFrame {
    /// Decodes the first frame of a connection: any frame of this version, or a version 2
    /// `Hello` (which has no `zone`: read as `zone: None`), so that a server can still
    /// answer clients of the previous version.
    pub fn decode_first(body: &[u8]) -> Result<Self, crate::FrameError> {
        crate::codec::decode_body::<Self>(body).or_else(|e| {
            match crate::codec::decode_body::<HelloV2>(body) {
                Ok(HelloV2::Hello {
                    version,
                    token,
                    device,
                }) if version < 3 => Ok(Self::Hello {
                    version,
                    token,
                    device,
                    zone: None,
                }),
                _ => Err(e),
            }
        })
    }

    /// The variant's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "Hello",
            Self::Ping { .. } => "Ping",
            Self::Sync { .. } => "Sync",
            Self::Ack { .. } => "Ack",
            Self::ListConversations { .. } => "ListConversations",
            Self::Open { .. } => "Open",
            Self::Send { .. } => "Send",
            Self::History { .. } => "History",
            Self::Delivered { .. } => "Delivered",
            Self::Read { .. } => "Read",
            Self::Presence { .. } => "Presence",
            Self::CreateGroup { .. } => "CreateGroup",
            Self::AddMember { .. } => "AddMember",
            Self::RemoveMember { .. } => "RemoveMember",
            Self::Leave { .. } => "Leave",
            Self::Promote { .. } => "Promote",
            Self::Members { .. } => "Members",
            Self::Delete { .. } => "Delete",
            Self::ClearHistory { .. } => "ClearHistory",
            Self::SetRetention { .. } => "SetRetention",
            Self::RegisterPusher { .. } => "RegisterPusher",
            Self::UnregisterPusher { .. } => "UnregisterPusher",
            Self::ListPushers { .. } => "ListPushers",
            Self::PushContent { .. } => "PushContent",
            Self::Upload { .. } => "Upload",
            Self::Download { .. } => "Download",
            Self::SendWith { .. } => "SendWith",
            Self::Block { .. } => "Block",
            Self::Unblock { .. } => "Unblock",
            Self::ListBlocked { .. } => "ListBlocked",
            Self::Accept { .. } => "Accept",
            Self::ListRequests { .. } => "ListRequests",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{codec, tests::hex};

    fn all() -> Vec<(ClientFrame, &'static str)> {
        vec![
            (
                ClientFrame::Hello {
                    version: 3,
                    token: "t.k.n".into(),
                    device: "cli".into(),
                    zone: None,
                },
                "0d 00 03 05 74 2e 6b 2e 6e 03 63 6c 69 00",
            ),
            (
                ClientFrame::Hello {
                    version: 3,
                    token: "t".into(),
                    device: "d".into(),
                    zone: Some("eu".into()),
                },
                "0a 00 03 01 74 01 64 01 02 65 75",
            ),
            (ClientFrame::Ping { nonce: 300 }, "03 01 ac 02"),
            (ClientFrame::Sync { cursor: Some(5) }, "03 02 01 05"),
            (ClientFrame::Sync { cursor: None }, "02 02 00"),
            (ClientFrame::Ack { cursor: 42 }, "02 03 2a"),
            (
                ClientFrame::ListConversations {
                    request: 1,
                    after: 0,
                    limit: 100,
                },
                "04 04 01 00 64",
            ),
            (
                ClientFrame::Open {
                    target: Target::Direct("bob".into()),
                    create: true,
                },
                "07 05 01 03 62 6f 62 01",
            ),
            (
                ClientFrame::Open {
                    target: Target::Conversation(7),
                    create: false,
                },
                "04 05 00 07 00",
            ),
            (
                ClientFrame::Send {
                    id: ClientMsgId([0xab; 16]),
                    body: Bytes::from_static(b"hi"),
                },
                "14 06 ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab 02 68 69",
            ),
            (
                ClientFrame::History {
                    request: 2,
                    before: Some(10),
                    after: None,
                    limit: 50,
                },
                "06 07 02 01 0a 00 32",
            ),
            (ClientFrame::Delivered { up_to: 7 }, "02 08 07"),
            (ClientFrame::Read { up_to: 300 }, "03 09 ac 02"),
            (
                ClientFrame::Presence {
                    request: 3,
                    user: "bob".into(),
                },
                "06 0a 03 03 62 6f 62",
            ),
            (
                ClientFrame::CreateGroup {
                    request: 4,
                    title: "t".into(),
                    members: vec!["bo".into(), "cy".into()],
                    retention: Retention::Ttl(600),
                },
                "0e 0b 04 01 74 02 02 62 6f 02 63 79 02 d8 04",
            ),
            (
                ClientFrame::AddMember {
                    request: 5,
                    user: "cy".into(),
                },
                "05 0c 05 02 63 79",
            ),
            (
                ClientFrame::RemoveMember {
                    request: 6,
                    user: "cy".into(),
                },
                "05 0d 06 02 63 79",
            ),
            (ClientFrame::Leave { request: 7 }, "02 0e 07"),
            (
                ClientFrame::Promote {
                    request: 8,
                    user: "bo".into(),
                },
                "05 0f 08 02 62 6f",
            ),
            (
                ClientFrame::Members {
                    request: 9,
                    after: "bo".into(),
                    limit: 200,
                },
                "07 10 09 02 62 6f c8 01",
            ),
            (ClientFrame::Delete { request: 1, seq: 4 }, "03 11 01 04"),
            (
                ClientFrame::ClearHistory {
                    request: 2,
                    up_to: 9,
                },
                "03 12 02 09",
            ),
            (
                ClientFrame::SetRetention {
                    request: 3,
                    policy: Retention::UntilDelivered,
                },
                "03 13 03 01",
            ),
            (
                ClientFrame::RegisterPusher {
                    request: 1,
                    pusher: Pusher::Gateway {
                        url: "u".into(),
                        app_id: "a".into(),
                        pushkey: "k".into(),
                    },
                },
                "09 14 01 00 01 75 01 61 01 6b",
            ),
            (
                ClientFrame::UnregisterPusher {
                    request: 2,
                    key: "k".into(),
                },
                "04 15 02 01 6b",
            ),
            (ClientFrame::ListPushers { request: 3 }, "02 16 03"),
            (
                ClientFrame::PushContent {
                    request: 4,
                    conversation: 7,
                    include: true,
                },
                "04 17 04 07 01",
            ),
            (
                ClientFrame::RegisterPusher {
                    request: 5,
                    pusher: Pusher::WebPush {
                        endpoint: "e".into(),
                        p256dh: Some("p".into()),
                        auth: Some("a".into()),
                    },
                },
                "0b 14 05 01 01 65 01 01 70 01 01 61",
            ),
            (
                ClientFrame::SetRetention {
                    request: 6,
                    policy: Retention::Keep,
                },
                "03 13 06 00",
            ),
            (
                ClientFrame::Upload {
                    size: 300,
                    object: ObjectId([0xab; 32]),
                },
                "23 18 ac 02 ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab",
            ),
            (
                ClientFrame::Download {
                    object: ObjectId([0xcd; 32]),
                    conversation: 7,
                    seq: 2,
                    offset: 0,
                    length: 0,
                },
                "25 19 cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd 07 02 00 00",
            ),
            (
                ClientFrame::SendWith {
                    id: ClientMsgId([0x01; 16]),
                    body: Bytes::from_static(b"p"),
                    objects: vec![ObjectId([0xef; 32])],
                },
                "34 1a 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 70 01 ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef ef",
            ),
            (
                ClientFrame::Block {
                    request: 1,
                    user: "eve".into(),
                },
                "06 1b 01 03 65 76 65",
            ),
            (
                ClientFrame::Unblock {
                    request: 2,
                    user: "eve".into(),
                },
                "06 1c 02 03 65 76 65",
            ),
            (ClientFrame::ListBlocked { request: 3 }, "02 1d 03"),
            (
                ClientFrame::Accept {
                    request: 4,
                    conversation: 7,
                },
                "03 1e 04 07",
            ),
            (ClientFrame::ListRequests { request: 5 }, "02 1f 05"),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for (frame, _) in all() {
            let bytes = codec::encode_to_vec(&frame, 1 << 16).expect("encode");
            let mut src = bytes::BytesMut::from(&bytes[..]);
            let back: ClientFrame = codec::decode(&mut src, 1 << 16).expect("decode");
            assert_eq!(back, frame);
            assert!(src.is_empty());
        }
    }

    #[test]
    fn a_hello_in_debug_output_never_shows_its_token() {
        let hello = ClientFrame::Hello {
            version: 3,
            token: "eyJhbGciOiJFZERTQSJ9.secret-claims.signature".into(),
            device: "phone".into(),
            zone: None,
        };
        let shown = format!("{hello:?} {hello:#?}");
        assert!(!shown.contains("secret-claims"), "{shown}");
        assert!(shown.contains("44 bytes, redacted"), "{shown}");
    }

    #[test]
    fn a_version_2_hello_is_read_without_a_zone() {
        let v2 = [0x00, 0x02, 0x01, b't', 0x01, b'd'];
        assert_eq!(
            ClientFrame::decode_first(&v2).expect("version 2 Hello"),
            ClientFrame::Hello {
                version: 2,
                token: "t".into(),
                device: "d".into(),
                zone: None,
            }
        );
        assert!(include_str!("../../../PROTOCOL.md").contains("`00 02 01 74 01 64`"));
        // A version 3 Hello missing its zone, and anything else cut short, stays an error.
        assert!(ClientFrame::decode_first(&[0x00, 0x03, 0x01, b't', 0x01, b'd']).is_err());
        assert!(ClientFrame::decode_first(&[0x00, 0x02, 0x01, b't']).is_err());
        assert_eq!(
            ClientFrame::decode_first(&[0x01, 0x05]).expect("Ping"),
            ClientFrame::Ping { nonce: 5 }
        );
    }

    #[test]
    fn datagram_pinned_bytes() {
        let d = crate::ClientDatagram::Typing { conversation: 7 };
        let bytes = postcard::to_stdvec(&d).expect("encode");
        assert_eq!(hex(&bytes), "00 07");
        assert!(include_str!("../../../PROTOCOL.md").contains("`00 07`"));
        let back: crate::ClientDatagram = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, d);
    }

    #[test]
    fn pinned_byte_vectors() {
        // These are the bytes PROTOCOL.md shows. If this fails, the wire format changed:
        // bump the protocol version or undo the change.
        for (frame, expected) in all() {
            let bytes = codec::encode_to_vec(&frame, 1 << 16).expect("encode");
            assert_eq!(hex(&bytes), expected, "{frame:?}");
            assert!(
                include_str!("../../../PROTOCOL.md").contains(expected),
                "PROTOCOL.md lacks the example for {frame:?}"
            );
        }
    }
}
