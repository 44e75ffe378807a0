//! Delivered and read marks: when they move, who learns of them, and that they survive being
//! offline.

use crate::common::{alice_writes_to_bob, next_event, next_receipt};
use plover_client::{EventStream, Incoming};
use plover_proto::{Event, Target};
use std::time::Duration;

/// Asserts that no receipt arrives within `wait`.
async fn assert_no_receipt(events: &mut EventStream, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(item)) = tokio::time::timeout_at(deadline, events.next()).await {
        if let Ok(Incoming::Log(e)) = item
            && let Event::Receipt(r) = e.event
        {
            panic!("unexpected receipt {r:?}");
        }
    }
}

#[tokio::test]
async fn delivered_only_once_a_device_has_it_and_read_only_when_marked() {
    let (server, alice, conv) = alice_writes_to_bob().await;
    let mut alice_laptop = EventStream::start(server.config("alice", "laptop"), Some(0));
    assert!(alice_laptop.synced().await);

    for t in ["one", "two"] {
        conv.send(t).await.expect("send");
    }
    // Bob has no device online: nothing is delivered.
    assert_no_receipt(&mut alice_laptop, Duration::from_millis(500)).await;
    let info = alice.conversations().await.expect("list");
    let bob_marks = info[0].marks.iter().find(|m| m.user == "bob");
    assert!(bob_marks.is_none_or(|m| m.delivered == 0), "{bob_marks:?}");

    // Bob's phone comes online and receives both: alice learns "delivered up to 2".
    let mut bob = EventStream::start(server.config("bob", "phone"), None);
    next_event(&mut bob).await;
    next_event(&mut bob).await;
    let mut r = next_receipt(&mut alice_laptop).await;
    while r.delivered < 2 {
        r = next_receipt(&mut alice_laptop).await;
    }
    assert_eq!((r.user.as_str(), r.delivered, r.read), ("bob", 2, 0));

    // Not read until bob says so.
    assert_no_receipt(&mut alice_laptop, Duration::from_millis(300)).await;
    let bob_conn = server.connect("bob", "phone").await;
    let bob_conv = bob_conn
        .open(Target::Direct("alice".into()), false)
        .await
        .expect("open");
    let unread = bob_conn.conversations().await.expect("list")[0].unread;
    assert_eq!(unread, 2);
    bob_conv.mark_read(1).await.expect("read");
    let r = next_receipt(&mut alice_laptop).await;
    assert_eq!((r.user.as_str(), r.delivered, r.read), ("bob", 2, 1));
    // Marks never move back, and never past the last message.
    bob_conv.mark_read(1).await.expect("read");
    bob_conv.mark_read(99).await.expect("read");
    let r = next_receipt(&mut alice_laptop).await;
    assert_eq!(r.read, 2, "capped at the last message");
    assert_eq!(bob_conn.conversations().await.expect("list")[0].unread, 0);

    // Sending counts as reading what came before: alice's unread count is 0.
    let info = alice.conversations().await.expect("list");
    assert_eq!(info[0].unread, 0);
    let bob_marks = info[0]
        .marks
        .iter()
        .find(|m| m.user == "bob")
        .expect("bob's marks");
    assert_eq!((bob_marks.delivered, bob_marks.read), (2, 2));

    bob.close().await;
    alice_laptop.close().await;
    drop(bob_conv);
    bob_conn.close().await;
    drop(conv);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn receipts_are_learned_after_reconnect_and_read_state_reaches_the_readers_other_devices() {
    let (server, alice, conv) = alice_writes_to_bob().await;
    conv.send("hello").await.expect("send");
    drop(conv);
    alice.close().await;
    // Alice is entirely offline from here on.

    let mut bob_laptop = EventStream::start(server.config("bob", "laptop"), None);
    next_event(&mut bob_laptop).await;
    let bob = server.connect("bob", "phone").await;
    let bob_conv = bob
        .open(Target::Direct("alice".into()), false)
        .await
        .expect("open");
    bob_conv.mark_read(bob_conv.last_seq()).await.expect("read");
    // Bob's laptop learns that bob read it (its unread count clears).
    let r = next_receipt(&mut bob_laptop).await;
    assert_eq!((r.user.as_str(), r.read), ("bob", 1));

    // Alice comes back: the receipts are in her log after her message.
    let mut alice_phone = EventStream::start(server.config("alice", "phone"), Some(0));
    let first = next_event(&mut alice_phone).await;
    assert_eq!(first.pos, 1);
    let mut r = next_receipt(&mut alice_phone).await;
    while r.read < 1 {
        r = next_receipt(&mut alice_phone).await;
    }
    assert_eq!((r.user.as_str(), r.delivered, r.read), ("bob", 1, 1));

    alice_phone.close().await;
    bob_laptop.close().await;
    drop(bob_conv);
    bob.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_steady_stream_of_messages_is_reported_delivered_about_once_a_second() {
    let (server, _alice, conv) = alice_writes_to_bob().await;
    let mut alice_laptop = EventStream::start(server.config("alice", "laptop"), Some(0));
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(0));
    assert!(alice_laptop.synced().await && bob.synced().await);
    let reader = tokio::spawn(async move {
        for _ in 0..40 {
            next_event(&mut bob).await;
        }
        bob
    });
    // 40 messages 20 ms apart: never 50 ms without one, so the reports wait for the 1 s cap
    // or the quiet after the last (one every 50 ms would be about 16).
    for i in 0..40 {
        conv.send(format!("m{i}")).await.expect("send");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bob = reader.await.expect("bob read");
    let mut reports = 0;
    loop {
        let r = next_receipt(&mut alice_laptop).await;
        if r.user == "bob" {
            reports += 1;
            if r.delivered == 40 {
                break;
            }
        }
    }
    assert!(
        reports <= 6,
        "{reports} delivered reports for one steady stream"
    );
    bob.close().await;
    alice_laptop.close().await;
    server.stop().await;
}
