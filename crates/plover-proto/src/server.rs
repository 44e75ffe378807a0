//! Frames the server sends.

use serde::{Deserialize, Serialize};

use super::types::{
    ClientMsgId, ConversationId, ConversationInfo, ConversationKind, ErrorCode, Event, MemberInfo,
    Message, MessageRequest, ObjectId, Pusher,
};

/// Every frame the server may send, on any stream.
///
/// On the control stream: `Welcome`, `Pong`, `SyncStarted`, `Conversations`, `Error`. On a
/// conversation stream the client opened: `Opened`, `Sent`, `SendFailed`, `HistoryPage`, `Error`.
/// On a delivery stream the server opened: `Event` only. Variant order is the wire format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The session is open.
    Welcome {
        /// The server's protocol version.
        version: u16,
        /// The authenticated user.
        user: String,
        /// The device, as the server knows it.
        device: String,
        /// The server's id (for logs and, later, multi-node routing).
        server_id: String,
        /// How often the client should send `Ping`, in milliseconds.
        heartbeat_ms: u32,
        /// The largest frame body either side may send.
        max_frame: u32,
        /// The largest message body the server accepts.
        max_body: u32,
    },
    /// Answer to `Ping`.
    Pong {
        /// The nonce of the `Ping`.
        nonce: u64,
    },
    /// Event delivery has started.
    SyncStarted {
        /// The position delivery resumes after.
        cursor: u64,
        /// The latest position of the user's log when delivery started.
        head: u64,
    },
    /// Answer to `ListConversations`.
    Conversations {
        /// The request's id.
        request: u32,
        /// A page of the caller's conversations, by id.
        items: Vec<ConversationInfo>,
        /// Whether more follow (ask again with `after` = the last id).
        more: bool,
    },
    /// Answer to `Open`.
    Opened {
        /// The conversation the stream is now bound to.
        conversation: ConversationId,
        /// Direct or group.
        kind: ConversationKind,
        /// A group's title (empty for a direct conversation).
        title: String,
        /// How many members it has.
        member_count: u32,
        /// Its members, sorted, if at most `INLINE_MEMBERS` (else empty: page with `Members`).
        members: Vec<String>,
        /// A group's admins, sorted, on the same condition.
        admins: Vec<String>,
        /// The sequence number of its latest message when the stream was opened.
        last_seq: u64,
    },
    /// The message is durable and has this sequence number.
    Sent {
        /// The client's id of the message.
        id: ClientMsgId,
        /// Its sequence number in the conversation.
        seq: u64,
        /// Server time of acceptance, Unix milliseconds.
        ts: u64,
        /// The message's position in the sender's own sync log, 0 if not known (an answer to
        /// a retry). This answer is the message's delivery to this connection: its feed skips
        /// that position, and the client takes it from here.
        log: u64,
    },
    /// The message was not stored.
    SendFailed {
        /// The client's id of the message.
        id: ClientMsgId,
        /// Why.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
    /// Answer to `History`.
    HistoryPage {
        /// The request's id.
        request: u32,
        /// The messages, oldest first.
        messages: Vec<Message>,
        /// Whether more messages lie beyond this page in the direction asked.
        more: bool,
    },
    /// One entry of the user's sync log.
    Event {
        /// Its position in the user's log.
        log: u64,
        /// What happened.
        event: Event,
    },
    /// Something went wrong; `request` names the request when there is one.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
        /// The request id it answers, if any.
        request: Option<u32>,
    },
    /// Answer to `Presence`.
    PresenceInfo {
        /// The request's id.
        request: u32,
        /// The user asked about.
        user: String,
        /// Whether at least one of their devices is connected.
        online: bool,
        /// When their last device went, Unix ms (0 if never seen; meaningless while online).
        last_seen: u64,
    },
    /// A user who shares a conversation with this one came online or went offline.
    /// Unsolicited, on the control stream; debounced so a flapping connection does not flood.
    PresenceChanged {
        /// Who.
        user: String,
        /// Online now?
        online: bool,
        /// When their last device went, Unix ms (when offline).
        last_seen: u64,
    },
    /// Answer to `CreateGroup`.
    GroupCreated {
        /// The request's id.
        request: u32,
        /// The new group.
        conversation: ConversationId,
    },
    /// A membership request was carried out (`seq` of its event), or changed nothing (`seq` 0:
    /// already a member, not a member, already an admin), so retries are safe.
    Done {
        /// The request's id.
        request: u32,
        /// The membership event's sequence number, or 0.
        seq: u64,
    },
    /// Answer to `Members`.
    MemberPage {
        /// The request's id.
        request: u32,
        /// Members in name order.
        members: Vec<MemberInfo>,
        /// Whether more follow (ask again with `after` = the last name).
        more: bool,
    },
    /// Answer to `ListPushers`.
    Pushers {
        /// The request's id.
        request: u32,
        /// The user's pushers.
        pushers: Vec<Pusher>,
    },
    /// Answer to `Upload`: send the object's bytes from `offset` on (the server already
    /// holds those before it, from an earlier attempt; `offset` = size: it holds them all).
    UploadReady {
        /// Where to resume.
        offset: u64,
    },
    /// The upload is checked and stored: the object may now be referenced (`SendWith`).
    Uploaded {
        /// The object's id.
        object: ObjectId,
    },
    /// Answer to `Download`: the range's bytes follow, raw, then the end of the stream.
    DownloadReady {
        /// The whole object's size.
        size: u64,
        /// The first byte that follows.
        offset: u64,
        /// How many bytes follow.
        length: u64,
    },
    /// Answer to `ListBlocked`: the users this user blocked, in name order.
    Blocked {
        /// The request's id.
        request: u32,
        /// The users.
        users: Vec<String>,
    },
    /// Answer to `ListRequests`: the conversations this user has not accepted yet.
    Requests {
        /// The request's id.
        request: u32,
        /// Each conversation and who started it or added this user.
        requests: Vec<MessageRequest>,
    },
}

