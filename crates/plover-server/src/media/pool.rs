//! The threads that hash, write and read staged uploads, at the lowest CPU priority (as the
//! store's background threads, `persist/priority.rs`): a large upload's hashing then yields
//! to the message path on a busy machine, and runs as fast as before on an idle one.

use std::sync::{Arc, Mutex, mpsc};

use super::MediaError;

/// Threads in the pool: two, so that one large upload does not hold up every other.
const THREADS: usize = 2;

type Job = Box<dyn FnOnce() + Send>;

/// A small pool of low-priority threads.
#[derive(Debug)]
pub(super) struct LowPool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl LowPool {
    /// Starts the threads (they end when the pool is dropped).
    pub(super) fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("plover-media-{i}"))
                .spawn(move || {
                    crate::persist::priority::lower_this_thread();
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a media thread");
            }
        }
        Self {
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `f` on one of the threads and returns its result.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, MediaError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| MediaError::Storage("the media threads are gone".into()))?;
        rx.await
            .map_err(|_| MediaError::Storage("a media thread failed".into()))
    }
}
