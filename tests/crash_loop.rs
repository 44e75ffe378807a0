//! Crash durability: senders under load, the server killed with SIGKILL at a random moment and
//! restarted, many times. Every acknowledged message must be in history exactly once, at the
//! seq it was acknowledged with; sequences have no gap and no reuse. In `durability = "sync"`
//! (the default) and in `"buffered"`, whose acks wait for the page cache only: a SIGKILL of
//! plover leaves the page cache to the kernel, so buffered mode loses nothing here either (a
//! power cut is another matter; RELIABILITY.md, row 2).
//!
//! Long runs: `cargo test --release --test crash_loop -- --ignored` (PLOVER_CRASH_CYCLES,
//! default 100); the buffered fast version runs in the default suite.
mod common;

use bytes::Bytes;
use common::{spawn_server_with, spawned_client};
use plover::auth::{TokenKeys, load_or_create_secret};
use plover::client::Connection;
use plover::framing::{ClientMsgId, Target};
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

/// `cycles` SIGKILLs of a server run with the extra configuration `extra`.
async fn crash_loop(cycles: u32, extra: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let acked: Arc<Mutex<HashMap<ClientMsgId, u64>>> = Arc::default();
    for cycle in 0..cycles {
        let (mut child, addr) = spawn_server_with(dir.path(), extra).await;
        let keys =
            TokenKeys::new(&load_or_create_secret(&dir.path().join("data")).expect("secret"));
        if cycle == 0 {
            Connection::connect(&spawned_client(dir.path(), &addr, &keys, "bob", "setup"))
                .await
                .expect("bob")
                .close()
                .await;
        }
        let mut senders = tokio::task::JoinSet::new();
        for s in 0..3 {
            let cfg = spawned_client(dir.path(), &addr, &keys, "alice", &format!("d{s}"));
            let acked = acked.clone();
            senders.spawn(async move {
                let Ok(conn) = Connection::connect(&cfg).await else {
                    return;
                };
                let Ok(conv) = conn.open(Target::Direct("bob".into()), true).await else {
                    return;
                };
                let conv = Arc::new(conv);
                let mut inflight = tokio::task::JoinSet::new();
                loop {
                    let id = ClientMsgId::random();
                    let (conv, acked) = (conv.clone(), acked.clone());
                    inflight.spawn(async move {
                        if let Ok(ack) = conv.send_with_id(id, Bytes::from_static(b"x")).await {
                            acked.lock().expect("lock").insert(id, ack.seq);
                            true
                        } else {
                            false
                        }
                    });
                    if inflight.len() >= 16 && matches!(inflight.join_next().await, Some(Ok(false)))
                    {
                        return;
                    }
                }
            });
        }
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
    let conv = alice
        .open(Target::Direct("bob".into()), false)
        .await
        .expect("open");
    let history = common::all_history(&conv).await;
    let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "no gap, no reuse"
    );
    let by_id: HashMap<ClientMsgId, u64> = history.iter().map(|m| (m.id, m.seq)).collect();
    assert_eq!(by_id.len(), history.len(), "nothing stored twice");
    let acked = acked.lock().expect("lock").clone();
    for (id, seq) in &acked {
        assert_eq!(
            by_id.get(id),
            Some(seq),
            "acknowledged {id:?} kept at {seq}"
        );
    }
    eprintln!(
        "crash loop ({}): {cycles} SIGKILLs, {} acknowledged, {} stored (the rest were in flight), 0 lost",
        if extra.is_empty() { "sync" } else { "buffered" },
        acked.len(),
        history.len()
    );
    drop(conv);
    alice.close().await;
}
