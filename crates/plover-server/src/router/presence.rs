//! Presence: who is connected, when they were last seen, and live changes for their peers.
//!
//! The registry maps each user to their live connections (each with a bounded queue of pushes
//! towards that connection: presence changes and typing indicators). A user is online while they
//! have at least one connection. When the last one goes, `last_seen` is recorded (and stored);
//! the change is published to peers (users who share a conversation with them) only after
//! `debounce`, and only if the user has not come back by then, so a flapping connection does not
//! flood anyone. Coming online is published at once, unless peers never saw them go.
//!
//! A std `Mutex` guards the map: connect and disconnect are rare, pushes are `try_send`s, and the
//! lock is never held across an await or any I/O.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

use super::RouterError;
use super::shard::now_ms;
use crate::persist::Store;
use plover_proto::ConversationId;

/// Something the server pushes to a connection outside the sync log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// A peer came online or went offline.
    Presence {
        /// Who.
        user: String,
        /// Online now?
        online: bool,
        /// When their last device went, Unix ms.
        last_seen: u64,
    },
    /// A member is typing in a conversation.
    Typing {
        /// The conversation.
        conversation: ConversationId,
        /// Who.
        user: String,
    },
}

/// Pushes queued towards one connection before further ones are dropped. Pushes are
/// ephemeral; a client that misses one can ask (`Presence`) or will see the next.
pub const PUSH_QUEUE: usize = 64;

struct Conn {
    id: u64,
    /// Shared pushes: one allocation per push however many connections get it, and a small
    /// queue block per connection (tokio allocates 32 slots up front).
    tx: mpsc::Sender<Arc<Push>>,
}

#[derive(Default)]
struct UserState {
    conns: Vec<Conn>,
    /// What peers were last told: online or not.
    published_online: bool,
    /// Set at every disconnect of the last connection, from a counter of the registry that
    /// never repeats (the entry may be dropped and made again), so a stale debounce timer can
    /// tell.
    generation: u64,
    last_seen: Option<u64>,
}

/// Carries presence changes and typing to the other nodes of a cluster (`cluster/relay.rs`).
/// Never blocking: what cannot be sent at once is dropped, as a full push queue drops.
pub trait Relay: Send + Sync {
    /// `user` has devices on this node now (the first came), or none (the last went): at
    /// once, so that every node knows whether `user` is connected anywhere (for push).
    fn here(&self, user: &str, online: bool);
    /// `user`'s peers are to be told that `user` came online, or went (after the debounce).
    fn presence(&self, user: &str, online: bool, last_seen: u64);
    /// `user` types in `conversation`, whose other members are `to`.
    fn typing(&self, to: &[String], except: &str, conversation: ConversationId, user: &str);
}

/// The presence registry.
pub struct Presence {
    /// In a cluster: the other nodes.
    relay: OnceLock<Arc<dyn Relay>>,
    /// In a cluster: the users online on other nodes, and where.
    remote: Mutex<HashMap<String, HashSet<String>>>,
    users: Mutex<HashMap<String, UserState>>,
    store: Arc<Store>,
    /// Its store calls go through the router's gate.
    gate: super::gate::Gate,
    /// Last seen is written with the next group commit.
    writer: Arc<dyn crate::persist::Writer>,
    debounce: Duration,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Presence(..)")
    }
}

/// A connection's place in the registry; dropping it disconnects.
pub struct PresenceGuard {
    presence: Arc<Presence>,
    user: String,
    id: u64,
}

impl std::fmt::Debug for PresenceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceGuard")
            .field("user", &self.user)
            .finish()
    }
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.presence.disconnect(&self.user, self.id);
    }
}

