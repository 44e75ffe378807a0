//! What a session does with each frame, apart from QUIC: the control stream's requests and a
//! conversation stream's. `session.rs` reads the frames off the connection and writes the
//! answers back; the fuzz harness (`fuzzing.rs`) drives the same functions without a network.

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::debug;

use crate::auth::TokenKeys;
use crate::config::{Config, Limits};
use crate::router::timing::Traced;
use crate::router::{MemberOp, Router, RouterError, Sent, Subscription};
use plover_proto::{ClientFrame, ClientMsgId, ConversationId, ConversationInfo, ErrorCode};
use plover_proto::{Message, ServerFrame};

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
    /// Each device's one live connection.
    pub(crate) devices: Arc<super::devices::Devices>,
    /// Whether and how messages' stage latencies are recorded.
    pub(crate) stages: crate::router::timing::StageRecorder,
    /// In a cluster: where new clients go while this node holds too many (see
    /// `Cluster::redirect`).
    pub(crate) redirect: Option<crate::cluster::Redirect>,
    /// Uploads and downloads.
    pub(crate) media: Arc<crate::media::Media>,
}

impl Shared {
    /// What every session of a server shares, from its configuration.
    pub(crate) fn new(
        router: Router,
        keys: TokenKeys,
        config: &Config,
        server_id: String,
        registry: Option<Arc<crate::cluster::Registry>>,
        redirect: Option<crate::cluster::Redirect>,
        media: Arc<crate::media::Media>,
    ) -> Self {
        Self {
            router,
            keys,
            limits: config.limits.clone(),
            heartbeat: config.transport.heartbeat,
            auth_timeout: config.auth.timeout,
            server_id,
            typing_per_second: config.presence.typing_per_second,
            devices: Arc::new(super::devices::Devices::new(
                config.limits.connections_per_user,
                registry,
            )),
            stages: crate::router::timing::StageRecorder::new(&config.metrics),
            redirect,
            media,
        }
    }
}

/// Why a connection or stream is being closed with an error.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn frame(&self) -> ServerFrame {
        ServerFrame::error(self.code, self.message.clone())
    }
}

/// An answer owed on a conversation stream.
pub(crate) enum Pending {
    /// Ready to send.
    Frame(ServerFrame),
    /// Sent once the message is durable (or refused).
    Ack {
        id: ClientMsgId,
        rx: oneshot::Receiver<Result<Sent, RouterError>>,
    },
}

