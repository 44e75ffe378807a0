//! The client side of QUIC: an endpoint with the transport settings the SDK relies on.

use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::ClientError;

/// How long a connection may stay silent before it counts as lost: three keep-alives of the
/// default 10 s heartbeat.
const IDLE_TIMEOUT: quinn::VarInt = quinn::VarInt::from_u32(30_000);

/// A client endpoint (any local port) that trusts `roots`, with the client-side transport
/// settings the SDK relies on. Share one between many connections with
/// [`ClientConfig::endpoint`](crate::ClientConfig::endpoint), as a load generator does.
pub fn endpoint(
    roots: &[CertificateDer<'static>],
    keep_alive: Duration,
) -> Result<quinn::Endpoint, ClientError> {
    let tls = plover_quic::tls::client_config(roots)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // The server opens one delivery stream per active conversation (32 by default), each
    // bidirectional so that the device's receipts go back on it.
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport.datagram_receive_buffer_size(Some(16 * 1024));
    transport.keep_alive_interval(Some(keep_alive));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(IDLE_TIMEOUT)));
    client.transport_config(Arc::new(transport));
    let bind: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| ClientError::Bind(Arc::new(e)))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}
