//! Writing: [`StoreBatch`], a group of writes committed atomically with one fsync, and the
//! [`Writer`] that side writes go through.

use fjall::Keyspace;

use super::records::*;
use super::{Store, StoreError, encode, keys};
use plover_proto::{ConversationId, Message};

/// The keyspaces whose keys side writes set or remove whole.
#[derive(Debug, Clone, Copy)]
pub(super) enum Space {
    Pushers,
    PendingPush,
    PushContent,
}

impl Space {
    fn ks(self) -> Ks {
        match self {
            Space::Pushers => Ks::Pushers,
            Space::PendingPush => Ks::PendingPush,
            Space::PushContent => Ks::PushContent,
        }
    }
}

/// A keyspace, by name: what a recorded write names (see [`Op`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Ks {
    /// `messages`
    Messages,
    /// `log`
    Log,
    /// `conversations`
    Conversations,
    /// `member_of`
    MemberOf,
    /// `direct`
    Direct,
    /// `idempotency`
    Idempotency,
    /// `devices`
    Devices,
    /// `users`
    Users,
    /// `receipts`
    Receipts,
    /// `presence`
    Presence,
    /// `cleared`
    Cleared,
    /// `watermarks`
    Watermarks,
    /// `pushers`
    Pushers,
    /// `pending_push`
    PendingPush,
    /// `push_content`
    PushContent,
    /// `meta`
    Meta,
    /// `media`
    Media,
    /// `relations`
    Relations,
}

/// One recorded write: a key set to a value, or removed (`None`). A cluster node records a
/// side write's operations instead of committing them, appends them to the replicated log,
/// and every node applies them in the log's order (`router/replicated.rs`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Op {
    /// Where.
    pub ks: Ks,
    /// The key.
    pub key: Vec<u8>,
    /// The new value, or `None` to remove the key.
    pub value: Option<Vec<u8>>,
}

/// A recorded side write: its operations, and a key that must not exist when it is applied
/// (or nothing of it is written: how two nodes creating the same direct conversation at once
/// end with one).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recorded {
    /// A key whose presence cancels the whole write.
    pub unless: Option<(Ks, Vec<u8>)>,
    /// The writes, in order.
    pub ops: Vec<Op>,
}

impl Ks {
    /// Every keyspace, in the order snapshots number them.
    pub const ALL: [Ks; 18] = [
        Ks::Messages,
        Ks::Log,
        Ks::Conversations,
        Ks::MemberOf,
        Ks::Direct,
        Ks::Idempotency,
        Ks::Devices,
        Ks::Users,
        Ks::Receipts,
        Ks::Presence,
        Ks::Cleared,
        Ks::Watermarks,
        Ks::Pushers,
        Ks::PendingPush,
        Ks::PushContent,
        Ks::Meta,
        Ks::Media,
        Ks::Relations,
    ];
}

impl Recorded {
    /// The users whose pushers or notification settings it changes.
    pub fn push_users(&self) -> Vec<String> {
        let mut users: Vec<String> = self
            .ops
            .iter()
            .filter(|op| matches!(op.ks, Ks::Pushers | Ks::PushContent))
            .filter_map(|op| op.key.split(|b| *b == 0).next())
            .map(|u| String::from_utf8_lossy(u).into_owned())
            .collect();
        users.sort();
        users.dedup();
        users
    }
}

enum Sink {
    Fjall(fjall::OwnedWriteBatch),
    Record(Recorded),
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

    /// A new conversation id, when ids come from elsewhere than this store's counter (a
    /// cluster's, shared by every node); `None` to use the store's own.
    fn allocate_conversation(&self) -> Option<Result<ConversationId, StoreError>> {
        None
    }
}

/// The store itself commits each write as a batch of its own.
impl Writer for Store {
    fn write(&self, write: SideWrite) -> Result<(), StoreError> {
        let mut batch = self.batch();
        write(&mut batch);
        batch.commit()
    }
}

impl Store {
    /// A new write batch.
    pub fn batch(&self) -> StoreBatch<'_> {
        StoreBatch {
            store: self,
            sink: Sink::Fjall(self.db.batch()),
        }
    }

    /// A batch that records its writes instead of committing them ([`StoreBatch::recorded`]).
    pub fn recorder(&self) -> StoreBatch<'_> {
        StoreBatch {
            store: self,
            sink: Sink::Record(Recorded::default()),
        }
    }

    /// Whether `key` exists in `ks`.
    pub fn contains(&self, ks: Ks, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.keyspace(ks).contains_key(key)?)
    }

    pub(super) fn keyspace(&self, ks: Ks) -> &Keyspace {
        match ks {
            Ks::Messages => &self.messages,
            Ks::Log => &self.log,
            Ks::Conversations => &self.conversations,
            Ks::MemberOf => &self.member_of,
            Ks::Direct => &self.direct,
            Ks::Idempotency => &self.idempotency,
            Ks::Devices => &self.devices,
            Ks::Users => &self.users,
            Ks::Receipts => &self.receipts,
            Ks::Presence => &self.presence,
            Ks::Cleared => &self.cleared,
            Ks::Watermarks => &self.watermarks,
            Ks::Pushers => &self.pushers,
            Ks::PendingPush => &self.pending_push,
            Ks::PushContent => &self.push_content,
            Ks::Meta => &self.meta,
            Ks::Media => &self.media,
            Ks::Relations => &self.relations,
        }
    }
}

