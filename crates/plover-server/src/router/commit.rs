//! The commit thread: group commit, sync-log positions, acks and fan-out.
//!
//! Every durable write of the hot path passes through this one thread. It takes whatever the
//! shards queued (up to `commit_batch` items), writes it as one fjall batch with one fsync, and
//! only then answers the senders and hands the events to the online devices. Being the only
//! writer of the sync logs, it assigns each user's log positions in commit order, so a log never
//! has a hole and never reuses a position, whichever shard sequenced the message.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvError, SyncSender};
use tokio::sync::oneshot;

use super::RouterError;
use super::cache::Generations;
use super::pipeline::{CommitItem, ERASED, KINDS, Reply, Sent};
use super::sessions::{Delivery, Sessions};
use super::timing::{Stamps, Traced};
use crate::metrics::names;
use crate::persist::{LogEntry, SideWrite, Store, StoreError, Writer};
use plover_proto::{Event, Receipt};

/// The [`Writer`] of the running server: side writes go to the commit thread, which adds
/// them to its next batch. Blocking (a full commit queue waits, then the batch's fsync).
pub(super) struct CommitWriter(pub(super) SyncSender<CommitItem>);

impl Writer for CommitWriter {
    fn write(&self, write: SideWrite) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        self.0
            .send(CommitItem::Side { write, reply })
            .map_err(|_| StoreError::Stopped)?;
        done.blocking_recv().map_err(|_| StoreError::Stopped)?
    }
}

/// Writes a batch may hold per item of `commit_batch`: a direct message costs about five.
const WRITES_PER_ITEM: usize = 4;

/// One committed event and where it goes: each member at their new log position.
struct Fanout {
    members: Arc<[String]>,
    positions: Vec<u64>,
    event: Arc<Event>,
    /// The feed that skips it (the sending connection's; 0 for none).
    origin: u64,
    /// Its stage stamps, by index into the batch's (a `Send` only).
    trace: Option<usize>,
    /// Whether the recipients' pushers are offered it.
    notify: bool,
    /// Whether it references stored objects (its body then never goes in a notification:
    /// it carries a file's key).
    attached: bool,
}

pub(super) struct CommitThread {
    pub(super) store: Arc<Store>,
    /// Bumped for each membership change once it is durable.
    pub(super) epochs: Arc<super::MembershipEpochs>,
    pub(super) sessions: Arc<Sessions>,
    pub(super) notifier: Arc<crate::push::Notifier>,
    pub(super) rx: Receiver<CommitItem>,
    pub(super) max_batch: usize,
    /// How many users' log heads to hold (see [`Generations`]).
    pub(super) cached_logs: usize,
}

impl CommitThread {
    pub(super) fn run(self) {
        // Each user's last log position, read from the store on first use. Dropped only
        // between batches, when every head held has been written.
        let mut held = Held {
            heads: Generations::new(self.cached_logs, |_| 1),
            cursors: Generations::new(self.cached_logs, |_| 1),
        };
        let mut items = Vec::with_capacity(self.max_batch);
        loop {
            let mut work = match self.rx.recv() {
                Ok(item) => {
                    let w = item.work();
                    items.push(item);
                    w
                }
                Err(RecvError) => return,
            };
            // A batch is bounded in items and in writes: a message to a large group writes a
            // log entry per member, and the conversations queued behind it should wait for one
            // bounded batch at most, not for every large fan-out in the queue.
            while items.len() < self.max_batch && work < self.max_batch * WRITES_PER_ITEM {
                match self.rx.try_recv() {
                    Ok(item) => {
                        work += item.work();
                        items.push(item);
                    }
                    Err(_) => break,
                }
            }
            let stop = self.commit(&mut items, &mut held);
            if stop {
                return;
            }
            let dropped = held.heads.make_room(|_| false);
            if dropped > 0 {
                metrics::counter!(names::CACHE_DROPS, "cache" => "log_heads")
                    .increment(dropped as u64);
            }
            let dropped = held.cursors.make_room(|_| false);
            if dropped > 0 {
                metrics::counter!(names::CACHE_DROPS, "cache" => "device_cursors")
                    .increment(dropped as u64);
            }
            metrics::gauge!(names::CACHED_LOG_HEADS).set(held.heads.len() as f64);
        }
    }

