//! The measuring parts every scenario shares: latency histograms, CPU and datagram meters,
//! message bodies that carry their send time, and the receiver that checks each delivery.

use bytes::Bytes;
use plover_client::{Connection, EventStream, Incoming};
use plover_proto::Event;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::server::Server;

/// Latencies in nanoseconds.
#[derive(Default, Clone)]
pub(crate) struct Hist(pub(crate) Vec<u64>);

impl Hist {
    pub(crate) fn add(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }

    pub(crate) fn pct(&self, p: f64) -> Duration {
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
pub(crate) struct Packets {
    sent: u64,
    received: u64,
    ack_frames: u64,
    stream_frames: u64,
    flow_control_frames: u64,
}

impl Packets {
    pub(crate) fn of(conns: &[Arc<Connection>]) -> Self {
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
    pub(crate) fn since(&self, before: &Packets, units: u64) -> Value {
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
pub(crate) fn udp_datagrams_sent() -> Option<u64> {
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
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th from there, in clock ticks of 1/100 s (USER_HZ on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// A message body: send time (ns since `epoch`), sender index and counter, padded to 64 bytes.
pub(crate) fn body(epoch: Instant, sender: u32, counter: u64) -> Bytes {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
    b.extend_from_slice(&sender.to_le_bytes());
    b.extend_from_slice(&counter.to_le_bytes());
    b.resize(64, b'.');
    Bytes::from(b)
}

pub(crate) fn parse(body: &[u8]) -> Option<(u64, u32, u64)> {
    Some((
        u64::from_le_bytes(body.get(..8)?.try_into().ok()?),
        u32::from_le_bytes(body.get(8..12)?.try_into().ok()?),
        u64::from_le_bytes(body.get(12..20)?.try_into().ok()?),
    ))
}

/// What the receivers saw.
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) e2e: Hist,
    pub(crate) unique: HashSet<(u32, u64)>,
    pub(crate) duplicated: u64,
}

/// Reads a user's event stream into `seen` until `stop`.
pub(crate) fn receive(
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
