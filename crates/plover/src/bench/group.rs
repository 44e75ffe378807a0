//! `plover bench group`: one group, messages in, the time until the last online member has
//! each.

use anyhow::{Result, bail};
use plover_client::{Connection, EventStream, Incoming};
use plover_proto::{ClientMsgId, Event, Target};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::measure::*;
use super::server::Server;
use super::{BenchArgs, progress, rand_u32};

/// The group scenario: time from a send to the last online member's device.
pub(crate) async fn group(target: &Server, args: &BenchArgs, floor: &Hist) -> Result<Value> {
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
    let stages = target.stages().await;
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
    let stages = target.stages_since(stages).await;
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
        "stages": stages,
    }))
}
