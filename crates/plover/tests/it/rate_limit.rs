//! A user sending faster than `limits.sends_per_second` gets `limit` errors; other users don't.
use crate::common;

use crate::common::TestServer;
use plover_proto::{ErrorCode, Target};

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

/// A message costs its fan-out: a sender to a large group spends `limits.writes_per_second`
/// a log entry per member, so the group's messages are refused long before the request
/// budget is spent, while a direct message (five writes) still goes.
#[tokio::test]
async fn a_large_group_charges_its_fan_out() {
    let server = TestServer::start_with(|c| c.limits.writes_per_second = 100).await;
    let names: Vec<String> = (0..59).map(|i| format!("member{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    common::users(&server, &refs).await;
    let owner = server.connect("owner", "phone").await;
    // Creating it writes a log entry per member too: 62 of the burst of 200.
    let gid = owner.create_group("big", &names).await.expect("group");
    let g = owner
        .open(Target::Conversation(gid), false)
        .await
        .expect("open");
    let (mut ok, mut limited) = (0, 0);
    for i in 0..5 {
        match g.send(format!("to all {i}")).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::LIMIT), "{e}");
                assert!(e.to_string().contains("writes"), "{e}");
                limited += 1;
            }
        }
    }
    // 200 - 63 (creation) = 137: two messages of 63 writes, then refusals.
    assert_eq!((ok, limited), (2, 3), "fan-out charged");
    // Eleven writes are left: a direct message (five) still goes.
    let direct = owner
        .open(Target::Direct("member0".into()), true)
        .await
        .expect("open");
    direct
        .send("just you")
        .await
        .expect("a direct message fits");
    drop((g, direct));
    owner.close().await;
    server.stop().await;
}

/// A connection past `limits.frames_per_second` is read more slowly, not refused: a burst of
/// twice the rate passes at once, the rest at the rate, and another connection is answered
/// meanwhile.
#[tokio::test]
async fn a_connection_past_its_frame_budget_is_held_back() {
    use plover_proto::{ClientFrame, ServerFrame};
    let server = TestServer::start_with(|c| c.limits.frames_per_second = 100).await;
    let (_ep, _conn, mut send, mut reader) = common::raw_device(&server, "flooder", "raw").await;
    let (_ep2, _conn2, mut bystander, mut answers) =
        common::raw_device(&server, "bystander", "raw").await;
    let pings: Vec<u8> = (0..400u64)
        .flat_map(|nonce| common::encode(&ClientFrame::Ping { nonce }))
        .collect();
    let start = std::time::Instant::now();
    send.write_all(&pings).await.expect("pings");
    // Once the burst is through, the bystander asks, and is answered before the flood is.
    for _ in 0..200 {
        assert!(matches!(
            reader.next::<ServerFrame>().await,
            Ok(Some(ServerFrame::Pong { .. }))
        ));
    }
    bystander
        .write_all(&common::encode(&ClientFrame::Ping { nonce: 7 }))
        .await
        .expect("ping");
    assert!(matches!(
        answers.next::<ServerFrame>().await,
        Ok(Some(ServerFrame::Pong { nonce: 7 }))
    ));
    let bystander_done = start.elapsed();
    let mut last = 0;
    for _ in 0..200 {
        match reader.next::<ServerFrame>().await {
            Ok(Some(ServerFrame::Pong { nonce })) => last = nonce,
            other => panic!("{other:?}"),
        }
    }
    let took = start.elapsed();
    assert_eq!(last, 399, "every ping answered, in order");
    // 200 past the burst at 100 a second.
    assert!(took.as_secs_f64() >= 1.5, "400 pings took {took:?}");
    assert!(
        bystander_done < took,
        "the bystander ({bystander_done:?}) waited for the flood ({took:?})"
    );
    server.stop().await;
}
