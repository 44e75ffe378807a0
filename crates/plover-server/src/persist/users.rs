//! Users: who exists, and when each was last seen.

use super::{Store, StoreError, Writer, keys};

impl Store {
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

    /// When a user's last device went (Unix ms), if ever.
    pub fn last_seen(&self, user: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.presence.get(user)?.and_then(|v| keys::head_u64(&v)))
    }

    /// Records when a user's last device went (with the writer's next batch).
    pub fn set_last_seen(&self, w: &dyn Writer, user: &str, ms: u64) -> Result<(), StoreError> {
        let user = user.to_owned();
        w.write(Box::new(move |b| b.put_last_seen(&user, ms)))
    }
}
