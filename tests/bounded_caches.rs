//! The sequencers hold a bounded number of conversation states, and the commit thread a
//! bounded number of log heads; the rest are read from the store again when next used. With
//! caches far smaller than the working set, every message still gets the next seq of its
//! conversation and the next position of each member's log: nothing is numbered twice, even
//! while the state dropped had writes on their way to the store.
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    config.store.cached_members = 8; // two direct conversations per shard
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

/// Counts the bytes allocated and not yet freed, for the measurement below.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `dealloc` is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What the held conversation states cost in heap: 79,800 direct conversations, each sent
/// one message, with the cache large enough for all of them or for few, in two runs:
/// `PLOVER_CACHED_MEMBERS=1000000 cargo test --release --test bounded_caches -- --ignored --nocapture`
/// and again with `=8` (which still holds the states whose writes may be in flight). Each run
/// prints the live heap and the states held (the shards' gauges); the difference in heap
/// over the difference in members held is the cost of one (BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run explicitly, twice"]
async fn memory_of_held_conversation_states() {
    let cached: usize = std::env::var("PLOVER_CACHED_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("a recorder");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::test_config(dir.path());
    config.store.cached_members = cached;
    config.store.durability = plover::config::Durability::Buffered;
    config.limits.sends_per_second = 1_000_000;
    let store = Arc::new(Store::open(&config.data, config.store.durability).expect("open"));
    let router = Router::start(store, &config).expect("router");
    let users: Vec<String> = (0..400).map(|i| format!("user-{i:03}")).collect();
    for user in &users {
        router.ensure_user(user).await.expect("user");
    }
    let mut conversations = 0u64;
    for (i, a) in users.iter().enumerate() {
        let mut answers = Vec::new();
        for b in &users[i + 1..] {
            let conv = router
                .open(a, Target::Direct(b.clone()), true)
                .await
                .expect("open")
                .conversation;
            let body = Bytes::from_static(b"hello");
            answers.push(
                router
                    .send(conv, a, "d", ClientMsgId::random(), body, 0)
                    .await
                    .expect("queued"),
            );
            conversations += 1;
        }
        for ack in answers {
            ack.await.expect("answer").expect("stored");
        }
    }
    let text = metrics.render();
    let held = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    println!(
        "cached_members = {cached}: {conversations} conversations, {} KB of heap live, \
         {} states held, {} members",
        LIVE.load(Ordering::Relaxed) / 1000,
        held("plover_cached_conversations"),
        held("plover_cached_members"),
    );
    tokio::task::block_in_place(|| router.shutdown_blocking()).expect("shutdown");
}
