//! A device's feed: the events after its cursor, first from the store, then live.
//!
//! The feed registers the device before it reads the store, and every event is durable before
//! it is handed to the registry, so each event is either in the store when the feed reads it or
//! arrives on the queue afterwards. The feed delivers positions strictly in order: anything at
//! or below what it already gave is dropped (seen twice), and a jump past the next position
//! (events dropped while the queue was full) switches it back to reading the store.
//!
//! A message sent on the feed's own connection is skipped when it comes live: the `Sent`
//! answer carries its log position, and the client takes the event from there (the body is
//! not sent back to the device that sent it). Read from the store, it is not skipped; the
//! client's cursor tracker drops the copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;

use super::RouterError;
use super::sessions::{Delivery, Registration};
use crate::persist::{LogEntry, Store, has_body, tombstone};
use plover_proto::{ConversationId, Event, Receipt, Retention};
use std::collections::HashMap;

/// Events read from the store per round of catch-up.
const CATCH_UP_PAGE: usize = 256;

/// The feed of one syncing device.
pub struct DeviceFeed {
    user: String,
    next: u64,
    rx: mpsc::Receiver<Delivery>,
    lagging: Arc<AtomicBool>,
    catching_up: bool,
    store: Arc<Store>,
    /// Catch-up reads go through the router's gate like every other request's.
    gate: super::gate::Gate,
    /// The registration's id: live messages sent with it as origin are skipped.
    id: u64,
    _registration: Registration,
}

impl std::fmt::Debug for DeviceFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceFeed")
            .field("user", &self.user)
            .field("next", &self.next)
            .field("catching_up", &self.catching_up)
            .finish()
    }
}

impl DeviceFeed {
    pub(super) fn new(
        user: String,
        cursor: u64,
        registration: Registration,
        rx: mpsc::Receiver<Delivery>,
        lagging: Arc<AtomicBool>,
        store: Arc<Store>,
        gate: super::gate::Gate,
    ) -> Self {
        Self {
            user,
            next: cursor + 1,
            rx,
            lagging,
            catching_up: true,
            store,
            gate,
            id: registration.id(),
            _registration: registration,
        }
    }

    /// The id that marks messages sent on this feed's connection ([`super::Delivery::origin`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next events for the device, in log order, at least one.
    ///
    /// Cancel-safe at the await on the queue; a cancelled store read is simply repeated.
    pub async fn next_batch(&mut self) -> Result<Vec<Delivery>, RouterError> {
        loop {
            if self.lagging.swap(false, Ordering::AcqRel) {
                self.catching_up = true;
            }
            if self.catching_up {
                let batch = self.read_store().await?;
                if batch.len() < CATCH_UP_PAGE {
                    self.catching_up = false;
                }
                if let Some(last) = batch.last() {
                    self.next = last.pos + 1;
                    return Ok(batch);
                }
                continue;
            }
            let Some(first) = self.rx.recv().await else {
                return Err(RouterError::ShuttingDown);
            };
            let mut out = Vec::new();
            let mut pending = Some(first);
            while let Some(d) = pending.take() {
                if d.pos < self.next {
                    // Already delivered (read from the store before it came live).
                } else if d.pos == self.next {
                    self.next += 1;
                    if d.origin != self.id {
                        out.push(d);
                    }
                } else {
                    // A gap: events were dropped while the queue was full. They (and this one)
                    // are in the store.
                    self.catching_up = true;
                    break;
                }
                if out.len() < CATCH_UP_PAGE {
                    pending = self.rx.try_recv().ok();
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    async fn read_store(&self) -> Result<Vec<Delivery>, RouterError> {
        let store = self.store.clone();
        let user = self.user.clone();
        let after = self.next - 1;
        self.gate
            .run(move || read_events(&store, &user, after, CATCH_UP_PAGE))
            .await
    }
}

/// Resolves up to `limit` log entries after `after` into events.
pub(super) fn read_events(
    store: &Store,
    user: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<Delivery>, RouterError> {
    let entries = store.read_log(user, after, limit)?;
    let mut out = Vec::with_capacity(entries.len());
    // Each conversation's retention and how far the user cleared it, read once per batch:
    // sync never serves an expired body, nor one the user hid from their own history.
    let mut views: HashMap<ConversationId, (Retention, crate::persist::Policies, u64)> =
        HashMap::new();
    let now = super::shard::now_ms();
    for (pos, entry) in entries {
        let event = match entry {
            LogEntry::Message { conversation, seq } => {
                let msg = store.message(conversation, seq)?.ok_or_else(|| {
                    RouterError::Internal(format!(
                        "log of {user} at {pos} names message {conversation}/{seq}, which is missing"
                    ))
                })?;
                let (policy, cleared) = match views.entry(conversation) {
                    std::collections::hash_map::Entry::Occupied(e) => {
                        let (now_policy, policies, cleared) = e.get();
                        (policies.at(msg.seq, *now_policy), *cleared)
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let now_policy = store
                            .conversation(conversation)?
                            .map_or(Retention::Keep, |r| r.retention);
                        let policies = store.policies(conversation)?;
                        let cleared = store.cleared(conversation, user)?;
                        // The policy the message was sent under.
                        let policy = policies.at(msg.seq, now_policy);
                        e.insert((now_policy, policies, cleared));
                        (policy, cleared)
                    }
                };
                // A message the user cleared keeps its place in the log (positions have no
                // holes) but comes without its body, as after a deletion; membership events
                // carry no body and stay as they are.
                if msg.seq <= cleared && has_body(&msg) {
                    Event::Message(tombstone(&msg))
                } else {
                    Event::Message(super::expire(msg, policy, now))
                }
            }
            LogEntry::Deleted {
                conversation,
                seq,
                by,
            } => Event::Deleted {
                conversation,
                seq,
                by,
            },
            LogEntry::Receipt {
                conversation,
                user,
                delivered,
                read,
            } => Event::Receipt(Receipt {
                conversation,
                user,
                delivered,
                read,
            }),
        };
        out.push(Delivery {
            pos,
            event: Arc::new(event),
            origin: 0,
            timing: None,
        });
    }
    Ok(out)
}
