//! A conversation's retention over its history: a change applies to the messages sent after
//! it, never to those before (as disappearing messages do in the large messengers).
//!
//! Kept in `meta` under `retention` ++ conversation as the list of (first seq, policy), in
//! order, written with the change's event. A conversation whose policy never changed has no
//! entry: its record's policy holds throughout.

use plover_proto::{ConversationId, Retention};
use serde::{Deserialize, Serialize};

use super::batch::{Ks, StoreBatch};
use super::{Store, StoreError, decode, encode};

/// Which policy holds for which messages of a conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policies(Vec<(u64, Retention)>);

fn key(conv: ConversationId) -> Vec<u8> {
    let mut k = b"retention".to_vec();
    k.extend_from_slice(&conv.to_be_bytes());
    k
}

impl Policies {
    /// The policy of message `seq`, given the conversation's policy now.
    pub fn at(&self, seq: u64, now: Retention) -> Retention {
        self.0
            .iter()
            .rev()
            .find(|(from, _)| *from <= seq)
            .map_or(now, |(_, p)| *p)
    }

    /// The history once the policy changes from `old` to `new` for messages from `from` on.
    pub fn changed(&self, from: u64, old: Retention, new: Retention) -> Self {
        let mut list = self.0.clone();
        if list.is_empty() {
            list.push((1, old));
        }
        list.push((from, new));
        Self(list)
    }

    /// Each stretch of seqs and its policy: (first seq, last seq or `None` for the open
    /// end, policy), in order; one stretch when the policy never changed.
    pub fn stretches(&self, now: Retention) -> Vec<(u64, Option<u64>, Retention)> {
        if self.0.is_empty() {
            return vec![(1, None, now)];
        }
        self.0
            .iter()
            .enumerate()
            .map(|(i, (from, policy))| {
                let to = self.0.get(i + 1).map(|(next, _)| next.saturating_sub(1));
                (*from, to, *policy)
            })
            .collect()
    }

    /// Whether any stretch of the history is under a `ttl`.
    pub fn has_ttl(&self) -> bool {
        self.0.iter().any(|(_, p)| matches!(p, Retention::Ttl(_)))
    }

    /// Whether the policy now, or any stretch of the history, is `policy`.
    pub fn any(&self, now: Retention, policy: Retention) -> bool {
        now == policy || self.0.iter().any(|(_, p)| *p == policy)
    }
}

impl Store {
    /// Every conversation whose policy ever changed, with its history.
    pub fn changed_policies(&self) -> Result<Vec<(ConversationId, Policies)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.meta.prefix(b"retention") {
            let (k, v) = guard.into_inner()?;
            if let Some(conv) = k
                .get(b"retention".len()..)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
            {
                out.push((conv, decode("meta", &v)?));
            }
        }
        Ok(out)
    }

    /// A conversation's retention history (empty: its record's policy holds throughout).
    pub fn policies(&self, conv: ConversationId) -> Result<Policies, StoreError> {
        match self.meta.get(key(conv))? {
            Some(v) => decode("meta", &v),
            None => Ok(Policies::default()),
        }
    }
}

impl StoreBatch<'_> {
    /// Writes a conversation's retention history.
    pub fn put_policies(&mut self, conv: ConversationId, policies: &Policies) {
        self.insert(Ks::Meta, key(conv), encode(policies));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_holds_from_its_seq_on_only() {
        let none = Policies::default();
        assert_eq!(none.at(5, Retention::Keep), Retention::Keep);
        assert_eq!(
            none.stretches(Retention::Keep),
            vec![(1, None, Retention::Keep)]
        );
        let once = none.changed(11, Retention::Keep, Retention::Ttl(60));
        assert_eq!(once.at(10, Retention::Ttl(60)), Retention::Keep);
        assert_eq!(once.at(11, Retention::Ttl(60)), Retention::Ttl(60));
        let twice = once.changed(21, Retention::Ttl(60), Retention::UntilDelivered);
        assert_eq!(twice.at(15, Retention::UntilDelivered), Retention::Ttl(60));
        assert_eq!(
            twice.stretches(Retention::UntilDelivered),
            vec![
                (1, Some(10), Retention::Keep),
                (11, Some(20), Retention::Ttl(60)),
                (21, None, Retention::UntilDelivered),
            ]
        );
        assert!(twice.any(Retention::Keep, Retention::UntilDelivered));
        assert!(!once.any(Retention::Ttl(60), Retention::UntilDelivered));
    }
}
