//! A server killed with SIGKILL and restarted on the same data keeps every acknowledged
//! message, once, and continues each sequence without a gap or a reuse.
use crate::common;

use crate::common::{next_event, spawn_server, spawned_client};
use bytes::Bytes;
use plover_client::{Connection, EventStream};
use plover_proto::{ClientMsgId, Event, Target};
use plover_server::auth::{TokenKeys, load_or_create_secret};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = spawn_server(dir.path()).await;
    let keys = TokenKeys::new(&load_or_create_secret(&dir.path().join("data")).expect("secret"));

    Connection::connect(&spawned_client(dir.path(), &addr, &keys, "bob", "setup"))
        .await
        .expect("bob")
        .close()
        .await;

    // Four senders pipeline messages until the server dies under them.
    let acked: Arc<Mutex<HashMap<ClientMsgId, u64>>> = Arc::default();
    let tried: Arc<Mutex<Vec<ClientMsgId>>> = Arc::default();
    let mut senders = tokio::task::JoinSet::new();
    for s in 0..4 {
        let conn = Connection::connect(&spawned_client(
            dir.path(),
            &addr,
            &keys,
            "alice",
            &format!("d{s}"),
        ))
        .await
        .expect("alice");
        let conv = Arc::new(
            conn.open(Target::Direct("bob".into()), true)
                .await
                .expect("open"),
        );
        let (acked, tried) = (acked.clone(), tried.clone());
        senders.spawn(async move {
            let _conn = conn;
            let mut inflight = tokio::task::JoinSet::new();
            for i in 0..100_000u32 {
                let id = ClientMsgId::random();
                tried.lock().expect("lock").push(id);
                let conv = conv.clone();
                let acked = acked.clone();
                inflight.spawn(async move {
                    let body = Bytes::from(format!("s{s}-{i}"));
                    if let Ok(ack) = conv.send_with_id(id, body).await {
                        acked.lock().expect("lock").insert(id, ack.seq);
                        true
                    } else {
                        false
                    }
                });
                if inflight.len() >= 8
                    && let Some(Ok(false)) = inflight.join_next().await
                {
                    return;
                }
            }
        });
    }
    // Kill once a few hundred messages are acknowledged.
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if acked.lock().expect("lock").len() >= 300 {
            break;
        }
    }
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("reaped");
    // The clients would only notice the dead server at their idle timeout: stop them now.
    senders.shutdown().await;
    let acked = acked.lock().expect("lock").clone();
    let tried = tried.lock().expect("lock").clone();
    assert!(acked.len() >= 300);

    // Restart on the same data.
    let (_child, addr) = spawn_server(dir.path()).await;
    let alice = Connection::connect(&spawned_client(dir.path(), &addr, &keys, "alice", "check"))
        .await
        .expect("alice after restart");
    let conv = alice
        .open(Target::Direct("bob".into()), false)
        .await
        .expect("conversation survived");

    // Every message in history, in order, with contiguous sequence numbers.
    let history = common::all_history(&conv).await;
    let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "no gap"
    );
    let by_id: HashMap<ClientMsgId, u64> = history.iter().map(|m| (m.id, m.seq)).collect();
    assert_eq!(by_id.len(), history.len(), "no message stored twice");
    for (id, seq) in &acked {
        assert_eq!(
            by_id.get(id),
            Some(seq),
            "acknowledged message {id:?} kept at its seq"
        );
    }

    // Retrying every message that was in flight returns its stored seq or stores it anew,
    // once; the sequence continues after the last stored number.
    let last = history.len() as u64;
    let mut next = last;
    for id in tried.iter().filter(|id| !acked.contains_key(id)) {
        let ack = conv
            .send_with_id(*id, Bytes::from_static(b"retry"))
            .await
            .expect("retry");
        match by_id.get(id) {
            Some(seq) => assert_eq!(ack.seq, *seq),
            None => {
                next += 1;
                assert_eq!(ack.seq, next, "no reuse, no gap");
            }
        }
    }
    let fresh = conv.send("after restart").await.expect("send");
    assert_eq!(fresh.seq, next + 1);

    // Bob, offline through all of it, gets everything in order.
    let mut bob = EventStream::start(
        spawned_client(dir.path(), &addr, &keys, "bob", "phone"),
        None,
    );
    for expected in 1..=fresh.seq {
        let e = next_event(&mut bob).await;
        let Event::Message(m) = &e.event else {
            panic!("not a message")
        };
        assert_eq!(m.seq, expected);
        assert_eq!(e.pos, expected);
    }
    bob.close().await;
    alice.close().await;
}
