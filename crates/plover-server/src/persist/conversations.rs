//! Conversations: direct pairs, group ids, records and members, receipts, retention
//! progress, cleared history.

use super::batch::Ks;
use super::records::*;
use super::{Store, StoreError, Writer, decode, keys};
use plover_proto::{ConversationId, ConversationKind, Retention};

/// Decodes the `applied` value: (stream sequence, entry index).
pub(super) fn applied_of(v: &[u8]) -> Option<(u64, u32)> {
    let seq = keys::head_u64(v)?;
    let index = u32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
    Some((seq, index))
}

impl Store {
    /// The direct conversation between two users, if it exists.
    pub fn direct_between(&self, a: &str, b: &str) -> Result<Option<ConversationId>, StoreError> {
        Ok(self
            .direct
            .get(keys::direct(a, b))?
            .and_then(|v| keys::head_u64(&v)))
    }

    /// Creates the direct conversation between two users and returns its id (in a cluster,
    /// the one the log kept if another node created the pair's first).
    ///
    /// The caller serialises calls (the router holds a lock around check-and-create), so that
    /// two users opening their conversation at once get the same one.
    ///
    /// With `request`, `b` has not accepted it yet: `a` shares no conversation with `b`, so
    /// this is a message request (`b` accepts by answering, or with `Accept`).
    pub fn create_direct(
        &self,
        w: &dyn Writer,
        a: &str,
        b: &str,
        now_ms: u64,
        request: bool,
    ) -> Result<ConversationId, StoreError> {
        let (next, counted) = match w.allocate_conversation() {
            Some(id) => (id?, false),
            None => (self.next_conversation()?, true),
        };
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
        let (first, second) = (a.to_owned(), b.to_owned());
        w.write(Box::new(move |batch| {
            // Applied by every node of a cluster in the log's order: the first creation of
            // a pair's conversation wins, and a later one (from another node, at the same
            // moment) writes nothing. The caller reads the pair's conversation back.
            batch.unless_exists(Ks::Direct, keys::direct(&first, &second));
            if counted {
                batch.put_next_conversation(next + 1);
            }
            batch.put_conversation(next, &record);
            for m in &record.members {
                batch.add_member_of(&m.user, next);
            }
            batch.put_direct(&first, &second, next);
            if request {
                batch.put_request(next, &second, Some(&first));
            }
        }))?;
        // The write is applied when this returns; in a cluster the pair's conversation may
        // be another node's, created first in the log's order.
        Ok(self.direct_between(a, b)?.unwrap_or(next))
    }

    /// The last entry of a cluster's replicated log this store holds: the stream sequence of
    /// its message and its index there (`None` before the first).
    pub fn applied(&self) -> Result<Option<(u64, u32)>, StoreError> {
        let Some(v) = self.meta.get("applied")? else {
            return Ok(None);
        };
        applied_of(&v).map(Some).ok_or_else(|| StoreError::Corrupt {
            keyspace: "meta",
            message: "applied".into(),
        })
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
        if let Some(id) = w.allocate_conversation() {
            return id;
        }
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

    /// Every conversation some of whose messages are under a policy other than `keep` (its
    /// policy now, or an earlier one: a change is not retroactive), with its record and its
    /// retention history.
    pub fn retained_conversations(
        &self,
    ) -> Result<Vec<(ConversationId, ConversationRecord, super::Policies)>, StoreError> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for guard in self.conversations.iter() {
            let (k, v) = guard.into_inner()?;
            let record: ConversationRecord = decode("conversations", &v)?;
            if record.retention != Retention::Keep
                && let Some(conv) = keys::head_u64(&k)
            {
                seen.insert(conv);
                out.push((conv, record, self.policies(conv)?));
            }
        }
        // Kept now, but not always.
        for (conv, policies) in self.changed_policies()? {
            let removes =
                policies.any(Retention::Keep, Retention::UntilDelivered) || policies.has_ttl();
            if seen.contains(&conv) || !removes {
                continue;
            }
            if let Some(record) = self.conversation(conv)? {
                out.push((conv, record, policies));
            }
        }
        Ok(out)
    }

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
}
