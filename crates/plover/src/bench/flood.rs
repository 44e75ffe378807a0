//! `plover bench flood`: others' latency, quietly and then beside each kind of hostile client
//! in turn, each on raw QUIC so that nothing of the SDK's own care is in the way:
//!
//! - `streams`: opens conversation streams until the server holds it back, writes sends on
//!   one without ever reading the answers, and sends far past its rate limit on another;
//! - `acks`: `Ack` frames on the control stream as fast as the server takes them;
//! - `marks`: `Delivered` and `Read` frames on a conversation stream, likewise;
//! - `history`: pipelined `History` requests of 500 messages, answers read;
//! - `group`: sends to a large group (a log entry per member each).
//!
//! Each hostile client is a user of its own, so that one kind's spent budget does not hold
//! back the next. Each loud run follows a quiet run of its own, and its ratio is to that
//! one: on a shared machine the quiet p99 itself moves from run to run.

use anyhow::{Result, bail};
use bytes::Bytes;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

use super::direct::direct;
use super::measure::Hist;
use super::server::Server;
use super::{BenchArgs, progress, rand_u32};
use plover_proto::{
    ClientFrame, ClientMsgId, DEFAULT_MAX_FRAME, ErrorCode, PROTOCOL_VERSION, ServerFrame, Target,
    codec,
};
use plover_quic::FrameReader;

/// The kinds of hostile client, run one at a time.
const KINDS: [&str; 5] = ["streams", "acks", "marks", "history", "group"];

fn frame(f: &ClientFrame) -> Result<Vec<u8>> {
    Ok(codec::encode_to_vec(f, DEFAULT_MAX_FRAME)?)
}

/// The flood scenario.
pub(crate) async fn flood(target: &Server, args: &BenchArgs, floor: &Hist) -> Result<Value> {
    if let Some(bad) = args
        .flood_kinds
        .iter()
        .find(|k| !KINDS.contains(&k.as_str()))
    {
        bail!(
            "no hostile client of kind {bad:?} (kinds: {})",
            KINDS.join(", ")
        );
    }
    progress("flood: quiet run");
    let (quiet, mut quiet_p99) =
        direct(target, args.users, args.rate(), args.duration, floor).await?;
    let run = format!("{:x}", rand_u32());
    let peer = format!("flood{run}-peer");
    // The peer must exist before anyone can write to it.
    target.connect(&peer, "idle").await?.close().await;
    let mut kinds = serde_json::Map::new();
    let (mut lost, mut duplicated) = (quiet["lost"].as_u64().unwrap_or(0), 0u64);
    duplicated += quiet["duplicated"].as_u64().unwrap_or(0);
    let mut worst: f64 = 0.0;
    let mut report = json!({
        "scenario": "flood",
        "users": args.users,
        "offered_rate": args.rate(),
        "quiet_e2e": quiet["e2e"],
    });
    for (i, kind) in args.flood_kinds.iter().enumerate() {
        let kind = kind.as_str();
        let mut quiet_e2e = quiet["e2e"].clone();
        if i > 0 {
            progress(&format!("flood: quiet run before the {kind} client"));
            let (again, p99) =
                direct(target, args.users, args.rate(), args.duration, floor).await?;
            lost += again["lost"].as_u64().unwrap_or(0);
            duplicated += again["duplicated"].as_u64().unwrap_or(0);
            quiet_e2e = again["e2e"].clone();
            quiet_p99 = p99;
        }
        let user = format!("flood{run}-{kind}");
        let (stop_tx, stop_rx) = watch::channel(false);
        progress(&format!("flood: preparing the {kind} client"));
        let hostile = start(kind, target, &user, &peer, args, stop_rx).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        progress(&format!("flood: run beside the {kind} client"));
        let (loud, loud_p99) =
            direct(target, args.users, args.rate(), args.duration, floor).await?;
        let _ = stop_tx.send(true);
        let stats = hostile.await??;
        let ratio = loud_p99.as_secs_f64() / quiet_p99.as_secs_f64().max(1e-9);
        worst = worst.max(ratio);
        lost += loud["lost"].as_u64().unwrap_or(0);
        duplicated += loud["duplicated"].as_u64().unwrap_or(0);
        if kind == "streams" {
            // The first kind's figures, under the names this scenario has always used.
            if let (Value::Object(out), Value::Object(stats)) = (&mut report, &stats) {
                out.insert("flooded_e2e".into(), loud["e2e"].clone());
                for (k, v) in stats {
                    out.insert(format!("hostile_{k}"), v.clone());
                }
            }
        }
        kinds.insert(
            kind.into(),
            json!({
                "quiet_e2e": quiet_e2e,
                "e2e": loud["e2e"],
                "p99_over_quiet": (ratio * 100.0).round() / 100.0,
                "hostile": stats,
            }),
        );
    }
    report["kinds"] = Value::Object(kinds);
    report["p99_flooded_over_quiet"] = json!((worst * 100.0).round() / 100.0);
    report["lost"] = json!(lost);
    report["duplicated"] = json!(duplicated);
    report["echo_floor"] = floor.json();
    Ok(report)
}

