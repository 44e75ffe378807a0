//! A server session without the network, for the fuzz target `session_frames`
//! (`fuzz/fuzz_targets/session_frames.rs`): arbitrary frame sequences go through the same
//! request code as a connection's streams (`transport/requests.rs`) to a real router and store, and
//! the answers are checked against the invariants a client relies on.
//!
//! Compiled only with the `fuzzing` feature (the fuzz crate and the session tests turn it on),
//! never in a release build. Not part of the public API: no stability, no documentation beyond
//! this.

// A test tool: a broken invariant or a failed setup is a panic, which is how the fuzzer and
// the tests hear of it.
#![allow(
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::requests::{Actor, Control, Pending, Shared, Step};
use crate::auth::TokenKeys;
use crate::config::{Config, Durability};
use crate::persist::Store;
use crate::router::{DeviceFeed, PresenceGuard, Router};
use plover_proto::{ClientFrame, ClientMsgId, ConversationId, ErrorCode, ServerFrame, codec};

/// Users the harness authenticates as; nobody else exists in its store.
const USERS: [&str; 3] = ["alice", "bob", "carol"];
/// Conversation streams one input can have open at once.
const STREAMS: usize = 3;
/// Inputs run against one store before it is thrown away, which bounds its size.
const RUNS_PER_STORE: u64 = 2_000;

/// One store, one router, a device of each user, and what they have been told so far.
pub struct Harness {
    runtime: tokio::runtime::Runtime,
    world: Option<World>,
    runs: u64,
}

struct World {
    _dir: tempfile::TempDir,
    router: Router,
    actors: Vec<Actor>,
    /// Every user online, so that the push notifier never sends anything anywhere.
    _online: Vec<PresenceGuard>,
    /// The seq each acknowledged (conversation, sender, id) got.
    acked: HashMap<(ConversationId, usize, ClientMsgId), u64>,
    /// Which id and sender each acknowledged (conversation, seq) belongs to.
    seqs: HashMap<(ConversationId, u64), (usize, ClientMsgId)>,
}

/// A stream of the input: not opened yet, or carrying a conversation.
#[derive(Clone, Copy)]
enum Slot {
    Fresh,
    Open(ConversationId),
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A harness; the store is created on first use.
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Self {
            runtime,
            world: None,
            runs: 0,
        }
    }

    /// Runs one input: its first byte picks the user, then each record is a stream selector
    /// byte (0 the control stream, 1-3 a conversation stream) followed by one length-prefixed
    /// frame as on the wire. Returns every answer, in order; panics when the server breaks an
    /// invariant.
    pub fn run(&mut self, data: &[u8]) -> Vec<ServerFrame> {
        if self.runs.is_multiple_of(RUNS_PER_STORE)
            && let Some(world) = self.world.take()
        {
            world.stop();
        }
        self.runs += 1;
        let world = match &mut self.world {
            Some(w) => w,
            None => self.world.insert(self.runtime.block_on(World::new())),
        };
        self.runtime.block_on(world.run(data))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(world) = self.world.take() {
            world.stop();
        }
    }
}

