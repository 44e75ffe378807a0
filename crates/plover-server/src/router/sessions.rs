//! The registry of online devices: user -> devices -> bounded outbound queues.
//!
//! The commit thread reads it once per committed event to hand the event to every online
//! device of the users concerned; connections write it when a device starts or stops syncing.
//! It is a std `RwLock` rather than an owner task because the hot path is a read from a
//! blocking thread, writes are rare (connect/disconnect), and the lock is never held across an
//! `.await` or any I/O: only map lookups and `try_send`s happen under it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

use plover_proto::Event;

/// One event for one device: its position in the user's log and the shared event.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Position in the user's sync log.
    pub pos: u64,
    /// The event (shared by every recipient).
    pub event: Arc<Event>,
    /// The feed ([`super::DeviceFeed::id`]) of the connection the message was sent on, or 0.
    /// That connection learns the event from its `Sent` answer, so its feed skips it.
    pub origin: u64,
    /// The message's stage stamps, for the connection to record once it has written the
    /// event (a live `Send` only; `None` for anything read from the store).
    pub timing: Option<Arc<super::timing::Traced>>,
}

struct Slot {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    lagging: Arc<AtomicBool>,
}

/// The registry.
#[derive(Default)]
pub struct Sessions {
    users: RwLock<HashMap<String, Vec<Slot>>>,
    next_id: AtomicU64,
    switched_to_catch_up: AtomicU64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions(..)")
    }
}

/// A device's place in the registry; removes itself when dropped.
pub struct Registration {
    sessions: Arc<Sessions>,
    user: String,
    id: u64,
}

impl Registration {
    /// This device connection's id, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut users = self
            .sessions
            .users
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(slots) = users.get_mut(&self.user) {
            slots.retain(|s| s.id != self.id);
            if slots.is_empty() {
                users.remove(&self.user);
            }
        }
    }
}

impl Sessions {
    /// Adds a device of `user` with a queue of `capacity` events.
    pub fn register(
        self: &Arc<Self>,
        user: &str,
        capacity: usize,
    ) -> (Registration, mpsc::Receiver<Delivery>, Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(capacity);
        let lagging = Arc::new(AtomicBool::new(false));
        // From 1: 0 is "no registration" in `Delivery::origin`.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = Slot {
            id,
            tx,
            lagging: lagging.clone(),
        };
        self.users
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(user.to_owned())
            .or_default()
            .push(slot);
        let registration = Registration {
            sessions: self.clone(),
            user: user.to_owned(),
            id,
        };
        (registration, rx, lagging)
    }

    /// Hands an event to every online device of `user`.
    ///
    /// Never blocks. A device whose queue is full is flagged as lagging and gets nothing more
    /// live: its feed reads everything it missed from the store, so memory stays bounded and
    /// nothing is lost.
    pub fn deliver(&self, user: &str, delivery: &Delivery) {
        let users = self
            .users
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(slots) = users.get(user) else {
            return;
        };
        for slot in slots {
            if slot.lagging.load(Ordering::Acquire) {
                continue;
            }
            match slot.tx.try_send(delivery.clone()) {
                Ok(()) => metrics::counter!(crate::metrics::names::DELIVERIES).increment(1),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slot.lagging.store(true, Ordering::Release);
                    self.switched_to_catch_up.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::names::CATCH_UP).increment(1);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Whether `user` has at least one device syncing right now.
    pub fn is_online(&self, user: &str) -> bool {
        self.users
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains_key(user)
    }

    /// How many times a device was switched from live delivery to catch-up.
    pub fn switched_to_catch_up(&self) -> u64 {
        self.switched_to_catch_up.load(Ordering::Relaxed)
    }
}
