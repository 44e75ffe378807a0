//! Retention: what happens to message bodies over time.
//!
//! - `keep`: nothing; bodies stay until their sender deletes them.
//! - `until_delivered`: the shard removes the bodies of every seq that all members have
//!   received, as the marks move (`shard.rs`, `erasable`; `commit.rs`, `erase_range`); the sweep
//!   removes those still undelivered after `retention.max_undelivered` (30 days by default).
//! - `ttl`: reads never serve a body past its time ([`expire`], used by history and sync), and
//!   the sweep removes such bodies from the store.
//!
//! A change of policy is not retroactive: each message is under the policy in force when it
//! was sent (`persist::Policies`), for reads, for the shard's erasure and for the sweep.
//!
//! A removed body becomes a tombstone (same seq, sender, device and time, empty body), so
//! sequences stay gapless. The old value leaves the disk when fjall compacts the segment that
//! holds it; after a sweep that removed many bodies, the sweep compacts the messages keyspace.

use std::time::Duration;

use super::RouterError;
use crate::persist::{Store, has_body, tombstone};
use plover_proto::{Message, Retention};

/// The sweep's progress per conversation: every seq below this is done.
const SWEPT: &str = "swept";

/// Bodies removed in one sweep past which the sweep compacts the messages keyspace.
const COMPACT_AFTER: u64 = 10_000;

/// The message as a reader may see it at `now_ms`: a tombstone once a `ttl` has passed.
pub(crate) fn expire(msg: Message, retention: Retention, now_ms: u64) -> Message {
    match retention {
        Retention::Ttl(secs)
            if has_body(&msg) && msg.ts.saturating_add(secs.saturating_mul(1000)) <= now_ms =>
        {
            tombstone(&msg)
        }
        _ => msg,
    }
}

/// The sweep's progress through the stretch of a conversation that starts at `from`: the
/// first stretch keeps the name it always had.
fn swept(from: u64) -> String {
    if from <= 1 {
        SWEPT.to_owned()
    } else {
        format!("{SWEPT}@{from}")
    }
}

/// One pass over the conversations whose policy removes bodies over time: each stretch of a
/// conversation's history under its own policy (a change applies to the messages after it).
pub(super) fn sweep(
    store: &Store,
    writer: &dyn crate::persist::Writer,
    now_ms: u64,
    max_undelivered: Duration,
) -> Result<u64, RouterError> {
    let mut removed = 0;
    for (conv, record, policies) in store.retained_conversations()? {
        for (from, to, policy) in policies.stretches(record.retention) {
            let age_ms = match policy {
                Retention::Keep => continue,
                Retention::Ttl(secs) => secs.saturating_mul(1000),
                Retention::UntilDelivered => max_undelivered.as_millis() as u64,
            };
            let cutoff = now_ms.saturating_sub(age_ms);
            let mark = swept(from);
            let mut next = store.watermark(&mark, conv)?.max(from);
            loop {
                if to.is_some_and(|to| next > to) {
                    break;
                }
                let page = store.messages_from(conv, next, 256)?;
                if page.is_empty() {
                    break;
                }
                let mut tombstones = Vec::new();
                let mut unreferenced = Vec::new();
                let mut done = true;
                let mut ended = false;
                for msg in &page {
                    if to.is_some_and(|to| msg.seq > to) {
                        ended = true;
                        break;
                    }
                    // Server time only grows with seq (up to clock steps), so the first
                    // message still within its time ends the pass for this stretch.
                    if msg.ts > cutoff {
                        done = false;
                        break;
                    }
                    if has_body(msg) {
                        tombstones.push(tombstone(msg));
                        removed += 1;
                    }
                    // Its objects go with the body; under `until_delivered` this is the
                    // 30-day bound, whoever has not fetched them yet.
                    unreferenced.push(msg.seq);
                    next = msg.seq + 1;
                }
                // With the next group commit, sharing its fsync.
                let (progress, name) = (next, mark.clone());
                writer.write(Box::new(move |batch| {
                    for t in &tombstones {
                        batch.put_message(t);
                    }
                    for seq in unreferenced {
                        if let Err(e) = batch.drop_refs(conv, seq) {
                            tracing::warn!(conv, seq, error = %e, "cannot read a message's objects; they stay referenced");
                        }
                    }
                    batch.put_watermark(&name, conv, progress);
                }))?;
                if !done || ended || page.len() < 256 {
                    break;
                }
            }
        }
    }
    if removed >= COMPACT_AFTER {
        store.compact()?;
    }
    Ok(removed)
}
