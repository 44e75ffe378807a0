//! A message reaches the recipient's online devices and the sender's other devices, once each.

use crate::common::{TestServer, assert_quiet, next_event, text};
use bytes::Bytes;
use plover_client::{Connection, Conversation, EventStream};
use plover_proto::{ClientMsgId, Event, Target};
use std::sync::Arc;
use std::time::Duration;

/// Opens alice's conversation with bob on the connection of her event stream.
async fn talk_to_bob(alice: &EventStream) -> (Arc<Connection>, Conversation) {
    let conn = alice.connection().expect("synced, so connected");
    let conv = conn
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    (conn, conv)
}

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

    let (conn, conv) = talk_to_bob(&alice).await;
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

#[tokio::test]
async fn the_sending_connection_gets_its_message_in_the_answer_not_on_its_feed() {
    let server = TestServer::start().await;
    let router = &server.router;
    for user in ["alice", "bob"] {
        router.ensure_user(user).await.expect("user");
    }
    let conv = router
        .open("alice", Target::Direct("bob".into()), true)
        .await
        .expect("open")
        .conversation;
    let mut phone = router
        .subscribe("alice", "phone", Some(0))
        .await
        .expect("sync");
    let mut laptop = router
        .subscribe("alice", "laptop", Some(0))
        .await
        .expect("sync");
    let send = |from: &'static str, origin: u64| async move {
        router
            .send(
                conv,
                from,
                "d",
                ClientMsgId::random(),
                Bytes::from(from),
                origin,
            )
            .await
            .expect("queued")
            .await
            .expect("answer")
            .expect("stored")
    };
    // Both feeds have read the (empty) store and wait for live events.
    for feed in [&mut phone.feed, &mut laptop.feed] {
        let idle = tokio::time::timeout(Duration::from_millis(100), feed.next_batch()).await;
        assert!(idle.is_err(), "nothing to deliver yet");
    }
    // Alice sends on her phone's connection, then Bob answers.
    let sent = send("alice", phone.feed.id()).await;
    assert_eq!(
        (sent.seq, sent.log),
        (1, 1),
        "the answer names alice's log position"
    );
    assert_eq!(send("bob", 0).await.log, 2, "the position in bob's own log");

    // The phone's feed skips position 1: the answer delivered it.
    let got = phone.feed.next_batch().await.expect("batch");
    let got: Vec<(u64, String)> = got.iter().map(|d| (d.pos, from(&d.event))).collect();
    assert_eq!(got, [(2, "bob".to_owned())]);
    // Her laptop gets both.
    let mut both = Vec::new();
    while both.len() < 2 {
        for d in laptop.feed.next_batch().await.expect("batch") {
            both.push((d.pos, from(&d.event)));
        }
    }
    assert_eq!(both, [(1, "alice".to_owned()), (2, "bob".to_owned())]);
    drop((phone, laptop));
    server.stop().await;
}

fn from(event: &Event) -> String {
    match event {
        Event::Message(m) => m.from.clone(),
        other => panic!("not a message: {other:?}"),
    }
}

#[tokio::test]
async fn the_event_made_from_the_answer_is_the_one_the_log_holds() {
    let server = TestServer::start().await;
    server.register("bob").await;
    let mut phone = EventStream::start(server.config("alice", "phone"), Some(0));
    let mut laptop = EventStream::start(server.config("alice", "laptop"), Some(0));
    assert!(phone.synced().await && laptop.synced().await);
    let (conn, conv) = talk_to_bob(&phone).await;
    conv.send("hello").await.expect("send");

    // The phone's copy was made by the SDK from its send and the answer; the laptop's came
    // from the server. They are the same event at the same position.
    let made = next_event(&mut phone).await;
    let served = next_event(&mut laptop).await;
    assert_eq!(made, served);
    let Event::Message(m) = &made.event else {
        panic!("not a message")
    };
    assert_eq!((m.from.as_str(), m.device.as_str()), ("alice", "phone"));

    // A new stream of the phone, reading from the start, gets the stored copy: the same event.
    drop((conv, conn));
    phone.close().await;
    let mut again = EventStream::start(server.config("alice", "phone"), Some(0));
    let replayed = next_event(&mut again).await;
    assert_eq!(replayed, made);
    again.close().await;
    laptop.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_conversation_dropped_with_a_send_unanswered_still_yields_its_event() {
    let server = TestServer::start().await;
    server.register("bob").await;
    let mut alice = EventStream::start(server.config("alice", "phone"), Some(0));
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(0));
    assert!(alice.synced().await && bob.synced().await);
    let (conn, conv) = talk_to_bob(&alice).await;
    // The send is written, then abandoned before its answer, and the conversation dropped.
    tokio::select! {
        biased;
        _ = conv.send("in flight") => panic!("answered within one poll"),
        () = tokio::task::yield_now() => {}
    }
    drop(conv);
    assert_eq!(text(&next_event(&mut bob).await), "in flight");
    let own = next_event(&mut alice).await;
    assert_eq!((own.pos, text(&own)), (1, "in flight".to_owned()));
    // And the cursor moved past it, so nothing is left for the next connection to repeat.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alice.cursor() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "cursor stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(conn);
    alice.close().await;
    bob.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_stream_started_at_the_head_acknowledges_its_cursor_as_it_goes() {
    let server = TestServer::start().await;
    server.register("alice").await;
    // `u64::MAX`: from wherever the log is now.
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(u64::MAX));
    assert!(bob.synced().await);
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    conv.send("hi").await.expect("send");
    assert_eq!(next_event(&mut bob).await.pos, 1);
    // The stream stays open: the acknowledgement comes on its own, within a few intervals.
    let deadline = tokio::time::Instant::now() + 4 * plover_client::CURSOR_ACK_INTERVAL;
    loop {
        let stored = server
            .router
            .store()
            .device_cursor("bob", "phone")
            .expect("read");
        if stored == Some(1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cursor not acknowledged: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bob.close().await;
    server.stop().await;
}
