//! The SDK against a server that breaks the protocol. A stream that carries a fault may have
//! lost what came after it (an event, a send's answer and with it a log position), so the SDK
//! closes the connection with the fault's code, reconnects, and resumes after its cursor: the
//! events the server holds still arrive, each once, in order.
//!
//! The server here is a script over raw quinn with plover's TLS setup: it is the only way to
//! make a server misbehave on purpose.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use plover_client::{ClientConfig, ClientError, EventStream, Incoming};
use plover_proto::{
    ClientFrame, ClientMsgId, ConversationKind, ErrorCode, Event, Message, PROTOCOL_VERSION,
    ServerFrame, Target,
};
use plover_quic::tls;
use plover_quic::{FrameReader, FrameWriter};
use tokio::sync::mpsc;

const MAX: u32 = plover_proto::DEFAULT_MAX_FRAME;

/// How the first connection goes wrong (or every one, with [`start_faulty`]).
#[derive(Clone, Copy)]
enum Fault {
    /// A delivery stream carries bytes that do not decode after the first event.
    BadEventBytes,
    /// A send is answered with a frame that has no place on a conversation stream (the
    /// message was stored at log position 1; its `Sent` never comes).
    WrongAnswerToSend,
}

/// What the script saw on one connection.
#[derive(Debug)]
struct Seen {
    /// The cursor the client synced with.
    sync: Option<u64>,
    /// How the client closed the connection.
    closed: quinn::ConnectionError,
}

struct Script {
    addr: SocketAddr,
    ca: PathBuf,
    seen: mpsc::UnboundedReceiver<Seen>,
    _dir: tempfile::TempDir,
}

/// The user's log: message 1 is alice's own (sent on the first connection in
/// `WrongAnswerToSend`), message 2 is from bob.
fn log() -> Vec<Event> {
    let message = |seq: u64, from: &str, id: u8| {
        Event::Message(Message {
            conversation: 1,
            seq,
            from: from.into(),
            device: "d".into(),
            ts: 1_000 + seq,
            id: ClientMsgId([id; 16]),
            body: Bytes::from(format!("message {seq}")),
            change: None,
        })
    };
    vec![message(1, "alice", 1), message(2, "bob", 2)]
}

fn start(fault: Fault) -> Script {
    start_with(fault, false)
}

/// A server whose every connection has `fault`.
fn start_faulty(fault: Fault) -> Script {
    start_with(fault, true)
}

fn start_with(fault: Fault, always: bool) -> Script {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (cert, key) =
        plover_server::transport::tls::ensure_dev_cert(dir.path()).expect("a certificate");
    let config = tls::server_config(
        tls::load_certs(&cert).expect("the certificate"),
        tls::load_key(&key).expect("the key"),
    )
    .expect("a TLS config");
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(config).expect("QUIC crypto");
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().expect("an address"),
    )
    .expect("an endpoint");
    let addr = endpoint.local_addr().expect("its address");
    let (tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut first = true;
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let script = serve(conn, (first || always).then_some(fault), tx.clone());
            tokio::spawn(script);
            first = false;
        }
    });
    Script {
        addr,
        ca: cert,
        seen,
        _dir: dir,
    }
}

/// One connection: the handshake, the sync, then the log after the client's cursor on one
/// delivery stream, with `fault` on the way.
async fn serve(conn: quinn::Connection, fault: Option<Fault>, seen: mpsc::UnboundedSender<Seen>) {
    let Ok((send, recv)) = conn.accept_bi().await else {
        return;
    };
    let mut control = FrameReader::new(recv, MAX);
    let mut answers = FrameWriter::new(send, MAX);
    let Ok(Some(ClientFrame::Hello { device, .. })) = control.next().await else {
        panic!("Hello first");
    };
    let welcome = ServerFrame::Welcome {
        version: PROTOCOL_VERSION,
        user: "alice".into(),
        device,
        server_id: "script".into(),
        heartbeat_ms: 10_000,
        max_frame: MAX,
        max_body: 1024,
    };
    answers.send(&welcome).await.expect("Welcome");
    let cursor = loop {
        match control.next().await {
            Ok(Some(ClientFrame::Sync { cursor })) => break cursor,
            Ok(Some(_)) => {}
            _ => return,
        }
    };
    let after = cursor.unwrap_or(0);
    let log = log();
    let sync = ServerFrame::SyncStarted {
        cursor: after,
        head: log.len() as u64,
    };
    answers.send(&sync).await.expect("SyncStarted");
    // Keep reading the control stream (heartbeats, cursor acks) so that it never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = control.next::<ClientFrame>().await {} });

    let (send, _recv) = conn.open_bi().await.expect("a delivery stream");
    let mut events = FrameWriter::new(send, MAX);
    let deliver = |pos: u64| ServerFrame::Event {
        log: pos,
        event: log[(pos - 1) as usize].clone(),
    };
    match fault {
        None => {
            for pos in after + 1..=log.len() as u64 {
                events.send(&deliver(pos)).await.expect("an event");
            }
        }
        Some(Fault::BadEventBytes) => {
            if after == 0 {
                events.send(&deliver(1)).await.expect("an event");
            }
            // A length of 1 and a variant no `ServerFrame` has.
            let mut garbage = vec![Bytes::from_static(&[1, 0xff])];
            events.send_encoded(&mut garbage).await.expect("the bytes");
        }
        Some(Fault::WrongAnswerToSend) => {
            let (send, recv) = conn.accept_bi().await.expect("a conversation stream");
            let mut reader = FrameReader::new(recv, MAX);
            let mut writer = FrameWriter::new(send, MAX);
            let Ok(Some(ClientFrame::Open { .. })) = reader.next().await else {
                panic!("Open first");
            };
            let opened = ServerFrame::Opened {
                conversation: 1,
                kind: ConversationKind::Direct,
                title: String::new(),
                member_count: 2,
                members: vec!["alice".into(), "bob".into()],
                admins: Vec::new(),
                last_seq: 0,
            };
            writer.send(&opened).await.expect("Opened");
            let Ok(Some(ClientFrame::Send { .. })) = reader.next().await else {
                panic!("a Send");
            };
            // Stored as position 1 (and skipped on this feed, as the sender's own), but the
            // answer is not a `Sent`. Bob's message follows on the feed.
            writer
                .send(&ServerFrame::Pong { nonce: 1 })
                .await
                .expect("the wrong answer");
            events.send(&deliver(2)).await.expect("an event");
        }
    }
    let closed = conn.closed().await;
    let _ = seen.send(Seen {
        sync: cursor,
        closed,
    });
}

