//! The event stream of a device: catch-up after its cursor, then live events, across
//! reconnects, each event once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::{ClientConfig, ClientError};
use crate::answers::{LogEvent, close_violated};
use crate::connection::Connection;
use crate::control::ControlPush;
use plover_proto::{ClientFrame, ConversationId, ErrorCode, Event, ServerDatagram, ServerFrame};
use plover_quic::{FrameReader, FrameWriter};

/// Events buffered between the network and the application.
const EVENT_QUEUE: usize = 1024;

/// The device's position in its sync log: every position up to `cursor` has been taken by the
/// application; `ahead` holds positions taken past a gap (events arrive on one stream per
/// conversation, so across conversations they may arrive out of order).
#[derive(Debug, Default)]
pub struct CursorTracker {
    cursor: u64,
    ahead: BTreeSet<u64>,
}

impl CursorTracker {
    /// A tracker that has everything up to `cursor`.
    pub fn new(cursor: u64) -> Self {
        Self {
            cursor,
            ahead: BTreeSet::new(),
        }
    }

    /// The contiguous position: safe to resume after and to acknowledge.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Records `pos`; returns false when it was seen before.
    pub fn take(&mut self, pos: u64) -> bool {
        if pos <= self.cursor || !self.ahead.insert(pos) {
            return false;
        }
        while self.ahead.remove(&(self.cursor + 1)) {
            self.cursor += 1;
        }
        true
    }

    /// The server resumed at `cursor` (it may have clamped ours).
    fn reset_to(&mut self, cursor: u64) {
        if cursor < self.cursor {
            // The server has less than we thought (restored from backup, or our cursor was
            // ahead): take its word, and keep nothing from past it.
            self.cursor = cursor;
            self.ahead.clear();
        }
    }
}

/// What an event stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// An entry of the user's sync log (a message, a receipt), each exactly once.
    Log(LogEvent),
    /// A peer came online or went offline (not stored; may be missed while disconnected).
    Presence {
        /// Who.
        user: String,
        /// Online now?
        online: bool,
        /// When their last device went, Unix ms.
        last_seen: u64,
    },
    /// A member is typing; show it for a few seconds ([`TYPING_TTL`]) unless repeated.
    Typing {
        /// The conversation.
        conversation: ConversationId,
        /// Who.
        user: String,
    },
}

/// How long a typing indicator lasts unless repeated. Clients repeat theirs every
/// [`TYPING_REPEAT`] while typing goes on.
pub const TYPING_TTL: Duration = Duration::from_secs(5);
/// How often a client repeats its typing indicator while the user types.
pub const TYPING_REPEAT: Duration = Duration::from_secs(3);

/// What the driver hands the application side.
enum Item {
    Log(LogEvent),
    /// A message this device sent on the synced connection, made from its `Sent` answer.
    Own(LogEvent),
    Other(Incoming),
    Failed(ClientError),
}

/// Events for this device, in order per conversation, each once, surviving reconnects.
///
/// Taking an event from [`EventStream::next`] counts as having it: the cursor advances and is
/// acknowledged to the server shortly after (and on [`EventStream::close`]).
pub struct EventStream {
    rx: mpsc::Receiver<Item>,
    tracker: Arc<Mutex<CursorTracker>>,
    stop: watch::Sender<bool>,
    synced: watch::Receiver<u64>,
    current: watch::Receiver<Option<Arc<Connection>>>,
    driver: tokio::task::JoinHandle<()>,
    /// The device's own messages that came back before an earlier position: each waits until
    /// the cursor reaches it, so that events keep their log order within a conversation.
    parked: BTreeMap<u64, LogEvent>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("cursor", &self.cursor())
            .finish()
    }
}

