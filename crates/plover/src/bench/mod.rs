//! `plover bench`: the load generator, built on the client SDK.
//!
//! It starts its own server (`plover serve` as a child process, on a temporary data directory)
//! unless given `--server`, runs one scenario, verifies that every message reached every
//! intended device exactly once (`lost` and `duplicated` must be 0), and reports latency
//! percentiles beside the transport floor measured in the same run (`echo`: a raw QUIC round
//! trip between two endpoints of this process). Progress goes to stderr; the summary (or, with
//! `--json`, one JSON object) to stdout.
//!
//! # Layout
//!
//! - `measure.rs`: histograms, meters and the delivery check every scenario shares.
//! - `server.rs`: the server under test (spawned, or `--server`).
//! - one file per scenario: `direct.rs`, `group.rs`, `catchup.rs`, `connections.rs`,
//!   `echo.rs` (the transport floor), `flood.rs` (hostile clients) and `log.rs` (a cluster's
//!   replicated-log appends on its NATS servers).

mod catchup;
mod connections;
mod direct;
mod echo;
mod flood;
mod floor;
mod group;
mod log;
mod measure;
mod media;
mod server;
mod stages;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use plover_proto::ClientMsgId;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use measure::*;
use server::Server;

/// What to measure.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Scenario {
    /// N users in pairs, R msgs/s in total for D: end-to-end and ack latency.
    Direct,
    /// One group of G members with K online devices, R msgs/s in: time to the last device.
    Group,
    /// A device offline while M messages arrive, then back: time until it has them all.
    Catchup,
    /// N idle authenticated connections: server memory per connection, connect time.
    Connections,
    /// A raw QUIC round trip, no plover logic: the transport floor.
    Echo,
    /// `direct` quietly, then beside each kind of hostile client in turn (streams past the
    /// limit with sends far past the rate limit, an `Ack` flood, a `Delivered`/`Read` flood,
    /// pipelined `History`, sends to a large group): others' p99 compared with the quiet
    /// run's. The spawned server keeps its per-user limits for this one.
    Flood,
    /// A file of --size bytes up and down (encrypted, as the SDK sends it) beside raw QUIC
    /// stream throughput; the server's memory during the upload; the time to resume a cut
    /// upload; a direct conversation's latency quiet and beside uploads.
    Media,
    /// Appends to a JetStream stream on the NATS servers of --nats as the cluster's
    /// replicated log does (per shard one batch at a time, fenced by the expected last
    /// sequence): latency and rate of a cluster's durable write.
    Log,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// The scenario.
    scenario: Scenario,
    /// Target a running server instead of spawning one (needs --data or --config for its
    /// secret). A cluster's nodes, separated by commas: each user starts on one of them (by
    /// a hash of its name) and falls over to the next.
    #[arg(long)]
    server: Option<String>,
    /// With --server: the server's configuration file (its `[auth] secret` or `data`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// With --server: its CA certificate.
    #[arg(long, default_value = "./certs/cert.pem")]
    ca: PathBuf,
    /// With --server: its data directory (the token secret is read from it).
    #[arg(long, default_value = "./plover-data")]
    data: PathBuf,
    /// With --server: its metrics address (`[metrics] listen`), for the per-stage latencies.
    #[arg(long)]
    server_metrics: Option<String>,
    /// Spawned server: more configuration, a TOML file whose tables are added to the bench's
    /// own (for comparing settings).
    #[arg(long)]
    server_config: Option<PathBuf>,
    /// Spawned server's durability: sync (fsync per batch) or buffered.
    #[arg(long, default_value = "sync")]
    durability: String,
    /// direct: users (in pairs).
    #[arg(long, default_value_t = 100)]
    pub(crate) users: usize,
    /// direct, group: total offered messages per second, 1000 if not given (direct: 0 finds
    /// the maximum rate with p99 under 10 ms; a failing rate is tried twice). echo: when
    /// given, also round trips and then pushes at this rate over --connections connections,
    /// with their CPU and datagram cost.
    #[arg(long)]
    rate: Option<u64>,
    /// direct, group: how long to send. connections: how long to leave them idle while the
    /// server's CPU is measured.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// group: members.
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// group: members with an online device.
    #[arg(long, default_value_t = 10)]
    online: usize,
    /// catchup: messages that arrive while the device is offline.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// connections, echo: how many connections.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// flood: the hostile client's offered sends per second.
    #[arg(long, default_value_t = 5000)]
    pub(crate) flood_rate: u64,
    /// flood: members of the group the hostile client sends to (each message is a log
    /// entry per member).
    #[arg(long, default_value_t = 500)]
    pub(crate) flood_group: usize,
    /// flood: which hostile clients, in turn (streams, acks, marks, history, group).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "streams,acks,marks,history,group"
    )]
    pub(crate) flood_kinds: Vec<String>,
    /// log: the NATS servers, comma-separated.
    #[arg(long, env = "PLOVER_NATS", value_delimiter = ',')]
    pub(crate) nats: Vec<String>,
    /// log: shards appending at once.
    #[arg(long, default_value_t = 8)]
    pub(crate) shards: usize,
    /// log: records (200 bytes each) per append, as a group commit gathers them.
    #[arg(long, default_value_t = 16)]
    pub(crate) batch: usize,
    /// log: replicas of the stream.
    #[arg(long, default_value_t = 3)]
    pub(crate) replicas: usize,
    /// media: the file's size in bytes (suffixes KiB, MiB, GiB). echo: with --bulk, also
    /// raw stream throughput over this many bytes.
    #[arg(long, default_value = "100MiB", value_parser = parse_size)]
    pub(crate) size: u64,
    /// echo: also measure raw QUIC stream throughput (one stream of --size bytes).
    #[arg(long)]
    bulk: bool,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// `100MiB`, `1GiB`, `512KiB`, or plain bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or KiB, MiB, GiB)"))?;
    let unit = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (KiB, MiB, GiB)")),
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl BenchArgs {
    /// The offered rate of `direct`, `group` and `flood`.
    pub(crate) fn rate(&self) -> u64 {
        self.rate.unwrap_or(1000)
    }
}

