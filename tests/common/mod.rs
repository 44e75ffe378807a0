//! A real server on 127.0.0.1:0 over real QUIC, and clients for it.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use plover::auth::{TokenKeys, load_or_create_secret};
use plover::client::{ClientConfig, Connection, EventStream, LogEvent};
use plover::config::Config;
use plover::framing::Event;
use plover::router::Router;
use plover::server::Server;
use tokio::sync::oneshot;

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub keys: TokenKeys,
    pub router: Router,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.data = dir.join("data");
    config.certs = dir.join("certs");
    config.server_id = Some("test".into());
    config
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let keys = TokenKeys::new(&load_or_create_secret(&config.data).expect("secret"));
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr();
        let router = server.router().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("server run");
        });
        Self {
            addr,
            dir,
            keys,
            router,
            stop: Some(stop),
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

    /// Connects once so the user exists on the server.
    pub async fn register(&self, user: &str) {
        self.connect(user, "setup").await.close().await;
    }

    pub async fn stop(mut self) {
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

/// The next event within five seconds, as a message body string.
pub async fn next_event(events: &mut EventStream) -> LogEvent {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event within 5 s")
        .expect("stream open")
        .expect("no error")
}

pub fn text(event: &LogEvent) -> String {
    match &event.event {
        Event::Message(m) => String::from_utf8_lossy(&m.body).into_owned(),
    }
}

/// Asserts that no event arrives within `wait`.
pub async fn assert_quiet(events: &mut EventStream, wait: Duration) {
    if let Ok(Some(e)) = tokio::time::timeout(wait, events.next()).await {
        panic!("unexpected event {e:?}");
    }
}
