//! People's safety: a stranger's message is a request until answered, and a block keeps a
//! user out, seen from both sides over real QUIC, with the real CLI where a user would use it.

use crate::common::{
    self, TestServer, cli_stdout, next_event, next_receipt, run_cli, typing_within,
};
use plover_client::{ClientError, Connection, EventStream};
use plover_proto::{ErrorCode, Event, Target};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

fn code(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

/// Sends typing from `who` in `conversation` a few times (datagrams may be lost).
async fn type_in(who: &Connection, conversation: u64) {
    for _ in 0..3 {
        who.typing(conversation).expect("datagram");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `member`'s read mark in `conversation` as `viewer` sees it.
async fn read_mark(viewer: &Connection, conversation: u64, member: &str) -> u64 {
    let conv = viewer
        .open(Target::Conversation(conversation), false)
        .await
        .expect("open");
    let members = conv.all_members().await.expect("members");
    members
        .iter()
        .find(|m| m.user == member)
        .map_or(0, |m| m.read)
}

/// Runs the CLI as `user`.
async fn plover(dir: &Path, server: &TestServer, user: &str, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_plover"));
    cmd.current_dir(dir)
        .args(args)
        .env("PLOVER_SERVER", server.addr.to_string())
        .env("PLOVER_TOKEN", server.token(user))
        .env("PLOVER_CA", server.ca())
        .env("PLOVER_DEVICE", "cli");
    run_cli(cmd).await
}

#[tokio::test]
async fn a_strangers_message_is_a_request_until_it_is_answered() {
    let server = TestServer::start().await;
    server.register("bob").await;
    let carol = server.connect("carol", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let conv = carol
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("carol opens a conversation with bob");
    let id = conv.id();
    conv.send("hi bob, it's carol").await.expect("sent");

    // bob sees it as a request; carol has none.
    let requests = bob.requests().await.expect("requests");
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].conversation, requests[0].from.as_str()),
        (id, "carol")
    );
    assert!(carol.requests().await.expect("requests").is_empty());
    let dir = tempfile::tempdir().expect("tempdir");
    let listed = cli_stdout(&plover(dir.path(), &server, "bob", &["requests"]).await);
    assert_eq!(
        listed.trim(),
        format!("request conversation={id} from=carol")
    );

    // carol sees nothing of bob: not his presence...
    let refused = carol.presence("bob").await.expect_err("no presence");
    assert_eq!(code(&refused), Some(ErrorCode::FORBIDDEN));
    // ...nor his typing, nor his read mark; his delivered mark is fine.
    let mut carol_events = EventStream::start(server.config("carol", "laptop"), None);
    assert!(carol_events.synced().await);
    let bob_conv = bob
        .open(Target::Direct("carol".into()), false)
        .await
        .expect("open");
    type_in(&bob, id).await;
    assert!(
        typing_within(&mut carol_events, Duration::from_millis(400))
            .await
            .is_empty()
    );
    bob_conv.mark_read(1).await.expect("read");
    let receipt = loop {
        let r = next_receipt(&mut carol_events).await;
        if r.user == "bob" {
            break r;
        }
    };
    assert_eq!(
        (receipt.delivered, receipt.read),
        (1, 0),
        "delivered shown, read hidden"
    );
    assert_eq!(read_mark(&carol, id, "bob").await, 0);
    // bob sees carol's presence: she wrote to him.
    assert!(bob.presence("carol").await.is_ok());

    // bob answers: the request is over, and carol sees what a contact sees.
    bob_conv.send("hi carol").await.expect("answer");
    assert!(bob.requests().await.expect("requests").is_empty());
    let (online, _) = carol
        .presence("bob")
        .await
        .expect("presence after the answer");
    assert!(online);
    bob_conv.mark_read(2).await.expect("read");
    assert_eq!(read_mark(&carol, id, "bob").await, 2);
    type_in(&bob, id).await;
    assert!(
        !typing_within(&mut carol_events, Duration::from_secs(2))
            .await
            .is_empty()
    );

    carol_events.close().await;
    for c in [carol, bob] {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_group_invitation_from_a_stranger_is_a_request_until_accepted() {
    let server = TestServer::start().await;
    common::users(&server, &["dan", "erin"]).await;
    let dan = server.connect("dan", "phone").await;
    let erin = server.connect("erin", "phone").await;
    let group = dan
        .create_group("Strangers", &["erin".into()])
        .await
        .expect("group");
    let requests = erin.requests().await.expect("requests");
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].conversation, requests[0].from.as_str()),
        (group, "dan")
    );
    assert_eq!(
        code(&dan.presence("erin").await.expect_err("hidden")),
        Some(ErrorCode::FORBIDDEN)
    );

    // Accepting from the CLI ends it.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = cli_stdout(
        &plover(
            dir.path(),
            &server,
            "erin",
            &["accept", "--conversation", &group.to_string()],
        )
        .await,
    );
    assert_eq!(out.trim(), format!("accepted conversation={group}"));
    assert!(erin.requests().await.expect("requests").is_empty());
    assert!(dan.presence("erin").await.is_ok());
    for c in [dan, erin] {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_blocked_user_cannot_reach_the_blocker_and_is_only_told_not_allowed() {
    let server = TestServer::start().await;
    common::users(&server, &["bob", "carol", "alice"]).await;
    let carol = server.connect("carol", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let conv = carol
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    conv.send("hi bob").await.expect("sent");
    let bob_conv = bob
        .open(Target::Direct("carol".into()), false)
        .await
        .expect("open");
    bob_conv.send("who is this?").await.expect("answer");

    // bob blocks carol from the CLI.
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        cli_stdout(&plover(dir.path(), &server, "bob", &["block", "carol"]).await).trim(),
        "blocked carol"
    );
    assert_eq!(
        cli_stdout(&plover(dir.path(), &server, "bob", &["blocked"]).await).trim(),
        "carol"
    );

    // carol can no longer write to him, and learns only "not allowed".
    let refused = conv.send("hello?").await.expect_err("refused");
    assert_eq!(code(&refused), Some(ErrorCode::FORBIDDEN));
    assert!(refused.to_string().contains("not allowed"), "{refused}");
    assert!(!refused.to_string().contains("block"), "{refused}");
    // Nor see his presence: the same answer as for a stranger.
    let hidden = carol.presence("bob").await.expect_err("hidden");
    assert_eq!(code(&hidden), Some(ErrorCode::FORBIDDEN));
    // Nor bring him into a group.
    let added = carol
        .create_group("Ambush", &["bob".into()])
        .await
        .expect_err("refused");
    assert_eq!(code(&added), Some(ErrorCode::FORBIDDEN));
    assert!(added.to_string().contains("not allowed"), "{added}");
    let group = carol
        .create_group("Later", &["alice".into()])
        .await
        .expect("group");
    let later = carol
        .open(Target::Conversation(group), false)
        .await
        .expect("open");
    let add = later.add_member("bob").await.expect_err("refused");
    assert_eq!(code(&add), Some(ErrorCode::FORBIDDEN));
    // bob, the blocker, is told why he cannot write.
    let own = bob_conv.send("bye").await.expect_err("refused");
    assert!(own.to_string().contains("you blocked carol"), "{own}");
    // Unblocked, she can write again.
    assert_eq!(
        cli_stdout(&plover(dir.path(), &server, "bob", &["unblock", "carol"]).await).trim(),
        "unblocked carol"
    );
    conv.send("hello again")
        .await
        .expect("sent after the unblock");
    assert!(
        cli_stdout(&plover(dir.path(), &server, "bob", &["blocked"]).await)
            .trim()
            .is_empty()
    );
    for c in [carol, bob] {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_stranger_blocked_before_writing_cannot_open_a_conversation() {
    let server = TestServer::start().await;
    common::users(&server, &["bob", "mallory"]).await;
    let bob = server.connect("bob", "phone").await;
    bob.block("mallory").await.expect("block");
    let mallory = server.connect("mallory", "phone").await;
    let refused = mallory
        .open(Target::Direct("bob".into()), true)
        .await
        .expect_err("refused");
    assert_eq!(code(&refused), Some(ErrorCode::FORBIDDEN));
    assert!(refused.to_string().contains("not allowed"), "{refused}");
    // Blocking someone unknown is an error, not a silent success.
    let unknown = bob.block("nobody").await.expect_err("unknown");
    assert_eq!(code(&unknown), Some(ErrorCode::UNKNOWN_USER));
    for c in [bob, mallory] {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn in_a_shared_group_a_block_hides_typing_and_marks_but_not_messages() {
    let server = TestServer::start().await;
    common::users(&server, &["alice", "bob", "carol"]).await;
    let alice = server.connect("alice", "phone").await;
    let group = alice
        .create_group("Book club", &["bob".into(), "carol".into()])
        .await
        .expect("group");
    let bob = server.connect("bob", "phone").await;
    let carol = server.connect("carol", "phone").await;
    // Strangers to alice: both accept.
    bob.accept(group).await.expect("accept");
    carol.accept(group).await.expect("accept");
    bob.block("carol").await.expect("block");

    let mut alice_events = EventStream::start(server.config("alice", "laptop"), None);
    let mut bob_events = EventStream::start(server.config("bob", "laptop"), None);
    let mut carol_events = EventStream::start(server.config("carol", "laptop"), None);
    for e in [&mut alice_events, &mut bob_events, &mut carol_events] {
        assert!(e.synced().await);
    }

    // carol's typing reaches alice, not bob; bob's reaches alice, not carol.
    type_in(&carol, group).await;
    assert!(
        !typing_within(&mut alice_events, Duration::from_secs(1))
            .await
            .is_empty()
    );
    assert!(
        typing_within(&mut bob_events, Duration::from_millis(400))
            .await
            .is_empty()
    );
    type_in(&bob, group).await;
    assert!(
        !typing_within(&mut alice_events, Duration::from_secs(1))
            .await
            .is_empty()
    );
    assert!(
        typing_within(&mut carol_events, Duration::from_millis(400))
            .await
            .is_empty()
    );

    // carol's messages still reach bob: the group's history is one for all.
    let carol_conv = carol
        .open(Target::Conversation(group), false)
        .await
        .expect("open");
    let sent = carol_conv.send("chapter 3?").await.expect("sent");
    let got = loop {
        match next_event(&mut bob_events).await.event {
            Event::Message(m) if m.change.is_none() => break m,
            _ => continue,
        }
    };
    assert_eq!((got.seq, got.from.as_str()), (sent.seq, "carol"));

    // bob's read mark: alice sees it, carol does not.
    let bob_conv = bob
        .open(Target::Conversation(group), false)
        .await
        .expect("open");
    bob_conv.mark_read(sent.seq).await.expect("read");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(read_mark(&alice, group, "bob").await, sent.seq);
    assert_eq!(read_mark(&carol, group, "bob").await, 0);
    // Nor his presence; alice still sees it.
    assert_eq!(
        code(&carol.presence("bob").await.expect_err("hidden")),
        Some(ErrorCode::FORBIDDEN)
    );
    assert!(alice.presence("bob").await.is_ok());

    for e in [alice_events, bob_events, carol_events] {
        e.close().await;
    }
    for c in [alice, bob, carol] {
        c.close().await;
    }
    server.stop().await;
}
