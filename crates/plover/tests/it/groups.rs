//! Groups: one order on every device, membership as events in the conversation, admins, the
//! size limit, per-member receipts, and a 1000-member group.
use crate::common;

use crate::common::{TestServer, next_event, next_receipt, users};
use plover_client::EventStream;
use plover_proto::{ConversationChange, ErrorCode, Event, Target};
use std::sync::Arc;
use std::time::Duration;

/// Drains `events` until `n` messages (or membership events) have come; returns (seq, from,
/// body or change).
async fn take(events: &mut EventStream, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = next_event(events).await;
        let Event::Message(m) = e.event else {
            unreachable!()
        };
        let what = match &m.change {
            None => String::from_utf8_lossy(&m.body).into_owned(),
            Some(c) => format!("{c:?}"),
        };
        out.push((m.seq, what));
    }
    out
}

#[tokio::test]
async fn every_device_sees_one_order_under_concurrent_senders() {
    let server = TestServer::start().await;
    users(&server, &["bob", "carol"]).await;
    let alice = server.connect("alice", "phone").await;
    let id = alice
        .create_group("trio", &["bob".into(), "carol".into()])
        .await
        .expect("create");

    let mut devices = Vec::new();
    for user in ["alice", "bob", "carol"] {
        for device in ["phone2", "laptop"] {
            devices.push(EventStream::start(server.config(user, device), Some(0)));
        }
    }
    let mut senders = tokio::task::JoinSet::new();
    for user in ["alice", "bob", "carol"] {
        let conn = Arc::new(server.connect(user, "sender").await);
        let conv = Arc::new(
            conn.open(Target::Conversation(id), false)
                .await
                .expect("open"),
        );
        senders.spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..30 {
                let conv = conv.clone();
                tasks.spawn(async move { conv.send(format!("{user}-{i}")).await.expect("send") });
            }
            while tasks.join_next().await.is_some() {}
            drop(conn);
        });
    }
    while senders.join_next().await.is_some() {}

    let first = take(&mut devices[0], 91).await;
    assert_eq!(
        first.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=91).collect::<Vec<u64>>()
    );
    assert!(first[0].1.starts_with("Created"));
    for d in devices.iter_mut().skip(1) {
        assert_eq!(take(d, 91).await, first, "same order on every device");
    }
    for d in devices {
        d.close().await;
    }
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn membership_changes_are_events_and_a_removed_member_gets_nothing_after() {
    let server = TestServer::start().await;
    users(&server, &["bob", "carol", "dave"]).await;
    let alice = server.connect("alice", "phone").await;
    let id = alice
        .create_group("team", &["bob".into(), "carol".into()])
        .await
        .expect("create");
    let a = alice
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    assert_eq!(a.admins(), ["alice".to_string()]);
    a.send("hello team").await.expect("send");

    let mut carol = EventStream::start(server.config("carol", "phone"), Some(0));
    assert_eq!(take(&mut carol, 2).await[1].1, "hello team");

    // Non-admins may not change members.
    let bob = server.connect("bob", "phone").await;
    let b = bob
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    let err = b.add_member("dave").await.expect_err("not admin");
    assert_eq!(err.code(), Some(ErrorCode::FORBIDDEN));
    let err = b.remove_member("carol").await.expect_err("not admin");
    assert_eq!(err.code(), Some(ErrorCode::FORBIDDEN));

    // Alice removes carol: carol sees her removal, then nothing, live or by sync.
    let seq = a.remove_member("carol").await.expect("remove");
    assert_eq!(seq, 3);
    assert_eq!(
        a.remove_member("carol").await.expect("again"),
        0,
        "retry is a no-op"
    );
    let removal = take(&mut carol, 1).await;
    assert_eq!(removal[0].0, 3);
    assert!(removal[0].1.contains("Removed"));
    a.send("after carol").await.expect("send");
    b.send("bob too").await.expect("send");
    common::assert_quiet(&mut carol, Duration::from_millis(300)).await;
    carol.close().await;
    let mut carol = EventStream::start(server.config("carol", "laptop"), None);
    let everything = take(&mut carol, 3).await;
    assert_eq!(
        everything.last().expect("last").0,
        3,
        "her log ends at her removal"
    );
    common::assert_quiet(&mut carol, Duration::from_millis(300)).await;
    carol.close().await;
    let carol_conn = server.connect("carol", "d").await;
    let err = carol_conn
        .open(Target::Conversation(id), false)
        .await
        .expect_err("no longer a member");
    assert_eq!(err.code(), Some(ErrorCode::NOT_MEMBER));
    carol_conn.close().await;

    // Dave joins: he gets the group from his joining on, and no history before it.
    let seq = a.add_member("dave").await.expect("add");
    let mut dave = EventStream::start(server.config("dave", "phone"), Some(0));
    let from_join = take(&mut dave, 1).await;
    assert_eq!(from_join[0].0, seq);
    assert!(from_join[0].1.contains("Added"));
    let dave_conn = server.connect("dave", "d").await;
    let d = dave_conn
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    let (history, more) = d.history(None, None, 100).await.expect("history");
    assert!(!more);
    assert_eq!(
        history.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![seq],
        "nothing before his joining"
    );

    // Promotion, and the last admin leaving hands the role on.
    assert!(a.promote("bob").await.expect("promote") > 0);
    assert!(b.add_member("carol").await.expect("bob is admin now") > 0);
    a.leave().await.expect("leave");
    let left = b.leave().await.expect("leave");
    let (page, _) = d.members_page("", 10).await.expect("members");
    let admins: Vec<_> = page
        .iter()
        .filter(|m| m.admin)
        .map(|m| m.user.clone())
        .collect();
    assert_eq!(admins.len(), 1, "{page:?}");
    let (history, _) = d.history(None, None, 1).await.expect("history");
    let Some(ConversationChange::Left { promoted }) = &history[0].change else {
        panic!("expected Left at {left}, got {:?}", history[0]);
    };
    assert_eq!(promoted.as_deref(), Some(admins[0].as_str()));

    dave.close().await;
    drop((a, b, d));
    for c in [alice, bob, dave_conn] {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn the_size_limit_is_enforced_with_a_clear_error() {
    let server = TestServer::start_with(|c| c.limits.max_group = 3).await;
    users(&server, &["bob", "carol", "dave"]).await;
    let alice = server.connect("alice", "d").await;
    let err = alice
        .create_group("big", &["bob".into(), "carol".into(), "dave".into()])
        .await
        .expect_err("too big");
    assert_eq!(err.code(), Some(ErrorCode::LIMIT));
    assert!(err.to_string().contains("limit of 3"), "{err}");
    let id = alice
        .create_group("ok", &["bob".into(), "carol".into()])
        .await
        .expect("create");
    let conv = alice
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    let err = conv.add_member("dave").await.expect_err("full");
    assert_eq!(err.code(), Some(ErrorCode::LIMIT));
    let err = alice
        .create_group("ghosts", &["nobody".into()])
        .await
        .expect_err("unknown user");
    assert_eq!(err.code(), Some(ErrorCode::UNKNOWN_USER));
    drop(conv);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn per_member_receipts_in_a_group() {
    let server = TestServer::start().await;
    users(&server, &["bob", "carol"]).await;
    // Contacts of alice: a stranger's group is a request, which hides the read marks.
    server.contacts("alice", "bob").await;
    server.contacts("alice", "carol").await;
    let alice = server.connect("alice", "phone").await;
    let id = alice
        .create_group("receipts", &["bob".into(), "carol".into()])
        .await
        .expect("create");
    let conv = alice
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    let mut alice_events = EventStream::start(server.config("alice", "laptop"), Some(0));
    let sent = conv.send("did you get it?").await.expect("send");

    // Bob's device receives it; carol is offline.
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(0));
    take(&mut bob, 2).await;
    let mut r = next_receipt(&mut alice_events).await;
    while r.user != "bob" || r.delivered < sent.seq {
        r = next_receipt(&mut alice_events).await;
    }
    let bob_conn = server.connect("bob", "phone").await;
    bob_conn
        .open(Target::Conversation(id), false)
        .await
        .expect("open")
        .mark_read(sent.seq)
        .await
        .expect("read");
    let mut r = next_receipt(&mut alice_events).await;
    while r.user != "bob" || r.read < sent.seq {
        r = next_receipt(&mut alice_events).await;
    }

    let members = conv.all_members().await.expect("members");
    let marks = |u: &str| {
        let m = members.iter().find(|m| m.user == u).expect("member");
        (m.delivered, m.read)
    };
    assert_eq!(marks("bob"), (sent.seq, sent.seq));
    assert_eq!(marks("carol"), (0, 0));
    assert_eq!(marks("alice"), (sent.seq, sent.seq));
    bob.close().await;
    alice_events.close().await;
    bob_conn.close().await;
    drop(conv);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_thousand_member_group_reaches_every_online_device_and_every_log() {
    // Ten messages to a thousand members are 10,000 log entries: past a user's write budget.
    let server = TestServer::start_with(|c| c.limits.writes_per_second = 1_000_000).await;
    let names: Vec<String> = (0..999).map(|i| format!("m{i:03}")).collect();
    let store = server.router.store().clone();
    let all = names.clone();
    tokio::task::spawn_blocking(move || {
        for n in &all {
            store.ensure_user(&*store, n, 1).expect("user");
        }
    })
    .await
    .expect("join");
    let alice = server.connect("alice", "phone").await;
    let id = alice.create_group("town", &names).await.expect("create");
    let conv = alice
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    assert_eq!(conv.member_count(), 1000);
    assert!(
        conv.members().is_empty(),
        "large groups are paged, not inlined"
    );
    assert_eq!(conv.all_members().await.expect("members").len(), 1000);

    // A few dozen devices online; the rest offline.
    let mut online = Vec::new();
    for n in names.iter().take(30) {
        let mut s = EventStream::start(server.config(n, "phone"), Some(0));
        assert!(s.synced().await);
        online.push(s);
    }
    for i in 0..10 {
        conv.send(format!("news {i}")).await.expect("send");
    }
    for s in online.iter_mut() {
        let got = take(s, 11).await;
        assert_eq!(
            got.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            (1..=11).collect::<Vec<u64>>()
        );
        assert_eq!(got[10].1, "news 9");
    }
    // Every member's log holds the group's 11 events.
    let store = server.router.store().clone();
    let mut everyone = names.clone();
    everyone.push("alice".into());
    tokio::task::spawn_blocking(move || {
        for n in &everyone {
            let log = store.read_log(n, 0, 100).expect("log");
            assert_eq!(log.len(), 11, "log of {n}");
        }
    })
    .await
    .expect("join");
    for s in online {
        s.close().await;
    }
    drop(conv);
    alice.close().await;
    server.stop().await;
}

/// A group whose `CreateGroup` fits in a frame but whose member list, repeated in a `Created`
/// event with the sender's fields around it, would not: before the cap, delivering that event
/// closed every member's connection, and each reconnect met it again. Now the event leaves
/// large member lists out (page them with `Members`) and every member syncs past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_long_names_syncs_past_its_first_event() {
    use plover_proto::{ClientFrame, ClientMsgId, Message, Retention, ServerFrame, codec};
    let server = TestServer::start().await;
    let max = plover_proto::DEFAULT_MAX_FRAME;
    let name = |i: usize| format!("{i:04}-{}", "x".repeat(59));
    // The most members whose CreateGroup still fits; their Created, uncapped, would not.
    let creator = name(0);
    let mut members: Vec<String> = Vec::new();
    loop {
        let mut more = members.clone();
        more.push(name(more.len() + 1));
        let create = ClientFrame::CreateGroup {
            request: 1,
            title: "long names".into(),
            members: more.clone(),
            retention: Retention::Keep,
        };
        if codec::encode_to_vec(&create, max).is_err() {
            break;
        }
        members = more;
    }
    let mut everyone = members.clone();
    everyone.push(creator.clone());
    everyone.sort();
    let uncapped = ServerFrame::Event {
        log: 1,
        event: Event::Message(Message {
            conversation: 1,
            seq: 1,
            from: creator.clone(),
            device: "phone".into(),
            ts: 1_764_000_000_000,
            id: ClientMsgId::random(),
            body: Default::default(),
            change: Some(ConversationChange::Created {
                title: "long names".into(),
                members: everyone.clone(),
            }),
        }),
    };
    assert!(
        codec::encode_to_vec(&uncapped, max).is_err(),
        "{} members of 64 bytes: the uncapped event fits, the test proves nothing",
        everyone.len()
    );
    let names: Vec<&str> = everyone.iter().map(String::as_str).collect();
    users(&server, &names).await;

    let owner = server.connect(&creator, "phone").await;
    let gid = owner
        .create_group("long names", &members)
        .await
        .expect("group");
    let conv = owner
        .open(Target::Conversation(gid), false)
        .await
        .expect("open");
    conv.send("after the creation").await.expect("send");
    let mut member = EventStream::start(server.config(&members[0], "phone"), Some(0));
    let got = take(&mut member, 2).await;
    assert_eq!(
        got,
        vec![
            (
                1,
                format!(
                    "{:?}",
                    ConversationChange::Created {
                        title: "long names".into(),
                        members: Vec::new()
                    }
                )
            ),
            (2, "after the creation".into())
        ]
    );
    let (page, _) = conv.history(None, None, 10).await.expect("history");
    assert_eq!(page.len(), 2);
    assert_eq!(
        conv.all_members().await.expect("members").len(),
        everyone.len()
    );
    member.close().await;
    drop(conv);
    owner.close().await;
    server.stop().await;
}
