//! One authenticated connection: the handshake and `Hello`, the control stream, the
//! conversation streams the client opens, and the delivery streams the server opens.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument, debug, debug_span, info, warn};

use super::stream::{FrameReader, FrameWriter, StreamError};
use crate::auth::{AuthError, TokenKeys, valid_name};
use crate::config::Limits;
use crate::framing::ConversationInfo;
use crate::framing::{
    ClientDatagram, ClientFrame, ClientMsgId, ConversationId, ErrorCode, FrameError,
    PROTOCOL_VERSION, ServerDatagram, ServerFrame,
};
use crate::router::{DeviceFeed, MemberOp, Push, Router, RouterError, Sent};

/// How long a closing stream or connection waits for its last frames to reach the peer.
const LINGER: Duration = Duration::from_secs(1);
/// Encoded frames queued towards one delivery stream before the dispatcher waits for it.
const DELIVERY_STREAM_QUEUE: usize = 64;

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) router: Router,
    pub(crate) keys: TokenKeys,
    pub(crate) limits: Limits,
    pub(crate) heartbeat: Duration,
    pub(crate) auth_timeout: Duration,
    pub(crate) server_id: String,
    pub(crate) typing_per_second: u32,
}

/// Why a connection or stream is being closed with an error.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn frame(&self) -> ServerFrame {
        ServerFrame::error(self.code, self.message.clone())
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::Missing => ErrorCode::TOKEN_MISSING,
            AuthError::Expired => ErrorCode::TOKEN_EXPIRED,
            AuthError::Invalid(_) | AuthError::WrongDevice { .. } => ErrorCode::TOKEN_INVALID,
            AuthError::Secret { .. } => ErrorCode::INTERNAL,
        };
        Self::new(code, e.to_string())
    }
}

/// Maps a stream error to a refusal, or `None` when the connection or stream is simply gone.
fn protocol_violation(e: &StreamError) -> Option<Refusal> {
    match e {
        StreamError::Frame(FrameError::TooLarge { .. }) => {
            Some(Refusal::new(ErrorCode::FRAME_TOO_LARGE, e.to_string()))
        }
        StreamError::Frame(_) | StreamError::Truncated(_) => {
            Some(Refusal::new(ErrorCode::BAD_FRAME, e.to_string()))
        }
        StreamError::Read(_) | StreamError::Write(_) | StreamError::Closed(_) => None,
    }
}

fn close(conn: &quinn::Connection, refusal: &Refusal) {
    conn.close(
        quinn::VarInt::from(refusal.code.0),
        refusal.message.as_bytes(),
    );
}

/// Sends an `Error` frame on `writer`, lets it reach the peer, then closes the connection.
async fn refuse(conn: &quinn::Connection, writer: &mut FrameWriter, refusal: Refusal) {
    debug!(code = ?refusal.code, message = %refusal.message, "closing connection");
    let _ = writer.send(&refusal.frame()).await;
    writer.finish(LINGER).await;
    close(conn, &refusal);
}

/// Aborts a task when dropped, so a connection's helpers end with it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one connection from the handshake to its end.
pub(crate) async fn serve_connection(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    handshakes: Arc<std::sync::atomic::AtomicUsize>,
) {
    let deadline = Instant::now() + shared.auth_timeout;
    let handshake = timeout_at(deadline, incoming).await;
    handshakes.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return debug!(error = %e, "handshake failed"),
        Err(_) => return debug!("handshake timed out"),
    };
    let Some((session, reader, writer)) = authenticate(&conn, &shared, deadline).await else {
        return;
    };
    tracing::Span::current().record("user", session.user.as_str());
    info!(device = %session.device, "authenticated");
    let session = Arc::new(session);
    let (_presence, pushes) = shared.router.presence().connect(&session.user);
    let gauge = metrics::gauge!(crate::metrics::names::CONNECTIONS);
    gauge.increment(1.0);
    tokio::select! {
        () = session.clone().control_loop(reader, writer, pushes) => {}
        () = session.clone().accept_streams() => {}
        () = session.clone().datagrams() => {}
        _ = conn.closed() => {}
    }
    gauge.decrement(1.0);
    debug!(reason = ?conn.close_reason(), "connection ended");
}

struct Session {
    conn: quinn::Connection,
    user: String,
    device: String,
    shared: Arc<Shared>,
}

