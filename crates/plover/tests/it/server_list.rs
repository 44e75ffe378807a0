//! A client given several servers (a cluster's seed list) tries each in turn.

use crate::common::TestServer;
use crate::common::nats::free_port;
use plover_client::{ClientConfig, ClientError, Connection};
// The server runs in this test's runtime: the CLI must be awaited, not waited for.
use std::time::{Duration, Instant};
use tokio::process::Command;

/// A UDP port on loopback that nobody serves: a dead seed.
fn dead() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    drop(socket);
    addr.to_string()
}

fn config(server: &TestServer, list: String, user: &str) -> ClientConfig {
    let mut config =
        ClientConfig::new(list, &server.ca(), server.token(user), "phone").expect("config");
    config.connect_timeout = Duration::from_secs(1);
    config
}

#[tokio::test]
async fn the_sdk_skips_dead_servers_and_stops_at_a_refusal() {
    let server = TestServer::start().await;
    let live = server.addr.to_string();

    // A dead seed first: the live one takes the connection.
    let conn = Connection::connect(&config(&server, format!("{},{live}", dead()), "alice"))
        .await
        .expect("the second server answers");
    assert_eq!(conn.welcome().user, "alice");
    conn.close().await;

    // All dead: one error naming each attempt.
    let (a, b) = (dead(), dead());
    let e = Connection::connect(&config(&server, format!("{a}, {b}"), "alice"))
        .await
        .expect_err("nobody answers");
    let ClientError::NoServer(attempts) = &e else {
        panic!("expected NoServer, got {e}");
    };
    assert_eq!(
        attempts.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        [a.as_str(), b.as_str()]
    );
    assert!(
        e.to_string().contains(&a) && e.to_string().contains(&b),
        "{e}"
    );

    // A refusal of the client is the same everywhere: no second try.
    let mut bad = config(&server, format!("{live},{}", dead()), "alice");
    bad.token = "not a token".into();
    let started = Instant::now();
    let e = Connection::connect(&bad).await.expect_err("refused");
    assert!(matches!(e, ClientError::Refused { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the dead seed was not tried"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_cli_takes_a_list_of_servers() {
    let server = TestServer::start().await;
    server.register("bob").await;
    let out = Command::new(env!("CARGO_BIN_EXE_plover"))
        .args(["send", "--to", "bob", "over the second seed"])
        .env(
            "PLOVER_SERVER",
            format!("127.0.0.1:{},{}", free_port(), server.addr),
        )
        .env("PLOVER_CA", server.ca())
        .env("PLOVER_TOKEN", server.token("alice"))
        .env_remove("PLOVER_DEVICE")
        .output()
        .await
        .expect("plover send");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sent "));
    server.stop().await;
}