pub(crate) fn progress(msg: &str) {
    eprintln!("{msg}");
}

/// Runs the scenario and prints its report.
pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    let report = match args.scenario {
        // No plover server, no QUIC: its floor is the NATS servers' own.
        Scenario::Log => log::log(&args).await?,
        _ => run_against_server(&args).await?,
    };
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    let lost = report["lost"].as_u64().unwrap_or(0);
    let duplicated = report["duplicated"].as_u64().unwrap_or(0);
    if lost > 0 || duplicated > 0 {
        bail!("delivery check failed: {lost} lost, {duplicated} duplicated");
    }
    Ok(())
}

/// The scenarios that measure a plover server, beside the QUIC floor of this run.
async fn run_against_server(args: &BenchArgs) -> Result<Value> {
    let floor = echo::floor(2000).await?;
    Ok(match args.scenario {
        Scenario::Echo => {
            let mut report = json!({"scenario": "echo", "rtt": floor.json()});
            if args.bulk {
                let rate = echo::bulk(args.size).await?;
                report["bulk_bytes"] = json!(args.size);
                report["bulk_mbps"] = json!((rate / 1e5).round() / 10.0);
            }
            if let Some(rate) = args.rate {
                let load = echo::load(args.connections, rate, args.duration).await?;
                if let (Value::Object(out), Value::Object(load)) = (&mut report, load) {
                    out.extend(load);
                }
            }
            report
        }
        _ => {
            let target = Server::new(args).await?;
            // The floor in the same run, before the load (and outside its CPU figures).
            let floor_time = args.duration.min(Duration::from_secs(5));
            let floors = match args.scenario {
                Scenario::Direct if args.rate() > 0 => Some(
                    floor::measure(
                        args.users.max(2) & !1,
                        args.rate(),
                        floor_time,
                        false,
                        Some(target.data_dir()),
                    )
                    .await?,
                ),
                Scenario::Group => Some(
                    floor::measure(
                        args.online.max(1),
                        args.rate(),
                        floor_time,
                        true,
                        Some(target.data_dir()),
                    )
                    .await?,
                ),
                _ => None,
            };
            let before = (target.cpu_seconds(), cpu_seconds("self"));
            let wall = Instant::now();
            let mut report = scenario(&target, args, &floor).await?;
            let wall = wall.elapsed().as_secs_f64();
            // Where the two cores went: the server against the load generator, over the whole
            // scenario (setup included).
            if let (Some(s0), Some(b0), Some(s1), Some(b1)) = (
                before.0,
                before.1,
                target.cpu_seconds(),
                cpu_seconds("self"),
            ) {
                let round = |v: f64| (v * 100.0).round() / 100.0;
                report["cpu"] = json!({
                    "wall_seconds": round(wall),
                    "server_seconds": round(s1 - s0),
                    "bench_seconds": round(b1 - b0),
                    "server_cores": round((s1 - s0) / wall),
                    "bench_cores": round((b1 - b0) / wall),
                });
            }
            if let Some(floors) = floors {
                let latency = match args.scenario {
                    Scenario::Group => &report["to_last_member"],
                    _ => &report["e2e"],
                };
                report["floor"] = floors.compare(latency, args.durability != "buffered");
            }
            report
        }
    })
}