impl Presence {
    pub(super) fn new(
        store: Arc<Store>,
        debounce: Duration,
        gate: super::gate::Gate,
        writer: Arc<dyn crate::persist::Writer>,
    ) -> Self {
        Self {
            relay: OnceLock::new(),
            remote: Mutex::default(),
            users: Mutex::new(HashMap::new()),
            store,
            gate,
            writer,
            debounce,
            next_id: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, UserState>> {
        self.users
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a connection of `user`. Must be called inside a tokio runtime.
    pub fn connect(self: &Arc<Self>, user: &str) -> (PresenceGuard, mpsc::Receiver<Arc<Push>>) {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (first, publish) = {
            let mut users = self.lock();
            let state = users.entry(user.to_owned()).or_default();
            let first = state.conns.is_empty();
            state.conns.push(Conn { id, tx });
            let publish = !state.published_online;
            state.published_online = true;
            (first, publish)
        };
        // A `Presence` relayed below says it too (and must find the user not yet here).
        if first
            && !publish
            && let Some(relay) = self.relay.get()
        {
            relay.here(user, true);
        }
        if publish {
            self.clone().publish(user.to_owned(), true, 0);
        }
        let guard = PresenceGuard {
            presence: self.clone(),
            user: user.to_owned(),
            id,
        };
        (guard, rx)
    }

    fn disconnect(self: &Arc<Self>, user: &str, id: u64) {
        let now = now_ms();
        let generation = {
            let mut users = self.lock();
            let Some(state) = users.get_mut(user) else {
                return;
            };
            state.conns.retain(|c| c.id != id);
            if !state.conns.is_empty() {
                return;
            }
            state.generation = self.next_id.fetch_add(1, Ordering::Relaxed);
            state.last_seen = Some(now);
            state.generation
        };
        if let Some(relay) = self.relay.get() {
            relay.here(user, false);
        }
        let presence = self.clone();
        let user = user.to_owned();
        // Outside a runtime (a test dropping a guard late) there is nothing to publish to.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let (store, writer) = (presence.store.clone(), presence.writer.clone());
            let u = user.clone();
            let stored = presence
                .gate
                .run(move || Ok(store.set_last_seen(&*writer, &u, now)?))
                .await;
            if stored.is_err() {
                tracing::warn!(user, "could not store last_seen");
            }
            // Do not keep the registry (and the store) alive through the wait: a server that
            // shuts down meanwhile has no one left to tell.
            let debounce = presence.debounce;
            let weak = Arc::downgrade(&presence);
            drop(presence);
            tokio::time::sleep(debounce).await;
            let Some(presence) = weak.upgrade() else {
                return;
            };
            let publish = {
                let mut users = presence.lock();
                match users.get_mut(&user) {
                    Some(state) if state.generation == generation && state.conns.is_empty() => {
                        if stored.is_ok() {
                            // Offline for good: the store answers for them from now on, and
                            // the registry holds only users who are (or just were) online.
                            users.remove(&user);
                        } else {
                            state.published_online = false;
                        }
                        true
                    }
                    _ => false,
                }
            };
            if publish {
                presence.clone().publish(user, false, now);
            }
        });
    }

    /// Makes this registry cluster-wide: changes go to the other nodes through `relay`, and
    /// theirs come back through [`Presence::remote_presence`] and [`Presence::push_local`].
    pub fn set_relay(&self, relay: Arc<dyn Relay>) {
        let _ = self.relay.set(relay);
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `user` has a device connected to another node of the cluster.
    fn elsewhere(&self, user: &str) -> bool {
        self.remote()
            .get(user)
            .is_some_and(|nodes| !nodes.is_empty())
    }

    /// Tells every connected peer of `user` about a change on this node, and the other
    /// nodes; peers are told only of what changes for them (a user going from one node to
    /// another stays online).
    fn publish(self: Arc<Self>, user: String, online: bool, last_seen: u64) {
        if let Some(relay) = self.relay.get() {
            relay.presence(&user, online, last_seen);
        }
        if self.elsewhere(&user) {
            return;
        }
        self.tell_peers(user, online, last_seen);
    }

    /// Another node of the cluster says whether it has devices of `user` now.
    pub fn remote_here(&self, node: &str, user: String, online: bool) {
        let mut remote = self.remote();
        if online {
            remote.entry(user).or_default().insert(node.to_owned());
        } else if let Some(nodes) = remote.get_mut(&user) {
            nodes.remove(node);
            if nodes.is_empty() {
                remote.remove(&user);
            }
        }
    }

    /// Another node of the cluster tells `user`'s peers that `user` came online or went:
    /// this node's devices of those peers hear of it unless it changes nothing for them
    /// (`user` was online elsewhere already, or is still).
    pub fn remote_presence(
        self: &Arc<Self>,
        node: &str,
        user: String,
        online: bool,
        last_seen: u64,
    ) {
        let was = self.is_online(&user);
        self.remote_here(node, user.clone(), online);
        let tell = if online { !was } else { !self.is_online(&user) };
        if tell {
            self.clone().tell_peers(user, online, last_seen);
        }
    }

    /// Forgets the devices of nodes no longer in the cluster (`live` are those that are):
    /// their users' peers here are told they went, unless they are online elsewhere.
    pub fn retain_nodes(self: &Arc<Self>, live: &HashSet<String>) {
        let gone: Vec<String> = {
            let mut remote = self.remote();
            let mut gone = Vec::new();
            remote.retain(|user, nodes| {
                nodes.retain(|n| live.contains(n));
                if nodes.is_empty() {
                    gone.push(user.clone());
                    false
                } else {
                    true
                }
            });
            gone
        };
        let now = now_ms();
        for user in gone {
            if !self.is_online_here(&user) {
                self.clone().tell_peers(user, false, now);
            }
        }
    }

    /// Tells this node's devices of `user`'s peers, from a task of its own.
    fn tell_peers(self: Arc<Self>, user: String, online: bool, last_seen: u64) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let store = self.store.clone();
            let u = user.clone();
            let peers = self.gate.run(move || peers_of(&store, &u)).await;
            let Ok(peers) = peers else {
                return;
            };
            let push = Arc::new(Push::Presence {
                user,
                online,
                last_seen,
            });
            let users = self.lock();
            for peer in peers {
                if let Some(state) = users.get(&peer) {
                    for conn in &state.conns {
                        let _ = conn.tx.try_send(push.clone());
                    }
                }
            }
        });
    }

    /// Whether `user` is online, and when they were last seen (Unix ms, 0 if never), as
    /// `asker` may see it: only users who share a conversation see each other.
    pub async fn query(&self, asker: &str, user: &str) -> Result<(bool, u64), RouterError> {
        if asker != user {
            let store = self.store.clone();
            let (a, u) = (asker.to_owned(), user.to_owned());
            let shared = self
                .gate
                .run(move || Ok(store.sees_presence(&a, &u)?))
                .await?;
            if !shared {
                return Err(RouterError::Forbidden(format!(
                    "you share no conversation with {user:?}"
                )));
            }
        }
        let (online, remembered) = {
            let users = self.lock();
            match users.get(user) {
                Some(state) => (!state.conns.is_empty(), state.last_seen),
                None => (false, None),
            }
        };
        let online = online || self.elsewhere(user);
        if online {
            return Ok((true, 0));
        }
        if let Some(ms) = remembered {
            return Ok((false, ms));
        }
        let store = self.store.clone();
        let u = user.to_owned();
        let stored = self.gate.run(move || Ok(store.last_seen(&u)?)).await?;
        Ok((false, stored.unwrap_or(0)))
    }

    /// Whether `user` has at least one connected device (in a cluster: on any node).
    pub fn is_online(&self, user: &str) -> bool {
        self.is_online_here(user) || self.elsewhere(user)
    }

    fn is_online_here(&self, user: &str) -> bool {
        self.lock().get(user).is_some_and(|s| !s.conns.is_empty())
    }

    /// Pushes to every connection of each user in `to` (never blocking; full queues drop),
    /// and in a cluster to the other nodes' (typing).
    pub fn push_to(&self, to: &[String], except: &str, push: Push) {
        if let (Some(relay), Push::Typing { conversation, user }) = (self.relay.get(), &push) {
            relay.typing(to, except, *conversation, user);
        }
        self.push_local(to, except, push);
    }

    /// Pushes to this node's connections of each user in `to` only (typing relayed from
    /// another node).
    pub fn push_local(&self, to: &[String], except: &str, push: Push) {
        let push = Arc::new(push);
        let users = self.lock();
        for user in to.iter().filter(|u| u.as_str() != except) {
            if let Some(state) = users.get(user) {
                for conn in &state.conns {
                    let _ = conn.tx.try_send(push.clone());
                }
            }
        }
    }

    /// Records `last_seen` = now for everyone still connected (at shutdown, so that it
    /// survives the restart).
    pub fn record_all_last_seen(&self) {
        let now = now_ms();
        let online: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, s)| !s.conns.is_empty())
            .map(|(u, _)| u.clone())
            .collect();
        for user in online {
            // At shutdown, after the commit thread: each in a batch of its own.
            let _ = self.store.set_last_seen(&*self.store, &user, now);
        }
    }
}

