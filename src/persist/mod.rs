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

#[cfg(test)]
pub(crate) mod failpoint;
mod keys;
mod reaper;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Durability;
use crate::framing::{
    ClientMsgId, ConversationChange, ConversationId, ConversationKind, Message, Retention,
};

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
    /// An earlier write or fsync failed; the store refuses writes until the server restarts.
    #[error("store is read-only after a failed write; restart the server once the disk is healthy")]
    Poisoned,
}

/// One entry of a user's sync log. Entries refer to records rather than copy them, so that a
/// deletion (later: retention) has one place to act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogEntry {
    /// A message in one of the user's conversations.
    Message {
        /// The conversation.
        conversation: ConversationId,
        /// The message's sequence number.
        seq: u64,
    },
    /// A message deleted for everyone by its sender.
    Deleted {
        /// The conversation.
        conversation: ConversationId,
        /// The message.
        seq: u64,
        /// Its sender.
        by: String,
    },
    /// A member's marks as they were at this point (small enough to keep inline).
    Receipt {
        /// The conversation.
        conversation: ConversationId,
        /// The member.
        user: String,
        /// Delivered up to.
        delivered: u64,
        /// Read up to.
        read: u64,
    },
}

/// A member of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The user.
    pub user: String,
    /// May change the group's members.
    pub admin: bool,
    /// The first seq the member may read (their joining); earlier history is not served to them.
    pub since: u64,
}

/// A notification waiting to go out to a user's pushers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPush {
    /// Messages it covers.
    pub count: u64,
    /// The latest message's conversation.
    pub conversation: ConversationId,
    /// The latest message's seq.
    pub seq: u64,
    /// The latest message's sender.
    pub sender: String,
    /// The latest message's body, when the user opted this conversation in.
    pub body: Option<bytes::Bytes>,
    /// When the first of them arrived, Unix ms.
    pub first_ms: u64,
}

/// What the store knows about a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRecord {
    /// Direct or group.
    pub kind: ConversationKind,
    /// A group's title (empty for direct conversations).
    pub title: String,
    /// Members, sorted by user.
    pub members: Vec<MemberRecord>,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// How long message bodies stay.
    pub retention: Retention,
}

/// What a message becomes when its body is removed: the same seq, sender, device and time,
/// an empty body, and `change` = `Erased`.
pub fn tombstone(msg: &Message) -> Message {
    Message {
        body: bytes::Bytes::new(),
        change: Some(ConversationChange::Erased),
        ..msg.clone()
    }
}

/// Whether a message's body is still there (not a tombstone, not a membership event).
pub fn has_body(msg: &Message) -> bool {
    msg.change.is_none()
}

impl ConversationRecord {
    /// A member's entry.
    pub fn member(&self, user: &str) -> Option<&MemberRecord> {
        self.members
            .binary_search_by(|m| m.user.as_str().cmp(user))
            .ok()
            .map(|i| &self.members[i])
    }

    /// Whether `user` is a member.
    pub fn is_member(&self, user: &str) -> bool {
        self.member(user).is_some()
    }

