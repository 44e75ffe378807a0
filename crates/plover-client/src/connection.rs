//! One authenticated connection to a server, and the conversation streams opened on it.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

use super::events::LogEvent;
use super::{ClientConfig, ClientError};
use plover_proto::{
    ClientDatagram, ClientFrame, ClientMsgId, ConversationId, ConversationInfo, ConversationKind,
    ErrorCode, Event, MemberInfo, Message, PROTOCOL_VERSION, Pusher, Retention, ServerFrame,
    Target,
};
use plover_quic::{FrameReader, FrameWriter};

/// What the server said in `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The authenticated user.
    pub user: String,
    /// This device.
    pub device: String,
    /// The server's id.
    pub server_id: String,
    /// How often to send heartbeats.
    pub heartbeat: Duration,
    /// The largest frame body.
    pub max_frame: u32,
    /// The largest message body.
    pub max_body: u32,
}

/// Something the server pushed on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlPush {
    /// A peer came online or went offline.
    Presence {
        /// Who.
        user: String,
        /// Online now?
        online: bool,
        /// When their last device went, Unix ms.
        last_seen: u64,
    },
}

/// Pushes buffered for the application before further ones are dropped.
const PUSH_QUEUE: usize = 256;

/// Which answer a control request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Awaiting {
    Request(u32),
    Pong(u64),
}

type ControlWaiter = oneshot::Sender<Result<ServerFrame, ClientError>>;

/// Requests in flight on the control stream, answered by the control reader task.
struct ControlWaiters {
    by_id: HashMap<Awaiting, ControlWaiter>,
    /// `SyncStarted` carries no request id: at most one `Sync` is ever in flight.
    sync: Option<ControlWaiter>,
    failed: Option<ClientError>,
    /// Presence changes, for the application (dropped when it does not keep up).
    pushes: mpsc::Sender<ControlPush>,
}

/// The waiters of one stream's answers, served by [`read_answers`].
trait Answers {
    /// Hands one frame to whoever waits for it; an error ends the stream for everyone.
    fn answer(&mut self, frame: ServerFrame) -> Result<(), ClientError>;
    /// Fails every waiter, and every later request, with `e`.
    fn fail_all(&mut self, e: &ClientError);
}

impl Answers for ControlWaiters {
    fn answer(&mut self, frame: ServerFrame) -> Result<(), ClientError> {
        let (key, answer) = match frame {
            ServerFrame::PresenceChanged {
                user,
                online,
                last_seen,
            } => {
                let _ = self.pushes.try_send(ControlPush::Presence {
                    user,
                    online,
                    last_seen,
                });
                return Ok(());
            }
            ServerFrame::Pong { nonce } => (Some(Awaiting::Pong(nonce)), Ok(frame)),
            ServerFrame::Conversations { request, .. }
            | ServerFrame::PresenceInfo { request, .. }
            | ServerFrame::GroupCreated { request, .. }
            | ServerFrame::Pushers { request, .. }
            | ServerFrame::Done { request, .. } => (Some(Awaiting::Request(request)), Ok(frame)),
            ServerFrame::SyncStarted { .. } => (None, Ok(frame)),
            ServerFrame::Error {
                code,
                message,
                request: Some(request),
            } => (
                Some(Awaiting::Request(request)),
                Err(refused(code, message)),
            ),
            ServerFrame::Error { code, message, .. } if self.sync.is_some() => {
                (None, Err(refused(code, message)))
            }
            ServerFrame::Error { code, message, .. } => return Err(refused(code, message)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected frame on the control stream: {other:?}"
                )));
            }
        };
        let waiter = match key {
            Some(key) => self.by_id.remove(&key),
            None => self.sync.take(),
        };
        if let Some(waiter) = waiter {
            let _ = waiter.send(answer);
        }
        Ok(())
    }

    fn fail_all(&mut self, e: &ClientError) {
        for (_, w) in self.by_id.drain() {
            let _ = w.send(Err(e.clone()));
        }
        if let Some(w) = self.sync.take() {
            let _ = w.send(Err(e.clone()));
        }
        self.failed = Some(e.clone());
    }
}