async fn authenticate(
    conn: &quinn::Connection,
    shared: &Arc<Shared>,
    deadline: Instant,
) -> Option<(Session, FrameReader, FrameWriter)> {
    let max = shared.limits.max_frame;
    let timed_out = || Refusal::new(ErrorCode::AUTH_TIMEOUT, "no Hello within the auth timeout");
    let (send, recv) = match timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            debug!(error = %e, "connection ended before Hello");
            return None;
        }
        Err(_) => {
            close(conn, &timed_out());
            return None;
        }
    };
    let mut reader = FrameReader::new(recv, max);
    let mut writer = FrameWriter::new(send, max);
    let hello = match timeout_at(deadline, reader.next::<ClientFrame>()).await {
        Err(_) => Err(timed_out()),
        Ok(Ok(Some(ClientFrame::Hello {
            version,
            token,
            device,
        }))) => check_hello(shared, version, &token, &device).map(|user| (user, device)),
        Ok(Ok(Some(other))) => Err(Refusal::new(
            ErrorCode::UNEXPECTED_FRAME,
            format!("the first frame must be Hello, not {}", other.name()),
        )),
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => match protocol_violation(&e) {
            Some(refusal) => Err(refusal),
            None => return None,
        },
    };
    let (user, device) = match hello {
        Ok(v) => v,
        Err(refusal) => {
            refuse(conn, &mut writer, refusal).await;
            return None;
        }
    };
    if let Err(e) = shared.router.ensure_user(&user).await {
        refuse(conn, &mut writer, Refusal::new(e.code(), e.to_string())).await;
        return None;
    }
    let welcome = ServerFrame::Welcome {
        version: PROTOCOL_VERSION,
        user: user.clone(),
        device: device.clone(),
        server_id: shared.server_id.clone(),
        heartbeat_ms: u32::try_from(shared.heartbeat.as_millis()).unwrap_or(u32::MAX),
        max_frame: max,
        max_body: shared.limits.max_body,
    };
    if writer.send(&welcome).await.is_err() {
        return None;
    }
    let session = Session {
        conn: conn.clone(),
        user,
        device,
        shared: shared.clone(),
    };
    Some((session, reader, writer))
}

