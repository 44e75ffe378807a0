//! Per-user rate limits: a token bucket per user, shared by all their connections. The router
//! keeps two: requests that write (one token each) and the writes themselves (one token per
//! store write they cause, so a message to a large group costs its fan-out).
//!
//! The buckets live in 16 std mutexes picked by a hash of the user, each held for a few
//! arithmetic operations and never across an await, so concurrent senders rarely meet.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Instant;

const STRIPES: usize = 16;

/// Users whose buckets are full and idle are forgotten past this many per stripe.
const MAX_IDLE_PER_STRIPE: usize = 4096;

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The limiter.
pub(super) struct SendLimiter {
    rate: f64,
    burst: f64,
    stripes: Vec<Mutex<HashMap<String, Bucket>>>,
}

impl std::fmt::Debug for SendLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendLimiter")
            .field("rate", &self.rate)
            .finish()
    }
}

impl SendLimiter {
    /// `rate` sends a second per user, with bursts of up to twice that.
    pub(super) fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(rate) * 2.0,
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one send from `user`'s budget; false when it is spent.
    pub(super) fn allow(&self, user: &str) -> bool {
        self.allow_n(user, 1.0)
    }

    /// Takes `cost` from `user`'s budget; false (and nothing taken) when it does not hold
    /// that much. A cost above the burst is charged as the whole burst, so that anything
    /// allowed at all can be done once the budget is full.
    pub(super) fn allow_n(&self, user: &str, cost: f64) -> bool {
        let cost = cost.min(self.burst);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut hasher);
        let stripe = &self.stripes[(hasher.finish() as usize) % STRIPES];
        let mut buckets = stripe.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if buckets.len() > MAX_IDLE_PER_STRIPE {
            let (rate, burst) = (self.rate, self.burst);
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(user.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * self.rate)
            .min(self.burst);
        bucket.last = now;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// The configured rate.
    pub(super) fn rate(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_the_rate_holds() {
        let l = SendLimiter::new(10);
        let allowed = (0..100).filter(|_| l.allow("spammer")).count();
        assert_eq!(allowed, 20, "the burst is twice the rate");
        assert!(l.allow("someone else"), "budgets are per user");
    }

    #[test]
    fn costs_are_charged_whole_and_capped_at_the_burst() {
        let l = SendLimiter::new(100);
        assert!(l.allow_n("big", 150.0));
        assert!(
            !l.allow_n("big", 60.0),
            "50 left: a cost of 60 is refused whole"
        );
        assert!(l.allow_n("big", 50.0));
        // A cost above the burst (200) is possible from a full budget, once.
        assert!(l.allow_n("huge", 1000.0));
        assert!(!l.allow_n("huge", 1.0));
    }
}
