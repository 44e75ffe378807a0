//! Opening the store and keeping it healthy: fjall's tuning, poison, sync, flush, disk space
//! and compaction.

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Store, StoreError, priority, reaper};
use crate::config::Durability;

/// Journal size after which fjall rotates it: 64 MiB, an eighth of fjall's default, so that
/// removed bodies leave the journals after at most that much newer writing.
pub const DEFAULT_JOURNAL_SIZE: u64 = 64 * 1024 * 1024;

/// Memtable size past which a keyspace's memtable is flushed to disk. fjall's default, 64 MiB
/// per keyspace, let a server under sustained writing hold every keyspace's recent writes in
/// memory up to that size each (found by `tests/slow_reader.rs`: resident memory grew by
/// 0.6 MB/s at 1,000 msgs/s with no flush in sight after 270,000 messages).
///
/// It is also a tail-latency setting: when a keyspace rotates its memtable, fjall frees the
/// versions it no longer needs, and with them the last flushed memtable (a skiplist node per
/// record), while it holds the keyspace's version lock, which every write and read of that
/// keyspace waits for. The stall grows with the memtable: at 8 MiB it held the commit thread
/// for 40 ms and more (e2e max 80-90 ms at 8,000 msgs/s; BENCHMARKS.md, "Memtable size"), at
/// 2 MiB about 10-25 ms; at 512 KiB no better than 2 MiB, with four times the flushes. The
/// freeing itself now happens on our own thread (`persist/reaper.rs`); the rest of the stall (the lock
/// held through the rotation, a journal fsync queued behind a flush's writes) still grows
/// with the memtable.
/// Recorded by fjall when a keyspace is created: stores created before keep their size.
pub const MEMTABLE_SIZE: u64 = 2 * 1024 * 1024;

/// fjall's background threads (flushes and compactions). fjall 3.1 starts one per core, up to
/// four, and its worker 0 hands every compaction request back to the queue for the others
/// (`worker_pool.rs`, `WorkerMessage::Compact`): while the others are busy it takes the
/// request again at once and spins, a core's worth of CPU for as long as a compaction runs
/// (`worker_tick` and flume's `send` were 7% of the server's samples in a 1000-member group).
/// One worker does flushes and compactions in turn and never spins: `bench group --members
/// 1000 --online 1000 --rate 50`, p99 to the last member 0.40-0.56 s against 2.3-3.1 s with
/// two; `direct --users 100 --rate 8000`, p99 6.5 against 7.4-7.7 ms (BENCHMARKS.md).
const FJALL_WORKERS: usize = 1;

