//! A conversation stream: sends with their acknowledgements, history, receipts, membership.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

use crate::ClientError;
use crate::answers::{
    Answers, LogEvent, OwnEvents, closed_reason, lock, read_answers, refused, stream_failure,
    unexpected,
};
use plover_proto::{
    ClientFrame, ClientMsgId, ConversationId, ConversationKind, Event, MemberInfo, Message,
    Retention, ServerFrame, Target,
};
use plover_quic::{FrameReader, FrameWriter};

/// The message's place in its conversation, as acknowledged by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The conversation.
    pub conversation: ConversationId,
    /// The message's sequence number.
    pub seq: u64,
    /// Server time of acceptance, Unix ms.
    pub ts: u64,
    /// The client id it was sent with.
    pub id: ClientMsgId,
}

type SendWaiter = oneshot::Sender<Result<(u64, u64), ClientError>>;
type RequestWaiter = oneshot::Sender<Result<ServerFrame, ClientError>>;

/// A send awaiting its answer: the body (for the event the answer makes) and who waits.
struct PendingSend {
    body: Bytes,
    waiters: Vec<SendWaiter>,
}

/// Who sends on a conversation stream, and where the events of its own sends go.
pub(crate) struct Owner {
    pub(crate) user: String,
    pub(crate) device: String,
    pub(crate) sink: OwnEvents,
}

struct Waiters {
    sends: HashMap<ClientMsgId, PendingSend>,
    requests: HashMap<u32, RequestWaiter>,
    /// Set once the stream is gone; later requests fail at once.
    failed: Option<ClientError>,
    /// The conversation, and who sends on it: what the events of its own sends are made of.
    conversation: ConversationId,
    owner: Owner,
}

impl Answers for Waiters {
    fn answer(&mut self, frame: ServerFrame) -> Result<(), ClientError> {
        match frame {
            ServerFrame::Sent { id, seq, ts, log } => {
                let Some(pending) = self.sends.remove(&id) else {
                    return Ok(());
                };
                if log != 0
                    && let Some(sink) = &*lock(&self.owner.sink)
                {
                    // The server skipped this position on the connection's feed: this is the
                    // event, exactly as the log holds it.
                    let message = Message {
                        conversation: self.conversation,
                        seq,
                        from: self.owner.user.clone(),
                        device: self.owner.device.clone(),
                        ts,
                        id,
                        body: pending.body,
                        change: None,
                    };
                    let _ = sink.send(LogEvent {
                        pos: log,
                        event: Event::Message(message),
                    });
                }
                for waiter in pending.waiters {
                    let _ = waiter.send(Ok((seq, ts)));
                }
            }
            ServerFrame::SendFailed { id, code, message } => {
                for waiter in self
                    .sends
                    .remove(&id)
                    .map(|p| p.waiters)
                    .unwrap_or_default()
                {
                    let _ = waiter.send(Err(refused(code, message.clone())));
                }
            }
            ServerFrame::HistoryPage { request, .. }
            | ServerFrame::Done { request, .. }
            | ServerFrame::MemberPage { request, .. } => {
                if let Some(waiter) = self.requests.remove(&request) {
                    let _ = waiter.send(Ok(frame));
                }
            }
            ServerFrame::Error {
                code,
                message,
                request: Some(request),
            } => {
                if let Some(waiter) = self.requests.remove(&request) {
                    let _ = waiter.send(Err(refused(code, message)));
                }
            }
            ServerFrame::Error { code, message, .. } => return Err(refused(code, message)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected frame on a conversation stream: {other:?}"
                )));
            }
        }
        Ok(())
    }

    fn fail_all(&mut self, e: &ClientError) {
        for (_, pending) in self.sends.drain() {
            for w in pending.waiters {
                let _ = w.send(Err(e.clone()));
            }
        }
        for (_, w) in self.requests.drain() {
            let _ = w.send(Err(e.clone()));
        }
        self.failed = Some(e.clone());
    }
}

