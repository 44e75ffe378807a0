//! The transport floor: raw QUIC between two endpoints of this process, TLS 1.3 and all, no
//! plover logic.
//!
//! [`floor`] is a ping-pong on one idle connection, the latency every scenario is reported
//! beside. [`load`] carries round trips and pushes over many connections at a given rate, with
//! the packet pattern of plover's own traffic (a send and its ack; a delivery on a stream the
//! server opened), and reports what they cost in CPU and in datagrams: the least a plover
//! message can cost on this machine, whatever plover does.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::measure::{Hist, Meter};
use super::progress;

/// The frame every exchange carries: about the size of a small plover `Send` or `Event`.
const FRAME: usize = 104;
/// A push carrying this stamp tells the reader that the pushes are over.
const LAST: u64 = u64::MAX;

/// A server endpoint and a client endpoint of this process, trusting each other.
struct Endpoints {
    server: quinn::Endpoint,
    client: quinn::Endpoint,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Endpoints {
    fn new() -> Result<Self> {
        use plover_quic::tls;
        let dir = tempfile::tempdir()?;
        let (cert, key) = plover_server::transport::tls::ensure_dev_cert(dir.path())?;
        let chain = tls::load_certs(&cert)?;
        let config = tls::server_config(chain.clone(), tls::load_key(&key)?)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(config)?;
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse()?,
        )?;
        let addr = server.local_addr()?;
        let client = plover_client::endpoint(&chain, Duration::from_secs(5))?;
        Ok(Self {
            server,
            client,
            addr,
            _dir: dir,
        })
    }

    async fn connect(&self) -> Result<quinn::Connection> {
        Ok(self.client.connect(self.addr, "localhost")?.await?)
    }
}

/// Echoes every frame read on `recv` back on `send` until the peer finishes.
async fn echo_back(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut buf = [0u8; FRAME];
    while recv.read_exact(&mut buf).await.is_ok() {
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
}

/// Ping-pong of one frame on one stream, `rounds` times after a warm-up.
pub(crate) async fn floor(rounds: usize) -> Result<Hist> {
    let ends = Endpoints::new()?;
    let server = ends.server.clone();
    let serving = tokio::spawn(async move {
        let Some(incoming) = server.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        if let Ok((send, recv)) = conn.accept_bi().await {
            echo_back(send, recv).await;
        }
    });
    let conn = ends.connect().await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = [7u8; FRAME];
    let mut hist = Hist::default();
    for i in 0..rounds + 100 {
        let start = Instant::now();
        send.write_all(&buf).await?;
        recv.read_exact(&mut buf).await?;
        if i >= 100 {
            hist.add(start.elapsed());
        }
    }
    conn.close(0u32.into(), b"done");
    serving.abort();
    Ok(hist)
}

/// One client connection of [`load`]: its echo stream and the push stream the server opened.
struct Client {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    pushes: quinn::RecvStream,
}

/// Accepts connections; on each, opens a push stream (handed to `streams`) and echoes the
/// stream the client opens.
async fn serve(server: quinn::Endpoint, streams: mpsc::Sender<quinn::SendStream>) {
    let mut connections = JoinSet::new();
    while let Some(incoming) = server.accept().await {
        let streams = streams.clone();
        connections.spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let Ok((mut push, _)) = conn.open_bi().await else {
                return;
            };
            // A stream becomes known to the peer with its first bytes.
            if push.write_all(&[0; FRAME]).await.is_err() || streams.send(push).await.is_err() {
                return;
            }
            if let Ok((send, recv)) = conn.accept_bi().await {
                echo_back(send, recv).await;
            }
        });
    }
}

/// Round trips, then pushes, then fan-out pushes, each at `rate` per second over `connections`
/// connections for `duration`. Connections take turns, so each sees one exchange every
/// `connections / rate` seconds, as a device in a `direct` or `group` run does. (Which push
/// stream a connection got does not matter: every one is written in turn.)
pub(crate) async fn load(connections: usize, rate: u64, duration: Duration) -> Result<Value> {
    let bursts = (rate as f64 / connections.max(1) as f64).max(0.1);
    Ok(measure(connections, rate, true, Some(bursts), duration)
        .await?
        .report)
}

/// What [`measure`] found: its report, and the latencies themselves.
pub(crate) struct Floor {
    pub(crate) report: Value,
    pub(crate) round_trip: Hist,
    pub(crate) push: Hist,
    pub(crate) fanout_to_last: Hist,
}

