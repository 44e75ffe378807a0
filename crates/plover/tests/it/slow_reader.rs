//! A device that reads one message a second while its peer sends a thousand a second, for
//! minutes (RELIABILITY.md, row 11): the server's memory stays under the bound its store
//! settings give (the device's backlog lives in the store, not in queues), the
//! device is switched to catch-up, and when it finally reads everything, it has every message
//! once, in order.
//!
//! `cargo test --release --test it slow_reader:: -- --ignored --nocapture` (PLOVER_SLOW_SECS,
//! default 300).

use crate::common::{rss, spawn_server_with, spawned_client};
use bytes::Bytes;
use plover_client::{Connection, EventStream, Incoming};
use plover_proto::{Event, Target};
use plover_server::auth::{TokenKeys, load_or_create_secret};
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const RATE: u64 = 1000;

/// A counter's value from the server's `/metrics`.
fn metric(addr: &str, name: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run explicitly (see RELIABILITY.md)"]
async fn a_device_reading_one_message_a_second_costs_the_server_nothing() {
    let secs: u64 = std::env::var("PLOVER_SLOW_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let (child, addr) =
        spawn_server_with(dir.path(), &format!("[metrics]\nlisten = \"{metrics}\"\n")).await;
    let pid = child.id().expect("pid");
    let keys = TokenKeys::new(&load_or_create_secret(&dir.path().join("data")).expect("secret"));
    Connection::connect(&spawned_client(dir.path(), &addr, &keys, "bob", "setup"))
        .await
        .expect("bob")
        .close()
        .await;

    let mut slow = EventStream::start(
        spawned_client(dir.path(), &addr, &keys, "bob", "slow"),
        Some(0),
    );
    assert!(slow.synced().await, "the slow device is online");
    let alice = Connection::connect(&spawned_client(dir.path(), &addr, &keys, "alice", "fast"))
        .await
        .expect("alice");
    let conv = Arc::new(
        alice
            .open(Target::Direct("bob".into()), true)
            .await
            .expect("open"),
    );

    // The sender: RATE messages a second, paced every 10 ms, at most 512 in flight.
    let acked = Arc::new(AtomicU64::new(0));
    let total = secs * RATE;
    let sender = {
        let (conv, acked) = (conv.clone(), acked.clone());
        tokio::spawn(async move {
            let mut inflight = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut sent = 0u64;
            while sent < total {
                tick.tick().await;
                for _ in 0..RATE / 100 {
                    let (conv, acked) = (conv.clone(), acked.clone());
                    let body = Bytes::from(sent.to_string());
                    inflight.spawn(async move {
                        conv.send(body).await.expect("send");
                        acked.fetch_add(1, Ordering::Relaxed);
                    });
                    sent += 1;
                    while inflight.len() > 512 {
                        inflight
                            .join_next()
                            .await
                            .expect("task")
                            .expect("send task");
                    }
                }
            }
            while let Some(done) = inflight.join_next().await {
                done.expect("send task");
            }
        })
    };

    // The slow reader: one event a second while the sender runs; the server's RSS sampled.
    let mut next_seq = 1u64;
    let mut bodies = std::collections::HashSet::new();
    let mut take = |incoming: Incoming, next_seq: &mut u64| {
        if let Incoming::Log(e) = incoming
            && let Event::Message(m) = e.event
        {
            assert_eq!(m.seq, *next_seq, "in order, once");
            assert!(bodies.insert(m.body), "each message once");
            *next_seq += 1;
        }
    };
    let start = Instant::now();
    let mut samples = Vec::new();
    while !sender.is_finished() {
        let e = slow.next().await.expect("open").expect("no error");
        take(e, &mut next_seq);
        let t = start.elapsed().as_secs();
        if samples.last().is_none_or(|(s, _)| t >= s + 10) {
            samples.push((t, rss(pid)));
            eprintln!(
                "{t:>4} s: {} acked, device at seq {}, server RSS {:.1} MB",
                acked.load(Ordering::Relaxed),
                next_seq - 1,
                samples.last().map_or(0, |s| s.1) as f64 / 1e6
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    sender.await.expect("sender");
    let switches = metric(&metrics, "plover_catch_up_switches_total");

    // Now it reads everything.
    let drain = Instant::now();
    while next_seq <= total {
        let e = tokio::time::timeout(Duration::from_secs(30), slow.next())
            .await
            .expect("the backlog keeps coming")
            .expect("open")
            .expect("no error");
        take(e, &mut next_seq);
    }
    // What the server may hold: its baseline, the store's memtables (2 MiB per keyspace
    // before a flush) and fjall's 32 MiB block cache; nothing that grows with the backlog.
    // (Before memtables were capped the resident memory grew by 0.6 MB/s here, past 190 MB
    // at 300 s.)
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let at = |secs: u64| samples.iter().find(|(t, _)| *t >= secs).map_or(0, |s| s.1);
    eprintln!(
        "slow reader: {total} messages over {secs} s; server RSS {:.1} MB at 60 s, {:.1} MB \
         at 120 s, peak {:.1} MB; {switches} switch(es) to catch-up; backlog read in {:.1} s",
        at(60) as f64 / 1e6,
        at(120) as f64 / 1e6,
        peak as f64 / 1e6,
        drain.elapsed().as_secs_f64()
    );
    assert!(
        peak <= 128_000_000,
        "server memory grew past its bound: {samples:?}"
    );
    assert!(switches >= 1.0, "the slow device was switched to catch-up");
    slow.close().await;
    drop(conv);
    alice.close().await;
}
