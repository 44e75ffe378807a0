//! Server memory under a stream of malformed and misplaced frames (RELIABILITY.md, row 8): a
//! spawned `plover serve` takes 600 connections that each announce a huge length, the limit
//! plus one, garbage, a truncated frame, a frame on the wrong stream, or an `Open` of a
//! conversation that is not theirs; its resident memory must grow by less than 10 MB.

use crate::common::{rss, spawn_server};
use plover_proto::{ClientFrame, DEFAULT_MAX_FRAME, PROTOCOL_VERSION, Target, codec};
use plover_server::auth::{TokenKeys, load_or_create_secret};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn frame(f: &ClientFrame) -> Vec<u8> {
    codec::encode_to_vec(f, DEFAULT_MAX_FRAME).expect("encode")
}

/// One hostile connection: authenticates, then misbehaves in way `kind`, and waits for the
/// server to close the stream or the connection.
async fn hostile(endpoint: &quinn::Endpoint, addr: SocketAddr, keys: &TokenKeys, kind: usize) {
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut control, mut control_rx) = conn.open_bi().await.expect("control");
    let user = format!("mallory{}", kind % 7);
    let token = keys
        .mint(&user, None, Duration::from_secs(600))
        .expect("mint");
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: token.into(),
        // A device per connection: a device's second connection would replace its first.
        device: format!("raw{kind}"),
        zone: None,
    };
    control.write_all(&frame(&hello)).await.expect("hello");
    let mut welcome = [0u8; 16];
    control_rx.read_exact(&mut welcome).await.expect("welcome");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let limit_plus_one = [0x81, 0x80, 0x04]; // LEB128 of 65,537
    let bytes: Vec<u8> = match kind % 6 {
        0 => vec![0xff, 0xff, 0xff, 0xff, 0x0f],
        1 => limit_plus_one.to_vec(),
        2 => vec![
            0x0a, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9, 0xf8, 0xf7, 0xf6,
        ],
        3 => vec![0x40, 0x01, 0x02], // 64 bytes announced, 2 sent, then the stream ends
        4 => frame(&ClientFrame::Ping { nonce: 1 }),
        _ => frame(&ClientFrame::Open {
            target: Target::Conversation(1),
            create: false,
        }),
    };
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
    // The server answers with an error and closes the stream or the whole connection.
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 256];
        while let Ok(Some(_)) = recv.read(&mut buf).await {}
    })
    .await
    .expect("the server ends the stream or the connection");
    conn.close(0u32.into(), b"done");
}

async fn round(endpoint: &quinn::Endpoint, addr: SocketAddr, keys: &TokenKeys, connections: usize) {
    let mut at_once = tokio::task::JoinSet::new();
    for i in 0..connections {
        let (endpoint, keys) = (endpoint.clone(), keys.clone());
        at_once.spawn(async move { hostile(&endpoint, addr, &keys, i).await });
        if at_once.len() >= 20 {
            at_once.join_next().await.expect("task").expect("hostile");
        }
    }
    while let Some(done) = at_once.join_next().await {
        done.expect("hostile");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_do_not_grow_server_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, addr) = spawn_server(dir.path()).await;
    let pid = child.id().expect("pid");
    let addr: SocketAddr = addr.parse().expect("addr");
    let keys = TokenKeys::new(&load_or_create_secret(&dir.path().join("data")).expect("secret"));
    let roots =
        plover_quic::tls::load_certs(&Path::new(dir.path()).join("certs/cert.pem")).expect("ca");
    let endpoint = plover_client::endpoint(&roots, Duration::from_secs(5)).expect("endpoint");

    // A first round sets up what stays (users, allocator arenas, store caches).
    round(&endpoint, addr, &keys, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(pid);
    round(&endpoint, addr, &keys, 600).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss(pid);
    let growth = after.saturating_sub(before);
    eprintln!(
        "600 hostile connections: server RSS {:.1} MB -> {:.1} MB, growth {:.2} MB",
        before as f64 / 1e6,
        after as f64 / 1e6,
        growth as f64 / 1e6
    );
    assert!(growth < 10_000_000, "server memory grew by {growth} bytes");
    endpoint.wait_idle().await;
}
