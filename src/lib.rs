//! plover: a QUIC-native messaging server.
//!
//! # Layout
//!
//! - [`framing`]: the wire types and their length-prefixed postcard encoding. Pure: no I/O.
//! - [`transport`]: the quinn endpoint, TLS and certificates, one task per connection and per
//!   stream, frames in and out, limits, and the mapping of errors to close codes.
//! - [`router`]: sessions (user -> devices -> outbound queues), the conversation sequencers
//!   (sharded, one owner thread per shard), group commit, fan-out and catch-up.
//! - [`persist`]: the fjall store: messages, sync logs, conversations, members, cursors,
//!   idempotency keys. Blocking; used only from the router's threads and `spawn_blocking`.
//! - [`push`]: notifications to offline users through push gateways and Web Push endpoints.
//! - [`auth`]: the signing secret and the JWTs minted by `plover token`.
//! - [`config`]: the one typed configuration, read from TOML and overridden by flags.
//! - [`server`]: wires the pieces together and runs until shutdown.
//! - [`clock`]: the server's wall clock (timestamps only, never order), with a test hook.
//! - [`metrics`]: metric names, and `/metrics`, `/healthz`, `/readyz` over plain HTTP.
//! - [`client`]: the client SDK the CLI, the tests and the load generator use.
//!
//! Arrows point one way: transport -> router -> persist; everything may use framing's types.

pub mod auth;
pub mod client;
pub mod clock;
pub mod config;
pub mod framing;
pub mod metrics;
pub mod persist;
pub mod push;
pub mod router;
pub mod server;
pub mod transport;
