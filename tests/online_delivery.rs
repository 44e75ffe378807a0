//! A message reaches the recipient's online devices and the sender's other devices, once each.
mod common;

use common::{TestServer, assert_quiet, next_event, text};
use plover::client::EventStream;
use plover::framing::{Event, Target};
use std::time::Duration;

#[tokio::test]
async fn online_recipient_gets_the_message_once() {
    let server = TestServer::start().await;
    server.register("alice").await;
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(0));

    assert!(bob.synced().await);
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    let ack = conv.send("hi bob").await.expect("send");
    assert_eq!(ack.seq, 1);

    let event = next_event(&mut bob).await;
    assert_eq!(text(&event), "hi bob");
    let Event::Message(m) = &event.event else {
        panic!("not a message")
    };
    assert_eq!(
        (m.conversation, m.seq, m.from.as_str()),
        (ack.conversation, 1, "alice")
    );
    assert_eq!(m.device, "phone");
    assert_quiet(&mut bob, Duration::from_millis(300)).await;

    bob.close().await;
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn both_devices_of_the_recipient_and_the_senders_other_device_receive() {
    let server = TestServer::start().await;
    server.register("alice").await;
    server.register("bob").await;
    let mut bob_phone = EventStream::start(server.config("bob", "phone"), Some(0));
    let mut bob_laptop = EventStream::start(server.config("bob", "laptop"), Some(0));
    let mut alice_laptop = EventStream::start(server.config("alice", "laptop"), Some(0));
    for s in [&mut bob_phone, &mut bob_laptop, &mut alice_laptop] {
        assert!(s.synced().await);
    }

    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    for i in 1..=3 {
        conv.send(format!("m{i}")).await.expect("send");
    }
    for stream in [&mut bob_phone, &mut bob_laptop, &mut alice_laptop] {
        for i in 1..=3 {
            let e = next_event(stream).await;
            assert_eq!(text(&e), format!("m{i}"));
        }
        assert_quiet(stream, Duration::from_millis(200)).await;
    }
    for s in [bob_phone, bob_laptop, alice_laptop] {
        s.close().await;
    }
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_direct_conversation_is_the_same_whichever_side_starts_it() {
    let server = TestServer::start().await;
    server.register("alice").await;
    server.register("bob").await;
    let alice = server.connect("alice", "d").await;
    let bob = server.connect("bob", "d").await;
    let a = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    let b = bob
        .open(Target::Direct("alice".into()), true)
        .await
        .expect("open");
    assert_eq!(a.id(), b.id());
    assert_eq!(a.members(), ["alice".to_string(), "bob".to_string()]);
    // Interleaved senders share one sequence.
    let s1 = a.send("from alice").await.expect("send");
    let s2 = b.send("from bob").await.expect("send");
    assert_eq!((s1.seq, s2.seq), (1, 2));
    let listed = alice.conversations().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].last_seq, 2);
    alice.close().await;
    bob.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_device_sends_on_the_connection_its_events_arrive_on() {
    let server = TestServer::start().await;
    server.register("alice").await;
    server.register("bob").await;
    let mut alice = EventStream::start(server.config("alice", "phone"), Some(0));
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(0));
    assert!(alice.synced().await && bob.synced().await);

    let conn = alice.connection().expect("synced, so connected");
    let conv = conn
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    for i in 1..=3 {
        let ack = conv.send(format!("m{i}")).await.expect("send");
        assert_eq!(ack.seq, i);
    }
    // Bob gets them; Alice's device gets its own copies on the same connection, in order.
    for stream in [&mut bob, &mut alice] {
        for i in 1..=3 {
            let e = next_event(stream).await;
            assert_eq!(text(&e), format!("m{i}"));
        }
    }
    drop(conv);
    drop(conn);
    assert_quiet(&mut alice, Duration::from_millis(200)).await;
    alice.close().await;
    bob.close().await;
    server.stop().await;
}
