//! The wire protocol: frame types and their length-prefixed postcard encoding.
//!
//! Pure by design (no tokio, no quinn), so the server, the client SDK, the fuzzers and any port
//! to another language can share one definition. PROTOCOL.md documents every frame byte by byte;
//! the pinned vectors in `client.rs` and `server.rs` keep the two in step.

mod client;
pub mod codec;
mod server;
mod types;

pub use client::ClientFrame;
pub use codec::FrameError;
pub use server::ServerFrame;
pub use types::{
    ClientDatagram, ClientMsgId, ConversationChange, ConversationId, ConversationInfo,
    ConversationKind, ErrorCode, Event, INLINE_MEMBERS, Marks, MemberInfo, Message, Pusher,
    Receipt, Retention, ServerDatagram, Target,
};

/// The protocol version this build speaks, sent in `Hello` and `Welcome`.
pub const PROTOCOL_VERSION: u16 = 2;

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
