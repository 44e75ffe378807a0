//! The server's wall clock, in milliseconds since the Unix epoch: message timestamps, last
//! seen, retention deadlines, push ages. Nothing is ordered by it; sequences and log positions
//! are counters, so a clock that jumps (NTP, a VM resumed, an operator) moves timestamps and
//! nothing else. `tests/multi_device.rs` moves it with [`skew`] to check exactly that.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Added to the system clock; only ever changed by [`skew`].
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Now, by the (possibly skewed) server clock.
pub fn now_ms() -> u64 {
    let system = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    shifted(system, OFFSET_MS.load(Ordering::Relaxed))
}

/// `system` moved by `offset_ms`, never below 0 nor past `u64::MAX`.
fn shifted(system: u64, offset_ms: i64) -> u64 {
    system.saturating_add_signed(offset_ms)
}

/// Moves this process's server clock by `delta_ms` (negative: back in time). A test hook:
/// it affects every server in the process, so only a test binary with a single test calls
/// it (`tests/multi_device.rs`); the unit tests below leave the process clock alone, since
/// other unit tests of the crate read it at the same time.
#[doc(hidden)]
pub fn skew(delta_ms: i64) {
    OFFSET_MS.fetch_add(delta_ms, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_moves_the_clock_both_ways_and_saturates() {
        let now = 1_764_000_000_000;
        assert_eq!(shifted(now, -3_600_000), now - 3_600_000);
        assert_eq!(shifted(now, 86_400_000), now + 86_400_000);
        assert_eq!(shifted(10, -3_600_000), 0);
        assert_eq!(shifted(u64::MAX - 1, 10), u64::MAX);
    }

    #[test]
    fn the_unskewed_clock_is_the_system_clock() {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        let now = now_ms();
        assert!(now >= system && now < system + 60_000, "{now} vs {system}");
    }
}
