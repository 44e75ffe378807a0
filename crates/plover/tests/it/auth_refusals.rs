//! Missing, expired, forged, malformed and wrong-device tokens are refused with a typed code
//! and the connection is closed.

use crate::common::TestServer;
use plover_client::{ClientConfig, Connection};
use plover_proto::ErrorCode;
use plover_server::auth::{AUDIENCE, Claims, TokenKeys};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

async fn refused_with(server: &TestServer, token: String, device: &str) -> ErrorCode {
    let config =
        ClientConfig::new(server.addr.to_string(), &server.ca(), token, device).expect("config");
    let err = Connection::connect(&config)
        .await
        .expect_err("must be refused");
    err.code()
        .unwrap_or_else(|| panic!("expected a refusal, got {err}"))
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_codes() {
    let server = TestServer::start().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();

    assert_eq!(
        refused_with(&server, String::new(), "d").await,
        ErrorCode::TOKEN_MISSING
    );

    let expired = server
        .keys
        .sign(&Claims {
            sub: "alice".into(),
            aud: AUDIENCE.into(),
            iat: now - 7200,
            exp: now - 3600,
            dev: None,
        })
        .expect("sign");
    assert_eq!(
        refused_with(&server, expired, "d").await,
        ErrorCode::TOKEN_EXPIRED
    );

    let forged = TokenKeys::new(b"some other server's secret key!!")
        .mint("alice", None, Duration::from_secs(60))
        .expect("mint");
    assert_eq!(
        refused_with(&server, forged, "d").await,
        ErrorCode::TOKEN_INVALID
    );

    assert_eq!(
        refused_with(&server, "not.a.jwt".into(), "d").await,
        ErrorCode::TOKEN_INVALID
    );

    let none_alg = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.\
                    eyJzdWIiOiJhbGljZSIsImF1ZCI6InBsb3ZlciIsImV4cCI6OTk5OTk5OTk5OX0.";
    assert_eq!(
        refused_with(&server, none_alg.into(), "d").await,
        ErrorCode::TOKEN_INVALID
    );

    let pinned = server
        .keys
        .mint("alice", Some("phone"), Duration::from_secs(60))
        .expect("mint");
    assert_eq!(
        refused_with(&server, pinned, "laptop").await,
        ErrorCode::TOKEN_INVALID
    );

    // None of these created the user.
    let store = server.router.store().clone();
    assert!(!store.user_exists("alice").expect("read"));

    // A good token still works.
    let ok = server.connect("alice", "phone").await;
    assert_eq!(ok.user(), "alice");
    ok.close().await;
    assert!(store.user_exists("alice").expect("read"));
    server.stop().await;
}
