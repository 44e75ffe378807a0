//! A real server on 127.0.0.1:0 over real QUIC, and clients for it.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use plover_client::{ClientConfig, Connection, Conversation, EventStream, Incoming, LogEvent};
use plover_proto::{Event, Target};
use plover_server::auth::{TokenKeys, secret_for};
use plover_server::config::Config;
use plover_server::router::Router;
use plover_server::server::Server;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

pub mod nats;
pub mod s3;

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub keys: TokenKeys,
    pub router: Router,
    stop: Option<oneshot::Sender<()>>,
    drain: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A stopped [`TestServer`]'s data, address and certificate.
pub struct Stopped {
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

impl Stopped {
    /// Starts the server again on its data, address and certificate.
    pub async fn start_with(self, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let addr = self.addr;
        TestServer::start_in(self.dir, |c| {
            c.listen = addr;
            tweak(c);
        })
        .await
    }
}

pub fn test_config(dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data: dir.join("data"),
        certs: dir.join("certs"),
        server_id: Some("test".into()),
        ..Config::default()
    }
}

/// A server, bob known to it, and alice's phone with their direct conversation open.
pub async fn alice_writes_to_bob() -> (TestServer, Connection, Conversation) {
    let server = TestServer::start().await;
    server.register("bob").await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");
    // They know each other: bob accepts (else alice's first message is a request, and she
    // sees nothing of bob until he answers: `safety.rs`).
    server
        .router
        .accept("bob", conv.id())
        .await
        .expect("accept");
    (server, alice, conv)
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, tweak).await
    }

    /// Stops the server and starts a new one on the same data, address and certificate.
    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    /// [`TestServer::restart`] with more configuration.
    pub async fn restart_with(mut self, tweak: impl FnOnce(&mut Config)) -> Self {
        self.shut_down().await;
        let TestServer {
            addr, dir, router, ..
        } = self;
        // The store is locked until its last handle is gone.
        drop(router);
        Self::start_in(dir, |c| {
            c.listen = addr;
            tweak(c);
        })
        .await
    }

    async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let keys = TokenKeys::new(&secret_for(&config).expect("secret"));
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr();
        let router = server.router().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (drain, drained) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // A dropped drain sender is no request to drain (a dropped stop sender stops).
            let drain = async move {
                if drained.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            server
                .run_draining(
                    async {
                        let _ = stopped.await;
                    },
                    drain,
                )
                .await
                .expect("server run");
        });
        Self {
            addr,
            dir,
            keys,
            router,
            stop: Some(stop),
            drain: Some(drain),
            task: Some(task),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("certs").join("cert.pem")
    }

    pub fn token(&self, user: &str) -> String {
        self.keys
            .mint(user, None, Duration::from_secs(3600))
            .expect("mint")
    }

    pub fn config(&self, user: &str, device: &str) -> ClientConfig {
        ClientConfig::new(self.addr.to_string(), &self.ca(), self.token(user), device)
            .expect("client config")
    }

    pub async fn connect(&self, user: &str, device: &str) -> Connection {
        Connection::connect(&self.config(user, device))
            .await
            .expect("connect")
    }

    /// Makes `a` and `b` contacts: a direct conversation that `b` accepted (without it, the
    /// first to write is a stranger whose message is a request).
    pub async fn contacts(&self, a: &str, b: &str) -> u64 {
        for user in [a, b] {
            self.router.ensure_user(user).await.expect("user");
        }
        let opened = self
            .router
            .open(a, Target::Direct(b.into()), true)
            .await
            .expect("open");
        self.router
            .accept(b, opened.conversation)
            .await
            .expect("accept");
        opened.conversation
    }

    /// Connects once so the user exists on the server.
    pub async fn register(&self, user: &str) {
        self.connect(user, "setup").await.close().await;
    }

    pub async fn stop(mut self) {
        self.shut_down().await;
    }

    /// Asks the server to drain, as SIGUSR1 asks `plover serve`: it stops by itself once
    /// its devices are elsewhere.
    pub fn drain(&mut self) {
        if let Some(drain) = self.drain.take() {
            let _ = drain.send(());
        }
    }

    /// Waits until a draining server has stopped by itself, for at most `within`.
    pub async fn drained(mut self, within: Duration) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(within, task)
                .await
                .expect("the server drained and stopped in time")
                .expect("server task");
        }
    }

    /// Stops the server and keeps its directory, to start it again later with
    /// [`Stopped::start_with`].
    pub async fn stop_keeping_data(mut self) -> Stopped {
        self.shut_down().await;
        let TestServer {
            addr, dir, router, ..
        } = self;
        drop(router);
        Stopped { addr, dir }
    }

    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops in time")
                .expect("server task");
        }
    }
}

