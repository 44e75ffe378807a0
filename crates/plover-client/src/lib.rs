//! The plover client SDK: one QUIC connection per device, a stream per conversation.
//!
//! - [`Connection`]: one authenticated connection; open conversation streams, list
//!   conversations, create groups, ask presence, register pushers, send typing, ping.
//! - [`Conversation`]: send (with an id of your choosing for retries), read history, mark
//!   read, manage a group's members, retention and deletions.
//! - [`EventStream`]: the device's events (messages, receipts, membership changes, presence,
//!   typing) after its cursor, across reconnects, each exactly once and in order.
//! - [`Client`]: sends that survive a lost connection by retrying with the same id.
//!
//! The wire types come from [`plover_proto`]; PROTOCOL.md at the repository's root describes
//! every frame byte by byte.
//!
//! # Layout
//!
//! - `connection.rs`: connecting, `Hello`/`Welcome`, the typed control requests.
//! - `control.rs`: the control stream's writer, its waiting requests, presence pushes and the
//!   heartbeat.
//! - `conversation.rs`: a conversation stream and the answers its requests wait for.
//! - `answers.rs`: the readers that hand each answer to its waiter, and what a failed stream
//!   or a broken protocol becomes.
//! - `events.rs`: the event stream: sync from a cursor, delivery streams, receipts, reconnects.
//! - `endpoint.rs`: the QUIC endpoint and its transport settings.
//!
//! # Example
//!
//! Bob's phone listens while alice sends him a message (against a server started here, on
//! 127.0.0.1, with a self-signed certificate and tokens minted with its secret):
//!
//! ```
//! # use std::time::Duration;
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let config = plover_server::config::Config {
//! #     listen: "127.0.0.1:0".parse()?,
//! #     data: dir.path().join("data"),
//! #     certs: dir.path().join("certs"),
//! #     ..Default::default()
//! # };
//! # let secret = plover_server::auth::load_or_create_secret(&config.data)?;
//! # let keys = plover_server::auth::TokenKeys::new(&secret);
//! # let server = plover_server::server::Server::bind(config).await?;
//! # let server_addr = server.local_addr().to_string();
//! # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # let running = tokio::spawn(server.run(async { let _ = stopped.await; }));
//! # let ca = dir.path().join("certs/cert.pem");
//! # let hour = Duration::from_secs(3600);
//! # let (alice_token, bob_token) = (keys.mint("alice", None, hour)?, keys.mint("bob", None, hour)?);
//! use bytes::Bytes;
//! use plover_client::{ClientConfig, Connection, EventStream, Incoming};
//! use plover_proto::{Event, Target};
//!
//! // Bob's phone: its events from where it left off (here: the start), across reconnects.
//! let bob = ClientConfig::new(&server_addr, &ca, bob_token, "phone")?;
//! let mut events = EventStream::start(bob, None);
//! assert!(events.synced().await);
//!
//! // Alice's laptop opens their direct conversation and sends; the ack means it is stored.
//! let alice = Connection::connect(&ClientConfig::new(&server_addr, &ca, alice_token, "laptop")?).await?;
//! let chat = alice.open(Target::Direct("bob".into()), true).await?;
//! let ack = chat.send(Bytes::from_static(b"hello bob")).await?;
//! assert_eq!(ack.seq, 1);
//!
//! // Bob's phone gets it once, in order.
//! while let Some(incoming) = events.next().await {
//!     if let Incoming::Log(entry) = incoming? {
//!         if let Event::Message(message) = entry.event {
//!             assert_eq!((message.from.as_str(), &message.body[..]), ("alice", &b"hello bob"[..]));
//!             break;
//!         }
//!     }
//! }
//! # chat.close().await;
//! # alice.close().await;
//! # events.close().await;
//! # let _ = stop.send(());
//! # running.await??;
//! # Ok(())
//! # }
//! ```

mod answers;
mod connection;
mod control;
mod conversation;
mod endpoint;
mod events;
pub mod media;

pub use answers::LogEvent;
pub use connection::{Connection, NEXT_SERVER_AFTER, Welcome};
pub use control::ControlPush;
pub use conversation::{Ack, Conversation};
pub use endpoint::endpoint;
pub use events::{
    CURSOR_ACK_INTERVAL, CursorTracker, DELIVERED_DELAY, DELIVERED_MAX_DELAY, EventStream,
    Incoming, TYPING_REPEAT, TYPING_TTL,
};

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use plover_proto::{ClientMsgId, ErrorCode, Target};

/// Errors of the client.
///
/// Cloneable, so that one failure can answer every request waiting on a connection: sources
/// that are not `Clone` are kept behind an `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused: an `Error` frame, a failed send, or a close with an error code.
    #[error("{message} ({code})")]
    Refused {
        /// The server's code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server's address could not be resolved.
    #[error("cannot resolve {server}: {source}")]
    Resolve {
        /// The address as given.
        server: String,
        /// Why.
        source: Arc<std::io::Error>,
    },
    /// No UDP socket could be opened for the endpoint.
    #[error("cannot open a UDP socket: {0}")]
    Bind(#[source] Arc<std::io::Error>),
    /// The connection could not be started (a bad server name, an endpoint closed).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection was lost, or the handshake failed.
    #[error("connection lost: {0}")]
    Lost(#[source] quinn::ConnectionError),
    /// A stream failed while the connection stayed up.
    #[error("stream failed: {0}")]
    Stream(#[source] Arc<plover_quic::StreamError>),
    /// The server ended a stream this request was waiting on.
    #[error("the server closed the {0}")]
    Closed(&'static str),
    /// A datagram (a typing indicator) could not be sent.
    #[error("datagram: {0}")]
    Datagram(#[from] quinn::SendDatagramError),
    /// A frame could not be encoded.
    #[error("cannot encode a frame: {0}")]
    Encode(#[from] postcard::Error),
    /// The server sent something this client does not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The certificates to trust could not be read, or TLS refused its settings.
    #[error("{0}")]
    Tls(#[source] Arc<plover_quic::TlsError>),
    /// The TLS settings have no cipher suite QUIC can use for its initial packets.
    #[error("TLS for QUIC: {0}")]
    QuicTls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// Several servers were given and none of them took the connection: each one's address
    /// and error, in the order tried.
    #[error("no server answered: {}", describe_attempts(.0))]
    NoServer(Vec<(String, ClientError)>),
}

fn describe_attempts(attempts: &[(String, ClientError)]) -> String {
    attempts
        .iter()
        .map(|(server, e)| format!("{server}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ClientError {
    /// Whether the next server of a list may take the connection when this one failed with
    /// this error: it could not be reached, or it is stopping or out of service. A refusal of
    /// the client itself (its token, its version) is the same answer everywhere.
    pub(crate) fn try_next_server(&self) -> bool {
        match self {
            Self::Refused { code, .. } => {
                matches!(
                    *code,
                    ErrorCode::SHUTDOWN | ErrorCode::UNAVAILABLE | ErrorCode::MOVED
                )
            }
            Self::Resolve { .. } | Self::Connect(_) | Self::Lost(_) | Self::Timeout(_) => true,
            _ => false,
        }
    }

    /// The node a server sent this client to (`moved`: its address), if it did.
    pub fn moved_to(&self) -> Option<&str> {
        match self {
            Self::Refused { code, message } if *code == ErrorCode::MOVED && !message.is_empty() => {
                Some(message)
            }
            _ => None,
        }
    }

    /// Whether trying again (after reconnecting) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused { code, .. } => {
                matches!(
                    *code,
                    ErrorCode::SHUTDOWN | ErrorCode::UNAVAILABLE | ErrorCode::MOVED
                )
            }
            Self::Resolve { .. }
            | Self::Bind(_)
            | Self::Lost(_)
            | Self::Stream(_)
            | Self::Closed(_)
            | Self::Datagram(_)
            | Self::Timeout(_) => true,
            Self::NoServer(attempts) => attempts.iter().any(|(_, e)| e.is_retryable()),
            Self::Connect(_)
            | Self::Encode(_)
            | Self::Protocol(_)
            | Self::Tls(_)
            | Self::QuicTls(_) => false,
        }
    }

    /// The server's code, when the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(close) => Self::Refused {
                code: ErrorCode(u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX)),
                message: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            other => Self::Lost(other),
        }
    }
}

impl From<plover_quic::TlsError> for ClientError {
    fn from(e: plover_quic::TlsError) -> Self {
        Self::Tls(Arc::new(e))
    }
}

/// Where and as whom to connect. Its `Debug` output leaves the token out.
#[derive(Clone)]
pub struct ClientConfig {
    /// `host:port` of the server, or several separated by commas (`a:4433,b:4433`): each is
    /// tried in turn until one takes the connection, as a cluster's seed list.
    pub server: String,
    /// Name to verify the server's certificate against; defaults to the host of `server`.
    pub server_name: Option<String>,
    /// Certificates to trust.
    pub roots: Vec<CertificateDer<'static>>,
    /// The bearer token.
    pub token: String,
    /// This device's name.
    pub device: String,
    /// QUIC keep-alive interval (the heartbeat).
    pub keep_alive: Duration,
    /// How long connecting and authenticating may take.
    pub connect_timeout: Duration,
    /// An endpoint (UDP socket) to share between connections, as a load generator does;
    /// `None` gives each connection its own.
    pub endpoint: Option<quinn::Endpoint>,
    /// The zone this client would rather be served in (`Hello.zone`): a cluster node of
    /// another zone sends it to a node of this one, if one is up. `None`: any.
    pub zone: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server", &self.server)
            .field("server_name", &self.server_name)
            .field("roots", &self.roots.len())
            .field("token", &plover_proto::Token(String::new()))
            .field("device", &self.device)
            .field("zone", &self.zone)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A config trusting the PEM certificate(s) in `ca`.
    pub fn new(
        server: impl Into<String>,
        ca: &Path,
        token: impl Into<String>,
        device: impl Into<String>,
    ) -> Result<Self, ClientError> {
        let roots = plover_quic::tls::load_certs(ca)?;
        Ok(Self::with_roots(server, roots, token, device))
    }

    /// A config trusting the given certificates.
    pub fn with_roots(
        server: impl Into<String>,
        roots: Vec<CertificateDer<'static>>,
        token: impl Into<String>,
        device: impl Into<String>,
    ) -> Self {
        Self {
            server: server.into(),
            server_name: None,
            roots,
            token: token.into(),
            device: device.into(),
            keep_alive: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            endpoint: None,
            zone: None,
        }
    }

    /// The servers to try, in order.
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// The name to verify `server`'s certificate against.
    fn server_name(&self, server: &str) -> String {
        if let Some(name) = &self.server_name {
            return name.clone();
        }
        let host = match server.rsplit_once(':') {
            Some((host, _port)) => host,
            None => server,
        };
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    }
}

/// A client that reconnects and retries sends with the same id, so a message is stored once
/// even when an ack was lost with the connection.
pub struct Client {
    config: ClientConfig,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// How many times a send is tried before giving up.
    pub attempts: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.config.server)
            .finish()
    }
}

impl Client {
    /// A client that connects on first use.
    pub fn new(config: ClientConfig) -> Self {
        Self {
            config,
            conn: tokio::sync::Mutex::new(None),
            attempts: 5,
        }
    }

    /// The current connection, connecting if needed.
    pub async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.quic().close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let conn = Arc::new(Connection::connect(&self.config).await?);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn drop_connection(&self) {
        self.conn.lock().await.take();
    }

    /// Sends `body` to `target` and waits until it is durable, reconnecting and retrying with
    /// the same message id on connection failures.
    pub async fn send(&self, target: Target, body: Bytes) -> Result<Ack, ClientError> {
        let id = ClientMsgId::random();
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = async {
                let conn = self.connection().await?;
                let conv = conn.open(target.clone(), true).await?;
                conv.send_with_id(id, body.clone()).await
            }
            .await;
            match result {
                Ok(ack) => return Ok(ack),
                Err(e) if e.is_retryable() && attempt < self.attempts => {
                    tracing::debug!(error = %e, attempt, "send failed; retrying with the same id");
                    self.drop_connection().await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Closes the connection, if any.
    pub async fn close(&self) {
        if let Some(conn) = self.conn.lock().await.take()
            && let Ok(conn) = Arc::try_unwrap(conn)
        {
            conn.close().await;
        }
    }
}