impl ServerFrame {
    /// An `Error` frame not tied to a request.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
            request: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConversationChange, Marks, Receipt, ServerDatagram, codec, tests::hex};
    use bytes::Bytes;

    fn message() -> Message {
        Message {
            conversation: 1,
            seq: 2,
            from: "al".into(),
            device: "d".into(),
            ts: 1,
            id: ClientMsgId([0x01; 16]),
            body: Bytes::from_static(b"yo"),
            change: None,
        }
    }

    fn all() -> Vec<(ServerFrame, &'static str)> {
        vec![
            (
                ServerFrame::Welcome {
                    version: 2,
                    user: "al".into(),
                    device: "d".into(),
                    server_id: "s".into(),
                    heartbeat_ms: 10_000,
                    max_frame: 65_536,
                    max_body: 60_000,
                },
                "11 00 02 02 61 6c 01 64 01 73 90 4e 80 80 04 e0 d4 03",
            ),
            (ServerFrame::Pong { nonce: 1 }, "02 01 01"),
            (
                ServerFrame::SyncStarted { cursor: 3, head: 9 },
                "03 02 03 09",
            ),
            (
                ServerFrame::Conversations {
                    request: 1,
                    items: vec![ConversationInfo {
                        conversation: 1,
                        kind: ConversationKind::Direct,
                        title: String::new(),
                        member_count: 2,
                        members: vec!["al".into(), "bo".into()],
                        last_seq: 4,
                        marks: vec![Marks {
                            user: "bo".into(),
                            delivered: 4,
                            read: 2,
                        }],
                        unread: 1,
                        retention: crate::Retention::Keep,
                    }],
                    more: false,
                },
                "18 03 01 01 01 00 00 02 02 02 61 6c 02 62 6f 04 01 02 62 6f 04 02 01 00 00",
            ),
            (
                ServerFrame::Opened {
                    conversation: 1,
                    kind: ConversationKind::Direct,
                    title: String::new(),
                    member_count: 2,
                    members: vec!["al".into(), "bo".into()],
                    admins: vec![],
                    last_seq: 5,
                },
                "0e 04 01 00 00 02 02 02 61 6c 02 62 6f 00 05",
            ),
            (
                ServerFrame::Sent {
                    id: ClientMsgId([0x01; 16]),
                    seq: 2,
                    ts: 3,
                    log: 4,
                },
                "14 05 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 02 03 04",
            ),
            (
                ServerFrame::SendFailed {
                    id: ClientMsgId([0x01; 16]),
                    code: ErrorCode::NOT_MEMBER,
                    message: "no".into(),
                },
                "15 06 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 0a 02 6e 6f",
            ),
            (
                ServerFrame::HistoryPage {
                    request: 1,
                    messages: vec![message()],
                    more: false,
                },
                "20 07 01 01 01 02 02 61 6c 01 64 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 02 79 6f 00 00",
            ),
            (
                ServerFrame::Event {
                    log: 5,
                    event: Event::Message(message()),
                },
                "1f 08 05 00 01 02 02 61 6c 01 64 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 02 79 6f 00",
            ),
            (
                ServerFrame::error(ErrorCode::TOKEN_EXPIRED, "expired"),
                "0b 09 08 07 65 78 70 69 72 65 64 00",
            ),
            (
                ServerFrame::Event {
                    log: 6,
                    event: Event::Receipt(Receipt {
                        conversation: 1,
                        user: "bo".into(),
                        delivered: 2,
                        read: 1,
                    }),
                },
                "09 08 06 01 01 02 62 6f 02 01",
            ),
            (
                ServerFrame::PresenceInfo {
                    request: 3,
                    user: "bo".into(),
                    online: false,
                    last_seen: 1000,
                },
                "08 0a 03 02 62 6f 00 e8 07",
            ),
            (
                ServerFrame::PresenceChanged {
                    user: "bo".into(),
                    online: true,
                    last_seen: 0,
                },
                "06 0b 02 62 6f 01 00",
            ),
            (
                ServerFrame::GroupCreated {
                    request: 4,
                    conversation: 9,
                },
                "03 0c 04 09",
            ),
            (ServerFrame::Done { request: 5, seq: 3 }, "03 0d 05 03"),
            (
                ServerFrame::Event {
                    log: 8,
                    event: Event::Deleted {
                        conversation: 9,
                        seq: 4,
                        by: "al".into(),
                    },
                },
                "08 08 08 02 09 04 02 61 6c",
            ),
            (
                ServerFrame::Pushers {
                    request: 3,
                    pushers: vec![Pusher::WebPush {
                        endpoint: "e".into(),
                        p256dh: None,
                        auth: None,
                    }],
                },
                "08 0f 03 01 01 01 65 00 00",
            ),
            (
                ServerFrame::MemberPage {
                    request: 9,
                    members: vec![MemberInfo {
                        user: "cy".into(),
                        admin: false,
                        since: 3,
                        delivered: 4,
                        read: 3,
                    }],
                    more: true,
                },
                "0b 0e 09 01 02 63 79 00 03 04 03 01",
            ),
            (ServerFrame::UploadReady { offset: 300 }, "03 10 ac 02"),
            (
                ServerFrame::Uploaded {
                    object: ObjectId([0xab; 32]),
                },
                "21 11 ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab",
            ),
            (
                ServerFrame::DownloadReady {
                    size: 300,
                    offset: 100,
                    length: 200,
                },
                "06 12 ac 02 64 c8 01",
            ),
            (
                ServerFrame::Blocked {
                    request: 3,
                    users: vec!["eve".into()],
                },
                "07 13 03 01 03 65 76 65",
            ),
            (
                ServerFrame::Requests {
                    request: 5,
                    requests: vec![MessageRequest {
                        conversation: 7,
                        from: "eve".into(),
                    }],
                },
                "08 14 05 01 07 03 65 76 65",
            ),
            (
                change(ConversationChange::Added { user: "cy".into() }),
                "21 08 07 00 09 03 02 61 6c 01 64 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 01 02 63 79",
            ),
            (
                change(ConversationChange::Created {
                    title: "g".into(),
                    members: vec!["al".into(), "cy".into()],
                }),
                "27 08 07 00 09 03 02 61 6c 01 64 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 00 01 67 02 02 61 6c 02 63 79",
            ),
            (
                change(ConversationChange::Removed { user: "cy".into() }),
                "21 08 07 00 09 03 02 61 6c 01 64 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 02 02 63 79",
            ),
            (
                change(ConversationChange::Left {
                    promoted: Some("cy".into()),
                }),
                "22 08 07 00 09 03 02 61 6c 01 64 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 03 01 02 63 79",
            ),
            (
                change(ConversationChange::Promoted { user: "cy".into() }),
                "21 08 07 00 09 03 02 61 6c 01 64 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 04 02 63 79",
            ),
            (
                change(ConversationChange::Retention {
                    policy: crate::Retention::Ttl(60),
                }),
                "20 08 07 00 09 03 02 61 6c 01 64 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 05 02 3c",
            ),
            (
                change(ConversationChange::Erased),
                "1e 08 07 00 09 03 02 61 6c 01 64 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 06",
            ),
            (
                ServerFrame::Error {
                    code: ErrorCode::INVALID_REQUEST,
                    message: "no".into(),
                    request: Some(4),
                },
                "07 09 0d 02 6e 6f 01 04",
            ),
            (
                ServerFrame::Opened {
                    conversation: 9,
                    kind: ConversationKind::Group,
                    title: "g".into(),
                    member_count: 2,
                    members: vec!["al".into(), "cy".into()],
                    admins: vec!["al".into()],
                    last_seq: 3,
                },
                "12 04 09 01 01 67 02 02 02 61 6c 02 63 79 01 02 61 6c 03",
            ),
        ]
    }

    /// A change event of conversation 9 at seq 3, as the members' logs carry it.
    fn change(change: ConversationChange) -> ServerFrame {
        ServerFrame::Event {
            log: 7,
            event: Event::Message(Message {
                conversation: 9,
                seq: 3,
                from: "al".into(),
                device: "d".into(),
                ts: 1,
                id: ClientMsgId([0; 16]),
                body: Bytes::new(),
                change: Some(change),
            }),
        }
    }

    #[test]
    fn every_frame_round_trips() {
        for (frame, _) in all() {
            let bytes = codec::encode_to_vec(&frame, 1 << 16).expect("encode");
            let mut src = bytes::BytesMut::from(&bytes[..]);
            let back: ServerFrame = codec::decode(&mut src, 1 << 16).expect("decode");
            assert_eq!(back, frame);
        }
    }

    #[test]
    fn datagram_pinned_bytes() {
        let d = ServerDatagram::Typing {
            conversation: 7,
            user: "bo".into(),
        };
        let bytes = postcard::to_stdvec(&d).expect("encode");
        assert_eq!(hex(&bytes), "00 07 02 62 6f");
        assert!(include_str!("../../../PROTOCOL.md").contains("`00 07 02 62 6f`"));
        let back: ServerDatagram = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, d);
    }

    #[test]
    fn pinned_byte_vectors() {
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
