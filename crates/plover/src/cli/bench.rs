//! `plover bench`: the load generator, built on the client SDK.
//!
//! It starts its own server (`plover serve` as a child process, on a temporary data directory)
//! unless given `--server`, runs one scenario, verifies that every message reached every
//! intended device exactly once (`lost` and `duplicated` must be 0), and reports latency
//! percentiles beside the transport floor measured in the same run (`echo`: a raw QUIC round
//! trip between two endpoints of this process). Progress goes to stderr; the summary (or, with
//! `--json`, one JSON object) to stdout.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

use plover_client::{ClientConfig, Connection, Conversation, EventStream, Incoming};
use plover_proto::{ClientMsgId, Event, Target};
use plover_server::auth::{TokenKeys, load_or_create_secret};

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
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// The scenario.
    scenario: Scenario,
    /// Target a running server instead of spawning one (needs --data for its secret).
    #[arg(long)]
    server: Option<String>,
    /// With --server: its CA certificate.
    #[arg(long, default_value = "./certs/cert.pem")]
    ca: PathBuf,
    /// With --server: its data directory (the token secret is read from it).
    #[arg(long, default_value = "./plover-data")]
    data: PathBuf,
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
    /// direct, group: how long to send.
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
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    /// The offered rate of `direct`, `group` and `flood`.
    pub(crate) fn rate(&self) -> u64 {
        self.rate.unwrap_or(1000)
    }
}

/// Latencies in nanoseconds.
#[derive(Default, Clone)]
pub(crate) struct Hist(pub(crate) Vec<u64>);

impl Hist {
    pub(crate) fn add(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }

    fn pct(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        Duration::from_nanos(v[i.min(v.len() - 1)])
    }

    pub(crate) fn merge(&mut self, other: Hist) {
        self.0.extend(other.0);
    }

    pub(crate) fn json(&self) -> Value {
        let us = |d: Duration| (d.as_nanos() as f64 / 1000.0 * 10.0).round() / 10.0;
        json!({
            "count": self.0.len(),
            "p50_us": us(self.pct(50.0)),
            "p90_us": us(self.pct(90.0)),
            "p99_us": us(self.pct(99.0)),
            "p999_us": us(self.pct(99.9)),
            "max_us": us(self.pct(100.0)),
        })
    }
}

/// The server under test, and how to reach it.
pub(crate) struct Server {
    pub(crate) addr: String,
    ca: PathBuf,
    pub(crate) keys: TokenKeys,
    child: Option<tokio::process::Child>,
    _dir: Option<tempfile::TempDir>,
    pub(crate) endpoint: quinn::Endpoint,
}

impl Server {
    async fn new(args: &BenchArgs) -> Result<Self> {
        let (addr, ca, data, child, dir) = match &args.server {
            Some(addr) => (addr.clone(), args.ca.clone(), args.data.clone(), None, None),
            None => {
                let dir = tempfile::tempdir()?;
                // A load generator sends faster than any person: the per-user rate limit is
                // lifted, except where the scenario is about that limit.
                let lift = !matches!(args.scenario, Scenario::Flood);
                let extra = match &args.server_config {
                    Some(path) => std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                    None => String::new(),
                };
                let (child, addr) =
                    spawn_server(dir.path(), &args.durability, lift, &extra).await?;
                let ca = dir.path().join("certs").join("cert.pem");
                let data = dir.path().join("data");
                (addr, ca, data, Some(child), Some(dir))
            }
        };
        let keys = TokenKeys::new(&load_or_create_secret(&data)?);
        let roots = plover_quic::tls::load_certs(&ca)?;
        let endpoint = plover_client::endpoint(&roots, Duration::from_secs(5))?;
        Ok(Self {
            addr,
            ca,
            keys,
            child,
            _dir: dir,
            endpoint,
        })
    }

    pub(crate) fn config(&self, user: &str, device: &str) -> Result<ClientConfig> {
        let token = self.keys.mint(user, None, Duration::from_secs(3600))?;
        let mut config = ClientConfig::new(self.addr.clone(), &self.ca, token, device)?;
        config.endpoint = Some(self.endpoint.clone());
        config.connect_timeout = Duration::from_secs(30);
        Ok(config)
    }

    pub(crate) async fn connect(&self, user: &str, device: &str) -> Result<Connection> {
        Ok(Connection::connect(&self.config(user, device)?).await?)
    }