    /// The members' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.user.clone()).collect()
    }

    /// The admins' names, sorted.
    pub fn admins(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.admin)
            .map(|m| m.user.clone())
            .collect()
    }

    /// Adds or replaces a member, keeping the list sorted.
    pub fn upsert(&mut self, member: MemberRecord) {
        match self
            .members
            .binary_search_by(|m| m.user.as_str().cmp(&member.user))
        {
            Ok(i) => self.members[i] = member,
            Err(i) => self.members.insert(i, member),
        }
    }

    /// Removes a member; returns whether they were one.
    pub fn remove(&mut self, user: &str) -> bool {
        match self.members.binary_search_by(|m| m.user.as_str().cmp(user)) {
            Ok(i) => {
                self.members.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// The first byte of a pusher record that carries its device: `(device, pusher)` follows.
/// Records from before start with the `Pusher` variant's index (0 or 1), never this.
const PUSHER_WITH_DEVICE: u8 = 0xff;

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

impl Store {
    /// Opens (or creates) the store in `path`. fjall replays its journal here, so a crash loses
    /// nothing that a commit with fsync returned for.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        Self::open_with(path, durability, DEFAULT_JOURNAL_SIZE)
    }

    /// Opens the store with journals rotated every `journal_size` bytes. A removed body stays
    /// in the journal that recorded it until that journal is rotated and its memtables
    /// flushed, so this bounds how long removed bodies linger there.
    pub fn open_with(
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

    /// A new write batch.
    pub fn batch(&self) -> StoreBatch<'_> {
        StoreBatch {
            store: self,
            batch: self.db.batch(),
        }
    }

    fn mode(&self) -> PersistMode {
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

    /// Records a user at their first authenticated connection. Returns whether they are new.
    pub fn ensure_user(&self, w: &dyn Writer, user: &str, now_ms: u64) -> Result<bool, StoreError> {
        if self.users.contains_key(user)? {
            return Ok(false);
        }
        let user = user.to_owned();
        w.write(Box::new(move |b| b.put_user(&user, now_ms)))?;
        Ok(true)
    }

    /// Whether a user has ever connected.
    pub fn user_exists(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self.users.contains_key(user)?)
    }

    // ----- conversations -----

    /// The direct conversation between two users, if it exists.
    pub fn direct_between(&self, a: &str, b: &str) -> Result<Option<ConversationId>, StoreError> {
        Ok(self
            .direct
            .get(keys::direct(a, b))?
            .and_then(|v| keys::head_u64(&v)))
    }

    /// Creates the direct conversation between two users and returns its id.
    ///
    /// The caller serialises calls (the router holds a lock around check-and-create), so that
    /// two users opening their conversation at once get the same one.
    pub fn create_direct(
        &self,
        w: &dyn Writer,
        a: &str,
        b: &str,
        now_ms: u64,
    ) -> Result<ConversationId, StoreError> {
        let next = self.next_conversation()?;
        let mut names = vec![a.to_owned(), b.to_owned()];
        names.sort();
        names.dedup();
        let record = ConversationRecord {
            kind: ConversationKind::Direct,
            title: String::new(),
            members: names
                .into_iter()
                .map(|user| MemberRecord {
                    user,
                    admin: false,
                    since: 1,
                })
                .collect(),
            created_ms: now_ms,
            retention: Retention::Keep,
        };
        let (a, b) = (a.to_owned(), b.to_owned());
        w.write(Box::new(move |batch| {
            batch.put_next_conversation(next + 1);
            batch.put_conversation(next, &record);
            for m in &record.members {
                batch.add_member_of(&m.user, next);
            }
            batch.put_direct(&a, &b, next);
        }))?;
        Ok(next)
    }

    /// The id the next conversation gets.
    fn next_conversation(&self) -> Result<ConversationId, StoreError> {
        match self.meta.get("next_conversation")? {
            Some(v) => keys::head_u64(&v).ok_or(StoreError::Corrupt {
                keyspace: "meta",
                message: "next_conversation".into(),
            }),
            None => Ok(1),
        }
    }

    /// Allocates the next conversation id (the caller serialises calls, as for
    /// [`Store::create_direct`]). Durable before it returns, so an id is never handed out twice.
    pub fn allocate_conversation(&self, w: &dyn Writer) -> Result<ConversationId, StoreError> {
        let next = self.next_conversation()?;
        w.write(Box::new(move |b| b.put_next_conversation(next + 1)))?;
        Ok(next)
    }

    /// A conversation's record.
    pub fn conversation(
        &self,
        conv: ConversationId,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        match self.conversations.get(conv.to_be_bytes())? {
            Some(v) => Ok(Some(decode("conversations", &v)?)),
            None => Ok(None),
        }
    }

    /// The conversations a user belongs to, by id.
    pub fn conversations_of(&self, user: &str) -> Result<Vec<ConversationId>, StoreError> {
        let mut out = Vec::new();
        for guard in self.member_of.prefix(keys::name_prefix(user)) {
            let key = guard.key()?;
            if let Some(conv) = keys::tail_u64(&key) {
                out.push(conv);
            }
        }
        Ok(out)
    }

    // ----- messages -----

    /// The sequence number of a conversation's latest message (0 when it has none).
    pub fn last_seq(&self, conv: ConversationId) -> Result<u64, StoreError> {
        match self.messages.prefix(keys::message_prefix(conv)).next_back() {
            Some(guard) => Ok(keys::tail_u64(&guard.key()?).unwrap_or(0)),
            None => Ok(0),
        }
    }

    /// One message.
    pub fn message(&self, conv: ConversationId, seq: u64) -> Result<Option<Message>, StoreError> {
        self.failpoint("message")?;
        match self.messages.get(keys::message(conv, seq))? {
            Some(v) => Ok(Some(decode("messages", &v)?)),
            None => Ok(None),
        }
    }

    /// A page of a conversation, oldest first, and whether more lie beyond it.
    ///
    /// With `after` (and no `before`) the page starts just after `after` and `more` says whether
    /// newer messages follow. Otherwise the page is the newest `limit` messages below `before`
    /// (or the end) and `more` says whether older ones precede it.
    ///
    /// Nothing below `min_seq` is served (a member's history starts at their joining). The
    /// page also ends (with `more`) before its stored bytes would pass `max_bytes`, though it
    /// always holds one message if any: a page cut to one frame is never decoded whole first.
    pub fn history(
        &self,
        conv: ConversationId,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
        min_seq: u64,
        max_bytes: usize,
    ) -> Result<(Vec<Message>, bool), StoreError> {
        let lo = keys::message(conv, after.map_or(0, |a| a.saturating_add(1)).max(min_seq));
        let hi = match before {
            Some(0) => return Ok((Vec::new(), false)),
            Some(b) => keys::message(conv, b - 1),
            None => keys::message(conv, u64::MAX),
        };
        if lo > hi {
            return Ok((Vec::new(), false));
        }
        let range = self.messages.range(lo..=hi);
        let mut out = Vec::with_capacity(limit.min(256));
        let mut more = false;
        let forward = after.is_some() && before.is_none();
        let iter: Box<dyn Iterator<Item = fjall::Guard>> = if forward {
            Box::new(range)
        } else {
            Box::new(range.rev())
        };
        let mut bytes = 0usize;
        for guard in iter {
            if out.len() == limit {
                more = true;
                break;
            }
            let value = guard.value()?;
            bytes = bytes.saturating_add(value.len());
            if bytes > max_bytes && !out.is_empty() {
                more = true;
                break;
            }
            out.push(decode::<Message>("messages", &value)?);
        }
        if !forward {
            out.reverse();
        }
        Ok((out, more))
    }

    /// The original (seq, ts) of a message with this client id, if one was stored.
    pub fn idempotent(
        &self,
        conv: ConversationId,
        sender: &str,
        id: &ClientMsgId,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(self
            .idempotency
            .get(keys::idempotency(conv, sender, id))?
            .and_then(|v| Some((keys::head_u64(&v)?, keys::tail_u64(&v)?))))
    }

    // ----- receipts and presence -----

    /// Every member's (delivered, read) marks in a conversation.
    pub fn marks(&self, conv: ConversationId) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.receipts.prefix(keys::message_prefix(conv)) {
            let (k, v) = guard.into_inner()?;
            let user = String::from_utf8_lossy(&k[8..]).into_owned();
            let (Some(delivered), Some(read)) = (keys::head_u64(&v), keys::tail_u64(&v)) else {
                return Err(StoreError::Corrupt {
                    keyspace: "receipts",
                    message: format!("marks of {user} in {conv}"),
                });
            };
            out.push((user, delivered, read));
        }
        Ok(out)
    }

    /// When a user's last device went (Unix ms), if ever.
    pub fn last_seen(&self, user: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.presence.get(user)?.and_then(|v| keys::head_u64(&v)))
    }

    /// Records when a user's last device went (with the writer's next batch).
    pub fn set_last_seen(&self, w: &dyn Writer, user: &str, ms: u64) -> Result<(), StoreError> {
        let user = user.to_owned();
        w.write(Box::new(move |b| b.put_last_seen(&user, ms)))
    }

    /// Whether two users share at least one conversation.
    pub fn share_conversation(&self, a: &str, b: &str) -> Result<bool, StoreError> {
        let theirs: std::collections::HashSet<ConversationId> =
            self.conversations_of(b)?.into_iter().collect();
        Ok(self
            .conversations_of(a)?
            .into_iter()
            .any(|c| theirs.contains(&c)))
    }

    // ----- retention -----

    /// Every conversation whose retention is not `keep`, with its record.
    pub fn retained_conversations(
        &self,
    ) -> Result<Vec<(ConversationId, ConversationRecord)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.conversations.iter() {
            let (k, v) = guard.into_inner()?;
            let record: ConversationRecord = decode("conversations", &v)?;
            if record.retention != Retention::Keep
                && let Some(conv) = keys::head_u64(&k)
            {
                out.push((conv, record));
            }
        }
        Ok(out)
    }

    /// Messages of a conversation from `from` on, in order, at most `limit`.
    pub fn messages_from(
        &self,
        conv: ConversationId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.failpoint("messages_from")?;
        let mut out = Vec::new();
        let range = self
            .messages
            .range(keys::message(conv, from)..=keys::message(conv, u64::MAX));
        for guard in range.take(limit) {
            out.push(decode("messages", &guard.value()?)?);
        }
        Ok(out)
    }

    /// A retention watermark of a conversation (0 if unset).
    pub fn watermark(&self, name: &str, conv: ConversationId) -> Result<u64, StoreError> {
        Ok(self
            .watermarks
            .get(keys::watermark(name, conv))?
            .and_then(|v| keys::head_u64(&v))
            .unwrap_or(0))
    }

    /// The last seq `user` hid from their own history of `conv` (0 if none).
    pub fn cleared(&self, conv: ConversationId, user: &str) -> Result<u64, StoreError> {
        Ok(self
            .cleared
            .get(keys::conv_user(conv, user))?
            .and_then(|v| keys::head_u64(&v))
            .unwrap_or(0))
    }

    /// Hides `conv`'s history up to `up_to` from `user` (never lowers an earlier mark).
    pub fn set_cleared(
        &self,
        w: &dyn Writer,
        conv: ConversationId,
        user: &str,
        up_to: u64,
    ) -> Result<u64, StoreError> {
        let up_to = up_to.max(self.cleared(conv, user)?);
        let user = user.to_owned();
        w.write(Box::new(move |b| b.put_cleared(conv, &user, up_to)))?;
        Ok(up_to)
    }

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

    /// Registers (or replaces) a pusher of `user`, with the device that registered it.
    pub fn put_pusher(
        &self,
        w: &dyn Writer,
        user: &str,
        device: &str,
        pusher: &crate::framing::Pusher,
    ) -> Result<(), StoreError> {
        let (user, device, pusher) = (user.to_owned(), device.to_owned(), pusher.clone());
        w.write(Box::new(move |b| b.put_pusher(&user, &device, &pusher)))
    }

    /// A user's pushers, each with the device that registered it (`None` for one stored
    /// before devices were recorded).
    pub fn pusher_records(
        &self,
        user: &str,
    ) -> Result<Vec<(Option<String>, crate::framing::Pusher)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.pushers.prefix(keys::name_prefix(user)) {
            let value = guard.value()?;
            out.push(match value.split_first() {
                Some((&PUSHER_WITH_DEVICE, rest)) => {
                    let (device, pusher) = decode("pushers", rest)?;
                    (Some(device), pusher)
                }
                _ => (None, decode("pushers", &value)?),
            });
        }
        Ok(out)
    }

    /// Removes a pusher; returns whether it existed.
    pub fn remove_pusher(&self, w: &dyn Writer, user: &str, key: &str) -> Result<bool, StoreError> {
        let k = keys::device(user, key);
        if !self.pushers.contains_key(&k)? {
            return Ok(false);
        }
        w.write(Box::new(move |b| b.remove_key(Space::Pushers, k)))?;
        Ok(true)
    }

    /// A user's pushers.
    pub fn pushers_of(&self, user: &str) -> Result<Vec<crate::framing::Pusher>, StoreError> {
        Ok(self
            .pusher_records(user)?
            .into_iter()
            .map(|(_, pusher)| pusher)
            .collect())
    }

    /// Every user with at least one pusher.
    pub fn users_with_pushers(&self) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = Vec::new();
        for guard in self.pushers.iter() {
            let key = guard.key()?;
            let user = key.split(|b| *b == 0).next().unwrap_or_default();
            let user = String::from_utf8_lossy(user).into_owned();
            if out.last() != Some(&user) {
                out.push(user);
            }
        }
        Ok(out)
    }

    /// Stores (or replaces) pending notifications with the writer's next batch. Each is
    /// keyed by its user and `first_ms`, so a newer one never overwrites one being delivered.
    pub fn put_pending_pushes(
        &self,
        w: &dyn Writer,
        pending: Vec<(String, PendingPush)>,
    ) -> Result<(), StoreError> {
        w.write(Box::new(move |b| {
            for (user, p) in &pending {
                b.put_pending_push(user, p);
            }
        }))
    }

    /// Removes a pending notification once it went out (or was given up).
    pub fn remove_pending_push(
        &self,
        w: &dyn Writer,
        user: &str,
        first_ms: u64,
    ) -> Result<(), StoreError> {
        let key = keys::log(user, first_ms);
        w.write(Box::new(move |b| b.remove_key(Space::PendingPush, key)))
    }

    /// Every pending notification (at start).
    pub fn pending_pushes(&self) -> Result<Vec<(String, PendingPush)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.pending_push.iter() {
            let (k, v) = guard.into_inner()?;
            let user = &k[..k.len().saturating_sub(9)];
            out.push((
                String::from_utf8_lossy(user).into_owned(),
                decode("pending_push", &v)?,
            ));
        }
        Ok(out)
    }

    /// Opts a conversation in or out of bodies in `user`'s notifications.
    pub fn set_push_content(
        &self,
        w: &dyn Writer,
        user: &str,
        conv: ConversationId,
        include: bool,
    ) -> Result<(), StoreError> {
        let key = keys::member_of(user, conv);
        w.write(Box::new(move |b| {
            if include {
                b.put_key(Space::PushContent, key);
            } else {
                b.remove_key(Space::PushContent, key);
            }
        }))
    }

    /// Every (user, conversation) opted in to bodies in notifications.
    pub fn push_content_all(&self) -> Result<Vec<(String, ConversationId)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.push_content.iter() {
            let key = guard.key()?;
            let Some(conv) = keys::tail_u64(&key) else {
                continue;
            };
            let user = &key[..key.len().saturating_sub(9)];
            out.push((String::from_utf8_lossy(user).into_owned(), conv));
        }
        Ok(out)
    }

    // ----- sync logs and cursors -----

    /// The latest position of a user's log (0 when empty).
    pub fn log_head(&self, user: &str) -> Result<u64, StoreError> {
        self.failpoint("log_head")?;
        match self.log.prefix(keys::name_prefix(user)).next_back() {
            Some(guard) => Ok(keys::tail_u64(&guard.key()?).unwrap_or(0)),
            None => Ok(0),
        }
    }

    /// Up to `limit` entries of a user's log after position `after`, in order.
    pub fn read_log(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        self.failpoint("read_log")?;
        let lo = keys::log(user, after.saturating_add(1));
        let hi = keys::log(user, u64::MAX);
        let mut out = Vec::new();
        for guard in self.log.range(lo..=hi).take(limit) {
            let (k, v) = guard.into_inner()?;
            let pos = keys::tail_u64(&k).unwrap_or(0);
            out.push((pos, decode("log", &v)?));
        }
        Ok(out)
    }

    /// The log position a device last acknowledged.
    pub fn device_cursor(&self, user: &str, device: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .devices
            .get(keys::device(user, device))?
            .and_then(|v| keys::head_u64(&v)))
    }
}