/// What `Opened` said.
#[derive(Debug, Clone)]
struct OpenedInfo {
    id: ConversationId,
    kind: ConversationKind,
    title: String,
    member_count: u32,
    members: Vec<String>,
    admins: Vec<String>,
    last_seq: u64,
}

/// A stream bound to one conversation, for sending and reading history. Requests may be
/// issued concurrently; each waits for its own answer.
pub struct Conversation {
    info: OpenedInfo,
    writer: tokio::sync::Mutex<FrameWriter>,
    waiters: Arc<Mutex<Waiters>>,
    next_request: AtomicU32,
    reader_task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Conversation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversation")
            .field("id", &self.info.id)
            .field("title", &self.info.title)
            .finish()
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        // With sends unanswered the reader runs on: their answers are their events for this
        // device (see `OwnEvents`). Dropping the writer finishes the stream, so the server
        // answers what it has and finishes its side, which ends the reader.
        if let Some(task) = &self.reader_task
            && lock(&self.waiters).sends.is_empty()
        {
            task.abort();
        }
    }
}

impl Conversation {
    /// Opens a stream on `conn` bound to a conversation (see [`Connection::open`](crate::Connection::open)).
    pub(crate) async fn open(
        conn: &quinn::Connection,
        max: u32,
        owner: Owner,
        target: Target,
        create: bool,
    ) -> Result<Self, ClientError> {
        let (send, recv) = conn.open_bi().await?;
        let mut writer = FrameWriter::new(send, max);
        let mut reader = FrameReader::new(recv, max);
        writer
            .send(&ClientFrame::Open { target, create })
            .await
            .map_err(|e| stream_failure(conn, e))?;
        let info = match reader.next::<ServerFrame>().await {
            Ok(Some(ServerFrame::Opened {
                conversation,
                kind,
                title,
                member_count,
                members,
                admins,
                last_seq,
            })) => OpenedInfo {
                id: conversation,
                kind,
                title,
                member_count,
                members,
                admins,
                last_seq,
            },
            Ok(Some(ServerFrame::Error { code, message, .. })) => {
                return Err(refused(code, message));
            }
            Ok(Some(other)) => return Err(unexpected("Opened", &other)),
            Ok(None) => return Err(closed_reason(conn)),
            Err(e) => return Err(stream_failure(conn, e)),
        };
        let waiters = Arc::new(Mutex::new(Waiters {
            sends: HashMap::new(),
            requests: HashMap::new(),
            failed: None,
            conversation: info.id,
            owner,
        }));
        let task = tokio::spawn(read_answers(reader, waiters.clone(), conn.clone()));
        Ok(Conversation {
            info,
            writer: tokio::sync::Mutex::new(writer),
            waiters,
            next_request: AtomicU32::new(1),
            reader_task: Some(task),
        })
    }

    /// The conversation's id.
    pub fn id(&self) -> ConversationId {
        self.info.id
    }

    /// Direct or group.
    pub fn kind(&self) -> ConversationKind {
        self.info.kind
    }

    /// A group's title (empty for a direct conversation).
    pub fn title(&self) -> &str {
        &self.info.title
    }

    /// How many members it had when opened.
    pub fn member_count(&self) -> u32 {
        self.info.member_count
    }

    /// Its members when opened, sorted; empty for groups above
    /// [`plover_proto::INLINE_MEMBERS`] (use [`Conversation::all_members`]).
    pub fn members(&self) -> &[String] {
        &self.info.members
    }

    /// A group's admins when opened, on the same condition as [`Conversation::members`].
    pub fn admins(&self) -> &[String] {
        &self.info.admins
    }

    /// Adds a member (admins only). Returns the seq of the membership event, or 0 if the user
    /// was a member already.
    pub async fn add_member(&self, user: &str) -> Result<u64, ClientError> {
        let request = self.next_request();
        let frame = ClientFrame::AddMember {
            request,
            user: user.to_owned(),
        };
        self.done(self.request(request, frame).await?)
    }

