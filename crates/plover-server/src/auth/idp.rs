//! Tokens from an identity provider: EdDSA (Ed25519), ES256 and RS256 JWTs, verified with
//! public keys from PEM files or a JWKS document (a file, or an https URL), with `iss` and
//! `aud` checked against `[auth]`, `exp` and `nbf` honoured and an `iat` in the future
//! refused. The claim that names the user is `[auth] user_claim` (default `sub`).
//!
//! A JWKS document is read at start, again every `jwks_refresh`, and at once (at most every
//! [`FORCED_REFRESH_GAP`]) when a token names a `kid` it does not hold: an identity provider
//! that rotates its keys is followed without a restart.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation, errors::ErrorKind};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{info, warn};

use super::{AuthError, Verified, now_secs, valid_name};
use crate::config::AuthConfig;

/// The algorithms an identity provider's tokens may use.
pub const ACCEPTED: [Algorithm; 3] = [Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256];

/// The least time between two refreshes a token with an unknown `kid` causes: a stream of
/// made-up `kid`s costs the identity provider one request per this, not one per token.
pub const FORCED_REFRESH_GAP: Duration = Duration::from_secs(1);

/// How long a JWKS download may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest JWKS document read (a provider's has a few keys: a few kB).
const MAX_JWKS: u64 = 1024 * 1024;

/// Seconds of slack for clocks that disagree (`exp`, `nbf`, `iat`).
const LEEWAY: u64 = 5;

/// One public key and the algorithm it verifies.
#[derive(Clone)]
struct Key {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

/// Where a JWKS document comes from.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Url(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Url(u) => f.write_str(u),
        }
    }
}

/// A JWKS document and when it was last read.
struct Jwks {
    source: Source,
    refresh: Duration,
    keys: RwLock<Arc<Vec<Key>>>,
    /// When the last refresh was started (on time or forced).
    last: Mutex<Instant>,
    /// A timed refresh is under way.
    running: AtomicBool,
}

/// The identity provider's keys and the checks its tokens pass.
pub struct Idp {
    issuer: Option<String>,
    audience: Vec<String>,
    user_claim: String,
    pem: Vec<Key>,
    jwks: Option<Arc<Jwks>>,
}

impl std::fmt::Debug for Idp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idp")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("user_claim", &self.user_claim)
            .field("pem_keys", &self.pem.len())
            .field("jwks", &self.jwks.as_ref().map(|j| j.source.to_string()))
            .finish()
    }
}

fn config_error(what: impl Into<String>, message: impl std::fmt::Display) -> AuthError {
    AuthError::Secret {
        path: PathBuf::from(what.into()),
        message: message.to_string(),
    }
}

impl Idp {
    /// The identity provider `[auth]` describes, or `None` when it names no public key and
    /// no JWKS (plover's own HS256 tokens only). Reads the PEM files and the JWKS document
    /// now: a file that cannot be read stops the server; a URL that cannot be fetched is
    /// only logged (the next refresh tries again), so that an identity provider down at
    /// that moment does not keep plover down.
    pub fn open(config: &AuthConfig) -> Result<Option<Self>, AuthError> {
        if config.public_keys.is_empty() && config.jwks.is_none() {
            return Ok(None);
        }
        let mut pem = Vec::new();
        for path in &config.public_keys {
            let text =
                std::fs::read(path).map_err(|e| config_error(path.display().to_string(), e))?;
            pem.push(pem_key(&text).map_err(|e| config_error(path.display().to_string(), e))?);
        }
        let jwks = match &config.jwks {
            None => None,
            Some(location) => {
                let source = source(location)?;
                let keys = match fetch(&source) {
                    Ok(keys) => keys,
                    Err(e) if matches!(source, Source::File(_)) => {
                        return Err(config_error(source.to_string(), e));
                    }
                    Err(e) => {
                        warn!(jwks = %source, error = %e, "cannot fetch the JWKS; tokens it signs are refused until a refresh succeeds");
                        Vec::new()
                    }
                };
                info!(jwks = %source, keys = keys.len(), "identity provider keys loaded");
                Some(Arc::new(Jwks {
                    source,
                    refresh: config.jwks_refresh.max(FORCED_REFRESH_GAP),
                    keys: RwLock::new(Arc::new(keys)),
                    last: Mutex::new(Instant::now()),
                    running: AtomicBool::new(false),
                }))
            }
        };
        if !valid_claim(&config.user_claim) {
            return Err(config_error(
                "<config auth.user_claim>",
                "must name a claim: 1-64 characters of A-Z a-z 0-9 . _ - :",
            ));
        }
        Ok(Some(Self {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            user_claim: config.user_claim.clone(),
            pem,
            jwks,
        }))
    }

