//! Each connection's frame budget (`limits.frames_per_second`), and the coalescing of its
//! `Ack`s: the two things that keep one connection's flood of cheap frames from becoming
//! everyone's queueing delay.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

use plover_proto::ClientFrame;

/// What a frame costs from the budget: one, or for reads the work they ask for.
pub(crate) fn cost(frame: &ClientFrame) -> u32 {
    match frame {
        ClientFrame::History { limit, .. } | ClientFrame::ListConversations { limit, .. } => {
            1u32.saturating_add(limit.min(&500) / 10)
        }
        ClientFrame::Members { limit, .. } => 1u32.saturating_add(limit.min(&500) / 20),
        _ => 1,
    }
}

/// A connection's frame budget, shared by its streams: a rate with bursts of two seconds'
/// worth (GCRA: the time at which the budget would be whole again).
///
/// Past the budget the reader that took the frame waits before it reads the next, so the
/// connection's QUIC windows fill and flow control holds the client back: a flood slows
/// itself down and nothing is refused.
#[derive(Debug)]
pub(crate) struct FrameBudget {
    /// When the units taken so far are paid off, at the rate.
    paid_off: Mutex<Instant>,
    per_unit: Duration,
    burst: Duration,
}

impl FrameBudget {
    /// A budget of `per_second` units, with bursts of twice that.
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            paid_off: Mutex::new(Instant::now()),
            // No budget (0) counts as one frame a second.
            per_unit: Duration::from_secs(1)
                .checked_div(per_second)
                .unwrap_or(Duration::from_secs(1)),
            burst: Duration::from_secs(2),
        }
    }

    /// Takes `cost` units, waiting while the connection is past its budget.
    pub(crate) async fn take(&self, cost: u32) {
        let wait = {
            let mut paid_off = self.paid_off.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let from = (*paid_off).max(now);
            // Saturating: a charge past what an `Instant` can hold stays where it is, which no
            // budget reaches (u32::MAX units at one a second are 136 years).
            let charge = self.per_unit.saturating_mul(cost);
            *paid_off = from.checked_add(charge).unwrap_or(from);
            paid_off.saturating_duration_since(now.checked_add(self.burst).unwrap_or(now))
        };
        if !wait.is_zero() {
            metrics::counter!(crate::metrics::names::FRAMES_HELD_BACK).increment(1);
            tokio::time::sleep(wait).await;
        }
    }
}

/// How long a connection's newest `Ack` may wait before it goes to the store when acks come
/// faster than this: at most ten cursor writes a second per connection, whatever the client
/// sends (one every 1 s is what the SDK does).
pub(crate) const ACK_COALESCE: Duration = Duration::from_millis(100);

/// A connection's acknowledged cursor on its way to the store.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    state: Mutex<AckState>,
}

#[derive(Debug, Default)]
struct AckState {
    /// The highest cursor handed to the router.
    forwarded: u64,
    /// A higher one waiting for its turn.
    pending: Option<u64>,
    /// When the last one was handed over.
    last: Option<Instant>,
}

impl Acks {
    /// Records `cursor`; returns the cursor to hand to the router now, if any. Cursors at or
    /// below what was handed over are dropped here (the store would ignore them anyway).
    pub(crate) fn offer(&self, cursor: u64) -> Option<u64> {
        let mut a = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if cursor <= a.forwarded || a.pending.is_some_and(|p| cursor <= p) {
            return None;
        }
        let now = Instant::now();
        if a.last
            .and_then(|t| t.checked_add(ACK_COALESCE))
            .is_some_and(|due| now < due)
        {
            a.pending = Some(cursor);
            return None;
        }
        a.forwarded = cursor;
        a.pending = None;
        a.last = Some(now);
        Some(cursor)
    }

    /// When the waiting cursor is due, if one waits.
    pub(crate) fn due(&self) -> Option<Instant> {
        let a = self.state.lock().unwrap_or_else(|p| p.into_inner());
        a.pending?;
        Some(
            a.last
                .and_then(|t| t.checked_add(ACK_COALESCE))
                .unwrap_or_else(Instant::now),
        )
    }

    /// Takes the waiting cursor (to hand to the router now).
    pub(crate) fn take(&self) -> Option<u64> {
        let mut a = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let cursor = a.pending.take()?;
        a.forwarded = cursor;
        a.last = Some(Instant::now());
        Some(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_the_rate_holds() {
        let budget = FrameBudget::new(100);
        let start = Instant::now();
        for _ in 0..200 {
            budget.take(1).await;
        }
        assert!(start.elapsed() < Duration::from_millis(10), "the burst");
        for _ in 0..100 {
            budget.take(1).await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took <= Duration::from_millis(1010),
            "100 more at 100 a second: {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn acks_coalesce_and_only_move_forward() {
        let acks = Acks::default();
        assert_eq!(acks.offer(5), Some(5), "the first goes at once");
        assert_eq!(acks.offer(4), None, "backward: dropped");
        assert_eq!(acks.offer(6), None, "too soon: waits");
        assert_eq!(acks.offer(9), None);
        let due = acks.due().expect("one waits");
        assert_eq!(due - Instant::now(), ACK_COALESCE);
        tokio::time::sleep(ACK_COALESCE).await;
        assert_eq!(acks.take(), Some(9), "the newest of those that waited");
        assert_eq!(acks.due(), None);
        tokio::time::sleep(ACK_COALESCE).await;
        assert_eq!(acks.offer(10), Some(10));
    }

    #[test]
    fn reads_cost_the_work_they_ask() {
        let history = |limit| ClientFrame::History {
            request: 1,
            before: None,
            after: None,
            limit,
        };
        assert_eq!(cost(&history(500)), 51);
        assert_eq!(cost(&history(u32::MAX)), 51);
        assert_eq!(cost(&ClientFrame::Ping { nonce: 1 }), 1);
    }
}