fn config(script: &Script) -> ClientConfig {
    ClientConfig::new(script.addr.to_string(), &script.ca, "a token", "phone")
        .expect("a client config")
}

/// Takes log events until positions 1 and 2 have come, failing on anything else.
async fn take_both(events: &mut EventStream) -> Vec<u64> {
    let mut positions = Vec::new();
    while positions.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("events in time");
        match next {
            Some(Ok(Incoming::Log(e))) => positions.push(e.pos),
            other => panic!("unexpected {other:?}"),
        }
    }
    positions
}

fn closed_with(seen: &Seen, code: ErrorCode) {
    match &seen.closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from(code.0), "{seen:?}");
        }
        other => panic!("closed by {other:?}, not by the client with {code:?}"),
    }
}

#[tokio::test]
async fn undecodable_bytes_on_a_delivery_stream_close_the_connection_and_the_stream_resumes() {
    let mut script = start(Fault::BadEventBytes);
    let mut events = EventStream::start(config(&script), Some(0));
    assert_eq!(take_both(&mut events).await, [1, 2]);

    let first = script.seen.recv().await.expect("the first connection");
    closed_with(&first, ErrorCode::BAD_FRAME);
    assert_eq!(first.sync, Some(0));
    // The second sync resumes after what the application took: at most position 1.
    events.close().await;
    let second = script.seen.recv().await.expect("the second connection");
    assert!(matches!(second.sync, Some(0 | 1)), "{second:?}");
    closed_with(&second, ErrorCode::NORMAL);
}

#[tokio::test]
async fn a_wrong_answer_to_a_send_fails_it_and_the_lost_position_comes_from_the_store() {
    let mut script = start(Fault::WrongAnswerToSend);
    let mut events = EventStream::start(config(&script), Some(0));
    assert!(events.synced().await);
    let conn = events.connection().expect("the synced connection");
    let conversation = conn
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("opened");
    let sent = conversation
        .send_with_id(ClientMsgId([1; 16]), Bytes::from_static(b"message 1"))
        .await;
    assert!(matches!(sent, Err(ClientError::Protocol(_))), "{sent:?}");
    drop(conversation);
    drop(conn);
    // Position 1 (the message whose answer never came) arrives from the next connection's
    // sync; bob's message 2 arrives on whichever connection gets it first, and only once.
    let mut positions = take_both(&mut events).await;
    positions.sort_unstable();
    assert_eq!(positions, [1, 2]);

    let first = script.seen.recv().await.expect("the first connection");
    closed_with(&first, ErrorCode::UNEXPECTED_FRAME);
    events.close().await;
    let second = script.seen.recv().await.expect("the second connection");
    assert_eq!(second.sync, Some(0), "nothing past the gap is acknowledged");
}

#[tokio::test]
async fn a_server_that_keeps_breaking_the_protocol_is_retried_less_and_less_often() {
    let mut script = start_faulty(Fault::BadEventBytes);
    let events = EventStream::start(config(&script), Some(0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    events.close().await;
    let mut connections = 0;
    // Every connection reports once the client has closed it (the last one just now).
    while let Ok(Some(seen)) =
        tokio::time::timeout(Duration::from_millis(500), script.seen.recv()).await
    {
        connections += 1;
        if connections == 1 {
            closed_with(&seen, ErrorCode::BAD_FRAME);
        }
    }
    // Waits of 0.1, 0.2, 0.4 and 0.8 s between them: five connections at most in 2 s
    // (each of them only a handshake away from the next without the waits).
    assert!(
        (2..=5).contains(&connections),
        "{connections} connections in 2 s"
    );
}
