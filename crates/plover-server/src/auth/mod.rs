//! Bearer tokens: plover's own, signed with the secret kept in the data directory (or
//! `[auth] secret`), and an identity provider's (`idp`).
//!
//! plover's tokens are HS256 JWTs with `sub` (the user), `aud` = `plover`, `iat`, `exp` and an
//! optional `dev` that pins the token to one device. An identity provider's are EdDSA, ES256
//! or RS256, verified with its public keys. Each algorithm is verified only with keys of its
//! own kind, so `alg: none` and algorithm-confusion tokens (an HS256 token "signed" with a
//! public key) are refused by construction.

mod idp;

pub use idp::{ACCEPTED, FORCED_REFRESH_GAP, Idp};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The audience every plover token carries.
pub const AUDIENCE: &str = "plover";

/// The file in the data directory that holds the generated secret.
pub const SECRET_FILE: &str = "secret.key";

/// Why a token or secret was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token was given.
    #[error("no token given")]
    Missing,
    /// The token's `exp` is in the past.
    #[error("token has expired")]
    Expired,
    /// Anything else: malformed, bad signature, wrong algorithm, wrong audience, bad user name.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token is pinned to another device than the one connecting.
    #[error("token is for device {token:?}, not {hello:?}")]
    WrongDevice {
        /// The device named in the token.
        token: String,
        /// The device named in `Hello`.
        hello: String,
    },
    /// The secret could not be read or created.
    #[error("token secret at {path}: {message}")]
    Secret {
        /// Where the secret lives.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The claims of a plover token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Always [`AUDIENCE`].
    pub aud: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// The device the token is limited to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

/// Checks a user or device name: 1 to 64 characters of `[A-Za-z0-9._-]`.
///
/// The narrow alphabet keeps names safe in store keys (no NUL), logs and terminals.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Who a verified token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The user.
    pub user: String,
    /// When the token was issued (`iat`, Unix seconds; 0 when it does not say).
    pub issued: u64,
}

