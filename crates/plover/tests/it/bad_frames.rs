//! Oversized, truncated, garbage and out-of-place frames get a typed error and a close, and
//! other clients carry on.
use crate::common;

use crate::common::{TestServer, close_code, handshake};
use plover_proto::{ClientFrame, ErrorCode, ServerFrame, Target, codec};
use plover_quic::FrameReader;
use std::time::Duration;

/// A raw QUIC connection with the control stream open, authenticated as `user`.
async fn raw(
    server: &TestServer,
    user: &str,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    FrameReader,
) {
    common::raw_device(server, user, "raw").await
}

async fn next_error(reader: &mut FrameReader) -> Option<ErrorCode> {
    match reader.next::<ServerFrame>().await {
        Ok(Some(ServerFrame::Error { code, .. })) => Some(code),
        _ => None,
    }
}

#[tokio::test]
async fn a_huge_length_prefix_is_refused_without_waiting_for_the_body() {
    let server = TestServer::start().await;
    let bystander = server.connect("carol", "d").await;
    let (_ep, conn, mut send, mut reader) = raw(&server, "mallory").await;
    // u32::MAX announced; no body follows.
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 0x0f])
        .await
        .expect("write");
    assert_eq!(
        next_error(&mut reader).await,
        Some(ErrorCode::FRAME_TOO_LARGE)
    );
    assert_eq!(close_code(&conn).await, ErrorCode::FRAME_TOO_LARGE.0);

    // The limit plus one, on a conversation stream.
    let (_ep, conn, _send, _reader) = raw(&server, "mallory").await;
    let (mut s, _r) = conn.open_bi().await.expect("bi");
    s.write_all(&[0x81, 0x80, 0x04]).await.expect("write"); // 65537
    assert_eq!(close_code(&conn).await, ErrorCode::FRAME_TOO_LARGE.0);

    assert!(bystander.ping().await.is_ok(), "other clients carry on");
    bystander.close().await;
    server.stop().await;
}

#[tokio::test]
async fn garbage_and_truncated_frames_close_with_bad_frame() {
    let server = TestServer::start().await;
    let bystander = server.connect("carol", "d").await;

    // Garbage: a frame whose body is no ClientFrame (variant 200).
    let (_ep, conn, mut send, mut reader) = raw(&server, "mallory").await;
    send.write_all(&[0x02, 0xc8, 0x01]).await.expect("write");
    assert_eq!(next_error(&mut reader).await, Some(ErrorCode::BAD_FRAME));
    assert_eq!(close_code(&conn).await, ErrorCode::BAD_FRAME.0);

    // Truncated: a frame announcing 10 bytes, 3 sent, then the stream ends.
    let (_ep, conn, mut send, _reader) = raw(&server, "mallory").await;
    send.write_all(&[0x0a, 0x01, 0x02, 0x03])
        .await
        .expect("write");
    send.finish().expect("finish");
    assert_eq!(close_code(&conn).await, ErrorCode::BAD_FRAME.0);

    // A garbage Hello before authentication.
    let (_endpoint, conn) = handshake(&server).await;
    let (mut send, _recv) = conn.open_bi().await.expect("bi");
    send.write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    send.finish().expect("finish");
    assert_eq!(close_code(&conn).await, ErrorCode::BAD_FRAME.0);

    assert!(bystander.ping().await.is_ok());
    bystander.close().await;
    server.stop().await;
}