    /// Verifies an identity provider's token whose header is `header`, presented by
    /// `device`.
    pub async fn verify(
        &self,
        token: &str,
        header: &Header,
        device: &str,
    ) -> Result<Verified, AuthError> {
        if !ACCEPTED.contains(&header.alg) {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted (EdDSA, ES256, RS256 from the identity \
                 provider; HS256 from plover)",
                header.alg
            )));
        }
        self.refresh_if_due();
        let mut keys = self.candidates(header);
        if keys.is_empty()
            && header.kid.is_some()
            && let Some(jwks) = &self.jwks
        {
            // A key the provider may have added since the last refresh.
            if refresh_now(jwks).await {
                keys = self.candidates(header);
            }
        }
        if keys.is_empty() {
            return Err(AuthError::Invalid(match &header.kid {
                Some(kid) => format!("no {:?} key with kid {kid:?}", header.alg),
                None => format!("no {:?} key to verify the token with", header.alg),
            }));
        }
        let validation = self.validation(header.alg);
        let mut last = AuthError::Invalid("no key verified the token".into());
        for key in keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return self.claims(data.claims, device),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        _ => AuthError::Invalid(e.to_string()),
                    };
                    // Only a bad signature is worth the next key; a bad claim is bad for all.
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.set_audience(&self.audience);
        let mut required = vec!["exp", "aud"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY;
        validation
    }

    /// The user, device pin and issue time of verified claims.
    fn claims(&self, claims: Map<String, Value>, device: &str) -> Result<Verified, AuthError> {
        let issued = match claims.get("iat") {
            None => 0,
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .ok_or_else(|| AuthError::Invalid("iat is not a time".into()))?,
        };
        if issued > now_secs().saturating_add(LEEWAY) {
            return Err(AuthError::Invalid(
                "the token is issued in the future (iat)".into(),
            ));
        }
        let user = claims
            .get(&self.user_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| {
                AuthError::Invalid(format!("the token has no {:?} claim", self.user_claim))
            })?;
        if !valid_name(user) {
            return Err(AuthError::Invalid(format!(
                "the {:?} claim is not a plover user name (1-64 characters of A-Z a-z 0-9 . _ -)",
                self.user_claim
            )));
        }
        let pinned = match claims.get("dev") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(_) => return Err(AuthError::Invalid("dev is not a device name".into())),
        };
        super::check_device(pinned.as_deref(), device)?;
        Ok(Verified {
            user: user.to_owned(),
            issued,
        })
    }

    /// The keys that may have signed a token with this header: the JWKS key with its `kid`,
    /// or, without one, every key of its algorithm.
    fn candidates(&self, header: &Header) -> Vec<Key> {
        let jwks = self
            .jwks
            .as_ref()
            .map(|j| j.keys.read().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default();
        let all = self.pem.iter().chain(jwks.iter());
        match &header.kid {
            Some(kid) => all
                .filter(|k| k.alg == header.alg && k.kid.as_deref() == Some(kid))
                .cloned()
                .collect(),
            None => all.filter(|k| k.alg == header.alg).cloned().collect(),
        }
    }

    /// Starts a refresh in the background when `jwks_refresh` passed since the last.
    fn refresh_if_due(&self) {
        let Some(jwks) = &self.jwks else { return };
        let due = jwks
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            >= jwks.refresh;
        if due && !jwks.running.swap(true, Ordering::AcqRel) {
            let jwks = jwks.clone();
            tokio::spawn(async move {
                refresh_now(&jwks).await;
                jwks.running.store(false, Ordering::Release);
            });
        }
    }
}

/// Reads the JWKS again unless that was done less than [`FORCED_REFRESH_GAP`] ago. Returns
/// whether it read it.
async fn refresh_now(jwks: &Arc<Jwks>) -> bool {
    {
        let mut last = jwks.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < FORCED_REFRESH_GAP {
            return false;
        }
        *last = Instant::now();
    }
    let source = jwks.source.clone();
    match tokio::task::spawn_blocking(move || fetch(&source)).await {
        Ok(Ok(keys)) => {
            info!(jwks = %jwks.source, keys = keys.len(), "identity provider keys refreshed");
            *jwks.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
            true
        }
        Ok(Err(e)) => {
            warn!(jwks = %jwks.source, error = %e, "cannot refresh the JWKS; the keys held stay");
            false
        }
        Err(_) => false,
    }
}

fn source(location: &str) -> Result<Source, AuthError> {
    if location.starts_with("https://") {
        return Ok(Source::Url(location.to_owned()));
    }
    if let Some(rest) = location.strip_prefix("http://") {
        // Plain HTTP only to this machine (a sidecar, a test): keys fetched over a network
        // in the clear could be anyone's.
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        if matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            return Ok(Source::Url(location.to_owned()));
        }
        return Err(config_error(
            "<config auth.jwks>",
            "a JWKS URL must be https (http only to 127.0.0.1, localhost or [::1])",
        ));
    }
    Ok(Source::File(PathBuf::from(location)))
}