/// Refuses a token pinned to another device than the one connecting.
fn check_device(pinned: Option<&str>, device: &str) -> Result<(), AuthError> {
    match pinned {
        Some(pinned) if pinned != device => Err(AuthError::WrongDevice {
            token: pinned.to_owned(),
            hello: device.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Signs and verifies plover's tokens with one secret, and verifies an identity provider's.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    idp: Option<std::sync::Arc<Idp>>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl TokenKeys {
    /// Keys from a secret.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        // A little slack for clocks that disagree; an expired token is still refused promptly.
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            idp: None,
        }
    }

    /// These keys, also accepting the identity provider's tokens.
    pub fn with_idp(mut self, idp: Option<Idp>) -> Self {
        self.idp = idp.map(std::sync::Arc::new);
        self
    }

    /// Verifies a token presented by `device`: plover's own (HS256), or the identity
    /// provider's (EdDSA, ES256, RS256) when one is configured.
    pub async fn verify(&self, token: &str, device: &str) -> Result<Verified, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("not a JWT: {e}")))?;
        match (&self.idp, header.alg) {
            (_, Algorithm::HS256) => {
                let claims = self.verify_own(token, device)?;
                Ok(Verified {
                    user: claims.sub,
                    issued: claims.iat,
                })
            }
            (Some(idp), _) => idp.verify(token, &header, device).await,
            (None, alg) => Err(AuthError::Invalid(format!(
                "algorithm {alg:?} is not accepted: this server takes only its own HS256 \
                 tokens (no identity provider is configured)"
            ))),
        }
    }

    /// Mints a token for `user`, valid for `ttl`, optionally pinned to `device`.
    pub fn mint(
        &self,
        user: &str,
        device: Option<&str>,
        ttl: Duration,
    ) -> Result<String, AuthError> {
        if !valid_name(user) {
            return Err(AuthError::Invalid(format!(
                "user name {user:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
            )));
        }
        if let Some(d) = device.filter(|d| !valid_name(d)) {
            return Err(AuthError::Invalid(format!(
                "device name {d:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
            )));
        }
        let iat = now_secs();
        let claims = Claims {
            sub: user.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
            dev: device.map(str::to_owned),
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims (tests use this to make expired tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Verifies one of plover's own tokens presented by `device` and returns its claims.
    pub fn verify_own(&self, token: &str, device: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let claims = data.claims;
        if !valid_name(&claims.sub) {
            return Err(AuthError::Invalid("bad user name in token".into()));
        }
        check_device(claims.dev.as_deref(), device)?;
        Ok(claims)
    }
}

/// Loads the secret from `<data>/secret.key`, creating it (32 random bytes, hex, mode 0600)
/// if it does not exist. Safe to race with another process doing the same.
pub fn load_or_create_secret(data: &Path) -> Result<Vec<u8>, AuthError> {
    let path = data.join(SECRET_FILE);
    let fail = |message: String| AuthError::Secret {
        path: path.clone(),
        message,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => return parse_secret(&text).ok_or_else(|| fail("not a hex secret".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| fail(e.to_string()))?;
    let text: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let text = create_private_file(data, SECRET_FILE, &format!("{text}\n"))
        .map_err(|e| fail(e.to_string()))?;
    parse_secret(&text).ok_or_else(|| fail("not a hex secret".into()))
}

/// Creates `<data>/<name>` holding `contents`, readable by its owner only, unless it exists;
/// returns what the file holds then (ours, or what another process wrote first).
///
/// A temporary file is written and fsynced, then linked into place: whoever links first
/// wins, and a reader never sees a half-written file.
pub(crate) fn create_private_file(
    data: &Path,
    name: &str,
    contents: &str,
) -> std::io::Result<String> {
    std::fs::create_dir_all(data)?;
    let path = data.join(name);
    let tmp = data.join(format!(".{name}.{}", std::process::id()));
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())?;
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(contents.to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(&path),
        Err(e) => Err(e),
    }
}

fn parse_secret(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    (text.len() >= 32 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| text.as_bytes().to_vec())
}

/// The secret a server with this configuration uses: the configured one, else the data dir's.
pub fn secret_for(config: &crate::config::Config) -> Result<Vec<u8>, AuthError> {
    match &config.auth.secret {
        Some(s) if s.len() >= 32 => Ok(s.as_bytes().to_vec()),
        Some(_) => Err(AuthError::Secret {
            path: PathBuf::from("<config auth.secret>"),
            message: "must be at least 32 bytes (an HS256 key shorter than its hash is weak)"
                .into(),
        }),
        None => load_or_create_secret(&config.data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new(b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn minted_token_verifies() {
        let k = keys();
        let t = k
            .mint("alice", None, Duration::from_secs(60))
            .expect("mint");
        let c = k.verify_own(&t, "phone").expect("verify");
        assert_eq!(c.sub, "alice");
    }

    #[test]
    fn expired_forged_and_none_tokens_are_refused() {
        let k = keys();
        let now = now_secs();
        let old = k
            .sign(&Claims {
                sub: "alice".into(),
                aud: AUDIENCE.into(),
                iat: now - 7200,
                exp: now - 3600,
                dev: None,
            })
            .expect("sign");
        assert_eq!(k.verify_own(&old, "d"), Err(AuthError::Expired));

        let other = TokenKeys::new(b"another secret, another server!!");
        let forged = other
            .mint("alice", None, Duration::from_secs(60))
            .expect("mint");
        assert!(matches!(
            k.verify_own(&forged, "d"),
            Err(AuthError::Invalid(_))
        ));

        // {"alg":"none","typ":"JWT"} . {"sub":"alice","aud":"plover","exp":9999999999} . (empty)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.\
                    eyJzdWIiOiJhbGljZSIsImF1ZCI6InBsb3ZlciIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(matches!(
            k.verify_own(none, "d"),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(k.verify_own("", "d"), Err(AuthError::Missing));
        assert!(matches!(
            k.verify_own("garbage", "d"),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn device_pinned_token_only_works_for_that_device() {
        let k = keys();
        let t = k
            .mint("bob", Some("phone"), Duration::from_secs(60))
            .expect("mint");
        assert!(k.verify_own(&t, "phone").is_ok());
        assert!(matches!(
            k.verify_own(&t, "laptop"),
            Err(AuthError::WrongDevice { .. })
        ));
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("alice_1.x-y"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a\0b"));
        assert!(!valid_name(&"x".repeat(65)));
        assert!(
            keys()
                .mint("bad name", None, Duration::from_secs(1))
                .is_err()
        );
    }

    #[test]
    fn a_configured_secret_has_at_least_32_bytes() {
        let mut config = crate::config::Config::default();
        config.auth.secret = Some("sixteen chars ok".into());
        assert!(matches!(secret_for(&config), Err(AuthError::Secret { .. })));
        config.auth.secret = Some("thirty-two characters, not fewer".into());
        assert_eq!(secret_for(&config).expect("long enough").len(), 32);
    }

    #[test]
    fn secret_is_created_once_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_secret(dir.path()).expect("create");
        let b = load_or_create_secret(dir.path()).expect("reuse");
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
    }
}
