//! `plover bench direct`: users in pairs at a fixed rate, or (`--rate 0`) the highest rate
//! whose p99 stays under 10 ms.

use anyhow::{Result, bail};
use plover_client::{Conversation, EventStream};
use plover_proto::{ClientMsgId, Target};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::measure::*;
use super::server::Server;
use super::{BenchArgs, progress, rand_u32};

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
    let stages = target.stages().await;
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
    let stages = target.stages_since(stages).await;
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
        "stages": stages,
    });
    Ok((report, seen.e2e.pct(99.0)))
}

/// `direct --rate 0`: raises the rate by half each time until p99 passes 10 ms or the server
/// falls behind; reports the highest rate that held, and every trial. A rate that fails is
/// tried once more before the search ends: on a shared machine one stall of another process
/// can fail a 5 s trial, and a rate the server cannot carry fails twice. A lost message
/// ends the search at once.
pub(crate) async fn find_max(target: &Server, args: &BenchArgs, floor: &Hist) -> Result<Value> {
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