/// The next item of any kind within five seconds.
pub async fn next_incoming(events: &mut EventStream) -> Incoming {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event within 5 s")
        .expect("stream open")
        .expect("no error")
}

/// The next sync-log event within five seconds (presence and typing are skipped).
pub async fn next_log(events: &mut EventStream) -> LogEvent {
    loop {
        if let Incoming::Log(e) = next_incoming(events).await {
            return e;
        }
    }
}

/// The next message event within five seconds (receipts, presence and typing are skipped).
pub async fn next_event(events: &mut EventStream) -> LogEvent {
    loop {
        let e = next_log(events).await;
        if matches!(e.event, Event::Message(_)) {
            return e;
        }
    }
}

/// The next receipt within five seconds (other items are skipped).
pub async fn next_receipt(events: &mut EventStream) -> plover_proto::Receipt {
    loop {
        if let Event::Receipt(r) = next_log(events).await.event {
            return r;
        }
    }
}

pub fn text(event: &LogEvent) -> String {
    match &event.event {
        // Plain bytes from the SDK, or the CLI's content format.
        Event::Message(m) => match plover_proto::content::Content::decode(&m.body) {
            Some(plover_proto::content::Content::Text { text }) => text,
            _ => String::from_utf8_lossy(&m.body).into_owned(),
        },
        other => panic!("not a message: {other:?}"),
    }
}

/// Asserts that no message arrives within `wait` (receipts, presence and typing may).
pub async fn assert_quiet(events: &mut EventStream, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, events.next()).await {
        if let Ok(Incoming::Log(LogEvent {
            event: Event::Message(m),
            ..
        })) = e
        {
            panic!("unexpected message {m:?}");
        }
    }
}

/// Starts `plover serve` as a child process and returns it with its address.
pub async fn spawn_server(dir: &Path) -> (Child, String) {
    spawn_server_with(dir, "").await
}

/// [`spawn_server`] with more configuration (TOML tables after `[limits]`).
pub async fn spawn_server_with(dir: &Path, extra: &str) -> (Child, String) {
    spawn_server_at(dir, &dir.join("certs"), extra).await
}

/// [`spawn_server_with`] with its certificate in `certs` (cluster nodes share one).
pub async fn spawn_server_at(dir: &Path, certs: &Path, extra: &str) -> (Child, String) {
    spawn_server_on(dir, certs, extra, "127.0.0.1:0").await
}

/// [`spawn_server_with`] with more environment (an S3 store's keys).
pub async fn spawn_server_env(dir: &Path, extra: &str, env: &[(&str, &str)]) -> (Child, String) {
    spawn_server_full(dir, &dir.join("certs"), extra, "127.0.0.1:0", env).await
}

/// [`spawn_server_at`] listening on `listen` (a replacement on a dead node's address).
pub async fn spawn_server_on(
    dir: &Path,
    certs: &Path,
    extra: &str,
    listen: &str,
) -> (Child, String) {
    spawn_server_full(dir, certs, extra, listen, &[]).await
}