/// An authenticated connection.
pub struct Connection {
    endpoint: quinn::Endpoint,
    /// Whether the endpoint is this connection's own (then closing waits for it to go idle).
    owns_endpoint: bool,
    conn: quinn::Connection,
    control: Arc<tokio::sync::Mutex<FrameWriter>>,
    waiters: Arc<Mutex<ControlWaiters>>,
    pushes: Mutex<Option<mpsc::Receiver<ControlPush>>>,
    control_reader: tokio::task::JoinHandle<()>,
    heartbeat: tokio::task::JoinHandle<()>,
    welcome: Welcome,
    next_request: AtomicU32,
    own: OwnEvents,
}

/// Where the events of this connection's own sends go: the event stream syncing on it, if
/// any. The server does not send a message back to the connection it was sent on; its `Sent`
/// answer carries the message's log position, and the event is made here from what was sent.
/// Unbounded but never long: it holds at most one event per answered send, and the server
/// answers at most `inflight_sends` per stream on a bounded number of streams.
pub(super) type OwnEvents = Arc<Mutex<Option<mpsc::UnboundedSender<LogEvent>>>>;

impl Drop for Connection {
    fn drop(&mut self) {
        self.control_reader.abort();
        self.heartbeat.abort();
    }
}

/// Sends `Ping` every `interval` (the server's heartbeat) so that the connection is never idle
/// long enough to be taken for dead. The `Pong`s are ignored: QUIC notices a dead peer.
async fn heartbeat(control: Arc<tokio::sync::Mutex<FrameWriter>>, interval: Duration) {
    let mut nonce = u64::MAX / 2;
    loop {
        tokio::time::sleep(interval).await;
        nonce += 1;
        if control
            .lock()
            .await
            .send(&ClientFrame::Ping { nonce })
            .await
            .is_err()
        {
            return;
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("user", &self.welcome.user)
            .field("device", &self.welcome.device)
            .finish()
    }
}

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

/// Maps what the server said in an `Error` frame to an error.
fn refused(code: ErrorCode, message: String) -> ClientError {
    ClientError::Refused { code, message }
}

impl Connection {
    /// Connects, authenticates and returns once the server has said `Welcome`.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ClientError> {
        let addr = tokio::net::lookup_host(&config.server)
            .await
            .map_err(|e| ClientError::Resolve {
                server: config.server.clone(),
                source: Arc::new(e),
            })?
            .next()
            .ok_or_else(|| ClientError::Resolve {
                server: config.server.clone(),
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "it resolves to no address",
                )),
            })?;
        let endpoint = match &config.endpoint {
            Some(shared) => shared.clone(),
            None => crate::endpoint(&config.roots, config.keep_alive)?,
        };
        let host = config.server_name();
        let connecting = endpoint.connect(addr, &host)?;
        let conn = tokio::time::timeout(config.connect_timeout, connecting)
            .await
            .map_err(|_| ClientError::Timeout("connecting"))?
            .map_err(ClientError::from)?;
        let (send, recv) = conn.open_bi().await?;
        let max = plover_proto::DEFAULT_MAX_FRAME;
        let mut reader = FrameReader::new(recv, max);
        let mut writer = FrameWriter::new(send, max);
        writer
            .send(&ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                token: config.token.clone(),
                device: config.device.clone(),
            })
            .await
            .map_err(|e| stream_failure(&conn, e))?;
        let answer = tokio::time::timeout(config.connect_timeout, reader.next())
            .await
            .map_err(|_| ClientError::Timeout("waiting for Welcome"))?
            .map_err(|e| stream_failure(&conn, e))?;
        let welcome = match answer {
            Some(ServerFrame::Welcome {
                version: _,
                user,
                device,
                server_id,
                heartbeat_ms,
                max_frame,
                max_body,
            }) => Welcome {
                user,
                device,
                server_id,
                heartbeat: Duration::from_millis(u64::from(heartbeat_ms)),
                max_frame,
                max_body,
            },
            Some(ServerFrame::Error { code, message, .. }) => return Err(refused(code, message)),
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
            None => return Err(closed_reason(&conn)),
        };
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let waiters = Arc::new(Mutex::new(ControlWaiters {
            by_id: HashMap::new(),
            sync: None,
            failed: None,
            pushes: push_tx,
        }));
        let control_reader = tokio::spawn(read_answers(reader, waiters.clone(), conn.clone()));
        let control = Arc::new(tokio::sync::Mutex::new(writer));
        let heartbeat = tokio::spawn(heartbeat(
            control.clone(),
            welcome.heartbeat.max(Duration::from_millis(100)),
        ));
        Ok(Self {
            endpoint,
            owns_endpoint: config.endpoint.is_none(),
            conn,
            control,
            heartbeat,
            waiters,
            pushes: Mutex::new(Some(push_rx)),
            control_reader,
            welcome,
            next_request: AtomicU32::new(1),
            own: OwnEvents::default(),
        })
    }

    /// Hands the events of messages sent on this connection to `sink` (the event stream that
    /// syncs on it; see [`OwnEvents`]).
    pub(super) fn deliver_own_sends(&self, sink: mpsc::UnboundedSender<LogEvent>) {
        *lock(&self.own) = Some(sink);
    }

    /// The server's pushes on the control stream (presence changes of peers). Only the first
    /// caller gets them; unread pushes beyond a small buffer are dropped.
    pub fn take_pushes(&self) -> Option<mpsc::Receiver<ControlPush>> {
        self.pushes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Tells the members of `conversation` that this user is typing (a datagram: it may be
    /// lost; repeat it every few seconds while typing goes on).
    pub fn typing(&self, conversation: ConversationId) -> Result<(), ClientError> {
        let bytes = postcard::to_stdvec(&ClientDatagram::Typing { conversation })?;
        Ok(self.conn.send_datagram(Bytes::from(bytes))?)
    }

    /// Registers where this user's notifications go (replacing one with the same key).
    pub async fn register_pusher(&self, pusher: Pusher) -> Result<(), ClientError> {
        let request = self.request_id();
        let frame = ClientFrame::RegisterPusher { request, pusher };
        self.control_request(frame, Some(Awaiting::Request(request)))
            .await
            .map(|_| ())
    }

    /// Removes a pusher by its push key or endpoint; returns whether it existed.
    pub async fn unregister_pusher(&self, key: &str) -> Result<bool, ClientError> {
        let request = self.request_id();
        let frame = ClientFrame::UnregisterPusher {
            request,
            key: key.to_owned(),
        };
        match self
            .control_request(frame, Some(Awaiting::Request(request)))
            .await?
        {
            ServerFrame::Done { seq, .. } => Ok(seq == 1),
            other => Err(ClientError::Protocol(format!(
                "expected Done, got {other:?}"
            ))),
        }
    }

    /// This user's pushers.
    pub async fn pushers(&self) -> Result<Vec<Pusher>, ClientError> {
        let request = self.request_id();
        match self
            .control_request(
                ClientFrame::ListPushers { request },
                Some(Awaiting::Request(request)),
            )
            .await?
        {
            ServerFrame::Pushers { pushers, .. } => Ok(pushers),
            other => Err(ClientError::Protocol(format!(
                "expected Pushers, got {other:?}"
            ))),
        }
    }

    /// Opts a conversation in or out of message bodies in this user's notifications.
    pub async fn push_content(
        &self,
        conversation: ConversationId,
        include: bool,
    ) -> Result<(), ClientError> {
        let request = self.request_id();
        let frame = ClientFrame::PushContent {
            request,
            conversation,
            include,
        };
        self.control_request(frame, Some(Awaiting::Request(request)))
            .await
            .map(|_| ())
    }

    /// Whether `user` is online, else when they were last seen (Unix ms, 0 if never). Refused
    /// with `forbidden` unless the two users share a conversation.
    pub async fn presence(&self, user: &str) -> Result<(bool, u64), ClientError> {
        let request = self.request_id();
        match self
            .control_request(
                ClientFrame::Presence {
                    request,
                    user: user.to_owned(),
                },
                Some(Awaiting::Request(request)),
            )
            .await?
        {
            ServerFrame::PresenceInfo {
                online, last_seen, ..
            } => Ok((online, last_seen)),
            other => Err(ClientError::Protocol(format!(
                "expected PresenceInfo, got {other:?}"
            ))),
        }
    }

    /// What the server said in `Welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The authenticated user.
    pub fn user(&self) -> &str {
        &self.welcome.user
    }

    /// QUIC's counters for this connection: packets, bytes and frames by type, each way.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    pub(super) fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    fn request_id(&self) -> u32 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends one control frame and waits for its answer (`None`: the `SyncStarted` slot).
    async fn control_request(
        &self,
        frame: ClientFrame,
        awaiting: Option<Awaiting>,
    ) -> Result<ServerFrame, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock(&self.waiters);
            if let Some(e) = &w.failed {
                return Err(e.clone());
            }
            match awaiting {
                Some(key) => {
                    w.by_id.insert(key, tx);
                }
                None => w.sync = Some(tx),
            }
        }
        self.control_send(frame).await?;
        rx.await.map_err(|_| closed_reason(&self.conn))?
    }

    /// Sends a control frame that has no answer.
    pub(super) async fn control_send(&self, frame: ClientFrame) -> Result<(), ClientError> {
        self.control
            .lock()
            .await
            .send(&frame)
            .await
            .map_err(|e| stream_failure(&self.conn, e))
    }

    /// Round trip of a `Ping` on the control stream.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        let nonce = u64::from(self.request_id());
        match self
            .control_request(ClientFrame::Ping { nonce }, Some(Awaiting::Pong(nonce)))
            .await?
        {
            ServerFrame::Pong { nonce: n } if n == nonce => Ok(start.elapsed()),
            other => Err(ClientError::Protocol(format!(
                "expected Pong, got {other:?}"
            ))),
        }
    }

    /// All the caller's conversations, by id (fetched page by page).
    pub async fn conversations(&self) -> Result<Vec<ConversationInfo>, ClientError> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let request = self.request_id();
            let frame = ClientFrame::ListConversations {
                request,
                after,
                limit: 100,
            };
            match self
                .control_request(frame, Some(Awaiting::Request(request)))
                .await?
            {
                ServerFrame::Conversations { items, more, .. } => {
                    after = items.last().map_or(after, |c| c.conversation);
                    let empty = items.is_empty();
                    all.extend(items);
                    if !more || empty {
                        return Ok(all);
                    }
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected Conversations, got {other:?}"
                    )));
                }
            }
        }
    }

    /// Creates a group with this user as its first admin; returns its id.
    pub async fn create_group(
        &self,
        title: &str,
        members: &[String],
    ) -> Result<ConversationId, ClientError> {
        self.create_group_with(title, members, Retention::Keep)
            .await
    }

    /// Creates a group with a retention policy; returns its id.
    pub async fn create_group_with(
        &self,
        title: &str,
        members: &[String],
        retention: Retention,
    ) -> Result<ConversationId, ClientError> {
        let request = self.request_id();
        let frame = ClientFrame::CreateGroup {
            request,
            title: title.to_owned(),
            members: members.to_vec(),
            retention,
        };
        match self
            .control_request(frame, Some(Awaiting::Request(request)))
            .await?
        {
            ServerFrame::GroupCreated { conversation, .. } => Ok(conversation),
            other => Err(ClientError::Protocol(format!(
                "expected GroupCreated, got {other:?}"
            ))),
        }
    }

    /// Starts event delivery after `cursor`; returns (cursor, head) as the server resolved them.
    pub(super) async fn start_sync(&self, cursor: Option<u64>) -> Result<(u64, u64), ClientError> {
        match self
            .control_request(ClientFrame::Sync { cursor }, None)
            .await?
        {
            ServerFrame::SyncStarted { cursor, head } => Ok((cursor, head)),
            other => Err(ClientError::Protocol(format!(
                "expected SyncStarted, got {other:?}"
            ))),
        }
    }

    /// Opens a stream bound to a conversation. With `create`, the direct conversation with a
    /// user is created if it does not exist yet.
    pub async fn open(&self, target: Target, create: bool) -> Result<Conversation, ClientError> {
        let (send, recv) = self.conn.open_bi().await?;
        let max = self.welcome.max_frame;
        let mut writer = FrameWriter::new(send, max);
        let mut reader = FrameReader::new(recv, max);
        writer
            .send(&ClientFrame::Open { target, create })
            .await
            .map_err(|e| stream_failure(&self.conn, e))?;
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
            Ok(Some(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected Opened, got {other:?}"
                )));
            }
            Ok(None) => return Err(closed_reason(&self.conn)),
            Err(e) => return Err(stream_failure(&self.conn, e)),
        };
        let waiters = Arc::new(Mutex::new(Waiters {
            sends: HashMap::new(),
            requests: HashMap::new(),
            failed: None,
            own: Own {
                conversation: info.id,
                user: self.welcome.user.clone(),
                device: self.welcome.device.clone(),
                sink: self.own.clone(),
            },
        }));
        let task = tokio::spawn(read_answers(reader, waiters.clone(), self.conn.clone()));
        Ok(Conversation {
            info,
            writer: tokio::sync::Mutex::new(writer),
            waiters,
            next_request: AtomicU32::new(1),
            reader_task: Some(task),
        })
    }

    /// Closes the connection cleanly: finishes the control stream, so that the server handles
    /// every frame sent on it (a last `Ack`, say) before it closes the connection, then waits
    /// for the close to complete.
    pub async fn close(self) {
        self.control
            .lock()
            .await
            .finish(Duration::from_secs(2))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.closed()).await;
        self.conn
            .close(quinn::VarInt::from(ErrorCode::NORMAL.0), b"bye");
        if self.owns_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        }
    }
}