/// Runs a scenario against a server.
pub(crate) async fn scenario(target: &Server, args: &BenchArgs, floor: &Hist) -> Result<Value> {
    Ok(match args.scenario {
        Scenario::Echo => json!({"scenario": "echo", "rtt": floor.json()}),
        Scenario::Direct if args.rate() == 0 => direct::find_max(target, args, floor).await?,
        Scenario::Direct => {
            direct::direct(target, args.users, args.rate(), args.duration, floor)
                .await?
                .0
        }
        Scenario::Group => group::group(target, args, floor).await?,
        Scenario::Catchup => catchup::catchup(target, args.messages).await?,
        Scenario::Connections => {
            connections::connections(target, args.connections, args.duration).await?
        }
        Scenario::Flood => flood::flood(target, args, floor).await?,
        Scenario::Media => media::media(target, args, floor).await?,
        Scenario::Log => bail!("bench log measures NATS servers (--nats), not a plover server"),
    })
}

pub(crate) fn print_table(report: &Value) {
    let Some(map) = report.as_object() else {
        return;
    };
    for (key, value) in map {
        match value {
            // In the order a message passes them (a JSON object's keys come sorted).
            Value::Object(stages) if key == "stages" => {
                for stage in plover_server::router::timing::STAGES {
                    if let Some(h) = stages.get(stage) {
                        print_hist(&format!("stage {stage}"), h);
                    }
                }
            }
            Value::Object(floor) if key == "floor" => {
                for (part, v) in floor {
                    match v {
                        Value::Object(h) if h.contains_key("p50_us") => {
                            print_hist(&format!("floor {part}"), v);
                        }
                        other => println!("{:<22} {other}", format!("floor {part}")),
                    }
                }
            }
            Value::Object(h) if h.contains_key("p50_us") => print_hist(key, value),
            other => println!("{key:<22} {other}"),
        }
    }
}

fn print_hist(key: &str, h: &Value) {
    println!(
        "{key:<22} p50 {:>9} us  p90 {:>9} us  p99 {:>9} us  p999 {:>9} us  max {:>9} us  (n={})",
        h["p50_us"], h["p90_us"], h["p99_us"], h["p999_us"], h["max_us"], h["count"]
    );
}

pub(crate) fn rand_u32() -> u32 {
    let id = ClientMsgId::random();
    u32::from_le_bytes([id.0[0], id.0[1], id.0[2], id.0[3]])
}