impl Pending {
    /// The frame this answer becomes, waiting for the commit if it is an ack; with the
    /// message's stage stamps when it is a live send's `Sent`.
    pub(crate) async fn resolve(self) -> (ServerFrame, Option<Arc<Traced>>) {
        let frame = match self {
            Pending::Frame(frame) => frame,
            Pending::Ack { id, rx } => match rx.await {
                Ok(Ok(sent)) => {
                    let frame = ServerFrame::Sent {
                        id,
                        seq: sent.seq,
                        ts: sent.ts,
                        log: sent.log,
                    };
                    return (frame, sent.timing);
                }
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
        (frame, None)
    }
}

/// What the control stream does after a frame.
pub(crate) enum Control {
    /// Write this answer.
    Reply(ServerFrame),
    /// Nothing to answer (an `Ack`).
    Quiet,
    /// Delivery starts: answer `SyncStarted` and push the feed.
    Subscribed(Subscription),
    /// Answer with the refusal and close the connection.
    Refuse(Refusal),
}

/// What a conversation stream does after a frame.
pub(crate) enum Step {
    /// An answer, in request order.
    Answer(Pending),
    /// Nothing to answer (marks).
    Quiet,
    /// Answer with this error and stop reading the stream.
    Stop(ServerFrame),
}

/// An authenticated device: whom requests act for.
#[derive(Debug)]
pub(crate) struct Actor {
    pub(crate) user: String,
    pub(crate) device: String,
    pub(crate) shared: Arc<Shared>,
    /// The connection's feed once it syncs ([`crate::router::DeviceFeed::id`]), else 0.
    pub(crate) feed: AtomicU64,
    /// The device's acknowledged cursor on its way to the store, coalesced.
    pub(crate) acks: super::budget::Acks,
}

impl Actor {
    fn router(&self) -> &Router {
        &self.shared.router
    }

    /// A frame on the control stream. `syncing` says whether delivery already runs.
    pub(crate) async fn control(&self, frame: ClientFrame, syncing: bool) -> Control {
        let router = self.router();
        let reply = match frame {
            ClientFrame::Ping { nonce } => {
                self.shared.devices.heartbeat(&self.user, &self.device);
                ServerFrame::Pong { nonce }
            }
            ClientFrame::Ack { cursor } => {
                // A flood of acks becomes at most ten cursor writes a second: the commit
                // queue they share with every shard is not theirs to fill.
                if let Some(cursor) = self.acks.offer(cursor) {
                    router.ack(&self.user, &self.device, cursor);
                }
                return Control::Quiet;
            }
            ClientFrame::Presence { request, user } => {
                match router.presence().query(&self.user, &user).await {
                    Ok((online, last_seen)) => ServerFrame::PresenceInfo {
                        request,
                        user,
                        online,
                        last_seen,
                    },
                    Err(e) => request_error(request, &e),
                }
            }
            ClientFrame::ListConversations {
                request,
                after,
                limit,
            } => {
                let limit = limit.clamp(1, 100) as usize;
                match router.conversations(&self.user, after, limit).await {
                    Ok((items, more)) => {
                        fit_page(request, items, more, self.shared.limits.max_frame)
                    }
                    Err(e) => request_error(request, &e),
                }
            }
            ClientFrame::RegisterPusher { request, pusher } => answer(
                request,
                router
                    .register_pusher(&self.user, &self.device, pusher)
                    .await
                    .map(|()| ServerFrame::Done { request, seq: 1 }),
            ),
            ClientFrame::UnregisterPusher { request, key } => answer(
                request,
                router
                    .unregister_pusher(&self.user, &key)
                    .await
                    .map(|removed| ServerFrame::Done {
                        request,
                        seq: u64::from(removed),
                    }),
            ),
            ClientFrame::Block { request, user } => answer(
                request,
                router
                    .block(&self.user, &user, true)
                    .await
                    .map(|()| ServerFrame::Done { request, seq: 0 }),
            ),
            ClientFrame::Unblock { request, user } => answer(
                request,
                router
                    .block(&self.user, &user, false)
                    .await
                    .map(|()| ServerFrame::Done { request, seq: 0 }),
            ),
            ClientFrame::ListBlocked { request } => answer(
                request,
                router
                    .blocked(&self.user)
                    .await
                    .map(|users| ServerFrame::Blocked { request, users }),
            ),
            ClientFrame::Accept {
                request,
                conversation,
            } => answer(
                request,
                router
                    .accept(&self.user, conversation)
                    .await
                    .map(|()| ServerFrame::Done { request, seq: 0 }),
            ),
            ClientFrame::ListRequests { request } => answer(
                request,
                router
                    .requests(&self.user)
                    .await
                    .map(|requests| ServerFrame::Requests {
                        request,
                        requests: requests
                            .into_iter()
                            .map(|(conversation, from)| plover_proto::MessageRequest {
                                conversation,
                                from,
                            })
                            .collect(),
                    }),
            ),
            ClientFrame::ListPushers { request } => answer(
                request,
                router
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
                router
                    .push_content(&self.user, conversation, include)
                    .await
                    .map(|()| ServerFrame::Done { request, seq: 1 }),
            ),
            ClientFrame::CreateGroup {
                request,
                title,
                members,
                retention,
            } => answer(
                request,
                router
                    .create_group(&self.user, &self.device, &title, &members, retention)
                    .await
                    .map(|conversation| ServerFrame::GroupCreated {
                        request,
                        conversation,
                    }),
            ),
            ClientFrame::Sync { cursor } if !syncing => {
                return match router.subscribe(&self.user, &self.device, cursor).await {
                    Ok(sub) => {
                        self.feed.store(sub.feed.id(), Ordering::Relaxed);
                        Control::Subscribed(sub)
                    }
                    Err(e) => Control::Reply(ServerFrame::error(e.code(), e.to_string())),
                };
            }
            other => {
                let message = match other {
                    ClientFrame::Sync { .. } => "already syncing".to_owned(),
                    ClientFrame::Hello { .. } => "already authenticated".to_owned(),
                    f => format!("{} belongs on a conversation stream", f.name()),
                };
                return Control::Refuse(Refusal::new(ErrorCode::UNEXPECTED_FRAME, message));
            }
        };
        Control::Reply(reply)
    }

    /// Hands the cursor that waited for its turn to the router (when it is due, and when
    /// the connection ends).
    pub(crate) fn flush_acks(&self) {
        if let Some(cursor) = self.acks.take() {
            self.router().ack(&self.user, &self.device, cursor);
        }
    }

    /// The first frame of a conversation stream, which must be `Open`: the conversation and
    /// the `Opened` answer, or the error that ends the stream.
    pub(crate) async fn open(
        &self,
        frame: ClientFrame,
    ) -> Result<(ConversationId, ServerFrame), ServerFrame> {
        let ClientFrame::Open { target, create } = frame else {
            return Err(ServerFrame::error(
                ErrorCode::UNEXPECTED_FRAME,
                format!(
                    "a conversation stream starts with Open, not {}",
                    frame.name()
                ),
            ));
        };
        match self.router().open(&self.user, target, create).await {
            Ok(opened) => Ok((
                opened.conversation,
                ServerFrame::Opened {
                    conversation: opened.conversation,
                    kind: opened.kind,
                    title: opened.title,
                    member_count: opened.member_count,
                    members: opened.members,
                    admins: opened.admins,
                    last_seq: opened.last_seq,
                },
            )),
            Err(e) => Err(ServerFrame::error(e.code(), e.to_string())),
        }
    }

    /// A frame on the stream of an opened conversation.
    pub(crate) async fn conversation(
        &self,
        conversation: ConversationId,
        frame: ClientFrame,
    ) -> Step {
        let router = self.router();
        let limits = &self.shared.limits;
        let frame = match frame {
            ClientFrame::Send { id, body } => {
                return Step::Answer(self.accept_send(conversation, id, body, Vec::new()).await);
            }
            ClientFrame::SendWith { id, body, objects } => {
                return Step::Answer(self.accept_send(conversation, id, body, objects).await);
            }
            ClientFrame::Delivered { up_to } => {
                self.marks(conversation, up_to, 0).await;
                return Step::Quiet;
            }
            ClientFrame::Read { up_to } => {
                self.marks(conversation, 0, up_to).await;
                return Step::Quiet;
            }
            ClientFrame::History {
                request,
                before,
                after,
                limit,
            } => match router
                .history(&self.user, conversation, before, after, limit)
                .await
            {
                Ok((messages, more)) => {
                    let forward = after.is_some() && before.is_none();
                    let (messages, more) = fit_history(messages, more, forward, limits.max_frame);
                    ServerFrame::HistoryPage {
                        request,
                        messages,
                        more,
                    }
                }
                Err(e) => request_error(request, &e),
            },
            ClientFrame::AddMember { request, user } => {
                self.membership(conversation, request, MemberOp::Add(user))
                    .await
            }
            ClientFrame::RemoveMember { request, user } => {
                self.membership(conversation, request, MemberOp::Remove(user))
                    .await
            }
            ClientFrame::Leave { request } => {
                self.membership(conversation, request, MemberOp::Leave)
                    .await
            }
            ClientFrame::Promote { request, user } => {
                self.membership(conversation, request, MemberOp::Promote(user))
                    .await
            }
            ClientFrame::SetRetention { request, policy } => {
                self.membership(conversation, request, MemberOp::Retention(policy))
                    .await
            }
            ClientFrame::Delete { request, seq } => {
                self.membership(conversation, request, MemberOp::Delete(seq))
                    .await
            }
            ClientFrame::ClearHistory { request, up_to } => answer(
                request,
                router
                    .clear_history(&self.user, conversation, up_to)
                    .await
                    .map(|seq| ServerFrame::Done { request, seq }),
            ),
            ClientFrame::Members {
                request,
                after,
                limit,
            } => answer(
                request,
                router
                    .members_page(
                        &self.user,
                        conversation,
                        &after,
                        limit.clamp(1, 200) as usize,
                    )
                    .await
                    .map(|(members, more)| ServerFrame::MemberPage {
                        request,
                        members,
                        more,
                    }),
            ),
            other => {
                return Step::Stop(ServerFrame::error(
                    ErrorCode::UNEXPECTED_FRAME,
                    format!("{} is not allowed on a conversation stream", other.name()),
                ));
            }
        };
        Step::Answer(Pending::Frame(frame))
    }

    async fn membership(
        &self,
        conversation: ConversationId,
        request: u32,
        op: MemberOp,
    ) -> ServerFrame {
        answer(
            request,
            self.router()
                .membership(conversation, &self.user, &self.device, op)
                .await
                .map(|seq| ServerFrame::Done { request, seq }),
        )
    }

    /// Records a device's delivered or read mark (zero leaves a mark as it is).
    pub(crate) async fn marks(&self, conversation: ConversationId, delivered: u64, read: u64) {
        if let Err(e) = self
            .router()
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
        objects: Vec<plover_proto::ObjectId>,
    ) -> Pending {
        let max = self.shared.limits.max_body as usize;
        let failed =
            |code, message: String| Pending::Frame(ServerFrame::SendFailed { id, code, message });
        if body.is_empty() {
            return failed(ErrorCode::INVALID_REQUEST, "empty message body".into());
        }
        if objects.len() > crate::media::MAX_OBJECTS_PER_MESSAGE {
            return failed(
                ErrorCode::INVALID_REQUEST,
                format!(
                    "a message may reference at most {} objects",
                    crate::media::MAX_OBJECTS_PER_MESSAGE
                ),
            );
        }
        // Only objects the sender uploaded: anyone else's, like one that does not exist, is
        // `not_found` (an id says nothing to a stranger).
        for object in &objects {
            match self.router().store().object(object) {
                Ok(Some(record)) if record.uploaders.contains(&self.user) => {}
                Ok(_) => {
                    return failed(
                        ErrorCode::NOT_FOUND,
                        format!("no object {object} uploaded by {}", self.user),
                    );
                }
                Err(e) => return failed(ErrorCode::UNAVAILABLE, e.to_string()),
            }
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
            .router()
            .send_referencing(
                conversation,
                &self.user,
                &self.device,
                id,
                body,
                objects,
                self.feed.load(Ordering::Relaxed),
            )
            .await
        {
            Ok(rx) => Pending::Ack { id, rx },
            Err(e) => failed(e.code(), e.to_string()),
        }
    }
}

/// An `Error` frame naming the request it answers.
fn request_error(request: u32, e: &RouterError) -> ServerFrame {
    ServerFrame::Error {
        code: e.code(),
        message: e.to_string(),
        request: Some(request),
    }
}

/// The answer to a request: its frame, or an `Error` naming the request.
fn answer(request: u32, result: Result<ServerFrame, RouterError>) -> ServerFrame {
    result.unwrap_or_else(|e| request_error(request, &e))
}

/// A `Conversations` answer cut so that it fits in one frame; the client pages on from the
/// last id it got.
fn fit_page(request: u32, items: Vec<ConversationInfo>, more: bool, max_frame: u32) -> ServerFrame {
    // Room for the frame's own fields around the items.
    let mut budget = (max_frame as usize).saturating_sub(64);
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
    mut messages: Vec<Message>,
    more: bool,
    forward: bool,
    max_frame: u32,
) -> (Vec<Message>, bool) {
    let size = |m: &Message| postcard::to_stdvec(m).map_or(usize::MAX, |v| v.len());
    // Room for the frame's own fields and each message's encoding overhead.
    let budget = (max_frame as usize).saturating_sub(Message::FRAME_OVERHEAD);
    // A message too large for a page of its own (stored by an older version) is cut to fit,
    // so that the page can always be sent and the client can page past it.
    if messages.iter().any(|m| size(m) > budget) {
        messages = messages.into_iter().map(|m| m.fit(max_frame)).collect();
    }
    let mut total = 0usize;
    let mut keep = 0usize;
    let order: Box<dyn Iterator<Item = &Message>> = if forward {
        Box::new(messages.iter())
    } else {
        Box::new(messages.iter().rev())
    };
    for m in order {
        let s = size(m);
        if total.saturating_add(s) > budget && keep > 0 {
            break;
        }
        total = total.saturating_add(s);
        keep = keep.saturating_add(1);
    }
    if keep == messages.len() {
        return (messages, more);
    }
    if forward {
        messages.truncate(keep);
    } else {
        messages.drain(..messages.len().saturating_sub(keep));
    }
    (messages, true)
}