fn check_hello(
    shared: &Shared,
    version: u16,
    token: &str,
    device: &str,
) -> Result<String, Refusal> {
    if version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            ErrorCode::UNSUPPORTED_VERSION,
            format!(
                "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
            ),
        ));
    }
    if !valid_name(device) {
        return Err(Refusal::new(
            ErrorCode::INVALID_REQUEST,
            "device name must be 1-64 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    Ok(shared.keys.verify(token, device)?.sub)
}

impl Session {
    /// The control stream after `Welcome`: pings, sync, acks, listings.
    async fn control_loop(
        self: Arc<Self>,
        mut reader: FrameReader,
        mut writer: FrameWriter,
        mut pushes: mpsc::Receiver<Push>,
    ) {
        let mut delivery: Option<AbortOnDrop> = None;
        loop {
            // `FrameReader::next` keeps partial frames in the reader, so losing the race to a
            // push loses no bytes.
            let next = tokio::select! {
                next = reader.next::<ClientFrame>() => next,
                Some(push) = pushes.recv() => {
                    if self.push(push, &mut writer).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let frame = match next {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    // The client finished its control stream: it is leaving.
                    self.conn
                        .close(quinn::VarInt::from(ErrorCode::NORMAL.0), b"bye");
                    return;
                }
                Err(e) => {
                    if let Some(refusal) = protocol_violation(&e) {
                        refuse(&self.conn, &mut writer, refusal).await;
                    }
                    return;
                }
            };
            let reply = match frame {
                ClientFrame::Ping { nonce } => ServerFrame::Pong { nonce },
                ClientFrame::Ack { cursor } => {
                    self.shared.router.ack(&self.user, &self.device, cursor);
                    continue;
                }
                ClientFrame::Presence { request, user } => {
                    match self.shared.router.presence().query(&self.user, &user).await {
                        Ok((online, last_seen)) => ServerFrame::PresenceInfo {
                            request,
                            user,
                            online,
                            last_seen,
                        },
                        Err(e) => ServerFrame::Error {
                            code: e.code(),
                            message: e.to_string(),
                            request: Some(request),
                        },
                    }
                }
                ClientFrame::ListConversations {
                    request,
                    after,
                    limit,
                } => {
                    let limit = limit.clamp(1, 100) as usize;
                    match self
                        .shared
                        .router
                        .conversations(&self.user, after, limit)
                        .await
                    {
                        Ok((items, more)) => {
                            fit_page(request, items, more, self.shared.limits.max_frame)
                        }
                        Err(e) => ServerFrame::Error {
                            code: e.code(),
                            message: e.to_string(),
                            request: Some(request),
                        },
                    }
                }
                ClientFrame::RegisterPusher { request, pusher } => answer(
                    request,
                    self.shared
                        .router
                        .register_pusher(&self.user, pusher)
                        .await
                        .map(|()| ServerFrame::Done { request, seq: 1 }),
                ),
                ClientFrame::UnregisterPusher { request, key } => answer(
                    request,
                    self.shared
                        .router
                        .unregister_pusher(&self.user, &key)
                        .await
                        .map(|removed| ServerFrame::Done {
                            request,
                            seq: u64::from(removed),
                        }),
                ),
                ClientFrame::ListPushers { request } => answer(
                    request,
                    self.shared
                        .router
                        .pushers(&self.user)
                        .await
                        .map(|pushers| ServerFrame::Pushers { request, pushers }),
                ),
                ClientFrame::PushContent {
                    request,
                    conversation,
                    include,
                } => answer(
                    request,
                    self.shared
                        .router
                        .push_content(&self.user, conversation, include)
                        .await
                        .map(|()| ServerFrame::Done { request, seq: 1 }),
                ),
                ClientFrame::CreateGroup {
                    request,
                    title,
                    members,
                    retention,
                } => match self
                    .shared
                    .router
                    .create_group(&self.user, &self.device, &title, &members, retention)
                    .await
                {
                    Ok(conversation) => ServerFrame::GroupCreated {
                        request,
                        conversation,
                    },
                    Err(e) => ServerFrame::Error {
                        code: e.code(),
                        message: e.to_string(),
                        request: Some(request),
                    },
                },
                ClientFrame::Sync { cursor } if delivery.is_none() => {
                    match self
                        .shared
                        .router
                        .subscribe(&self.user, &self.device, cursor)
                        .await
                    {
                        Ok(sub) => {
                            let span = debug_span!("delivery", cursor = sub.cursor);
                            let task =
                                tokio::spawn(self.clone().deliver(sub.feed).instrument(span));
                            delivery = Some(AbortOnDrop(task));
                            ServerFrame::SyncStarted {
                                cursor: sub.cursor,
                                head: sub.head,
                            }
                        }
                        Err(e) => ServerFrame::error(e.code(), e.to_string()),
                    }
                }
                other => {
                    let message = match other {
                        ClientFrame::Sync { .. } => "already syncing".to_owned(),
                        ClientFrame::Hello { .. } => "already authenticated".to_owned(),
                        f => format!("{} belongs on a conversation stream", f.name()),
                    };
                    refuse(
                        &self.conn,
                        &mut writer,
                        Refusal::new(ErrorCode::UNEXPECTED_FRAME, message),
                    )
                    .await;
                    return;
                }
            };
            if writer.send(&reply).await.is_err() {
                return;
            }
        }
    }

    /// Sends a push: presence changes on the control stream, typing as a datagram.
    async fn push(&self, push: Push, writer: &mut FrameWriter) -> Result<(), StreamError> {
        match push {
            Push::Presence {
                user,
                online,
                last_seen,
            } => {
                writer
                    .send(&ServerFrame::PresenceChanged {
                        user,
                        online,
                        last_seen,
                    })
                    .await
            }
            Push::Typing { conversation, user } => {
                let datagram = ServerDatagram::Typing { conversation, user };
                if let Ok(bytes) = postcard::to_stdvec(&datagram) {
                    // Lost if the peer does not take datagrams or its buffer is full: typing
                    // indicators are allowed to be lost.
                    let _ = self.conn.send_datagram(Bytes::from(bytes));
                }
                Ok(())
            }
        }
    }

    /// Reads the client's datagrams: typing indicators, rate-limited, for members only.
    async fn datagrams(self: Arc<Self>) {
        let rate = f64::from(self.shared.typing_per_second);
        let mut tokens = rate;
        let mut last = Instant::now();
        let mut members: HashMap<ConversationId, Arc<[String]>> = HashMap::new();
        loop {
            let Ok(bytes) = self.conn.read_datagram().await else {
                return;
            };
            let Ok(ClientDatagram::Typing { conversation }) = postcard::from_bytes(&bytes) else {
                close(
                    &self.conn,
                    &Refusal::new(ErrorCode::BAD_FRAME, "undecodable datagram"),
                );
                return;
            };
            let now = Instant::now();
            tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate);
            last = now;
            if tokens < 1.0 {
                continue;
            }
            tokens -= 1.0;
            let list = match members.get(&conversation) {
                Some(list) => list.clone(),
                None => match self.shared.router.members(&self.user, conversation).await {
                    Ok(list) => {
                        // A small cache: membership of a conversation one types in rarely
                        // changes; bounded so a client cannot grow it without limit.
                        if members.len() >= 64 {
                            members.clear();
                        }
                        members.insert(conversation, list.clone());
                        list
                    }
                    Err(_) => continue,
                },
            };
            let push = Push::Typing {
                conversation,
                user: self.user.clone(),
            };
            self.shared
                .router
                .presence()
                .push_to(&list, &self.user, &push);
        }
    }

    /// Accepts the conversation streams the client opens, one task each.
    async fn accept_streams(self: Arc<Self>) {
        loop {
            let (send, recv) = match self.conn.accept_bi().await {
                Ok(streams) => streams,
                Err(_) => return,
            };
            let span = debug_span!("stream", id = %send.id(), conversation = tracing::field::Empty);
            tokio::spawn(
                self.clone()
                    .conversation_stream(send, recv)
                    .instrument(span),
            );
        }
    }

    /// One conversation stream: `Open`, then sends and history requests.
    async fn conversation_stream(
        self: Arc<Self>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let limits = &self.shared.limits;
        let router = &self.shared.router;
        let mut reader = FrameReader::new(recv, limits.max_frame);
        let mut writer = FrameWriter::new(send, limits.max_frame);
        let conversation = match reader.next::<ClientFrame>().await {
            Ok(Some(ClientFrame::Open { target, create })) => {
                match router.open(&self.user, target, create).await {
                    Ok(opened) => {
                        let frame = ServerFrame::Opened {
                            conversation: opened.conversation,
                            kind: opened.kind,
                            title: opened.title,
                            member_count: opened.member_count,
                            members: opened.members,
                            admins: opened.admins,
                            last_seq: opened.last_seq,
                        };
                        if writer.send(&frame).await.is_err() {
                            return;
                        }
                        opened.conversation
                    }
                    Err(e) => {
                        let _ = writer
                            .send(&ServerFrame::error(e.code(), e.to_string()))
                            .await;
                        writer.finish(LINGER).await;
                        return;
                    }
                }
            }
            Ok(Some(other)) => {
                let _ = writer
                    .send(&ServerFrame::error(
                        ErrorCode::UNEXPECTED_FRAME,
                        format!(
                            "a conversation stream starts with Open, not {}",
                            other.name()
                        ),
                    ))
                    .await;
                writer.finish(LINGER).await;
                return;
            }
            Ok(None) => return,
            Err(e) => {
                if let Some(refusal) = protocol_violation(&e) {
                    refuse(&self.conn, &mut writer, refusal).await;
                }
                return;
            }
        };
        tracing::Span::current().record("conversation", conversation);

        // Answers go out in request order through a bounded queue: when `inflight_sends`
        // answers are pending, the reader waits, and so does the client (flow control).
        let (pending_tx, pending_rx) = mpsc::channel(limits.inflight_sends);
        let answers = tokio::spawn(write_answers(writer, pending_rx).in_current_span());
        let mut violation = None;
        loop {
            let pending = match reader.next::<ClientFrame>().await {
                Ok(Some(ClientFrame::Send { id, body })) => {
                    self.accept_send(conversation, id, body).await
                }
                Ok(Some(ClientFrame::History {
                    request,
                    before,
                    after,
                    limit,
                })) => Pending::Frame(
                    match router
                        .history(&self.user, conversation, before, after, limit)
                        .await
                    {
                        Ok((messages, more)) => {
                            let forward = after.is_some() && before.is_none();
                            let (messages, more) =
                                fit_history(messages, more, forward, limits.max_frame);
                            ServerFrame::HistoryPage {
                                request,
                                messages,
                                more,
                            }
                        }
                        Err(e) => ServerFrame::Error {
                            code: e.code(),
                            message: e.to_string(),
                            request: Some(request),
                        },
                    },
                ),
                Ok(Some(ClientFrame::Delivered { up_to })) => {
                    self.marks(conversation, up_to, 0).await;
                    continue;
                }
                Ok(Some(ClientFrame::AddMember { request, user })) => {
                    self.membership(conversation, request, MemberOp::Add(user))
                        .await
                }
                Ok(Some(ClientFrame::RemoveMember { request, user })) => {
                    self.membership(conversation, request, MemberOp::Remove(user))
                        .await
                }
                Ok(Some(ClientFrame::Leave { request })) => {
                    self.membership(conversation, request, MemberOp::Leave)
                        .await
                }
                Ok(Some(ClientFrame::Promote { request, user })) => {
                    self.membership(conversation, request, MemberOp::Promote(user))
                        .await
                }
                Ok(Some(ClientFrame::SetRetention { request, policy })) => {
                    self.membership(conversation, request, MemberOp::Retention(policy))
                        .await
                }
                Ok(Some(ClientFrame::Delete { request, seq })) => {
                    self.membership(conversation, request, MemberOp::Delete(seq))
                        .await
                }
                Ok(Some(ClientFrame::ClearHistory { request, up_to })) => Pending::Frame(
                    match router.clear_history(&self.user, conversation, up_to).await {
                        Ok(seq) => ServerFrame::Done { request, seq },
                        Err(e) => ServerFrame::Error {
                            code: e.code(),
                            message: e.to_string(),
                            request: Some(request),
                        },
                    },
                ),
                Ok(Some(ClientFrame::Members {
                    request,
                    after,
                    limit,
                })) => Pending::Frame(
                    match router
                        .members_page(
                            &self.user,
                            conversation,
                            &after,
                            limit.clamp(1, 200) as usize,
                        )
                        .await
                    {
                        Ok((members, more)) => ServerFrame::MemberPage {
                            request,
                            members,
                            more,
                        },
                        Err(e) => ServerFrame::Error {
                            code: e.code(),
                            message: e.to_string(),
                            request: Some(request),
                        },
                    },
                ),
                Ok(Some(ClientFrame::Read { up_to })) => {
                    self.marks(conversation, 0, up_to).await;
                    continue;
                }
                Ok(Some(other)) => {
                    let _ = pending_tx
                        .send(Pending::Frame(ServerFrame::error(
                            ErrorCode::UNEXPECTED_FRAME,
                            format!("{} is not allowed on a conversation stream", other.name()),
                        )))
                        .await;
                    reader.stop(ErrorCode::UNEXPECTED_FRAME.0);
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    violation = protocol_violation(&e);
                    if let Some(refusal) = &violation {
                        let _ = pending_tx.send(Pending::Frame(refusal.frame())).await;
                    }
                    break;
                }
            };
            if pending_tx.send(pending).await.is_err() {
                break;
            }
        }
        drop(pending_tx);
        let _ = answers.await;
        if let Some(refusal) = violation {
            debug!(code = ?refusal.code, message = %refusal.message, "closing connection");
            close(&self.conn, &refusal);
        }
    }

    async fn membership(
        &self,
        conversation: ConversationId,
        request: u32,
        op: MemberOp,
    ) -> Pending {
        Pending::Frame(
            match self
                .shared
                .router
                .membership(conversation, &self.user, &self.device, op)
                .await
            {
                Ok(seq) => ServerFrame::Done { request, seq },
                Err(e) => ServerFrame::Error {
                    code: e.code(),
                    message: e.to_string(),
                    request: Some(request),
                },
            },
        )
    }

    async fn marks(&self, conversation: ConversationId, delivered: u64, read: u64) {
        if let Err(e) = self
            .shared
            .router
            .marks(conversation, &self.user, delivered, read)
            .await
        {
            debug!(error = %e, "marks not recorded");
        }
    }

    async fn accept_send(
        &self,
        conversation: ConversationId,
        id: ClientMsgId,
        body: Bytes,
    ) -> Pending {
        let max = self.shared.limits.max_body as usize;
        let failed =
            |code, message: String| Pending::Frame(ServerFrame::SendFailed { id, code, message });
        if body.is_empty() {
            return failed(ErrorCode::INVALID_REQUEST, "empty message body".into());
        }
        if body.len() > max {
            return failed(
                ErrorCode::INVALID_REQUEST,
                format!(
                    "message body of {} bytes exceeds the limit of {max}",
                    body.len()
                ),
            );
        }
        match self
            .shared
            .router
            .send(conversation, &self.user, &self.device, id, body)
            .await
        {
            Ok(rx) => Pending::Ack { id, rx },
            Err(e) => failed(e.code(), e.to_string()),
        }
    }
}

/// The answer to a control request: its frame, or an `Error` naming the request.
fn answer(request: u32, result: Result<ServerFrame, RouterError>) -> ServerFrame {
    result.unwrap_or_else(|e| ServerFrame::Error {
        code: e.code(),
        message: e.to_string(),
        request: Some(request),
    })
}

/// A `Conversations` answer cut so that it fits in one frame; the client pages on from the
/// last id it got.
fn fit_page(request: u32, items: Vec<ConversationInfo>, more: bool, max_frame: u32) -> ServerFrame {
    // Room for the frame's own fields around the items.
    let mut budget = max_frame as usize - 64;
    let total = items.len();
    let mut kept = Vec::with_capacity(total);
    for item in items {
        let size = postcard::to_stdvec(&item).map_or(usize::MAX, |v| v.len());
        if size > budget && !kept.is_empty() {
            break;
        }
        budget = budget.saturating_sub(size);
        kept.push(item);
    }
    let more = more || kept.len() < total;
    ServerFrame::Conversations {
        request,
        items: kept,
        more,
    }
}

/// A history page cut so that it fits in one frame. Going forward the newest messages are
/// left for the next page; going back, the oldest. Either way `more` then says so.
fn fit_history(
    mut messages: Vec<crate::framing::Message>,
    more: bool,
    forward: bool,
    max_frame: u32,
) -> (Vec<crate::framing::Message>, bool) {
    // Room for the frame's own fields and each message's encoding overhead.
    let budget = max_frame as usize - 64;
    let size = |m: &crate::framing::Message| postcard::to_stdvec(m).map_or(usize::MAX, |v| v.len());
    let mut total = 0usize;
    let mut keep = 0usize;
    let order: Box<dyn Iterator<Item = &crate::framing::Message>> = if forward {
        Box::new(messages.iter())
    } else {
        Box::new(messages.iter().rev())
    };
    for m in order {
        let s = size(m);
        if total + s > budget && keep > 0 {
            break;
        }
        total = total.saturating_add(s);
        keep += 1;
    }
    if keep == messages.len() {
        return (messages, more);
    }
    if forward {
        messages.truncate(keep);
    } else {
        messages.drain(..messages.len() - keep);
    }
    (messages, true)
}

/// An answer owed on a conversation stream.
enum Pending {
    /// Ready to send.
    Frame(ServerFrame),
    /// Sent once the message is durable (or refused).
    Ack {
        id: ClientMsgId,
        rx: oneshot::Receiver<Result<Sent, RouterError>>,
    },
}

async fn write_answers(mut writer: FrameWriter, mut pending: mpsc::Receiver<Pending>) {
    while let Some(p) = pending.recv().await {
        let frame = match p {
            Pending::Frame(frame) => frame,
            Pending::Ack { id, rx } => match rx.await {
                Ok(Ok(sent)) => ServerFrame::Sent {
                    id,
                    seq: sent.seq,
                    ts: sent.ts,
                },
                Ok(Err(e)) => ServerFrame::SendFailed {
                    id,
                    code: e.code(),
                    message: e.to_string(),
                },
                Err(_) => ServerFrame::SendFailed {
                    id,
                    code: ErrorCode::SHUTDOWN,
                    message: "the server is shutting down; retry with the same id".into(),
                },
            },
        };
        if writer.send(&frame).await.is_err() {
            return;
        }
    }
    writer.finish(LINGER).await;
}

/// A delivery stream the server keeps open towards the device for one conversation.
struct DeliveryStream {
    tx: mpsc::Sender<Bytes>,
    task: JoinHandle<()>,
    last_used: u64,
}

impl Session {
    /// Pushes a device's feed out, one stream per conversation, so that a conversation whose
    /// stream is stalled (loss, flow control) does not hold up the frames of another.
    async fn deliver(self: Arc<Self>, mut feed: DeviceFeed) {
        let conn = &self.conn;
        let limits = &self.shared.limits;
        let mut streams: HashMap<ConversationId, DeliveryStream> = HashMap::new();
        let mut closing: HashMap<ConversationId, JoinHandle<()>> = HashMap::new();
        let mut tick: u64 = 0;
        let mut scratch = bytes::BytesMut::new();
        loop {
            let batch = match feed.next_batch().await {
                Ok(batch) => batch,
                Err(e) => {
                    warn!(error = %e, "delivery stopped");
                    let refusal = Refusal::new(e.code(), e.to_string());
                    close(conn, &refusal);
                    return;
                }
            };
            for delivery in batch {
                tick += 1;
                let conversation = delivery.event.conversation();
                let frame = ServerFrame::Event {
                    log: delivery.pos,
                    event: (*delivery.event).clone(),
                };
                if let Err(e) =
                    crate::framing::codec::encode(&frame, limits.max_frame, &mut scratch)
                {
                    warn!(error = %e, pos = delivery.pos, "cannot encode event");
                    close(
                        conn,
                        &Refusal::new(ErrorCode::INTERNAL, "cannot encode an event"),
                    );
                    return;
                }
                let bytes = scratch.split().freeze();
                if !streams.contains_key(&conversation) {
                    if streams.len() >= limits.max_delivery_streams {
                        let lru = streams
                            .iter()
                            .min_by_key(|(_, s)| s.last_used)
                            .map(|(c, _)| *c);
                        if let Some(old) = lru.and_then(|c| streams.remove_entry(&c)) {
                            // Dropping the sender lets the task write what it holds and finish.
                            closing.insert(old.0, old.1.task);
                        }
                    }
                    // Never two streams of one conversation at once: the client must see its
                    // events in order, so a new stream waits until the old one is done.
                    if let Some(old) = closing.remove(&conversation) {
                        let _ = timeout(Duration::from_secs(5), old).await;
                    }
                    closing.retain(|_, t| !t.is_finished());
                    let (tx, rx) = mpsc::channel(DELIVERY_STREAM_QUEUE);
                    let task = tokio::spawn(
                        self.clone()
                            .delivery_stream(conversation, rx)
                            .in_current_span(),
                    );
                    streams.insert(
                        conversation,
                        DeliveryStream {
                            tx,
                            task,
                            last_used: tick,
                        },
                    );
                }
                let Some(stream) = streams.get_mut(&conversation) else {
                    continue;
                };
                stream.last_used = tick;
                if stream.tx.send(bytes).await.is_err() {
                    // The stream task ended: the connection is gone.
                    return;
                }
            }
        }
    }

    /// One delivery stream: events out; the device's `Delivered` and `Read` marks in.
    async fn delivery_stream(
        self: Arc<Self>,
        conversation: ConversationId,
        mut rx: mpsc::Receiver<Bytes>,
    ) {
        let max = self.shared.limits.max_frame;
        let (send, recv) = match self.conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return debug!(error = %e, "cannot open delivery stream"),
        };
        let marks = tokio::spawn(
            self.clone()
                .read_marks(conversation, FrameReader::new(recv, max)),
        );
        let _marks = AbortOnDrop(marks);
        let mut writer = FrameWriter::new(send, max);
        let mut chunks = Vec::with_capacity(DELIVERY_STREAM_QUEUE);
        while let Some(first) = rx.recv().await {
            chunks.push(first);
            while chunks.len() < DELIVERY_STREAM_QUEUE {
                match rx.try_recv() {
                    Ok(b) => chunks.push(b),
                    Err(_) => break,
                }
            }
            if writer.send_encoded(&mut chunks).await.is_err() {
                return;
            }
            chunks.clear();
        }
        writer.finish(Duration::from_secs(5)).await;
    }

    /// Reads the marks a device sends on a delivery stream.
    async fn read_marks(self: Arc<Self>, conversation: ConversationId, mut reader: FrameReader) {
        loop {
            match reader.next::<ClientFrame>().await {
                Ok(Some(ClientFrame::Delivered { up_to })) => {
                    self.marks(conversation, up_to, 0).await
                }
                Ok(Some(ClientFrame::Read { up_to })) => self.marks(conversation, 0, up_to).await,
                Ok(Some(other)) => {
                    debug!(
                        frame = other.name(),
                        "unexpected frame on a delivery stream"
                    );
                    reader.stop(ErrorCode::UNEXPECTED_FRAME.0);
                    return;
                }
                Ok(None) => return,
                Err(e) => {
                    if let Some(refusal) = protocol_violation(&e) {
                        close(&self.conn, &refusal);
                    }
                    return;
                }
            }
        }
    }
}