    /// Commits one batch; returns whether a `Stop` was in it.
    fn commit(&self, items: &mut Vec<CommitItem>, held: &mut Held) -> bool {
        let heads = &mut held.heads;
        let mut batch = self.store.batch();
        let started = std::time::Instant::now();
        let mut built = started;
        metrics::histogram!(names::COMMIT_BATCH).record(items.len() as f64);
        let mut kinds = [0u64; KINDS.len()];
        for item in items.iter() {
            kinds[item.kind()] += 1;
        }
        for (kind, n) in KINDS.iter().zip(kinds) {
            if n > 0 {
                metrics::counter!(names::COMMIT_ITEMS, "kind" => *kind).increment(n);
            }
        }
        // Each answer, with its stage stamps' index into `stamped` (a live `Send` only).
        let mut replies: Vec<(Reply, Sent, Option<usize>)> = Vec::with_capacity(items.len());
        let mut stamped: Vec<Stamps> = Vec::new();
        let mut ack_since: Vec<std::time::Instant> = Vec::new();
        let mut messages_in = 0u64;
        let mut barriers = Vec::new();
        // (members, their new log positions, the event): handed out once the batch is durable.
        let mut deliveries: Vec<Fanout> = Vec::new();
        // The bodies' shares of the bytes in flight, given back when the batch is done.
        let mut bodies = Vec::new();
        // Conversations whose members this batch changes.
        let mut changed: Vec<plover_proto::ConversationId> = Vec::new();
        let mut stop = false;
        let mut failed: Option<RouterError> = None;
        // The side writes' answers, given once the batch is durable (or failed).
        let mut sides: Vec<oneshot::Sender<Result<(), StoreError>>> = Vec::new();

        // The last entry of the replicated log this batch applies (cluster).
        let mut applied = None;
        for item in items.drain(..) {
            let item = match item {
                CommitItem::Applied { item, at } => {
                    applied = Some(at);
                    *item
                }
                item => item,
            };
            match item {
                CommitItem::Message {
                    msg,
                    recipients: members,
                    membership,
                    refs,
                    reply,
                    since,
                    stamps,
                    origin,
                    held,
                    notify,
                    answered,
                } => {
                    bodies.extend(held);
                    if failed.is_some() {
                        let _ = reply.send(Err(RouterError::Unavailable));
                        continue;
                    }
                    ack_since.push(since);
                    if msg.change.is_none() {
                        messages_in += 1;
                    }
                    batch.put_message(&msg);
                    if let Some(refs) = &refs {
                        batch.put_refs(msg.conversation, msg.seq, msg.ts, refs);
                    }
                    if answered {
                        batch.put_request(msg.conversation, &msg.from, None);
                    }
                    match membership {
                        None => {
                            // The sender has read everything up to their own message.
                            batch.put_marks(msg.conversation, &msg.from, msg.seq, msg.seq);
                        }
                        Some(write) => {
                            changed.push(msg.conversation);
                            batch.put_conversation(msg.conversation, &write.record);
                            for user in &write.added {
                                batch.add_member_of(user, msg.conversation);
                            }
                            for user in &write.removed {
                                batch.remove_member_of(user, msg.conversation);
                            }
                            for (user, from) in &write.requests {
                                batch.put_request(msg.conversation, user, from.as_deref());
                            }
                            if let Some(policies) = &write.policies {
                                batch.put_policies(msg.conversation, policies);
                            }
                        }
                    }
                    let entry = LogEntry::Message {
                        conversation: msg.conversation,
                        seq: msg.seq,
                    };
                    match append(&self.store, &mut batch, heads, &members, &entry) {
                        Ok(positions) => {
                            // The sender's own log position travels in the answer.
                            let log = members
                                .iter()
                                .position(|m| *m == msg.from)
                                .map_or(0, |i| positions[i]);
                            let sent = Sent {
                                seq: msg.seq,
                                ts: msg.ts,
                                log,
                                timing: None,
                            };
                            let trace = stamps.map(|s| {
                                stamped.push(s);
                                stamped.len() - 1
                            });
                            replies.push((reply, sent, trace));
                            deliveries.push(Fanout {
                                members,
                                positions,
                                event: Arc::new(Event::Message(msg)),
                                origin,
                                trace,
                                notify,
                                attached: refs.is_some(),
                            });
                        }
                        Err(e) => {
                            let _ = reply.send(Err(RouterError::Unavailable));
                            failed = Some(e);
                        }
                    }
                }
                CommitItem::Marks {
                    receipt,
                    recipients,
                    masked,
                    erase,
                } => {
                    if failed.is_some() {
                        continue;
                    }
                    if let Some((from, to)) = erase
                        && let Err(e) =
                            erase_range(&self.store, &mut batch, receipt.conversation, from, to)
                    {
                        failed = Some(e);
                        continue;
                    }
                    batch.put_marks(
                        receipt.conversation,
                        &receipt.user,
                        receipt.delivered,
                        receipt.read,
                    );
                    // Those who may not see the read mark get the same receipt with read 0
                    // (marks only move forward: 0 says nothing).
                    let (told, hidden): (Vec<String>, Vec<String>) = if masked.is_empty() {
                        (Vec::new(), Vec::new())
                    } else {
                        recipients
                            .iter()
                            .cloned()
                            .partition(|r| !masked.contains(r))
                    };
                    let groups = if masked.is_empty() {
                        vec![(recipients, receipt)]
                    } else {
                        let hidden_receipt = Receipt {
                            read: 0,
                            ..receipt.clone()
                        };
                        vec![(told.into(), receipt), (hidden.into(), hidden_receipt)]
                    };
                    for (members, receipt) in groups {
                        if members.is_empty() {
                            continue;
                        }
                        let entry = LogEntry::Receipt {
                            conversation: receipt.conversation,
                            user: receipt.user.clone(),
                            delivered: receipt.delivered,
                            read: receipt.read,
                        };
                        match append(&self.store, &mut batch, heads, &members, &entry) {
                            Ok(positions) => deliveries.push(Fanout {
                                members,
                                positions,
                                event: Arc::new(Event::Receipt(receipt)),
                                origin: 0,
                                trace: None,
                                notify: false,
                                attached: false,
                            }),
                            Err(e) => failed = Some(e),
                        }
                    }
                }
                CommitItem::Deleted {
                    tombstone,
                    recipients,
                    reply,
                } => {
                    if failed.is_some() {
                        let _ = reply.send(Err(RouterError::Unavailable));
                        continue;
                    }
                    batch.put_message(&tombstone);
                    // Deleted for everyone: the objects it referenced go with it.
                    if let Err(e) = batch.drop_refs(tombstone.conversation, tombstone.seq) {
                        let _ = reply.send(Err(RouterError::Unavailable));
                        failed = Some(e.into());
                        continue;
                    }
                    replies.push((
                        reply,
                        Sent {
                            seq: tombstone.seq,
                            ts: tombstone.ts,
                            log: 0,
                            timing: None,
                        },
                        None,
                    ));
                    let event = Event::Deleted {
                        conversation: tombstone.conversation,
                        seq: tombstone.seq,
                        by: tombstone.from.clone(),
                    };
                    let entry = LogEntry::Deleted {
                        conversation: tombstone.conversation,
                        seq: tombstone.seq,
                        by: tombstone.from,
                    };
                    match append(&self.store, &mut batch, heads, &recipients, &entry) {
                        Ok(positions) => deliveries.push(Fanout {
                            members: recipients,
                            positions,
                            event: Arc::new(event),
                            origin: 0,
                            trace: None,
                            notify: false,
                            attached: false,
                        }),
                        Err(e) => failed = Some(e),
                    }
                }
                CommitItem::Wait { sent, reply } => replies.push((reply, sent, None)),
                CommitItem::Cursor {
                    user,
                    device,
                    cursor,
                } => match forward_cursor(
                    &self.store,
                    heads,
                    &mut held.cursors,
                    &user,
                    &device,
                    cursor,
                ) {
                    Ok(Some(cursor)) => batch.put_cursor(&user, &device, cursor),
                    Ok(None) => {}
                    // A cursor is advisory (the device's next ack carries a later one): a
                    // failed read drops it, not the batch.
                    Err(e) => tracing::warn!(error = %e, %user, %device, "cursor not recorded"),
                },
                CommitItem::Barrier(reply) => barriers.push(reply),
                CommitItem::Side { write, reply } => {
                    if failed.is_some() {
                        let _ = reply.send(Err(StoreError::Poisoned));
                        continue;
                    }
                    write(&mut batch);
                    sides.push(reply);
                }
                CommitItem::Applied { .. } => {
                    tracing::error!("an applied item nested in an applied item; ignored");
                }
                CommitItem::Stop => stop = true,
            }
        }
        if let Some(at) = applied {
            batch.put_applied(at.seq, at.index);
        }

        // Test builds: a failure of this thread's commit only (not of a batch of its own).
        let failed = failed.or_else(|| self.store.failpoint("group_commit").err().map(Into::into));
        let result = match failed {
            // The shards sequenced what this batch held: their last seqs, marks and retry
            // ids are ahead of the store now, and a retry of one of those ids would be
            // answered `Sent` by a later batch without its message ever being written. Only
            // a restart rebuilds them from the store, so the store refuses writes from here
            // on, as after a failed fsync.
            Some(e) => {
                self.store.poison(&e);
                Err(e)
            }
            None => {
                built = std::time::Instant::now();
                batch.commit().map_err(RouterError::from)
            }
        };
        match result {
            Ok(()) => {
                let committed = std::time::Instant::now();
                metrics::histogram!(names::COMMIT_SECONDS)
                    .record(committed.duration_since(started).as_secs_f64());
                let traces: Vec<Arc<Traced>> = stamped
                    .into_iter()
                    .map(|s| Arc::new(Traced::new(s, started, built, committed)))
                    .collect();
                let trace_of = |i: Option<usize>| i.and_then(|i| traces.get(i)).cloned();
                metrics::counter!(names::MESSAGES_IN).increment(messages_in);
                // Before the answers and events: whoever learns of a change and then types
                // finds every cached member list of that conversation stale.
                for conversation in changed {
                    self.epochs.bump(conversation);
                }
                for (reply, mut sent, trace) in replies {
                    sent.timing = trace_of(trace);
                    let _ = reply.send(Ok(sent));
                }
                for side in sides {
                    let _ = side.send(Ok(()));
                }
                let acked = std::time::Instant::now();
                for since in ack_since {
                    metrics::histogram!(names::ACK_SECONDS)
                        .record(acked.duration_since(since).as_secs_f64());
                }
                let fanout = std::time::Instant::now();
                for Fanout {
                    members,
                    positions,
                    event,
                    origin,
                    trace,
                    notify,
                    attached,
                } in deliveries
                {
                    let timing = trace_of(trace);
                    if let Event::Message(msg) = &*event
                        && notify
                    {
                        for member in members.iter() {
                            self.notifier.offer(member, msg, attached);
                        }
                    }
                    for (member, pos) in members.iter().zip(positions) {
                        let delivery = Delivery {
                            pos,
                            event: event.clone(),
                            origin,
                            timing: timing.clone(),
                        };
                        self.sessions.deliver(member, &delivery);
                    }
                }
                metrics::histogram!(names::FANOUT_SECONDS).record(fanout.elapsed().as_secs_f64());
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed: nothing in it was acknowledged");
                // The cached heads counted positions that were never written, and the
                // cached cursors may hold ones that were never stored.
                held.heads.clear();
                held.cursors.clear();
                for (reply, _, _) in replies {
                    let _ = reply.send(Err(RouterError::Unavailable));
                }
                for side in sides {
                    let _ = side.send(Err(StoreError::Poisoned));
                }
            }
        }
        for barrier in barriers {
            let _ = barrier.send(());
        }
        stop
    }
}

