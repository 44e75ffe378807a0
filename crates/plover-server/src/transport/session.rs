//! One authenticated connection: the handshake and `Hello`, the control stream, the
//! conversation streams the client opens, and the delivery streams the server opens.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument, debug, debug_span, info, warn};

use super::devices::Claim;
use super::requests::{Actor, Control, Pending, Refusal, Shared, Step};
use crate::auth::{AuthError, valid_name};
use crate::router::timing::StageRecorder;
use crate::router::{DeviceFeed, Push};
use plover_proto::{
    ClientDatagram, ClientFrame, ConversationId, ErrorCode, Event, OLDEST_CLIENT_VERSION,
    PROTOCOL_VERSION, ServerDatagram, ServerFrame,
};
use plover_quic::{FrameReader, FrameWriter, StreamError};

/// How long a closing stream or connection waits for its last frames to reach the peer.
pub(super) const LINGER: Duration = Duration::from_secs(1);
/// Encoded frames queued towards one delivery stream before the dispatcher waits for it.
const DELIVERY_STREAM_QUEUE: usize = 64;
/// Encoded event bytes queued towards one device, across its delivery streams, before the
/// dispatcher waits (and the device's feed, once its own queue is full, falls back to
/// catch-up from the store). Counted in frames alone, 32 streams of 64 frames of 64 KiB
/// would be 128 MiB per connection; this is the connection's send window again.
const DELIVERY_BYTES: usize = 1024 * 1024;

/// An encoded event on its way to a delivery stream, with its share of [`DELIVERY_BYTES`].
/// An encoded event for a delivery stream, its share of the connection's queued bytes, and
/// the stage stamps of a live message with the instant its connection took it.
type Queued = (Bytes, tokio::sync::OwnedSemaphorePermit, Option<Taken>);
type Taken = (Arc<crate::router::timing::Traced>, std::time::Instant);

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
    e.violation().map(|code| Refusal::new(code, e.to_string()))
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
pub(super) struct AbortOnDrop(pub(super) JoinHandle<()>);

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
    // `auth.timeout` is at most 10 minutes (`Config::validate`), so the sum never overflows.
    let deadline = Instant::now()
        .checked_add(shared.auth_timeout)
        .unwrap_or_else(Instant::now);
    let handshake = timeout_at(deadline, incoming).await;
    handshakes.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return debug!(error = %e, "handshake failed"),
        Err(_) => return debug!("handshake timed out"),
    };
    // Boxed here and below: a future's size is that of its largest await point, and this task
    // lives as long as the connection; the rare big steps (authentication, a control request)
    // get their own short-lived allocation so the resting task stays small.
    let Some((session, reader, writer, claim)) =
        Box::pin(authenticate(&conn, &shared, deadline)).await
    else {
        return;
    };
    tracing::Span::current().record("user", session.actor.user.as_str());
    info!(device = %session.actor.device, "authenticated");
    let session = Arc::new(session);
    let (_presence, pushes) = shared.router.presence().connect(&session.actor.user);
    let gauge = metrics::gauge!(crate::metrics::names::CONNECTIONS);
    gauge.increment(1.0);
    tokio::select! {
        () = session.clone().control_loop(reader, writer, pushes) => {}
        () = session.clone().accept_streams() => {}
        () = session.clone().datagrams() => {}
        _ = conn.closed() => {}
    }
    // The connection lives and dies as one: whichever part ended it (the control stream
    // reset or unwritable, a close from either side), it is closed now, and every stream
    // task it owned was aborted with the futures above, so none goes on accepting sends
    // outside the connection limit, the presence count or the device registry.
    if conn.close_reason().is_none() {
        close(
            &conn,
            &Refusal::new(ErrorCode::CONTROL_CLOSED, "the control stream ended"),
        );
    }
    // The last acknowledged cursor, if it was still waiting for its turn.
    session.actor.flush_acks();
    drop(claim);
    gauge.decrement(1.0);
    debug!(reason = ?conn.close_reason(), "connection ended");
}

struct Session {
    conn: quinn::Connection,
    actor: Actor,
    /// The frames this connection may send, shared by all its streams.
    budget: super::budget::FrameBudget,
}

