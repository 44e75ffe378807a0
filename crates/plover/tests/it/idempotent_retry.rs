//! A retry with the same client id returns the original (conversation, seq) and stores nothing.
use crate::common;

use crate::common::TestServer;
use bytes::Bytes;
use plover_proto::{ClientMsgId, Target};

#[tokio::test]
async fn retries_with_one_id_store_one_message() {
    let (server, alice, conv) = common::alice_writes_to_bob().await;
    conv.send("before").await.expect("send");

    let id = ClientMsgId::random();
    let body = Bytes::from_static(b"only once");
    // Concurrent duplicates while the original is in flight, then sequential ones after it
    // is durable, then one on a fresh connection (as after a lost ack).
    let (a, b, c) = tokio::join!(
        conv.send_with_id(id, body.clone()),
        conv.send_with_id(id, body.clone()),
        conv.send_with_id(id, body.clone()),
    );
    let first = a.expect("send");
    assert_eq!(b.expect("dup"), first);
    assert_eq!(c.expect("dup"), first);
    for _ in 0..20 {
        assert_eq!(
            conv.send_with_id(id, body.clone()).await.expect("dup"),
            first
        );
    }
    alice.close().await;
    let alice = server.connect("alice", "laptop").await;
    let conv = alice
        .open(Target::Direct("bob".into()), false)
        .await
        .expect("open");
    assert_eq!(
        conv.send_with_id(id, body.clone()).await.expect("dup"),
        first
    );
    assert_eq!(first.seq, 2);

    let after = conv.send("after").await.expect("send");
    assert_eq!(
        after.seq, 3,
        "no sequence number was used up by the retries"
    );
    let (history, more) = conv.history(None, None, 100).await.expect("history");
    assert!(!more);
    let bodies: Vec<_> = history.iter().map(|m| m.body.clone()).collect();
    assert_eq!(
        bodies,
        vec![
            Bytes::from_static(b"before"),
            body,
            Bytes::from_static(b"after")
        ]
    );
    alice.close().await;
    server.stop().await;
}

async fn retries(n: usize) {
    let server = TestServer::start_with(|c| {
        c.limits.sends_per_second = 1_000_000;
        c.limits.frames_per_second = 1_000_000;
    })
    .await;
    server.register("bob").await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    let id = ClientMsgId::random();
    let body = Bytes::from_static(b"once");
    let first = conv.send_with_id(id, body.clone()).await.expect("send");
    for _ in 0..n {
        assert_eq!(
            conv.send_with_id(id, body.clone()).await.expect("retry"),
            first
        );
    }
    let (history, _) = conv.history(None, None, 10).await.expect("history");
    assert_eq!(history.len(), 1);
    drop(conv);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_thousand_retries_store_one_message() {
    retries(1_000).await;
}

#[tokio::test]
#[ignore = "long: run explicitly (see RELIABILITY.md)"]
async fn ten_thousand_retries_store_one_message() {
    retries(10_000).await;
}
