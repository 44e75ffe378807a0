//! Push: each user's pushers, pending notifications and push-content settings.

use super::batch::Space;
use super::records::*;
use super::{Store, StoreError, Writer, decode, keys};
use plover_proto::ConversationId;

impl Store {
    /// Registers (or replaces) a pusher of `user`, with the device that registered it.
    pub fn put_pusher(
        &self,
        w: &dyn Writer,
        user: &str,
        device: &str,
        pusher: &plover_proto::Pusher,
    ) -> Result<(), StoreError> {
        let (user, device, pusher) = (user.to_owned(), device.to_owned(), pusher.clone());
        w.write(Box::new(move |b| b.put_pusher(&user, &device, &pusher)))
    }

    /// A user's pushers, each with the device that registered it (`None` for one stored
    /// before devices were recorded).
    pub fn pusher_records(
        &self,
        user: &str,
    ) -> Result<Vec<(Option<String>, plover_proto::Pusher)>, StoreError> {
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
    pub fn pushers_of(&self, user: &str) -> Result<Vec<plover_proto::Pusher>, StoreError> {
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

    /// The conversations whose notifications carry bodies for `user`.
    pub fn push_content_of(&self, user: &str) -> Result<Vec<ConversationId>, StoreError> {
        let mut out = Vec::new();
        for guard in self.push_content.prefix(keys::name_prefix(user)) {
            if let Some(conv) = keys::tail_u64(&guard.key()?) {
                out.push(conv);
            }
        }
        Ok(out)
    }

    // ----- sync logs and cursors -----
}
