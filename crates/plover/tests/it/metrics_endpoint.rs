//! `plover serve --metrics ADDR` serves Prometheus text, /healthz and /readyz over HTTP.

use plover_client::{ClientConfig, Connection};
use plover_proto::Target;
use plover_server::auth::{TokenKeys, load_or_create_secret};
use plover_server::router::timing::STAGES;
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("response");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[tokio::test]
async fn metrics_and_health_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every message counts as slow, so that each is logged with its stages.
    let config_file = dir.path().join("plover.toml");
    std::fs::write(&config_file, "[metrics]\nslow_message = \"1ns\"\n").expect("config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_plover"))
        .arg("serve")
        .arg("--config")
        .arg(&config_file)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--stop-on-stdin-eof",
        ])
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--certs")
        .arg(dir.path().join("certs"))
        .env("PLOVER_LOG", "info")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let (mut addr, mut metrics) = (None, None);
    while addr.is_none() || metrics.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("in time")
            .expect("read")
            .expect("a line");
        if let Some(a) = line.split("listening on ").nth(1) {
            addr = Some(a.trim().to_owned());
        }
        if let Some(m) = line.split("metrics on http://").nth(1) {
            metrics = Some(m.trim().trim_end_matches("/metrics").to_owned());
        }
    }
    let (addr, metrics) = (addr.expect("addr"), metrics.expect("metrics"));
    let logged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = logged.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            log.lock().expect("log").push(line);
        }
    });

    let keys = TokenKeys::new(&load_or_create_secret(&dir.path().join("data")).expect("secret"));
    let config = |u: &str| {
        ClientConfig::new(
            addr.clone(),
            &dir.path().join("certs").join("cert.pem"),
            keys.mint(u, None, Duration::from_secs(60)).expect("mint"),
            "d",
        )
        .expect("config")
    };
    Connection::connect(&config("bob"))
        .await
        .expect("bob")
        .close()
        .await;
    let alice = Connection::connect(&config("alice")).await.expect("alice");
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    for i in 0..3 {
        conv.send(format!("m{i}")).await.expect("send");
    }

    // The answer's stages are recorded once it is written, which may be just after the
    // client has read it.
    let mut scrape = String::new();
    for _ in 0..100 {
        let m = metrics.clone();
        let (status, body) = tokio::task::spawn_blocking(move || get(&m, "/metrics"))
            .await
            .expect("join");
        assert!(status.contains("200"), "{status}");
        scrape = body;
        if scrape.contains("plover_stage_seconds_count{stage=\"ack\"} 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = scrape;
    // Every stage of the ack path, once per message; nobody was online for the others.
    let delivery = ["device_queue", "delivery_write", "delivered"];
    for stage in STAGES.iter().filter(|s| !delivery.contains(s)) {
        assert!(
            body.contains(&format!(
                "plover_stage_seconds_count{{stage=\"{stage}\"}} 3"
            )),
            "{stage}: {body}"
        );
    }
    // The fine buckets, from 10 us up.
    assert!(
        body.contains("plover_stage_seconds_bucket{stage=\"ack\",le=\"0.00001\"}"),
        "{body}"
    );
    // Nobody was online to deliver to: no delivery stages yet.
    assert!(
        body.contains("plover_stage_seconds_count{stage=\"delivered\"} 0"),
        "{body}"
    );
    assert!(body.contains("plover_messages_in_total 3"), "{body}");
    assert!(body.contains("plover_ack_seconds_bucket"), "{body}");
    assert!(body.contains("plover_commit_batch_size_bucket"), "{body}");
    assert!(body.contains("plover_connections 1"), "{body}");
    let m = metrics.clone();
    let health = tokio::task::spawn_blocking(move || {
        (get(&m, "/healthz"), get(&m, "/readyz"), get(&m, "/nope"))
    })
    .await
    .expect("join");
    assert!(health.0.0.contains("200"));
    assert!(health.1.0.contains("200"));
    assert!(health.2.0.contains("404"));
    // Each of the three messages was logged once, with its breakdown.
    let slow: Vec<String> = logged
        .lock()
        .expect("log")
        .iter()
        .filter(|l| l.contains("slow message"))
        .cloned()
        .collect();
    assert_eq!(slow.len(), 3, "{slow:?}");
    assert!(slow[0].contains("write_fsync_ms="), "{}", slow[0]);
    drop(conv);
    alice.close().await;
}
