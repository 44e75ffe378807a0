//! The floor a `direct` or `group` run is measured against, taken in the same run just
//! before its load: the raw QUIC pattern at the scenario's rate and connection count (a round
//! trip plus a push; for a group, a round trip plus the fan-out to the last connection), and
//! the `fdatasync` of a small append on the data directory's filesystem. The durable floor is
//! their sum, the transport floor the sum without the fsync.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use super::echo;
use super::measure::Hist;
use super::progress;

/// fsyncs the probe takes: enough for a p999.
const FSYNCS: usize = 2000;
/// The probe's append: about one small message's journal record.
const APPEND: usize = 200;

/// The floors of one run.
pub(crate) struct Floors {
    /// Round trip plus push (or fan-out): the transport alone.
    transport: Hist,
    /// The transport plus one fsync: what a durable message cannot beat.
    durable: Hist,
    /// The parts, for the report.
    report: Value,
}

/// Measures the floors at `rate` over `connections` for `duration` per pattern; `fan_out`
/// for a group (each of the `rate` messages a second goes to every connection); the fsync on
/// `dir`'s filesystem when there is one to write to.
pub(crate) async fn measure(
    connections: usize,
    rate: u64,
    duration: Duration,
    fan_out: bool,
    dir: Option<&Path>,
) -> Result<Floors> {
    progress(&format!(
        "floor: the echo pattern at {rate}/s over {connections} connections"
    ));
    // Only the pattern compared with: a direct run's pushes, or a group's fan-out.
    let bursts = fan_out.then_some(rate as f64);
    let echo = echo::measure(connections, rate, !fan_out, bursts, duration).await?;
    let push = if fan_out {
        &echo.fanout_to_last
    } else {
        &echo.push
    };
    let transport = sum(&echo.round_trip, push);
    let fsync = match dir {
        Some(dir) => {
            progress(&format!("floor: {FSYNCS} fdatasyncs in {}", dir.display()));
            let dir = dir.to_owned();
            Some(tokio::task::spawn_blocking(move || fsync_probe(&dir)).await??)
        }
        None => None,
    };
    let durable = match &fsync {
        Some(fsync) => sum(&transport, fsync),
        None => transport.clone(),
    };
    let report = json!({
        "round_trip": echo.round_trip.json(),
        (if fan_out { "fanout_to_last" } else { "push" }): push.json(),
        "fdatasync": fsync.as_ref().map(Hist::json),
        "transport": transport.json(),
        "durable": durable.json(),
    });
    Ok(Floors {
        transport,
        durable,
        report,
    })
}

impl Floors {
    /// The floor section of a report, with the scenario's latency (`e2e`, a histogram's
    /// JSON) over the floor that applies: the durable one, or in `buffered` mode the
    /// transport's.
    pub(crate) fn compare(&self, e2e: &Value, durable: bool) -> Value {
        let floor = if durable {
            &self.durable
        } else {
            &self.transport
        };
        let ratio = |key: &str, pct: f64| {
            let floor_us = floor.pct(pct).as_secs_f64() * 1e6;
            e2e[key]
                .as_f64()
                .map(|us| (us / floor_us.max(1e-3) * 100.0).round() / 100.0)
        };
        let mut out = self.report.clone();
        out["against"] = json!(if durable { "durable" } else { "transport" });
        out["e2e_p99_over_floor_p99"] = json!(ratio("p99_us", 99.0));
        out["e2e_p999_over_floor_p999"] = json!(ratio("p999_us", 99.9));
        out
    }
}

/// The latency of `FSYNCS` appends of `APPEND` bytes, each followed by `fdatasync`, in a file
/// of `dir` (removed afterwards).
fn fsync_probe(dir: &Path) -> Result<Hist> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(".plover-bench-fsync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let record = [0x5au8; APPEND];
    let mut hist = Hist::default();
    for _ in 0..FSYNCS {
        let start = Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        hist.add(start.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(hist)
}

/// A sample of `a + b`: the i-th of each added, the shorter one taken again from its start.
/// The two were measured apart, so pairing them in order is pairing them at random.
fn sum(a: &Hist, b: &Hist) -> Hist {
    if a.0.is_empty() || b.0.is_empty() {
        return Hist::default();
    }
    let n = a.0.len().max(b.0.len());
    Hist(
        (0..n)
            .map(|i| a.0[i % a.0.len()] + b.0[i % b.0.len()])
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sum_pairs_every_sample_of_the_longer_side() {
        let a = Hist(vec![1, 2, 3, 4]);
        let b = Hist(vec![10, 20]);
        assert_eq!(sum(&a, &b).0, vec![11, 22, 13, 24]);
        assert!(sum(&a, &Hist::default()).0.is_empty());
    }
}
