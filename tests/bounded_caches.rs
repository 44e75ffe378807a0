//! The sequencers hold a bounded number of conversation states, and the commit thread a
//! bounded number of log heads; the rest are read from the store again when next used. With
//! caches far smaller than the working set, every message still gets the next seq of its
//! conversation and the next position of each member's log: nothing is numbered twice, even
//! while the state dropped had writes on their way to the store.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use plover::framing::{ClientMsgId, Target};
use plover::persist::{LogEntry, Store};
use plover::router::Router;

const USERS: usize = 12;
const ROUNDS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_caches_number_every_message_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::test_config(dir.path());
    config.store.cached_conversations = 4; // two per shard
    config.store.cached_logs = 2;
    config.limits.sends_per_second = 1_000_000;
    let store = Arc::new(Store::open(&config.data, config.store.durability).expect("open"));
    let router = Router::start(store.clone(), &config).expect("router");
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    for user in &users {
        router.ensure_user(user).await.expect("user");
    }
    // A ring of direct conversations: three times the conversations the shards may hold.
    let mut convs = Vec::new();
    for i in 0..USERS {
        let (a, b) = (&users[i], &users[(i + 1) % USERS]);
        let opened = router
            .open(a, Target::Direct(b.clone()), true)
            .await
            .expect("open");
        convs.push((opened.conversation, a.clone(), b.clone()));
    }

    // Every round queues a message in every conversation, and marks, before waiting for any
    // answer: the shards keep dropping states whose writes are still queued.
    let mut answers = Vec::new();
    for round in 0..ROUNDS {
        for (conv, a, b) in &convs {
            let from = if round % 2 == 0 { a } else { b };
            let body = Bytes::from(format!("{conv}/{round}"));
            let ack = router
                .send(*conv, from, "d", ClientMsgId::random(), body, 0)
                .await
                .expect("queued");
            answers.push((*conv, ack));
            if round > 0 {
                let other = if round % 2 == 0 { b } else { a };
                router
                    .marks(*conv, other, round as u64, round as u64 / 2)
                    .await
                    .expect("marks queued");
            }
        }
    }
    let mut seqs: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (conv, ack) in answers {
        let sent = ack.await.expect("answer").expect("stored");
        seqs.entry(conv).or_default().push(sent.seq);
    }
    for (conv, got) in &seqs {
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (1..=ROUNDS as u64).collect::<Vec<_>>(),
            "conversation {conv}"
        );
        let stored = store.messages_from(*conv, 1, 1000).expect("history");
        assert_eq!(stored.len(), ROUNDS, "conversation {conv}");
    }
    tokio::task::block_in_place(|| router.shutdown_blocking()).expect("shutdown");

    // Each user's log: positions 1, 2, 3, ... and each message of their two conversations
    // exactly once.
    for user in &users {
        let log = store.read_log(user, 0, 100_000).expect("log");
        let positions: Vec<u64> = log.iter().map(|(pos, _)| *pos).collect();
        assert_eq!(
            positions,
            (1..=log.len() as u64).collect::<Vec<_>>(),
            "{user}'s log"
        );
        let messages: Vec<(u64, u64)> = log
            .iter()
            .filter_map(|(_, e)| match e {
                LogEntry::Message { conversation, seq } => Some((*conversation, *seq)),
                _ => None,
            })
            .collect();
        let unique: BTreeSet<_> = messages.iter().collect();
        assert_eq!(
            unique.len(),
            messages.len(),
            "{user}'s log repeats a message"
        );
        assert_eq!(messages.len(), 2 * ROUNDS, "{user}'s log");
    }
}
