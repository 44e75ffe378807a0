//! The integration tests: one binary, a module per behaviour, each starting real servers on
//! 127.0.0.1 (in this process or as `plover serve` children) and real clients.
//!
//! One binary rather than one per file: each binary links the whole server, SDK and their
//! dependencies, and linking dominated the suite's build. Run one behaviour with
//! `cargo test --test it <module>::`, e.g. `cargo test --test it receipts::`.
//!
//! Two files stay binaries of their own (`tests/bounded_caches.rs` counts the heap with a global allocator, which would count every test of a shared binary;
//! `tests/multi_device.rs` moves the server clock of the whole process (`clock::skew`), which would move it under every test of a shared binary).

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod auth_refusals;
mod bad_frames;
mod bad_frames_memory;
mod bench_tool;
mod chat_tui;
mod cli;
mod client_protocol_faults;
mod cluster;
mod cluster_failover;
mod crash_loop;
mod device_sync;
mod disk_full;
mod groups;
mod idempotent_retry;
mod idp_tokens;
mod media;
mod membership;
mod metrics_endpoint;
mod offline_delivery;
mod one_connection_per_device;
mod online_delivery;
mod presence;
mod push;
mod rate_limit;
mod receipts;
mod restart_keeps_acked_messages;
mod retention;
mod safety;
mod server_lifecycle;
mod server_list;
mod session_harness;
mod slow_device_catch_up;
mod slow_reader;
mod store_corruption;
mod typing;
mod unread_answers_stay_bounded;
