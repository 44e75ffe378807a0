//! VAPID (RFC 8292): the server's identity towards Web Push services. Each Web Push request
//! carries `Authorization: vapid t=<JWT>, k=<public key>`, an ES256 token for the endpoint's
//! origin signed with a P-256 key that the server generates into its data directory on first
//! use (`vapid.pem`, owner-only). An app gives the public key (`plover push vapid-key`) to the
//! browser or distributor as its `applicationServerKey`, and the push service then accepts
//! only requests signed with it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::path::Path;

/// The key file in the data directory.
pub const VAPID_FILE: &str = "vapid.pem";

/// How long a token is valid; RFC 8292 allows at most 24 hours.
const TOKEN_LIFETIME_SECS: u64 = 12 * 3600;

/// Errors loading or making the key.
#[derive(Debug, thiserror::Error)]
pub enum VapidError {
    /// The key file could not be read or written.
    #[error("VAPID key {path}: {message}")]
    File {
        /// Where.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// The server's VAPID key.
pub struct Vapid {
    signing: jsonwebtoken::EncodingKey,
    /// The uncompressed P-256 point (65 bytes), as apps need it.
    public: Vec<u8>,
    subject: String,
}

impl std::fmt::Debug for Vapid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vapid")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl Vapid {
    /// Loads `<data>/vapid.pem`, or makes a new key there. `subject` is the contact the
    /// tokens carry (`mailto:` or `https:`), for push services to reach the operator.
    pub fn load_or_create(data: &Path, subject: &str) -> Result<Self, VapidError> {
        let path = data.join(VAPID_FILE);
        let fail = |message: String| VapidError::File {
            path: path.display().to_string(),
            message,
        };
        let pem = match std::fs::read_to_string(&path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| fail(e.to_string()))?;
                crate::auth::create_private_file(data, VAPID_FILE, &key.serialize_pem())
                    .map_err(|e| fail(e.to_string()))?
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| fail(e.to_string()))?;
        if !key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
            return Err(fail("not a P-256 key".into()));
        }
        Ok(Self {
            signing: jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
            public: key.public_key_raw().to_vec(),
            subject: subject.to_owned(),
        })
    }

    /// The public key, base64url without padding: the app's `applicationServerKey`.
    pub fn public_key(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.public)
    }

    /// The `Authorization` header for a request to `endpoint`, valid for 12 hours.
    pub fn authorization(&self, endpoint: &str, now_secs: u64) -> Result<String, String> {
        let audience = origin(endpoint).ok_or_else(|| format!("{endpoint:?} has no origin"))?;
        let claims = serde_json::json!({
            "aud": audience,
            "exp": now_secs + TOKEN_LIFETIME_SECS,
            "sub": self.subject,
        });
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        let token =
            jsonwebtoken::encode(&header, &claims, &self.signing).map_err(|e| e.to_string())?;
        Ok(format!("vapid t={token}, k={}", self.public_key()))
    }
}

/// `scheme://host[:port]` of a URL: the audience of its tokens.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    (!authority.is_empty()).then(|| format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_and_signs_verifiable_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vapid = Vapid::load_or_create(dir.path(), "mailto:ops@example.com").expect("key");
        let again = Vapid::load_or_create(dir.path(), "mailto:ops@example.com").expect("key");
        assert_eq!(
            vapid.public_key(),
            again.public_key(),
            "kept in the data directory"
        );
        assert_eq!(vapid.public.len(), 65);
        assert_eq!(vapid.public[0], 4, "an uncompressed point");

        let header = vapid
            .authorization("https://push.example.net:8443/wpush/abc?x=1", 1_000)
            .expect("header");
        let (token, key) = header
            .strip_prefix("vapid t=")
            .and_then(|h| h.split_once(", k="))
            .expect("vapid t=..., k=...");
        assert_eq!(key, vapid.public_key());
        let point = URL_SAFE_NO_PAD.decode(key).expect("base64url");
        let (x, y) = (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..]),
        );
        let decoding = jsonwebtoken::DecodingKey::from_ec_components(&x, &y).expect("key");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_audience(&["https://push.example.net:8443"]);
        validation.validate_exp = false;
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &decoding, &validation)
            .expect("a valid ES256 token for the endpoint's origin");
        assert_eq!(claims.claims["exp"], 1_000 + TOKEN_LIFETIME_SECS);
        assert_eq!(claims.claims["sub"], "mailto:ops@example.com");
    }

    #[test]
    fn origins() {
        assert_eq!(
            origin("https://a.example/b/c").as_deref(),
            Some("https://a.example")
        );
        assert_eq!(
            origin("http://127.0.0.1:9/x?y").as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert_eq!(origin("nonsense"), None);
    }
}
