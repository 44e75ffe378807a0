//! Certificates, graceful shutdown, and clients that ride through a restart.
use crate::common;

use crate::common::{TestServer, next_event, text};
use plover_client::{ClientConfig, Connection, EventStream};
use plover_proto::{ErrorCode, Target};
use std::time::Duration;

#[tokio::test]
async fn the_dev_certificate_is_generated_once_and_reused() {
    let server = TestServer::start().await;
    let pem = std::fs::read(server.ca()).expect("cert written");
    let server = server.restart().await;
    assert_eq!(
        std::fs::read(server.ca()).expect("cert"),
        pem,
        "same certificate"
    );
    server.connect("alice", "d").await.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_configured_certificate_is_used_as_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let generated =
        rcgen::generate_simple_self_signed(vec!["chat.example".to_owned()]).expect("cert");
    let cert = dir.path().join("chain.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, generated.cert.pem()).expect("write");
    std::fs::write(&key, generated.signing_key.serialize_pem()).expect("write");
    let (c, k) = (cert.clone(), key.clone());
    let server = TestServer::start_with(move |config| {
        config.tls.cert = Some(c);
        config.tls.key = Some(k);
    })
    .await;
    assert!(
        !server.ca().exists(),
        "no dev certificate when one is configured"
    );

    let mut config =
        ClientConfig::new(server.addr.to_string(), &cert, server.token("alice"), "d").expect("cfg");
    config.server_name = Some("chat.example".into());
    Connection::connect(&config)
        .await
        .expect("connects with the configured name")
        .close()
        .await;
    // The name is checked: the certificate is not for "localhost".
    config.server_name = Some("localhost".into());
    let err = Connection::connect(&config).await.expect_err("wrong name");
    assert!(
        err.code().is_none(),
        "a TLS failure, not a plover refusal: {err}"
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connections_with_the_shutdown_code() {
    let server = TestServer::start().await;
    let alice = server.connect("alice", "d").await;
    server.stop().await;
    let err = alice.ping().await.expect_err("server gone");
    assert_eq!(err.code(), Some(ErrorCode::SHUTDOWN), "{err}");
}

#[tokio::test]
async fn an_event_stream_rides_through_a_restart_without_gap_or_duplicate() {
    let server = TestServer::start().await;
    server.register("alice").await;
    let mut bob = EventStream::start(server.config("bob", "phone"), None);
    assert!(bob.synced().await);
    let alice = server.connect("alice", "d").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    conv.send("before").await.expect("send");
    assert_eq!(text(&next_event(&mut bob).await), "before");
    drop(conv);
    alice.close().await;

    let server = server.restart().await;
    let alice = server.connect("alice", "d").await;
    let conv = alice
        .open(Target::Direct("bob".into()), false)
        .await
        .expect("open");
    for t in ["after 1", "after 2"] {
        conv.send(t).await.expect("send");
    }
    // Bob's stream reconnects on its own and resumes after "before".
    for t in ["after 1", "after 2"] {
        assert_eq!(text(&next_event(&mut bob).await), t);
    }
    common::assert_quiet(&mut bob, Duration::from_millis(300)).await;
    assert_eq!(bob.cursor(), 3);
    bob.close().await;
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn with_retry_always_on_clients_still_connect_after_validating_their_address() {
    // retry_above = 0: every new address must answer a QUIC Retry first.
    let server = TestServer::start_with(|c| c.transport.retry_above = 0).await;
    for i in 0..5 {
        let conn = server.connect(&format!("u{i}"), "d").await;
        assert!(conn.ping().await.is_ok());
        conn.close().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_spawned_server_stops_cleanly_when_its_parent_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = common::spawn_server(dir.path()).await;
    let keys = plover_server::auth::TokenKeys::new(
        &plover_server::auth::load_or_create_secret(&dir.path().join("data")).expect("secret"),
    );
    let alice = Connection::connect(&common::spawned_client(
        dir.path(),
        &addr,
        &keys,
        "alice",
        "d",
    ))
    .await
    .expect("connect");
    // What a parent's death does to the pipe: its end closes.
    drop(child.stdin.take());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the server stops")
        .expect("its status");
    assert!(status.success(), "{status}");
    // A clean stop: connections were closed with the shutdown code.
    let err = alice.ping().await.expect_err("server gone");
    assert_eq!(err.code(), Some(ErrorCode::SHUTDOWN), "{err}");
}