/// Starts one hostile client; its task ends, with what it did, once `stop` says so.
async fn start(
    kind: &str,
    target: &Server,
    user: &str,
    peer: &str,
    args: &BenchArgs,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<Result<Value>>> {
    Ok(match kind {
        "streams" => {
            let hostile = Raw::connect(target, user, "streams").await?;
            progress("flood: the hostile client opens streams and stalls one");
            let mut hostile = Streams::prepare(hostile, peer).await?;
            let stream = hostile
                .streams
                .pop()
                .ok_or_else(|| anyhow::anyhow!("no stream for the send loop"))?;
            let rate = args.flood_rate;
            tokio::spawn(async move {
                let (send, recv) = stream;
                let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME);
                // The stream's first answer is `Opened`.
                reader.next::<ServerFrame>().await?;
                let sent = send_loop(send, reader, rate, stop).await?;
                let _keep = &hostile;
                Ok(json!({
                    "streams_opened": hostile.opened,
                    "stream_limit_held": hostile.blocked,
                    "bytes_sent_unread_answers": hostile.unread_bytes,
                    "sends": sent.sent,
                    "accepted": sent.accepted,
                    "refused_limit": sent.refused,
                    "other_answers": sent.other,
                }))
            })
        }
        "acks" => {
            let mut raw = Raw::connect(target, user, "acks").await?;
            tokio::spawn(async move {
                let mut cursor = 0u64;
                let written = flood_frames(&mut raw.send, stop, || {
                    cursor += 1;
                    ClientFrame::Ack { cursor }
                })
                .await?;
                Ok(json!({ "frames_written": written }))
            })
        }
        "marks" => {
            let raw = Raw::connect(target, user, "marks").await?;
            let (mut send, _reader) = raw.open(Target::Direct(peer.into())).await?;
            tokio::spawn(async move {
                let mut n = 0u64;
                let written = flood_frames(&mut send, stop, || {
                    n += 1;
                    if n.is_multiple_of(2) {
                        ClientFrame::Read { up_to: n }
                    } else {
                        ClientFrame::Delivered { up_to: n }
                    }
                })
                .await?;
                let _keep = raw;
                Ok(json!({ "frames_written": written }))
            })
        }
        "history" => {
            // Something to read: a conversation of 300 messages (within the send burst).
            let setup = target.connect(user, "setup").await?;
            let conv = setup.open(Target::Direct(peer.into()), true).await?;
            let mut acks = tokio::task::JoinSet::new();
            let conv = Arc::new(conv);
            for i in 0..300 {
                let conv = conv.clone();
                acks.spawn(async move { conv.send(format!("history {i}")).await.map(drop) });
            }
            while let Some(done) = acks.join_next().await {
                done??;
            }
            drop(conv);
            setup.close().await;
            let raw = Raw::connect(target, user, "history").await?;
            let (mut send, mut reader) = raw.open(Target::Direct(peer.into())).await?;
            tokio::spawn(async move {
                let pages = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let counted = pages.clone();
                let reading = tokio::spawn(async move {
                    while let Ok(Some(answer)) = reader.next::<ServerFrame>().await {
                        if matches!(answer, ServerFrame::HistoryPage { .. }) {
                            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
                let mut request = 0u32;
                let written = flood_frames(&mut send, stop, || {
                    request = request.wrapping_add(1);
                    ClientFrame::History {
                        request,
                        before: None,
                        after: None,
                        limit: 500,
                    }
                })
                .await?;
                reading.abort();
                let _keep = raw;
                Ok(json!({
                    "requests_written": written,
                    "pages_read": pages.load(std::sync::atomic::Ordering::Relaxed),
                }))
            })
        }
        "group" => {
            let members = args.flood_group.max(2);
            progress(&format!("flood: registering {members} group members"));
            let names: Vec<String> = (0..members).map(|i| format!("{user}-m{i}")).collect();
            let mut joins = tokio::task::JoinSet::new();
            for chunk in names.chunks(members.div_ceil(32)) {
                let configs = chunk
                    .iter()
                    .map(|n| target.config(n, "idle"))
                    .collect::<Result<Vec<_>>>()?;
                joins.spawn(async move {
                    for config in configs {
                        plover_client::Connection::connect(&config)
                            .await?
                            .close()
                            .await;
                    }
                    Ok::<_, plover_client::ClientError>(())
                });
            }
            while let Some(done) = joins.join_next().await {
                done??;
            }
            let owner = target.connect(user, "setup").await?;
            let group = owner.create_group("flood", &names).await?;
            owner.close().await;
            let raw = Raw::connect(target, user, "group").await?;
            let (send, reader) = raw.open(Target::Conversation(group)).await?;
            let rate = args.flood_rate;
            tokio::spawn(async move {
                let sent = send_loop(send, reader, rate, stop).await?;
                let _keep = raw;
                Ok(json!({
                    "members": members,
                    "sends": sent.sent,
                    "accepted": sent.accepted,
                    "refused_limit": sent.refused,
                    "other_answers": sent.other,
                }))
            })
        }
        other => bail!("no hostile client of kind {other}"),
    })
}

/// Writes frames made by `make` as fast as the server takes them (256 to a write) until
/// `stop`; returns how many were written.
async fn flood_frames(
    send: &mut quinn::SendStream,
    mut stop: watch::Receiver<bool>,
    mut make: impl FnMut() -> ClientFrame,
) -> Result<u64> {
    let mut written = 0u64;
    let mut buf = Vec::new();
    while !*stop.borrow_and_update() {
        buf.clear();
        for _ in 0..256 {
            buf.extend(frame(&make())?);
        }
        tokio::select! {
            r = send.write_all(&buf) => {
                if r.is_err() {
                    break;
                }
                written += 256;
            }
            _ = stop.changed() => break,
        }
    }
    Ok(written)
}

/// A raw authenticated connection: its control stream open.
struct Raw {
    conn: quinn::Connection,
    send: quinn::SendStream,
    _reader: FrameReader,
}

impl Raw {
    async fn connect(target: &Server, user: &str, device: &str) -> Result<Self> {
        let conn = target
            .endpoint
            .connect(target.addr.parse()?, "localhost")?
            .await?;
        let (mut send, recv) = conn.open_bi().await?;
        let token = target.keys.mint(user, None, Duration::from_secs(3600))?;
        send.write_all(&frame(&ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token: token.into(),
            device: device.into(),
            zone: None,
        })?)
        .await?;
        let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME);
        match reader.next::<ServerFrame>().await? {
            Some(ServerFrame::Welcome { .. }) => {}
            other => bail!("the hostile client was not welcomed: {other:?}"),
        }
        Ok(Self {
            conn,
            send,
            _reader: reader,
        })
    }

    /// Opens a conversation stream, `Opened` read.
    async fn open(&self, target: Target) -> Result<(quinn::SendStream, FrameReader)> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send.write_all(&frame(&ClientFrame::Open {
            target,
            create: true,
        })?)
        .await?;
        let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME);
        match reader.next::<ServerFrame>().await? {
            Some(ServerFrame::Opened { .. }) => Ok((send, reader)),
            other => bail!("the hostile client could not open: {other:?}"),
        }
    }
}

