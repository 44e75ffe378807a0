//! Messages: a conversation's stored messages, history pages, idempotency keys.

use super::{Store, StoreError, decode, keys};
use plover_proto::{ClientMsgId, ConversationId, Message};

impl Store {
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
}
