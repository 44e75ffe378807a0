//! What a device receives on sync: its stored cursor only moves forward and never past its
//! user's log head, whatever `Ack` a client sends (raw clients, so nothing of the SDK's own
//! care is in the way), and history a user cleared stays cleared on a new device.
use crate::common;

use crate::common::{TestServer, alice_writes_to_bob, encode, raw_device};
use plover_proto::{ClientFrame, Event, ServerFrame};
use plover_quic::FrameReader;
use std::time::Duration;

/// The next frame on the control stream within five seconds.
async fn next(reader: &mut FrameReader) -> ServerFrame {
    tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .expect("a frame in time")
        .expect("read")
        .expect("frame")
}

/// Sends `Ack`s, then a `Ping` whose `Pong` says the server has taken them, and leaves.
async fn ack(server: &TestServer, user: &str, cursors: &[u64]) {
    let (_ep, conn, mut send, mut reader) = raw_device(server, user, "raw").await;
    for cursor in cursors {
        send.write_all(&encode(&ClientFrame::Ack { cursor: *cursor }))
            .await
            .expect("ack");
    }
    send.write_all(&encode(&ClientFrame::Ping { nonce: 7 }))
        .await
        .expect("ping");
    assert!(matches!(
        next(&mut reader).await,
        ServerFrame::Pong { nonce: 7 }
    ));
    conn.close(0u32.into(), b"bye");
}

/// Reconnects without a cursor (the server's stored one is used): the cursor the server
/// resumed from and the first event after it, if any comes within a second.
async fn sync_without_cursor(server: &TestServer, user: &str) -> (u64, Option<u64>) {
    let (_ep, conn, mut send, mut reader) = raw_device(server, user, "raw").await;
    send.write_all(&encode(&ClientFrame::Sync { cursor: None }))
        .await
        .expect("sync");
    let ServerFrame::SyncStarted { cursor, .. } = next(&mut reader).await else {
        panic!("SyncStarted expected");
    };
    // Events come on a delivery stream the server opens.
    let first = match tokio::time::timeout(Duration::from_secs(1), conn.accept_bi()).await {
        Ok(Ok((_send, recv))) => {
            let mut events = FrameReader::new(recv, 1 << 16);
            match next(&mut events).await {
                ServerFrame::Event { log, .. } => Some(log),
                other => panic!("an event expected, got {other:?}"),
            }
        }
        _ => None,
    };
    conn.close(0u32.into(), b"bye");
    (cursor, first)
}

#[tokio::test]
async fn an_ack_past_the_head_is_held_at_the_head() {
    let (server, alice, conv) = alice_writes_to_bob().await;
    for i in 0..3 {
        conv.send(format!("m{i}")).await.expect("send");
    }
    // Bob's log holds the three messages (positions 1-3); his device claims a million.
    ack(&server, "bob", &[1_000_000]).await;
    conv.send("after the ack").await.expect("send");
    let (cursor, first) = sync_without_cursor(&server, "bob").await;
    assert_eq!(
        cursor, 3,
        "the stored cursor is the head at the time of the ack"
    );
    assert_eq!(
        first,
        Some(4),
        "the message after the ack reaches the device"
    );
    drop(conv);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_backward_ack_is_ignored() {
    let (server, alice, conv) = alice_writes_to_bob().await;
    for i in 0..4 {
        conv.send(format!("m{i}")).await.expect("send");
    }
    ack(&server, "bob", &[3]).await;
    // Late or replayed acks, in one connection and in the next.
    ack(&server, "bob", &[3, 1, 2]).await;
    ack(&server, "bob", &[0]).await;
    let (cursor, first) = sync_without_cursor(&server, "bob").await;
    assert_eq!(cursor, 3, "the cursor stays at the furthest ack");
    assert_eq!(first, Some(4));
    drop(conv);
    alice.close().await;
    server.stop().await;
}

/// What the log holds for bob when a new device of his syncs from 0: the clear applies there
/// as in `History`.
#[tokio::test]
async fn cleared_history_stays_cleared_on_a_new_device() {
    let (server, alice, conv) = alice_writes_to_bob().await;
    for i in 1..=3 {
        conv.send(format!("secret {i}")).await.expect("send");
    }
    let bob = server.connect("bob", "phone").await;
    let bob_conv = bob
        .open(plover_proto::Target::Conversation(conv.id()), false)
        .await
        .expect("open");
    assert_eq!(bob_conv.clear_history(2).await.expect("clear"), 2);
    let mut tablet = plover_client::EventStream::start(server.config("bob", "tablet"), Some(0));
    let mut bodies = Vec::new();
    while bodies.len() < 3 {
        if let Event::Message(m) = common::next_log(&mut tablet).await.event {
            bodies.push((m.seq, String::from_utf8_lossy(&m.body).into_owned()));
        }
    }
    assert_eq!(
        bodies,
        vec![
            (1, String::new()),
            (2, String::new()),
            (3, "secret 3".to_owned())
        ],
        "cleared messages keep their place without their bodies"
    );
    // Alice cleared nothing: her new device gets everything.
    let mut hers = plover_client::EventStream::start(server.config("alice", "tablet"), Some(0));
    let first = common::next_event(&mut hers).await;
    assert_eq!(common::text(&first), "secret 1");
    tablet.close().await;
    hers.close().await;
    drop((bob_conv, conv));
    bob.close().await;
    alice.close().await;
    server.stop().await;
}
