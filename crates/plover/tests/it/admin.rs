//! The operator's channel, through the real CLI beside a live server: `plover token revoke`
//! closes a user's connections and refuses their tokens; `plover admin` lists users and
//! devices, disconnects, removes a device, and deletes an account's traces.

use crate::common::{TestServer, cli_stdout, close_code, raw_device, run_cli};
use plover_client::{ClientConfig, Connection};
use plover_proto::{ErrorCode, Target};
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

/// Runs the CLI against the server's data directory.
async fn plover(server: &TestServer, args: &[&str]) -> Output {
    let data: PathBuf = server.dir.path().join("data");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_plover"));
    cmd.args(args).arg("--data").arg(&data);
    run_cli(cmd).await
}

async fn refused_code(server: &TestServer, token: String, device: &str) -> Option<ErrorCode> {
    let config =
        ClientConfig::new(server.addr.to_string(), &server.ca(), token, device).expect("config");
    match Connection::connect(&config).await {
        Ok(conn) => {
            conn.close().await;
            None
        }
        Err(e) => e.code(),
    }
}

/// Waits until the wall clock is in a later second than now: tokens are dated to the
/// second, and a revocation covers its own second.
async fn next_second() {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    };
    let start = now();
    while now() == start {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_and_its_live_connections_close_within_a_second() {
    let server = TestServer::start().await;
    let old = server.token("bob");
    let (_e1, phone, _s1, _r1) = raw_device(&server, "bob", "phone").await;
    let (_e2, laptop, _s2, _r2) = raw_device(&server, "bob", "laptop").await;

    // Only the phone's tokens first: the laptop stays.
    let started = Instant::now();
    let out = cli_stdout(&plover(&server, &["token", "revoke", "bob", "--device", "phone"]).await);
    assert!(out.starts_with("revoked bob/phone at="), "{out}");
    assert!(out.trim_end().ends_with("closed=1"), "{out}");
    assert_eq!(close_code(&phone).await, ErrorCode::TOKEN_REVOKED.0);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        laptop.close_reason().is_none(),
        "the laptop was not revoked"
    );
    assert_eq!(
        refused_code(&server, old.clone(), "phone").await,
        Some(ErrorCode::TOKEN_REVOKED)
    );
    assert_eq!(refused_code(&server, old.clone(), "tablet").await, None);

    // Then every token of bob's.
    let out = cli_stdout(&plover(&server, &["token", "revoke", "bob"]).await);
    assert!(out.trim_end().ends_with("closed=1"), "{out}");
    assert_eq!(close_code(&laptop).await, ErrorCode::TOKEN_REVOKED.0);
    assert_eq!(
        refused_code(&server, old, "laptop").await,
        Some(ErrorCode::TOKEN_REVOKED)
    );
    // A token issued after the revocation works.
    next_second().await;
    assert_eq!(
        refused_code(&server, server.token("bob"), "laptop").await,
        None
    );
    // Nobody unknown can be revoked by mistake.
    let unknown = plover(&server, &["token", "revoke", "nobody"]).await;
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no user \"nobody\""),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lists_users_and_devices_disconnects_and_removes_a_device() {
    // A pusher on this machine (nothing is sent to it: alice gets no message).
    let server = TestServer::start_with(|c| c.push.allow_private_targets = true).await;
    let alice = server.connect("alice", "phone").await;
    let (_e, laptop, _s, _r) = raw_device(&server, "alice", "laptop").await;
    server.register("bob").await;
    alice
        .register_pusher(plover_proto::Pusher::Gateway {
            url: "http://127.0.0.1:9".into(),
            app_id: "com.example.chat".into(),
            pushkey: "phone-key".into(),
        })
        .await
        .expect("pusher");

    let users = cli_stdout(&plover(&server, &["admin", "users"]).await);
    let alice_line = users
        .lines()
        .find(|l| l.starts_with("alice "))
        .expect("alice");
    assert!(alice_line.contains("online=true"), "{users}");
    assert!(
        users
            .lines()
            .any(|l| l.starts_with("bob ") && l.contains("online=false")),
        "{users}"
    );
    let json = cli_stdout(&plover(&server, &["admin", "users", "--json"]).await);
    let first: serde_json::Value =
        serde_json::from_str(json.lines().next().expect("a line")).expect("json");
    assert_eq!(first["user"], "alice");

    let devices = cli_stdout(&plover(&server, &["admin", "devices", "alice"]).await);
    assert!(
        devices.contains("phone cursor=") && devices.contains("laptop cursor="),
        "{devices}"
    );
    assert!(
        devices.lines().all(|l| l.ends_with("connected=true")),
        "{devices}"
    );

    // Disconnect one device: it may reconnect.
    let out = cli_stdout(
        &plover(
            &server,
            &["admin", "disconnect", "alice", "--device", "laptop"],
        )
        .await,
    );
    assert_eq!(out.trim(), "disconnected alice closed=1");
    assert_eq!(close_code(&laptop).await, ErrorCode::DISCONNECTED.0);
    assert!(
        alice.presence("alice").await.is_ok(),
        "the phone is still connected"
    );

    // Remove the phone: its connection closes and its pusher goes.
    let out = cli_stdout(&plover(&server, &["admin", "remove-device", "alice", "phone"]).await);
    assert_eq!(out.trim(), "removed alice/phone closed=1 pushers_removed=1");
    let again = server.connect("alice", "tablet").await;
    assert!(again.pushers().await.expect("pushers").is_empty());
    again.close().await;
    // Bad names are a clear error and a non-zero exit.
    let bad = plover(&server, &["admin", "devices", "no body"]).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a user name"));
    // The audit log has each action with who and when.
    let audit = std::fs::read_to_string(server.dir.path().join("data").join("admin.log"))
        .expect("audit log");
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(lines.len() >= 6, "{audit}");
    let removal = lines
        .iter()
        .find(|l| l["request"]["op"] == "remove-device")
        .expect("the removal");
    assert_eq!(removal["outcome"], "done");
    assert!(removal["uid"].is_u64() && removal["at_ms"].as_u64() > Some(0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_leaves_no_body_of_theirs_in_any_history() {
    let server = TestServer::start().await;
    server.contacts("alice", "bob").await;
    server.contacts("alice", "carol").await;
    let alice = server.connect("alice", "phone").await;
    let direct = alice
        .open(Target::Direct("bob".into()), false)
        .await
        .expect("open");
    for text in ["one", "two"] {
        direct.send(text).await.expect("send");
    }
    let group = alice
        .create_group("Club", &["bob".into(), "carol".into()])
        .await
        .expect("group");
    let in_group = alice
        .open(Target::Conversation(group), false)
        .await
        .expect("open");
    in_group.send("alice in the group").await.expect("send");
    let bob = server.connect("bob", "phone").await;
    let bob_direct = bob
        .open(Target::Direct("alice".into()), false)
        .await
        .expect("open");
    bob_direct.send("bob's reply").await.expect("send");
    drop((direct, in_group));
    let old = server.token("alice");

    let out = cli_stdout(&plover(&server, &["admin", "delete-user", "alice"]).await);
    assert!(
        out.starts_with("deleted alice closed=1 groups_left=1 bodies_erased=3"),
        "{out}"
    );

    // No body of alice's anywhere; bob's stays; seqs stay gapless (tombstones).
    let store = server.router.store().clone();
    for conv in [bob_direct.id(), group] {
        let messages = store.messages_from(conv, 1, 1000).expect("read");
        let last = store.last_seq(conv).expect("last");
        assert_eq!(messages.len() as u64, last, "gapless");
        for m in &messages {
            if m.from == "alice" {
                assert!(m.body.is_empty(), "a body of alice's in {conv}: {m:?}");
            }
        }
    }
    let history = bob_direct.history(None, None, 50).await.expect("history").0;
    assert!(
        history
            .iter()
            .any(|m| m.from == "bob" && &m.body[..] == b"bob's reply")
    );
    // She left the group; her account's records are gone; her tokens are refused.
    let record = store.conversation(group).expect("read").expect("group");
    assert!(!record.is_member("alice"));
    assert!(!store.user_exists("alice").expect("read"));
    assert!(store.devices_of("alice").expect("read").is_empty());
    assert_eq!(store.log_head("alice").expect("head"), 0);
    let users = cli_stdout(&plover(&server, &["admin", "users"]).await);
    assert!(!users.contains("alice"), "{users}");
    assert_eq!(
        refused_code(&server, old, "phone").await,
        Some(ErrorCode::TOKEN_REVOKED)
    );
    bob.close().await;
    alice.close().await;
    server.stop().await;
}
