//! Router tests that need the store's failpoints (test builds only).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Router, RouterError};
use crate::config::{Config, Durability};
use crate::persist::Store;
use plover_proto::{ClientMsgId, ConversationId, Target};

/// What one sender got: (conversation, id, seq) for every `Sent`.
type Acks = Vec<(ConversationId, ClientMsgId, u64)>;

/// Sends `count` messages from `from` in `conv`, each retried with the same id (as the SDK
/// does) up to four times after a refusal.
async fn send_with_retries(router: Router, conv: ConversationId, from: String, count: u32) -> Acks {
    let mut acks = Vec::new();
    for i in 0..count {
        let id = ClientMsgId::random();
        for _attempt in 0..5 {
            let body = bytes::Bytes::from(format!("{from} {i}"));
            let answer = match router.send(conv, &from, "phone", id, body, 0).await {
                Ok(rx) => rx.await.unwrap_or(Err(RouterError::ShuttingDown)),
                Err(e) => Err(e),
            };
            match answer {
                Ok(sent) => {
                    acks.push((conv, id, sent.seq));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    acks
}

/// A read that fails while the commit thread builds a batch (a log head it must fetch) must
/// leave nothing acknowledged that is not in the store: before the fix, the shards kept the
/// seqs, marks and retry ids of the dropped batch, and the retry of a refused message was
/// answered `Sent` by the next batch at a seq that was never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_error_mid_batch_leaves_no_ack_without_its_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path(), Durability::Buffered).expect("open"));
    let mut config = Config {
        // The router keeps its VAPID key in the data directory: never the working directory.
        data: dir.path().join("data"),
        ..Config::default()
    };
    // Few log heads held, so the commit thread reads heads from the store as it goes.
    config.store.cached_logs = 2;
    config.limits.sends_per_second = 1_000_000;
    config.limits.writes_per_second = 1_000_000;
    let router = Router::start(store.clone(), &config).expect("router");
    let users: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    for u in &users {
        store.ensure_user(&*store, u, 1).expect("user");
    }
    let mut convs = Vec::new();
    for pair in users.chunks(2) {
        let opened = router
            .open(&pair[0], Target::Direct(pair[1].clone()), true)
            .await
            .expect("open");
        convs.push((opened.conversation, pair.to_vec()));
    }
    store.failpoints.arm("log_head", 30, 1);
    let mut tasks = tokio::task::JoinSet::new();
    for (conv, pair) in &convs {
        for user in pair {
            tasks.spawn(send_with_retries(router.clone(), *conv, user.clone(), 40));
        }
    }
    let mut acks = Acks::new();
    while let Some(done) = tasks.join_next().await {
        acks.extend(done.expect("sender"));
    }
    assert_eq!(
        store.failpoints.fired("log_head"),
        1,
        "the read error was injected"
    );
    assert!(
        !acks.is_empty(),
        "some messages were acknowledged before it"
    );

    // Every acknowledged message is in the store at its seq, with its id.
    let mut seen: HashMap<(ConversationId, u64), ClientMsgId> = HashMap::new();
    for (conv, id, seq) in &acks {
        let stored = store.message(*conv, *seq).expect("read");
        assert_eq!(
            stored.map(|m| m.id),
            Some(*id),
            "Sent for {conv}/{seq} without that message in the store"
        );
        if let Some(other) = seen.insert((*conv, *seq), *id) {
            assert_eq!(other, *id, "seq {conv}/{seq} acknowledged for two messages");
        }
    }
    // Each conversation's seqs are gapless.
    for (conv, _) in &convs {
        let last = store.last_seq(*conv).expect("last");
        for seq in 1..=last {
            assert!(
                store.message(*conv, seq).expect("read").is_some(),
                "conversation {conv} has a hole at {seq} (last {last})"
            );
        }
    }
    let r = router.clone();
    tokio::task::spawn_blocking(move || r.shutdown_blocking())
        .await
        .expect("join")
        .ok();
}

/// A router over a fresh store whose next group commit fails.
async fn failing_group_commit() -> (tempfile::TempDir, Arc<Store>, Router) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path(), Durability::Buffered).expect("open"));
    let config = Config {
        data: dir.path().join("data"),
        ..Config::default()
    };
    let router = Router::start(store.clone(), &config).expect("router");
    store.ensure_user(&*store, "bob", 1).expect("bob");
    store.failpoints.arm("group_commit", 0, 1);
    (dir, store, router)
}

/// Writes off the hot path ride the commit thread's batch and share its fsync: when that
/// batch fails, they fail with it (before, each committed and fsynced a batch of its own,
/// under the journal lock the group commit waits for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_writes_share_the_group_commit() {
    let (_dir, store, router) = failing_group_commit().await;
    assert!(router.ensure_user("newcomer").await.is_err());
    assert!(!store.user_exists("newcomer").expect("read"), "not written");
    assert_eq!(store.failpoints.fired("group_commit"), 1);

    let (_dir, store, router) = failing_group_commit().await;
    store.ensure_user(&*store, "alice", 1).expect("alice");
    assert!(
        router
            .open("alice", Target::Direct("bob".into()), true)
            .await
            .is_err()
    );
    assert_eq!(store.direct_between("alice", "bob").expect("read"), None);
    assert_eq!(store.failpoints.fired("group_commit"), 1);
}
