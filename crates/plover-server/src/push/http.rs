//! The HTTP side of a notification: a Matrix push gateway request, or a (RFC 8291 encrypted)
//! Web Push / UnifiedPush POST. Blocking (ureq); run from `spawn_blocking`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use std::time::Duration;

use crate::persist::PendingPush;
use plover_proto::Pusher;

/// What became of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Accepted.
    Delivered,
    /// The push key or endpoint is no longer valid: forget the pusher.
    Rejected,
    /// Refused for good (a 4xx other than "gone"): do not retry.
    Failed(String),
    /// A timeout, a connection failure, a 429 or a 5xx: try again later.
    Retry(String),
}

/// An agent that follows no redirect (a redirect could point anywhere, the server's own
/// network included) and, unless private targets are allowed, connects to public addresses
/// only ([`super::target::PublicOnly`]), whatever the host resolves to at that moment.
fn agent(timeout: Duration, allow_private: bool) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .build();
    if allow_private {
        return ureq::Agent::new_with_config(config);
    }
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::new(),
        super::target::PublicOnly::default(),
    )
}

/// The path a Matrix push gateway serves.
const GATEWAY_PATH: &str = "/_matrix/push/v1/notify";

/// Sends one notification to one pusher.
pub(super) fn send(
    user: &str,
    pusher: &Pusher,
    pending: &PendingPush,
    request: bool,
    timeout: Duration,
    allow_private: bool,
    vapid: &super::vapid::Vapid,
) -> Outcome {
    let agent = agent(timeout, allow_private);
    match pusher {
        Pusher::Gateway {
            url,
            app_id,
            pushkey,
        } => gateway(&agent, user, url, app_id, pushkey, pending, request),
        Pusher::WebPush {
            endpoint,
            p256dh,
            auth,
        } => web_push(
            &agent,
            vapid,
            endpoint,
            p256dh.as_deref(),
            auth.as_deref(),
            pending,
            request,
        ),
    }
}

fn classify(status: u16) -> Option<Outcome> {
    match status {
        200..=299 => None,
        300..=399 => Some(Outcome::Failed(format!(
            "HTTP {status}: redirects are not followed"
        ))),
        404 | 410 => Some(Outcome::Rejected),
        408 | 429 | 500..=599 => Some(Outcome::Retry(format!("HTTP {status}"))),
        _ => Some(Outcome::Failed(format!("HTTP {status}"))),
    }
}

fn gateway(
    agent: &ureq::Agent,
    user: &str,
    url: &str,
    app_id: &str,
    pushkey: &str,
    pending: &PendingPush,
    request: bool,
) -> Outcome {
    let url = if url.ends_with(GATEWAY_PATH) {
        url.to_owned()
    } else {
        format!("{}{GATEWAY_PATH}", url.trim_end_matches('/'))
    };
    let mut notification = json!({
        "event_id": format!("{}/{}", pending.conversation, pending.seq),
        "room_id": pending.conversation.to_string(),
        "type": if request { "plover.message_request" } else { "m.room.message" },
        "sender": pending.sender,
        "user": user,
        "prio": "high",
        "counts": {"unread": pending.count},
        "devices": [{"app_id": app_id, "pushkey": pushkey, "pushkey_ts": 0, "data": {}}],
    });
    if let Some(body) = &pending.body {
        notification["content"] = json!({"body": STANDARD.encode(body)});
    }
    let response = agent
        .post(&url)
        .send_json(json!({ "notification": notification }));
    let mut response = match response {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    if let Some(outcome) = classify(response.status().as_u16()) {
        // A gateway answers 404 for an unknown path, not for a gone push key.
        return match outcome {
            Outcome::Rejected => Outcome::Failed("the gateway answered 404".into()),
            other => other,
        };
    }
    let rejected: Vec<String> = response
        .body_mut()
        .read_json::<serde_json::Value>()
        .ok()
        .and_then(|v| v.get("rejected").cloned())
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    if rejected.iter().any(|k| k == pushkey) {
        Outcome::Rejected
    } else {
        Outcome::Delivered
    }
}

/// The JSON a Web Push notification carries (before encryption).
pub(crate) fn web_push_payload(pending: &PendingPush, request: bool) -> serde_json::Value {
    let mut v = json!({
        "type": if request { "message_request" } else { "message" },
        "conversation": pending.conversation,
        "seq": pending.seq,
        "sender": pending.sender,
        "unread": pending.count,
    });
    if let Some(body) = &pending.body {
        v["body"] = json!(STANDARD.encode(body));
    }
    v
}

fn web_push(
    agent: &ureq::Agent,
    vapid: &super::vapid::Vapid,
    endpoint: &str,
    p256dh: Option<&str>,
    auth: Option<&str>,
    pending: &PendingPush,
    request: bool,
) -> Outcome {
    let payload = web_push_payload(pending, request).to_string();
    let now = crate::clock::now_ms() / 1000;
    let authorization = match vapid.authorization(endpoint, now) {
        Ok(a) => a,
        Err(e) => return Outcome::Failed(format!("cannot sign the request: {e}")),
    };
    let request = agent
        .post(endpoint)
        .header("TTL", "86400")
        .header("Urgency", "high")
        .header("Authorization", authorization.as_str());
    let response = match (p256dh, auth) {
        (Some(key), Some(secret)) => {
            let decode = |s: &str| URL_SAFE_NO_PAD.decode(s.trim_end_matches('='));
            let (Ok(key), Ok(secret)) = (decode(key), decode(secret)) else {
                return Outcome::Failed("the registered keys are not base64url".into());
            };
            // RFC 8291 (aes128gcm content coding) by Mozilla's `ece`.
            let body = match ece::encrypt(&key, &secret, payload.as_bytes()) {
                Ok(b) => b,
                Err(e) => return Outcome::Failed(format!("cannot encrypt: {e}")),
            };
            request
                .header("Content-Encoding", "aes128gcm")
                .header("Content-Type", "application/octet-stream")
                .send(&body[..])
        }
        _ => request
            .header("Content-Type", "application/json")
            .send(payload.as_bytes()),
    };
    match response {
        Ok(r) => classify(r.status().as_u16()).unwrap_or(Outcome::Delivered),
        Err(e) => Outcome::Retry(e.to_string()),
    }
}
