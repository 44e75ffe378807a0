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

// Code that reads bytes from the network: no index that can panic, no arithmetic that can
// overflow, no `expect` (tests may).
#![warn(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::expect_used
)]

pub mod stream;
pub mod tls;

pub use stream::{FrameReader, FrameWriter, StreamError};
pub use tls::TlsError;