/// Appends `entry` to each user's log at their next position; returns the positions.
fn append(
    store: &Store,
    batch: &mut crate::persist::StoreBatch<'_>,
    heads: &mut Generations<String, u64>,
    users: &[String],
    entry: &LogEntry,
) -> Result<Vec<u64>, RouterError> {
    let mut positions = Vec::with_capacity(users.len());
    for user in users {
        let head = match heads.get_mut(user.as_str()) {
            Some(h) => h,
            None => {
                let h = store.log_head(user)?;
                heads.insert(user.clone(), h)
            }
        };
        *head += 1;
        batch.append_log(user, *head, entry);
        positions.push(*head);
    }
    Ok(positions)
}

/// What the commit thread holds between batches, each a bounded cache that the store can
/// rebuild: users' log heads, and devices' stored cursors. This thread is the only writer of
/// both, so a held value is exact, and a device's repeated acks cost no store read.
struct Held {
    heads: Generations<String, u64>,
    cursors: Generations<(String, String), u64>,
}

/// The cursor to store for a device's `Ack`: never past the user's log head (a device cannot
/// have what the log does not hold yet, and a cursor above the head would hide every later
/// event from a `Sync` without a cursor), and never behind what the device acknowledged
/// before (a late or replayed ack would make it receive events again). `None` when it would
/// not move.
fn forward_cursor(
    store: &Store,
    heads: &mut Generations<String, u64>,
    cursors: &mut Generations<(String, String), u64>,
    user: &str,
    device: &str,
    cursor: u64,
) -> Result<Option<u64>, RouterError> {
    let head = match heads.get_mut(user) {
        Some(h) => *h,
        None => *heads.insert(user.to_owned(), store.log_head(user)?),
    };
    let key = (user.to_owned(), device.to_owned());
    let before = match cursors.get_mut(&key) {
        Some(c) => Some(*c),
        None => store.device_cursor(user, device)?,
    };
    let cursor = cursor.min(head);
    if before.is_some_and(|b| cursor <= b) {
        return Ok(None);
    }
    cursors.insert(key, cursor);
    Ok(Some(cursor))
}

/// Removes the bodies of a conversation's messages `from..=to` (tombstones keep their place)
/// and records how far erasure has come.
fn erase_range(
    store: &Store,
    batch: &mut crate::persist::StoreBatch<'_>,
    conv: plover_proto::ConversationId,
    from: u64,
    to: u64,
) -> Result<(), RouterError> {
    // Only the messages sent while the policy was `until_delivered` (a change is not
    // retroactive): read the history, and the policy now, once.
    let policies = store.policies(conv)?;
    let now = store
        .conversation(conv)?
        .map_or(plover_proto::Retention::Keep, |r| r.retention);
    let mut next = from;
    while next <= to {
        let page = store.messages_from(conv, next, 256)?;
        let Some(last) = page.last().map(|m| m.seq) else {
            break;
        };
        for msg in page.iter().filter(|m| {
            m.seq <= to
                && crate::persist::has_body(m)
                && policies.at(m.seq, now) == plover_proto::Retention::UntilDelivered
        }) {
            batch.put_message(&crate::persist::tombstone(msg));
        }
        next = last + 1;
    }
    batch.put_watermark(ERASED, conv, to);
    Ok(())
}
