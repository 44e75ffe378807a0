//! Metrics and health over plain HTTP on a separate address (off by default).
//!
//! The library records through the `metrics` facade (a no-op until a recorder is installed);
//! `main.rs` installs the Prometheus recorder and hands its renderer to the server, which serves
//! `/metrics` (Prometheus text), `/healthz` (the process is up) and `/readyz` (the store accepts
//! writes) here. The HTTP side is deliberately tiny: GET only, one request per connection,
//! requests larger than 8 KiB refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Renders the metrics as Prometheus text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Metric names, in one place.
pub mod names {
    /// Gauge: authenticated connections.
    pub const CONNECTIONS: &str = "plover_connections";
    /// Gauge: cluster shards this node holds the lease of.
    pub const SHARDS_OWNED: &str = "plover_cluster_shards_owned";
    /// Counter: shard leases this node lost (deposed, or not renewed within the lease).
    pub const SHARDS_LOST: &str = "plover_cluster_shards_lost_total";
    /// Counter: log appends JetStream answered "not ready" (10164) and that were sent again.
    pub const LOG_NOT_READY: &str = "plover_cluster_log_not_ready_total";
    /// Histogram: seconds from sending an append to the cluster log to its acknowledgement.
    pub const LOG_APPEND_SECONDS: &str = "plover_cluster_log_append_seconds";
    /// Histogram: entries per append to the cluster log.
    pub const LOG_APPEND_ENTRIES: &str = "plover_cluster_log_append_entries";
    /// Counter: appends to the cluster log sent again after a failure.
    pub const LOG_APPEND_RETRIES: &str = "plover_cluster_log_append_retries_total";
    /// Gauge: the stream sequence of the last cluster log message this node applied.
    pub const LOG_APPLIED: &str = "plover_cluster_log_applied";
    /// Counter: messages stored.
    pub const MESSAGES_IN: &str = "plover_messages_in_total";
    /// Counter: events handed to device queues.
    pub const DELIVERIES: &str = "plover_deliveries_total";
    /// Counter: devices switched from live delivery to catch-up from the store.
    pub const CATCH_UP: &str = "plover_catch_up_switches_total";
    /// Histogram: seconds from a send reaching its shard to its durable ack.
    pub const ACK_SECONDS: &str = "plover_ack_seconds";
    /// Histogram: seconds to hand one commit's events to the device queues.
    pub const FANOUT_SECONDS: &str = "plover_fanout_seconds";
    /// Counter: items committed, by `kind` (message, marks, deleted, wait, cursor, barrier).
    pub const COMMIT_ITEMS: &str = "plover_commit_items_total";
    /// Histogram: items per group commit.
    pub const COMMIT_BATCH: &str = "plover_commit_batch_size";
    /// Histogram: seconds per group commit (write and fsync).
    pub const COMMIT_SECONDS: &str = "plover_commit_seconds";
    /// Gauge: notifications waiting to be sent.
    pub const PUSH_PENDING: &str = "plover_push_pending";
    /// Gauge: conversation states held in memory, by `shard`.
    pub const CACHED_CONVERSATIONS: &str = "plover_cached_conversations";
    /// Gauge: the members of the conversation states held (`store.cached_members`), by `shard`.
    pub const CACHED_MEMBERS: &str = "plover_cached_members";
    /// Gauge: users' log heads held in memory (`store.cached_logs`).
    pub const CACHED_LOG_HEADS: &str = "plover_cached_log_heads";
    /// Counter: entries dropped from a bounded cache, by `cache` (conversations, log_heads,
    /// device_cursors),
    /// to be read from the store again when next used. A steady rate means the cache is
    /// smaller than the working set.
    pub const CACHE_DROPS: &str = "plover_cache_drops_total";
    /// Counter: frames after which a connection's reader waited, past its frame budget
    /// (`limits.frames_per_second`).
    pub const FRAMES_HELD_BACK: &str = "plover_frames_held_back_total";
    /// Histogram: seconds a message spent in each `stage` (`router::timing::STAGES`), with
    /// buckets fine enough ([`stage_buckets`](super::stage_buckets)) for a p999 from a scrape.
    pub const STAGE_SECONDS: &str = "plover_stage_seconds";
    /// Counter: requests refused past a user's budget of writes (`limits.writes_per_second`)
    /// or of write requests (`limits.sends_per_second`).
    pub const WRITES_REFUSED: &str = "plover_writes_refused_total";
}

/// Latency buckets, in seconds: 100 us to 5 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The buckets of [`names::STAGE_SECONDS`]: from 10 us to about 13 s, each 20% above the
/// last (78 buckets), so a percentile read from them is within 20% of the true one.
pub fn stage_buckets() -> Vec<f64> {
    std::iter::successors(Some(10e-6_f64), |b| Some(b * 1.2))
        .take_while(|b| *b < 15.0)
        // Three significant digits, so that the `le` labels read as they are meant.
        .map(|b| format!("{b:.2e}").parse().unwrap_or(b))
        .collect()
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let (render, ready) = (render.clone(), ready.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            let head = loop {
                let read =
                    tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf[len..]))
                        .await;
                match read {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => len += n,
                }
                if let Some(end) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
                    break String::from_utf8_lossy(&buf[..end]).into_owned();
                }
                if len == buf.len() {
                    let _ = socket
                        .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
            };
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, content_type, body) = match (method, path) {
                ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", render()),
                ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
                ("GET", "/readyz") if ready() => ("200 OK", "text/plain", "ready\n".to_owned()),
                ("GET", "/readyz") => (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready: the store refuses writes\n".to_owned(),
                ),
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_owned(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
