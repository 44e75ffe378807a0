//! Retention policies, tombstones, deleting for everyone and clearing one's own history.

use crate::common::{TestServer, next_event, next_log, users};
use plover_client::EventStream;
use plover_proto::{ConversationChange, ErrorCode, Event, Message, Retention, Target};
use std::time::Duration;

fn erased(m: &Message) -> bool {
    m.body.is_empty() && m.change == Some(ConversationChange::Erased)
}

#[tokio::test]
async fn until_delivered_keeps_only_tombstones_once_everyone_has_it() {
    let server = TestServer::start().await;
    users(&server, &["bob", "carol"]).await;
    let alice = server.connect("alice", "phone").await;
    let id = alice
        .create_group_with(
            "ephemeral",
            &["bob".into(), "carol".into()],
            Retention::UntilDelivered,
        )
        .await
        .expect("create");
    let conv = alice
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    for t in ["one", "two", "three"] {
        conv.send(t).await.expect("send");
    }
    // Bob's device gets them; carol's does not yet: the bodies stay.
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(0));
    for _ in 0..4 {
        next_event(&mut bob).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (page, _) = conv.history(None, None, 10).await.expect("history");
    assert!(page.iter().skip(1).all(|m| !m.body.is_empty()), "{page:?}");

    // Carol's device gets them too: only tombstones remain, seqs gapless.
    let mut carol = EventStream::start(server.config("carol", "phone"), Some(0));
    for _ in 0..4 {
        next_event(&mut carol).await;
    }
    let mut page = Vec::new();
    for _ in 0..50 {
        page = conv.history(None, None, 10).await.expect("history").0;
        if page.iter().skip(1).all(erased) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        page.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(page.iter().skip(1).all(erased), "{page:?}");
    assert_eq!(page[2].from, "alice");
    assert!(page[2].ts > 0);
    // And in the store itself, not only in what is served.
    let store = server.router.store().clone();
    let stored = tokio::task::spawn_blocking(move || store.message(id, 3))
        .await
        .expect("join")
        .expect("read")
        .expect("tombstone");
    assert!(erased(&stored));
    bob.close().await;
    carol.close().await;
    drop(conv);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_ttl_message_is_gone_from_history_and_sync_before_any_sweep() {
    // A sweep interval of an hour: what the test sees is the read-time expiry.
    let server =
        TestServer::start_with(|c| c.retention.sweep_interval = Duration::from_secs(3600)).await;
    users(&server, &["bob"]).await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    assert_eq!(conv.set_retention(Retention::Ttl(1)).await.expect("set"), 1);
    conv.send("self-destructs").await.expect("send");
    let (page, _) = conv.history(None, None, 10).await.expect("history");
    assert_eq!(page.last().expect("message").body, "self-destructs");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (page, _) = conv.history(None, None, 10).await.expect("history");
    assert!(erased(page.last().expect("message")), "{page:?}");
    // Sync serves no expired body either.
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(0));
    let first = next_event(&mut bob).await;
    let Event::Message(change) = first.event else {
        unreachable!()
    };
    assert!(matches!(
        change.change,
        Some(ConversationChange::Retention { .. })
    ));
    let second = next_event(&mut bob).await;
    let Event::Message(m) = second.event else {
        unreachable!()
    };
    assert!(erased(&m), "{m:?}");

    // The store still has the body until the sweep runs; then it has not.
    let store = server.router.store().clone();
    let id = conv.id();
    let s = store.clone();
    let before = tokio::task::spawn_blocking(move || s.message(id, 2))
        .await
        .expect("join")
        .expect("read")
        .expect("message");
    assert!(!before.body.is_empty());
    let router = server.router.clone();
    let removed =
        tokio::task::spawn_blocking(move || router.sweep_blocking(Duration::from_secs(3600)))
            .await
            .expect("join")
            .expect("sweep");
    assert_eq!(removed, 1);
    let after = tokio::task::spawn_blocking(move || store.message(id, 2))
        .await
        .expect("join")
        .expect("read")
        .expect("tombstone");
    assert!(erased(&after));
    bob.close().await;
    drop(conv);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn deleting_for_everyone_and_clearing_for_oneself() {
    let server = TestServer::start().await;
    users(&server, &["bob"]).await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    for t in ["keep me", "oops", "last"] {
        conv.send(t).await.expect("send");
    }
    let mut bob_live = EventStream::start(server.config("bob", "phone"), Some(0));
    for _ in 0..3 {
        next_event(&mut bob_live).await;
    }
    let bob = server.connect("bob", "laptop").await;
    let bob_conv = bob
        .open(Target::Direct("alice".into()), false)
        .await
        .expect("open");
    let err = bob_conv.delete(2).await.expect_err("not his message");
    assert_eq!(err.code(), Some(ErrorCode::FORBIDDEN));

    assert_eq!(conv.delete(2).await.expect("delete"), 2);
    assert_eq!(
        conv.delete(2).await.expect("again"),
        0,
        "a retry is a no-op"
    );
    // Bob's online device is told at once...
    let mut deleted = None;
    while deleted.is_none() {
        if let Event::Deleted { seq, by, .. } = next_log(&mut bob_live).await.event {
            deleted = Some((seq, by));
        }
    }
    assert_eq!(deleted, Some((2, "alice".to_string())));
    // ...and a device that was offline learns it by sync.
    let mut bob_tablet = EventStream::start(server.config("bob", "tablet"), Some(0));
    let mut saw = false;
    for _ in 0..10 {
        let e = next_log(&mut bob_tablet).await;
        if let Event::Message(m) = &e.event
            && m.seq == 2
        {
            assert!(erased(m), "sync serves the tombstone: {m:?}");
        }
        if matches!(e.event, Event::Deleted { seq: 2, .. }) {
            saw = true;
            break;
        }
    }
    assert!(saw);
    let (page, _) = bob_conv.history(None, None, 10).await.expect("history");
    assert!(erased(&page[1]) && page[0].body == "keep me");

    // Bob clears his own history up to 2: his view starts at 3, alice's is whole.
    assert_eq!(bob_conv.clear_history(2).await.expect("clear"), 2);
    let (page, _) = bob_conv.history(None, None, 10).await.expect("history");
    assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);
    let (page, _) = conv.history(None, None, 10).await.expect("history");
    assert_eq!(page.len(), 3);

    // Policies: shown by conversations; in a group only admins change them.
    assert_eq!(
        bob_conv
            .set_retention(Retention::Ttl(7 * 86_400))
            .await
            .expect("either member"),
        4
    );
    let listed = alice.conversations().await.expect("list");
    assert_eq!(listed[0].retention, Retention::Ttl(7 * 86_400));
    let gid = alice
        .create_group("g", &["bob".into()])
        .await
        .expect("group");
    let g = bob
        .open(Target::Conversation(gid), false)
        .await
        .expect("open");
    let err = g
        .set_retention(Retention::UntilDelivered)
        .await
        .expect_err("not admin");
    assert_eq!(err.code(), Some(ErrorCode::FORBIDDEN));

    bob_live.close().await;
    bob_tablet.close().await;
    drop((bob_conv, g, conv));
    bob.close().await;
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn undelivered_bodies_go_after_the_maximum_age() {
    let server =
        TestServer::start_with(|c| c.retention.max_undelivered = Duration::from_millis(500)).await;
    users(&server, &["bob"]).await;
    let alice = server.connect("alice", "phone").await;
    let id = alice
        .create_group_with("g", &["bob".into()], Retention::UntilDelivered)
        .await
        .expect("create");
    let conv = alice
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    conv.send("bob never comes").await.expect("send");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let router = server.router.clone();
    let removed =
        tokio::task::spawn_blocking(move || router.sweep_blocking(Duration::from_millis(500)))
            .await
            .expect("join")
            .expect("sweep");
    assert_eq!(removed, 1);
    let (page, _) = conv.history(None, None, 10).await.expect("history");
    assert!(erased(&page[1]));
    drop(conv);
    alice.close().await;
    server.stop().await;
}

/// A new policy holds for the messages sent after it, never for those before, in history, in
/// sync and in the sweep; `Ttl(0)` is refused; and the change is an event, to both sides,
/// that says who made it.
#[tokio::test]
async fn a_retention_change_is_not_retroactive() {
    let server =
        TestServer::start_with(|c| c.retention.sweep_interval = Duration::from_secs(3600)).await;
    let id = server.contacts("alice", "bob").await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    let before = conv.send("sent under keep").await.expect("send").seq;

    let err = conv
        .set_retention(Retention::Ttl(0))
        .await
        .expect_err("ttl 0");
    assert_eq!(err.code(), Some(ErrorCode::INVALID_REQUEST));
    let change = conv.set_retention(Retention::Ttl(1)).await.expect("set");
    let during = conv.send("sent under a 1 s ttl").await.expect("send").seq;
    // And back: a message after that is kept again; the one in between still goes.
    let bob = server.connect("bob", "phone").await;
    let bob_conv = bob
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    let back = bob_conv.set_retention(Retention::Keep).await.expect("set");
    let after = conv.send("sent under keep again").await.expect("send").seq;
    assert!(before < change && change < during && during < back && back < after);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (page, _) = bob_conv.history(None, None, 20).await.expect("history");
    let by_seq = |seq: u64| page.iter().find(|m| m.seq == seq).expect("in the page");
    assert_eq!(by_seq(before).body, "sent under keep", "not retroactive");
    assert!(erased(by_seq(during)), "{:?}", by_seq(during));
    assert_eq!(by_seq(after).body, "sent under keep again");
    // Each change is an event naming who made it.
    let made_by = |seq: u64| {
        let m = by_seq(seq);
        assert!(
            matches!(m.change, Some(ConversationChange::Retention { .. })),
            "{m:?}"
        );
        m.from.clone()
    };
    assert_eq!(made_by(change), "alice");
    assert_eq!(made_by(back), "bob");
    // Sync says the same.
    let mut events = EventStream::start(server.config("bob", "tablet"), Some(0));
    let mut seen = std::collections::HashMap::new();
    while seen.len() < 5 {
        if let Event::Message(m) = next_event(&mut events).await.event
            && m.conversation == id
        {
            seen.insert(m.seq, m);
        }
    }
    assert_eq!(seen[&before].body, "sent under keep");
    assert!(erased(&seen[&during]));
    events.close().await;

    // The sweep removes only the body sent under the ttl.
    let router = server.router.clone();
    let removed =
        tokio::task::spawn_blocking(move || router.sweep_blocking(Duration::from_secs(3600)))
            .await
            .expect("join")
            .expect("sweep");
    assert_eq!(removed, 1);
    let store = server.router.store().clone();
    for (seq, kept) in [(before, true), (during, false), (after, true)] {
        let m = store.message(id, seq).expect("read").expect("message");
        assert_eq!(!m.body.is_empty(), kept, "{m:?}");
    }
    drop((conv, bob_conv));
    bob.close().await;
    alice.close().await;
    server.stop().await;
}