/// The keyspaces whose keys side writes set or remove whole.
#[derive(Debug, Clone, Copy)]
enum Space {
    Pushers,
    PendingPush,
    PushContent,
}

/// A write to add to a batch: what a [`Writer`] commits.
pub type SideWrite = Box<dyn FnOnce(&mut StoreBatch<'_>) + Send>;

/// Commits writes that are not the hot path's (a new user or direct conversation, a cleared
/// history, pushers, pending notifications, last seen). The server's writer is the commit
/// thread (`router/commit.rs`): such a write joins the next group commit and shares its
/// fsync, rather than taking fjall's journal lock for an fsync of its own while the messages
/// wait. The [`Store`] itself commits it alone (tools, tests, the last writes at shutdown).
pub trait Writer: Send + Sync {
    /// Adds `write` to a batch and waits until that batch is durable (or failed). Blocking.
    fn write(&self, write: SideWrite) -> Result<(), StoreError>;
}

/// The store itself commits each write as a batch of its own.
impl Writer for Store {
    fn write(&self, write: SideWrite) -> Result<(), StoreError> {
        let mut batch = self.batch();
        write(&mut batch);
        batch.commit()
    }
}

/// A group of writes committed atomically with one fsync.
pub struct StoreBatch<'a> {
    store: &'a Store,
    batch: fjall::OwnedWriteBatch,
}