/// A group of writes committed atomically with one fsync.
pub struct StoreBatch<'a> {
    store: &'a Store,
    sink: Sink,
}

impl Sink {
    fn insert(&mut self, store: &Store, ks: Ks, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        match self {
            Sink::Fjall(b) => b.insert(store.keyspace(ks), key.as_ref(), value.as_ref()),
            Sink::Record(r) => r.ops.push(Op {
                ks,
                key: key.as_ref().to_vec(),
                value: Some(value.as_ref().to_vec()),
            }),
        }
    }

    fn remove(&mut self, store: &Store, ks: Ks, key: impl AsRef<[u8]>) {
        match self {
            Sink::Fjall(b) => b.remove(store.keyspace(ks), key.as_ref()),
            Sink::Record(r) => r.ops.push(Op {
                ks,
                key: key.as_ref().to_vec(),
                value: None,
            }),
        }
    }
}

impl StoreBatch<'_> {
    /// Sets a key (for the per-keyspace methods of `persist`'s modules).
    pub(super) fn insert(&mut self, ks: Ks, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.sink.insert(self.store, ks, key, value);
    }

    /// Removes a key (for the per-keyspace methods of `persist`'s modules).
    pub(super) fn remove(&mut self, ks: Ks, key: impl AsRef<[u8]>) {
        self.sink.remove(self.store, ks, key);
    }

    /// The store the batch writes to (for reads a write depends on).
    pub(super) fn store(&self) -> &Store {
        self.store
    }

    /// Applies recorded writes (another node's, from the replicated log).
    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match &op.value {
                Some(v) => self.sink.insert(self.store, op.ks, &op.key, v),
                None => self.sink.remove(self.store, op.ks, &op.key),
            }
        }
    }

    /// Cancels the whole write when it is applied if `key` then exists in `ks` (a recording
    /// batch only: a committing batch's caller serialises its check-and-write itself).
    pub fn unless_exists(&mut self, ks: Ks, key: Vec<u8>) {
        if let Sink::Record(r) = &mut self.sink {
            r.unless = Some((ks, key));
        }
    }

    /// What a recording batch ([`Store::recorder`]) recorded; `None` for a committing one.
    pub fn recorded(self) -> Option<Recorded> {
        match self.sink {
            Sink::Record(r) => Some(r),
            Sink::Fjall(_) => None,
        }
    }

    /// Stores a message with its idempotency key (membership events have none).
    pub fn put_message(&mut self, msg: &Message) {
        self.sink.insert(
            self.store,
            Ks::Messages,
            keys::message(msg.conversation, msg.seq),
            encode(msg),
        );
        if msg.change.is_some() {
            return;
        }
        let mut idem = [0u8; 16];
        idem[..8].copy_from_slice(&msg.seq.to_be_bytes());
        idem[8..].copy_from_slice(&msg.ts.to_be_bytes());
        self.sink.insert(
            self.store,
            Ks::Idempotency,
            keys::idempotency(msg.conversation, &msg.from, &msg.id),
            idem,
        );
    }

    /// Appends an entry to a user's log at `pos` (the caller assigns positions in order).
    pub fn append_log(&mut self, user: &str, pos: u64, entry: &LogEntry) {
        self.sink
            .insert(self.store, Ks::Log, keys::log(user, pos), encode(entry));
    }

    /// Sets a retention watermark.
    pub fn put_watermark(&mut self, name: &str, conv: ConversationId, value: u64) {
        self.sink.insert(
            self.store,
            Ks::Watermarks,
            keys::watermark(name, conv),
            value.to_be_bytes(),
        );
    }

    /// Writes a conversation's record.
    pub fn put_conversation(&mut self, conv: ConversationId, record: &ConversationRecord) {
        self.sink.insert(
            self.store,
            Ks::Conversations,
            conv.to_be_bytes(),
            encode(record),
        );
    }

    /// Indexes `user` as a member of `conv`.
    pub fn add_member_of(&mut self, user: &str, conv: ConversationId) {
        self.sink
            .insert(self.store, Ks::MemberOf, keys::member_of(user, conv), []);
    }

    /// Removes `user`'s membership index entry for `conv`.
    pub fn remove_member_of(&mut self, user: &str, conv: ConversationId) {
        self.sink
            .remove(self.store, Ks::MemberOf, keys::member_of(user, conv));
    }

    /// Records a member's marks in a conversation.
    pub fn put_marks(&mut self, conv: ConversationId, user: &str, delivered: u64, read: u64) {
        let key = keys::conv_user(conv, user);
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&delivered.to_be_bytes());
        value[8..].copy_from_slice(&read.to_be_bytes());
        self.sink.insert(self.store, Ks::Receipts, key, value);
    }

    /// Records the log position a device acknowledged.
    pub fn put_cursor(&mut self, user: &str, device: &str, cursor: u64) {
        self.sink.insert(
            self.store,
            Ks::Devices,
            keys::device(user, device),
            cursor.to_be_bytes(),
        );
    }

    /// Records a user's first connection.
    pub fn put_user(&mut self, user: &str, first_ms: u64) {
        self.sink
            .insert(self.store, Ks::Users, user, first_ms.to_be_bytes());
    }

    /// Sets the id the next conversation gets.
    pub fn put_next_conversation(&mut self, next: ConversationId) {
        self.sink.insert(
            self.store,
            Ks::Meta,
            "next_conversation",
            next.to_be_bytes(),
        );
    }

    /// Records the last entry of a cluster's replicated log this store holds (see
    /// [`Store::applied`]).
    pub fn put_applied(&mut self, seq: u64, index: u32) {
        let mut value = [0u8; 12];
        value[..8].copy_from_slice(&seq.to_be_bytes());
        value[8..].copy_from_slice(&index.to_be_bytes());
        self.sink.insert(self.store, Ks::Meta, "applied", value);
    }

    /// Applies a side write another node recorded, unless the key it must not find exists;
    /// returns whether it was applied. Only the commit thread calls it, in the log's order,
    /// and nothing else in its batch writes the keys such a write checks.
    pub fn apply_recorded(&mut self, recorded: &Recorded) -> Result<bool, StoreError> {
        if let Some((ks, key)) = &recorded.unless
            && self.store.contains(*ks, key)?
        {
            return Ok(false);
        }
        self.apply(&recorded.ops);
        Ok(true)
    }

    /// Indexes the direct conversation of two users.
    pub fn put_direct(&mut self, a: &str, b: &str, conv: ConversationId) {
        self.sink.insert(
            self.store,
            Ks::Direct,
            keys::direct(a, b),
            conv.to_be_bytes(),
        );
    }

    /// Records how far `user` cleared their history of `conv`.
    pub fn put_cleared(&mut self, conv: ConversationId, user: &str, up_to: u64) {
        self.sink.insert(
            self.store,
            Ks::Cleared,
            keys::conv_user(conv, user),
            up_to.to_be_bytes(),
        );
    }

    /// Registers (or replaces) a pusher, with the device that registered it.
    pub fn put_pusher(&mut self, user: &str, device: &str, pusher: &plover_proto::Pusher) {
        let mut value = vec![PUSHER_WITH_DEVICE];
        value.extend(encode(&(device, pusher)));
        self.sink.insert(
            self.store,
            Ks::Pushers,
            keys::device(user, pusher.key()),
            value,
        );
    }

    /// Stores (or replaces) a pending notification.
    pub fn put_pending_push(&mut self, user: &str, pending: &PendingPush) {
        self.sink.insert(
            self.store,
            Ks::PendingPush,
            keys::log(user, pending.first_ms),
            encode(pending),
        );
    }

    /// Records when a user's last device went.
    pub fn put_last_seen(&mut self, user: &str, ms: u64) {
        self.sink
            .insert(self.store, Ks::Presence, user, ms.to_be_bytes());
    }

    /// Sets an empty-valued key.
    pub(super) fn put_key(&mut self, space: Space, key: Vec<u8>) {
        self.sink.insert(self.store, space.ks(), key, []);
    }

    /// Removes a key.
    pub(super) fn remove_key(&mut self, space: Space, key: Vec<u8>) {
        self.sink.remove(self.store, space.ks(), key);
    }

    /// Number of writes in the batch.
    pub fn len(&self) -> usize {
        match &self.sink {
            Sink::Fjall(b) => b.len(),
            Sink::Record(r) => r.ops.len(),
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the batch and (in `sync` durability) fsyncs it. Nothing in it is visible to
    /// readers before this returns. A failure poisons the store.
    pub fn commit(self) -> Result<(), StoreError> {
        let store = self.store;
        if store.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        let Sink::Fjall(batch) = self.sink else {
            return Err(StoreError::Corrupt {
                keyspace: "batch",
                message: "a recording batch cannot be committed".into(),
            });
        };
        let result = match store.failpoint("commit") {
            Ok(()) => batch
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
