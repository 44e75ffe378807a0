//! Answers: the readers that hand each frame a stream carries to whoever waits for it, and
//! what a failed stream or a broken protocol turns into.

use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

use crate::ClientError;
use plover_proto::{ErrorCode, Event, ServerFrame};
use plover_quic::FrameReader;

/// One event and its position in the user's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    /// Position in the user's sync log.
    pub pos: u64,
    /// What happened.
    pub event: Event,
}

/// Where the events of this connection's own sends go: the event stream syncing on it, if
/// any. The server does not send a message back to the connection it was sent on; its `Sent`
/// answer carries the message's log position, and the event is made here from what was sent.
/// Unbounded but never long: it holds at most one event per answered send, and the server
/// answers at most `inflight_sends` per stream on a bounded number of streams.
pub(crate) type OwnEvents = Arc<Mutex<Option<mpsc::UnboundedSender<LogEvent>>>>;

/// The waiters of one stream's answers, served by [`read_answers`].
pub(crate) trait Answers {
    /// Hands one frame to whoever waits for it; an error ends the stream for everyone.
    fn answer(&mut self, frame: ServerFrame) -> Result<(), ClientError>;
    /// Fails every waiter, and every later request, with `e`.
    fn fail_all(&mut self, e: &ClientError);
}

/// Reads a stream's answers (the control stream's or a conversation's) and hands each to its
/// waiter until the stream ends, then fails whoever still waits.
pub(crate) async fn read_answers<W: Answers>(
    mut reader: FrameReader,
    waiters: Arc<Mutex<W>>,
    conn: quinn::Connection,
) {
    loop {
        let frame = match reader.next::<ServerFrame>().await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                lock(&waiters).fail_all(&closed_reason(&conn));
                return;
            }
            Err(e) => {
                let violation = e.violation().map(|code| (code, e.to_string()));
                lock(&waiters).fail_all(&stream_failure(&conn, e));
                if let Some((code, reason)) = violation {
                    close_violated(&conn, code, &reason);
                }
                return;
            }
        };
        let mut w = lock(&waiters);
        if let Err(e) = w.answer(frame) {
            w.fail_all(&e);
            drop(w);
            if let ClientError::Protocol(reason) = &e {
                close_violated(&conn, ErrorCode::UNEXPECTED_FRAME, reason);
            }
            return;
        }
    }
}

/// Maps what the server said in an `Error` frame to an error.
pub(crate) fn refused(code: ErrorCode, message: String) -> ClientError {
    ClientError::Refused { code, message }
}

/// The error for an answer of the wrong kind.
pub(crate) fn unexpected(expected: &str, got: &ServerFrame) -> ClientError {
    ClientError::Protocol(format!("expected {expected}, got {got:?}"))
}

/// The error to report when a stream failed: the connection's close reason if it has one.
pub(crate) fn stream_failure(conn: &quinn::Connection, e: plover_quic::StreamError) -> ClientError {
    match conn.close_reason() {
        Some(reason) => ClientError::from(reason),
        None => ClientError::Stream(Arc::new(e)),
    }
}

/// Closes the connection because the server broke the protocol on one of its streams (bytes
/// that are not a frame, a frame that does not belong there). Whatever that stream carried
/// after the fault is lost with it, an answer or an event, so the connection cannot be trusted
/// to be complete: closing it makes the event stream reconnect and resume after its cursor,
/// which fills any gap from the server's store.
pub(crate) fn close_violated(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    tracing::warn!(
        code = code.name(),
        reason,
        "the server broke the protocol; closing"
    );
    // The reason travels in the CONNECTION_CLOSE frame: keep it well inside one packet.
    let mut end = reason.len().min(200);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(quinn::VarInt::from(code.0), &reason.as_bytes()[..end]);
}

/// Only map operations happen under these locks, never an await.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn closed_reason(conn: &quinn::Connection) -> ClientError {
    match conn.close_reason() {
        Some(reason) => ClientError::from(reason),
        None => ClientError::Closed("stream"),
    }
}