/// Reads and parses a JWKS document. Blocking.
fn fetch(source: &Source) -> Result<Vec<Key>, String> {
    let text = match source {
        Source::File(path) => std::fs::read(path).map_err(|e| e.to_string())?,
        Source::Url(url) => {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(FETCH_TIMEOUT))
                .max_redirects(0)
                .build()
                .into();
            agent
                .get(url)
                .call()
                .map_err(|e| e.to_string())?
                .body_mut()
                .with_config()
                .limit(MAX_JWKS)
                .read_to_vec()
                .map_err(|e| e.to_string())?
        }
    };
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        match jwk_key(jwk) {
            Some(Ok(key)) => keys.push(key),
            Some(Err(e)) => {
                warn!(jwks = %source, kid = ?jwk.common.key_id, error = %e, "a key of the JWKS is unusable; skipped");
            }
            // Keys of other algorithms (or for encryption) are not ours to use.
            None => {}
        }
    }
    Ok(keys)
}

/// The key of a JWK, if it is one of [`ACCEPTED`]'s kinds.
fn jwk_key(jwk: &Jwk) -> Option<Result<Key, String>> {
    use jsonwebtoken::jwk::{KeyAlgorithm, PublicKeyUse};
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        _ => return None,
    };
    // A key that names its algorithm is used for that one only.
    match jwk.common.key_algorithm {
        None => {}
        Some(KeyAlgorithm::EdDSA) if alg == Algorithm::EdDSA => {}
        Some(KeyAlgorithm::ES256) if alg == Algorithm::ES256 => {}
        Some(KeyAlgorithm::RS256) if alg == Algorithm::RS256 => {}
        Some(_) => return None,
    }
    Some(
        DecodingKey::from_jwk(jwk)
            .map(|key| Key {
                alg,
                kid: jwk.common.key_id.clone(),
                key,
            })
            .map_err(|e| e.to_string()),
    )
}

/// A public key in a PEM file: Ed25519 (EdDSA), P-256 (ES256) or RSA (RS256).
fn pem_key(text: &[u8]) -> Result<Key, String> {
    let label = std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("-----BEGIN ")))
        .unwrap_or_default();
    if label.contains("PRIVATE") {
        return Err("holds a private key; give the public key only".into());
    }
    // An SPKI `PUBLIC KEY` says its kind inside: try each.
    type Parse = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
    let tries: [(Algorithm, Parse); 3] = [
        (Algorithm::EdDSA, DecodingKey::from_ed_pem),
        (Algorithm::ES256, DecodingKey::from_ec_pem),
        (Algorithm::RS256, DecodingKey::from_rsa_pem),
    ];
    for (alg, parse) in tries {
        if let Ok(key) = parse(text) {
            return Ok(Key {
                alg,
                kid: None,
                key,
            });
        }
    }
    Err("not an Ed25519, P-256 or RSA public key in PEM".into())
}

/// A claim name: what `user_claim` may be.
fn valid_claim(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwks_url_is_https_or_this_machine() {
        assert!(matches!(
            source("https://idp.example/jwks"),
            Ok(Source::Url(_))
        ));
        assert!(matches!(
            source("http://127.0.0.1:8080/jwks"),
            Ok(Source::Url(_))
        ));
        assert!(matches!(
            source("http://localhost/jwks"),
            Ok(Source::Url(_))
        ));
        assert!(matches!(source("http://[::1]:80/jwks"), Ok(Source::Url(_))));
        assert!(source("http://idp.example/jwks").is_err());
        assert!(source("http://127.0.0.1.evil.example/jwks").is_err());
        assert!(matches!(
            source("/etc/plover/jwks.json"),
            Ok(Source::File(_))
        ));
    }

    #[test]
    fn a_private_key_or_garbage_is_not_a_public_key() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let err = pem_key(pair.serialize_pem().as_bytes())
            .err()
            .expect("refused");
        assert!(err.contains("private key"), "{err}");
        assert!(pem_key(b"not a pem").is_err());
        let public = pem_key(pair.public_key_pem().as_bytes()).expect("public");
        assert_eq!(public.alg, Algorithm::EdDSA);
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        assert_eq!(
            pem_key(ec.public_key_pem().as_bytes()).expect("ec").alg,
            Algorithm::ES256
        );
    }

    #[test]
    fn a_bad_configuration_stops_the_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = AuthConfig {
            jwks: Some(dir.path().join("nope.json").display().to_string()),
            ..AuthConfig::default()
        };
        assert!(
            Idp::open(&missing).is_err(),
            "a JWKS file that is not there"
        );
        let bad_claim = AuthConfig {
            public_keys: Vec::new(),
            jwks: Some({
                let p = dir.path().join("jwks.json");
                std::fs::write(&p, r#"{"keys":[]}"#).expect("write");
                p.display().to_string()
            }),
            user_claim: "a claim".into(),
            ..AuthConfig::default()
        };
        assert!(Idp::open(&bad_claim).is_err());
        assert!(Idp::open(&AuthConfig::default()).expect("none").is_none());
    }
}