impl StoreBatch<'_> {
    /// Stores a message with its idempotency key (membership events have none).
    pub fn put_message(&mut self, msg: &Message) {
        let s = self.store;
        self.batch.insert(
            &s.messages,
            keys::message(msg.conversation, msg.seq),
            encode(msg),
        );
        if msg.change.is_some() {
            return;
        }
        let mut idem = [0u8; 16];
        idem[..8].copy_from_slice(&msg.seq.to_be_bytes());
        idem[8..].copy_from_slice(&msg.ts.to_be_bytes());
        self.batch.insert(
            &s.idempotency,
            keys::idempotency(msg.conversation, &msg.from, &msg.id),
            idem,
        );
    }

    /// Appends an entry to a user's log at `pos` (the caller assigns positions in order).
    pub fn append_log(&mut self, user: &str, pos: u64, entry: &LogEntry) {
        self.batch
            .insert(&self.store.log, keys::log(user, pos), encode(entry));
    }

    /// Sets a retention watermark.
    pub fn put_watermark(&mut self, name: &str, conv: ConversationId, value: u64) {
        self.batch.insert(
            &self.store.watermarks,
            keys::watermark(name, conv),
            value.to_be_bytes(),
        );
    }

    /// Writes a conversation's record.
    pub fn put_conversation(&mut self, conv: ConversationId, record: &ConversationRecord) {
        self.batch.insert(
            &self.store.conversations,
            conv.to_be_bytes(),
            encode(record),
        );
    }

    /// Indexes `user` as a member of `conv`.
    pub fn add_member_of(&mut self, user: &str, conv: ConversationId) {
        self.batch
            .insert(&self.store.member_of, keys::member_of(user, conv), []);
    }

    /// Removes `user`'s membership index entry for `conv`.
    pub fn remove_member_of(&mut self, user: &str, conv: ConversationId) {
        self.batch
            .remove(&self.store.member_of, keys::member_of(user, conv));
    }

    /// Records a member's marks in a conversation.
    pub fn put_marks(&mut self, conv: ConversationId, user: &str, delivered: u64, read: u64) {
        let key = keys::conv_user(conv, user);
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&delivered.to_be_bytes());
        value[8..].copy_from_slice(&read.to_be_bytes());
        self.batch.insert(&self.store.receipts, key, value);
    }

    /// Records the log position a device acknowledged.
    pub fn put_cursor(&mut self, user: &str, device: &str, cursor: u64) {
        self.batch.insert(
            &self.store.devices,
            keys::device(user, device),
            cursor.to_be_bytes(),
        );
    }

    /// Records a user's first connection.
    pub fn put_user(&mut self, user: &str, first_ms: u64) {
        self.batch
            .insert(&self.store.users, user, first_ms.to_be_bytes());
    }

    /// Sets the id the next conversation gets.
    pub fn put_next_conversation(&mut self, next: ConversationId) {
        self.batch
            .insert(&self.store.meta, "next_conversation", next.to_be_bytes());
    }

    /// Indexes the direct conversation of two users.
    pub fn put_direct(&mut self, a: &str, b: &str, conv: ConversationId) {
        self.batch
            .insert(&self.store.direct, keys::direct(a, b), conv.to_be_bytes());
    }

    /// Records how far `user` cleared their history of `conv`.
    pub fn put_cleared(&mut self, conv: ConversationId, user: &str, up_to: u64) {
        self.batch.insert(
            &self.store.cleared,
            keys::conv_user(conv, user),
            up_to.to_be_bytes(),
        );
    }

    /// Registers (or replaces) a pusher, with the device that registered it.
    pub fn put_pusher(&mut self, user: &str, device: &str, pusher: &crate::framing::Pusher) {
        let mut value = vec![PUSHER_WITH_DEVICE];
        value.extend(encode(&(device, pusher)));
        self.batch
            .insert(&self.store.pushers, keys::device(user, pusher.key()), value);
    }

    /// Stores (or replaces) a pending notification.
    pub fn put_pending_push(&mut self, user: &str, pending: &PendingPush) {
        self.batch.insert(
            &self.store.pending_push,
            keys::log(user, pending.first_ms),
            encode(pending),
        );
    }

    /// Records when a user's last device went.
    pub fn put_last_seen(&mut self, user: &str, ms: u64) {
        self.batch
            .insert(&self.store.presence, user, ms.to_be_bytes());
    }

    fn space(&self, space: Space) -> &Keyspace {
        match space {
            Space::Pushers => &self.store.pushers,
            Space::PendingPush => &self.store.pending_push,
            Space::PushContent => &self.store.push_content,
        }
    }

    /// Sets an empty-valued key.
    fn put_key(&mut self, space: Space, key: Vec<u8>) {
        let ks = self.space(space).clone();
        self.batch.insert(&ks, key, []);
    }

    /// Removes a key.
    fn remove_key(&mut self, space: Space, key: Vec<u8>) {
        let ks = self.space(space).clone();
        self.batch.remove(&ks, key);
    }

    /// Number of writes in the batch.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Writes the batch and (in `sync` durability) fsyncs it. Nothing in it is visible to
    /// readers before this returns. A failure poisons the store.
    pub fn commit(self) -> Result<(), StoreError> {
        let store = self.store;
        if store.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        let result = match store.failpoint("commit") {
            Ok(()) => self
                .batch
                .durability(Some(store.mode()))
                .commit()
                .map_err(StoreError::from),
            Err(injected) => Err(injected),
        };
        if let Err(e) = result {
            store.poison(&e);
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(conv: u64, seq: u64) -> Message {
        Message {
            conversation: conv,
            seq,
            from: "alice".into(),
            device: "d".into(),
            ts: seq * 10,
            id: ClientMsgId([seq as u8; 16]),
            body: Bytes::from(format!("m{seq}")),
            change: None,
        }
    }

    #[test]
    fn messages_and_history_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), Durability::Sync).expect("open");
        let mut b = store.batch();
        for seq in 1..=10 {
            b.put_message(&msg(1, seq));
        }
        b.put_message(&msg(2, 1));
        b.commit().expect("commit");

        assert_eq!(store.last_seq(1).expect("last"), 10);
        assert_eq!(store.last_seq(3).expect("last"), 0);
        let seqs = |v: &[Message]| v.iter().map(|m| m.seq).collect::<Vec<_>>();

        let (page, more) = store.history(1, None, None, 3, 0, usize::MAX).expect("h");
        assert_eq!((seqs(&page), more), (vec![8, 9, 10], true));
        let (page, more) = store
            .history(1, Some(8), None, 3, 0, usize::MAX)
            .expect("h");
        assert_eq!((seqs(&page), more), (vec![5, 6, 7], true));
        let (page, more) = store
            .history(1, Some(3), None, 5, 0, usize::MAX)
            .expect("h");
        assert_eq!((seqs(&page), more), (vec![1, 2], false));
        let (page, more) = store
            .history(1, None, Some(7), 2, 0, usize::MAX)
            .expect("h");
        assert_eq!((seqs(&page), more), (vec![8, 9], true));
        let (page, more) = store
            .history(1, None, Some(8), 5, 0, usize::MAX)
            .expect("h");
        assert_eq!((seqs(&page), more), (vec![9, 10], false));
        // A member who joined at 6 sees nothing before it, whichever way they page.
        let (page, more) = store
            .history(1, Some(9), None, 10, 6, usize::MAX)
            .expect("h");
        assert_eq!((seqs(&page), more), (vec![6, 7, 8], false));
        let (page, _) = store
            .history(1, None, Some(2), 2, 6, usize::MAX)
            .expect("h");
        assert_eq!(seqs(&page), vec![6, 7]);
        // A byte budget ends the page early (with `more`), but never before one message.
        let (page, more) = store.history(1, None, None, 10, 0, 1).expect("h");
        assert_eq!((seqs(&page), more), (vec![10], true));
        let one = postcard::to_stdvec(&msg(1, 1)).expect("size").len();
        let (page, more) = store.history(1, None, Some(0), 10, 0, 3 * one).expect("h");
        assert_eq!((seqs(&page), more), (vec![1, 2, 3], true));
        assert_eq!(
            store
                .idempotent(1, "alice", &ClientMsgId([4; 16]))
                .expect("i"),
            Some((4, 40))
        );
    }

    #[test]
    fn logs_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), Durability::Sync).expect("open");
            let mut b = store.batch();
            for pos in 1..=5 {
                b.append_log(
                    "bob",
                    pos,
                    &LogEntry::Message {
                        conversation: 1,
                        seq: pos,
                    },
                );
            }
            b.append_log(
                "bo",
                1,
                &LogEntry::Message {
                    conversation: 9,
                    seq: 1,
                },
            );
            b.put_cursor("bob", "phone", 3);
            b.commit().expect("commit");
        }
        let store = Store::open(dir.path(), Durability::Sync).expect("reopen");
        assert_eq!(store.log_head("bob").expect("head"), 5);
        assert_eq!(store.log_head("bo").expect("head"), 1);
        let tail = store.read_log("bob", 3, 10).expect("read");
        assert_eq!(tail.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(store.device_cursor("bob", "phone").expect("c"), Some(3));
    }

    #[test]
    fn direct_conversation_is_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), Durability::Sync).expect("open");
        assert_eq!(store.direct_between("a", "b").expect("d"), None);
        let id = store.create_direct(&store, "b", "a", 1).expect("create");
        assert_eq!(store.direct_between("a", "b").expect("d"), Some(id));
        assert_eq!(store.conversations_of("a").expect("c"), vec![id]);
        let rec = store.conversation(id).expect("c").expect("exists");
        assert_eq!(rec.retention, Retention::Keep);
        assert_eq!(rec.names(), vec!["a".to_string(), "b".to_string()]);
        assert!(rec.is_member("a") && !rec.is_member("c"));
        let id2 = store.create_direct(&store, "a", "c", 1).expect("create");
        assert_ne!(id, id2);
    }
}