    /// Removes a member (admins only; removing oneself is leaving). Returns the event's seq,
    /// or 0 if the user was not a member.
    pub async fn remove_member(&self, user: &str) -> Result<u64, ClientError> {
        let request = self.next_request();
        let frame = ClientFrame::RemoveMember {
            request,
            user: user.to_owned(),
        };
        self.done(self.request(request, frame).await?)
    }

    /// Leaves the group. Returns the event's seq.
    pub async fn leave(&self) -> Result<u64, ClientError> {
        let request = self.next_request();
        self.done(
            self.request(request, ClientFrame::Leave { request })
                .await?,
        )
    }

    /// Makes a member an admin (admins only). Returns the event's seq, or 0 if they were one.
    pub async fn promote(&self, user: &str) -> Result<u64, ClientError> {
        let request = self.next_request();
        let frame = ClientFrame::Promote {
            request,
            user: user.to_owned(),
        };
        self.done(self.request(request, frame).await?)
    }

    /// Sets the retention policy (a group's admins; either member of a direct conversation).
    /// Returns the seq of the change, or 0 if the policy was already in force.
    pub async fn set_retention(&self, policy: Retention) -> Result<u64, ClientError> {
        let request = self.next_request();
        let frame = ClientFrame::SetRetention { request, policy };
        self.done(self.request(request, frame).await?)
    }

    /// Deletes one of this user's messages for everyone. Returns its seq, or 0 if it was
    /// already gone.
    pub async fn delete(&self, seq: u64) -> Result<u64, ClientError> {
        let request = self.next_request();
        let frame = ClientFrame::Delete { request, seq };
        self.done(self.request(request, frame).await?)
    }

    /// Hides the history up to `up_to` from this user only; returns the mark in force.
    pub async fn clear_history(&self, up_to: u64) -> Result<u64, ClientError> {
        let request = self.next_request();
        let frame = ClientFrame::ClearHistory { request, up_to };
        self.done(self.request(request, frame).await?)
    }

    fn done(&self, frame: ServerFrame) -> Result<u64, ClientError> {
        match frame {
            ServerFrame::Done { seq, .. } => Ok(seq),
            other => Err(ClientError::Protocol(format!(
                "expected Done, got {other:?}"
            ))),
        }
    }

    /// A page of members (name order, after `after`) with roles and marks, and whether more
    /// follow.
    pub async fn members_page(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<MemberInfo>, bool), ClientError> {
        let request = self.next_request();
        let frame = ClientFrame::Members {
            request,
            after: after.to_owned(),
            limit,
        };
        match self.request(request, frame).await? {
            ServerFrame::MemberPage { members, more, .. } => Ok((members, more)),
            other => Err(ClientError::Protocol(format!(
                "expected MemberPage, got {other:?}"
            ))),
        }
    }

    /// Every member with roles and marks, fetched page by page.
    pub async fn all_members(&self) -> Result<Vec<MemberInfo>, ClientError> {
        let mut all: Vec<MemberInfo> = Vec::new();
        loop {
            let after = all.last().map(|m| m.user.clone()).unwrap_or_default();
            let (page, more) = self.members_page(&after, 200).await?;
            let empty = page.is_empty();
            all.extend(page);
            if !more || empty {
                return Ok(all);
            }
        }
    }