fn lock(t: &Mutex<CursorTracker>) -> std::sync::MutexGuard<'_, CursorTracker> {
    // Held for a few set operations, never across an await.
    t.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EventStream {
    /// Connects (reconnecting as needed) and delivers events after `cursor`, or after the
    /// position the server last saw this device acknowledge when `None`.
    pub fn start(config: ClientConfig, cursor: Option<u64>) -> Self {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let tracker = Arc::new(Mutex::new(CursorTracker::new(cursor.unwrap_or(0))));
        let (stop, stop_rx) = watch::channel(false);
        let (synced_tx, synced) = watch::channel(0);
        let (current_tx, current) = watch::channel(None);
        let driver = tokio::spawn(drive(
            config,
            cursor.is_some(),
            tracker.clone(),
            tx,
            Signals {
                stop: stop_rx,
                synced: synced_tx,
                current: current_tx,
            },
        ));
        Self {
            rx,
            tracker,
            stop,
            synced,
            current,
            driver,
            parked: BTreeMap::new(),
        }
    }

    /// Waits until the server has started delivery on the current connection (live events
    /// sent from now on will reach this stream). Returns false if the stream ended first.
    pub async fn synced(&mut self) -> bool {
        self.synced.wait_for(|n| *n > 0).await.is_ok()
    }

    /// The connection events arrive on, once synced (`None` while reconnecting). Open
    /// conversations on it to send over the device's one connection rather than a second one:
    /// the server then spends one connection (about 36 KB) per device instead of two, and
    /// the device's ACKs ride on fewer packets. After a reconnect, conversations opened on the old
    /// connection fail with a retryable error; open them again on the new one. Drop it before
    /// [`EventStream::close`] for a clean close (the last cursor acknowledged).
    pub fn connection(&self) -> Option<Arc<Connection>> {
        self.current.borrow().clone()
    }

    /// The next new event, or an error that ends the stream (the server refused the token,
    /// say). `None` once closed.
    pub async fn next(&mut self) -> Option<Result<Incoming, ClientError>> {
        loop {
            // (Saturating: a stream started from the head holds u64::MAX until it syncs.)
            let next = self.cursor().saturating_add(1);
            // Parked copies of what the feed has since delivered are dropped; the next one in
            // line goes out.
            self.parked = self.parked.split_off(&next);
            let event = match self.parked.remove(&next) {
                Some(own) => own,
                None => match self.rx.recv().await? {
                    Item::Log(e) => e,
                    Item::Own(e) if e.pos > next => {
                        self.parked.insert(e.pos, e);
                        continue;
                    }
                    Item::Own(e) => e,
                    Item::Other(incoming) => return Some(Ok(incoming)),
                    Item::Failed(e) => return Some(Err(e)),
                },
            };
            if lock(&self.tracker).take(event.pos) {
                return Some(Ok(Incoming::Log(event)));
            }
        }
    }

    /// The device's contiguous position.
    pub fn cursor(&self) -> u64 {
        lock(&self.tracker).cursor()
    }

    /// Acknowledges the cursor, closes the connection, and waits for both to reach the server.
    pub async fn close(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), self.driver).await;
    }
}

/// How the driver and the application's side of the stream talk.
struct Signals {
    /// Set when the application closes the stream.
    stop: watch::Receiver<bool>,
    /// Counts successful syncs.
    synced: watch::Sender<u64>,
    /// The synced connection, for [`EventStream::connection`].
    current: watch::Sender<Option<Arc<Connection>>>,
}

