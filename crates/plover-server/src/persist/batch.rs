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

impl Store {
    /// A new write batch.
    pub fn batch(&self) -> StoreBatch<'_> {
        StoreBatch {
            store: self,
            batch: self.db.batch(),
        }
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
    pub fn put_pusher(&mut self, user: &str, device: &str, pusher: &plover_proto::Pusher) {
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
    pub(super) fn put_key(&mut self, space: Space, key: Vec<u8>) {
        let ks = self.space(space).clone();
        self.batch.insert(&ks, key, []);
    }

    /// Removes a key.
    pub(super) fn remove_key(&mut self, space: Space, key: Vec<u8>) {
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
