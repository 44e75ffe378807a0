//! Failpoints: test-only hooks that make a named store operation fail, so that the code above
//! the store can be tested against read and write errors a healthy disk never produces.
//!
//! Compiled only into test builds (`cfg(test)`): release builds have no hook and no branch.

use std::collections::HashMap;
use std::sync::Mutex;

use super::StoreError;

/// How an armed point behaves: pass `skip` more hits, then fail the next `fail` hits.
#[derive(Debug, Clone, Copy)]
struct Arm {
    skip: u64,
    fail: u64,
}

/// The armed points of one store.
#[derive(Debug, Default)]
pub(crate) struct Failpoints {
    armed: Mutex<HashMap<&'static str, Arm>>,
    /// Failures injected so far, by point.
    fired: Mutex<HashMap<&'static str, u64>>,
}

impl Failpoints {
    /// Lets `point` pass `skip` more times, then fail `fail` times.
    pub(crate) fn arm(&self, point: &'static str, skip: u64, fail: u64) {
        self.lock_armed().insert(point, Arm { skip, fail });
    }

    /// How many failures `point` has injected.
    pub(crate) fn fired(&self, point: &'static str) -> u64 {
        self.fired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(point)
            .copied()
            .unwrap_or(0)
    }

    /// Called by the store at `point`: an injected I/O error when the point is due to fail.
    pub(crate) fn hit(&self, point: &'static str) -> Result<(), StoreError> {
        let mut armed = self.lock_armed();
        let Some(arm) = armed.get_mut(point) else {
            return Ok(());
        };
        if arm.skip > 0 {
            arm.skip -= 1;
            return Ok(());
        }
        if arm.fail == 0 {
            return Ok(());
        }
        arm.fail -= 1;
        drop(armed);
        *self
            .fired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(point)
            .or_default() += 1;
        Err(StoreError::Fjall(fjall::Error::Io(std::io::Error::other(
            format!("failpoint {point}"),
        ))))
    }

    fn lock_armed(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Arm>> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }
}
