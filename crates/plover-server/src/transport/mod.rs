//! QUIC: the endpoint, TLS, one task per connection and per stream, frames in and out, limits,
//! and the mapping of errors to close codes.
//!
//! The accept loop only accepts: it takes a connection permit (or refuses the connection before
//! the handshake) and moves the permit into the connection's own task, where the handshake,
//! `Hello` and everything after run.

mod budget;
pub(crate) mod devices;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod media;
mod requests;
mod session;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::TokenKeys;
use crate::config::Config;
use crate::router::Router;
use plover_proto::ErrorCode;
use requests::Shared;

/// Errors setting up the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS material or settings.
    #[error(transparent)]
    Tls(#[from] plover_quic::TlsError),
    /// The development certificate could not be made.
    #[error(transparent)]
    DevCert(#[from] tls::DevCertError),
    /// The socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `transport.idle_timeout` is beyond what QUIC can carry.
    #[error("invalid transport.idle_timeout: {0}")]
    IdleTimeout(#[from] quinn::VarIntBoundsExceeded),
    /// The TLS settings have no cipher suite QUIC can use for its initial packets.
    #[error("TLS for QUIC: {0}")]
    QuicTls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The server's QUIC transport settings, each chosen for a reason.
fn server_transport(config: &Config) -> Result<quinn::TransportConfig, TransportError> {
    let limits = &config.limits;
    let t = &config.transport;
    let mut transport = quinn::TransportConfig::default();
    // quinn sets up state for the whole stream limit when a connection opens: the control
    // stream plus `max_streams` conversation streams, and nothing more.
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(
        limits.max_streams.saturating_add(1),
    ));
    // Clients open no unidirectional streams (delivery streams go the other way).
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // Receive windows bound what one connection can make the server buffer.
    transport.stream_receive_window(quinn::VarInt::from_u32(t.stream_window));
    transport.receive_window(quinn::VarInt::from_u32(t.connection_window));
    // And the send window bounds what the server buffers towards a slow device; past it the
    // device's feed backs up and falls back to catch-up from the store.
    transport.send_window(u64::from(t.connection_window));
    let idle = quinn::IdleTimeout::try_from(t.idle_timeout)?;
    transport.max_idle_timeout(Some(idle));
    // Clients keep their connections alive (they know whether they want to stay online);
    // the server only notices when they stop.
    transport.keep_alive_interval(None);
    // Typing indicators travel as datagrams (RFC 9221). Small buffers: a few dozen of them
    // pending is plenty, and whatever does not fit is dropped, as datagrams may be.
    transport.datagram_receive_buffer_size(Some(16 * 1024));
    transport.datagram_send_buffer_size(16 * 1024);
    Ok(transport)
}

/// A bound endpoint that has not started accepting yet.
pub struct Listener {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    /// Handshakes under way (accepted, not yet authenticated or failed).
    handshakes: Arc<std::sync::atomic::AtomicUsize>,
    /// Past this many handshakes under way, unvalidated addresses get a Retry.
    retry_above: usize,
    /// In a cluster, where to send the clients when this node stops.
    cluster: Option<crate::cluster::Cluster>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.endpoint.local_addr().ok())
            .finish()
    }
}

