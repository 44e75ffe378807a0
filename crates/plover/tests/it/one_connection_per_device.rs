//! A connection lives and dies as one, each device holds one live connection, and each user
//! at most `limits.connections_per_user`. Raw clients over real QUIC.

use crate::common::{TestServer, close_code, encode, raw_device, raw_hello};
use plover_proto::{ClientFrame, ClientMsgId, ErrorCode, ServerFrame, Target};
use plover_quic::FrameReader;
use std::time::Duration;

async fn next(reader: &mut FrameReader) -> Option<ServerFrame> {
    tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .expect("a frame in time")
        .ok()
        .flatten()
}

#[tokio::test]
async fn a_reset_control_stream_closes_the_whole_connection() {
    let server = TestServer::start().await;
    server.register("bob").await;
    let (_ep, conn, mut control, _reader) = raw_device(&server, "alice", "phone").await;
    // A conversation stream, open and answering.
    let (mut send, recv) = conn.open_bi().await.expect("bi");
    send.write_all(&encode(&ClientFrame::Open {
        target: Target::Direct("bob".into()),
        create: true,
    }))
    .await
    .expect("open");
    let mut answers = FrameReader::new(recv, 1 << 16);
    assert!(matches!(
        next(&mut answers).await,
        Some(ServerFrame::Opened { .. })
    ));
    // The control stream goes; the connection must go with it.
    control.reset(0u32.into()).expect("reset");
    assert_eq!(close_code(&conn).await, ErrorCode::CONTROL_CLOSED.0);
    // Nothing sent on the old conversation stream is stored.
    let _ = send
        .write_all(&encode(&ClientFrame::Send {
            id: ClientMsgId::random(),
            body: "after the control stream".into(),
        }))
        .await;
    let bob = server.connect("bob", "phone").await;
    let conv = bob
        .open(Target::Direct("alice".into()), false)
        .await
        .expect("open");
    assert_eq!(
        conv.last_seq(),
        0,
        "no message got in after the control stream went"
    );
    drop(conv);
    bob.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_second_connection_of_a_device_replaces_the_first() {
    let server = TestServer::start().await;
    let (_ep1, first, _c1, _r1) = raw_device(&server, "alice", "phone").await;
    let (_ep2, second, mut control, mut reader) = raw_device(&server, "alice", "phone").await;
    assert_eq!(close_code(&first).await, ErrorCode::REPLACED.0);
    // The new one is live.
    control
        .write_all(&encode(&ClientFrame::Ping { nonce: 3 }))
        .await
        .expect("ping");
    assert!(matches!(
        next(&mut reader).await,
        Some(ServerFrame::Pong { nonce: 3 })
    ));
    // The SDK does not reconnect a replaced connection (the two would take turns forever):
    // its event stream ends with `replaced`.
    let mut events = plover_client::EventStream::start(server.config("alice", "phone"), None);
    assert_eq!(close_code(&second).await, ErrorCode::REPLACED.0);
    let (_ep3, third, _c3, _r3) = raw_device(&server, "alice", "phone").await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.next().await {
                Some(Err(e)) => return Some(e.code()),
                Some(Ok(_)) => continue,
                None => return None,
            }
        }
    })
    .await
    .expect("the event stream ends");
    assert_eq!(ended, Some(Some(ErrorCode::REPLACED)));
    assert!(third.close_reason().is_none(), "the raw connection stays");
    server.stop().await;
}

#[tokio::test]
async fn connections_per_user_are_capped() {
    let server = TestServer::start_with(|c| c.limits.connections_per_user = 2).await;
    let (_e1, _a, _ca, _ra) = raw_device(&server, "alice", "a").await;
    let (_e2, _b, _cb, _rb) = raw_device(&server, "alice", "b").await;
    let (_e3, c, _cc, _rc, answer) = raw_hello(&server, "alice", "c").await;
    assert!(
        matches!(
            answer,
            ServerFrame::Error {
                code: ErrorCode::LIMIT,
                ..
            }
        ),
        "{answer:?}"
    );
    assert_eq!(close_code(&c).await, ErrorCode::LIMIT.0);
    // Other users are not affected, and a device already connected may reconnect.
    let (_e4, _bob, _cbob, _rbob) = raw_device(&server, "bob", "a").await;
    let (_e5, _a2, _ca2, _ra2) = raw_device(&server, "alice", "a").await;
    server.stop().await;
}
