//! `plover bench media`: a file's upload and download through a server (encrypted on this
//! side, as the SDK always does), beside raw QUIC stream throughput in the same run; the
//! server's memory during the upload; the time to resume a cut upload; and what a running
//! upload does to another conversation's latency.

use anyhow::{Context, Result, bail};
use plover_client::media::{Through, prepare};
use plover_proto::content::Attachment;
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::echo;
use super::measure::Hist;
use super::server::Server;
use super::{BenchArgs, direct, progress, rand_u32};

/// MB/s (10^6 bytes a second), rounded to one decimal.
fn mbps(bytes: u64, d: Duration) -> f64 {
    (bytes as f64 / d.as_secs_f64() / 1e5).round() / 10.0
}

/// Writes a file of `size` bytes that compresses badly (xorshift), in 1 MiB writes.
fn write_file(path: &Path, size: u64) -> Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = u64::from(rand_u32()) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
        let take = left.min(buf.len() as u64) as usize;
        file.write_all(&buf[..take])?;
        left -= take as u64;
    }
    file.flush()?;
    Ok(())
}

fn attachment(p: &plover_client::media::Prepared) -> Attachment {
    p.attachment("bench", "application/octet-stream")
}

/// Samples the server's resident memory every 20 ms until `stop`: the largest seen.
fn watch_rss(target: &Server, stop: Arc<AtomicBool>) -> Option<tokio::task::JoinHandle<u64>> {
    let pid = target.pid()?;
    Some(tokio::spawn(async move {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some(rss) = super::server::rss_of(pid) {
                peak = peak.max(rss);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    }))
}

/// Flushes every dirty page to disk (`sync`) and lets the machine be for a moment: what the
/// phases before left to write back must not fall into the next measurement.
async fn settle() {
    let _ = tokio::task::spawn_blocking(|| std::process::Command::new("sync").status()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

pub(crate) async fn media(target: &Server, args: &BenchArgs, floor: &Hist) -> Result<Value> {
    let size = args.size;
    if size == 0 {
        bail!("--size must be at least 1 byte");
    }
    let dir = tempfile::tempdir()?;
    let run = format!("{:x}", rand_u32());
    let user = format!("m{run}");

    progress(&format!("media: raw QUIC stream, {size} bytes..."));
    let raw = echo::bulk(size).await?;

    progress(&format!(
        "media: writing and encrypting a file of {size} bytes..."
    ));
    let path = dir.path().join("file");
    write_file(&path, size)?;
    let started = Instant::now();
    let prepared = prepare(&path).await?;
    let encrypt = started.elapsed();

    let conn = target.connect(&user, "bench").await?;
    let rss_before = target.server_rss();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_rss(target, stop.clone());
    progress("media: uploading...");
    let started = Instant::now();
    conn.upload(&prepared, &mut |_| {})
        .await
        .context("upload")?;
    let upload = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let rss_peak = match watcher {
        Some(w) => Some(w.await?),
        None => None,
    };

    progress("media: downloading...");
    let out = dir.path().join("back");
    let started = Instant::now();
    conn.download(
        &attachment(&prepared),
        Through {
            conversation: 0,
            seq: 0,
        },
        &out,
        &mut |_| {},
    )
    .await
    .context("download")?;
    let download = started.elapsed();
    let same = tokio::fs::metadata(&out).await?.len() == size;
    let _ = tokio::fs::remove_file(&out).await;
    if !same {
        bail!("the downloaded file differs in size");
    }

    // A cut upload: stopped at half, then resumed on a new connection. The time to resume
    // is from the new connection's start to the server's offset (it hashes what it holds).
    progress("media: cutting an upload at half and resuming it...");
    let path2 = dir.path().join("file2");
    write_file(&path2, size)?;
    let second = prepare(&path2).await?;
    let half = second.size / 2;
    let held = Arc::new(AtomicU64::new(0));
    let cut = {
        let (held, second) = (held.clone(), second.clone());
        let c = target.connect(&user, "cut").await?;
        tokio::spawn(async move {
            let _ = c
                .upload(&second, &mut move |h| held.store(h, Ordering::Relaxed))
                .await;
        })
    };
    while held.load(Ordering::Relaxed) < half {
        if cut.is_finished() {
            bail!("the upload to cut finished first");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cut.abort();
    let _ = cut.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let c = target.connect(&user, "resume").await?;
    let mut resumed: Option<(Duration, u64)> = None;
    c.upload(&second, &mut |h| {
        resumed.get_or_insert((started.elapsed(), h));
    })
    .await
    .context("resumed upload")?;
    let total_resume = started.elapsed();
    c.close().await;
    let (resume, offset) = resumed.unwrap_or_default();

    // Another conversation's latency, quiet and then beside uploads on the same server.
    // The files written so far (staged uploads are not fsynced) are flushed first: the
    // kernel's writeback of a few hundred MB would otherwise land in the quiet run.
    settle().await;
    progress("media: a direct conversation, quiet...");
    let users = 20;
    let rate = 200;
    let (quiet, _) = direct::direct(target, users, rate, args.duration, floor).await?;
    progress("media: the same beside uploads...");
    let busy = Arc::new(AtomicBool::new(true));
    let uploads = {
        let busy = busy.clone();
        // Another device: its own endpoint (UDP socket), not the load generator's.
        let mut config = target.config(&user, "loader")?;
        config.endpoint = None;
        let conn = plover_client::Connection::connect(&config).await?;
        let path3 = dir.path().join("file3");
        write_file(&path3, size)?;
        tokio::spawn(async move {
            let mut n = 0u64;
            while busy.load(Ordering::Relaxed) {
                // Each round a new object (a new key), so the server stores every byte.
                let Ok(p) = prepare(&path3).await else { break };
                if conn.upload(&p, &mut |_| {}).await.is_err() {
                    break;
                }
                n += 1;
            }
            conn.close().await;
            n
        })
    };
    let (loaded, _) = direct::direct(target, users, rate, args.duration, floor).await?;
    busy.store(false, Ordering::Relaxed);
    let uploads_done = uploads.await.unwrap_or(0);

    // And beside downloads: another device fetches the first file back to back.
    settle().await;
    progress("media: the same beside downloads...");
    let busy = Arc::new(AtomicBool::new(true));
    let downloads = {
        let busy = busy.clone();
        let mut config = target.config(&user, "fetcher")?;
        config.endpoint = None;
        let fetcher = plover_client::Connection::connect(&config).await?;
        let pointer = attachment(&prepared);
        // On a tmpfs when there is one: the fetched file's writes and fsync would otherwise
        // queue on the disk beside the server's commits, which on separate machines they
        // never do.
        let shm = tempfile::tempdir_in("/dev/shm").ok();
        let out = shm
            .as_ref()
            .map_or_else(|| dir.path().join("fetched"), |d| d.path().join("fetched"));
        tokio::spawn(async move {
            let mut n = 0u64;
            while busy.load(Ordering::Relaxed) {
                let through = Through {
                    conversation: 0,
                    seq: 0,
                };
                if fetcher
                    .download(&pointer, through, &out, &mut |_| {})
                    .await
                    .is_err()
                {
                    break;
                }
                let _ = tokio::fs::remove_file(&out).await;
                n += 1;
            }
            fetcher.close().await;
            drop(shm);
            n
        })
    };
    let (fetching, _) = direct::direct(target, users, rate, args.duration, floor).await?;
    busy.store(false, Ordering::Relaxed);
    let downloads_done = downloads.await.unwrap_or(0);
    conn.close().await;

    let p99 = |v: &Value| v["e2e"]["p99_us"].as_f64().unwrap_or(0.0);
    let ratio_to_quiet = |v: &Value| {
        if p99(&quiet) > 0.0 {
            ((p99(v) / p99(&quiet)) * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    let ratio = ratio_to_quiet(&loaded);
    let runs = [&quiet, &loaded, &fetching];
    let count = |key: &str| -> u64 { runs.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum() };
    let (lost, duplicated) = (count("lost"), count("duplicated"));
    Ok(json!({
        "scenario": "media",
        "size": size,
        "ciphertext": prepared.size,
        "raw_quic_mbps": (raw / 1e5).round() / 10.0,
        "encrypt_mbps": mbps(size, encrypt),
        "upload_mbps": mbps(prepared.size, upload),
        "download_mbps": mbps(prepared.size, download),
        "server_rss_before": rss_before,
        "server_rss_peak_upload": rss_peak,
        "server_rss_growth": match (rss_before, rss_peak) {
            (Some(b), Some(p)) => Some(p.saturating_sub(b)),
            _ => None,
        },
        "resume_ms": resume.as_secs_f64() * 1000.0,
        "resumed_at": offset,
        "resumed_upload_total_ms": total_resume.as_secs_f64() * 1000.0,
        "direct_quiet_e2e": quiet["e2e"],
        "direct_beside_uploads_e2e": loaded["e2e"],
        "uploads_during": uploads_done,
        "p99_ratio": ratio,
        "direct_beside_downloads_e2e": fetching["e2e"],
        "downloads_during": downloads_done,
        "download_p99_ratio": ratio_to_quiet(&fetching),
        "lost": lost,
        "duplicated": duplicated,
    }))
}