    /// The spawned server's CPU seconds so far, from /proc.
    fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&self.child.as_ref()?.id()?.to_string())
    }

    /// The spawned server's resident memory, from /proc.
    fn server_rss(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

async fn spawn_server(
    dir: &Path,
    durability: &str,
    lift_send_limit: bool,
    extra: &str,
) -> Result<(tokio::process::Child, String)> {
    let exe = std::env::current_exe()?;
    let config = dir.join("bench.toml");
    let mut toml: toml::Table = extra.parse().context("--server-config is not valid TOML")?;
    if lift_send_limit {
        let limits = toml
            .entry("limits")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(limits) = limits.as_table_mut() {
            for limit in ["sends_per_second", "writes_per_second", "frames_per_second"] {
                limits
                    .entry(limit)
                    .or_insert(toml::Value::Integer(1_000_000));
            }
        }
    }
    std::fs::write(&config, toml.to_string())?;
    let mut child = tokio::process::Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--durability", durability])
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--certs")
        .arg(dir.join("certs"))
        .env("PLOVER_LOG", "warn,plover_server::server=info")
        // Its end of the pipe closes when this process ends, however it ends: the server
        // then stops too.
        .arg("--stop-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the server")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tx = Some(tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.split("listening on ").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .context("the server did not start in time")??;
    Ok((child, addr))
}

pub(crate) fn progress(msg: &str) {
    eprintln!("{msg}");
}

/// Runs the scenario and prints its report.
pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    let floor = crate::echo::floor(2000).await?;
    let report = match args.scenario {
        Scenario::Echo => {
            let mut report = json!({"scenario": "echo", "rtt": floor.json()});
            if let Some(rate) = args.rate {
                let load = crate::echo::load(args.connections, rate, args.duration).await?;
                if let (Value::Object(out), Value::Object(load)) = (&mut report, load) {
                    out.extend(load);
                }
            }
            report
        }
        _ => {
            let target = Server::new(&args).await?;
            let before = (target.cpu_seconds(), cpu_seconds("self"));
            let wall = Instant::now();
            let mut report = scenario(&target, &args, &floor).await?;
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
            report
        }
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

/// Runs a scenario against a server.
async fn scenario(target: &Server, args: &BenchArgs, floor: &Hist) -> Result<Value> {
    Ok(match args.scenario {
        Scenario::Echo => json!({"scenario": "echo", "rtt": floor.json()}),
        Scenario::Direct if args.rate() == 0 => find_max(target, args, floor).await?,
        Scenario::Direct => {
            direct(target, args.users, args.rate(), args.duration, floor)
                .await?
                .0
        }
        Scenario::Group => group(target, args, floor).await?,
        Scenario::Catchup => catchup(target, args.messages).await?,
        Scenario::Connections => connections(target, args.connections).await?,
        Scenario::Flood => crate::flood::flood(target, args, floor).await?,
    })
}

/// What the spawned server and this process used from a point on, per unit of work: CPU
/// (the send-and-drain phase of a scenario, without its connection setup) and UDP datagrams.
pub(crate) struct Meter {
    server_pid: Option<String>,
    server: Option<f64>,
    bench: Option<f64>,
    datagrams: Option<u64>,
}

impl Meter {
    /// Starts measuring; `target` is the server under test, if it is a spawned one.
    pub(crate) fn start(target: Option<&Server>) -> Self {
        let server_pid = target
            .and_then(|t| t.child.as_ref()?.id())
            .map(|p| p.to_string());
        Self {
            server: server_pid.as_deref().and_then(cpu_seconds),
            server_pid,
            bench: cpu_seconds("self"),
            datagrams: udp_datagrams_sent(),
        }
    }

    /// Microseconds of CPU per unit since the start, for the server (when spawned) and for
    /// this process, and the UDP datagrams the machine sent per unit (null where /proc cannot
    /// tell). On loopback every datagram is one side's packet to the other; anything else
    /// the machine sends counts too, so read it on an otherwise quiet machine.
    pub(crate) fn per(&self, units: u64) -> Value {
        let units = units.max(1) as f64;
        let per = |before: Option<f64>, after: Option<f64>| {
            Some(((after? - before?) * 1e6 / units).round())
        };
        let datagrams = self
            .datagrams
            .zip(udp_datagrams_sent())
            .map(|(a, b)| ((b - a) as f64 / units * 10.0).round() / 10.0);
        let mut out = json!({
            "bench_us": per(self.bench, cpu_seconds("self")),
            "datagrams": datagrams,
        });
        if let Some(pid) = &self.server_pid {
            out["server_us"] = json!(per(self.server, cpu_seconds(pid)));
        }
        out
    }
}

/// The load generator's QUIC counters, summed over its connections: what its side of the
/// traffic is made of.
#[derive(Default)]
struct Packets {
    sent: u64,
    received: u64,
    ack_frames: u64,
    stream_frames: u64,
    flow_control_frames: u64,
}

impl Packets {
    fn of(conns: &[Arc<Connection>]) -> Self {
        let mut p = Self::default();
        for c in conns {
            let s = c.stats();
            p.sent += s.udp_tx.datagrams;
            p.received += s.udp_rx.datagrams;
            p.ack_frames += s.frame_tx.acks;
            p.stream_frames += s.frame_tx.stream;
            p.flow_control_frames += s.frame_tx.max_data + s.frame_tx.max_stream_data;
        }
        p
    }

    /// Per unit since `before`: datagrams the clients sent and received, and the ACK, stream
    /// and flow-control frames they sent.
    fn since(&self, before: &Packets, units: u64) -> Value {
        let per = |a: u64, b: u64| {
            (a.saturating_sub(b) as f64 / units.max(1) as f64 * 100.0).round() / 100.0
        };
        json!({
            "sent": per(self.sent, before.sent),
            "received": per(self.received, before.received),
            "ack_frames_sent": per(self.ack_frames, before.ack_frames),
            "stream_frames_sent": per(self.stream_frames, before.stream_frames),
            "flow_control_frames_sent": per(self.flow_control_frames, before.flow_control_frames),
        })
    }
}

/// UDP datagrams this machine has sent (`OutDatagrams` in /proc/net/snmp).
fn udp_datagrams_sent() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?.split_whitespace();
    let values = udp.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "OutDatagrams")?
        .1
        .parse()
        .ok()
}

/// CPU seconds (user + system) a process has used: `pid` or "self", from /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th from there, in clock ticks of 1/100 s (USER_HZ on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn print_table(report: &Value) {
    let Some(map) = report.as_object() else {
        return;
    };
    for (key, value) in map {
        match value {
            Value::Object(h) if h.contains_key("p50_us") => {
                println!(
                    "{key:<22} p50 {:>9} us  p90 {:>9} us  p99 {:>9} us  p999 {:>9} us  max {:>9} us  (n={})",
                    h["p50_us"], h["p90_us"], h["p99_us"], h["p999_us"], h["max_us"], h["count"]
                );
            }
            other => println!("{key:<22} {other}"),
        }
    }
}

