//! Crash durability: senders under load, the server killed with SIGKILL at a random moment and
//! restarted, many times. Every acknowledged message must be in history exactly once, at the
//! seq it was acknowledged with; sequences have no gap and no reuse; a group's messages are
//! in every member's sync log. In `durability = "sync"`
//! (the default) and in `"buffered"`, whose acks wait for the page cache only: a SIGKILL of
//! plover leaves the page cache to the kernel, so buffered mode loses nothing here either (a
//! power cut is another matter; RELIABILITY.md, row 2).
//!
//! Long runs: `cargo test --release --test it crash_loop:: -- --ignored` (PLOVER_CRASH_CYCLES,
//! default 100); the buffered fast version runs in the default suite.
use crate::common;

use crate::common::{spawn_server_with, spawned_client};
use bytes::Bytes;
use plover_client::{ClientConfig, Connection, EventStream, Incoming, LogEvent};
use plover_proto::{ClientMsgId, ConversationId, Event, Target};
use plover_server::auth::{TokenKeys, load_or_create_secret};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn cycles() -> u32 {
    std::env::var("PLOVER_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

#[tokio::test]
#[ignore = "long: run explicitly (see RELIABILITY.md)"]
async fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    crash_loop(cycles(), "").await;
}

#[tokio::test]
#[ignore = "long: run explicitly (see RELIABILITY.md)"]
async fn sigkill_at_random_moments_in_buffered_mode_loses_nothing_acknowledged() {
    crash_loop(cycles(), BUFFERED).await;
}

#[tokio::test]
async fn buffered_mode_survives_a_few_sigkills() {
    crash_loop(4, BUFFERED).await;
}

const BUFFERED: &str = "[store]\ndurability = \"buffered\"\n";

/// Acknowledged sends: (conversation, id) -> seq.
type Acked = Arc<Mutex<HashMap<(ConversationId, ClientMsgId), u64>>>;

/// One sender: pipelines sends (16 in flight) to `target` until the server dies under it.
async fn sender(cfg: ClientConfig, target: Target, acked: Acked) {
    let Ok(conn) = Connection::connect(&cfg).await else {
        return;
    };
    let Ok(conv) = conn.open(target, true).await else {
        return;
    };
    let conv = Arc::new(conv);
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        let id = ClientMsgId::random();
        let (conv, acked) = (conv.clone(), acked.clone());
        inflight.spawn(async move {
            match conv.send_with_id(id, Bytes::from_static(b"x")).await {
                Ok(ack) => {
                    acked.lock().expect("lock").insert((conv.id(), id), ack.seq);
                    true
                }
                Err(_) => false,
            }
        });
        if inflight.len() >= 16 && matches!(inflight.join_next().await, Some(Ok(false))) {
            return;
        }
    }
}

/// `cycles` SIGKILLs of a server run with the extra configuration `extra`, under three senders
/// to a direct conversation and one to a group of three.
async fn crash_loop(cycles: u32, extra: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let acked: Acked = Arc::default();
    let mut group = 0;
    for cycle in 0..cycles {
        let (mut child, addr) = spawn_server_with(dir.path(), extra).await;
        let keys =
            TokenKeys::new(&load_or_create_secret(&dir.path().join("data")).expect("secret"));
        let client =
            |user: &str, device: &str| spawned_client(dir.path(), &addr, &keys, user, device);
        if cycle == 0 {
            for user in ["bob", "carol"] {
                Connection::connect(&client(user, "setup"))
                    .await
                    .expect("setup")
                    .close()
                    .await;
            }
            let alice = Connection::connect(&client("alice", "setup"))
                .await
                .expect("alice");
            group = alice
                .create_group("crash", &["bob".into(), "carol".into()])
                .await
                .expect("group");
            alice.close().await;
        }
        let mut senders = tokio::task::JoinSet::new();
        for s in 0..3 {
            let cfg = client("alice", &format!("d{s}"));
            senders.spawn(sender(cfg, Target::Direct("bob".into()), acked.clone()));
        }
        let cfg = client("bob", "g");
        senders.spawn(sender(cfg, Target::Conversation(group), acked.clone()));
        // The load is on before the kill: a cycle whose senders all failed would prove
        // nothing, and would pass.
        let before = acked.lock().expect("lock").len();
        tokio::time::timeout(Duration::from_secs(20), async {
            while acked.lock().expect("lock").len() == before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("cycle {cycle}: no send acknowledged within 20 s"));
        // A random moment between 50 and 550 ms into the load.
        let wait = 50 + u64::from(ClientMsgId::random().0[0]) * 2;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("reaped");
        senders.abort_all();
        while senders.join_next().await.is_some() {}
    }

    let (_child, addr) = spawn_server_with(dir.path(), extra).await;
    let keys = TokenKeys::new(&load_or_create_secret(&dir.path().join("data")).expect("secret"));
    let alice = Connection::connect(&spawned_client(dir.path(), &addr, &keys, "alice", "check"))
        .await
        .expect("alice");
    let acked = acked.lock().expect("lock").clone();
    let mut stored = 0;
    let mut in_group = 0;
    for target in [Target::Direct("bob".into()), Target::Conversation(group)] {
        let conv = alice.open(target, false).await.expect("open");
        let history = common::all_history(&conv).await;
        let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=history.len() as u64).collect::<Vec<_>>(),
            "no gap, no reuse"
        );
        let by_id: HashMap<ClientMsgId, u64> = history.iter().map(|m| (m.id, m.seq)).collect();
        assert_eq!(by_id.len(), history.len(), "nothing stored twice");
        for ((c, id), seq) in &acked {
            if *c == conv.id() {
                assert_eq!(
                    by_id.get(id),
                    Some(seq),
                    "acknowledged {id:?} kept at {seq}"
                );
            }
        }
        stored += history.len();
        if conv.id() == group {
            in_group = history.len();
        }
    }
    // The group's fan-out was committed with each message: carol's sync log has every one of
    // them, once, in order.
    let mut carol = EventStream::start(
        spawned_client(dir.path(), &addr, &keys, "carol", "check"),
        Some(0),
    );
    let mut next = 1;
    while next <= in_group as u64 {
        let e = tokio::time::timeout(Duration::from_secs(30), carol.next())
            .await
            .expect("carol's log keeps coming")
            .expect("open")
            .expect("no error");
        if let Incoming::Log(LogEvent {
            event: Event::Message(m),
            ..
        }) = e
        {
            assert_eq!(
                (m.conversation, m.seq),
                (group, next),
                "carol's log in order"
            );
            next += 1;
        }
    }
    carol.close().await;
    eprintln!(
        "crash loop ({}): {cycles} SIGKILLs, {} acknowledged, {stored} stored (the rest were in \
         flight; {in_group} in the group, all in carol's log), 0 lost",
        if extra.is_empty() { "sync" } else { "buffered" },
        acked.len(),
    );
    alice.close().await;
}