/// [`load`], keeping the latencies for the scenarios that compare with them. The round trips
/// always run; the spread pushes only with `spread`, the fan-out (to every connection
/// `bursts` times a second) only when given: a scenario measures the pattern it compares
/// with, and an empty histogram stands for a phase not run.
pub(crate) async fn measure(
    connections: usize,
    rate: u64,
    spread: bool,
    bursts: Option<f64>,
    duration: Duration,
) -> Result<Floor> {
    let n = connections.max(1);
    let rate = rate.max(1);
    let ends = Endpoints::new()?;
    let (streams_tx, mut streams_rx) = mpsc::channel(n);
    let serving = tokio::spawn(serve(ends.server.clone(), streams_tx));
    progress(&format!("echo: connecting {n} connections..."));
    let mut clients = Vec::with_capacity(n);
    let mut pushers = Vec::with_capacity(n);
    while clients.len() < n {
        let mut set = JoinSet::new();
        for _ in 0..(n - clients.len()).min(64) {
            let connecting = ends.client.connect(ends.addr, "localhost")?;
            set.spawn(async move {
                let conn = connecting.await?;
                let (send, recv) = conn.open_bi().await?;
                let (_, mut pushes) = conn.accept_bi().await?;
                let mut first = [0u8; FRAME];
                pushes.read_exact(&mut first).await?;
                anyhow::Ok(Client {
                    conn,
                    send,
                    recv,
                    pushes,
                })
            });
        }
        while let Some(client) = set.join_next().await {
            clients.push(client??);
            pushers.push(streams_rx.recv().await.context("the echo server stopped")?);
        }
    }

    let epoch = Instant::now();
    let period = Duration::from_secs_f64(n as f64 / rate as f64);
    progress(&format!("echo: {rate} round trips/s for {duration:?}"));
    let meter = Meter::start(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut trips = JoinSet::new();
    let mut readers = Vec::with_capacity(n);
    for (i, client) in clients.into_iter().enumerate() {
        let Client {
            conn,
            mut send,
            mut recv,
            pushes,
        } = client;
        let stop = stop_rx.clone();
        trips.spawn(async move {
            // Spread the connections' turns over one period.
            tokio::time::sleep(period.mul_f64(i as f64 / n as f64)).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut rtt = Hist::default();
            let mut buf = [1u8; FRAME];
            while !*stop.borrow() {
                tick.tick().await;
                let start = Instant::now();
                send.write_all(&buf).await?;
                recv.read_exact(&mut buf).await?;
                rtt.add(start.elapsed());
            }
            let _ = send.finish();
            anyhow::Ok(rtt)
        });
        readers.push((conn, pushes));
    }
    tokio::time::sleep(duration).await;
    let _ = stop_tx.send(true);
    let mut rtt = Hist::default();
    while let Some(r) = trips.join_next().await {
        rtt.merge(r??);
    }
    let round_trips = rtt.0.len() as u64;
    let trip_cost = meter.per(round_trips);

    let mut readers = readers;
    let mut latency = Hist::default();
    let mut push_cost = Value::Null;
    if spread {
        progress(&format!("echo: {rate} pushes/s for {duration:?}"));
        let meter = Meter::start(None);
        let arrivals;
        (readers, arrivals) = push(readers, &mut pushers, epoch, Spread(rate), duration).await?;
        push_cost = meter.per(arrivals.len() as u64);
        for (_, ns) in &arrivals {
            latency.add(Duration::from_nanos(*ns));
        }
    }

    let mut to_last = Hist::default();
    let mut fanout_cost = Value::Null;
    if let Some(bursts) = bursts {
        progress(&format!(
            "echo: a push to all {n} connections {bursts} times a second for {duration:?}"
        ));
        let meter = Meter::start(None);
        let arrivals;
        (readers, arrivals) = push(readers, &mut pushers, epoch, Bursts(bursts), duration).await?;
        fanout_cost = meter.per(arrivals.len() as u64);
        let mut last: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for (burst, ns) in &arrivals {
            let l = last.entry(*burst).or_default();
            *l = (*l).max(*ns);
        }
        for ns in last.values() {
            to_last.add(Duration::from_nanos(*ns));
        }
    }
    for (conn, _) in readers {
        conn.close(0u32.into(), b"done");
    }
    serving.abort();
    let report = json!({
        "connections": n,
        "offered_rate": rate,
        "round_trips": round_trips,
        "round_trip_rate": (round_trips as f64 / duration.as_secs_f64()).round(),
        "round_trip": rtt.json(),
        "cost_per_round_trip": trip_cost,
        "pushes": latency.0.len(),
        "push": latency.json(),
        "cost_per_push": push_cost,
        "fanout_bursts": to_last.0.len(),
        "fanout_to_last": to_last.json(),
        "cost_per_fanout_push": fanout_cost,
    });
    Ok(Floor {
        report,
        round_trip: rtt,
        push: latency,
        fanout_to_last: to_last,
    })
}

/// How [`push`] spreads its frames.
enum Schedule {
    /// This many a second, one connection after another.
    Spread(u64),
    /// This many times a second, one frame to every connection at once (a group message).
    Bursts(f64),
}
use Schedule::{Bursts, Spread};

type Reader = (quinn::Connection, quinn::RecvStream);

/// Pushes frames on the server's push streams for `duration` as `schedule` says, then a last
/// frame to each; returns the readers and, for every frame, (burst, latency in ns).
async fn push(
    readers: Vec<Reader>,
    pushers: &mut [quinn::SendStream],
    epoch: Instant,
    schedule: Schedule,
    duration: Duration,
) -> Result<(Vec<Reader>, Vec<(u64, u64)>)> {
    let mut reading = JoinSet::new();
    for (conn, mut stream) in readers {
        reading.spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; FRAME];
            loop {
                stream.read_exact(&mut buf).await?;
                let stamp = u64::from_le_bytes(buf[..8].try_into()?);
                if stamp == LAST {
                    break;
                }
                let burst = u64::from_le_bytes(buf[8..16].try_into()?);
                let now = epoch.elapsed().as_nanos() as u64;
                seen.push((burst, now.saturating_sub(stamp)));
            }
            anyhow::Ok(((conn, stream), seen))
        });
    }
    let frame = |burst: u64| {
        let mut frame = [2u8; FRAME];
        frame[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
        frame[8..16].copy_from_slice(&burst.to_le_bytes());
        frame
    };
    let n = pushers.len();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let (mut pushed, mut bursts, mut next) = (0u64, 0u64, 0);
    while start.elapsed() < duration {
        tick.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        match schedule {
            Spread(rate) => {
                while pushed < (elapsed * rate as f64) as u64 {
                    pushers[next].write_all(&frame(0)).await?;
                    next = (next + 1) % n;
                    pushed += 1;
                }
            }
            Bursts(per_second) => {
                while bursts < (elapsed * per_second) as u64 + 1 {
                    let f = frame(bursts);
                    for p in pushers.iter_mut() {
                        p.write_all(&f).await?;
                    }
                    pushed += n as u64;
                    bursts += 1;
                }
            }
        }
    }
    let mut last = [0u8; FRAME];
    last[..8].copy_from_slice(&LAST.to_le_bytes());
    for p in pushers.iter_mut() {
        p.write_all(&last).await?;
    }
    let mut readers = Vec::with_capacity(n);
    let mut arrivals = Vec::with_capacity(pushed as usize);
    while let Some(r) = reading.join_next().await {
        let (reader, seen) = r??;
        readers.push(reader);
        arrivals.extend(seen);
    }
    if arrivals.len() as u64 != pushed {
        bail!("{pushed} pushes sent, {} received", arrivals.len());
    }
    Ok((readers, arrivals))
}

/// Raw QUIC stream throughput between two endpoints of this process: `size` bytes on one
/// stream, read and dropped by the other side, which answers one byte at the end. Bytes per
/// second, from the stream's opening to that answer.
pub(crate) async fn bulk(size: u64) -> Result<f64> {
    use tokio::io::AsyncWriteExt;
    let ends = Endpoints::new()?;
    let server = ends.server.clone();
    let serving = tokio::spawn(async move {
        let Some(incoming) = server.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        if let Ok((mut send, mut recv)) = conn.accept_bi().await {
            while let Ok(Some(_)) = recv.read_chunk(64 * 1024, true).await {}
            let _ = send.write_all(&[1]).await;
            let _ = send.finish();
            let _ = conn.closed().await;
        }
    });
    let conn = ends.connect().await?;
    let start = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let chunk = bytes::Bytes::from(vec![0x5au8; 64 * 1024]);
    let mut left = size;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        send.write_chunk(chunk.slice(..take)).await?;
        left -= take as u64;
    }
    send.shutdown().await?;
    let mut done = [0u8; 1];
    recv.read_exact(&mut done).await?;
    let secs = start.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    serving.abort();
    Ok(size as f64 / secs)
}