/// A message body: send time (ns since `epoch`), sender index and counter, padded to 64 bytes.
fn body(epoch: Instant, sender: u32, counter: u64) -> Bytes {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
    b.extend_from_slice(&sender.to_le_bytes());
    b.extend_from_slice(&counter.to_le_bytes());
    b.resize(64, b'.');
    Bytes::from(b)
}

fn parse(body: &[u8]) -> Option<(u64, u32, u64)> {
    Some((
        u64::from_le_bytes(body.get(..8)?.try_into().ok()?),
        u32::from_le_bytes(body.get(8..12)?.try_into().ok()?),
        u64::from_le_bytes(body.get(12..20)?.try_into().ok()?),
    ))
}

/// What the receivers saw.
#[derive(Default)]
struct Seen {
    e2e: Hist,
    unique: HashSet<(u32, u64)>,
    duplicated: u64,
}

/// Reads a user's event stream into `seen` until `stop`.
fn receive(
    mut events: EventStream,
    me: String,
    epoch: Instant,
    seen: Arc<Mutex<Seen>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut stop = stop;
        loop {
            let next = tokio::select! {
                n = events.next() => n,
                _ = stop.changed() => break,
            };
            let Some(Ok(Incoming::Log(e))) = next else {
                if next.is_none() {
                    break;
                }
                continue;
            };
            let Event::Message(m) = e.event else { continue };
            if m.from == me {
                continue;
            }
            let Some((sent, sender, counter)) = parse(&m.body) else {
                continue;
            };
            let now = epoch.elapsed().as_nanos() as u64;
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            s.e2e.add(Duration::from_nanos(now.saturating_sub(sent)));
            if !s.unique.insert((sender, counter)) {
                s.duplicated += 1;
            }
        }
        events.close().await;
    })
}