/// Connects, syncs and forwards events until stopped; reconnects with backoff on failure.
async fn drive(
    config: ClientConfig,
    explicit_cursor: bool,
    tracker: Arc<Mutex<CursorTracker>>,
    tx: mpsc::Sender<Item>,
    signals: Signals,
) {
    let Signals {
        mut stop,
        synced,
        current,
    } = signals;
    let mut backoff = FIRST_BACKOFF;
    let mut first = true;
    // Where the last server sent this device when it stopped (`moved`), tried first once.
    let mut moved: Option<String> = None;
    loop {
        let target = match moved.take() {
            Some(to) => {
                let mut c = config.clone();
                c.server = format!("{to},{}", config.server);
                c
            }
            None => config.clone(),
        };
        let conn = tokio::select! {
            c = Connection::connect(&target) => c,
            _ = stop.changed() => return,
        };
        let conn = match conn {
            Ok(c) => Arc::new(c),
            Err(e) if e.is_retryable() => {
                debug!(error = %e, "connect failed; retrying");
                if !pause(&mut backoff, &mut stop).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                let _ = tx.send(Item::Failed(e)).await;
                return;
            }
        };
        // Messages sent on this connection come back in their answers, not on the feed.
        let (own_tx, mut own_rx) = mpsc::unbounded_channel();
        conn.deliver_own_sends(own_tx);
        // The first sync uses the caller's cursor (or the server's memory of this device);
        // later ones resume after what the application has taken.
        let cursor = if first && !explicit_cursor {
            None
        } else {
            Some(lock(&tracker).cursor())
        };
        first = false;
        let started = match conn.start_sync(cursor).await {
            Ok((cursor, _head)) => cursor,
            Err(e) if e.is_retryable() => {
                debug!(error = %e, "sync failed; reconnecting");
                if !pause(&mut backoff, &mut stop).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                let _ = tx.send(Item::Failed(e)).await;
                return;
            }
        };
        {
            let mut t = lock(&tracker);
            if cursor.is_none() {
                *t = CursorTracker::new(started);
            } else {
                t.reset_to(started);
            }
        }
        current.send_replace(Some(conn.clone()));
        synced.send_modify(|n| *n += 1);
        let since = tokio::time::Instant::now();
        let stopped = run_connection(&conn, &tx, &mut own_rx, &tracker, started, &mut stop).await;
        current.send_replace(None);
        if stopped {
            let cursor = lock(&tracker).cursor();
            let _ = conn.control_send(ClientFrame::Ack { cursor }).await;
            match Arc::try_unwrap(conn) {
                Ok(conn) => conn.close().await,
                // The application still holds it: close without waiting for the control stream.
                Err(shared) => shared
                    .quic()
                    .close(quinn::VarInt::from(ErrorCode::NORMAL.0), b"bye"),
            }
            return;
        }
        if tx.is_closed() {
            return;
        }
        // Another connection of this device took its place (the same device name used
        // twice): reconnecting would replace that one in turn, and the two would take turns
        // forever. The stream ends with the server's reason instead.
        if let Some(quinn::ConnectionError::ApplicationClosed(close)) = conn.quic().close_reason()
            && close.error_code == quinn::VarInt::from(ErrorCode::REPLACED.0)
        {
            let e = ClientError::from(quinn::ConnectionError::ApplicationClosed(close));
            let _ = tx.send(Item::Failed(e)).await;
            return;
        }
        // A node of a cluster that stops sends its devices to another: reconnect there, now.
        if let Some(quinn::ConnectionError::ApplicationClosed(close)) = conn.quic().close_reason()
            && close.error_code == quinn::VarInt::from(ErrorCode::MOVED.0)
            && !close.reason.is_empty()
        {
            moved = Some(String::from_utf8_lossy(&close.reason).into_owned());
            backoff = FIRST_BACKOFF;
            continue;
        }
        // A connection that lasted a while is reconnected at once (a server restart); one
        // that failed soon after it started (a server that keeps breaking the protocol, or
        // keeps dropping us) waits longer each time.
        if since.elapsed() >= STABLE_CONNECTION {
            backoff = FIRST_BACKOFF;
        } else if !pause(&mut backoff, &mut stop).await {
            return;
        }
    }
}

/// The first wait before reconnecting; it doubles with each failure in a row, up to 5 s.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Waits `backoff` and doubles it; false if the stream was closed meanwhile.
async fn pause(backoff: &mut Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(*backoff) => {}
        _ = stop.changed() => return false,
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    true
}

