//! A device whose outbound queue fills is switched to catch-up from the store: memory stays
//! bounded and it still gets every event once, in order.
use crate::common;

use crate::common::{TestServer, next_event, text};
use bytes::Bytes;
use plover_client::EventStream;
use plover_proto::{ClientMsgId, Event, Target};
use plover_server::persist::Store;
use plover_server::router::Router;
use std::sync::Arc;

#[tokio::test]
async fn a_device_that_does_not_read_falls_back_to_the_store_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::test_config(dir.path());
    config.limits.outbound_queue = 2;
    let store = Arc::new(Store::open(&config.data, config.store.durability).expect("open"));
    let router = Router::start(store, &config).expect("router");
    router.ensure_user("alice").await.expect("user");
    router.ensure_user("bob").await.expect("user");
    let conv = router
        .open("alice", Target::Direct("bob".into()), true)
        .await
        .expect("open")
        .conversation;

    let mut sub = router
        .subscribe("bob", "phone", Some(0))
        .await
        .expect("sub");
    // Bob's feed is not read while 50 messages are committed: his queue of 2 overflows.
    for i in 0..50u32 {
        let ack = router
            .send(
                conv,
                "alice",
                "d",
                ClientMsgId::random(),
                Bytes::from(i.to_string()),
                0,
            )
            .await
            .expect("queued");
        ack.await.expect("answer").expect("stored");
    }
    assert!(router.sessions().switched_to_catch_up() >= 1);

    let mut got = Vec::new();
    while got.len() < 50 {
        for d in sub.feed.next_batch().await.expect("batch") {
            got.push(d.pos);
            let Event::Message(m) = &*d.event else {
                panic!("not a message")
            };
            assert_eq!(m.body, Bytes::from((d.pos - 1).to_string()));
        }
    }
    assert_eq!(got, (1..=50).collect::<Vec<u64>>());

    // And it is live again afterwards.
    let ack = router
        .send(
            conv,
            "alice",
            "d",
            ClientMsgId::random(),
            Bytes::from("live"),
            0,
        )
        .await
        .expect("queued");
    ack.await.expect("answer").expect("stored");
    let batch = sub.feed.next_batch().await.expect("batch");
    assert_eq!(batch.iter().map(|d| d.pos).collect::<Vec<_>>(), vec![51]);

    drop(sub);
    tokio::task::spawn_blocking(move || router.shutdown_blocking())
        .await
        .expect("join")
        .expect("shutdown");
}

#[tokio::test]
async fn over_quic_a_tiny_queue_still_delivers_every_message_once_in_order() {
    let server = TestServer::start_with(|c| c.limits.outbound_queue = 1).await;
    server.register("alice").await;
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(0));
    assert!(bob.synced().await);
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    let conv = Arc::new(conv);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let conv = conv.clone();
        sends.spawn(async move { conv.send(format!("{i}")).await.expect("send").seq });
    }
    while let Some(r) = sends.join_next().await {
        r.expect("join");
    }
    let mut seen = Vec::new();
    for _ in 0..200 {
        let e = next_event(&mut bob).await;
        let Event::Message(m) = &e.event else {
            panic!("not a message")
        };
        seen.push(m.seq);
        assert!(!text(&e).is_empty());
    }
    assert_eq!(seen, (1..=200).collect::<Vec<u64>>());
    common::assert_quiet(&mut bob, std::time::Duration::from_millis(200)).await;
    bob.close().await;
    server.stop().await;
}
