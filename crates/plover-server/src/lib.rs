//! The plover server: QUIC connections in, durable ordered conversations out.
//!
//! # Layout
//!
//! - [`transport`]: the quinn endpoint, one task per connection and per stream, frames in and
//!   out, per-connection limits, and the mapping of errors to close codes.
//! - [`router`]: sessions (user -> devices -> outbound queues), the conversation sequencers
//!   (sharded, one owner thread per shard), group commit, fan-out and catch-up.
//! - [`persist`]: the fjall store: messages, sync logs, conversations, members, cursors,
//!   idempotency keys, pushers. Blocking; used only from the router's threads and the
//!   blocking pool.
//! - [`push`]: notifications to offline users through push gateways and Web Push endpoints.
//! - [`auth`]: the signing secret and the JWTs minted by `plover token`, and an identity
//!   provider's tokens.
//! - [`admin`]: the operator's channel (`plover admin`, `plover token revoke`), a Unix socket
//!   in the data directory.
//! - [`config`]: the one typed configuration, read from TOML and overridden by flags.
//! - [`server`]: wires the pieces together and runs until shutdown.
//! - [`clock`]: the server's wall clock (timestamps only, never order), with a test hook.
//! - [`metrics`]: metric names, and `/metrics`, `/healthz`, `/readyz` over plain HTTP.
//! - [`cluster`]: with a `[cluster]` section, the node's place among others on NATS
//!   JetStream: the engine check, service discovery (node records) and the connection
//!   registry.
//!
//! Arrows point one way: transport -> router -> push -> persist, and router -> persist.
//! Wire types come from `plover-proto`, frames on quinn streams from `plover-quic`.

// The modules that read what peers send (frames, tokens): no index that can panic, no
// arithmetic that can overflow, no `expect` (tests may).
#[warn(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::expect_used
)]
pub mod admin;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
// Sizes, offsets and ranges come from clients.
#[warn(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::expect_used
)]
pub mod media;
pub mod metrics;
pub mod persist;
pub mod push;
pub mod router;
pub mod server;
#[warn(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::expect_used
)]
pub mod transport;