/// Reads the delivery streams, pushes and datagrams of one connection and acknowledges the
/// cursor (the connection sends its own heartbeats). Returns true when asked to stop, false when the connection
/// failed.
async fn run_connection(
    conn: &Connection,
    tx: &mpsc::Sender<Item>,
    own: &mut mpsc::UnboundedReceiver<LogEvent>,
    tracker: &Mutex<CursorTracker>,
    started: u64,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let quic = conn.quic().clone();
    let max = conn.welcome().max_frame;
    let mut readers = tokio::task::JoinSet::new();
    let mut ack_tick = tokio::time::interval(CURSOR_ACK_INTERVAL);
    let mut pushes = conn.take_pushes();
    // What the server already has for this device: the cursor it resumed at.
    let mut acked = started;
    loop {
        tokio::select! {
            stream = quic.accept_bi() => match stream {
                Ok((send, recv)) => {
                    readers.spawn(read_deliveries(
                        FrameReader::new(recv, max),
                        FrameWriter::new(send, max),
                        tx.clone(),
                        Arc::from(conn.user()),
                        quic.clone(),
                    ));
                }
                Err(e) => {
                    debug!(error = %e, "connection lost; reconnecting");
                    return false;
                }
            },
            Some(event) = own.recv() => {
                let _ = tx.send(Item::Own(event)).await;
            }
            Some(push) = async { pushes.as_mut()?.recv().await } => {
                let ControlPush::Presence { user, online, last_seen } = push;
                let _ = tx.send(Item::Other(Incoming::Presence { user, online, last_seen })).await;
            }
            datagram = quic.read_datagram() => {
                if let Ok(bytes) = datagram
                    && let Ok(ServerDatagram::Typing { conversation, user }) =
                        postcard::from_bytes(&bytes)
                    {
                        // Dropped rather than waited for: typing is worthless once late.
                        let _ = tx.try_send(Item::Other(Incoming::Typing { conversation, user }));
                    }
            }
            _ = ack_tick.tick() => {
                let cursor = lock(tracker).cursor();
                if cursor > acked && conn.control_send(ClientFrame::Ack { cursor }).await.is_ok() {
                    acked = cursor;
                }
            }
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
            _ = stop.changed() => return true,
        }
    }
}

/// How long a connection must have lasted for the next reconnect to be immediate.
const STABLE_CONNECTION: Duration = Duration::from_secs(5);

/// How often the cursor is acknowledged while it moves (and once more on a clean close). The
/// server keeps it only to resume a device that syncs without a cursor, so a crash repeats at
/// most this much; every 200 ms cost 12% more server CPU and 1.6 more packets per message in
/// `plover bench direct` (1000 users, 4,000 msgs/s).
pub const CURSOR_ACK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a delivery stream waits for more messages before it reports `Delivered`: a
/// message that arrives alone is reported this long after it arrived, and one report covers
/// every message of a burst.
pub const DELIVERED_DELAY: Duration = Duration::from_millis(50);

/// How long a report may wait while messages keep arriving less than [`DELIVERED_DELAY`]
/// apart: a busy conversation (a large group) costs one report a second per device rather than
/// twenty. In `plover bench group` (500 members, 50 msgs/s) the members' frames fell from
/// 0.33 to 0.06 per delivery, and the server's CPU per delivery by 30%; see BENCHMARKS.md.
pub const DELIVERED_MAX_DELAY: Duration = Duration::from_secs(1);

