//! `plover bench catchup`: a device offline while messages arrive, then back: the time until
//! it has them all.

use anyhow::{Result, bail};
use plover_client::{EventStream, Incoming};
use plover_proto::{ClientMsgId, Event, Target};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::measure::*;
use super::server::Server;
use super::{progress, rand_u32};

/// The catch-up scenario.
pub(crate) async fn catchup(target: &Server, messages: u64) -> Result<Value> {
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
