//! A client that pipelines `History` on every stream it may open and never reads the answers
//! holds the server to a bounded amount of memory, and gives it back when it goes. Before the
//! byte bounds, one such connection raised the server's resident memory from 17 MB to 532 MB
//! (each stream queued 256 answers of up to 64 KiB, and every page decoded 500 messages).

use crate::common::{encode, rss, spawn_server, spawned_client};
use bytes::Bytes;
use plover_client::Connection;
use plover_proto::{ClientFrame, PROTOCOL_VERSION, ServerFrame, Target};
use plover_quic::FrameReader;
use plover_server::auth::{TokenKeys, load_or_create_secret};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_history_without_reading_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, addr) = spawn_server(dir.path()).await;
    let pid = child.id().expect("pid");
    let keys = TokenKeys::new(&load_or_create_secret(&dir.path().join("data")).expect("secret"));
    let client = |user: &str, device: &str| spawned_client(dir.path(), &addr, &keys, user, device);

    // Something to page through: 600 messages of 2 KiB (a 500-message page is cut at 64 KiB).
    Connection::connect(&client("bob", "setup"))
        .await
        .expect("bob")
        .close()
        .await;
    let alice = Connection::connect(&client("alice", "setup"))
        .await
        .expect("alice");
    let conv = Arc::new(
        alice
            .open(Target::Direct("bob".into()), true)
            .await
            .expect("open"),
    );
    let body = Bytes::from(vec![b'h'; 2048]);
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..600 {
        let (conv, body) = (conv.clone(), body.clone());
        sends.spawn(async move { conv.send(body).await.expect("send") });
    }
    while sends.join_next().await.is_some() {}
    let conversation = conv.id();
    drop(conv);
    alice.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(pid);

    // The hostile connection: 16 streams, each with 4,000 `History` requests, never read.
    let roots = plover_quic::tls::load_certs(&dir.path().join("certs/cert.pem")).expect("ca");
    let endpoint = plover_client::endpoint(&roots, Duration::from_secs(5)).expect("ep");
    let conn = endpoint
        .connect(addr.parse().expect("addr"), "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut control, recv) = conn.open_bi().await.expect("control");
    control
        .write_all(&encode(&ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token: keys
                .mint("bob", None, Duration::from_secs(600))
                .expect("mint")
                .into(),
            device: "hostile".into(),
            zone: None,
        }))
        .await
        .expect("hello");
    let mut reader = FrameReader::new(recv, 1 << 16);
    assert!(matches!(
        reader.next::<ServerFrame>().await,
        Ok(Some(ServerFrame::Welcome { .. }))
    ));
    let mut requests = encode(&ClientFrame::Open {
        target: Target::Conversation(conversation),
        create: false,
    });
    for request in 0..4000 {
        requests.extend(encode(&ClientFrame::History {
            request,
            before: None,
            after: None,
            limit: 500,
        }));
    }
    let mut streams = Vec::new();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (mut send, recv) = conn.open_bi().await.expect("stream");
        streams.push(recv);
        let requests = requests.clone();
        // The server stops taking them once flow control holds the client: give up then.
        writers.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), send.write_all(&requests)).await;
            send
        });
    }
    let mut sends = Vec::new();
    while let Some(send) = writers.join_next().await {
        sends.push(send.expect("writer"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss(pid);
    conn.close(0u32.into(), b"done");
    drop((sends, streams));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss(pid);
    eprintln!(
        "server RSS: {:.1} MB before, {:.1} MB with 16 streams of unread history, {:.1} MB after",
        before as f64 / 1e6,
        during as f64 / 1e6,
        after as f64 / 1e6
    );
    let growth = during.saturating_sub(before);
    assert!(
        growth < 48_000_000,
        "unread answers grew the server by {growth} bytes"
    );
    endpoint.wait_idle().await;
}