/// The direct scenario. Returns the report and the end-to-end p99.
pub(crate) async fn direct(
    target: &Server,
    users: usize,
    rate: u64,
    duration: Duration,
    floor: &Hist,
) -> Result<(Value, Duration)> {
    let users = users.max(2) & !1;
    let run = format!("{:x}", rand_u32());
    let epoch = Instant::now();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    progress(&format!("direct: connecting {users} users..."));
    // One device per user, one connection per device: it receives the user's events and
    // sends on the same connection, as an app does.
    let mut streams = Vec::new();
    for i in 0..users {
        let name = format!("d{run}-{i}");
        let mut events = EventStream::start(target.config(&name, "bench")?, Some(u64::MAX));
        if !events.synced().await {
            bail!("user {name} could not sync");
        }
        streams.push((name, events));
    }
    let mut convs: Vec<Arc<Conversation>> = Vec::new();
    let mut receivers = Vec::new();
    let mut conns = Vec::with_capacity(users);
    for (i, (name, events)) in streams.into_iter().enumerate() {
        let conn = events
            .connection()
            .ok_or_else(|| anyhow::anyhow!("user {name} lost its connection"))?;
        conns.push(conn.clone());
        let peer = format!("d{run}-{}", i ^ 1);
        convs.push(Arc::new(conn.open(Target::Direct(peer), true).await?));
        receivers.push(receive(events, name, epoch, seen.clone(), stop_rx.clone()));
    }
    progress(&format!("direct: {rate} msgs/s for {duration:?}"));
    let acked: Arc<Mutex<Vec<(u32, u64)>>> = Arc::default();
    let ack_hist: Arc<Mutex<Hist>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let cpu = Meter::start(Some(target));
    let packets = Packets::of(&conns);
    let start = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut counter: u64 = 0;
    let mut inflight = tokio::task::JoinSet::new();
    let mut last_report = Instant::now();
    while start.elapsed() < duration {
        tick.tick().await;
        let sender = (counter % users as u64) as usize;
        let conv = convs[sender].clone();
        let (acked, ack_hist, errors) = (acked.clone(), ack_hist.clone(), errors.clone());
        let b = body(epoch, sender as u32, counter);
        let c = counter;
        sent.fetch_add(1, Ordering::Relaxed);
        inflight.spawn(async move {
            let t = Instant::now();
            match conv.send_with_id(ClientMsgId::random(), b).await {
                Ok(_) => {
                    ack_hist
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .add(t.elapsed());
                    acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((sender as u32, c));
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        counter += 1;
        while let Some(r) = inflight.try_join_next() {
            let _ = r;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let received = seen.lock().unwrap_or_else(|p| p.into_inner()).unique.len();
            progress(&format!(
                "  {:>5.1}s sent {} received {} in flight {}",
                start.elapsed().as_secs_f64(),
                sent.load(Ordering::Relaxed),
                received,
                inflight.len()
            ));
        }
    }
    let send_time = start.elapsed();
    while inflight.join_next().await.is_some() {}
    // Drain: wait until every acknowledged message has arrived (or 10 s pass).
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = seen.lock().unwrap_or_else(|p| p.into_inner()).unique.len();
        if got >= acked.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_per_message = cpu.per(acked.len() as u64);
    let client_packets = Packets::of(&conns).since(&packets, acked.len() as u64);
    drop(conns);
    let _ = stop_tx.send(true);
    for r in receivers {
        let _ = r.await;
    }
    drop(convs);
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let lost = acked.iter().filter(|k| !seen.unique.contains(k)).count() as u64;
    let ack = ack_hist.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let p50 = seen.e2e.pct(50.0);
    let floor_p50 = floor.pct(50.0);
    let report = json!({
        "scenario": "direct",
        "users": users,
        "offered_rate": rate,
        "achieved_rate": (acked.len() as f64 / send_time.as_secs_f64()).round(),
        "sent": counter,
        "acked": acked.len(),
        "received": seen.unique.len(),
        "lost": lost,
        "duplicated": seen.duplicated,
        "errors": errors.load(Ordering::Relaxed),
        "e2e": seen.e2e.json(),
        "ack": ack.json(),
        "echo_floor": floor.json(),
        "e2e_p50_over_floor_p50": (p50.as_secs_f64() / floor_p50.as_secs_f64().max(1e-9) * 100.0).round() / 100.0,
        "cpu_per_message": cpu_per_message,
        "client_packets_per_message": client_packets,
    });
    Ok((report, seen.e2e.pct(99.0)))
}

/// `direct --rate 0`: raises the rate by half each time until p99 passes 10 ms or the server
/// falls behind; reports the highest rate that held, and every trial. A rate that fails is
/// tried once more before the search ends: on a shared machine one stall of another process
/// can fail a 5 s trial, and a rate the server cannot carry fails twice. A lost message
/// ends the search at once.
async fn find_max(target: &Server, args: &BenchArgs, floor: &Hist) -> Result<Value> {
    let mut rate = 2000u64;
    let mut best: Option<Value> = None;
    let mut trials = Vec::new();
    loop {
        let mut attempt = 0;
        let (report, held) = loop {
            attempt += 1;
            progress(&format!("rate 0: trying {rate} msgs/s"));
            let trial = args.duration.min(Duration::from_secs(5));
            let (report, p99) = direct(target, args.users, rate, trial, floor).await?;
            let achieved = report["achieved_rate"].as_f64().unwrap_or(0.0);
            let lost = report["lost"].as_u64() != Some(0);
            let held = !lost && p99 < Duration::from_millis(10) && achieved >= rate as f64 * 0.95;
            progress(&format!(
                "rate 0: {rate} msgs/s {} (achieved {achieved:.0}, p99 {:.1} ms)",
                if held { "held" } else { "not held" },
                p99.as_secs_f64() * 1000.0
            ));
            trials.push(json!({
                "rate": rate,
                "achieved_rate": achieved,
                "p99_us": (p99.as_secs_f64() * 1e7).round() / 10.0,
                "held": held,
            }));
            if held || lost || attempt == 2 {
                break (report, held);
            }
        };
        if !held {
            let mut out = best.unwrap_or(report);
            out["max_sustained_rate"] = out["achieved_rate"].clone();
            out["next_rate_tried"] = json!(rate);
            out["trials"] = json!(trials);
            return Ok(out);
        }
        best = Some(report);
        rate = rate * 3 / 2;
    }
}

/// The group scenario: time from a send to the last online member's device.
async fn group(target: &Server, args: &BenchArgs, floor: &Hist) -> Result<Value> {
    let run = format!("{:x}", rand_u32());
    let members: Vec<String> = (0..args.members).map(|i| format!("g{run}-{i}")).collect();
    progress(&format!("group: registering {} members...", members.len()));
    for chunk in members.chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for m in chunk {
            let config = target.config(m, "setup")?;
            set.spawn(async move { Connection::connect(&config).await.map(drop) });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
    }
    let sender = target.connect(&members[0], "bench-tx").await?;
    let id = sender.create_group("bench", &members[1..]).await?;
    let conv = sender.open(Target::Conversation(id), false).await?;
    let online = args.online.min(members.len() - 1);
    progress(&format!("group: {online} devices online"));
    let epoch = Instant::now();
    // Per message counter: arrivals and the latest arrival time.
    let arrivals: Arc<Mutex<std::collections::HashMap<u64, (usize, u64)>>> = Arc::default();
    let duplicated = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut conns = Vec::with_capacity(online);
    for m in members.iter().skip(1).take(online) {
        let mut events = EventStream::start(target.config(m, "bench-rx")?, Some(u64::MAX));
        if !events.synced().await {
            bail!("member {m} could not sync");
        }
        conns.extend(events.connection());
        let (arrivals, duplicated, mut stop) =
            (arrivals.clone(), duplicated.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = HashSet::new();
            loop {
                let next = tokio::select! { n = events.next() => n, _ = stop.changed() => break };
                let Some(Ok(Incoming::Log(e))) = next else {
                    if next.is_none() {
                        break;
                    }
                    continue;
                };
                let Event::Message(msg) = e.event else {
                    continue;
                };
                let Some((_, _, counter)) = parse(&msg.body) else {
                    continue;
                };
                if !mine.insert(counter) {
                    duplicated.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let now = epoch.elapsed().as_nanos() as u64;
                let mut a = arrivals.lock().unwrap_or_else(|p| p.into_inner());
                let entry = a.entry(counter).or_insert((0, 0));
                entry.0 += 1;
                entry.1 = entry.1.max(now);
            }
            events.close().await;
        }));
    }
    let conv = Arc::new(conv);
    let sent_at: Arc<Mutex<std::collections::HashMap<u64, u64>>> = Arc::default();
    let interval = Duration::from_secs_f64(1.0 / args.rate().max(1) as f64);
    let mut tick = tokio::time::interval(interval);
    let start = Instant::now();
    let mut counter = 0u64;
    let mut inflight = tokio::task::JoinSet::new();
    let cpu = Meter::start(Some(target));
    let packets = Packets::of(&conns);
    progress(&format!(
        "group: {} msgs/s for {:?}",
        args.rate(),
        args.duration
    ));
    while start.elapsed() < args.duration {
        tick.tick().await;
        let (conv, sent_at) = (conv.clone(), sent_at.clone());
        let b = body(epoch, 0, counter);
        let c = counter;
        let t = epoch.elapsed().as_nanos() as u64;
        inflight.spawn(async move {
            if conv.send_with_id(ClientMsgId::random(), b).await.is_ok() {
                sent_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(c, t);
            }
        });
        counter += 1;
    }
    while inflight.join_next().await.is_some() {}
    let acked = sent_at.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let complete = {
            let a = arrivals.lock().unwrap_or_else(|p| p.into_inner());
            acked
                .keys()
                .filter(|c| a.get(c).is_some_and(|(n, _)| *n == online))
                .count()
        };
        if complete == acked.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_per_message = cpu.per(acked.len() as u64);
    let cpu_per_delivery = cpu.per((acked.len() * online) as u64);
    let client_packets = Packets::of(&conns).since(&packets, (acked.len() * online) as u64);
    drop(conns);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let a = arrivals.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut to_last = Hist::default();
    let mut lost = 0u64;
    for (c, t0) in &acked {
        match a.get(c) {
            Some((n, last)) if *n == online => {
                to_last.add(Duration::from_nanos(last.saturating_sub(*t0)))
            }
            Some((n, _)) => lost += (online - n) as u64,
            None => lost += online as u64,
        }
    }
    drop(conv);
    sender.close().await;
    Ok(json!({
        "scenario": "group",
        "members": members.len(),
        "online_devices": online,
        "offered_rate": args.rate(),
        "sent": counter,
        "acked": acked.len(),
        "lost": lost,
        "duplicated": duplicated.load(Ordering::Relaxed),
        "to_last_member": to_last.json(),
        "echo_floor": floor.json(),
        "cpu_per_message": cpu_per_message,
        "cpu_per_delivery": cpu_per_delivery,
        "member_packets_per_delivery": client_packets,
    }))
}

/// The catch-up scenario.
async fn catchup(target: &Server, messages: u64) -> Result<Value> {
    let run = format!("{:x}", rand_u32());
    let (alice, bob) = (format!("c{run}-a"), format!("c{run}-b"));
    // Bob's device exists and has its place in the log; then it goes offline.
    let mut events = EventStream::start(target.config(&bob, "phone")?, None);
    if !events.synced().await {
        bail!("bob could not sync");
    }
    events.close().await;
    let conn = target.connect(&alice, "tx").await?;
    let conv = Arc::new(conn.open(Target::Direct(bob.clone()), true).await?);
    progress(&format!(
        "catchup: sending {messages} messages while bob is offline..."
    ));
    let mut inflight = tokio::task::JoinSet::new();
    let epoch = Instant::now();
    for i in 0..messages {
        let conv = conv.clone();
        inflight.spawn(async move {
            conv.send_with_id(ClientMsgId::random(), body(epoch, 0, i))
                .await
        });
        if inflight.len() >= 512 {
            inflight.join_next().await;
        }
    }
    while inflight.join_next().await.is_some() {}
    progress("catchup: bob reconnects");
    let start = Instant::now();
    let mut events = EventStream::start(target.config(&bob, "phone")?, None);
    let mut seen = HashSet::new();
    let mut duplicated = 0u64;
    let deadline = start + Duration::from_secs(60);
    while (seen.len() as u64) < messages && Instant::now() < deadline {
        let Ok(Some(Ok(Incoming::Log(e)))) =
            tokio::time::timeout(Duration::from_secs(5), events.next()).await
        else {
            continue;
        };
        if let Event::Message(m) = e.event
            && let Some((_, _, c)) = parse(&m.body)
            && !seen.insert(c)
        {
            duplicated += 1;
        }
    }
    let took = start.elapsed();
    events.close().await;
    drop(conv);
    conn.close().await;
    Ok(json!({
        "scenario": "catchup",
        "messages": messages,
        "received": seen.len(),
        "lost": messages - seen.len() as u64,
        "duplicated": duplicated,
        "catchup_ms": (took.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
        "messages_per_second": (seen.len() as f64 / took.as_secs_f64()).round(),
    }))
}

/// The connections scenario.
async fn connections(target: &Server, n: usize) -> Result<Value> {
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

pub(crate) fn rand_u32() -> u32 {
    let id = ClientMsgId::random();
    u32::from_le_bytes([id.0[0], id.0[1], id.0[2], id.0[3]])
}
