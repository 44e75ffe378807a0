//! Stored objects (`media` keyspace): what the server knows of each object, which messages
//! reference it, and when it may be removed. The bytes themselves are in the object store
//! (`crate::media`); this is the part every node of a cluster applies from the log.
//!
//! Keys, each starting with one letter:
//! - `o` object id -> [`ObjectRecord`]: size, when it was stored, who uploaded it;
//! - `r` object id, conversation, seq -> [`RefRecord`]: a message that references the
//!   object, and (under `until_delivered`) the members who have not fetched it yet;
//! - `m` conversation, seq -> the objects that message references;
//! - `g` object id -> a time (Unix ms, 8 bytes big-endian) after which the collector looks
//!   at the object again, and removes it if no message references it then.
//! - `q` user -> bytes of stored objects the user uploaded (the quota's count).
//! - `d` object id -> [`ObjectRecord`]: an object the collector is removing. Its `o` record
//!   went in the same batch, so that no new message may reference it; its parts are being
//!   deleted, and the entry goes once they are (or the object comes back to `o` if a message
//!   sequenced before the removal began turns out to reference it).

use plover_proto::{ConversationId, ObjectId};
use serde::{Deserialize, Serialize};

use super::batch::{Ks, StoreBatch};
use super::{Store, StoreError, decode, encode};

/// An object in the object store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    /// Its size in bytes.
    pub size: u64,
    /// When it was stored, Unix ms.
    pub stored_ms: u64,
    /// Who uploaded it (one, unless two users uploaded the same bytes).
    pub uploaders: Vec<String>,
}

/// A message's reference to an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefRecord {
    /// When the message was sent, Unix ms.
    pub sent_ms: u64,
    /// Under `until_delivered`: the members who have not fetched the object yet (the
    /// reference goes when none is left). Empty otherwise: the reference goes with the
    /// message's body.
    pub pending: Vec<String>,
}

/// What a message sent with `SendWith` writes beside itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRefs {
    /// The objects.
    pub objects: Vec<ObjectId>,
    /// The members who must fetch them before they go (`until_delivered`), or none.
    pub pending: Vec<String>,
}

fn object_key(id: &ObjectId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'o');
    k.extend_from_slice(&id.0);
    k
}

fn ref_prefix(id: &ObjectId) -> Vec<u8> {
    let mut k = Vec::with_capacity(49);
    k.push(b'r');
    k.extend_from_slice(&id.0);
    k
}