impl Listener {
    /// Loads or generates the TLS material and binds the UDP socket. In a cluster, `cluster`
    /// is the node's place in it: `Welcome` names the node, and the connection registry
    /// hears of every device.
    pub fn bind(
        config: &Config,
        router: Router,
        keys: TokenKeys,
        cluster: Option<&crate::cluster::Cluster>,
        media: Arc<crate::media::Media>,
    ) -> Result<Self, TransportError> {
        let (cert_path, key_path) = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => tls::ensure_dev_cert(&config.certs)?,
        };
        let chain = plover_quic::tls::load_certs(&cert_path)?;
        let key = plover_quic::tls::load_key(&key_path)?;
        let tls = plover_quic::tls::server_config(chain, key)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(server_transport(config)?));
        let endpoint = quinn::Endpoint::server(server, config.listen).map_err(|source| {
            TransportError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let server_id = match cluster {
            Some(c) => Some(c.node().to_owned()),
            None => config.server_id.clone(),
        };
        let server_id = server_id.unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|s| s.trim().to_owned())
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "plover".to_owned())
        });
        Ok(Self {
            endpoint,
            handshakes: Arc::default(),
            retry_above: config.transport.retry_above,
            cluster: cluster.cloned(),
            permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            shared: Arc::new(Shared::new(
                router,
                keys,
                config,
                server_id,
                cluster.map(|c| c.registry().clone()),
                cluster.map(|c| c.redirect().clone()),
                media,
            )),
        })
    }

    /// The address the endpoint is bound to (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts connections until `shutdown` completes, then closes every connection with
    /// code `SHUTDOWN` (in a cluster, `MOVED` to another node) and waits (briefly) for the
    /// closes to be sent.
    ///
    /// When `drain` completes first, a node of a cluster drains (see `Listener::drain`)
    /// and then stops as on `shutdown`; a single node just stops.
    pub async fn run(self, shutdown: impl Future<Output = ()>, drain: impl Future<Output = ()>) {
        let next_id = AtomicU64::new(1);
        // Connections an operator closes (revoked tokens, removed devices, disconnects),
        // asked for on this node or, through the log, on another.
        let _kicker = session::AbortOnDrop(tokio::spawn(close_kicked(
            self.shared.router.kicks(),
            self.shared.devices.clone(),
        )));
        tokio::pin!(shutdown);
        let drained = async {
            drain.await;
            self.drain().await;
        };
        tokio::pin!(drained);
        loop {
            let incoming = tokio::select! {
                () = &mut shutdown => break,
                () = &mut drained => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            // Under a flood of new connections, make unvalidated addresses prove they can
            // receive (a Retry round trip) before any handshake work; quinn never sends an
            // unvalidated address more than three times what it received from it.
            if !incoming.remote_address_validated()
                && self.handshakes.load(Ordering::Relaxed) >= self.retry_above
            {
                if incoming.may_retry() {
                    let _ = incoming.retry();
                } else {
                    incoming.refuse();
                }
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                debug!(remote = %incoming.remote_address(), "connection limit reached; refusing");
                incoming.refuse();
                continue;
            };
            let handshakes = self.handshakes.clone();
            handshakes.fetch_add(1, Ordering::Relaxed);
            let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
            let span = info_span!(
                "conn",
                remote = %incoming.remote_address(),
                conn_id,
                user = tracing::field::Empty
            );
            let shared = self.shared.clone();
            tokio::spawn(
                async move {
                    session::serve_connection(incoming, shared, handshakes).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        // In a cluster the clients are spread over the other nodes, least loaded first
        // (`moved`, the address as the reason), so they do not all try the same next one of
        // their lists; connections still in their handshake go to the least loaded.
        let moved = match &self.cluster {
            Some(cluster) => cluster.elsewhere().await,
            None => Vec::new(),
        };
        match moved.first() {
            Some(first) => {
                info!(to = ?moved, "sending this node's clients to the other nodes");
                self.shared.devices.move_all(&moved);
                self.endpoint
                    .close(quinn::VarInt::from(ErrorCode::MOVED.0), first.as_bytes());
            }
            None => self.endpoint.close(
                quinn::VarInt::from(ErrorCode::SHUTDOWN.0),
                b"server shutting down",
            ),
        }
        if tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle())
            .await
            .is_err()
        {
            warn!("some connections did not close in time");
        }
    }
}

/// Closes the connections each kick names, until the router stops.
async fn close_kicked(
    mut kicks: tokio::sync::broadcast::Receiver<crate::persist::Kick>,
    devices: Arc<devices::Devices>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match kicks.recv().await {
            Ok(kick) => {
                let reason = match kick.code {
                    ErrorCode::TOKEN_REVOKED => "this token was revoked",
                    _ => "an operator closed this connection",
                };
                let closed = devices.close(&kick.user, kick.device.as_deref(), kick.code, reason);
                info!(user = %kick.user, device = ?kick.device, code = kick.code.name(), closed, "connections closed");
            }
            Err(RecvError::Lagged(missed)) => {
                warn!(missed, "connection closes were missed: too many at once");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

impl Listener {
    /// The devices connected to this node (the admin channel lists and closes them).
    pub(crate) fn devices(&self) -> Arc<devices::Devices> {
        self.shared.devices.clone()
    }

    /// Drains this node: it gives back its shards and sends new clients elsewhere
    /// ([`crate::cluster::Cluster::drain`]), then closes its devices' connections with
    /// `moved`, `cluster.drain_rate` a second, spread over the other nodes least loaded
    /// first. Completes when no device is left, or at once when there is no other node to
    /// send them to (or no cluster): the stop that follows closes whatever remains.
    async fn drain(&self) {
        let Some(cluster) = &self.cluster else {
            info!("asked to drain, but this node is not in a cluster: stopping");
            return;
        };
        cluster.drain().await;
        // Ten rounds a second, each moving what the rate allows since the start (at least
        // one device, at once); the list of the other nodes is read again every second.
        let rate = u128::from(cluster.drain_rate());
        let started = tokio::time::Instant::now();
        let mut round = tokio::time::interval(Duration::from_millis(100));
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut to, mut moved) = (Vec::new(), 0usize);
        for r in 0u64.. {
            round.tick().await;
            if r % 10 == 0 {
                to = cluster.elsewhere().await;
            }
            if to.is_empty() {
                info!("no other node takes clients: stopping with the devices still here");
                return;
            }
            let due = rate
                .saturating_mul(started.elapsed().as_millis())
                .checked_div(1000)
                .unwrap_or(0)
                .max(1);
            let due = usize::try_from(due).unwrap_or(usize::MAX);
            let (now, left) = self
                .shared
                .devices
                .move_some(due.saturating_sub(moved), &to);
            moved = moved.saturating_add(now);
            if left == 0 {
                info!("drained: every device went to another node");
                return;
            }
            if r % 50 == 0 {
                info!(left, "draining");
            }
        }
    }
}
