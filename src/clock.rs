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
    system.saturating_add_signed(OFFSET_MS.load(Ordering::Relaxed))
}

/// Moves this process's server clock by `delta_ms` (negative: back in time). A test hook:
/// it affects every server in the process.
#[doc(hidden)]
pub fn skew(delta_ms: i64) {
    OFFSET_MS.fetch_add(delta_ms, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_moves_the_clock_both_ways() {
        let before = now_ms();
        skew(-3_600_000);
        let back = now_ms();
        skew(3_600_000);
        assert!(
            back + 3_500_000 < before,
            "{back} is an hour before {before}"
        );
        assert!(now_ms() >= before);
    }
}
