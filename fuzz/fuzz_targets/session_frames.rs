//! Arbitrary frame sequences fed to a server session: the same request code as a connection's
//! control and conversation streams, over a real router and store (no network). Each input is
//! a user byte, then records of a stream selector byte and one length-prefixed frame; see
//! `plover_server::transport::fuzzing`. The harness panics when an answer breaks an invariant: an
//! internal error, a retried id with a new seq, two ids with one seq, a log going backwards.
//!
//! The harness keeps its store between inputs (as a server does), so run with
//! `-detect_leaks=0`: what it holds on to is state, not a leak; `-rss_limit_mb` still bounds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plover_server::transport::fuzzing::Harness;
use std::sync::{LazyLock, Mutex};

// A static, never dropped: the router's threads outlive the fuzzer's last input.
static HARNESS: LazyLock<Mutex<Harness>> = LazyLock::new(|| Mutex::new(Harness::new()));

fuzz_target!(|data: &[u8]| {
    let mut harness = HARNESS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    harness.run(data);
});
