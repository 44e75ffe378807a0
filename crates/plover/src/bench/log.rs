//! `plover bench log`: appends through the cluster's shard log (`cluster::log::ShardLog`)
//! as a shard owner does: per shard one batch at a time, each expecting the sequence of the
//! one before, so the latency measured is what a group commit will wait for before `Sent`
//! in a cluster: the quorum append and the servers' fsync. The NATS servers are the
//! operator's (`--nats`); the stream is made for the run and deleted after it.

use anyhow::{Context, Result};
use plover_server::cluster::log::ShardLog;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use super::measure::{Hist, cpu_seconds};
use super::{BenchArgs, progress, rand_u32};

/// The size of one record: about a small message with its log entries.
const RECORD: usize = 200;

pub(crate) async fn log(args: &BenchArgs) -> Result<Value> {
    if args.nats.is_empty() {
        anyhow::bail!("bench log needs the cluster's NATS servers: --nats URL[,URL...]");
    }
    let mut config = plover_server::config::ClusterConfig::client(args.nats.clone());
    config.node = "bench".into();
    config.replicas = args.replicas;
    let js = plover_server::cluster::connect(&config).await?;
    let log = ShardLog::open(js, &format!("PLOVER_BENCH_{:x}", rand_u32()), &config)
        .await
        .context("create the bench stream")?;
    let shards = args.shards.max(1);
    let batch = args.batch.max(1);
    progress(&format!(
        "log: {shards} shards appending batches of {batch} x {RECORD} B, {} replicas, for {:?}",
        args.replicas, args.duration
    ));
    let record = vec![0x5a; RECORD * batch];
    let cpu = cpu_seconds("self");
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for shard in 0..u32::try_from(shards)? {
        let (log, record, duration) = (log.clone(), record.clone(), args.duration);
        writers.spawn(async move { append(&log, shard, &record, duration).await });
    }
    let mut latency = Hist::default();
    let mut not_ready = 0u64;
    while let Some(done) = writers.join_next().await {
        let (hist, retries) = done??;
        latency.merge(hist);
        not_ready += retries;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu
        .zip(cpu_seconds("self"))
        .map(|(before, after)| ((after - before) / wall * 100.0).round() / 100.0);
    let name = log.name().to_owned();
    if let Err(e) = log.delete().await {
        progress(&format!(
            "log: the bench stream {name} was not deleted: {e}"
        ));
    }
    let appends = latency.0.len() as f64;
    Ok(json!({
        "scenario": "log",
        "replicas": args.replicas,
        "shards": shards,
        "batch": batch,
        "record_bytes": RECORD,
        "appends": latency.0.len(),
        "appends_per_second": (appends / wall).round(),
        "records_per_second": (appends * batch as f64 / wall).round(),
        "append": latency.json(),
        "retried_not_ready": not_ready,
        "bench_cores": cpu,
    }))
}

/// One shard's writer: appends until `duration` has passed. Returns each append's latency
/// (its retries included) and how many times JetStream answered "not ready".
async fn append(
    log: &ShardLog,
    shard: u32,
    record: &[u8],
    duration: Duration,
) -> Result<(Hist, u64)> {
    let mut hist = Hist::default();
    let (mut last, mut not_ready) = (log.last(shard).await?, 0u64);
    let started = Instant::now();
    while started.elapsed() < duration {
        let t = Instant::now();
        let appended = log.append(shard, last, record).await?;
        hist.add(t.elapsed());
        last = appended.sequence;
        not_ready += u64::from(appended.not_ready);
    }
    Ok((hist, not_ready))
}
