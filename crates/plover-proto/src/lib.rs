//! plover's wire protocol: the frame types and their length-prefixed postcard encoding.
//!
//! Pure by design (no tokio, no quinn, no I/O at all), so the server, the client SDK, the
//! fuzzers and any port to another language or transport share one definition. PROTOCOL.md at
//! the repository's root documents every frame byte by byte; the pinned vectors in this
//! crate's tests (`client.rs`, `server.rs`, `types.rs`) keep the two in step.
//!
//! # Layout
//!
//! - [`ClientFrame`] and [`ServerFrame`]: what each side writes on a stream (`client.rs`,
//!   `server.rs`); [`ClientDatagram`] and [`ServerDatagram`] travel as QUIC datagrams.
//! - `types.rs`: the values frames carry ([`Message`], [`Event`], [`Target`], [`ErrorCode`],
//!   ...).
//! - [`content`]: the format the SDK and CLI give message bodies (text, attachment pointers);
//!   the server never reads it.
//! - [`codec`]: `varint(len) ++ postcard(value)` over `bytes`, the length checked against the
//!   limit before the body is buffered, "need more bytes" kept apart from a bad frame.
//!
//! # Example
//!
//! A `Ping` on the control stream, and its answer read back from a buffer that fills up bit
//! by bit, as it would from a stream:
//!
//! ```
//! use bytes::BytesMut;
//! use plover_proto::{ClientFrame, DEFAULT_MAX_FRAME, FrameError, ServerFrame, codec};
//!
//! // Encoding: the body's length (3), then the body: `Ping` is variant 1, and the nonce
//! // 300 a varint (`ac 02`).
//! let bytes = codec::encode_to_vec(&ClientFrame::Ping { nonce: 300 }, DEFAULT_MAX_FRAME)?;
//! assert_eq!(bytes, [0x03, 0x01, 0xac, 0x02]);
//!
//! // Decoding: an incomplete frame consumes nothing and asks for more.
//! let pong = codec::encode_to_vec(&ServerFrame::Pong { nonce: 300 }, DEFAULT_MAX_FRAME)?;
//! let mut buf = BytesMut::from(&pong[..2]);
//! assert_eq!(codec::decode::<ServerFrame>(&mut buf, DEFAULT_MAX_FRAME), Err(FrameError::Incomplete));
//! buf.extend_from_slice(&pong[2..]);
//! let frame: ServerFrame = codec::decode(&mut buf, DEFAULT_MAX_FRAME)?;
//! assert_eq!(frame, ServerFrame::Pong { nonce: 300 });
//! assert!(buf.is_empty());
//! # Ok::<(), FrameError>(())
//! ```

// Code that reads bytes from the network: no index that can panic, no arithmetic that can
// overflow, no `expect` (tests may).
#![warn(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::expect_used
)]

mod client;
pub mod codec;
pub mod content;
mod server;
mod types;

pub use client::ClientFrame;
pub use codec::FrameError;
pub use server::ServerFrame;
pub use types::{
    ClientDatagram, ClientMsgId, ConversationChange, ConversationId, ConversationInfo,
    ConversationKind, ErrorCode, Event, INLINE_MEMBERS, Marks, MemberInfo, Message, MessageRequest,
    ObjectId, Pusher, Receipt, Retention, RetentionParseError, ServerDatagram, Target, Token,
};

/// The protocol version this build speaks, sent in `Hello` and `Welcome`.
pub const PROTOCOL_VERSION: u16 = 3;

/// The oldest client version a server of this build still serves (version 2 differs only
/// in `Hello`, which had no `zone`).
pub const OLDEST_CLIENT_VERSION: u16 = 2;

/// The TLS ALPN identifier of protocol version 1.
pub const ALPN: &[u8] = b"plover/1";

/// The default maximum frame body, in bytes.
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024;

#[cfg(test)]
pub(crate) mod tests {
    /// Bytes as space-separated lowercase hex, the form PROTOCOL.md uses.
    pub(crate) fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
