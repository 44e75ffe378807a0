//! Only members read or send in a conversation; unknown users cannot be written to.

use crate::common::TestServer;
use bytes::Bytes;
use plover_proto::{ErrorCode, Target};

#[tokio::test]
async fn a_non_member_can_neither_read_nor_send() {
    let server = TestServer::start().await;
    server.register("bob").await;
    let alice = server.connect("alice", "d").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    conv.send("private").await.expect("send");
    let id = conv.id();

    let mallory = server.connect("mallory", "d").await;
    let err = mallory
        .open(Target::Conversation(id), false)
        .await
        .expect_err("not a member");
    assert_eq!(err.code(), Some(ErrorCode::NOT_MEMBER));
    // A conversation that does not exist looks the same (ids cannot be probed).
    let err = mallory
        .open(Target::Conversation(id + 1000), false)
        .await
        .expect_err("no such conversation");
    assert_eq!(err.code(), Some(ErrorCode::NOT_MEMBER));
    assert!(mallory.conversations().await.expect("list").is_empty());

    // Sending through the router directly is refused by the conversation's shard as well.
    let rx = server
        .router
        .send(
            id,
            "mallory",
            "d",
            plover_proto::ClientMsgId::random(),
            Bytes::from("x"),
            0,
        )
        .await
        .expect("queued");
    let err = rx.await.expect("answer").expect_err("refused");
    assert_eq!(err.code(), ErrorCode::NOT_MEMBER);
    let err = server
        .router
        .history("mallory", id, None, None, 10)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::NOT_MEMBER);

    // Mallory's connection still works for her own business.
    let err = mallory
        .open(Target::Direct("nobody".into()), true)
        .await
        .expect_err("unknown user");
    assert_eq!(err.code(), Some(ErrorCode::UNKNOWN_USER));
    let err = mallory
        .open(Target::Direct("bob".into()), false)
        .await
        .expect_err("no conversation yet");
    assert_eq!(err.code(), Some(ErrorCode::UNKNOWN_CONVERSATION));
    let err = mallory
        .open(Target::Direct("mallory".into()), true)
        .await
        .expect_err("self");
    assert_eq!(err.code(), Some(ErrorCode::INVALID_REQUEST));
    assert!(mallory.ping().await.is_ok());

    mallory.close().await;
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn history_pages_by_sequence() {
    let server = TestServer::start().await;
    server.register("bob").await;
    let alice = server.connect("alice", "d").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    for i in 1..=25 {
        conv.send(format!("m{i}")).await.expect("send");
    }
    let seqs = |v: &[plover_proto::Message]| v.iter().map(|m| m.seq).collect::<Vec<_>>();
    let (page, more) = conv.history(None, None, 10).await.expect("latest");
    assert_eq!(seqs(&page), (16..=25).collect::<Vec<_>>());
    assert!(more);
    let (page, more) = conv.history(Some(16), None, 10).await.expect("older");
    assert_eq!(seqs(&page), (6..=15).collect::<Vec<_>>());
    assert!(more);
    let (page, more) = conv.history(Some(6), None, 10).await.expect("oldest");
    assert_eq!(seqs(&page), (1..=5).collect::<Vec<_>>());
    assert!(!more);
    let (page, more) = conv.history(None, Some(20), 10).await.expect("newer");
    assert_eq!(seqs(&page), (21..=25).collect::<Vec<_>>());
    assert!(!more);
    let err = conv.history(None, None, 100_000).await.expect_err("limit");
    assert_eq!(err.code(), Some(ErrorCode::INVALID_REQUEST));
    // The stream survives a refused request.
    assert_eq!(conv.history(None, None, 1).await.expect("again").0.len(), 1);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_history_page_of_large_messages_is_cut_to_fit_one_frame() {
    let server = TestServer::start().await;
    server.register("bob").await;
    let alice = server.connect("alice", "d").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    for i in 0..6u8 {
        conv.send(Bytes::from(vec![b'a' + i; 30_000]))
            .await
            .expect("send");
    }
    // Newest first when going back: the page keeps the newest that fit, and says more.
    let (page, more) = conv.history(None, None, 10).await.expect("history");
    assert!(more && page.len() < 6, "{} messages", page.len());
    assert_eq!(page.last().expect("newest").seq, 6);
    // Paging on collects everything, once, in order.
    let mut all = page;
    loop {
        let before = all.first().expect("page").seq;
        let (page, more) = conv.history(Some(before), None, 10).await.expect("history");
        let mut page = page;
        page.extend(all);
        all = page;
        if !more {
            break;
        }
    }
    assert_eq!(
        all.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    // Forward from the start: the oldest that fit.
    let (page, more) = conv.history(None, Some(0), 10).await.expect("history");
    assert!(more && page[0].seq == 1);
    drop(conv);
    alice.close().await;
    server.stop().await;
}
