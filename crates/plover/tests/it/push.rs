//! Push notifications to a real HTTP receiver on 127.0.0.1: coalescing, none while online,
//! durable across a restart, retries, rejected keys, RFC 8291 encryption, and the targets a
//! pusher may have.

use crate::common::TestServer;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use plover_proto::{Pusher, Target};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
struct Request {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP server on 127.0.0.1 that records requests and answers from a script (then 200 {}).
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start(script: Vec<(u16, &str)>) -> Self {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", server.server_addr().to_ip().expect("ip"));
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut script: VecDeque<(u16, String)> =
            script.into_iter().map(|(s, b)| (s, b.to_owned())).collect();
        let (log, done) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let Ok(Some(mut request)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                let mut body = Vec::new();
                let _ = std::io::Read::read_to_end(request.as_reader(), &mut body);
                log.lock().expect("lock").push(Request {
                    path: request.url().to_owned(),
                    headers: request
                        .headers()
                        .iter()
                        .map(|h| (h.field.to_string(), h.value.to_string()))
                        .collect(),
                    body,
                });
                let (status, answer) = script.pop_front().unwrap_or((200, "{}".into()));
                let mut response =
                    tiny_http::Response::from_string(answer.clone()).with_status_code(status);
                // A redirect's script line names where it points.
                if (300..400).contains(&status)
                    && let Ok(location) = tiny_http::Header::from_bytes("Location", answer)
                {
                    response.add_header(location);
                }
                let _ = request.respond(response);
            }
        });
        Self {
            url,
            requests,
            stop,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }

    /// Waits until `n` requests have come (panics after 10 s).
    async fn wait_for(&self, n: usize) -> Vec<Request> {
        for _ in 0..200 {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("expected {n} requests, got {:?}", self.requests());
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn setup(server: &TestServer, pusher: Pusher) -> plover_client::Conversation {
    let bob = server.connect("bob", "phone").await;
    bob.register_pusher(pusher).await.expect("register");
    bob.close().await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    // The connection must outlive the stream: keep it alive by leaking it into a task.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(alice);
    });
    conv
}

fn gateway(url: &str, key: &str) -> Pusher {
    Pusher::Gateway {
        url: url.to_owned(),
        app_id: "com.example.chat".into(),
        pushkey: key.to_owned(),
    }
}

#[tokio::test]
async fn a_burst_to_an_offline_user_is_one_notification_and_an_online_user_gets_none() {
    let server = TestServer::start_with(|c| {
        c.push.allow_private_targets = true;
        c.push.coalesce = Duration::from_millis(400);
    })
    .await;
    let receiver = Receiver::start(vec![]);
    let conv = setup(&server, gateway(&receiver.url, "key-1")).await;
    for i in 0..5 {
        conv.send(format!("quick {i}")).await.expect("send");
    }
    let got = receiver.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.requests().len(), 1, "coalesced into one");
    let request = &got[0];
    assert_eq!(request.path, "/_matrix/push/v1/notify");
    let n = &request.json()["notification"];
    assert_eq!(n["counts"]["unread"], 5);
    assert_eq!(n["sender"], "alice");
    assert_eq!(n["room_id"], conv.id().to_string());
    assert_eq!(n["devices"][0]["pushkey"], "key-1");
    assert_eq!(n["devices"][0]["app_id"], "com.example.chat");
    assert!(n.get("content").is_none(), "no body by default");

    // Bob online: nothing is sent.
    let bob = server.connect("bob", "laptop").await;
    for i in 0..3 {
        conv.send(format!("while online {i}")).await.expect("send");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        receiver.requests().len(),
        1,
        "nothing while a device is online"
    );
    bob.close().await;
    drop(conv);
    server.stop().await;
}

#[tokio::test]
async fn pending_notifications_survive_a_restart() {
    let server = TestServer::start_with(|c| {
        c.push.allow_private_targets = true;
        c.push.coalesce = Duration::from_secs(30);
    })
    .await;
    let receiver = Receiver::start(vec![]);
    let conv = setup(&server, gateway(&receiver.url, "key-r")).await;
    conv.send("one").await.expect("send");
    conv.send("two").await.expect("send");
    // Pending notifications are written within 100 ms; the coalescing window is far longer.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(receiver.requests().is_empty());
    drop(conv);
    let server = server
        .restart_with(|c| c.push.allow_private_targets = true)
        .await;
    let got = receiver.wait_for(1).await;
    assert_eq!(got[0].json()["notification"]["counts"]["unread"], 2);
    server.stop().await;
}

