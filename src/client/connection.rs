//! One authenticated connection to a server, and the conversation streams opened on it.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::{ClientConfig, ClientError};
use crate::framing::{
    ClientFrame, ClientMsgId, ConversationId, ConversationInfo, ErrorCode, Message,
    PROTOCOL_VERSION, ServerFrame, Target,
};
use crate::transport::stream::{FrameReader, FrameWriter};

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

/// The control stream, used one request at a time.
struct Control {
    reader: FrameReader,
    writer: FrameWriter,
}

/// An authenticated connection.
pub struct Connection {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    control: tokio::sync::Mutex<Control>,
    welcome: Welcome,
    next_request: AtomicU32,
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
            .map_err(|e| ClientError::Connect(format!("cannot resolve {}: {e}", config.server)))?
            .next()
            .ok_or_else(|| {
                ClientError::Connect(format!("{} resolves to nothing", config.server))
            })?;
        let endpoint = crate::transport::client_endpoint(&config.roots, config.keep_alive)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let host = config.server_name();
        let connecting = endpoint
            .connect(addr, &host)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let conn = tokio::time::timeout(config.connect_timeout, connecting)
            .await
            .map_err(|_| ClientError::Timeout("connecting"))?
            .map_err(ClientError::from)?;
        let (send, recv) = conn.open_bi().await?;
        let max = crate::framing::DEFAULT_MAX_FRAME;
        let mut control = Control {
            reader: FrameReader::new(recv, max),
            writer: FrameWriter::new(send, max),
        };
        control
            .writer
            .send(&ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                token: config.token.clone(),
                device: config.device.clone(),
            })
            .await
            .map_err(|e| stream_failure(&conn, e))?;
        let answer = tokio::time::timeout(config.connect_timeout, control.reader.next())
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
        Ok(Self {
            endpoint,
            conn,
            control: tokio::sync::Mutex::new(control),
            welcome,
            next_request: AtomicU32::new(1),
        })
    }

    /// What the server said in `Welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The authenticated user.
    pub fn user(&self) -> &str {
        &self.welcome.user
    }

    pub(super) fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    fn request_id(&self) -> u32 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends one control frame and reads the answer.
    async fn control_request(&self, frame: ClientFrame) -> Result<ServerFrame, ClientError> {
        let mut control = self.control.lock().await;
        control
            .writer
            .send(&frame)
            .await
            .map_err(|e| stream_failure(&self.conn, e))?;
        match control.reader.next::<ServerFrame>().await {
            Ok(Some(ServerFrame::Error { code, message, .. })) => Err(refused(code, message)),
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(closed_reason(&self.conn)),
            Err(e) => Err(stream_failure(&self.conn, e)),
        }
    }

    /// Sends a control frame that has no answer.
    pub(super) async fn control_send(&self, frame: ClientFrame) -> Result<(), ClientError> {
        let mut control = self.control.lock().await;
        control
            .writer
            .send(&frame)
            .await
            .map_err(|e| stream_failure(&self.conn, e))
    }

    /// Round trip of a `Ping` on the control stream.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        let nonce = u64::from(self.request_id());
        match self.control_request(ClientFrame::Ping { nonce }).await? {
            ServerFrame::Pong { nonce: n } if n == nonce => Ok(start.elapsed()),
            other => Err(ClientError::Protocol(format!(
                "expected Pong, got {other:?}"
            ))),
        }
    }

    /// The caller's conversations.
    pub async fn conversations(&self) -> Result<Vec<ConversationInfo>, ClientError> {
        let request = self.request_id();
        match self
            .control_request(ClientFrame::ListConversations { request })
            .await?
        {
            ServerFrame::Conversations { request: r, items } if r == request => Ok(items),
            other => Err(ClientError::Protocol(format!(
                "expected Conversations, got {other:?}"
            ))),
        }
    }

    /// Starts event delivery after `cursor`; returns (cursor, head) as the server resolved them.
    pub(super) async fn start_sync(&self, cursor: Option<u64>) -> Result<(u64, u64), ClientError> {
        match self.control_request(ClientFrame::Sync { cursor }).await? {
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
        let (id, members) = match reader.next::<ServerFrame>().await {
            Ok(Some(ServerFrame::Opened {
                conversation,
                members,
            })) => (conversation, members),
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
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let task = tokio::spawn(read_answers(reader, waiters.clone(), self.conn.clone()));
        Ok(Conversation {
            id,
            members,
            writer: tokio::sync::Mutex::new(writer),
            waiters,
            next_request: AtomicU32::new(1),
            reader_task: task,
        })
    }

    /// Closes the connection cleanly: finishes the control stream, so that the server handles
    /// every frame sent on it (a last `Ack`, say) before it closes the connection, then waits
    /// for the close to complete.
    pub async fn close(self) {
        self.control
            .lock()
            .await
            .writer
            .finish(Duration::from_secs(2))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.closed()).await;
        self.conn
            .close(quinn::VarInt::from(ErrorCode::NORMAL.0), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The error to report when a stream failed: the connection's close reason if it has one.
pub(super) fn stream_failure(
    conn: &quinn::Connection,
    e: crate::transport::stream::StreamError,
) -> ClientError {
    match conn.close_reason() {
        Some(reason) => ClientError::from(reason),
        None => ClientError::Stream(e.to_string()),
    }
}

fn closed_reason(conn: &quinn::Connection) -> ClientError {
    match conn.close_reason() {
        Some(reason) => ClientError::from(reason),
        None => ClientError::Stream("the server closed the stream".into()),
    }
}

type SendWaiter = oneshot::Sender<Result<(u64, u64), ClientError>>;
type HistoryWaiter = oneshot::Sender<Result<(Vec<Message>, bool), ClientError>>;

#[derive(Default)]
struct Waiters {
    sends: HashMap<ClientMsgId, Vec<SendWaiter>>,
    history: HashMap<u32, HistoryWaiter>,
    /// Set once the stream is gone; later requests fail at once.
    failed: Option<ClientError>,
}

impl Waiters {
    fn fail_all(&mut self, e: &ClientError) {
        for (_, list) in self.sends.drain() {
            for w in list {
                let _ = w.send(Err(e.clone()));
            }
        }
        for (_, w) in self.history.drain() {
            let _ = w.send(Err(e.clone()));
        }
        self.failed = Some(e.clone());
    }
}

async fn read_answers(
    mut reader: FrameReader,
    waiters: Arc<Mutex<Waiters>>,
    conn: quinn::Connection,
) {
    loop {
        let frame = match reader.next::<ServerFrame>().await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                let e = closed_reason(&conn);
                lock_waiters(&waiters).fail_all(&e);
                return;
            }
            Err(e) => {
                let e = stream_failure(&conn, e);
                lock_waiters(&waiters).fail_all(&e);
                return;
            }
        };
        let mut w = lock_waiters(&waiters);
        match frame {
            ServerFrame::Sent { id, seq, ts } => {
                for waiter in w.sends.remove(&id).unwrap_or_default() {
                    let _ = waiter.send(Ok((seq, ts)));
                }
            }
            ServerFrame::SendFailed { id, code, message } => {
                for waiter in w.sends.remove(&id).unwrap_or_default() {
                    let _ = waiter.send(Err(refused(code, message.clone())));
                }
            }
            ServerFrame::HistoryPage {
                request,
                messages,
                more,
            } => {
                if let Some(waiter) = w.history.remove(&request) {
                    let _ = waiter.send(Ok((messages, more)));
                }
            }
            ServerFrame::Error {
                code,
                message,
                request: Some(request),
            } => {
                if let Some(waiter) = w.history.remove(&request) {
                    let _ = waiter.send(Err(refused(code, message)));
                }
            }
            ServerFrame::Error { code, message, .. } => {
                w.fail_all(&refused(code, message));
                return;
            }
            other => {
                w.fail_all(&ClientError::Protocol(format!(
                    "unexpected frame on a conversation stream: {other:?}"
                )));
                return;
            }
        }
    }
}

/// Only map operations happen under this lock, never an await.
fn lock_waiters(w: &Mutex<Waiters>) -> std::sync::MutexGuard<'_, Waiters> {
    w.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A stream bound to one conversation, for sending and reading history. Requests may be
/// issued concurrently; each waits for its own answer.
pub struct Conversation {
    id: ConversationId,
    members: Vec<String>,
    writer: tokio::sync::Mutex<FrameWriter>,
    waiters: Arc<Mutex<Waiters>>,
    next_request: AtomicU32,
    reader_task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Conversation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversation")
            .field("id", &self.id)
            .field("members", &self.members)
            .finish()
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        self.reader_task.abort();
    }
}