#[cfg(test)]
mod removal_tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn erased_bodies_leave_the_disk_after_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), Durability::Buffered).expect("open");
        let body = Bytes::from(vec![0x5au8; 16 * 1024]);
        let mut messages = Vec::new();
        for seq in 1..=2000u64 {
            // Bodies that do not compress (end-to-end encrypted payloads look like this).
            let mut b = body.to_vec();
            getrandom::fill(&mut b).expect("random");
            messages.push(Message {
                conversation: 1,
                seq,
                from: "alice".into(),
                device: "d".into(),
                ts: seq,
                id: ClientMsgId([seq as u8; 16]),
                body: Bytes::from(b),
                change: None,
            });
        }
        for chunk in messages.chunks(100) {
            let mut w = store.batch();
            for m in chunk {
                w.put_message(m);
            }
            w.commit().expect("commit");
        }
        store.compact().expect("flush");
        let full = store.messages_disk_space();
        let total = store.disk_space().expect("size");
        let mut w = store.batch();
        for m in &messages {
            w.put_message(&tombstone(m));
        }
        w.commit().expect("commit");
        store.compact().expect("compact");
        let after = store.messages_disk_space();
        assert!(
            full > 10_000_000 && after < full / 20,
            "messages take {after} bytes on disk after erasing, {full} before"
        );
        // The journal is a preallocated file of a fixed size; the bodies it recorded go when
        // it is rotated, after `DEFAULT_JOURNAL_SIZE` of newer writes.
        assert!(store.disk_space().expect("size") < total);
        let kept = store.message(1, 7).expect("read").expect("tombstone");
        assert!(kept.body.is_empty() && kept.change == Some(ConversationChange::Erased));
        assert_eq!((kept.seq, kept.from.as_str()), (7, "alice"));
    }
}
