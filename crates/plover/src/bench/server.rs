//! The server a scenario runs against: one spawned as a child process on a temporary data
//! directory, or the one `--server` names.

use anyhow::{Context, Result};
use plover_client::{ClientConfig, Connection};
use plover_server::auth::{TokenKeys, load_or_create_secret};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::measure::*;
use super::stages::{Snapshot, scrape};
use super::{BenchArgs, Scenario, progress};

/// The server under test, and how to reach it.
pub(crate) struct Server {
    pub(crate) addr: String,
    ca: PathBuf,
    pub(crate) keys: TokenKeys,
    pub(crate) child: Option<tokio::process::Child>,
    _dir: Option<tempfile::TempDir>,
    pub(crate) endpoint: quinn::Endpoint,
    /// Its metrics address, for the per-stage latencies (always for a spawned server).
    metrics: Option<String>,
    /// Its data directory (for a spawned one, the temporary directory's).
    data: PathBuf,
}

impl Server {
    pub(crate) async fn new(args: &BenchArgs) -> Result<Self> {
        let (addr, ca, data, child, dir, metrics) = match &args.server {
            Some(addr) => (
                addr.clone(),
                args.ca.clone(),
                args.data.clone(),
                None,
                None,
                args.server_metrics.clone(),
            ),
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
                let (child, addr, metrics) =
                    spawn_server(dir.path(), &args.durability, lift, &extra).await?;
                let ca = dir.path().join("certs").join("cert.pem");
                let data = dir.path().join("data");
                (addr, ca, data, Some(child), Some(dir), Some(metrics))
            }
        };
        let keys = match (&args.server, &args.config) {
            (Some(_), Some(path)) => {
                let config = plover_server::config::Config::from_file(path)?;
                TokenKeys::new(&plover_server::auth::secret_for(&config)?)
            }
            _ => TokenKeys::new(&load_or_create_secret(&data)?),
        };

        let roots = plover_quic::tls::load_certs(&ca)?;
        let endpoint = plover_client::endpoint(&roots, Duration::from_secs(5))?;
        Ok(Self {
            addr,
            ca,
            keys,
            child,
            _dir: dir,
            endpoint,
            metrics,
            data,
        })
    }

    /// The server's data directory: the filesystem its journal is fsynced on.
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server's stage histograms now, when its metrics are reachable.
    pub(crate) async fn stages(&self) -> Option<Snapshot> {
        let addr = self.metrics.as_ref()?;
        match scrape(addr).await {
            Ok(snapshot) => Some(snapshot),
            Err(e) => {
                progress(&format!("no per-stage latencies: {e:#}"));
                None
            }
        }
    }

    /// The per-stage latencies since `before` (null when the metrics were not reachable).
    pub(crate) async fn stages_since(&self, before: Option<Snapshot>) -> serde_json::Value {
        match (before, self.stages().await) {
            (Some(before), Some(after)) => after.since(&before),
            _ => serde_json::Value::Null,
        }
    }

    pub(crate) fn config(&self, user: &str, device: &str) -> Result<ClientConfig> {
        let token = self.keys.mint(user, None, Duration::from_secs(3600))?;
        let mut config = ClientConfig::new(self.addr_for(user), &self.ca, token, device)?;
        config.endpoint = Some(self.endpoint.clone());
        config.connect_timeout = Duration::from_secs(30);
        Ok(config)
    }

    /// The server list for `user`: a cluster's nodes, starting at one chosen by a hash of
    /// the name (so a pair's two users are on different nodes about as often as not).
    fn addr_for(&self, user: &str) -> String {
        let nodes: Vec<&str> = self.addr.split(',').collect();
        if nodes.len() < 2 {
            return self.addr.clone();
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(user, &mut hasher);
        let first = (std::hash::Hasher::finish(&hasher) % nodes.len() as u64) as usize;
        (0..nodes.len())
            .map(|i| nodes[(first + i) % nodes.len()])
            .collect::<Vec<_>>()
            .join(",")
    }

    pub(crate) async fn connect(&self, user: &str, device: &str) -> Result<Connection> {
        Ok(Connection::connect(&self.config(user, device)?).await?)
    }

    /// The spawned server's CPU seconds so far, from /proc.
    pub(crate) fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&self.child.as_ref()?.id()?.to_string())
    }

    /// The spawned server's resident memory, from /proc.
    pub(crate) fn server_rss(&self) -> Option<u64> {
        rss_of(self.pid()?)
    }

    /// The spawned server's process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }
}

/// A process's resident memory, from /proc.
pub(crate) fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub(crate) async fn spawn_server(
    dir: &Path,
    durability: &str,
    lift_send_limit: bool,
    extra: &str,
) -> Result<(tokio::process::Child, String, String)> {
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
        .args(["--metrics", "127.0.0.1:0"])
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
        let (mut addr, mut metrics) = (None, None);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.split("listening on ").nth(1) {
                addr = Some(a.trim().to_owned());
            }
            if let Some(m) = line.split("metrics on http://").nth(1) {
                metrics = Some(m.trim().trim_end_matches("/metrics").to_owned());
            }
            if let (Some(a), Some(m)) = (&addr, &metrics)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send((a.clone(), m.clone()));
            }
        }
    });
    let (addr, metrics) = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .context("the server did not start in time")??;
    Ok((child, addr, metrics))
}
