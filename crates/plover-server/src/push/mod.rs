//! Push notifications for users with no connected device.
//!
//! The commit thread offers every stored message to the [`Notifier`] for each recipient; the
//! offer is dropped at once unless the recipient has a pusher and no connected device. Offers go
//! through a bounded queue to the notifier's task, which coalesces them per user (one
//! notification with a count after `push.coalesce`), writes what is pending to the store every
//! 100 ms (so it survives a restart), and hands due notifications to delivery tasks: at most
//! `push.concurrency` HTTP requests at once and at most [`PER_HOST`] to one host, each with a
//! timeout, failures retried with exponential backoff up to `push.retries` attempts (a request
//! slot is held for the request only, never through the backoff). A gateway that rejects a push key, or a
//! Web Push endpoint that answers 404 or 410, loses its registration. Nothing here can slow
//! message delivery: the commit thread only `try_send`s, and a full queue drops the offer (and
//! says so in the log).

mod http;
pub mod target;
pub mod vapid;

use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use crate::config::PushConfig;
use crate::persist::{PendingPush, Store, StoreError};
use plover_proto::{ConversationId, Message, Pusher};

/// How often pending notifications are written to the store and due ones sent.
const TICK: Duration = Duration::from_millis(100);

/// Requests in flight to one host at most: a dead or slow gateway (or a hostile pusher URL)
/// can hold only this many of the `push.concurrency` slots, and everyone else's notifications
/// go on through the rest.
pub const PER_HOST: usize = 4;

/// Hosts remembered with their request limits before idle ones are forgotten.
const HOSTS_KEPT: usize = 1024;

/// One message for one offline user.
#[derive(Debug)]
struct Offer {
    user: String,
    conversation: ConversationId,
    seq: u64,
    sender: String,
    body: Option<Bytes>,
}