fn ref_key(id: &ObjectId, conv: ConversationId, seq: u64) -> Vec<u8> {
    let mut k = ref_prefix(id);
    k.extend_from_slice(&conv.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn message_key(conv: ConversationId, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(b'm');
    k.extend_from_slice(&conv.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn collect_key(id: &ObjectId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'g');
    k.extend_from_slice(&id.0);
    k
}

fn doomed_key(id: &ObjectId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'd');
    k.extend_from_slice(&id.0);
    k
}

fn usage_key(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user.len());
    k.push(b'q');
    k.extend_from_slice(user.as_bytes());
    k
}

impl Store {
    /// An object's record, if it is stored.
    pub fn object(&self, id: &ObjectId) -> Result<Option<ObjectRecord>, StoreError> {
        match self.media.get(object_key(id))? {
            Some(v) => Ok(Some(decode("media", &v)?)),
            None => Ok(None),
        }
    }

    /// Message `seq` of `conv`'s reference to `id`, if it has one.
    pub fn object_ref(
        &self,
        id: &ObjectId,
        conv: ConversationId,
        seq: u64,
    ) -> Result<Option<RefRecord>, StoreError> {
        match self.media.get(ref_key(id, conv, seq))? {
            Some(v) => Ok(Some(decode("media", &v)?)),
            None => Ok(None),
        }
    }

    /// Whether any message references `id`.
    pub fn object_referenced(&self, id: &ObjectId) -> Result<bool, StoreError> {
        match self.media.prefix(ref_prefix(id)).next() {
            Some(guard) => {
                guard.key()?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Every reference to any object: (object, conversation, seq, record). For the
    /// collector's pass over references that outlived `retention.max_undelivered`.
    pub fn object_refs(
        &self,
    ) -> Result<Vec<(ObjectId, ConversationId, u64, RefRecord)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.media.prefix(b"r") {
            let (key, value) = guard.into_inner()?;
            let (Some(id), Some(conv), Some(seq)) = (
                key.get(1..33).and_then(|b| b.try_into().ok()).map(ObjectId),
                key.get(33..41)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes),
                key.get(41..49)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes),
            ) else {
                continue;
            };
            out.push((id, conv, seq, decode("media", &value)?));
        }
        Ok(out)
    }

    /// The objects due for a look by the collector at `now_ms`.
    pub fn objects_due(&self, now_ms: u64) -> Result<Vec<ObjectId>, StoreError> {
        let mut out = Vec::new();
        for guard in self.media.prefix(b"g") {
            let (key, value) = guard.into_inner()?;
            let due = value
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            if due > now_ms {
                continue;
            }
            if let Some(id) = key.get(1..33).and_then(|b| b.try_into().ok()) {
                out.push(ObjectId(id));
            }
        }
        Ok(out)
    }

    /// An object the collector is removing (`d`), with its record.
    pub fn doomed_object(&self, id: &ObjectId) -> Result<Option<ObjectRecord>, StoreError> {
        match self.media.get(doomed_key(id))? {
            Some(v) => Ok(Some(decode("media", &v)?)),
            None => Ok(None),
        }
    }

    /// Every object the collector began to remove (`d`): those of a pass that stopped midway
    /// are finished by the next.
    pub fn doomed_objects(&self) -> Result<Vec<ObjectId>, StoreError> {
        let mut out = Vec::new();
        for guard in self.media.prefix(b"d") {
            let key = guard.key()?;
            if let Some(id) = key.get(1..33).and_then(|b| b.try_into().ok()) {
                out.push(ObjectId(id));
            }
        }
        Ok(out)
    }

    /// Bytes of stored objects `user` uploaded.
    pub fn media_usage(&self, user: &str) -> Result<u64, StoreError> {
        Ok(self
            .media
            .get(usage_key(user))?
            .and_then(|v| super::keys::head_u64(&v))
            .unwrap_or(0))
    }
}

impl StoreBatch<'_> {
    /// Records a stored object (or one more uploader of it), counted in their usage, and
    /// due for the collector at `collect_at` (an object no message references by then goes).
    pub fn put_object(
        &mut self,
        id: &ObjectId,
        record: &ObjectRecord,
        usage: Option<(&str, u64)>,
        collect_at: u64,
    ) {
        self.insert(Ks::Media, object_key(id), encode(record));
        if let Some((user, bytes)) = usage {
            self.insert(Ks::Media, usage_key(user), bytes.to_be_bytes());
        }
        self.insert(Ks::Media, collect_key(id), collect_at.to_be_bytes());
    }

    /// The collector begins to remove an object no message references: its record moves
    /// from `o` to `d`, so that a message sent from now on cannot reference it.
    pub fn doom_object(&mut self, id: &ObjectId, record: &ObjectRecord) {
        self.remove(Ks::Media, object_key(id));
        self.remove(Ks::Media, collect_key(id));
        self.insert(Ks::Media, doomed_key(id), encode(record));
    }

    /// A doomed object turned out to be referenced (by a message sequenced before it was
    /// doomed): it is stored again, and nothing is due for it.
    pub fn restore_object(&mut self, id: &ObjectId, record: &ObjectRecord) {
        self.remove(Ks::Media, doomed_key(id));
        self.insert(Ks::Media, object_key(id), encode(record));
    }

    /// Forgets an object (the collector removed its bytes), with its uploaders' new usage.
    pub fn remove_object(&mut self, id: &ObjectId, usage: &[(String, u64)]) {
        self.remove(Ks::Media, object_key(id));
        self.remove(Ks::Media, collect_key(id));
        self.remove(Ks::Media, doomed_key(id));
        for (user, bytes) in usage {
            self.insert(Ks::Media, usage_key(user), bytes.to_be_bytes());
        }
    }

    /// The collector looked at an object that is still referenced: nothing due for it.
    pub fn object_kept(&mut self, id: &ObjectId) {
        self.remove(Ks::Media, collect_key(id));
    }

    /// A new message's references (`SendWith`).
    pub fn put_refs(&mut self, conv: ConversationId, seq: u64, sent_ms: u64, refs: &MediaRefs) {
        let record = RefRecord {
            sent_ms,
            pending: refs.pending.clone(),
        };
        for id in &refs.objects {
            self.insert(Ks::Media, ref_key(id, conv, seq), encode(&record));
        }
        self.insert(Ks::Media, message_key(conv, seq), encode(&refs.objects));
    }

    /// A reference that changed (a member fetched the object) or went (`None`); a gone one
    /// makes the object due for the collector now.
    pub fn put_ref(
        &mut self,
        id: &ObjectId,
        conv: ConversationId,
        seq: u64,
        record: Option<&RefRecord>,
    ) {
        match record {
            Some(r) => self.insert(Ks::Media, ref_key(id, conv, seq), encode(r)),
            None => {
                self.remove(Ks::Media, ref_key(id, conv, seq));
                self.insert(Ks::Media, collect_key(id), 0u64.to_be_bytes());
            }
        }
    }

    /// A message's body went (deleted for everyone, or past its retention): so do its
    /// references, and the objects are due for the collector now. Reads the store for what
    /// the message referenced (written in an earlier batch).
    pub fn drop_refs(&mut self, conv: ConversationId, seq: u64) -> Result<(), StoreError> {
        let key = message_key(conv, seq);
        let Some(value) = self.store().media.get(&key)? else {
            return Ok(());
        };
        let objects: Vec<ObjectId> = decode("media", &value)?;
        for id in &objects {
            self.put_ref(id, conv, seq, None);
        }
        self.remove(Ks::Media, key);
        Ok(())
    }
}
