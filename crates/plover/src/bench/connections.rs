//! `plover bench connections`: idle authenticated connections, the server's memory per
//! connection and the time to connect.

use anyhow::Result;
use plover_client::Connection;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use super::measure::*;
use super::server::Server;
use super::{progress, rand_u32};

/// The connections scenario.
pub(crate) async fn connections(target: &Server, n: usize) -> Result<Value> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = target.server_rss();
    let start = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut connect_hist = Hist::default();
    let mut errors = 0u64;
    let run = format!("{:x}", rand_u32());
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for i in chunk {
            let config = target.config(&format!("k{run}-{i}"), "idle")?;
            set.spawn(async move {
                let t = Instant::now();
                Connection::connect(&config).await.map(|c| (c, t.elapsed()))
            });
        }
        while let Some(r) = set.join_next().await {
            match r? {
                Ok((c, d)) => {
                    connect_hist.add(d);
                    conns.push(c);
                }
                Err(_) => errors += 1,
            }
        }
        if conns.len() % 1024 < 64 {
            progress(&format!("connections: {} open", conns.len()));
        }
    }
    let took = start.elapsed();
    // Let the server settle (handshake buffers freed) before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = target.server_rss();
    let per = match (before, after) {
        (Some(b), Some(a)) if !conns.is_empty() => json!(a.saturating_sub(b) / conns.len() as u64),
        _ => Value::Null,
    };
    let open = conns.len();
    for c in conns {
        c.close().await;
    }
    Ok(json!({
        "scenario": "connections",
        "requested": n,
        "open": open,
        "errors": errors,
        "connect_seconds": (took.as_secs_f64() * 100.0).round() / 100.0,
        "connect": connect_hist.json(),
        "server_rss_before": before,
        "server_rss_after": after,
        "bytes_per_connection": per,
    }))
}