/// Reads one delivery stream; reports `Delivered` on it once the stream has been quiet for
/// [`DELIVERED_DELAY`], or [`DELIVERED_MAX_DELAY`] after the first unreported message.
/// The user's own messages are not reported (membership changes are): sending already moved
/// the sender's marks past them.
async fn read_deliveries(
    mut reader: FrameReader,
    mut writer: FrameWriter,
    tx: mpsc::Sender<Item>,
    me: Arc<str>,
    quic: quinn::Connection,
) {
    let mut received = 0;
    let mut reported = 0;
    let mut due: Option<tokio::time::Instant> = None;
    // When the first message the next report covers arrived.
    let mut waiting: Option<tokio::time::Instant> = None;
    loop {
        // `FrameReader::next` keeps partial frames in the reader: losing the race to the
        // timer loses nothing.
        let next = match due {
            Some(at) => tokio::select! {
                next = reader.next::<ServerFrame>() => next,
                () = tokio::time::sleep_until(at) => {
                    due = None;
                    waiting = None;
                    if received > reported {
                        if writer.send(&ClientFrame::Delivered { up_to: received }).await.is_err() {
                            return;
                        }
                        reported = received;
                    }
                    continue;
                }
            },
            None => reader.next::<ServerFrame>().await,
        };
        match next {
            Ok(Some(ServerFrame::Event { log, event })) => {
                if let Event::Message(m) = &event
                    && (*m.from != *me || m.change.is_some())
                {
                    received = received.max(m.seq);
                }
                if tx
                    .send(Item::Log(LogEvent { pos: log, event }))
                    .await
                    .is_err()
                {
                    return;
                }
                if received > reported {
                    let now = tokio::time::Instant::now();
                    let first = *waiting.get_or_insert(now);
                    due = Some((now + DELIVERED_DELAY).min(first + DELIVERED_MAX_DELAY));
                }
            }
            Ok(Some(other)) => {
                let reason = format!("unexpected frame on a delivery stream: {other:?}");
                close_violated(&quic, ErrorCode::UNEXPECTED_FRAME, &reason);
                return;
            }
            end => {
                if let Err(e) = &end
                    && let Some(code) = e.violation()
                {
                    close_violated(&quic, code, &e.to_string());
                    return;
                }
                if received > reported {
                    let _ = writer
                        .send(&ClientFrame::Delivered { up_to: received })
                        .await;
                }
                writer.finish(Duration::from_millis(100)).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_advances_over_contiguous_positions_only() {
        let mut t = CursorTracker::new(3);
        assert!(!t.take(2));
        assert!(t.take(5));
        assert_eq!(t.cursor(), 3);
        assert!(!t.take(5));
        assert!(t.take(4));
        assert_eq!(t.cursor(), 5);
        assert!(t.take(6));
        assert_eq!(t.cursor(), 6);
    }

    fn message(pos: u64, seq: u64) -> LogEvent {
        LogEvent {
            pos,
            event: Event::Message(plover_proto::Message {
                conversation: 1,
                seq,
                from: "al".into(),
                device: "phone".into(),
                ts: 0,
                id: plover_proto::ClientMsgId([0; 16]),
                body: bytes::Bytes::from_static(b"x"),
                change: None,
            }),
        }
    }

    /// An event stream fed by hand: what the driver would hand it, in this order.
    fn fed(items: Vec<Item>) -> EventStream {
        fed_after(0, items)
    }

    fn fed_after(cursor: u64, items: Vec<Item>) -> EventStream {
        let (tx, rx) = mpsc::channel(items.len().max(1));
        for item in items {
            tx.try_send(item).expect("room");
        }
        let (stop, _) = watch::channel(false);
        let (_, synced) = watch::channel(1);
        let (_, current) = watch::channel(None);
        EventStream {
            rx,
            tracker: Arc::new(Mutex::new(CursorTracker::new(cursor))),
            stop,
            synced,
            current,
            driver: tokio::spawn(async {}),
            parked: BTreeMap::new(),
        }
    }

    async fn positions(mut events: EventStream) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(Ok(Incoming::Log(e))) = events.next().await {
            out.push(e.pos);
        }
        out
    }

    #[tokio::test]
    async fn an_own_message_waits_for_the_positions_before_it() {
        // The answer to the device's send (position 3) overtakes the peer's two messages.
        let events = fed(vec![
            Item::Own(message(3, 3)),
            Item::Log(message(1, 1)),
            Item::Log(message(2, 2)),
        ]);
        assert_eq!(positions(events).await, [1, 2, 3]);
    }

    #[tokio::test]
    async fn an_own_message_also_read_from_the_store_comes_once() {
        let events = fed(vec![
            Item::Own(message(2, 2)),
            Item::Log(message(1, 1)),
            Item::Log(message(2, 2)),
            Item::Own(message(3, 3)),
            Item::Log(message(3, 3)),
        ]);
        assert_eq!(positions(events).await, [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_stream_from_the_head_can_be_read_before_it_syncs() {
        // `Some(u64::MAX)` until the server says where the head is.
        let events = fed_after(u64::MAX, vec![Item::Own(message(1, 1))]);
        assert_eq!(positions(events).await, Vec::<u64>::new());
    }
}