/// The `streams` client: conversation streams up to the limit, one stalled with unread
/// answers.
struct Streams {
    _raw: Raw,
    /// Conversation streams open, and whether opening one more was held back by the server.
    opened: usize,
    blocked: bool,
    /// Bytes of sends written on a stream whose answers are never read, until the server
    /// stopped taking more (it reads and refuses them until the answers fill the window the
    /// client never drains; then flow control holds the client).
    unread_bytes: u64,
    streams: Vec<(quinn::SendStream, quinn::RecvStream)>,
}

impl Streams {
    /// Opens conversation streams until the server's stream limit holds it back (a second
    /// without a new stream), then writes sends on the first one without ever reading.
    async fn prepare(raw: Raw, peer: &str) -> Result<Self> {
        let open = frame(&ClientFrame::Open {
            target: Target::Direct(peer.into()),
            create: true,
        })?;
        let mut this = Self {
            _raw: raw,
            opened: 0,
            blocked: false,
            unread_bytes: 0,
            streams: Vec::new(),
        };
        for _ in 0..1024 {
            match tokio::time::timeout(Duration::from_secs(1), this._raw.conn.open_bi()).await {
                Ok(Ok((mut send, recv))) => {
                    send.write_all(&open).await?;
                    this.streams.push((send, recv));
                    this.opened += 1;
                }
                Ok(Err(e)) => bail!("the hostile connection failed: {e}"),
                Err(_) => {
                    this.blocked = true;
                    break;
                }
            }
        }
        let Some((stalled, _)) = this.streams.first_mut() else {
            bail!("no stream opened");
        };
        let send = frame(&ClientFrame::Send {
            id: ClientMsgId::random(),
            body: Bytes::from(vec![b'x'; 1024]),
        })?;
        while let Ok(written) =
            tokio::time::timeout(Duration::from_secs(1), stalled.write_all(&send)).await
        {
            written?;
            this.unread_bytes += send.len() as u64;
            if this.unread_bytes > 1 << 30 {
                bail!("the server took a gigabyte without the client reading");
            }
        }
        Ok(this)
    }
}

