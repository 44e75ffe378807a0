//! Typing indicators: datagrams to the other members' online devices, rate-limited, for
//! members only, never stored.
use crate::common;

use crate::common::{next_incoming, typing_within};
use plover_client::{EventStream, Incoming};
use std::time::Duration;

#[tokio::test]
async fn typing_reaches_the_peer_only_and_is_not_stored() {
    let (server, alice, conv) = common::alice_writes_to_bob().await;
    let id = conv.id();
    let mut bob = EventStream::start(server.config("bob", "phone"), None);
    let mut alice_laptop = EventStream::start(server.config("alice", "laptop"), None);
    assert!(bob.synced().await && alice_laptop.synced().await);
    let store = server.router.store().clone();
    let heads = (
        store.log_head("alice").expect("head"),
        store.log_head("bob").expect("head"),
    );

    alice.typing(id).expect("datagram");
    match next_incoming(&mut bob).await {
        Incoming::Typing { conversation, user } => {
            assert_eq!((conversation, user.as_str()), (id, "alice"));
        }
        other => panic!("expected typing, got {other:?}"),
    }
    // Not to the typist's own devices; not stored in anyone's log.
    assert!(
        typing_within(&mut alice_laptop, Duration::from_millis(300))
            .await
            .is_empty()
    );
    assert_eq!(
        (
            store.log_head("alice").expect("head"),
            store.log_head("bob").expect("head")
        ),
        heads
    );

    // A non-member's indicator goes nowhere.
    let mallory = server.connect("mallory", "d").await;
    mallory.typing(id).expect("datagram");
    assert!(
        typing_within(&mut bob, Duration::from_millis(300))
            .await
            .is_empty()
    );

    // A flood is cut to the rate limit (5 a second by default, with a burst of 5).
    for _ in 0..50 {
        alice.typing(id).expect("datagram");
    }
    let got = typing_within(&mut bob, Duration::from_millis(600)).await;
    assert!(
        !got.is_empty() && got.len() <= 8,
        "{} indicators passed",
        got.len()
    );

    bob.close().await;
    alice_laptop.close().await;
    mallory.close().await;
    drop(conv);
    alice.close().await;
    server.stop().await;
}

/// Each connection caches a conversation's members for typing; a removal must reach every
/// such cache: the removed member's indicators reach no one, and nobody's reach her.
#[tokio::test]
async fn a_removed_member_neither_sends_nor_receives_typing() {
    let server = common::TestServer::start().await;
    server.register("bob").await;
    server.register("carol").await;
    // alice's contacts: a stranger's group is a request, and its invitee types to nobody.
    server.contacts("alice", "bob").await;
    server.contacts("alice", "carol").await;
    let alice = server.connect("alice", "phone").await;
    let carol = server.connect("carol", "phone").await;
    let gid = alice
        .create_group("g", &["bob".into(), "carol".into()])
        .await
        .expect("group");
    let mut bob_events = EventStream::start(server.config("bob", "tablet"), None);
    let mut carol_events = EventStream::start(server.config("carol", "tablet"), None);
    assert!(bob_events.synced().await && carol_events.synced().await);

    // Both typists' connections cache the members while carol is one of them.
    carol.typing(gid).expect("datagram");
    let got = typing_within(&mut bob_events, Duration::from_millis(500)).await;
    assert!(got.contains(&(gid, "carol".into())), "{got:?}");
    alice.typing(gid).expect("datagram");
    let got = typing_within(&mut carol_events, Duration::from_millis(500)).await;
    assert!(got.contains(&(gid, "alice".into())), "{got:?}");

    let g = alice
        .open(plover_proto::Target::Conversation(gid), false)
        .await
        .expect("open");
    assert!(g.remove_member("carol").await.expect("remove") > 0);
    // Past the typing rate limit's refill, so nothing below is held back by it.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    alice.typing(gid).expect("datagram");
    let got = typing_within(&mut carol_events, Duration::from_millis(500)).await;
    assert!(
        !got.iter().any(|(c, _)| *c == gid),
        "carol still gets the group's typing: {got:?}"
    );
    carol.typing(gid).expect("datagram");
    let got = typing_within(&mut bob_events, Duration::from_millis(500)).await;
    assert!(
        !got.contains(&(gid, "carol".into())),
        "carol's typing still reaches bob: {got:?}"
    );
    // The members who stay still hear each other.
    alice.typing(gid).expect("datagram");
    let got = typing_within(&mut bob_events, Duration::from_millis(500)).await;
    assert!(got.contains(&(gid, "alice".into())), "{got:?}");

    drop(g);
    bob_events.close().await;
    carol_events.close().await;
    carol.close().await;
    alice.close().await;
    server.stop().await;
}
