//! Three devices per user that keep disconnecting at random moments, while three senders write
//! to a group and a direct conversation and the server's clock jumps an hour back and a day
//! forward: every device ends with every message of its conversations exactly once, seqs
//! contiguous from 1, in the order history has. (RELIABILITY.md, row 6; its own test binary
//! because the clock hook moves the clock of the whole process.)
mod common;

use common::{TestServer, all_history, users};
use plover_client::{ClientConfig, EventStream, Incoming};
use plover_proto::{ConversationId, Event, Message, Target};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
const ROUNDS: usize = 10;

/// What a device shows for a message: its body, or the membership change.
fn shown(m: &Message) -> (u64, String) {
    let what = match &m.change {
        None => String::from_utf8_lossy(&m.body).into_owned(),
        Some(c) => format!("{c:?}"),
    };
    (m.seq, what)
}

/// A small xorshift generator; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

type Seen = HashMap<ConversationId, Vec<(u64, String)>>;

/// Keeps a message as an app's local store does, by seq: a seq it holds must come again
/// unchanged; a new one must be the next (in order, no gap).
fn keep(held: &mut Vec<(u64, String)>, m: &Message, again: &mut u32) {
    let next = held.len() as u64 + 1;
    if m.seq < next {
        assert_eq!(held[m.seq as usize - 1], shown(m), "a message changed");
        *again += 1;
    } else {
        assert_eq!(
            m.seq,
            next,
            "conversation {}: seq {} after {}",
            m.conversation,
            m.seq,
            next - 1
        );
        held.push(shown(m));
    }
}

/// A device that connects from its cursor, reads for 5-150 ms, disconnects, and again, until
/// it has every message up to the final seq of each of its conversations. The cursor is the
/// contiguous log position, so events taken past it (from another conversation's stream) come
/// again after a reconnect; the device counts those.
async fn device(
    config: ClientConfig,
    mine: Vec<ConversationId>,
    mut rng: Rng,
    mut expected: watch::Receiver<Option<HashMap<ConversationId, u64>>>,
) -> (Seen, u32, u32) {
    let mut seen = Seen::new();
    let mut again = 0;
    let mut cursor = 0;
    let mut sessions = 0;
    loop {
        sessions += 1;
        let mut events = EventStream::start(config.clone(), Some(cursor));
        let stay = Duration::from_millis(5 + rng.below(145));
        let deadline = tokio::time::Instant::now() + stay;
        while let Ok(next) = tokio::time::timeout_at(deadline, events.next()).await {
            match next {
                Some(Ok(Incoming::Log(e))) => {
                    if let Event::Message(m) = &e.event {
                        keep(seen.entry(m.conversation).or_default(), m, &mut again);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("event stream failed: {e}"),
                None => panic!("event stream ended"),
            }
        }
        cursor = events.cursor();
        events.close().await;

        let done = expected.borrow_and_update().as_ref().is_some_and(|want| {
            mine.iter().all(|conv| {
                seen.get(conv).map(Vec::len) == want.get(conv).map(|last| *last as usize)
            })
        });
        if done {
            return (seen, sessions, again);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_come_and_go_see_one_order_while_the_clock_jumps() {
    let seed = u64::from_le_bytes(rand_bytes()) | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let server = TestServer::start().await;
    users(&server, &["alice", "bob", "carol"]).await;
    let alice = server.connect("alice", "sender").await;
    let group = alice
        .create_group("trio", &["bob".into(), "carol".into()])
        .await
        .expect("create");
    let direct = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open direct")
        .id();
    let member_of = |user: &str| -> Vec<ConversationId> {
        match user {
            "carol" => vec![group],
            _ => vec![group, direct],
        }
    };

    let (publish, expected) = watch::channel(None);
    let mut devices = tokio::task::JoinSet::new();
    for user in ["alice", "bob", "carol"] {
        for name in ["phone", "tablet", "laptop"] {
            let config = server.config(user, name);
            let rng = Rng(rng.below(u64::MAX) | 1);
            let expected = expected.clone();
            let mine = member_of(user);
            devices.spawn(async move {
                let (seen, sessions, again) = device(config, mine, rng, expected).await;
                (user, name, seen, sessions, again)
            });
        }
    }

    // Ten rounds of concurrent sends, 100 ms apart, while the devices come and go; the clock
    // goes an hour back after round 3 and a day forward after round 6 (and is put right at
    // the end).
    let mut senders = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let conn = Arc::new(server.connect(user, "sender").await);
        let mut convs = Vec::new();
        for id in member_of(user) {
            let conv = conn
                .open(Target::Conversation(id), false)
                .await
                .expect("open");
            convs.push(Arc::new(conv));
        }
        senders.push((user, conn, convs));
    }
    for round in 0..ROUNDS {
        let mut sends = tokio::task::JoinSet::new();
        for (user, _, convs) in &senders {
            for conv in convs {
                for i in 0..8 {
                    let conv = conv.clone();
                    let body = format!("{user}-{round}-{i}");
                    sends.spawn(async move { conv.send(body).await.expect("send") });
                }
            }
        }
        while let Some(sent) = sends.join_next().await {
            sent.expect("send task");
        }
        match round {
            3 => plover_server::clock::skew(-HOUR_MS),
            6 => plover_server::clock::skew(DAY_MS + HOUR_MS),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    plover_server::clock::skew(-DAY_MS);

    // History is the reference: gapless, and its timestamps show the clock did jump back.
    let mut reference = HashMap::new();
    for conv in &senders[0].2 {
        let history = all_history(conv).await;
        let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=history.len() as u64).collect::<Vec<_>>());
        assert!(
            history.windows(2).any(|w| w[1].ts + 3_000_000 < w[0].ts),
            "the clock hook moved timestamps back by an hour"
        );
        reference.insert(conv.id(), history.iter().map(shown).collect::<Vec<_>>());
    }
    assert_eq!(reference[&group].len(), 1 + 3 * ROUNDS * 8);
    assert_eq!(reference[&direct].len(), 2 * ROUNDS * 8);
    let last: HashMap<ConversationId, u64> = reference
        .iter()
        .map(|(c, v)| (*c, v.len() as u64))
        .collect();
    publish.send_replace(Some(last));

    let mut reconnects = 0;
    let mut redelivered = 0;
    while let Some(done) = tokio::time::timeout(Duration::from_secs(120), devices.join_next())
        .await
        .expect("every device catches up within 120 s")
    {
        let (user, name, seen, sessions, again) = done.expect("device task");
        reconnects += sessions;
        redelivered += again;
        for conv in member_of(user) {
            assert_eq!(
                seen.get(&conv),
                Some(&reference[&conv]),
                "{user}/{name}: conversation {conv} differs from its history"
            );
        }
        assert_eq!(
            seen.len(),
            member_of(user).len(),
            "{user}/{name}: no strangers"
        );
    }
    eprintln!("9 devices, {reconnects} connections, {redelivered} messages delivered again");
    assert!(reconnects > 9 * 5, "devices did disconnect and come back");
    for (_, conn, _) in senders {
        if let Ok(conn) = Arc::try_unwrap(conn) {
            conn.close().await;
        }
    }
    alice.close().await;
    server.stop().await;
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0; 8];
    getrandom::fill(&mut b).expect("random bytes");
    b
}
