//! Tokens from an identity provider: EdDSA, ES256 and RS256 JWTs signed with keys made here,
//! verified by the server with public keys from a JWKS file, a JWKS URL and a PEM file, with
//! `iss`, `aud`, `nbf` and `iat` checked, and a key rotation followed without a restart.

use crate::common::TestServer;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use plover_client::{ClientConfig, ClientError, Connection};
use plover_proto::ErrorCode;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ISSUER: &str = "https://idp.example.test";
const AUDIENCE: &str = "chat-app";

/// A signing key of the identity provider and its public half as a JWK.
struct IdpKey {
    alg: Algorithm,
    kid: Option<String>,
    private: EncodingKey,
    jwk: Value,
}

impl IdpKey {
    fn ed25519(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
        Self {
            alg: Algorithm::EdDSA,
            kid: Some(kid.into()),
            private: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).expect("pem"),
            jwk: json!({
                "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw()),
            }),
        }
    }

    /// A P-256 key and its public key in PEM (no `kid`: a PEM file carries none).
    fn p256() -> (Self, String) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
        let key = Self {
            alg: Algorithm::ES256,
            kid: None,
            private: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("pem"),
            jwk: Value::Null,
        };
        (key, pair.public_key_pem())
    }

    fn rsa(kid: &str) -> Self {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa");
        let pem = private
            .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
            .expect("pem");
        Self {
            alg: Algorithm::RS256,
            kid: Some(kid.into()),
            private: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("pem"),
            jwk: json!({
                "kty": "RSA", "kid": kid, "alg": "RS256",
                "n": URL_SAFE_NO_PAD.encode(private.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(private.e().to_bytes_be()),
            }),
        }
    }

    /// A token with these claims, signed with this key.
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.private).expect("sign")
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The claims a well-behaved identity provider issues for `user`.
fn claims(user: &str) -> Value {
    let now = now();
    json!({"sub": user, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 600})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn write_jwks(path: &Path, keys: &[&IdpKey]) {
    let set = json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() });
    // Written aside and renamed: the server never reads half a document.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, set.to_string()).expect("write jwks");
    std::fs::rename(&tmp, path).expect("rename jwks");
}

async fn connect(server: &TestServer, token: String) -> Result<Connection, ClientError> {
    let config =
        ClientConfig::new(server.addr.to_string(), &server.ca(), token, "phone").expect("config");
    Connection::connect(&config).await
}

async fn refused(server: &TestServer, token: String) -> ErrorCode {
    match connect(server, token).await {
        Ok(conn) => panic!("{} was let in", conn.user()),
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("expected a refusal, got {e}")),
    }
}

#[tokio::test]
async fn an_ed25519_token_from_a_jwks_file_logs_in_and_a_rotated_key_is_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    let first = IdpKey::ed25519("2026-11");
    write_jwks(&jwks, &[&first]);
    let server = TestServer::start_with(|c| {
        c.auth.jwks = Some(jwks.display().to_string());
        c.auth.issuer = Some(ISSUER.into());
        c.auth.audience = vec![AUDIENCE.into()];
    })
    .await;

    let carol = connect(&server, first.sign(&claims("carol")))
        .await
        .expect("a token of the identity provider logs in");
    assert_eq!(carol.user(), "carol");
    carol.close().await;

    // Each claim is checked.
    let refusals = [
        (
            "another issuer",
            with(claims("carol"), "iss", json!("https://evil.test")),
        ),
        (
            "another audience",
            with(claims("carol"), "aud", json!("plover-admin")),
        ),
        (
            "not yet valid",
            with(claims("carol"), "nbf", json!(now() + 3600)),
        ),
        (
            "issued in the future",
            with(claims("carol"), "iat", json!(now() + 3600)),
        ),
        ("no user", with(claims("carol"), "sub", Value::Null)),
        (
            "a user name plover cannot take",
            with(claims("carol"), "sub", json!("carol smith")),
        ),
    ];
    for (what, claims) in refusals {
        assert_eq!(
            refused(&server, first.sign(&claims)).await,
            ErrorCode::TOKEN_INVALID,
            "{what}"
        );
    }
    let expired = with(
        with(claims("carol"), "exp", json!(now() - 60)),
        "iat",
        json!(now() - 700),
    );
    assert_eq!(
        refused(&server, first.sign(&expired)).await,
        ErrorCode::TOKEN_EXPIRED
    );
    // An HS256 token "signed" with the public key (algorithm confusion) is not the
    // identity provider's: it is checked against plover's own secret, and fails.
    let public = URL_SAFE_NO_PAD
        .decode(first.jwk["x"].as_str().expect("x"))
        .expect("x");
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("carol"),
        &EncodingKey::from_secret(&public),
    )
    .expect("sign");
    assert_eq!(refused(&server, confused).await, ErrorCode::TOKEN_INVALID);
    // A key of the same kind that the provider does not publish.
    let stranger = IdpKey::ed25519("2026-11");
    assert_eq!(
        refused(&server, stranger.sign(&claims("carol"))).await,
        ErrorCode::TOKEN_INVALID
    );

    // The provider rotates: the new key's tokens are accepted as soon as the file says so
    // (an unknown kid makes the server read it again), and the old key's no longer.
    let second = IdpKey::ed25519("2026-12");
    write_jwks(&jwks, &[&second]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let dave = loop {
        match connect(&server, second.sign(&claims("dave"))).await {
            Ok(conn) => break conn,
            // A refresh at most every second: the first try may come too soon after the last.
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), Some(ErrorCode::TOKEN_INVALID), "{e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("the rotated key was not followed: {e}"),
        }
    };
    assert_eq!(dave.user(), "dave");
    dave.close().await;
    assert_eq!(
        refused(&server, first.sign(&claims("carol"))).await,
        ErrorCode::TOKEN_INVALID,
        "a key gone from the JWKS"
    );
    // plover's own tokens still work beside the provider's.
    let own = server.connect("erin", "laptop").await;
    assert_eq!(own.user(), "erin");
    own.close().await;
    server.stop().await;
}

