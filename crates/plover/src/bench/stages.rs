//! The server's per-stage latency over a scenario's measured phase: `plover_stage_seconds`
//! scraped from its `/metrics` before and after, the difference read as percentiles.
//!
//! The histogram's buckets are 20% apart (`plover_server::metrics::stage_buckets`), so a
//! percentile is interpolated within one bucket and `max_us` is the upper bound of the highest
//! bucket that filled: both within 20% of the true figure.

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use plover_server::metrics::names::STAGE_SECONDS;
use plover_server::router::timing::STAGES;

/// Each stage's cumulative bucket counts, by upper bound, at one scrape.
#[derive(Debug, Default, Clone)]
pub(crate) struct Snapshot(BTreeMap<String, Vec<(f64, u64)>>);

/// Reads the stage histograms from the `/metrics` at `addr` (host:port).
pub(crate) async fn scrape(addr: &str) -> Result<Snapshot> {
    let text = tokio::time::timeout(Duration::from_secs(10), get_metrics(addr))
        .await
        .context("the server's /metrics did not answer in time")??;
    Ok(parse(&text))
}

async fn get_metrics(addr: &str) -> Result<String> {
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the server's metrics at {addr}"))?;
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: plover\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => bail!(
            "the server's /metrics answered {:?}",
            response.lines().next()
        ),
    }
}

/// Picks the `plover_stage_seconds_bucket{stage="..",le=".."} N` lines out of Prometheus text.
fn parse(text: &str) -> Snapshot {
    let prefix = format!("{STAGE_SECONDS}_bucket{{stage=\"");
    let mut stages: BTreeMap<String, Vec<(f64, u64)>> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((stage, rest)) = rest.split_once("\",le=\"") else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse() {
                Ok(le) => le,
                Err(_) => continue,
            }
        };
        let Ok(count) = count.trim().parse::<u64>() else {
            continue;
        };
        stages
            .entry(stage.to_owned())
            .or_default()
            .push((le, count));
    }
    for buckets in stages.values_mut() {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Snapshot(stages)
}

impl Snapshot {
    /// Each stage's percentiles over what was recorded between `before` and `self`, in the
    /// order a message passes them, shaped like the bench's own histograms (`p50_us`, ...).
    pub(crate) fn since(&self, before: &Snapshot) -> Value {
        let mut out = Map::new();
        for stage in STAGES {
            let Some(after) = self.0.get(stage) else {
                continue;
            };
            let earlier = before.0.get(stage);
            let buckets: Vec<(f64, u64)> = after
                .iter()
                .map(|(le, n)| {
                    let was = earlier
                        .and_then(|b| b.iter().find(|(l, _)| l == le))
                        .map_or(0, |(_, n)| *n);
                    (*le, n.saturating_sub(was))
                })
                .collect();
            let count = buckets.last().map_or(0, |(_, n)| *n);
            if count == 0 {
                continue;
            }
            let us = |seconds: f64| (seconds * 1e7).round() / 10.0;
            out.insert(
                stage.to_owned(),
                json!({
                    "count": count,
                    "p50_us": us(quantile(&buckets, 0.50)),
                    "p90_us": us(quantile(&buckets, 0.90)),
                    "p99_us": us(quantile(&buckets, 0.99)),
                    "p999_us": us(quantile(&buckets, 0.999)),
                    "max_us": us(highest(&buckets)),
                }),
            );
        }
        Value::Object(out)
    }
}

/// The `q` quantile of cumulative buckets, interpolated within its bucket (as Prometheus'
/// `histogram_quantile` does); the last finite bound when it falls in `+Inf`.
fn quantile(buckets: &[(f64, u64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0, |(_, n)| *n);
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(le, n) in buckets {
        if n as f64 >= rank && n > lower.1 {
            if le.is_infinite() {
                return lower.0;
            }
            let within = (rank - lower.1 as f64) / (n - lower.1) as f64;
            return lower.0 + (le - lower.0) * within.clamp(0.0, 1.0);
        }
        lower = (le, n);
    }
    lower.0
}

/// The upper bound of the highest bucket that holds anything (the last finite one for
/// `+Inf`).
fn highest(buckets: &[(f64, u64)]) -> f64 {
    let total = buckets.last().map_or(0, |(_, n)| *n);
    let mut last_finite = 0.0;
    for &(le, n) in buckets {
        if n == total {
            return if le.is_infinite() { last_finite } else { le };
        }
        if le.is_finite() {
            last_finite = le;
        }
    }
    last_finite
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_from_the_difference_of_two_scrapes() {
        let before = parse(
            "plover_stage_seconds_bucket{stage=\"ack\",le=\"0.001\"} 5\n\
             plover_stage_seconds_bucket{stage=\"ack\",le=\"0.002\"} 5\n\
             plover_stage_seconds_bucket{stage=\"ack\",le=\"0.004\"} 5\n\
             plover_stage_seconds_bucket{stage=\"ack\",le=\"+Inf\"} 5\n",
        );
        // 100 more: 90 at or under 1 ms, 9 in (1, 2] ms, 1 in (2, 4] ms.
        let after = parse(
            "# TYPE plover_stage_seconds histogram\n\
             plover_stage_seconds_bucket{stage=\"ack\",le=\"0.001\"} 95\n\
             plover_stage_seconds_bucket{stage=\"ack\",le=\"0.002\"} 104\n\
             plover_stage_seconds_bucket{stage=\"ack\",le=\"0.004\"} 105\n\
             plover_stage_seconds_bucket{stage=\"ack\",le=\"+Inf\"} 105\n\
             plover_stage_seconds_sum{stage=\"ack\"} 0.2\n",
        );
        let report = after.since(&before);
        let ack = &report["ack"];
        assert_eq!(ack["count"], 100);
        // Rank 50 of 90 in the first bucket: 50/90 of the way to 1 ms.
        assert_eq!(ack["p50_us"], 555.6);
        // Rank 99 is the 9th of 9 in (1, 2] ms.
        assert_eq!(ack["p99_us"], 2000.0);
        // Rank 99.9 is nine tenths of the one in (2, 4] ms.
        assert_eq!(ack["p999_us"], 3800.0);
        assert_eq!(ack["max_us"], 4000.0);
        // A stage with nothing new is left out.
        assert!(report.get("reply").is_none());
    }
}