/// Everyone who may see `user`'s presence: who shares a conversation with them that they
/// accepted (not a message request), unless either blocked the other.
fn peers_of(store: &Store, user: &str) -> Result<Vec<String>, RouterError> {
    let mut peers = std::collections::BTreeSet::new();
    for conv in store.conversations_of(user)? {
        if store.request(conv, user)?.is_some() {
            continue;
        }
        if let Some(record) = store.conversation(conv)? {
            peers.extend(record.names().into_iter().filter(|m| m != user));
        }
    }
    for other in store.blocked_either_way(user)? {
        peers.remove(&other);
    }
    Ok(peers.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;

    #[tokio::test]
    async fn the_registry_forgets_users_once_they_are_offline_and_the_store_remembers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), Durability::Buffered).expect("store"));
        let writer: Arc<dyn crate::persist::Writer> = store.clone();
        let presence = Arc::new(Presence::new(
            store,
            Duration::from_millis(20),
            crate::router::gate::Gate::new(4),
            writer,
        ));
        let users: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
        let guards: Vec<_> = users.iter().map(|u| presence.connect(u)).collect();
        assert_eq!(presence.lock().len(), 100);
        // A user who flaps keeps their entry: the reconnect outruns the debounce.
        let (flapper, _) = presence.connect("flapper");
        drop(flapper);
        let (_back, _) = presence.connect("flapper");
        let before = now_ms();
        drop(guards);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while presence.lock().len() > 1 {
            assert!(tokio::time::Instant::now() < deadline, "entries stay");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(presence.is_online("flapper"));
        // Last seen now comes from the store, and it is the time of the disconnect.
        let (online, last_seen) = presence.query("u7", "u7").await.expect("query");
        assert!(!online);
        assert!(last_seen >= before && last_seen <= now_ms(), "{last_seen}");
    }
}
