//! `plover bench log`: appends to a JetStream stream the way the cluster's replicated log
//! appends (ARCHITECTURE.md, "The replicated log"): per shard one batch at a time, each
//! carrying the expected last subject sequence, so the latency measured is what a group
//! commit will wait for before `Sent` in a cluster: the quorum append and the servers'
//! fsync. The NATS servers are the operator's (`--nats`); the stream is made for the run
//! and deleted after it.

use anyhow::{Context, Result};
use async_nats::jetstream::{self, stream};
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
    let js = plover_server::cluster::connect(&config).await?;
    let name = format!("PLOVER_BENCH_{:x}", rand_u32());
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.>")],
        num_replicas: args.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("create the bench stream")?;
    let shards = args.shards.max(1);
    let batch = args.batch.max(1);
    progress(&format!(
        "log: {shards} shards appending batches of {batch} x {RECORD} B, {} replicas, for {:?}",
        args.replicas, args.duration
    ));
    let payload = bytes::Bytes::from(vec![0x5a; RECORD * batch]);
    let cpu = cpu_seconds("self");
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for shard in 0..shards {
        let (js, subject, payload, duration) = (
            js.clone(),
            format!("{name}.{shard}"),
            payload.clone(),
            args.duration,
        );
        writers.spawn(append(js, subject, payload, duration));
    }
    let mut latency = Hist::default();
    let mut retried = 0u64;
    while let Some(done) = writers.join_next().await {
        let (hist, retries) = done??;
        latency.merge(hist);
        retried += retries;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu
        .zip(cpu_seconds("self"))
        .map(|(before, after)| ((after - before) / wall * 100.0).round() / 100.0);
    if let Err(e) = js.delete_stream(&name).await {
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
        "retried_not_ready": retried,
        "bench_cores": cpu,
    }))
}

/// JetStream's answer to an expected last subject sequence it cannot check yet (the
/// leader has not applied the previous append of that subject): nothing was stored, the
/// same append may be sent again. Not 10071, "wrong last sequence: N", which means another
/// writer got there first.
const NOT_READY: u64 = 10164;

/// One shard's writer: appends until `duration` has passed, each append expecting the
/// sequence of the one before (as a shard owner's fenced append does). Returns each
/// append's latency, from its first attempt, and how many attempts JetStream sent back as
/// [`NOT_READY`].
async fn append(
    js: jetstream::Context,
    subject: String,
    payload: bytes::Bytes,
    duration: Duration,
) -> Result<(Hist, u64)> {
    let mut hist = Hist::default();
    let (mut last, mut retried) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < duration {
        let t = Instant::now();
        let ack = loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                last.to_string().as_str(),
            );
            let answer = js
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await?
                .await;
            match answer {
                Ok(ack) => break ack,
                Err(e) if error_code(&e) == Some(NOT_READY) && retried < 10_000 => retried += 1,
                Err(e) => return Err(e).with_context(|| format!("append to {subject}")),
            }
        };
        hist.add(t.elapsed());
        last = ack.sequence;
    }
    Ok((hist, retried))
}

/// The JetStream error code behind a failed publish, if the server sent one.
fn error_code(e: &jetstream::context::PublishError) -> Option<u64> {
    std::error::Error::source(e)?
        .downcast_ref::<jetstream::Error>()
        .map(|e| e.error_code().0)
}