/// Decides who gets notified and sends the notifications.
pub struct Notifier {
    store: Arc<Store>,
    config: PushConfig,
    /// Signs Web Push requests (RFC 8292).
    vapid: Arc<vapid::Vapid>,
    /// Commits its writes with the next group commit.
    writer: Arc<dyn crate::persist::Writer>,
    /// Users with at least one pusher: the commit thread's cheap first filter.
    with_pushers: RwLock<HashSet<String>>,
    /// (user, conversation) pairs whose notifications carry bodies.
    content: RwLock<HashSet<(String, ConversationId)>>,
    offers: mpsc::Sender<Offer>,
    online: Box<dyn Fn(&str) -> bool + Send + Sync>,
    stop: tokio::sync::watch::Sender<bool>,
    /// HTTP requests in flight, all hosts together (`push.concurrency`).
    slots: Arc<Semaphore>,
    /// HTTP requests in flight per host ([`PER_HOST`]).
    hosts: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifier(..)")
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Held for a set lookup, never across an await.
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

use crate::clock::now_ms;

impl Notifier {
    /// Loads the pushers and pending notifications and starts the notifier's task. `online`
    /// says whether a user has a connected device right now.
    pub fn start(
        store: Arc<Store>,
        config: PushConfig,
        vapid: Arc<vapid::Vapid>,
        writer: Arc<dyn crate::persist::Writer>,
        online: Box<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> Result<Arc<Self>, StoreError> {
        let (tx, rx) = mpsc::channel(config.queue);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let notifier = Arc::new(Self {
            stop,
            with_pushers: RwLock::new(store.users_with_pushers()?.into_iter().collect()),
            content: RwLock::new(store.push_content_all()?.into_iter().collect()),
            store,
            vapid,
            writer,
            slots: Arc::new(Semaphore::new(config.concurrency)),
            hosts: std::sync::Mutex::default(),
            config,
            offers: tx,
            online,
        });
        let pending = notifier.store.pending_pushes()?;
        tokio::spawn(notifier.clone().run(rx, pending, stopped));
        Ok(notifier)
    }

    /// Reads `users`' pushers and notification settings again from the store (in a cluster,
    /// after another node changed them through the replicated log). Blocking.
    pub fn refresh(&self, users: &[String]) -> Result<(), StoreError> {
        for user in users {
            let has = !self.store.pusher_records(user)?.is_empty();
            let content = self.store.push_content_of(user)?;
            if has {
                write(&self.with_pushers).insert(user.clone());
            } else {
                write(&self.with_pushers).remove(user);
            }
            let mut pairs = write(&self.content);
            pairs.retain(|(u, _)| u != user);
            pairs.extend(content.into_iter().map(|c| (user.clone(), c)));
        }
        Ok(())
    }

    /// Stops the notifier: what is pending is written to the store (and sent after the next
    /// start); notifications being sent are abandoned and stay pending too.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Offers a stored message for `user`. Never blocks. `attached`: the message references
    /// stored objects, so its body (which carries their keys) never goes in a notification.
    pub fn offer(&self, user: &str, msg: &Message, attached: bool) {
        if msg.change.is_some() || user == msg.from {
            return;
        }
        if !read(&self.with_pushers).contains(user) || (self.online)(user) {
            return;
        }
        // A body that references stored objects carries their keys: never in a
        // notification, whatever the conversation's setting.
        let body = (!attached
            && read(&self.content).contains(&(user.to_owned(), msg.conversation)))
        .then(|| msg.body.clone());
        let offer = Offer {
            user: user.to_owned(),
            conversation: msg.conversation,
            seq: msg.seq,
            sender: msg.from.clone(),
            body,
        };
        if self.offers.try_send(offer).is_err() {
            warn!(user, "push queue full: a notification was dropped");
        }
    }

    /// Registers (or replaces) a pusher of `user`, registered from `device`.
    pub fn register(&self, user: &str, device: &str, pusher: &Pusher) -> Result<(), StoreError> {
        self.store.put_pusher(&*self.writer, user, device, pusher)?;
        write(&self.with_pushers).insert(user.to_owned());
        Ok(())
    }

    /// Removes a pusher; returns whether it existed.
    pub fn unregister(&self, user: &str, key: &str) -> Result<bool, StoreError> {
        let removed = self.store.remove_pusher(&*self.writer, user, key)?;
        if self.store.pushers_of(user)?.is_empty() {
            write(&self.with_pushers).remove(user);
        }
        Ok(removed)
    }

    /// A user's pushers.
    pub fn pushers(&self, user: &str) -> Result<Vec<Pusher>, StoreError> {
        self.store.pushers_of(user)
    }

    /// Opts a conversation in or out of bodies in `user`'s notifications.
    pub fn set_content(
        &self,
        user: &str,
        conversation: ConversationId,
        include: bool,
    ) -> Result<(), StoreError> {
        self.store
            .set_push_content(&*self.writer, user, conversation, include)?;
        let key = (user.to_owned(), conversation);
        if include {
            write(&self.content).insert(key);
        } else {
            write(&self.content).remove(&key);
        }
        Ok(())
    }

    /// The notifier's task: coalesce, persist, dispatch.
    async fn run(
        self: Arc<Self>,
        mut offers: mpsc::Receiver<Offer>,
        loaded: Vec<(String, PendingPush)>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let coalesce = self.config.coalesce;
        let start = tokio::time::Instant::now();
        // Loaded from the store: due at once.
        let mut pending: HashMap<String, (PendingPush, tokio::time::Instant)> = loaded
            .into_iter()
            .map(|(user, p)| (user, (p, start)))
            .collect();
        let mut dirty: HashSet<String> = HashSet::new();
        let mut sending = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = stopped.changed() => {
                    // Written on its own: the commit thread stops right after the notifier.
                    self.persist(&mut dirty, &pending, true).await;
                    sending.abort_all();
                    return;
                }
                Some(_) = sending.join_next(), if !sending.is_empty() => {}
                offer = offers.recv() => {
                    let Some(offer) = offer else { return };
                    let entry = pending.entry(offer.user.clone()).or_insert_with(|| {
                        (
                            PendingPush {
                                count: 0,
                                conversation: offer.conversation,
                                seq: offer.seq,
                                sender: offer.sender.clone(),
                                body: None,
                                first_ms: now_ms(),
                            },
                            tokio::time::Instant::now() + coalesce,
                        )
                    });
                    entry.0.count += 1;
                    entry.0.conversation = offer.conversation;
                    entry.0.seq = offer.seq;
                    entry.0.sender = offer.sender;
                    entry.0.body = offer.body;
                    dirty.insert(offer.user);
                }
                _ = tick.tick() => {
                    self.persist(&mut dirty, &pending, false).await;
                    metrics::gauge!(crate::metrics::names::PUSH_PENDING).set(pending.len() as f64);
                    let now = tokio::time::Instant::now();
                    let due: Vec<String> = pending
                        .iter()
                        .filter(|(_, (_, at))| *at <= now)
                        .map(|(u, _)| u.clone())
                        .collect();
                    for user in due {
                        let Some((p, _)) = pending.remove(&user) else { continue };
                        sending.spawn(self.clone().deliver(user, p));
                    }
                }
            }
        }
    }

    /// Writes the pending notifications that changed since the last write, with the next
    /// group commit (or, when `alone`, in a batch of their own).
    async fn persist(
        &self,
        dirty: &mut HashSet<String>,
        pending: &HashMap<String, (PendingPush, tokio::time::Instant)>,
        alone: bool,
    ) {
        if dirty.is_empty() {
            return;
        }
        let batch: Vec<(String, PendingPush)> = dirty
            .drain()
            .filter_map(|u| pending.get(&u).map(|(p, _)| (u, p.clone())))
            .collect();
        let store = self.store.clone();
        let writer = self.writer.clone();
        let written = tokio::task::spawn_blocking(move || {
            if alone {
                store.put_pending_pushes(&*store, batch)
            } else {
                store.put_pending_pushes(&*writer, batch)
            }
        });
        match written.await {
            Ok(Ok(())) => {}
            _ => warn!("could not store pending notifications"),
        }
    }

