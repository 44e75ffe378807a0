//! `plover bench connections`: idle authenticated connections, the server's memory per
//! connection, the time to connect, and what the idle connections cost the server's CPU
//! (their heartbeats and QUIC keep-alives, the server's timers) while they sit idle for
//! `--duration`.

use anyhow::Result;
use plover_client::Connection;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use super::measure::*;
use super::server::Server;
use super::{progress, rand_u32};

/// The connections scenario: `n` connections, then `idle` with nothing but heartbeats.
pub(crate) async fn connections(target: &Server, n: usize, idle: Duration) -> Result<Value> {
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
    progress(&format!("connections: {open} idle for {idle:?}"));
    let (server0, bench0) = (target.cpu_seconds(), cpu_seconds("self"));
    tokio::time::sleep(idle).await;
    let idle = idle.as_secs_f64();
    let cores = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => json!(((b - a) / idle * 1000.0).round() / 1000.0),
        _ => Value::Null,
    };
    let server_cores = cores(server0, target.cpu_seconds());
    let bench_cores = cores(bench0, cpu_seconds("self"));
    // Microseconds of server CPU each idle connection costs per second.
    let server_us_per_connection = match server_cores.as_f64() {
        Some(c) if open > 0 => json!((c * 1e6 / open as f64 * 100.0).round() / 100.0),
        _ => Value::Null,
    };
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
        "idle_seconds": idle,
        "idle_server_cores": server_cores,
        "idle_bench_cores": bench_cores,
        "idle_server_us_per_connection_second": server_us_per_connection,
    }))
}
