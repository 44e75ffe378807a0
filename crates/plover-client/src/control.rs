//! The control stream: requests that are not about one conversation (ping, lists, groups,
//! presence, pushers, sync) and their answers, the server's presence pushes, the heartbeat.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;
use crate::answers::{Answers, closed_reason, lock, read_answers, refused, stream_failure};
use plover_proto::{ClientFrame, ServerFrame};
use plover_quic::{FrameReader, FrameWriter};

/// Something the server pushed on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlPush {
    /// A peer came online or went offline.
    Presence {
        /// Who.
        user: String,
        /// Online now?
        online: bool,
        /// When their last device went, Unix ms.
        last_seen: u64,
    },
}

/// Pushes buffered for the application before further ones are dropped.
const PUSH_QUEUE: usize = 256;

/// Which answer a control request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Awaiting {
    /// The answer carrying this request id.
    Request(u32),
    /// The `Pong` with this nonce.
    Pong(u64),
}

type ControlWaiter = oneshot::Sender<Result<ServerFrame, ClientError>>;

/// Requests in flight on the control stream, answered by the control reader task.
struct ControlWaiters {
    by_id: HashMap<Awaiting, ControlWaiter>,
    /// `SyncStarted` carries no request id: at most one `Sync` is ever in flight.
    sync: Option<ControlWaiter>,
    failed: Option<ClientError>,
    /// Presence changes, for the application (dropped when it does not keep up).
    pushes: mpsc::Sender<ControlPush>,
}

impl Answers for ControlWaiters {
    fn answer(&mut self, frame: ServerFrame) -> Result<(), ClientError> {
        let (key, answer) = match frame {
            ServerFrame::PresenceChanged {
                user,
                online,
                last_seen,
            } => {
                let _ = self.pushes.try_send(ControlPush::Presence {
                    user,
                    online,
                    last_seen,
                });
                return Ok(());
            }
            ServerFrame::Pong { nonce } => (Some(Awaiting::Pong(nonce)), Ok(frame)),
            ServerFrame::Conversations { request, .. }
            | ServerFrame::PresenceInfo { request, .. }
            | ServerFrame::GroupCreated { request, .. }
            | ServerFrame::Pushers { request, .. }
            | ServerFrame::Blocked { request, .. }
            | ServerFrame::Requests { request, .. }
            | ServerFrame::Done { request, .. } => (Some(Awaiting::Request(request)), Ok(frame)),
            ServerFrame::SyncStarted { .. } => (None, Ok(frame)),
            ServerFrame::Error {
                code,
                message,
                request: Some(request),
            } => (
                Some(Awaiting::Request(request)),
                Err(refused(code, message)),
            ),
            ServerFrame::Error { code, message, .. } if self.sync.is_some() => {
                (None, Err(refused(code, message)))
            }
            ServerFrame::Error { code, message, .. } => return Err(refused(code, message)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected frame on the control stream: {other:?}"
                )));
            }
        };
        let waiter = match key {
            Some(key) => self.by_id.remove(&key),
            None => self.sync.take(),
        };
        if let Some(waiter) = waiter {
            let _ = waiter.send(answer);
        }
        Ok(())
    }

    fn fail_all(&mut self, e: &ClientError) {
        for (_, w) in self.by_id.drain() {
            let _ = w.send(Err(e.clone()));
        }
        if let Some(w) = self.sync.take() {
            let _ = w.send(Err(e.clone()));
        }
        self.failed = Some(e.clone());
    }
}

/// A connection's control stream: its writer, the requests waiting for answers, the task
/// reading them and the heartbeat.
pub(crate) struct Control {
    conn: quinn::Connection,
    writer: Arc<tokio::sync::Mutex<FrameWriter>>,
    waiters: Arc<Mutex<ControlWaiters>>,
    pushes: Mutex<Option<mpsc::Receiver<ControlPush>>>,
    reader: tokio::task::JoinHandle<()>,
    heartbeat: tokio::task::JoinHandle<()>,
    next_request: AtomicU32,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.reader.abort();
        self.heartbeat.abort();
    }
}

impl Control {
    /// Starts reading answers from `reader` and sending a heartbeat every `heartbeat` on
    /// `writer`, once `Welcome` has been read.
    pub(crate) fn start(
        conn: &quinn::Connection,
        reader: FrameReader,
        writer: FrameWriter,
        heartbeat: Duration,
    ) -> Self {
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let waiters = Arc::new(Mutex::new(ControlWaiters {
            by_id: HashMap::new(),
            sync: None,
            failed: None,
            pushes: push_tx,
        }));
        let reader = tokio::spawn(read_answers(reader, waiters.clone(), conn.clone()));
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let heartbeat = tokio::spawn(send_heartbeats(
            writer.clone(),
            heartbeat.max(Duration::from_millis(100)),
        ));
        Self {
            conn: conn.clone(),
            writer,
            waiters,
            pushes: Mutex::new(Some(push_rx)),
            reader,
            heartbeat,
            next_request: AtomicU32::new(1),
        }
    }

    /// A request id not used before on this connection.
    pub(crate) fn request_id(&self) -> u32 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends the request `make` builds around a fresh request id and waits for its answer.
    pub(crate) async fn request(
        &self,
        make: impl FnOnce(u32) -> ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        let request = self.request_id();
        self.call(make(request), Some(Awaiting::Request(request)))
            .await
    }

    /// Sends one control frame and waits for its answer (`None`: the `SyncStarted` slot).
    pub(crate) async fn call(
        &self,
        frame: ClientFrame,
        awaiting: Option<Awaiting>,
    ) -> Result<ServerFrame, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock(&self.waiters);
            if let Some(e) = &w.failed {
                return Err(e.clone());
            }
            match awaiting {
                Some(key) => {
                    w.by_id.insert(key, tx);
                }
                None => w.sync = Some(tx),
            }
        }
        self.send(frame).await?;
        rx.await.map_err(|_| closed_reason(&self.conn))?
    }

    /// Sends a control frame that has no answer.
    pub(crate) async fn send(&self, frame: ClientFrame) -> Result<(), ClientError> {
        self.writer
            .lock()
            .await
            .send(&frame)
            .await
            .map_err(|e| stream_failure(&self.conn, e))
    }

    /// The server's pushes (presence changes of peers). Only the first caller gets them.
    pub(crate) fn take_pushes(&self) -> Option<mpsc::Receiver<ControlPush>> {
        lock(&self.pushes).take()
    }

    /// Finishes the stream, waiting up to `wait` for the server to have everything.
    pub(crate) async fn finish(&self, wait: Duration) {
        self.writer.lock().await.finish(wait).await;
    }
}

/// Sends `Ping` every `interval` (the server's heartbeat) so that the connection is never idle
/// long enough to be taken for dead. The `Pong`s are ignored: QUIC notices a dead peer.
async fn send_heartbeats(control: Arc<tokio::sync::Mutex<FrameWriter>>, interval: Duration) {
    let mut nonce = u64::MAX / 2;
    loop {
        tokio::time::sleep(interval).await;
        nonce += 1;
        if control
            .lock()
            .await
            .send(&ClientFrame::Ping { nonce })
            .await
            .is_err()
        {
            return;
        }
    }
}
