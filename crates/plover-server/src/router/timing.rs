//! Where a message's time goes: the instant it passed each stage boundary, from its frame to
//! its answer and to each device, recorded as one Prometheus histogram per stage
//! (`plover_stage_seconds{stage}`), and a log line for a message slower than
//! `metrics.slow_message`.
//!
//! The stamps travel with the message by value (the request, the commit item) until its batch
//! is durable; from there one [`Traced`] per message is shared by its answer and its live
//! deliveries. Taking a stamp is one `Instant::now()` (a vDSO clock read); recording is one
//! histogram update per stage.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::names;

/// The stages, in the order a message passes them, as the `stage` label names them.
pub const STAGES: [&str; 11] = [
    // `Router::send` took it -> handed to its shard's queue (rate charge, bytes in flight).
    "to_shard",
    // Waiting in the shard's queue (or for room in it).
    "shard_queue",
    // The shard's step: membership, retry check, sequencing.
    "shard_step",
    // Waiting for the commit thread to take it into a batch.
    "commit_queue",
    // Building the batch that holds it (log heads, entries, encoding), the whole batch.
    "batch_build",
    // fjall's batch write and, in `sync` durability, the fsync.
    "write_fsync",
    // Durable -> `Sent` written to the sender's stream.
    "reply",
    // Durable -> taken from a device's queue by its connection.
    "device_queue",
    // Taken -> written to the device's delivery stream.
    "delivery_write",
    // The whole ack path: frame decoded -> `Sent` written.
    "ack",
    // The whole delivery path: frame decoded -> written to a device.
    "delivered",
];

/// The stamps a message collects before its batch is durable (carried by value).
#[derive(Debug, Clone, Copy)]
pub struct Stamps {
    /// `Router::send` took it: its `Send` frame was just decoded (after the connection's frame
    /// budget let the frame through).
    pub arrived: Instant,
    /// It was handed to its shard's queue.
    pub queued: Instant,
    /// Its shard took it.
    pub dequeued: Instant,
    /// Its shard sequenced it and queued it for the commit thread.
    pub sequenced: Instant,
}

impl Stamps {
    /// Stamps for a message whose frame arrived at `arrived` and is queued now.
    pub fn new(arrived: Instant) -> Self {
        let now = Instant::now();
        Self {
            arrived,
            queued: now,
            dequeued: now,
            sequenced: now,
        }
    }
}

/// A durable message's stamps, shared by its answer and its live deliveries.
#[derive(Debug)]
pub struct Traced {
    stamps: Stamps,
    /// The commit thread took its batch.
    picked: Instant,
    /// The batch was built and handed to fjall.
    built: Instant,
    /// The batch is durable.
    committed: Instant,
    /// Whether its slowness was logged (once per message, by whichever path saw it first).
    logged: AtomicBool,
}

/// What the transport records with: whether stages are on, and the slow-message threshold.
#[derive(Debug, Clone, Copy)]
pub struct StageRecorder {
    /// Record the stage histograms (`metrics.stages`).
    pub enabled: bool,
    /// Log a message slower than this (`metrics.slow_message`).
    pub slow: Duration,
}

impl StageRecorder {
    /// As `[metrics]` configures it.
    pub fn new(config: &crate::config::MetricsConfig) -> Self {
        Self {
            enabled: config.stages,
            slow: config.slow_message,
        }
    }
}

fn since(later: Instant, earlier: Instant) -> f64 {
    later.saturating_duration_since(earlier).as_secs_f64()
}

/// Indices into [`STAGES`] of the stages recorded apart from the chain up to the reply.
const DEVICE_QUEUE: usize = 7;
const DELIVERY_WRITE: usize = 8;
const ACK: usize = 9;
const DELIVERED: usize = 10;

/// One histogram handle per stage, looked up once: at the first message, after the binary
/// has installed its recorder (a handle taken before would record into nothing).
fn record(stage: usize, seconds: f64) {
    static HANDLES: OnceLock<Vec<metrics::Histogram>> = OnceLock::new();
    let handles = HANDLES.get_or_init(|| {
        STAGES
            .iter()
            .map(|name| metrics::histogram!(names::STAGE_SECONDS, "stage" => *name))
            .collect()
    });
    if let Some(handle) = handles.get(stage) {
        handle.record(seconds);
    }
}

impl Traced {
    /// The stamps of a message whose batch was picked, built and made durable at these times.
    pub fn new(stamps: Stamps, picked: Instant, built: Instant, committed: Instant) -> Self {
        Self {
            stamps,
            picked,
            built,
            committed,
            logged: AtomicBool::new(false),
        }
    }

    /// When the batch holding the message was durable.
    pub fn committed(&self) -> Instant {
        self.committed
    }

    /// The message's answer was written at `written`: records the stages up to the reply.
    pub fn answered(&self, written: Instant, recorder: StageRecorder) {
        if !recorder.enabled {
            return;
        }
        let s = &self.stamps;
        let bounds = [
            s.arrived,
            s.queued,
            s.dequeued,
            s.sequenced,
            self.picked,
            self.built,
            self.committed,
            written,
        ];
        for (stage, pair) in bounds.windows(2).enumerate() {
            if let [from, to] = pair {
                record(stage, since(*to, *from));
            }
        }
        record(ACK, since(written, s.arrived));
        self.log_if_slow(written, None, recorder.slow);
    }

    /// A live delivery of the message was taken from its device's queue at `taken` and
    /// written at `written`.
    pub fn delivered(&self, taken: Instant, written: Instant, recorder: StageRecorder) {
        if !recorder.enabled {
            return;
        }
        record(DEVICE_QUEUE, since(taken, self.committed));
        record(DELIVERY_WRITE, since(written, taken));
        record(DELIVERED, since(written, self.stamps.arrived));
        self.log_if_slow(written, Some(taken), recorder.slow);
    }

    /// Logs the breakdown once if the message took longer than `slow` up to `end`.
    fn log_if_slow(&self, end: Instant, taken: Option<Instant>, slow: Duration) {
        if end.saturating_duration_since(self.stamps.arrived) <= slow
            || self.logged.swap(true, Ordering::Relaxed)
        {
            return;
        }
        // Milliseconds to the microsecond.
        let ms = |to: Instant, from: Instant| (since(to, from) * 1e6).round() / 1e3;
        let s = &self.stamps;
        let (device_queue, delivery_write) = match taken {
            Some(taken) => (ms(taken, self.committed), ms(end, taken)),
            None => (0.0, 0.0),
        };
        tracing::warn!(
            path = if taken.is_some() { "delivery" } else { "ack" },
            total_ms = ms(end, s.arrived),
            to_shard_ms = ms(s.queued, s.arrived),
            shard_queue_ms = ms(s.dequeued, s.queued),
            shard_step_ms = ms(s.sequenced, s.dequeued),
            commit_queue_ms = ms(self.picked, s.sequenced),
            batch_build_ms = ms(self.built, self.picked),
            write_fsync_ms = ms(self.committed, self.built),
            after_commit_ms = ms(end, self.committed),
            device_queue_ms = device_queue,
            delivery_write_ms = delivery_write,
            "slow message (metrics.slow_message)"
        );
    }
}
