//! A user sending faster than `limits.sends_per_second` gets `limit` errors; other users don't.
mod common;

use common::TestServer;
use plover::framing::{ErrorCode, Target};

#[tokio::test]
async fn sends_past_the_per_user_rate_are_refused_with_limit() {
    let server = TestServer::start_with(|c| c.limits.sends_per_second = 5).await;
    server.register("bob").await;
    server.register("carol").await;
    let alice = server.connect("alice", "phone").await;
    let laptop = server.connect("alice", "laptop").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    let other = laptop
        .open(Target::Direct("carol".into()), true)
        .await
        .expect("open");
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..20 {
        // Alternate devices: the budget is the user's, not the connection's.
        let c = if i % 2 == 0 { &conv } else { &other };
        match c.send(format!("m{i}")).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::LIMIT), "{e}");
                assert!(e.to_string().contains("slow down"), "{e}");
                limited += 1;
            }
        }
    }
    // A burst of twice the rate passes, less the two new direct conversations (writes too).
    assert!(
        (8..=10).contains(&ok),
        "a burst of twice the rate passes: {ok}"
    );
    assert_eq!(ok + limited, 20);
    // Someone else is not affected.
    let bob = server.connect("bob", "d").await;
    bob.open(Target::Direct("alice".into()), false)
        .await
        .expect("open")
        .send("fine")
        .await
        .expect("bob's budget is his own");
    bob.close().await;
    drop((conv, other));
    alice.close().await;
    laptop.close().await;
    server.stop().await;
}

#[tokio::test]
async fn creating_groups_past_the_rate_is_refused_with_limit_too() {
    let server = TestServer::start_with(|c| c.limits.sends_per_second = 3).await;
    server.register("bob").await;
    let alice = server.connect("alice", "phone").await;
    let mut created = 0;
    let mut limited = 0;
    for i in 0..12 {
        match alice.create_group(&format!("g{i}"), &["bob".into()]).await {
            Ok(_) => created += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::LIMIT), "{e}");
                assert!(e.to_string().contains("creating groups"), "{e}");
                limited += 1;
            }
        }
    }
    // The burst (twice the rate) passes, then the budget holds; a little refills meanwhile.
    assert!((6..=8).contains(&created), "created {created}");
    assert_eq!(created + limited, 12);
    alice.close().await;
    server.stop().await;
}