    /// Sends one notification to each of the user's pushers (unless a device came online
    /// meanwhile), then forgets it.
    ///
    /// Every due user gets a task at once (a few hundred bytes each, one per pending user);
    /// what they do on blocking threads, store reads and writes and HTTP, runs under the
    /// `push.concurrency` slots, so thousands of due users never flood the blocking pool.
    async fn deliver(self: Arc<Self>, user: String, pending: PendingPush) {
        let store = self.store.clone();
        let u = user.clone();
        let pushers = match self.blocking(move || store.pushers_of(&u)).await {
            Some(Ok(p)) => p,
            _ => Vec::new(),
        };
        if (self.online)(&user) {
            debug!(user, "a device came online: no notification");
        } else {
            for pusher in pushers {
                self.send_with_retries(&user, &pusher, &pending).await;
            }
        }
        let (store, writer) = (self.store.clone(), self.writer.clone());
        let first = pending.first_ms;
        let _ = self
            .blocking(move || store.remove_pending_push(&*writer, &user, first))
            .await;
    }

    /// Runs `f` on a blocking thread while holding one of the `push.concurrency` slots; `None`
    /// if it panicked.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _slot = self.slots.acquire().await.ok()?;
        tokio::task::spawn_blocking(f).await.ok()
    }

    /// The request limit of the host a pusher posts to.
    fn host_slots(&self, pusher: &Pusher) -> Arc<Semaphore> {
        let url = match pusher {
            Pusher::Gateway { url, .. } => url,
            Pusher::WebPush { endpoint, .. } => endpoint,
        };
        let host = url
            .split_once("://")
            .map_or(url.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let mut hosts = self
            .hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if hosts.len() >= HOSTS_KEPT && !hosts.contains_key(&host) {
            // Forget the hosts nobody is sending to (only the map holds their limit).
            hosts.retain(|_, s| Arc::strong_count(s) > 1);
        }
        hosts
            .entry(host)
            .or_insert_with(|| Arc::new(Semaphore::new(PER_HOST)))
            .clone()
    }

    async fn send_with_retries(&self, user: &str, pusher: &Pusher, pending: &PendingPush) {
        // A conversation the user has not accepted (a message request) notifies as one,
        // with no body, whatever its setting.
        let request = matches!(self.store.request(pending.conversation, user), Ok(Some(_)));
        let stripped;
        let pending = if request {
            stripped = PendingPush {
                body: None,
                ..pending.clone()
            };
            &stripped
        } else {
            pending
        };
        let mut backoff = self.config.retry_base;
        for attempt in 1..=self.config.retries {
            let (p, n, timeout) = (pusher.clone(), pending.clone(), self.config.timeout);
            let allow_private = self.config.allow_private_targets;
            let vapid = self.vapid.clone();
            let u = user.to_owned();
            let outcome = {
                // The host's slot first, so that waiting for a busy host holds no global one.
                let host = self.host_slots(pusher);
                let Ok(_host) = host.acquire().await else {
                    return;
                };
                match self
                    .blocking(move || {
                        http::send(&u, &p, &n, request, timeout, allow_private, &vapid)
                    })
                    .await
                {
                    Some(outcome) => outcome,
                    None => http::Outcome::Retry("the request task failed".into()),
                }
            };
            match outcome {
                http::Outcome::Delivered => {
                    debug!(user, pusher = pusher.key(), "notification delivered");
                    return;
                }
                http::Outcome::Rejected => {
                    warn!(
                        user,
                        pusher = pusher.key(),
                        "push key rejected: removing the pusher"
                    );
                    // On a blocking thread: the removal waits for a group commit.
                    let (store, writer) = (self.store.clone(), self.writer.clone());
                    let (u, key) = (user.to_owned(), pusher.key().to_owned());
                    let removed = self
                        .blocking(move || {
                            store.remove_pusher(&*writer, &u, &key)?;
                            store.pushers_of(&u).map(|left| left.is_empty())
                        })
                        .await;
                    match removed {
                        Some(Ok(true)) => {
                            write(&self.with_pushers).remove(user);
                        }
                        Some(Ok(false)) => {}
                        _ => warn!(user, "could not remove a rejected pusher"),
                    }
                    return;
                }
                http::Outcome::Failed(why) => {
                    warn!(
                        user,
                        pusher = pusher.key(),
                        why,
                        "notification refused; not retried"
                    );
                    return;
                }
                http::Outcome::Retry(why) => {
                    debug!(
                        user,
                        pusher = pusher.key(),
                        attempt,
                        why,
                        "notification failed"
                    );
                    if attempt < self.config.retries {
                        tokio::time::sleep(backoff).await;
                        backoff = backoff.saturating_mul(2).min(Duration::from_secs(300));
                    }
                }
            }
        }
        warn!(
            user,
            pusher = pusher.key(),
            "notification given up after retries"
        );
    }
}
