//! Presence: visible to conversation peers only, pushed live and debounced, last seen after a
//! clean close, after a killed client, and across a restart.

use crate::common::{TestServer, next_incoming};
use plover_client::{EventStream, Incoming};
use plover_proto::{ErrorCode, Target};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

async fn befriend(server: &TestServer, a: &str, b: &str) {
    server.register(b).await;
    let conn = server.connect(a, "setup").await;
    let conv = conn
        .open(Target::Direct(b.into()), true)
        .await
        .expect("open");
    conn.close().await;
    // b accepts: strangers see nothing of each other (`safety.rs`).
    server.router.accept(b, conv.id()).await.expect("accept");
}

/// The next presence item for `user` within five seconds.
async fn next_presence(events: &mut EventStream, user: &str) -> (bool, u64) {
    loop {
        if let Incoming::Presence {
            user: u,
            online,
            last_seen,
        } = next_incoming(events).await
            && u == user
        {
            return (online, last_seen);
        }
    }
}

#[tokio::test]
async fn peers_see_presence_and_strangers_do_not() {
    let server = TestServer::start_with(|c| c.presence.debounce = Duration::from_millis(200)).await;
    befriend(&server, "alice", "bob").await;
    let alice = server.connect("alice", "phone").await;
    let mallory = server.connect("mallory", "phone").await;

    let bob = server.connect("bob", "phone").await;
    assert_eq!(alice.presence("bob").await.expect("peer"), (true, 0));
    for who in ["bob", "nobody"] {
        let err = mallory.presence(who).await.expect_err("stranger");
        assert_eq!(err.code(), Some(ErrorCode::FORBIDDEN), "{who}");
    }

    let before = now_ms();
    bob.close().await;
    // Gone at once (last_seen is recorded at the close), whatever the debounce.
    let (online, last_seen) = alice.presence("bob").await.expect("peer");
    assert!(!online);
    assert!(last_seen >= before && last_seen <= now_ms(), "{last_seen}");
    alice.close().await;
    mallory.close().await;
    server.stop().await;
}

#[tokio::test]
async fn changes_are_pushed_live_and_a_flapping_connection_does_not_flood() {
    let server = TestServer::start_with(|c| c.presence.debounce = Duration::from_millis(500)).await;
    befriend(&server, "alice", "bob").await;
    // Let the setup connections' offline notices pass.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut alice = EventStream::start(server.config("alice", "phone"), None);
    assert!(alice.synced().await);

    let bob = server.connect("bob", "phone").await;
    assert_eq!(next_presence(&mut alice, "bob").await, (true, 0));
    // Five quick reconnects while one connection stays: nothing to tell.
    for _ in 0..5 {
        server.connect("bob", "laptop").await.close().await;
    }
    bob.close().await;
    // Now bob flaps with no connection in between for less than the debounce...
    for _ in 0..3 {
        server.connect("bob", "phone").await.close().await;
    }
    // ...and then stays away: one offline notice.
    let (online, last_seen) = next_presence(&mut alice, "bob").await;
    assert!(!online && last_seen > 0);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1200);
    while let Ok(Some(item)) = tokio::time::timeout_at(deadline, alice.next()).await {
        if let Ok(Incoming::Presence { user, .. }) = item {
            panic!("presence of {user} flooded");
        }
    }
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_killed_client_is_seen_gone_within_the_idle_timeout_and_last_seen_survives_restart() {
    let server = TestServer::start_with(|c| {
        c.transport.idle_timeout = Duration::from_secs(1);
        c.transport.heartbeat = Duration::from_millis(300);
        c.presence.debounce = Duration::from_millis(100);
    })
    .await;
    befriend(&server, "alice", "bob").await;
    let alice = server.connect("alice", "phone").await;

    let mut listener = std::process::Command::new(env!("CARGO_BIN_EXE_plover"))
        .arg("listen")
        .env("PLOVER_SERVER", server.addr.to_string())
        .env("PLOVER_CA", server.ca())
        .env("PLOVER_TOKEN", server.token("bob"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("listen");
    let mut online = false;
    for _ in 0..100 {
        if alice.presence("bob").await.expect("peer").0 {
            online = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(online, "bob's listener came online");
    // Stays online on heartbeats alone, well past the idle timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        alice.presence("bob").await.expect("peer").0,
        "heartbeats keep it alive"
    );

    listener.kill().expect("SIGKILL");
    listener.wait().expect("reaped");
    let killed = now_ms();
    let mut seen = None;
    for _ in 0..60 {
        let (online, last_seen) = alice.presence("bob").await.expect("peer");
        if !online {
            seen = Some(last_seen);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last_seen = seen.expect("bob seen gone within the idle timeout");
    assert!(
        last_seen >= killed && last_seen <= killed + 3000,
        "{last_seen} vs {killed}"
    );
    alice.close().await;

    let server = server.restart().await;
    let alice = server.connect("alice", "phone").await;
    assert_eq!(
        alice.presence("bob").await.expect("peer"),
        (false, last_seen)
    );
    alice.close().await;
    server.stop().await;
}