/// The error to report when a stream failed: the connection's close reason if it has one.
pub(super) fn stream_failure(conn: &quinn::Connection, e: plover_quic::StreamError) -> ClientError {
    match conn.close_reason() {
        Some(reason) => ClientError::from(reason),
        None => ClientError::Stream(Arc::new(e)),
    }
}

/// Closes the connection because the server broke the protocol on one of its streams (bytes
/// that are not a frame, a frame that does not belong there). Whatever that stream carried
/// after the fault is lost with it, an answer or an event, so the connection cannot be trusted
/// to be complete: closing it makes the event stream reconnect and resume after its cursor,
/// which fills any gap from the server's store.
pub(super) fn close_violated(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    tracing::warn!(
        code = code.name(),
        reason,
        "the server broke the protocol; closing"
    );
    // The reason travels in the CONNECTION_CLOSE frame: keep it well inside one packet.
    let mut end = reason.len().min(200);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(quinn::VarInt::from(code.0), &reason.as_bytes()[..end]);
}

/// Only map operations happen under these locks, never an await.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn closed_reason(conn: &quinn::Connection) -> ClientError {
    match conn.close_reason() {
        Some(reason) => ClientError::from(reason),
        None => ClientError::Closed("stream"),
    }
}

type SendWaiter = oneshot::Sender<Result<(u64, u64), ClientError>>;
type RequestWaiter = oneshot::Sender<Result<ServerFrame, ClientError>>;

