//! The gate in front of tokio's blocking pool, which the router's store reads and small
//! writes run on.
//!
//! The pool itself grows to 512 threads, each with its stack, and every connection's
//! requests (`Open`, `History`, listings, presence queries, catch-up pages) would take one:
//! a storm of reconnects or pipelined requests turned into hundreds of threads and their
//! memory, with no bound on how many reads the store served at once. Through the gate at
//! most [`BLOCKING_REQUESTS`] run at once; the rest wait as futures, costing nothing.

use std::sync::Arc;
use tokio::sync::Semaphore;

use super::RouterError;

/// Store calls on the blocking pool at once: enough to keep two cores and the disk busy
/// while some wait on I/O, few enough that their threads and buffers stay small.
pub(crate) const BLOCKING_REQUESTS: usize = 64;

/// The gate; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Gate(Arc<Semaphore>);

impl Gate {
    /// A gate letting `at_once` calls through together.
    pub(crate) fn new(at_once: usize) -> Self {
        Self(Arc::new(Semaphore::new(at_once.max(1))))
    }

    /// Runs `f` on the blocking pool once a place is free.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, RouterError> + Send + 'static,
    ) -> Result<T, RouterError> {
        let _place = self
            .0
            .acquire()
            .await
            .map_err(|_| RouterError::ShuttingDown)?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| RouterError::Internal(e.to_string()))?
    }
}
