//! Presence and typing between the nodes of a cluster, over NATS core subjects.
//!
//! Both are ephemeral (a missed one is superseded by the next, or asked for), so they travel
//! outside the replicated log: each node publishes its own changes on `plover.relay.<node>`
//! and listens to `plover.relay.*`. `Here` says at once that a user's first device came to
//! the sending node or its last one went: every node keeps, for each user online elsewhere,
//! the nodes they are on (`Presence::remote_here`), so that a user is online while any node
//! has one of their devices, and no node pushes to them meanwhile. `Presence` is what peers
//! are told, after the sending node's debounce; a node passes it to its devices of the
//! user's peers only if it changes the user's state as a whole (a user moving from one node
//! to another stays online). Typing carries the
//! conversation's other members; each node pushes it to its own devices of them. Every
//! `node_ttl`, the users of nodes that left the cluster are forgotten.
//!
//! A node sends each change to every node: fine for the few nodes of one cluster; past
//! that, the registry says which nodes hold a peer's devices.

use async_nats::jetstream;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::router::{Presence, Push, Relay};
use plover_proto::ConversationId;

/// Changes queued towards NATS before more are dropped.
const RELAY_QUEUE: usize = 4096;

/// What one node tells the others.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum Relayed {
    Here {
        user: String,
        online: bool,
    },
    Presence {
        user: String,
        online: bool,
        last_seen: u64,
    },
    Typing {
        conversation: ConversationId,
        user: String,
        to: Vec<String>,
    },
}

/// The [`Relay`] a cluster node's presence registry sends through.
struct Sender(mpsc::Sender<Relayed>);

impl Relay for Sender {
    fn here(&self, user: &str, online: bool) {
        let _ = self.0.try_send(Relayed::Here {
            user: user.to_owned(),
            online,
        });
    }

    fn presence(&self, user: &str, online: bool, last_seen: u64) {
        let _ = self.0.try_send(Relayed::Presence {
            user: user.to_owned(),
            online,
            last_seen,
        });
    }

    fn typing(&self, to: &[String], except: &str, conversation: ConversationId, user: &str) {
        let _ = self.0.try_send(Relayed::Typing {
            conversation,
            user: user.to_owned(),
            to: to.iter().filter(|u| *u != except).cloned().collect(),
        });
    }
}

/// Connects `presence` to the other nodes and relays until the task is dropped.
pub(super) fn start(
    client: async_nats::Client,
    js: jetstream::Context,
    node: String,
    presence: Arc<Presence>,
    node_ttl: Duration,
) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = mpsc::channel(RELAY_QUEUE);
    presence.set_relay(Arc::new(Sender(tx)));
    tokio::spawn(run(client, js, node, presence, rx, node_ttl))
}

async fn run(
    client: async_nats::Client,
    js: jetstream::Context,
    node: String,
    presence: Arc<Presence>,
    mut outgoing: mpsc::Receiver<Relayed>,
    node_ttl: Duration,
) {
    let mine = format!("plover.relay.{node}");
    let mut incoming = loop {
        match client.subscribe("plover.relay.*").await {
            Ok(s) => break s,
            Err(e) => {
                warn!(error = %e, "cannot listen to the other nodes; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut prune = tokio::time::interval(node_ttl);
    loop {
        tokio::select! {
            Some(change) = outgoing.recv() => {
                let Ok(bytes) = postcard::to_stdvec(&change) else { continue };
                if let Err(e) = client.publish(mine.clone(), bytes.into()).await {
                    debug!(error = %e, "a presence or typing change was not relayed");
                }
            }
            Some(message) = incoming.next() => {
                let Some(from) = message.subject.strip_prefix("plover.relay.") else { continue };
                if from == node {
                    continue;
                }
                match postcard::from_bytes::<Relayed>(&message.payload) {
                    Ok(Relayed::Here { user, online }) => presence.remote_here(from, user, online),
                    Ok(Relayed::Presence { user, online, last_seen }) => {
                        presence.remote_presence(from, user, online, last_seen);
                    }
                    Ok(Relayed::Typing { conversation, user, to }) => {
                        let push = Push::Typing { conversation, user: user.clone() };
                        presence.push_local(&to, &user, push);
                    }
                    Err(e) => debug!(error = %e, from, "an undecodable relayed change"),
                }
            }
            _ = prune.tick() => {
                match super::nodes::list(&js).await {
                    Ok(nodes) => {
                        let live: HashSet<String> = nodes.into_iter().map(|n| n.node).collect();
                        presence.retain_nodes(&live);
                    }
                    Err(e) => debug!(error = %e, "cannot list the nodes to forget the departed"),
                }
            }
        }
    }
}