#[tokio::test]
async fn es256_from_a_pem_file_and_rs256_from_a_jwks_url_with_another_user_claim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ec, ec_public) = IdpKey::p256();
    let pem = dir.path().join("idp.pem");
    std::fs::write(&pem, ec_public).expect("write pem");
    let rsa = IdpKey::rsa("rsa-1");

    // The JWKS served over HTTP on this machine, counting its requests.
    let http = tiny_http::Server::http("127.0.0.1:0").expect("http");
    let url = format!("http://{}/.well-known/jwks.json", http.server_addr());
    let document = json!({ "keys": [rsa.jwk.clone()] }).to_string();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    std::thread::spawn(move || {
        for request in http.incoming_requests() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = request.respond(tiny_http::Response::from_string(document.clone()));
        }
    });

    let server = TestServer::start_with(|c| {
        c.auth.public_keys = vec![pem.clone()];
        c.auth.jwks = Some(url.clone());
        c.auth.audience = vec![AUDIENCE.into(), "other-app".into()];
        c.auth.user_claim = "preferred_username".into();
    })
    .await;
    assert_eq!(
        served.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "read at start"
    );

    let named = |user: &str| {
        let mut c = claims("idp-subject-7f3a");
        c["preferred_username"] = json!(user);
        c
    };
    let frank = connect(&server, ec.sign(&named("frank")))
        .await
        .expect("ES256 with the PEM key");
    assert_eq!(frank.user(), "frank");
    let grace = connect(&server, rsa.sign(&named("grace")))
        .await
        .expect("RS256 with the JWKS key");
    assert_eq!(grace.user(), "grace");
    // The user is the configured claim, never `sub`.
    assert_eq!(
        refused(&server, rsa.sign(&claims("heidi"))).await,
        ErrorCode::TOKEN_INVALID
    );
    // The other audience is accepted too.
    let ivan = connect(
        &server,
        rsa.sign(&with(named("ivan"), "aud", json!("other-app"))),
    )
    .await
    .expect("a second audience");
    ivan.close().await;
    // An RS256 token naming an unknown kid makes the server fetch the JWKS again, at most
    // once a second however many such tokens come.
    let unknown = IdpKey {
        kid: Some("rsa-unknown".into()),
        ..IdpKey::rsa("rsa-unknown")
    };
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = served.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(
            refused(&server, unknown.sign(&named("mallory"))).await,
            ErrorCode::TOKEN_INVALID
        );
    }
    let fetched = served.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        (1..=2).contains(&fetched),
        "{fetched} fetches for 5 unknown kids"
    );

    frank.close().await;
    grace.close().await;
    server.stop().await;
}