async fn spawn_server_full(
    dir: &Path,
    certs: &Path,
    extra: &str,
    listen: &str,
    env: &[(&str, &str)],
) -> (Child, String) {
    // Tests send faster than a person: lift the per-user rate limit.
    let config = dir.join("test.toml");
    std::fs::write(
        &config,
        format!(
            "[limits]\nsends_per_second = 1000000\nwrites_per_second = 1000000\n\
             frames_per_second = 1000000\n{extra}"
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_plover"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(listen)
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--certs")
        .arg(certs)
        .env("PLOVER_LOG", "info")
        .envs(env.iter().copied())
        // Its end of the pipe closes when this process ends, however it ends: the server
        // then stops too.
        .arg("--stop-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn plover serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tx = Some(tx);
        // PLOVER_TEST_SERVER_LOG=1 shows the spawned servers' logs in the test's output.
        let show = std::env::var_os("PLOVER_TEST_SERVER_LOG").is_some();
        while let Ok(Some(line)) = lines.next_line().await {
            if show {
                eprintln!("[server] {line}");
            }
            if let Some(addr) = line.split("listening on ").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(20), rx)
        .await
        .expect("server starts in time")
        .expect("listening line");
    (child, addr)
}

/// A client of a server spawned by [`spawn_server`] in `dir` (its secret and certificate).
pub fn spawned_client(
    dir: &Path,
    addr: &str,
    keys: &TokenKeys,
    user: &str,
    device: &str,
) -> ClientConfig {
    let token = keys
        .mint(user, None, Duration::from_secs(3600))
        .expect("mint");
    ClientConfig::new(addr, &dir.join("certs").join("cert.pem"), token, device).expect("config")
}

/// The resident set of a process, in bytes, from /proc.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Makes users known to the server, as their first connection would.
pub async fn users(server: &TestServer, names: &[&str]) {
    for n in names {
        server.router.ensure_user(n).await.expect("user");
    }
}

/// Every message of a conversation, oldest first, paging forward.
pub async fn all_history(conv: &Conversation) -> Vec<plover_proto::Message> {
    let mut history = Vec::new();
    let mut after = 0;
    loop {
        let (page, more) = conv.history(None, Some(after), 500).await.expect("history");
        after = page.last().map_or(after, |m| m.seq);
        history.extend(page);
        if !more {
            return history;
        }
    }
}

/// A raw QUIC connection to the server, handshake done, nothing sent yet.
pub async fn handshake(server: &TestServer) -> (quinn::Endpoint, quinn::Connection) {
    let roots = plover_quic::tls::load_certs(&server.ca()).expect("ca");
    let endpoint = plover_client::endpoint(&roots, Duration::from_secs(5)).expect("ep");
    let conn = endpoint
        .connect(server.addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    (endpoint, conn)
}

/// Encodes one client frame with the default limit.
pub fn encode(frame: &plover_proto::ClientFrame) -> Vec<u8> {
    plover_proto::codec::encode_to_vec(frame, 1 << 16).expect("encode")
}

/// A raw connection whose control stream has sent `Hello` as (`user`, `device`), and the
/// server's first answer to it.
pub async fn raw_hello(
    server: &TestServer,
    user: &str,
    device: &str,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    plover_quic::FrameReader,
    plover_proto::ServerFrame,
) {
    let (endpoint, conn) = handshake(server).await;
    let (mut send, recv) = conn.open_bi().await.expect("bi");
    send.write_all(&encode(&plover_proto::ClientFrame::Hello {
        version: plover_proto::PROTOCOL_VERSION,
        token: server.token(user).into(),
        device: device.into(),
        zone: None,
    }))
    .await
    .expect("write");
    let mut reader = plover_quic::FrameReader::new(recv, 1 << 16);
    let answer = tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .expect("an answer to Hello")
        .expect("read")
        .expect("frame");
    (endpoint, conn, send, reader, answer)
}

/// A raw connection authenticated as (`user`, `device`), its control stream open.
pub async fn raw_device(
    server: &TestServer,
    user: &str,
    device: &str,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    plover_quic::FrameReader,
) {
    let (endpoint, conn, send, reader, welcome) = raw_hello(server, user, device).await;
    assert!(
        matches!(welcome, plover_proto::ServerFrame::Welcome { .. }),
        "{welcome:?}"
    );
    (endpoint, conn, send, reader)
}

/// Waits for the connection to be closed by the server and returns the close code.
pub async fn close_code(conn: &quinn::Connection) -> u16 {
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed in time");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner() as u16,
        other => panic!("expected an application close, got {other}"),
    }
}

/// The typing indicators `events` gets within `wait`, as (conversation, user).
pub async fn typing_within(events: &mut EventStream, wait: Duration) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(item)) = tokio::time::timeout_at(deadline, events.next()).await {
        if let Ok(Incoming::Typing { conversation, user }) = item {
            seen.push((conversation, user));
        }
    }
    seen
}

/// Runs the CLI off the runtime's thread (an in-process server runs on it, and would not
/// answer while the test waits for the command).
pub async fn run_cli(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("run plover"))
        .await
        .expect("join")
}

/// A successful command's standard output (else the test fails with its error).
pub fn cli_stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "plover failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
