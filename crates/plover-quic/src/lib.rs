//! plover frames over quinn: what the client SDK and the server share below the protocol.
//!
//! # Layout
//!
//! - [`stream`]: [`FrameReader`] and [`FrameWriter`], length-prefixed frames on quinn streams,
//!   with cancel-safe reads and the frame limit enforced before any allocation.
//! - [`tls`]: the rustls settings both sides use (TLS 1.3 only, ALPN `plover/1`, ring) and
//!   PEM loading.
//!
//! Arrows: plover-proto <- plover-quic <- plover-client and plover-server.

pub mod stream;
pub mod tls;

pub use stream::{FrameReader, FrameWriter, StreamError};
pub use tls::TlsError;