impl World {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = Config {
            data: dir.path().to_owned(),
            ..Config::default()
        };
        config.store.durability = Durability::Buffered;
        config.store.shards = 2;
        // Tiny caches: inputs that touch a few conversations and users already evict, so the
        // fuzzer also checks that states and log heads read back from the store are right.
        config.store.cached_members = 8;
        config.store.cached_logs = 2;
        config.limits.sends_per_second = 1_000_000;
        config.limits.writes_per_second = 1_000_000;
        config.push.retries = 0;
        let store = Store::open(&config.data, config.store.durability).expect("a store");
        let router = Router::start(Arc::new(store), &config).expect("a router");
        let shared = Arc::new(Shared::new(
            router.clone(),
            TokenKeys::new(b"fuzzing harness, never a real secret"),
            &config,
            "fuzz".into(),
            None,
            None,
            Arc::new(crate::media::Media::open(&config, router.clone()).expect("media")),
        ));
        let mut actors = Vec::new();
        let mut online = Vec::new();
        for user in USERS {
            router.ensure_user(user).await.expect("a user");
            online.push(router.presence().connect(user).0);
            actors.push(Actor {
                user: user.into(),
                device: "fuzz".into(),
                shared: shared.clone(),
                feed: Default::default(),
                acks: Default::default(),
            });
        }
        Self {
            _dir: dir,
            router,
            actors,
            _online: online,
            acked: HashMap::new(),
            seqs: HashMap::new(),
        }
    }

    fn stop(self) {
        self.router.shutdown_blocking().expect("the router stops");
    }

    async fn run(&mut self, data: &[u8]) -> Vec<ServerFrame> {
        let mut answers = Vec::new();
        let Some((&who, rest)) = data.split_first() else {
            return answers;
        };
        let who = usize::from(who) % self.actors.len();
        let actor = &self.actors[who];
        let max = actor.shared.limits.max_frame;
        let mut buf = BytesMut::from(rest);
        let mut slots = [Slot::Fresh; STREAMS];
        let mut pending: Vec<(ConversationId, Pending)> = Vec::new();
        let mut feed: Option<(DeviceFeed, u64)> = None;
        while buf.len() > 1 {
            let selector = usize::from(buf[0]) % (STREAMS + 1);
            let _ = buf.split_to(1);
            // A frame the server cannot decode closes the connection: the input ends there.
            let Ok(frame) = codec::decode::<ClientFrame>(&mut buf, max) else {
                break;
            };
            if selector == 0 {
                match actor.control(frame, feed.is_some()).await {
                    Control::Reply(reply) => {
                        check_reply(&reply);
                        answers.push(reply);
                    }
                    Control::Quiet => {}
                    Control::Subscribed(sub) => {
                        assert!(sub.cursor <= sub.head, "cursor past the head");
                        answers.push(ServerFrame::SyncStarted {
                            cursor: sub.cursor,
                            head: sub.head,
                        });
                        feed = Some((sub.feed, sub.cursor));
                    }
                    Control::Refuse(refusal) => {
                        assert_eq!(refusal.code, ErrorCode::UNEXPECTED_FRAME);
                        answers.push(refusal.frame());
                        break;
                    }
                }
                continue;
            }
            let slot = &mut slots[selector - 1];
            match *slot {
                Slot::Fresh => match actor.open(frame).await {
                    Ok((conversation, opened)) => {
                        check_reply(&opened);
                        answers.push(opened);
                        *slot = Slot::Open(conversation);
                    }
                    Err(error) => {
                        check_reply(&error);
                        answers.push(error);
                    }
                },
                Slot::Open(conversation) => match actor.conversation(conversation, frame).await {
                    Step::Answer(p) => pending.push((conversation, p)),
                    Step::Quiet => {}
                    Step::Stop(error) => {
                        check_reply(&error);
                        answers.push(error);
                        *slot = Slot::Fresh;
                    }
                },
            }
        }
        for (conversation, p) in pending {
            let (answer, _) = p.resolve().await;
            check_reply(&answer);
            if let ServerFrame::Sent { id, seq, .. } = answer {
                self.check_ack(conversation, who, id, seq);
            }
            answers.push(answer);
        }
        if let Some((mut feed, mut last)) = feed {
            // Whatever the feed has ready now: log positions only ever grow.
            while let Ok(Ok(batch)) = tokio::time::timeout(Duration::ZERO, feed.next_batch()).await
            {
                for delivery in batch {
                    assert!(
                        delivery.pos > last,
                        "log position {} after {last}",
                        delivery.pos
                    );
                    last = delivery.pos;
                    answers.push(ServerFrame::Event {
                        log: delivery.pos,
                        event: (*delivery.event).clone(),
                    });
                }
            }
        }
        answers
    }

    /// A retried id gets the seq it got the first time; two ids never share a seq.
    fn check_ack(&mut self, conversation: ConversationId, who: usize, id: ClientMsgId, seq: u64) {
        assert!(seq > 0, "seq 0 acknowledged");
        let first = *self.acked.entry((conversation, who, id)).or_insert(seq);
        assert_eq!(first, seq, "a retried id got a new seq");
        let owner = *self.seqs.entry((conversation, seq)).or_insert((who, id));
        assert_eq!(owner, (who, id), "two messages acknowledged with one seq");
    }
}

/// No answer may report an internal error: with a healthy store every request is either
/// served or refused for a reason the client caused.
fn check_reply(frame: &ServerFrame) {
    match frame {
        ServerFrame::Error { code, message, .. }
        | ServerFrame::SendFailed { code, message, .. } => {
            assert_ne!(*code, ErrorCode::INTERNAL, "internal error: {message}");
        }
        _ => {}
    }
}

/// One record of an input: `frame` on stream `stream` (0 control, 1-3 conversation streams).
pub fn record(stream: u8, frame: &ClientFrame) -> Vec<u8> {
    let mut out = vec![stream];
    out.extend(codec::encode_to_vec(frame, u32::MAX).expect("a frame encodes"));
    out
}

/// Inputs that exercise most kinds of request, to start a corpus from. Run in order on a new
/// store, the direct conversation is 1 and the group 2.
pub fn seeds() -> Vec<Vec<u8>> {
    use plover_proto::{Retention, Target};
    let id = ClientMsgId([7; 16]);
    let send = |body: &'static [u8]| ClientFrame::Send {
        id,
        body: bytes::Bytes::from_static(body),
    };
    let open_bob = ClientFrame::Open {
        target: Target::Direct("bob".into()),
        create: true,
    };
    let direct: Vec<u8> = [
        record(0, &ClientFrame::Sync { cursor: None }),
        record(1, &open_bob),
        record(1, &send(b"hello")),
        record(1, &send(b"hello")),
        record(1, &ClientFrame::Read { up_to: 1 }),
        record(
            1,
            &ClientFrame::History {
                request: 1,
                before: None,
                after: None,
                limit: 10,
            },
        ),
        record(0, &ClientFrame::Ping { nonce: 9 }),
        record(
            0,
            &ClientFrame::ListConversations {
                request: 2,
                after: 0,
                limit: 10,
            },
        ),
    ]
    .concat();
    let group: Vec<u8> = [
        vec![0],
        record(
            0,
            &ClientFrame::CreateGroup {
                request: 1,
                title: "team".into(),
                members: vec!["bob".into()],
                retention: Retention::Keep,
            },
        ),
        record(
            2,
            &ClientFrame::Open {
                target: Target::Conversation(2),
                create: false,
            },
        ),
        record(
            2,
            &ClientFrame::AddMember {
                request: 2,
                user: "carol".into(),
            },
        ),
        record(2, &send(b"hi all")),
        record(
            2,
            &ClientFrame::Members {
                request: 4,
                after: String::new(),
                limit: 10,
            },
        ),
    ]
    .concat();
    // Deleting needs the message committed, so it comes in an input of its own.
    let delete: Vec<u8> = [
        vec![0],
        record(
            3,
            &ClientFrame::Open {
                target: Target::Conversation(2),
                create: false,
            },
        ),
        record(3, &ClientFrame::Delete { request: 1, seq: 3 }),
        record(3, &ClientFrame::Leave { request: 2 }),
    ]
    .concat();
    let mut first = vec![0];
    first.extend(direct);
    vec![first, group, delete]
}
