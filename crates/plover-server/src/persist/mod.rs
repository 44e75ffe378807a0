//! The store: fjall keyspaces for messages, sync logs, conversations, members, device cursors
//! and idempotency keys.
//!
//! Everything here is blocking. The router calls it from its own threads (shards and the commit
//! thread) and from `spawn_blocking`, never from an async worker. Writes that must be durable go
//! through [`StoreBatch::commit`], which writes the batch to the journal and fsyncs it once (group
//! commit); a failed write or fsync poisons the store and every later write is refused.
//!
//! | keyspace | key | value |
//! |---|---|---|
//! | `messages` | conversation, seq | postcard `Message` |
//! | `log` | user, 0, position | postcard [`LogEntry`] |
//! | `conversations` | conversation | postcard [`ConversationRecord`] |
//! | `member_of` | user, 0, conversation | empty |
//! | `direct` | smaller user, 0, larger user | conversation |
//! | `idempotency` | conversation, sender, 0, client id | seq, ts |
//! | `devices` | user, 0, device | acknowledged log position |
//! | `users` | user | first connection, Unix ms |
//! | `receipts` | conversation, user | delivered seq, read seq |
//! | `presence` | user | last seen, Unix ms |
//! | `cleared` | conversation, user | the last seq the user hid from their own history |
//! | `watermarks` | name, conversation | retention progress (`erased`, `swept`) |
//! | `pushers` | user, 0, key | `ff`, postcard (registering device, `Pusher`) |
//! | `pending_push` | user, 0, first arrival | postcard [`PendingPush`] |
//! | `push_content` | user, 0, conversation | empty: bodies go in this conversation's pushes |
//! | `meta` | name | value (`next_conversation`) |

//!
//! # Layout
//!
//! - `store.rs`: opening and tuning fjall, poison, sync, flush, disk space, compaction.
//! - `batch.rs`: [`StoreBatch`], the atomic group of writes, and the [`Writer`] side writes
//!   go through.
//! - `records.rs`: the stored record types.
//! - `messages.rs`, `logs.rs`, `conversations.rs`, `users.rs`, `pushers.rs`: the reads (and
//!   side writes) of each domain's keyspaces.
//! - `keys.rs`: the key encodings; `reaper.rs`: frees fjall's retired memtables off the
//!   writer's path.

mod accounts;
mod batch;
mod conversations;
#[cfg(test)]
pub(crate) mod failpoint;
mod keys;
mod logs;
mod media;
mod messages;
mod policies;
pub(crate) mod priority;
mod pushers;
mod reaper;
mod records;
mod relations;
mod snapshot;
mod store;
mod users;

pub use accounts::Kick;
pub use batch::{Ks, Op, Recorded, SideWrite, StoreBatch, Writer};
pub use media::{MediaRefs, ObjectRecord, RefRecord};
pub use policies::Policies;
pub use records::{ConversationRecord, LogEntry, MemberRecord, PendingPush, has_body, tombstone};
pub use store::{DEFAULT_JOURNAL_SIZE, MEMTABLE_SIZE};

use fjall::{Database, Keyspace};
use serde::Serialize;
use std::sync::atomic::AtomicBool;

use crate::config::Durability;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// fjall reported an error (I/O, corruption, poisoned journal).
    #[error("store: {0}")]
    Fjall(#[from] fjall::Error),
    /// A stored value could not be decoded: the data directory is damaged or from a newer build.
    #[error("store: corrupt record in {keyspace}: {message}")]
    Corrupt {
        /// Where.
        keyspace: &'static str,
        /// What.
        message: String,
    },
    /// The journal is damaged before its last batch: starting would silently drop
    /// acknowledged writes, so the store refuses to open.
    #[error(
        "the journal in {path} is damaged before its end ({reason}); refusing to start rather \
         than silently drop acknowledged messages. Restore the data directory from a backup, or \
         move the damaged journal aside if losing what it holds is acceptable"
    )]
    CorruptJournal {
        /// The data directory.
        path: String,
        /// What fjall found.
        reason: String,
    },
    /// The writer (the commit thread) has stopped: the server is shutting down.
    #[error("store: the server is shutting down; nothing was written")]
    Stopped,
    /// The cluster could not do what the store needed from it (a conversation id).
    #[error("the cluster cannot answer right now: {0}")]
    Cluster(String),
    /// An earlier write or fsync failed; the store refuses writes until the server restarts.
    #[error("store is read-only after a failed write; restart the server once the disk is healthy")]
    Poisoned,
}

/// The store.
pub struct Store {
    /// Dropped first: it holds clones of the keyspaces below.
    _reaper: reaper::Reaper,
    db: Database,
    messages: Keyspace,
    log: Keyspace,
    conversations: Keyspace,
    member_of: Keyspace,
    direct: Keyspace,
    idempotency: Keyspace,
    devices: Keyspace,
    users: Keyspace,
    receipts: Keyspace,
    presence: Keyspace,
    cleared: Keyspace,
    watermarks: Keyspace,
    pushers: Keyspace,
    pending_push: Keyspace,
    push_content: Keyspace,
    meta: Keyspace,
    media: Keyspace,
    relations: Keyspace,
    durability: Durability,
    poisoned: AtomicBool,
    /// Test builds only: store operations made to fail on purpose.
    #[cfg(test)]
    pub(crate) failpoints: failpoint::Failpoints,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    keyspace: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        keyspace,
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard only fails to serialise into a Vec for types serde cannot express; ours can.
    postcard::to_stdvec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests;
