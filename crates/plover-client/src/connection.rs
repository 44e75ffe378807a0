//! One authenticated connection to a server: connecting, the requests of its control stream,
//! and the conversation streams opened on it.

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use crate::answers::{
    LogEvent, OwnEvents, closed_reason, lock, refused, stream_failure, unexpected,
};
use crate::control::{Awaiting, Control, ControlPush};
use crate::conversation::{Conversation, Owner};
use crate::{ClientConfig, ClientError};
use plover_proto::{
    ClientDatagram, ClientFrame, ConversationId, ConversationInfo, ErrorCode, PROTOCOL_VERSION,
    Pusher, Retention, ServerFrame, Target,
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

/// An authenticated connection.
pub struct Connection {
    endpoint: quinn::Endpoint,
    /// Whether the endpoint is this connection's own (then closing waits for it to go idle).
    owns_endpoint: bool,
    conn: quinn::Connection,
    control: Control,
    welcome: Welcome,
    own: OwnEvents,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("user", &self.welcome.user)
            .field("device", &self.welcome.device)
            .finish()
    }
}

/// The most a server that is not the last of a list may take to connect and say `Welcome`
/// before the next one is tried.
pub const NEXT_SERVER_AFTER: Duration = Duration::from_secs(3);

impl Connection {
    /// Connects, authenticates and returns once the server has said `Welcome`. With several
    /// servers in `config.server`, tries each in turn and moves on from one that cannot be
    /// reached or is stopping; a refusal of this client (its token, its version) ends the
    /// attempt at once. Every server but the last gets at most [`NEXT_SERVER_AFTER`] of
    /// `connect_timeout`: a live server answers in milliseconds, and a dead seed should not
    /// cost the whole timeout.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ClientError> {
        let mut attempts = Vec::new();
        let mut servers: std::collections::VecDeque<String> =
            config.servers().map(str::to_owned).collect();
        // A server may send the client to another (`moved`): that one is tried next, once.
        let mut moved = false;
        while let Some(server) = servers.pop_front() {
            let timeout = if servers.is_empty() {
                config.connect_timeout
            } else {
                config.connect_timeout.min(NEXT_SERVER_AFTER)
            };
            match Self::connect_to(config, &server, timeout).await {
                Ok(conn) => return Ok(conn),
                Err(e) if e.try_next_server() => {
                    if let Some(to) = e.moved_to().filter(|_| !moved) {
                        moved = true;
                        servers.push_front(to.to_owned());
                    }
                    attempts.push((server, e));
                }
                Err(e) => return Err(e),
            }
        }
        match attempts.len() {
            0 => Err(ClientError::Resolve {
                server: config.server.clone(),
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no server address given",
                )),
            }),
            1 => Err(attempts.remove(0).1),
            _ => Err(ClientError::NoServer(attempts)),
        }
    }

    /// Connects to one server of the list, within `timeout` for the handshake and again for
    /// `Welcome`.
    async fn connect_to(
        config: &ClientConfig,
        server: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let addr = tokio::net::lookup_host(server)
            .await
            .map_err(|e| ClientError::Resolve {
                server: server.to_owned(),
                source: Arc::new(e),
            })?
            .next()
            .ok_or_else(|| ClientError::Resolve {
                server: server.to_owned(),
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "it resolves to no address",
                )),
            })?;
        let endpoint = match &config.endpoint {
            Some(shared) => shared.clone(),
            None => crate::endpoint(&config.roots, config.keep_alive)?,
        };
        let host = config.server_name(server);
        let connecting = endpoint.connect(addr, &host)?;
        let conn = tokio::time::timeout(timeout, connecting)
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
                token: config.token.clone().into(),
                device: config.device.clone(),
                zone: config.zone.clone(),
            })
            .await
            .map_err(|e| stream_failure(&conn, e))?;
        let answer = tokio::time::timeout(timeout, reader.next())
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
                return Err(unexpected("Welcome", &other));
            }
            None => return Err(closed_reason(&conn)),
        };
        let control = Control::start(&conn, reader, writer, welcome.heartbeat);
        Ok(Self {
            endpoint,
            owns_endpoint: config.endpoint.is_none(),
            conn,
            control,
            welcome,
            own: OwnEvents::default(),
        })
    }

    /// Hands the events of messages sent on this connection to `sink` (the event stream that
    /// syncs on it; see [`OwnEvents`]).
    pub(crate) fn deliver_own_sends(&self, sink: mpsc::UnboundedSender<LogEvent>) {
        *lock(&self.own) = Some(sink);
    }

    /// The server's pushes on the control stream (presence changes of peers). Only the first
    /// caller gets them; unread pushes beyond a small buffer are dropped.
    pub fn take_pushes(&self) -> Option<mpsc::Receiver<ControlPush>> {
        self.control.take_pushes()
    }

    /// Tells the members of `conversation` that this user is typing (a datagram: it may be
    /// lost; repeat it every few seconds while typing goes on).
    pub fn typing(&self, conversation: ConversationId) -> Result<(), ClientError> {
        let bytes = postcard::to_stdvec(&ClientDatagram::Typing { conversation })?;
        Ok(self.conn.send_datagram(Bytes::from(bytes))?)
    }

    /// Registers where this user's notifications go (replacing one with the same key).
    pub async fn register_pusher(&self, pusher: Pusher) -> Result<(), ClientError> {
        let frame = |request| ClientFrame::RegisterPusher { request, pusher };
        self.control.request(frame).await.map(|_| ())
    }

    /// Removes a pusher by its push key or endpoint; returns whether it existed.
    pub async fn unregister_pusher(&self, key: &str) -> Result<bool, ClientError> {
        let frame = |request| ClientFrame::UnregisterPusher {
            request,
            key: key.to_owned(),
        };
        match self.control.request(frame).await? {
            ServerFrame::Done { seq, .. } => Ok(seq == 1),
            other => Err(unexpected("Done", &other)),
        }
    }

    /// This user's pushers.
    pub async fn pushers(&self) -> Result<Vec<Pusher>, ClientError> {
        match self
            .control
            .request(|request| ClientFrame::ListPushers { request })
            .await?
        {
            ServerFrame::Pushers { pushers, .. } => Ok(pushers),
            other => Err(unexpected("Pushers", &other)),
        }
    }

    /// Blocks `user`: they can no longer start a direct conversation with this user, write
    /// in theirs, add them to a group, or see their presence, typing or read marks; this
    /// user no longer gets their typing and presence. Blocking twice changes nothing.
    pub async fn block(&self, user: &str) -> Result<(), ClientError> {
        let frame = |request| ClientFrame::Block {
            request,
            user: user.to_owned(),
        };
        self.control.request(frame).await.map(|_| ())
    }

    /// Lifts a block (nothing changes if `user` was not blocked).
    pub async fn unblock(&self, user: &str) -> Result<(), ClientError> {
        let frame = |request| ClientFrame::Unblock {
            request,
            user: user.to_owned(),
        };
        self.control.request(frame).await.map(|_| ())
    }

    /// The users this user blocked, in name order.
    pub async fn blocked(&self) -> Result<Vec<String>, ClientError> {
        match self
            .control
            .request(|request| ClientFrame::ListBlocked { request })
            .await?
        {
            ServerFrame::Blocked { users, .. } => Ok(users),
            other => Err(unexpected("Blocked", &other)),
        }
    }

    /// Accepts a message request (writing in the conversation accepts it too).
    pub async fn accept(&self, conversation: ConversationId) -> Result<(), ClientError> {
        let frame = |request| ClientFrame::Accept {
            request,
            conversation,
        };
        self.control.request(frame).await.map(|_| ())
    }

    /// This user's message requests: conversations someone who shared none with them
    /// started or added them to, not accepted yet.
    pub async fn requests(&self) -> Result<Vec<plover_proto::MessageRequest>, ClientError> {
        match self
            .control
            .request(|request| ClientFrame::ListRequests { request })
            .await?
        {
            ServerFrame::Requests { requests, .. } => Ok(requests),
            other => Err(unexpected("Requests", &other)),
        }
    }

    /// Opts a conversation in or out of message bodies in this user's notifications.
    pub async fn push_content(
        &self,
        conversation: ConversationId,
        include: bool,
    ) -> Result<(), ClientError> {
        let frame = |request| ClientFrame::PushContent {
            request,
            conversation,
            include,
        };
        self.control.request(frame).await.map(|_| ())
    }

    /// Whether `user` is online, else when they were last seen (Unix ms, 0 if never). Refused
    /// with `forbidden` unless the two users share a conversation.
    pub async fn presence(&self, user: &str) -> Result<(bool, u64), ClientError> {
        let frame = |request| ClientFrame::Presence {
            request,
            user: user.to_owned(),
        };
        match self.control.request(frame).await? {
            ServerFrame::PresenceInfo {
                online, last_seen, ..
            } => Ok((online, last_seen)),
            other => Err(unexpected("PresenceInfo", &other)),
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

    pub(crate) fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Sends a control frame that has no answer.
    pub(crate) async fn control_send(&self, frame: ClientFrame) -> Result<(), ClientError> {
        self.control.send(frame).await
    }

    /// Round trip of a `Ping` on the control stream.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        let nonce = u64::from(self.control.request_id());
        match self
            .control
            .call(ClientFrame::Ping { nonce }, Some(Awaiting::Pong(nonce)))
            .await?
        {
            ServerFrame::Pong { nonce: n } if n == nonce => Ok(start.elapsed()),
            other => Err(unexpected("Pong", &other)),
        }
    }

    /// All the caller's conversations, by id (fetched page by page).
    pub async fn conversations(&self) -> Result<Vec<ConversationInfo>, ClientError> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let frame = |request| ClientFrame::ListConversations {
                request,
                after,
                limit: 100,
            };
            match self.control.request(frame).await? {
                ServerFrame::Conversations { items, more, .. } => {
                    after = items.last().map_or(after, |c| c.conversation);
                    let empty = items.is_empty();
                    all.extend(items);
                    if !more || empty {
                        return Ok(all);
                    }
                }
                other => {
                    return Err(unexpected("Conversations", &other));
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
        let frame = |request| ClientFrame::CreateGroup {
            request,
            title: title.to_owned(),
            members: members.to_vec(),
            retention,
        };
        match self.control.request(frame).await? {
            ServerFrame::GroupCreated { conversation, .. } => Ok(conversation),
            other => Err(unexpected("GroupCreated", &other)),
        }
    }

    /// Starts event delivery after `cursor`; returns (cursor, head) as the server resolved them.
    pub(crate) async fn start_sync(&self, cursor: Option<u64>) -> Result<(u64, u64), ClientError> {
        match self
            .control
            .call(ClientFrame::Sync { cursor }, None)
            .await?
        {
            ServerFrame::SyncStarted { cursor, head } => Ok((cursor, head)),
            other => Err(unexpected("SyncStarted", &other)),
        }
    }

    /// Opens a stream bound to a conversation. With `create`, the direct conversation with a
    /// user is created if it does not exist yet.
    pub async fn open(&self, target: Target, create: bool) -> Result<Conversation, ClientError> {
        let owner = Owner {
            user: self.welcome.user.clone(),
            device: self.welcome.device.clone(),
            sink: self.own.clone(),
        };
        Conversation::open(&self.conn, self.welcome.max_frame, owner, target, create).await
    }

    /// Uploads a file [`crate::media::prepare`]d (encrypted) before, on a stream of its own,
    /// from whatever the server already holds of it; `progress` hears the bytes it holds.
    /// After an error, calling this again (on a new connection if this one is gone) resumes.
    pub async fn upload(
        &self,
        file: &crate::media::Prepared,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<plover_proto::ObjectId, ClientError> {
        crate::media::upload(&self.conn, self.welcome.max_frame, file, progress).await
    }

    /// Downloads an attachment on a stream of its own into `out`, checked and decrypted
    /// (the ciphertext waits in `out` + `.plover-part` meanwhile; a later call resumes from
    /// it). `through` names the message that shares it.
    pub async fn download(
        &self,
        attachment: &plover_proto::content::Attachment,
        through: crate::media::Through,
        out: &std::path::Path,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), ClientError> {
        crate::media::download(
            &self.conn,
            self.welcome.max_frame,
            attachment,
            through,
            out,
            progress,
        )
        .await
    }

    /// Closes the connection cleanly: finishes the control stream, so that the server handles
    /// every frame sent on it (a last `Ack`, say) before it closes the connection, then waits
    /// for the close to complete.
    pub async fn close(self) {
        self.control.finish(Duration::from_secs(2)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.closed()).await;
        self.conn
            .close(quinn::VarInt::from(ErrorCode::NORMAL.0), b"bye");
        if self.owns_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        }
    }
}