/// A send awaiting its answer: the body (for the event the answer makes) and who waits.
struct PendingSend {
    body: Bytes,
    waiters: Vec<SendWaiter>,
}

/// What a conversation stream needs to make the events of its own sends.
struct Own {
    conversation: ConversationId,
    user: String,
    device: String,
    sink: OwnEvents,
}

struct Waiters {
    sends: HashMap<ClientMsgId, PendingSend>,
    requests: HashMap<u32, RequestWaiter>,
    /// Set once the stream is gone; later requests fail at once.
    failed: Option<ClientError>,
    own: Own,
}

impl Answers for Waiters {
    fn answer(&mut self, frame: ServerFrame) -> Result<(), ClientError> {
        match frame {
            ServerFrame::Sent { id, seq, ts, log } => {
                let Some(pending) = self.sends.remove(&id) else {
                    return Ok(());
                };
                if log != 0
                    && let Some(sink) = &*lock(&self.own.sink)
                {
                    // The server skipped this position on the connection's feed: this is the
                    // event, exactly as the log holds it.
                    let message = Message {
                        conversation: self.own.conversation,
                        seq,
                        from: self.own.user.clone(),
                        device: self.own.device.clone(),
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

/// Reads a stream's answers (the control stream's or a conversation's) and hands each to its
/// waiter until the stream ends, then fails whoever still waits.
async fn read_answers<W: Answers>(
    mut reader: FrameReader,
    waiters: Arc<Mutex<W>>,
    conn: quinn::Connection,
) {
    loop {
        let frame = match reader.next::<ServerFrame>().await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                lock(&waiters).fail_all(&closed_reason(&conn));
                return;
            }
            Err(e) => {
                let violation = e.violation().map(|code| (code, e.to_string()));
                lock(&waiters).fail_all(&stream_failure(&conn, e));
                if let Some((code, reason)) = violation {
                    close_violated(&conn, code, &reason);
                }
                return;
            }
        };
        let mut w = lock(&waiters);
        if let Err(e) = w.answer(frame) {
            w.fail_all(&e);
            drop(w);
            if let ClientError::Protocol(reason) = &e {
                close_violated(&conn, ErrorCode::UNEXPECTED_FRAME, reason);
            }
            return;
        }
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
            .send(&ClientFrame::Send { id, body })
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
