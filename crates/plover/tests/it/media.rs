//! Files: encrypted on the device, uploaded and downloaded on streams of their own, resumed
//! after a cut, readable only by those a message shares them with, and gone with the last
//! message that references them.

use crate::common::{TestServer, spawn_server_with};
use plover_client::ClientError;
use plover_client::media::{Prepared, Through, prepare};
use plover_proto::content::{Attachment, Content};
use plover_proto::{ClientMsgId, ErrorCode, ObjectId, Retention, Target};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A file of `len` bytes no other file holds (a counter in every 8 bytes, then a tag).
fn sample(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| ((i / 8) as u64).to_le_bytes()[i % 8] ^ 0x5a)
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, &data).expect("write sample");
    (path, data)
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

fn attachment(p: &Prepared, name: &str) -> Attachment {
    p.attachment(name, "application/octet-stream")
}

fn code(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

fn plover(dir: &Path, addr: &str, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plover"))
        .args(args)
        .current_dir(dir)
        .env("PLOVER_SERVER", addr)
        .env("PLOVER_CA", dir.join("certs").join("cert.pem"))
        .env("PLOVER_TOKEN", token)
        .env_remove("PLOVER_DEVICE")
        .output()
        .expect("run plover")
}

fn token(dir: &Path, user: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_plover"))
        .args(["token", user, "--data", "data"])
        .current_dir(dir)
        .output()
        .expect("token");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn alice_sends_a_file_from_the_cli_and_bob_fetches_the_same_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let (_server, addr) = spawn_server_with(&d, "[retention]\nsweep_interval = \"200ms\"\n").await;
    let (alice, bob) = (token(&d, "alice"), token(&d, "bob"));
    // bob listens (which also makes him known to the server).
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
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A "photo" of 300 kB (several chunks), sent with a caption.
    let (photo, data) = sample(&d, "photo.jpg", 300_000);
    let out = plover(
        &d,
        &addr,
        &alice,
        &[
            "send",
            "--to",
            "bob",
            "--file",
            photo.to_str().expect("path"),
            "--caption",
            "the view",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sent conversation=1 seq=1"
    );

    // bob's listen shows the attachment's public fields, and never its key.
    let line = lines.next().expect("a line").expect("read");
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["type"], "attachment", "{line}");
    assert_eq!(v["name"], "photo.jpg");
    assert_eq!(v["media_type"], "image/jpeg");
    assert_eq!(v["plain_size"], 300_000);
    assert_eq!(v["caption"], "the view");
    assert!(v.get("key").is_none(), "{line}");
    let _ = listener.kill();
    let _ = listener.wait();

    // bob fetches it: the same bytes.
    let fetched = d.join("fetched.jpg");
    let out = plover(
        &d,
        &addr,
        &bob,
        &[
            "fetch",
            "--conversation",
            "1",
            "--seq",
            "1",
            "-o",
            fetched.to_str().expect("path"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&fetched).expect("fetched"), data);

    // The server's object store holds ciphertext only: no 32-byte run of the photo is in
    // any of its files.
    let stored = files_under(&d.join("data").join("media").join("objects"));
    assert!(!stored.is_empty(), "nothing stored");
    let total: usize = stored.iter().map(|(_, b)| b.len()).sum();
    assert!(total > 300_000, "{total}");
    for (path, bytes) in &stored {
        for run in data.chunks(32).step_by(97) {
            assert!(
                !bytes.windows(run.len()).any(|w| w == run),
                "plaintext in {}",
                path.display()
            );
        }
    }

    // A message that is not an attachment: a clear error, non-zero exit.
    let out = plover(&d, &addr, &alice, &["send", "--to", "bob", "just text"]);
    assert!(out.status.success());
    let out = plover(
        &d,
        &addr,
        &bob,
        &["fetch", "--conversation", "1", "--seq", "2"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no attachment"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_upload_cut_halfway_resumes_and_stores_one_object() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, data) = sample(dir.path(), "big.bin", 3_000_000);
    let prepared = prepare(&path).await.expect("prepare");

    // The first attempt stops once the server holds about half.
    let alice = server.connect("alice", "phone").await;
    let (held_tx, mut held_rx) = tokio::sync::watch::channel(0u64);
    let first = {
        let prepared = prepared.clone();
        tokio::spawn(async move {
            let _ = alice
                .upload(&prepared, &mut move |held| {
                    let _ = held_tx.send(held);
                })
                .await;
            alice
        })
    };
    let half = prepared.size / 2;
    while *held_rx.borrow_and_update() < half {
        held_rx.changed().await.expect("progress");
    }
    first.abort();
    let _ = first.await;

    // A new connection resumes where the server stopped, and completes.
    let alice = server.connect("alice", "laptop").await;
    let mut resumed_at = None;
    let object = alice
        .upload(&prepared, &mut |held| {
            resumed_at.get_or_insert(held);
        })
        .await
        .expect("resumed upload");
    assert_eq!(object, prepared.object);
    let resumed_at = resumed_at.expect("progress");
    assert!(resumed_at > 0 && resumed_at < prepared.size, "{resumed_at}");

    // One object, whole, readable by its uploader; nothing left in staging.
    let objects = files_under(&server.dir.path().join("data").join("media").join("objects"));
    let stored: u64 = objects.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(
        stored,
        prepared.size,
        "{:?}",
        objects
            .iter()
            .map(|(p, b)| (p.clone(), b.len()))
            .collect::<Vec<_>>()
    );
    assert!(files_under(&server.dir.path().join("data").join("media").join("staging")).is_empty());
    let out = dir.path().join("back.bin");
    alice
        .download(
            &attachment(&prepared, "big.bin"),
            Through {
                conversation: 0,
                seq: 0,
            },
            &out,
            &mut |_| {},
        )
        .await
        .expect("the uploader reads it back");
    assert_eq!(std::fs::read(&out).expect("read"), data);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn only_members_who_see_the_message_may_download_and_a_stranger_learns_nothing() {
    let server = TestServer::start().await;
    for user in ["bob", "carol", "mallory"] {
        server.register(user).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, data) = sample(dir.path(), "doc.pdf", 100_000);
    let prepared = prepare(&path).await.expect("prepare");
    let alice = server.connect("alice", "phone").await;
    alice.upload(&prepared, &mut |_| {}).await.expect("upload");
    let group = alice
        .create_group("trip", &["bob".to_owned()])
        .await
        .expect("group");
    let conv = alice
        .open(Target::Conversation(group), false)
        .await
        .expect("open");
    let body = Content::Attachment(attachment(&prepared, "doc.pdf")).encode();
    let ack = conv
        .send_referencing(ClientMsgId::random(), body.into(), vec![prepared.object])
        .await
        .expect("send");
    // carol joins after the message.
    conv.add_member("carol").await.expect("add carol");
    let through = Through {
        conversation: group,
        seq: ack.seq,
    };
    let get = |user: &'static str, through: Through| {
        let server = &server;
        let prepared = prepared.clone();
        let dir = dir.path().to_owned();
        async move {
            let c = server.connect(user, "phone").await;
            let out = dir.join(format!("{user}.pdf"));
            let r = c
                .download(
                    &attachment(&prepared, "doc.pdf"),
                    through,
                    &out,
                    &mut |_| {},
                )
                .await;
            c.close().await;
            r.map(|()| std::fs::read(&out).expect("read"))
        }
    };
    assert_eq!(get("bob", through).await.expect("bob, a member"), data);
    let carol = get("carol", through).await.expect_err("carol joined later");
    assert_eq!(code(&carol), Some(ErrorCode::NOT_FOUND));
    // mallory, a stranger, gets for the real id the answer a made-up id gets.
    let mallory = get("mallory", through).await.expect_err("a stranger");
    let mut made_up = prepared.clone();
    made_up.object = ObjectId([7; 32]);
    let c = server.connect("mallory", "phone").await;
    let none = c
        .download(
            &attachment(&made_up, "x"),
            Through {
                conversation: 0,
                seq: 0,
            },
            &dir.path().join("none"),
            &mut |_| {},
        )
        .await
        .expect_err("no such object");
    c.close().await;
    assert_eq!(code(&mallory), Some(ErrorCode::NOT_FOUND));
    assert_eq!(code(&none), Some(ErrorCode::NOT_FOUND));
    let (ClientError::Refused { message: a, .. }, ClientError::Refused { message: b, .. }) =
        (&mallory, &none)
    else {
        panic!("refusals");
    };
    assert_eq!(
        a, b,
        "the stranger can tell an existing id from a made-up one"
    );

    // bob clears his history past the message: he no longer gets the file either.
    {
        let b = server.connect("bob", "laptop").await;
        b.open(Target::Conversation(group), false)
            .await
            .expect("open")
            .clear_history(ack.seq)
            .await
            .expect("clear");
        b.close().await;
    }
    let cleared = get("bob", through).await.expect_err("cleared");
    assert_eq!(code(&cleared), Some(ErrorCode::NOT_FOUND));

    // bob cannot send alice's object as his own; nor can anyone reference a made-up one.
    let bob = server.connect("bob", "phone").await;
    let bconv = bob
        .open(Target::Conversation(group), false)
        .await
        .expect("open");
    let refused = bconv
        .send_referencing(ClientMsgId::random(), "p".into(), vec![prepared.object])
        .await
        .expect_err("not bob's upload");
    assert_eq!(code(&refused), Some(ErrorCode::NOT_FOUND));
    bob.close().await;
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn bytes_that_do_not_match_their_id_and_oversized_uploads_are_refused() {
    let server = TestServer::start_with(|c| c.media.max_size = 1_000_000).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = sample(dir.path(), "f", 50_000);
    let mut prepared = prepare(&path).await.expect("prepare");
    let alice = server.connect("alice", "phone").await;
    // A declared id the bytes do not hash to.
    prepared.object = ObjectId([1; 32]);
    let e = alice
        .upload(&prepared, &mut |_| {})
        .await
        .expect_err("a wrong id");
    assert_eq!(code(&e), Some(ErrorCode::INVALID_REQUEST), "{e}");
    // Over media.max_size.
    let (big, _) = sample(dir.path(), "big", 1_100_000);
    let big = prepare(&big).await.expect("prepare");
    let e = alice
        .upload(&big, &mut |_| {})
        .await
        .expect_err("too large");
    assert_eq!(code(&e), Some(ErrorCode::LIMIT), "{e}");
    // Nothing stored, nothing staged.
    let media = server.dir.path().join("data").join("media");
    assert!(files_under(&media.join("objects")).is_empty());
    assert!(files_under(&media.join("staging")).is_empty());
    alice.close().await;
    server.stop().await;
}

/// Waits until the server's object store holds no file (or panics after 10 s).
async fn store_empties(server: &TestServer) {
    let objects = server.dir.path().join("data").join("media").join("objects");
    let deadline = Instant::now() + Duration::from_secs(10);
    // No part left, and no directory of one.
    let left = |dir: &Path| {
        std::fs::read_dir(dir.join("objects"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    while !files_under(&objects).is_empty() || left(&objects) > 0 {
        assert!(
            Instant::now() < deadline,
            "objects left: {:?}",
            files_under(&objects)
                .iter()
                .map(|f| f.0.clone())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_object_goes_with_the_last_message_that_references_it() {
    let server =
        TestServer::start_with(|c| c.retention.sweep_interval = Duration::from_millis(200)).await;
    server.register("bob").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    let send = |name: &'static str| {
        let alice = &alice;
        let conv = &conv;
        let dir = dir.path().to_owned();
        async move {
            let (path, _) = sample(&dir, name, 70_000);
            let p = prepare(&path).await.expect("prepare");
            alice.upload(&p, &mut |_| {}).await.expect("upload");
            let body = Content::Attachment(attachment(&p, name)).encode();
            let ack = conv
                .send_referencing(ClientMsgId::random(), body.into(), vec![p.object])
                .await
                .expect("send");
            (p, ack.seq)
        }
    };
    // Deleted for everyone: the object goes.
    let (_, seq) = send("a").await;
    conv.delete(seq).await.expect("delete");
    store_empties(&server).await;

    // A disappearing message: the object goes with it.
    conv.set_retention(Retention::Ttl(1)).await.expect("ttl");
    send("b").await;
    store_empties(&server).await;

    // Until delivered: the body may go, the object stays until bob fetched it.
    conv.set_retention(Retention::UntilDelivered)
        .await
        .expect("until delivered");
    let (p, seq) = send("c").await;
    let bob = server.connect("bob", "phone").await;
    let bconv = bob
        .open(Target::Conversation(conv.id()), false)
        .await
        .expect("open");
    bconv.mark_delivered(seq).await.expect("delivered");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let objects = server.dir.path().join("data").join("media").join("objects");
    assert!(
        !files_under(&objects).is_empty(),
        "gone before bob fetched it"
    );
    bob.download(
        &attachment(&p, "c"),
        Through {
            conversation: conv.id(),
            seq,
        },
        &dir.path().join("c.out"),
        &mut |_| {},
    )
    .await
    .expect("bob fetches");
    store_empties(&server).await;

    // An upload no message references goes after media.expire_after; with the default (a
    // day) it stays for now.
    let (path, _) = sample(dir.path(), "d", 10_000);
    let p = prepare(&path).await.expect("prepare");
    alice.upload(&p, &mut |_| {}).await.expect("upload");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!files_under(&objects).is_empty());
    bob.close().await;
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_same_works_on_an_s3_store() {
    use crate::common::s3::{ACCESS_KEY, S3, SECRET_KEY};
    let s3 = S3::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let extra = format!(
        "[retention]\nsweep_interval = \"200ms\"\n{}",
        s3.media_toml()
    );
    let (_server, addr) = crate::common::spawn_server_env(
        &d,
        &extra,
        &[
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ],
    )
    .await;
    let (alice, bob) = (token(&d, "alice"), token(&d, "bob"));
    assert!(plover(&d, &addr, &bob, &["conversations"]).status.success());

    // Five 1 MiB parts in the bucket.
    let (file, data) = sample(&d, "video.mp4", 5_000_000);
    let out = plover(
        &d,
        &addr,
        &alice,
        &[
            "send",
            "--to",
            "bob",
            "--file",
            file.to_str().expect("path"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched = d.join("fetched.mp4");
    let out = plover(
        &d,
        &addr,
        &bob,
        &[
            "fetch",
            "--with",
            "alice",
            "--seq",
            "1",
            "-o",
            fetched.to_str().expect("path"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&fetched).expect("fetched"), data);

    // The bucket holds the parts, ciphertext only.
    let objects = s3.objects().await;
    let ciphertext =
        plover_client::media::ciphertext_size(data.len() as u64, plover_client::media::CHUNK);
    assert_eq!(
        objects.len() as u64,
        ciphertext.div_ceil(plover_server::media::PART),
        "{:?}",
        objects.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    assert_eq!(
        objects.iter().map(|o| o.1.len() as u64).sum::<u64>(),
        ciphertext
    );
    for (name, bytes) in &objects {
        for run in data.chunks(32).step_by(997) {
            assert!(
                !bytes.windows(run.len()).any(|w| w == run),
                "plaintext in {name}"
            );
        }
    }

    // Parts are written create-only: the store refuses to overwrite one (what keeps a
    // retried commit from ever replacing stored bytes).
    let again = s3
        .store()
        .put_opts(
            &object_store::path::Path::from(objects[0].0.as_str()),
            bytes::Bytes::from_static(b"other bytes").into(),
            object_store::PutMode::Create.into(),
        )
        .await;
    assert!(
        matches!(again, Err(object_store::Error::AlreadyExists { .. })),
        "{again:?}"
    );

    // Deleted for everyone: the bucket empties.
    let out = plover(
        &d,
        &addr,
        &alice,
        &["delete", "--conversation", "1", "--seq", "1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = s3.objects().await;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left in the bucket: {}",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_users_uploads_go_no_faster_than_media_upload_rate() {
    // 400 kB a second: a 1.2 MB file cannot take much under three seconds (less the quarter
    // second of burst); a check of the limit, not of speed (it can only be slower).
    let server = TestServer::start_with(|c| c.media.upload_rate = 400_000).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = sample(dir.path(), "f", 1_200_000);
    let prepared = prepare(&path).await.expect("prepare");
    let alice = server.connect("alice", "phone").await;
    let started = Instant::now();
    alice.upload(&prepared, &mut |_| {}).await.expect("upload");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2500), "uploaded in {took:?}");
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_users_downloads_go_no_faster_than_media_download_rate() {
    // The same for downloads, at 400 kB a second; the upload itself is not limited here.
    let server = TestServer::start_with(|c| {
        c.media.download_rate = 400_000;
        c.media.upload_rate = 100_000_000;
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, data) = sample(dir.path(), "f", 1_200_000);
    let prepared = prepare(&path).await.expect("prepare");
    let alice = server.connect("alice", "phone").await;
    alice.upload(&prepared, &mut |_| {}).await.expect("upload");
    let out = dir.path().join("back");
    let started = Instant::now();
    let through = Through {
        conversation: 0,
        seq: 0,
    };
    alice
        .download(&attachment(&prepared, "f"), through, &out, &mut |_| {})
        .await
        .expect("download");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "downloaded in {took:?}"
    );
    assert_eq!(std::fs::read(&out).expect("read"), data);
    alice.close().await;
    server.stop().await;
}

#[tokio::test]
async fn an_image_carries_its_dimensions_and_a_thumbnail_made_on_the_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let (_server, addr) = spawn_server_with(&d, "").await;
    let (alice, bob) = (token(&d, "alice"), token(&d, "bob"));
    assert!(plover(&d, &addr, &bob, &["conversations"]).status.success());
    // A 300x200 gradient, as a PNG.
    let picture = d.join("sunset.png");
    image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 128]))
        .save(&picture)
        .expect("png");
    let out = plover(
        &d,
        &addr,
        &alice,
        &[
            "send",
            "--to",
            "bob",
            "--file",
            picture.to_str().expect("path"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = plover(&d, &addr, &bob, &["history", "--with", "alice", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::to_owned);
    let v: serde_json::Value = serde_json::from_str(&line.expect("a line")).expect("json");
    assert_eq!(v["type"], "attachment");
    assert_eq!(v["media_type"], "image/png");
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(300), Some(200))
    );
    // The thumbnail's size in bytes: a small JPEG, present.
    let thumbnail = v["thumbnail"].as_u64().expect("a thumbnail");
    assert!(thumbnail > 100 && thumbnail < 20_000, "{thumbnail}");
}