#[tokio::test]
async fn a_failing_gateway_is_retried_and_a_rejected_key_is_removed() {
    let server = TestServer::start_with(|c| {
        c.push.allow_private_targets = true;
        c.push.coalesce = Duration::from_millis(100);
        c.push.retry_base = Duration::from_millis(100);
    })
    .await;
    let flaky = Receiver::start(vec![(500, "down"), (503, "still down")]);
    let conv = setup(&server, gateway(&flaky.url, "key-f")).await;
    conv.send("eventually").await.expect("send");
    let got = flaky.wait_for(3).await;
    assert_eq!(got.len(), 3, "two failures, then accepted");
    assert_eq!(got[2].json()["notification"]["sender"], "alice");
    let bob = server.connect("bob", "phone").await;
    assert_eq!(
        bob.pushers().await.expect("list").len(),
        1,
        "kept after retries"
    );
    bob.close().await;

    // A gateway that reports the key rejected: the pusher is removed.
    let rejecting = Receiver::start(vec![(200, r#"{"rejected":["key-x"]}"#)]);
    let bob = server.connect("bob", "phone").await;
    assert!(bob.unregister_pusher("key-f").await.expect("unregister"));
    bob.register_pusher(gateway(&rejecting.url, "key-x"))
        .await
        .expect("register");
    bob.close().await;
    conv.send("to a dead key").await.expect("send");
    rejecting.wait_for(1).await;
    let bob = server.connect("bob", "phone").await;
    let mut gone = false;
    for _ in 0..50 {
        if bob.pushers().await.expect("list").is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the rejected key was removed");
    // And the notification is done with: nothing stays pending to be sent again.
    let store = server.router.store().clone();
    let mut settled = false;
    for _ in 0..50 {
        let s = store.clone();
        let left = tokio::task::spawn_blocking(move || s.pending_pushes())
            .await
            .expect("join")
            .expect("read");
        if left.is_empty() {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        settled,
        "the notification to the rejected key stays pending"
    );
    bob.close().await;
    drop(conv);
    server.stop().await;
}

#[tokio::test]
async fn web_push_is_encrypted_per_rfc_8291_and_decrypts_with_the_device_keys() {
    let server = TestServer::start_with(|c| {
        c.push.allow_private_targets = true;
        c.push.coalesce = Duration::from_millis(100);
    })
    .await;
    let receiver = Receiver::start(vec![]);
    let (keys, auth) = ece::generate_keypair_and_auth_secret().expect("keys");
    let public = keys.pub_as_raw().expect("public key");
    let pusher = Pusher::WebPush {
        endpoint: format!("{}/push/device-1", receiver.url),
        p256dh: Some(URL_SAFE_NO_PAD.encode(&public)),
        auth: Some(URL_SAFE_NO_PAD.encode(auth)),
    };
    let conv = setup(&server, pusher).await;
    conv.send("secret plans").await.expect("send");
    let got = receiver.wait_for(1).await;
    let request = &got[0];
    assert_eq!(request.path, "/push/device-1");
    assert_eq!(request.header("Content-Encoding"), Some("aes128gcm"));
    assert!(request.header("TTL").is_some());
    // Signed per RFC 8292 with the server's key, the one `plover push vapid-key` prints,
    // for the endpoint's origin.
    let vapid = plover_server::push::vapid::Vapid::load_or_create(
        &server.dir.path().join("data"),
        "mailto:postmaster@localhost",
    )
    .expect("the server's key");
    let authorization = request.header("Authorization").expect("VAPID");
    let (token, key) = authorization
        .strip_prefix("vapid t=")
        .and_then(|h| h.split_once(", k="))
        .expect("vapid t=..., k=...");
    assert_eq!(key, vapid.public_key());
    let point = URL_SAFE_NO_PAD.decode(key).expect("base64url");
    let decoding = jsonwebtoken::DecodingKey::from_ec_components(
        &URL_SAFE_NO_PAD.encode(&point[1..33]),
        &URL_SAFE_NO_PAD.encode(&point[33..]),
    )
    .expect("P-256 key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&[receiver.url.as_str()]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(token, &decoding, &validation)
        .expect("a valid, unexpired ES256 token for the endpoint's origin");
    assert_eq!(claims.claims["sub"], "mailto:postmaster@localhost");
    let components = keys.raw_components().expect("components");
    let plain = ece::decrypt(&components, &auth, &request.body).expect("decrypts");
    let v: serde_json::Value = serde_json::from_slice(&plain).expect("JSON");
    assert_eq!(v["sender"], "alice");
    assert_eq!(v["unread"], 1);
    assert!(v.get("body").is_none(), "no body unless opted in");
    // alice shares no other conversation with bob: her message is a request.
    assert_eq!(v["type"], "message_request");

    // Bob opts this conversation in: while it is a request, still no body.
    let bob = server.connect("bob", "phone").await;
    bob.push_content(conv.id(), true).await.expect("opt in");
    bob.close().await;
    conv.send("still a stranger").await.expect("send");
    let got = receiver.wait_for(2).await;
    let plain = ece::decrypt(&components, &auth, &got[1].body).expect("decrypts");
    let v: serde_json::Value = serde_json::from_slice(&plain).expect("JSON");
    assert_eq!(v["type"], "message_request");
    assert!(
        v.get("body").is_none(),
        "a request's body in a notification: {v}"
    );
    // Once he accepts, the body comes along (still encrypted in transit).
    let bob = server.connect("bob", "phone").await;
    bob.accept(conv.id()).await.expect("accept");
    bob.close().await;
    conv.send("with content").await.expect("send");
    let got = receiver.wait_for(3).await;
    let plain = ece::decrypt(&components, &auth, &got[2].body).expect("decrypts");
    let v: serde_json::Value = serde_json::from_slice(&plain).expect("JSON");
    assert_eq!(v["type"], "message");
    assert_eq!(v["body"], STANDARD.encode("with content"));

    // A file notifies like any other message, but its body (which carries the file's key)
    // never goes in a notification, opted in or not.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("photo.jpg");
    std::fs::write(&path, vec![9u8; 5000]).expect("write");
    let file = plover_client::media::prepare(&path).await.expect("prepare");
    let alice = server.connect("alice", "laptop").await;
    alice.upload(&file, &mut |_| {}).await.expect("upload");
    let body =
        plover_proto::content::Content::Attachment(file.attachment("photo.jpg", "image/jpeg"))
            .encode();
    conv.send_referencing(
        plover_proto::ClientMsgId::random(),
        body.into(),
        vec![file.object],
    )
    .await
    .expect("send the file");
    let got = receiver.wait_for(4).await;
    let plain = ece::decrypt(&components, &auth, &got[3].body).expect("decrypts");
    let v: serde_json::Value = serde_json::from_slice(&plain).expect("JSON");
    assert_eq!(v["sender"], "alice");
    assert!(
        v.get("body").is_none(),
        "a file's body in a notification: {v}"
    );
    alice.close().await;
    drop(conv);
    server.stop().await;
}

#[tokio::test]
async fn a_dead_gateway_does_not_hold_up_everyone_elses_notifications() {
    let server = TestServer::start_with(|c| {
        c.push.allow_private_targets = true;
        c.push.coalesce = Duration::from_millis(100);
        c.push.concurrency = 8;
        c.push.timeout = Duration::from_secs(6);
        c.push.retries = 1;
    })
    .await;
    // A gateway that accepts connections and never answers.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in dead.incoming().flatten() {
            held.push(stream);
        }
    });
    let alice = server.connect("alice", "phone").await;
    // Twelve offline users on the dead gateway: more than all eight request slots.
    for i in 0..12 {
        let name = format!("stuck{i}");
        let user = server.connect(&name, "phone").await;
        user.register_pusher(gateway(&dead_url, &format!("k{i}")))
            .await
            .expect("register");
        user.close().await;
        alice
            .open(Target::Direct(name), true)
            .await
            .expect("open")
            .send("hello")
            .await
            .expect("send");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Bob's gateway works: his notification goes out while the dead one's requests hang.
    let receiver = Receiver::start(vec![]);
    let conv = setup(&server, gateway(&receiver.url, "bob-key")).await;
    conv.send("for bob").await.expect("send");
    let sent = std::time::Instant::now();
    for _ in 0..60 {
        if !receiver.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.requests().len(), 1, "bob was notified");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "bob waited {:?} behind the dead gateway's 6 s timeouts",
        sent.elapsed()
    );
    alice.close().await;
    server.stop().await;
}

/// By default a pusher must be https and public; a user may hold at most `push.max_pushers`;
/// a gateway pusher of the same app registered again from the same device replaces the old.
#[tokio::test]
async fn pusher_targets_are_public_https_and_few() {
    let server = TestServer::start_with(|c| c.push.max_pushers = 3).await;
    let bob = server.connect("bob", "phone").await;
    for (url, why) in [
        ("http://push.example", "plain http"),
        ("https://127.0.0.1:9/x", "loopback"),
        ("https://10.0.0.1/x", "private"),
        (
            "https://169.254.169.254/latest",
            "link-local (cloud metadata)",
        ),
        ("https://[fd00::1]/x", "unique-local"),
        ("https://localhost/x", "a name that resolves to loopback"),
    ] {
        let err = bob.register_pusher(gateway(url, "k")).await.expect_err(why);
        assert_eq!(
            err.code(),
            Some(plover_proto::ErrorCode::INVALID_REQUEST),
            "{why}: {err}"
        );
    }
    // Public addresses pass (nothing is sent until a notification is due).
    bob.register_pusher(gateway("https://8.8.8.8", "k1"))
        .await
        .expect("public");
    // The same app from the same device: the new registration replaces the old.
    bob.register_pusher(gateway("https://8.8.8.8", "k2"))
        .await
        .expect("again");
    let keys = |p: Vec<Pusher>| p.iter().map(|p| p.key().to_owned()).collect::<Vec<_>>();
    assert_eq!(keys(bob.pushers().await.expect("list")), vec!["k2"]);
    let tablet = server.connect("bob", "tablet").await;
    tablet
        .register_pusher(gateway("https://8.8.8.8", "k3"))
        .await
        .expect("tablet");
    tablet
        .register_pusher(Pusher::WebPush {
            endpoint: "https://8.8.4.4/e".into(),
            p256dh: None,
            auth: None,
        })
        .await
        .expect("web push");
    let err = tablet
        .register_pusher(Pusher::WebPush {
            endpoint: "https://8.8.4.4/f".into(),
            p256dh: None,
            auth: None,
        })
        .await
        .expect_err("a fourth");
    assert_eq!(err.code(), Some(plover_proto::ErrorCode::LIMIT), "{err}");
    // Replacing one in place is not a new one.
    tablet
        .register_pusher(gateway("https://8.8.8.8", "k3"))
        .await
        .expect("same key");
    assert_eq!(keys(bob.pushers().await.expect("list")).len(), 3);
    tablet.close().await;
    bob.close().await;
    server.stop().await;
}

/// A redirect is not followed (it could point anywhere, the server's own network included),
/// and a stored pusher whose address is not public gets nothing once private targets are no
/// longer allowed: the check runs at every request, not only at registration.
#[tokio::test]
async fn redirects_are_not_followed_and_every_request_is_checked() {
    let elsewhere = Receiver::start(vec![]);
    let redirecting = Receiver::start(vec![(
        302,
        &format!("{}/_matrix/push/v1/notify", elsewhere.url),
    )]);
    let server = TestServer::start_with(|c| {
        c.push.allow_private_targets = true;
        c.push.coalesce = Duration::from_millis(100);
        c.push.retries = 1;
    })
    .await;
    let conv = setup(&server, gateway(&redirecting.url, "key-r")).await;
    conv.send("one").await.expect("send");
    redirecting.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");
    drop(conv);

    // The same store, private targets no longer allowed: the stored pusher is not posted to.
    let server = server
        .restart_with(|c| c.push.coalesce = Duration::from_millis(100))
        .await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), false)
        .await
        .expect("open");
    conv.send("two").await.expect("send");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        redirecting.requests().len(),
        1,
        "posted to a private address"
    );
    drop(conv);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn in_a_cluster_the_node_that_took_the_message_notifies_once_and_none_while_online_elsewhere()
{
    use crate::cluster::{client, eventually_open, node_with};
    use crate::common::nats::{JetStream, Nats};
    use plover_client::Connection;

    let nats = Nats::start(3, JetStream::SyncAlways);
    let tweak = |c: &mut plover_server::config::Config| {
        c.push.allow_private_targets = true;
        c.push.coalesce = Duration::from_millis(300);
    };
    let n1 = node_with(&nats, "n1", tweak).await;
    let n2 = node_with(&nats, "n2", tweak).await;
    let n3 = node_with(&nats, "n3", tweak).await;
    let receiver = Receiver::start(vec![]);

    // bob registers his pusher on n2 and goes.
    let bob = Connection::connect(&client(&n2, "bob", "phone"))
        .await
        .expect("bob");
    bob.register_pusher(gateway(&receiver.url, "key-c"))
        .await
        .expect("register");
    bob.close().await;

    // alice writes through n1, which learned of the pusher from the log: one notification,
    // from one node, though all three applied the messages.
    let alice = Connection::connect(&client(&n1, "alice", "phone"))
        .await
        .expect("alice");
    let conv = eventually_open(&alice, "bob").await;
    for i in 0..3 {
        conv.send(format!("offline {i}")).await.expect("send");
    }
    receiver.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        receiver.requests().len(),
        1,
        "one node, one coalesced notification"
    );

    // bob online on n3: n1 knows it (the relay), and notifies nobody.
    let bob = Connection::connect(&client(&n3, "bob", "laptop"))
        .await
        .expect("bob");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..2 {
        conv.send(format!("online {i}")).await.expect("send");
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        receiver.requests().len(),
        1,
        "nothing while bob is connected anywhere"
    );

    bob.close().await;
    alice.close().await;
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}
