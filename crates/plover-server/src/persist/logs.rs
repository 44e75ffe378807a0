//! Sync logs: each user's log of events and each device's acknowledged position in it.

use super::records::*;
use super::{Store, StoreError, decode, keys};

impl Store {
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
