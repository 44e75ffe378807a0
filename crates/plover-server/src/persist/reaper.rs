//! Frees flushed memtables on a thread of our own, away from fjall's locks.
//!
//! fjall 3.1 drops the versions a keyspace no longer needs while it holds that keyspace's
//! version lock (`inner_rotate_memtable` -> `SuperVersions::maintenance`), and with the last
//! version that refers to an already flushed memtable goes the memtable itself: a skiplist
//! freed node by node, tens of milliseconds for a few MiB, while every write and read of the
//! keyspace, the commit thread's included, waits for the lock (BENCHMARKS.md, "Memtable size
//! and tail latency"). The reaper keeps a reference to each keyspace's active memtable as it
//! sees it, so that fjall's is never the last one; once fjall has let go (the reaper's
//! reference is the only one left) the reaper drops it, and the freeing happens here.
//!
//! A memtable that is filled, flushed and released between two looks is missed and freed the
//! old way; at [`TICK`] and 2 MiB memtables that takes more than 40 MiB/s of writes to one
//! keyspace. `fjall::AbstractTree::active_memtable` is public but hidden from fjall's docs:
//! Cargo.lock pins the version, and an upgrade has to keep this compiling.

use fjall::{AbstractTree, Keyspace};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the reaper looks at the keyspaces.
const TICK: Duration = Duration::from_millis(50);

/// The reaper thread; stopped and joined on drop.
pub(super) struct Reaper {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    /// Starts watching `keyspaces`. Without a thread (the OS refused one), memtables are
    /// freed by fjall as before: slower at times, never wrong.
    pub(super) fn start(keyspaces: Vec<Keyspace>) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("plover-reaper".into())
            .spawn(move || run(&keyspaces, &flag))
            .map_err(|e| tracing::warn!(error = %e, "no memtable reaper thread"))
            .ok();
        Self { stop, thread }
    }
}

fn run(keyspaces: &[Keyspace], stop: &(Mutex<bool>, Condvar)) {
    let mut held: Vec<Vec<_>> = keyspaces.iter().map(|_| Vec::new()).collect();
    let (lock, wake) = stop;
    loop {
        for (keyspace, held) in keyspaces.iter().zip(held.iter_mut()) {
            let active = keyspace.tree.active_memtable();
            if !held.last().is_some_and(|last| Arc::ptr_eq(last, &active)) {
                held.push(active);
            }
            // Only ours left: fjall has released it, so it is freed here, outside its locks.
            held.retain(|memtable| Arc::strong_count(memtable) > 1);
        }
        let stopped = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (stopped, _) = wake
            .wait_timeout_while(stopped, TICK, |stopped| !*stopped)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *stopped {
            return;
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flushed_memtable_is_released_by_fjall_and_freed_by_the_reaper() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = fjall::Database::builder(dir.path()).open().expect("open");
        let ks = db
            .keyspace("k", || {
                fjall::KeyspaceCreateOptions::default().max_memtable_size(64 * 1024)
            })
            .expect("keyspace");
        let reaper = Reaper::start(vec![ks.clone()]);
        ks.insert(0u32.to_be_bytes(), [7u8; 100]).expect("insert");
        // Watched without keeping it alive.
        let first = Arc::downgrade(&ks.tree.active_memtable());
        std::thread::sleep(TICK * 3);
        assert!(first.strong_count() >= 2, "fjall and the reaper hold it");
        // Writing past the memtable size makes fjall rotate, flush and drop old versions
        // (the path that freed memtables under its lock).
        for i in 1u32..20_000 {
            ks.insert(i.to_be_bytes(), [8u8; 100]).expect("insert");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while first.strong_count() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(TICK);
        }
        // fjall let go first (else the reaper would still hold it), then the reaper: freed,
        // and nothing is kept for ever.
        assert_eq!(
            first.strong_count(),
            0,
            "the flushed memtable was never freed"
        );
        drop(reaper);
    }
}