#[tokio::test]
async fn frames_in_the_wrong_place_get_unexpected_frame() {
    let server = TestServer::start().await;
    server.register("bob").await;

    // A Send on the control stream closes the connection.
    let (_ep, conn, mut send, mut reader) = raw(&server, "mallory").await;
    let frame = codec::encode_to_vec(
        &ClientFrame::Send {
            id: plover_proto::ClientMsgId([1; 16]),
            body: bytes::Bytes::from_static(b"x"),
        },
        1 << 16,
    )
    .expect("encode");
    send.write_all(&frame).await.expect("write");
    assert_eq!(
        next_error(&mut reader).await,
        Some(ErrorCode::UNEXPECTED_FRAME)
    );
    assert_eq!(close_code(&conn).await, ErrorCode::UNEXPECTED_FRAME.0);

    // A conversation stream that starts with Send is refused; the connection lives on.
    let (_ep, conn, _send, _reader) = raw(&server, "mallory").await;
    let (mut s, r) = conn.open_bi().await.expect("bi");
    s.write_all(&frame).await.expect("write");
    let mut r = FrameReader::new(r, 1 << 16);
    assert_eq!(next_error(&mut r).await, Some(ErrorCode::UNEXPECTED_FRAME));
    let (mut s, r) = conn.open_bi().await.expect("bi");
    let open = codec::encode_to_vec(
        &ClientFrame::Open {
            target: Target::Direct("bob".into()),
            create: true,
        },
        1 << 16,
    )
    .expect("encode");
    s.write_all(&open).await.expect("write");
    let mut r = FrameReader::new(r, 1 << 16);
    let opened: ServerFrame = r.next().await.expect("read").expect("frame");
    assert!(matches!(opened, ServerFrame::Opened { .. }), "{opened:?}");

    // A body over the limit is refused for that message only.
    let big = codec::encode_to_vec(
        &ClientFrame::Send {
            id: plover_proto::ClientMsgId([2; 16]),
            body: bytes::Bytes::from(vec![b'x'; 62_000]),
        },
        1 << 16,
    )
    .expect("encode");
    s.write_all(&big).await.expect("write");
    match r.next::<ServerFrame>().await.expect("read").expect("frame") {
        ServerFrame::SendFailed { code, .. } => assert_eq!(code, ErrorCode::INVALID_REQUEST),
        other => panic!("expected SendFailed, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_auth_timeout() {
    let server = TestServer::start_with(|c| c.auth.timeout = Duration::from_millis(300)).await;
    let (_endpoint, conn) = handshake(&server).await;
    assert_eq!(close_code(&conn).await, ErrorCode::AUTH_TIMEOUT.0);
    server.stop().await;
}

#[tokio::test]
async fn a_version_2_client_is_still_served_and_a_bad_zone_is_refused() {
    let server = TestServer::start().await;
    // Version 2's Hello ends after the device: variant 0, version, token, device.
    let (_endpoint, conn) = handshake(&server).await;
    let (mut send, recv) = conn.open_bi().await.expect("bi");
    let v2 =
        codec::encode_to_vec(&(0u8, 2u16, server.token("alice"), "d"), 1 << 16).expect("encode");
    send.write_all(&v2).await.expect("write");
    let mut reader = FrameReader::new(recv, 1 << 16);
    match reader.next::<ServerFrame>().await.expect("read") {
        Some(ServerFrame::Welcome { version, user, .. }) => {
            assert_eq!((version, user.as_str()), (2, "alice"));
        }
        other => panic!("not welcomed: {other:?}"),
    }
    let ping = codec::encode_to_vec(&ClientFrame::Ping { nonce: 7 }, 1 << 16).expect("encode");
    send.write_all(&ping).await.expect("write");
    assert_eq!(
        reader.next::<ServerFrame>().await.expect("read"),
        Some(ServerFrame::Pong { nonce: 7 })
    );

    // A zone that is not a zone name is refused like any invalid request.
    let (_endpoint, conn) = handshake(&server).await;
    let (mut send, recv) = conn.open_bi().await.expect("bi");
    let hello = ClientFrame::Hello {
        version: plover_proto::PROTOCOL_VERSION,
        token: server.token("alice").into(),
        device: "e".into(),
        zone: Some("eu west".into()),
    };
    send.write_all(&codec::encode_to_vec(&hello, 1 << 16).expect("encode"))
        .await
        .expect("write");
    let mut reader = FrameReader::new(recv, 1 << 16);
    assert_eq!(
        next_error(&mut reader).await,
        Some(ErrorCode::INVALID_REQUEST)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_protocol_version_is_refused() {
    let server = TestServer::start().await;
    let (_endpoint, conn) = handshake(&server).await;
    let (mut send, recv) = conn.open_bi().await.expect("bi");
    let hello = codec::encode_to_vec(
        &ClientFrame::Hello {
            version: 99,
            token: server.token("alice").into(),
            device: "d".into(),
            zone: None,
        },
        1 << 16,
    )
    .expect("encode");
    send.write_all(&hello).await.expect("write");
    let mut reader = FrameReader::new(recv, 1 << 16);
    assert_eq!(
        next_error(&mut reader).await,
        Some(ErrorCode::UNSUPPORTED_VERSION)
    );
    assert_eq!(close_code(&conn).await, ErrorCode::UNSUPPORTED_VERSION.0);
    server.stop().await;
}