impl Store {
    /// Opens (or creates) the store in `path`. fjall replays its journal here, so a crash loses
    /// nothing that a commit with fsync returned for.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        Self::open_with(path, durability, DEFAULT_JOURNAL_SIZE)
    }

    /// Opens the store with journals rotated every `journal_size` bytes. A removed body stays
    /// in the journal that recorded it until that journal is rotated and its memtables
    /// flushed, so this bounds how long removed bodies linger there.
    ///
    /// It opens on a thread of lower priority, so that fjall's workers and the reaper, which
    /// start here, run below the message path (`persist/priority.rs`).
    pub fn open_with(
        path: &Path,
        durability: Durability,
        journal_size: u64,
    ) -> Result<Self, StoreError> {
        priority::spawned_low(|| Self::open_here(path, durability, journal_size))
            .map_err(fjall::Error::from)?
    }

    fn open_here(
        path: &Path,
        durability: Durability,
        journal_size: u64,
    ) -> Result<Self, StoreError> {
        let db = Database::builder(path)
            .worker_threads(FJALL_WORKERS)
            // We decide when the journal is synced (group commit), not fjall's background timer.
            .manual_journal_persist(true)
            .max_journaling_size(journal_size)
            .open()
            .map_err(|e| match e {
                // A torn last batch is dropped by fjall without error (it was never
                // acknowledged); anything else wrong in the journal is damage.
                fjall::Error::JournalRecovery(reason) => StoreError::CorruptJournal {
                    path: path.display().to_string(),
                    reason: reason.to_string(),
                },
                other => StoreError::Fjall(other),
            })?;
        let ks = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_SIZE)
            })
        };
        Ok(Self {
            messages: ks("messages")?,
            log: ks("log")?,
            conversations: ks("conversations")?,
            member_of: ks("member_of")?,
            direct: ks("direct")?,
            idempotency: ks("idempotency")?,
            devices: ks("devices")?,
            users: ks("users")?,
            receipts: ks("receipts")?,
            presence: ks("presence")?,
            cleared: ks("cleared")?,
            watermarks: ks("watermarks")?,
            pushers: ks("pushers")?,
            pending_push: ks("pending_push")?,
            push_content: ks("push_content")?,
            meta: ks("meta")?,
            media: ks("media")?,
            relations: ks("relations")?,
            // Last, so that it sees every keyspace above (it is declared first, so dropped
            // first).
            _reaper: reaper::Reaper::start(
                db.list_keyspace_names()
                    .iter()
                    .filter_map(|name| db.keyspace(name, KeyspaceCreateOptions::default).ok())
                    .collect(),
            ),
            db,
            durability,
            poisoned: AtomicBool::new(false),
            #[cfg(test)]
            failpoints: Default::default(),
        })
    }

    /// Whether writes are still accepted.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Refuses every later write, as a failed fsync does. The commit thread calls it when it
    /// cannot finish building a batch: the shards have already advanced their sequence
    /// numbers, marks and retry ids for what the batch held, so the memory of the router is
    /// ahead of the store, and only a restart (which rebuilds it from the store) is safe.
    pub fn poison(&self, why: &dyn std::fmt::Display) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %why, "store poisoned: refusing all writes from now on");
        }
    }

    /// A failpoint (test builds only; nothing at all in others).
    #[cfg(test)]
    pub(crate) fn failpoint(&self, point: &'static str) -> Result<(), StoreError> {
        self.failpoints.hit(point)
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub(crate) fn failpoint(&self, _point: &'static str) -> Result<(), StoreError> {
        Ok(())
    }

    pub(super) fn mode(&self) -> PersistMode {
        match self.durability {
            Durability::Sync => PersistMode::SyncData,
            Durability::Buffered => PersistMode::Buffer,
        }
    }

    /// Syncs the journal: what `buffered` durability acknowledged before this call is then
    /// on disk. A failure poisons the store, as a failed commit does.
    pub fn sync(&self) -> Result<(), StoreError> {
        if let Err(e) = self.db.persist(PersistMode::SyncData) {
            self.poison(&e);
            return Err(e.into());
        }
        Ok(())
    }

    /// Flushes everything to disk (used at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Bytes the messages' segments take on disk (journals not included).
    pub fn messages_disk_space(&self) -> u64 {
        self.messages.disk_space()
    }

    /// Bytes the store takes on disk.
    pub fn disk_space(&self) -> Result<u64, StoreError> {
        Ok(self.db.disk_space()?)
    }

    // ----- users -----

    /// Rewrites the messages' segments so that removed bodies leave the disk now rather than
    /// at fjall's next compaction of them. Costly on a large store: the sweep calls it only
    /// after removing many bodies.
    pub fn compact(&self) -> Result<(), StoreError> {
        // Flush every keyspace's memtable, so that no journal is still needed for recovery
        // and fjall can delete the journals that hold the old bodies too.
        for ks in self.keyspaces() {
            ks.rotate_memtable_and_wait()?;
        }
        self.messages.major_compact()?;
        tracing::debug!(
            journal = self.db.journal_disk_space().unwrap_or_default(),
            messages = self.messages.disk_space(),
            "compacted"
        );
        Ok(())
    }

    fn keyspaces(&self) -> [&Keyspace; 16] {
        [
            &self.messages,
            &self.log,
            &self.conversations,
            &self.member_of,
            &self.direct,
            &self.idempotency,
            &self.devices,
            &self.users,
            &self.receipts,
            &self.presence,
            &self.cleared,
            &self.watermarks,
            &self.pushers,
            &self.pending_push,
            &self.push_content,
            &self.meta,
        ]
    }

    // ----- push -----
}
