//! The command-line forms scripts rely on, run as a user would.

use crate::common::spawn_server;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn plover(dir: &Path, addr: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plover"));
    cmd.args(args)
        .current_dir(dir)
        .env("PLOVER_SERVER", addr)
        .env("PLOVER_CA", dir.join("certs").join("cert.pem"))
        .env_remove("PLOVER_TOKEN")
        .env_remove("PLOVER_DEVICE");
    if let Some(t) = token {
        cmd.env("PLOVER_TOKEN", t);
    }
    cmd.output().expect("run plover")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn token(dir: &Path, user: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", user, "--data", "data"];
    args.extend_from_slice(extra);
    let out = plover(dir, "unused:1", None, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "token prints only the token");
    text.trim().to_owned()
}

#[test]
fn token_prints_one_jwt_and_refuses_bad_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = token(dir.path(), "alice", &[]);
    assert_eq!(t.split('.').count(), 3);
    let out = plover(
        dir.path(),
        "unused:1",
        None,
        &["token", "bad name", "--data", "data"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("user name"), "{}", stderr(&out));
    let out = plover(
        dir.path(),
        "unused:1",
        None,
        &["token", "a", "--ttl", "soon"],
    );
    assert!(!out.status.success());
}

#[tokio::test]
async fn two_people_chat_from_two_terminals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, addr) = spawn_server(dir.path()).await;
    let d = dir.path().to_owned();
    let (alice, bob) = (token(&d, "alice", &[]), token(&d, "bob", &[]));

    // Bob listens (this also makes him known to the server).
    let mut listener = Command::new(env!("CARGO_BIN_EXE_plover"))
        .args(["listen", "--json"])
        .current_dir(&d)
        .env("PLOVER_SERVER", &addr)
        .env("PLOVER_CA", d.join("certs").join("cert.pem"))
        .env("PLOVER_TOKEN", &bob)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("listen");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        listener.stdout.take().expect("stdout"),
    ));

    // Alice sends until Bob's listener has registered him (a user exists from their first
    // connection), then once more.
    let run = |token: &str, args: &[&str]| plover(&d, &addr, Some(token), args);
    let mut first = None;
    for _ in 0..50 {
        let out = run(&alice, &["send", "--to", "bob", "hello bob"]);
        if out.status.success() {
            first = Some(stdout(&out));
            break;
        }
        assert!(stderr(&out).contains("unknown user"), "{}", stderr(&out));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(first.expect("sent").trim(), "sent conversation=1 seq=1");
    let out = run(&alice, &["send", "--to", "bob", "second \"quoted\""]);
    assert_eq!(stdout(&out).trim(), "sent conversation=1 seq=2");

    for (seq, text) in [(1, "hello bob"), (2, "second \"quoted\"")] {
        let line = lines.next().expect("a line").expect("utf-8");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
        assert_eq!(v["type"], "message");
        assert_eq!(v["conversation"], 1);
        assert_eq!(v["seq"], seq);
        assert_eq!(v["from"], "alice");
        assert_eq!(v["text"], text);
        assert!(v["ts"].as_u64().expect("ts") > 1_700_000_000_000);
    }
    let _ = listener.kill();
    let _ = listener.wait();

    let out = run(&bob, &["history", "--with", "alice", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let history: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["seq"], 1);
    assert_eq!(history[1]["text"], "second \"quoted\"");
    let out = run(&bob, &["history", "--with", "alice", "--limit", "1"]);
    assert!(stdout(&out).contains("second"), "{}", stdout(&out));
    assert_eq!(stdout(&out).lines().count(), 1);

    let out = run(&bob, &["conversations", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(v["members"], serde_json::json!(["alice", "bob"]));
    assert_eq!(v["last_seq"], 2);
    assert_eq!(v["unread"], 2);

    // alice was a stranger to bob: her messages are a request, and bob accepts it (without
    // that, she would not see his read mark).
    let out = run(&bob, &["requests"]);
    assert_eq!(stdout(&out).trim(), "request conversation=1 from=alice");
    let out = run(&bob, &["accept", "--with", "alice"]);
    assert_eq!(
        stdout(&out).trim(),
        "accepted conversation=1",
        "{}",
        stderr(&out)
    );

    // Bob reads; alice's listener shows the receipt; unread drops to 0.
    let out = run(&bob, &["read", "--with", "alice"]);
    assert_eq!(
        stdout(&out).trim(),
        "read conversation=1 up_to=2",
        "{}",
        stderr(&out)
    );
    let out = run(&bob, &["conversations", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(v["unread"], 0);
    assert_eq!(v["read"], 2);
    // Alice's listener, from the start of her log, shows bob's receipts as JSON lines.
    let mut listener = Command::new(env!("CARGO_BIN_EXE_plover"))
        .args(["listen", "--json", "--cursor", "0"])
        .current_dir(&d)
        .env("PLOVER_SERVER", &addr)
        .env("PLOVER_CA", d.join("certs").join("cert.pem"))
        .env("PLOVER_TOKEN", &alice)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("listen");
    let lines = std::io::BufRead::lines(std::io::BufReader::new(
        listener.stdout.take().expect("stdout"),
    ));
    let mut read_receipt = None;
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(&line.expect("utf-8")).expect("json");
        if v["type"] == "receipt" && v["read"] == 2 {
            read_receipt = Some(v);
            break;
        }
    }
    let _ = listener.kill();
    let _ = listener.wait();
    let v = read_receipt.expect("a read receipt line");
    assert_eq!(v["conversation"], 1);
    assert_eq!(v["user"], "bob");
    assert_eq!(v["delivered"], 2);

    // Presence: online/last seen for a peer, refused for a stranger.
    let out = run(&alice, &["presence", "bob"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.starts_with("last seen 20") || line.trim() == "online",
        "{line}"
    );
    let carol = token(&d, "carol", &[]);
    let out = run(&carol, &["presence", "bob"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("forbidden"), "{}", stderr(&out));

    // Clear errors and non-zero exits.
    let out = run(&alice, &["send", "--to", "nobody", "hi"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown user"), "{}", stderr(&out));
    let out = run("forged.token.here", &["send", "--to", "bob", "hi"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("token_invalid"), "{}", stderr(&out));
    let expired = token(&d, "alice", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_secs(7));
    let out = run(&expired, &["send", "--to", "bob", "hi"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    let out = run(&bob, &["history", "--with", "carol"]);
    assert!(!out.status.success());
}

#[tokio::test]
async fn groups_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, addr) = spawn_server(dir.path()).await;
    let d = dir.path().to_owned();
    let tokens: Vec<String> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| token(&d, u, &[]))
        .collect();
    let run = |token: &str, args: &[&str]| plover(&d, &addr, Some(token), args);
    // Everyone connects once so they exist.
    for t in &tokens {
        assert!(run(t, &["conversations"]).status.success());
    }
    let (alice, bob, carol) = (&tokens[0], &tokens[1], &tokens[2]);

    let out = run(
        alice,
        &["group", "create", "Weekend", "--members", "bob,carol"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let created = stdout(&out);
    let id = created
        .trim()
        .strip_prefix("conversation=")
        .expect("conversation=<id>")
        .to_owned();

    let out = run(bob, &["send", "--conversation", &id, "hi all"]);
    assert_eq!(stdout(&out).trim(), format!("sent conversation={id} seq=2"));
    let out = run(carol, &["group", "add", &id, "bob"]);
    assert!(!out.status.success(), "carol is no admin");
    assert!(stderr(&out).contains("only admins"), "{}", stderr(&out));
    let out = run(alice, &["group", "remove", &id, "carol"]);
    assert_eq!(stdout(&out).trim(), format!("done conversation={id} seq=3"));
    let out = run(alice, &["send", "--conversation", &id, "without carol"]);
    assert!(out.status.success());

    let out = run(alice, &["group", "members", &id, "--json"]);
    let members: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(members.len(), 2);
    assert_eq!(members[0]["user"], "alice");
    assert_eq!(members[0]["admin"], true);

    let out = run(bob, &["history", "--conversation", &id, "--json"]);
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["type"], "member");
    assert_eq!(lines[0]["action"], "created");
    assert_eq!(lines[0]["title"], "Weekend");
    assert_eq!(lines[1]["from"], "bob");
    assert_eq!(lines[1]["text"], "hi all");
    assert_eq!(lines[2]["action"], "removed");
    assert_eq!(lines[2]["user"], "carol");
    assert_eq!(lines[3]["text"], "without carol");

    // Carol's history ends at her removal; she can no longer read the group.
    let out = run(carol, &["history", "--conversation", &id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a member"), "{}", stderr(&out));

    // Who read alice's message: nobody yet; then bob reads.
    let out = run(alice, &["receipts", "--conversation", &id, "--seq", "4"]);
    assert!(stdout(&out).contains("waiting: bob"), "{}", stdout(&out));
    run(bob, &["read", "--conversation", &id]);
    let out = run(
        alice,
        &["receipts", "--conversation", &id, "--seq", "4", "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(v["read"], serde_json::json!(["bob"]));
    assert_eq!(v["read_by_all"], true);
}

#[tokio::test]
async fn retention_deletion_and_push_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, addr) = spawn_server(dir.path()).await;
    let d = dir.path().to_owned();
    let (alice, bob) = (token(&d, "alice", &[]), token(&d, "bob", &[]));
    let run = |token: &str, args: &[&str]| plover(&d, &addr, Some(token), args);
    assert!(run(&bob, &["conversations"]).status.success());

    let out = run(&alice, &["send", "--to", "bob", "regret"]);
    assert_eq!(stdout(&out).trim(), "sent conversation=1 seq=1");
    let out = run(&alice, &["delete", "--conversation", "1", "--seq", "1"]);
    assert_eq!(
        stdout(&out).trim(),
        "done conversation=1 seq=1",
        "{}",
        stderr(&out)
    );
    let out = run(&bob, &["history", "--with", "alice", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(v["type"], "erased");
    assert_eq!(v["seq"], 1);

    let out = run(&bob, &["retention", "1", "ttl=1h"]);
    assert_eq!(
        stdout(&out).trim(),
        "done conversation=1 seq=2",
        "{}",
        stderr(&out)
    );
    let out = run(&bob, &["retention", "1", "forever"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a retention policy"),
        "{}",
        stderr(&out)
    );
    let out = run(&alice, &["conversations", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(v["retention"], "ttl=1h");

    let out = run(
        &bob,
        &[
            "push",
            "register",
            "--gateway",
            "https://8.8.8.8/",
            "--app-id",
            "app",
            "--pushkey",
            "tok",
        ],
    );
    assert_eq!(stdout(&out).trim(), "registered tok", "{}", stderr(&out));
    // A target inside the server's network is refused, with the reason.
    let out = run(
        &bob,
        &[
            "push",
            "register",
            "--gateway",
            "https://127.0.0.1:9/",
            "--app-id",
            "other",
            "--pushkey",
            "inward",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a public address"),
        "{}",
        stderr(&out)
    );
    let out = run(&bob, &["push", "register", "--endpoint", "not a url"]);
    assert!(!out.status.success());
    let out = run(&bob, &["push", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(v["kind"], "gateway");
    assert_eq!(v["pushkey"], "tok");
    let out = run(&bob, &["push", "unregister", "tok"]);
    assert_eq!(stdout(&out).trim(), "unregistered tok");
    assert!(stdout(&run(&bob, &["push", "list"])).is_empty());
}

#[test]
fn push_vapid_key_prints_the_same_public_key_each_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = || {
        let out = Command::new(env!("CARGO_BIN_EXE_plover"))
            .args(["push", "vapid-key", "--data"])
            .arg(dir.path().join("data"))
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    };
    let first = key();
    // An uncompressed P-256 point, base64url without padding.
    assert_eq!(first.len(), 87, "{first}");
    assert!(first.starts_with('B'), "{first}");
    assert_eq!(key(), first, "kept in the data directory");
}