impl Conversation {
    /// The conversation's id.
    pub fn id(&self) -> ConversationId {
        self.id
    }

    /// Its members, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// Whether the stream has failed (the connection is gone or the server refused it).
    pub fn is_broken(&self) -> bool {
        lock_waiters(&self.waiters).failed.is_some()
    }

    /// Sends a message with a fresh id and waits until it is durable.
    pub async fn send(&self, body: impl Into<Bytes>) -> Result<Ack, ClientError> {
        self.send_with_id(ClientMsgId::random(), body.into()).await
    }

    /// Sends a message with the given id (a retry reuses the id) and waits until it is durable.
    pub async fn send_with_id(&self, id: ClientMsgId, body: Bytes) -> Result<Ack, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock_waiters(&self.waiters);
            if let Some(e) = &w.failed {
                return Err(e.clone());
            }
            w.sends.entry(id).or_default().push(tx);
        }
        self.writer
            .lock()
            .await
            .send(&ClientFrame::Send { id, body })
            .await
            .map_err(|e| ClientError::Stream(e.to_string()))?;
        let (seq, ts) = rx
            .await
            .map_err(|_| ClientError::Stream("conversation stream closed".into()))??;
        Ok(Ack {
            conversation: self.id,
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
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock_waiters(&self.waiters);
            if let Some(e) = &w.failed {
                return Err(e.clone());
            }
            w.history.insert(request, tx);
        }
        self.writer
            .lock()
            .await
            .send(&ClientFrame::History {
                request,
                before,
                after,
                limit,
            })
            .await
            .map_err(|e| ClientError::Stream(e.to_string()))?;
        rx.await
            .map_err(|_| ClientError::Stream("conversation stream closed".into()))?
    }
}