/// What a hostile send loop got.
#[derive(Default)]
struct FloodSent {
    sent: u64,
    accepted: u64,
    refused: u64,
    other: u64,
}

/// Sends at `rate` (fresh ids) on an opened stream and reads its answers, until stopped.
async fn send_loop(
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    rate: u64,
    mut stop: watch::Receiver<bool>,
) -> Result<FloodSent> {
    let counts = Arc::new(Mutex::new(FloodSent::default()));
    let reading = {
        let counts = counts.clone();
        tokio::spawn(async move {
            while let Ok(Some(answer)) = reader.next::<ServerFrame>().await {
                let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                match answer {
                    ServerFrame::Sent { .. } => c.accepted += 1,
                    ServerFrame::SendFailed { code, .. } if code == ErrorCode::LIMIT => {
                        c.refused += 1
                    }
                    _ => c.other += 1,
                }
            }
        })
    };
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !*stop.borrow_and_update() {
        tick.tick().await;
        let mut batch = Vec::new();
        for _ in 0..per_tick {
            batch.extend(frame(&ClientFrame::Send {
                id: ClientMsgId::random(),
                body: Bytes::from_static(b"flood"),
            })?);
        }
        // Whole batches only, so that every send written is counted (and answered).
        send.write_all(&batch).await?;
        counts.lock().unwrap_or_else(|p| p.into_inner()).sent += per_tick;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), reading).await;
    let c = counts.lock().unwrap_or_else(|p| p.into_inner());
    Ok(FloodSent {
        sent: c.sent,
        accepted: c.accepted,
        refused: c.refused,
        other: c.other,
    })
}