    fn next_request(&self) -> u32 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a request and waits for the frame that answers it.
    async fn request(&self, request: u32, frame: ClientFrame) -> Result<ServerFrame, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock(&self.waiters);
            if let Some(e) = &w.failed {
                return Err(e.clone());
            }
            w.requests.insert(request, tx);
        }
        self.writer
            .lock()
            .await
            .send(&frame)
            .await
            .map_err(|e| ClientError::Stream(Arc::new(e)))?;
        rx.await
            .map_err(|_| ClientError::Closed("conversation stream"))?
    }

    /// The latest message's seq when the stream was opened.
    pub fn last_seq(&self) -> u64 {
        self.info.last_seq
    }

    /// Marks every message up to `up_to` as read by this user (their other devices and the
    /// other members are told). Marks only move forward; `up_to` is capped at the last message.
    pub async fn mark_read(&self, up_to: u64) -> Result<(), ClientError> {
        self.write(&ClientFrame::Read { up_to }).await
    }

    /// Reports that every message up to `up_to` reached this device. The event stream does
    /// this by itself; this is for clients that fetch messages by other means.
    pub async fn mark_delivered(&self, up_to: u64) -> Result<(), ClientError> {
        self.write(&ClientFrame::Delivered { up_to }).await
    }

    async fn write(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        if let Some(e) = &lock(&self.waiters).failed {
            return Err(e.clone());
        }
        self.writer
            .lock()
            .await
            .send(frame)
            .await
            .map_err(|e| ClientError::Stream(Arc::new(e)))
    }

    /// Finishes the stream and waits until the server has handled everything sent on it
    /// (it finishes its side once it has read ours to the end).
    pub async fn close(mut self) {
        self.writer
            .lock()
            .await
            .finish(Duration::from_secs(2))
            .await;
        if let Some(task) = self.reader_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }

    /// Whether the stream has failed (the connection is gone or the server refused it).
    pub fn is_broken(&self) -> bool {
        lock(&self.waiters).failed.is_some()
    }

    /// Sends a message with a fresh id and waits until it is durable.
    pub async fn send(&self, body: impl Into<Bytes>) -> Result<Ack, ClientError> {
        self.send_with_id(ClientMsgId::random(), body.into()).await
    }

    /// Sends a message with the given id (a retry reuses the id) and waits until it is durable.
    /// After an error the message may or may not be stored (the connection or the stream
    /// failed, the server is shutting down, or it broke the protocol and the connection was
    /// closed): sending it again with the same id, on a new connection if this one is gone,
    /// is always safe, since one id is stored once. Only a refusal of the message itself
    /// (`not_member`, `invalid_request`) is final.
    pub async fn send_with_id(&self, id: ClientMsgId, body: Bytes) -> Result<Ack, ClientError> {
        self.send_referencing(id, body, Vec::new()).await
    }

    /// [`Conversation::send_with_id`] of a message that references uploaded objects (an
    /// attachment: [`crate::Connection::upload`]); the members may download them from
    /// this message on.
    pub async fn send_referencing(
        &self,
        id: ClientMsgId,
        body: Bytes,
        objects: Vec<plover_proto::ObjectId>,
    ) -> Result<Ack, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock(&self.waiters);
            if let Some(e) = &w.failed {
                return Err(e.clone());
            }
            w.sends
                .entry(id)
                .or_insert_with(|| PendingSend {
                    body: body.clone(),
                    waiters: Vec::new(),
                })
                .waiters
                .push(tx);
        }
        self.writer
            .lock()
            .await
            .send(&if objects.is_empty() {
                ClientFrame::Send { id, body }
            } else {
                ClientFrame::SendWith { id, body, objects }
            })
            .await
            .map_err(|e| ClientError::Stream(Arc::new(e)))?;
        let (seq, ts) = rx
            .await
            .map_err(|_| ClientError::Closed("conversation stream"))??;
        Ok(Ack {
            conversation: self.info.id,
            seq,
            ts,
            id,
        })
    }

    /// A page of history, oldest first, and whether more lie beyond it (see `History`).
    pub async fn history(
        &self,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<Message>, bool), ClientError> {
        let request = self.next_request();
        let frame = ClientFrame::History {
            request,
            before,
            after,
            limit,
        };
        match self.request(request, frame).await? {
            ServerFrame::HistoryPage { messages, more, .. } => Ok((messages, more)),
            other => Err(ClientError::Protocol(format!(
                "expected HistoryPage, got {other:?}"
            ))),
        }
    }
}