impl Session {
    /// Charges a frame to the connection's budget, waiting while it is spent.
    async fn charge(&self, frame: &ClientFrame) {
        self.budget.take(super::budget::cost(frame)).await;
    }
}

async fn authenticate(
    conn: &quinn::Connection,
    shared: &Arc<Shared>,
    deadline: Instant,
) -> Option<(Session, FrameReader, FrameWriter, Claim)> {
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
    let first = reader.next_with(ClientFrame::decode_first);
    let hello = match timeout_at(deadline, first).await {
        Err(_) => Err(timed_out()),
        Ok(Ok(Some(ClientFrame::Hello {
            version,
            token,
            device,
            zone,
        }))) => {
            // Within the handshake's time too: an identity provider's keys may be refreshed.
            let checked = check_hello(shared, version, token.as_str(), &device, zone.as_deref());
            match timeout_at(deadline, checked).await {
                Ok(checked) => checked.map(|(user, issued)| (user, issued, device, version, zone)),
                Err(_) => Err(timed_out()),
            }
        }
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
    let (user, issued, device, version, zone) = match hello {
        Ok(v) => v,
        Err(refusal) => {
            refuse(conn, &mut writer, refusal).await;
            return None;
        }
    };
    // A node of a cluster sends a new client to another node when the client asked for
    // another zone, when this node drains, or when it holds many more devices than another.
    if let Some(to) = shared
        .redirect
        .as_ref()
        .and_then(|r| r.target(zone.as_deref()))
    {
        let refusal = Refusal::new(ErrorCode::MOVED, to);
        refuse(conn, &mut writer, refusal).await;
        return None;
    }
    if let Err(e) = shared.router.ensure_user(&user).await {
        refuse(conn, &mut writer, Refusal::new(e.code(), e.to_string())).await;
        return None;
    }
    let claim = match shared.devices.claim(&user, &device, conn) {
        Ok(claim) => claim,
        Err(refusal) => {
            refuse(conn, &mut writer, refusal).await;
            return None;
        }
    };
    // Checked once the connection is claimed: a revocation written before this read is
    // seen here, and one written after it closes the claimed connection (its kick).
    match shared.router.store().revoked(&user, &device) {
        Ok(Some(at)) if issued <= at => {
            let refusal = Refusal::new(
                ErrorCode::TOKEN_REVOKED,
                "this token was revoked; get a new one",
            );
            refuse(conn, &mut writer, refusal).await;
            return None;
        }
        Ok(_) => {}
        Err(e) => {
            refuse(
                conn,
                &mut writer,
                Refusal::new(ErrorCode::UNAVAILABLE, e.to_string()),
            )
            .await;
            return None;
        }
    }
    let welcome = ServerFrame::Welcome {
        // The version the session speaks: the client's, when it is an older one.
        version: version.min(PROTOCOL_VERSION),
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
        actor: Actor {
            user,
            device,
            shared: shared.clone(),
            feed: Default::default(),
            acks: Default::default(),
        },
        budget: super::budget::FrameBudget::new(shared.limits.frames_per_second),
    };
    Some((session, reader, writer, claim))
}

async fn check_hello(
    shared: &Shared,
    version: u16,
    token: &str,
    device: &str,
    zone: Option<&str>,
) -> Result<(String, u64), Refusal> {
    if !(OLDEST_CLIENT_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(Refusal::new(
            ErrorCode::UNSUPPORTED_VERSION,
            format!(
                "protocol version {version} is not supported; this server speaks \
                 {OLDEST_CLIENT_VERSION} to {PROTOCOL_VERSION}"
            ),
        ));
    }
    if zone.is_some_and(|z| !crate::config::valid_zone(z)) {
        return Err(Refusal::new(
            ErrorCode::INVALID_REQUEST,
            "zone must be 1-64 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    if !valid_name(device) {
        return Err(Refusal::new(
            ErrorCode::INVALID_REQUEST,
            "device name must be 1-64 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    let verified = shared.keys.verify(token, device).await?;
    Ok((verified.user, verified.issued))
}

impl Session {
    /// The control stream after `Welcome`: pings, sync, acks, listings.
    async fn control_loop(
        self: Arc<Self>,
        mut reader: FrameReader,
        mut writer: FrameWriter,
        mut pushes: mpsc::Receiver<Arc<Push>>,
    ) {
        let mut delivery: Option<AbortOnDrop> = None;
        loop {
            // `FrameReader::next` keeps partial frames in the reader, so losing the race to a
            // push loses no bytes.
            let ack_due = self.actor.acks.due();
            let next = tokio::select! {
                next = reader.next::<ClientFrame>() => next,
                Some(push) = pushes.recv() => {
                    if Box::pin(self.push(push, &mut writer)).await.is_err() {
                        return;
                    }
                    continue;
                }
                // Boxed: a timer is as large as the rest of this loop's state, and only a
                // client that acks faster than ten times a second ever waits on it.
                () = async { Box::pin(tokio::time::sleep_until(ack_due.unwrap_or_else(Instant::now))).await },
                    if ack_due.is_some() => {
                    self.actor.flush_acks();
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
                        Box::pin(refuse(&self.conn, &mut writer, refusal)).await;
                    }
                    return;
                }
            };
            self.charge(&frame).await;
            let reply = match Box::pin(self.actor.control(frame, delivery.is_some())).await {
                Control::Reply(reply) => reply,
                Control::Quiet => continue,
                Control::Subscribed(sub) => {
                    let span = debug_span!("delivery", cursor = sub.cursor);
                    let task = tokio::spawn(self.clone().deliver(sub.feed).instrument(span));
                    delivery = Some(AbortOnDrop(task));
                    ServerFrame::SyncStarted {
                        cursor: sub.cursor,
                        head: sub.head,
                    }
                }
                Control::Refuse(refusal) => {
                    Box::pin(refuse(&self.conn, &mut writer, refusal)).await;
                    return;
                }
            };
            if writer.send(&reply).await.is_err() {
                return;
            }
        }
    }

    /// Sends a push: presence changes on the control stream, typing as a datagram.
    async fn push(&self, push: Arc<Push>, writer: &mut FrameWriter) -> Result<(), StreamError> {
        match Arc::unwrap_or_clone(push) {
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
        let rate = f64::from(self.actor.shared.typing_per_second);
        let mut tokens = rate;
        let mut last = Instant::now();
        // Each conversation's members with the membership epoch read before them: an entry
        // whose epoch has moved is read again, so a member removed (or added) anywhere is
        // removed (or added) here too.
        let mut members: HashMap<ConversationId, (u64, Arc<[String]>)> = HashMap::new();
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
            let router = &self.actor.shared.router;
            let epoch = router.membership_epoch(conversation);
            let list = match members.get(&conversation) {
                Some((at, list)) if *at == epoch => list.clone(),
                // Boxed, like the control stream's requests: rare, and large.
                _ => match Box::pin(router.members(&self.actor.user, conversation)).await {
                    Ok(list) => {
                        // A small cache: membership of a conversation one types in rarely
                        // changes; bounded so a client cannot grow it without limit.
                        if members.len() >= 64 {
                            members.clear();
                        }
                        members.insert(conversation, (epoch, list.clone()));
                        list
                    }
                    Err(_) => {
                        members.remove(&conversation);
                        continue;
                    }
                },
            };
            // Nobody sees the typing of someone who has not accepted the conversation (a
            // message request), nor across a block, either way.
            let store = router.store();
            let list: Arc<[String]> = match (
                store.request(conversation, &self.actor.user),
                store.blocked_either_way(&self.actor.user),
            ) {
                (Ok(None), Ok(apart)) if apart.is_empty() => list,
                (Ok(None), Ok(apart)) => list
                    .iter()
                    .filter(|m| !apart.contains(*m))
                    .cloned()
                    .collect(),
                // A request, or relations that cannot be read: no indicator.
                _ => continue,
            };
            let push = Push::Typing {
                conversation,
                user: self.actor.user.clone(),
            };
            router.presence().push_to(&list, &self.actor.user, push);
        }
    }

    /// Accepts the conversation streams the client opens, one task each, owned by this
    /// future: when the connection ends and it is dropped, every stream task is aborted.
    async fn accept_streams(self: Arc<Self>) {
        let mut streams = tokio::task::JoinSet::new();
        loop {
            let (send, recv) = tokio::select! {
                accepted = self.conn.accept_bi() => match accepted {
                    Ok(streams) => streams,
                    Err(_) => return,
                },
                // Reap finished stream tasks, so the set holds only live ones.
                Some(_) = streams.join_next(), if !streams.is_empty() => continue,
            };
            let span = debug_span!("stream", id = %send.id(), conversation = tracing::field::Empty);
            streams.spawn(
                self.clone()
                    .conversation_stream(send, recv)
                    .instrument(span),
            );
        }
    }

    /// `Open`, charged to the budget.
    async fn charged_open(
        &self,
        frame: ClientFrame,
    ) -> Result<(ConversationId, ServerFrame), ServerFrame> {
        self.charge(&frame).await;
        self.actor.open(frame).await
    }

    /// A conversation stream's frame, charged to the budget.
    async fn charged(&self, conversation: ConversationId, frame: ClientFrame) -> Step {
        self.charge(&frame).await;
        self.actor.conversation(conversation, frame).await
    }

    /// One conversation stream: `Open`, then sends and history requests.
    async fn conversation_stream(
        self: Arc<Self>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let limits = &self.actor.shared.limits;
        let mut reader = FrameReader::new(recv, limits.max_frame);
        let mut writer = FrameWriter::new(send, limits.max_frame);
        let first = match reader.next::<ClientFrame>().await {
            // A stream of its own per transfer (`transport/media.rs`).
            Ok(Some(ClientFrame::Upload { size, object })) => {
                let shared = &self.actor.shared;
                return Box::pin(super::media::upload(
                    &shared.media,
                    &self.actor.user,
                    reader,
                    writer,
                    size,
                    object,
                ))
                .await;
            }
            Ok(Some(ClientFrame::Download {
                object,
                conversation,
                seq,
                offset,
                length,
            })) => {
                let shared = &self.actor.shared;
                return Box::pin(super::media::download(
                    &shared.media,
                    &self.actor.user,
                    writer,
                    object,
                    conversation,
                    seq,
                    offset,
                    length,
                ))
                .await;
            }
            other => other,
        };
        let conversation = match first {
            Ok(Some(frame)) => match Box::pin(self.charged_open(frame)).await {
                Ok((conversation, opened)) => {
                    if writer.send(&opened).await.is_err() {
                        return;
                    }
                    conversation
                }
                Err(error) => {
                    let _ = writer.send(&error).await;
                    writer.finish(LINGER).await;
                    return;
                }
            },
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
        // And in bytes: answers wait here encoded, so a client that never reads them holds
        // the server to `ANSWER_BYTES` per stream (plus QUIC's send window), not to
        // `inflight_sends` pages of up to `max_frame` each.
        let answer_bytes = Arc::new(tokio::sync::Semaphore::new(ANSWER_BYTES));
        let mut answers = AbortOnDrop(tokio::spawn(
            write_answers(writer, pending_rx, self.actor.shared.stages).in_current_span(),
        ));
        let mut violation = None;
        loop {
            let pending = match reader.next::<ClientFrame>().await {
                Ok(Some(frame)) => match self.charged(conversation, frame).await {
                    Step::Answer(pending) => pending,
                    Step::Quiet => continue,
                    Step::Stop(error) => {
                        let _ = pending_tx.send(Answer::unbudgeted(error)).await;
                        reader.stop(ErrorCode::UNEXPECTED_FRAME.0);
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    violation = protocol_violation(&e);
                    if let Some(refusal) = &violation {
                        let _ = pending_tx.send(Answer::unbudgeted(refusal.frame())).await;
                    }
                    break;
                }
            };
            let Some(answer) = Answer::new(pending, limits.max_frame, &answer_bytes).await else {
                break;
            };
            if pending_tx.send(answer).await.is_err() {
                break;
            }
        }
        drop(pending_tx);
        let _ = (&mut answers.0).await;
        if let Some(refusal) = violation {
            debug!(code = ?refusal.code, message = %refusal.message, "closing connection");
            close(&self.conn, &refusal);
        }
    }
}

/// Bytes of answers one conversation stream may hold, encoded, before it reads the next
/// request: four frames of the default size, twice the stream's receive window.
const ANSWER_BYTES: usize = 256 * 1024;
/// What an answer still to come (a `Sent`) is counted as: its frame's size, about.
const LATER_ANSWER_BYTES: usize = 64;

/// An answer owed on a conversation stream, with its share of the stream's byte budget
/// (released once written).
struct Answer {
    frame: AnswerFrame,
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

enum AnswerFrame {
    /// Ready, encoded.
    Encoded(Bytes),
    /// Resolved once the message is durable.
    Later(Pending),
}

impl Answer {
    /// An answer with its budget taken (waiting while the stream's answers are over it), or
    /// `None` when the stream is gone.
    async fn new(
        pending: Pending,
        max_frame: u32,
        budget: &Arc<tokio::sync::Semaphore>,
    ) -> Option<Self> {
        let frame = match pending {
            Pending::Frame(frame) => AnswerFrame::Encoded(encode_answer(&frame, max_frame)),
            later @ Pending::Ack { .. } => AnswerFrame::Later(later),
        };
        let size = match &frame {
            AnswerFrame::Encoded(bytes) => bytes.len(),
            AnswerFrame::Later(_) => LATER_ANSWER_BYTES,
        };
        let permits = u32::try_from(size.clamp(1, ANSWER_BYTES)).unwrap_or(u32::MAX);
        let bytes = budget.clone().acquire_many_owned(permits).await.ok()?;
        Some(Self {
            frame,
            _bytes: Some(bytes),
        })
    }

    /// The stream's last answer (its error), outside the budget.
    fn unbudgeted(frame: ServerFrame) -> Self {
        Self {
            frame: AnswerFrame::Later(Pending::Frame(frame)),
            _bytes: None,
        }
    }
}

/// A frame encoded for a conversation stream; one that does not fit (never expected: pages
/// are cut to fit) becomes an `internal` error.
fn encode_answer(frame: &ServerFrame, max_frame: u32) -> Bytes {
    let mut buf = bytes::BytesMut::new();
    if let Err(e) = plover_proto::codec::encode(frame, max_frame, &mut buf) {
        warn!(error = %e, "cannot encode an answer");
        buf.clear();
        let error = ServerFrame::error(ErrorCode::INTERNAL, "cannot encode the answer");
        let _ = plover_proto::codec::encode(&error, max_frame, &mut buf);
    }
    buf.freeze()
}

async fn write_answers(
    mut writer: FrameWriter,
    mut answers: mpsc::Receiver<Answer>,
    stages: StageRecorder,
) {
    while let Some(answer) = answers.recv().await {
        let written = match answer.frame {
            AnswerFrame::Encoded(bytes) => writer.send_encoded(&mut [bytes]).await,
            AnswerFrame::Later(pending) => {
                let (frame, timing) = pending.resolve().await;
                let written = writer.send(&frame).await;
                if let (Ok(()), Some(timing)) = (&written, timing) {
                    timing.answered(std::time::Instant::now(), stages);
                }
                written
            }
        };
        if written.is_err() {
            return;
        }
    }
    writer.finish(LINGER).await;
}

/// A delivery stream the server keeps open towards the device for one conversation.
struct DeliveryStream {
    tx: mpsc::Sender<Queued>,
    task: AbortOnDrop,
    last_used: u64,
}

impl Session {
    /// Pushes a device's feed out, one stream per conversation, so that a conversation whose
    /// stream is stalled (loss, flow control) does not hold up the frames of another.
    async fn deliver(self: Arc<Self>, mut feed: DeviceFeed) {
        let conn = &self.conn;
        let limits = &self.actor.shared.limits;
        let mut streams: HashMap<ConversationId, DeliveryStream> = HashMap::new();
        // Streams being finished after they were closed for a newer one; owned here, so
        // they end with the connection's feed.
        let mut closing: HashMap<ConversationId, AbortOnDrop> = HashMap::new();
        let mut tick: u64 = 0;
        let mut scratch = bytes::BytesMut::new();
        let queued_bytes = Arc::new(tokio::sync::Semaphore::new(DELIVERY_BYTES));
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
            let taken = std::time::Instant::now();
            for delivery in batch {
                tick = tick.wrapping_add(1);
                let conversation = delivery.event.conversation();
                let frame = ServerFrame::Event {
                    log: delivery.pos,
                    event: (*delivery.event).clone(),
                };
                if let Err(e) = plover_proto::codec::encode(&frame, limits.max_frame, &mut scratch)
                {
                    // Only a message can outgrow a frame (one stored by an older version
                    // with a long member list): it goes cut to fit, never not at all, or
                    // the device would meet it again after every reconnect.
                    let ServerFrame::Event {
                        log,
                        event: Event::Message(msg),
                    } = frame
                    else {
                        warn!(error = %e, pos = delivery.pos, "cannot encode an event");
                        close(
                            conn,
                            &Refusal::new(ErrorCode::INTERNAL, "cannot encode an event"),
                        );
                        return;
                    };
                    debug!(error = %e, pos = log, "an event cut to fit its frame");
                    let cut = ServerFrame::Event {
                        log,
                        event: Event::Message(msg.fit(limits.max_frame)),
                    };
                    if let Err(e) =
                        plover_proto::codec::encode(&cut, limits.max_frame, &mut scratch)
                    {
                        warn!(error = %e, pos = log, "cannot encode an event");
                        close(
                            conn,
                            &Refusal::new(ErrorCode::INTERNAL, "cannot encode an event"),
                        );
                        return;
                    }
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
                    if let Some(mut old) = closing.remove(&conversation) {
                        let _ = timeout(Duration::from_secs(5), &mut old.0).await;
                    }
                    closing.retain(|_, t| !t.0.is_finished());
                    let (tx, rx) = mpsc::channel(DELIVERY_STREAM_QUEUE);
                    let task = AbortOnDrop(tokio::spawn(
                        self.clone()
                            .delivery_stream(conversation, rx)
                            .in_current_span(),
                    ));
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
                let share = u32::try_from(bytes.len().clamp(1, DELIVERY_BYTES)).unwrap_or(u32::MAX);
                let Ok(share) = queued_bytes.clone().acquire_many_owned(share).await else {
                    return;
                };
                let traced = delivery.timing.map(|t| (t, taken));
                if stream.tx.send((bytes, share, traced)).await.is_err() {
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
        mut rx: mpsc::Receiver<Queued>,
    ) {
        let max = self.actor.shared.limits.max_frame;
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
        // The shares are given back once their bytes are written (into QUIC's send buffer).
        let mut shares = Vec::with_capacity(DELIVERY_STREAM_QUEUE);
        let mut traced = Vec::new();
        let stages = self.actor.shared.stages;
        while let Some((first, share, taken)) = rx.recv().await {
            chunks.push(first);
            shares.push(share);
            traced.extend(taken);
            while chunks.len() < DELIVERY_STREAM_QUEUE {
                match rx.try_recv() {
                    Ok((b, share, taken)) => {
                        chunks.push(b);
                        shares.push(share);
                        traced.extend(taken);
                    }
                    Err(_) => break,
                }
            }
            if writer.send_encoded(&mut chunks).await.is_err() {
                return;
            }
            let written = std::time::Instant::now();
            for (timing, taken) in traced.drain(..) {
                timing.delivered(taken, written, stages);
            }
            chunks.clear();
            shares.clear();
        }
        writer.finish(Duration::from_secs(5)).await;
    }

    /// Reads the marks a device sends on a delivery stream.
    async fn read_marks(self: Arc<Self>, conversation: ConversationId, mut reader: FrameReader) {
        loop {
            let frame = reader.next::<ClientFrame>().await;
            if let Ok(Some(frame)) = &frame {
                self.charge(frame).await;
            }
            match frame {
                Ok(Some(ClientFrame::Delivered { up_to })) => {
                    self.actor.marks(conversation, up_to, 0).await
                }
                Ok(Some(ClientFrame::Read { up_to })) => {
                    self.actor.marks(conversation, 0, up_to).await
                }
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

#[cfg(test)]
mod tests {
    /// The size of the future an async fn of three arguments returns.
    fn future_size<A, B, C, F: Future>(_: impl Fn(A, B, C) -> F) -> usize {
        size_of::<F>()
    }

    /// The connection task lives as long as an idle connection: every byte of its future is
    /// paid once per connection (2,816 bytes before the rare big steps were boxed; 2,184
    /// after, with rustc 1.95). The bound leaves room for compiler changes, not for new
    /// inline state.
    #[test]
    fn the_connection_task_stays_small() {
        let size = future_size(super::serve_connection);
        assert!(size <= 2_600, "serve_connection's future is {size} bytes");
    }
}
