//! Rendering for the terminal and for `--json`: every command prints through here.

use anyhow::Result;
use plover_client::Incoming;
use plover_proto::{ConversationChange, Event, Message};
use serde_json::json;
use std::io::Write;
use std::time::Duration;

pub(crate) fn message_json(m: &Message) -> serde_json::Value {
    let Some(change) = &m.change else {
        return json!({
            "type": "message",
            "conversation": m.conversation,
            "seq": m.seq,
            "from": m.from,
            "text": String::from_utf8_lossy(&m.body),
            "ts": m.ts,
        });
    };
    match change {
        ConversationChange::Erased => {
            return json!({
                "type": "erased",
                "conversation": m.conversation,
                "seq": m.seq,
                "from": m.from,
                "ts": m.ts,
            });
        }
        ConversationChange::Retention { policy } => {
            return json!({
                "type": "retention",
                "conversation": m.conversation,
                "seq": m.seq,
                "from": m.from,
                "ts": m.ts,
                "policy": policy.to_string(),
            });
        }
        _ => {}
    }
    let mut v = json!({
        "type": "member",
        "conversation": m.conversation,
        "seq": m.seq,
        "from": m.from,
        "ts": m.ts,
    });
    let fields = match change {
        ConversationChange::Created { title, members } => {
            json!({"action": "created", "title": title, "members": members})
        }
        ConversationChange::Added { user } => json!({"action": "added", "user": user}),
        ConversationChange::Removed { user } => json!({"action": "removed", "user": user}),
        ConversationChange::Left { promoted } => json!({"action": "left", "promoted": promoted}),
        ConversationChange::Promoted { user } => json!({"action": "promoted", "user": user}),
        ConversationChange::Retention { .. } | ConversationChange::Erased => json!({}),
    };
    if let (Some(v), Some(fields)) = (v.as_object_mut(), fields.as_object()) {
        v.extend(fields.clone());
    }
    v
}

/// A membership change in words, as the CLI and the chat show it.
pub(crate) fn describe_change(from: &str, change: &ConversationChange) -> String {
    match change {
        ConversationChange::Created { title, members } => {
            format!("{from} created {title:?} with {}", members.join(", "))
        }
        ConversationChange::Added { user } => format!("{from} added {user}"),
        ConversationChange::Removed { user } => format!("{from} removed {user}"),
        ConversationChange::Left { promoted: None } => format!("{from} left"),
        ConversationChange::Left {
            promoted: Some(user),
        } => format!("{from} left; {user} is now an admin"),
        ConversationChange::Promoted { user } => format!("{from} made {user} an admin"),
        ConversationChange::Retention { policy } => {
            format!("{from} set message retention to {policy}")
        }
        ConversationChange::Erased => format!("message from {from} deleted"),
    }
}

pub(crate) fn incoming_json(incoming: &Incoming) -> serde_json::Value {
    match incoming {
        Incoming::Log(e) => match &e.event {
            Event::Message(m) => message_json(m),
            Event::Receipt(r) => json!({
                "type": "receipt",
                "conversation": r.conversation,
                "user": r.user,
                "delivered": r.delivered,
                "read": r.read,
            }),
            Event::Deleted {
                conversation,
                seq,
                by,
            } => json!({
                "type": "deleted",
                "conversation": conversation,
                "seq": seq,
                "by": by,
            }),
        },
        Incoming::Presence {
            user,
            online,
            last_seen,
        } => json!({
            "type": "presence",
            "user": user,
            "online": online,
            "last_seen": last_seen,
        }),
        Incoming::Typing { conversation, user } => json!({
            "type": "typing",
            "conversation": conversation,
            "user": user,
        }),
    }
}

pub(crate) fn incoming_line(incoming: &Incoming) -> String {
    match incoming {
        Incoming::Log(e) => match &e.event {
            Event::Message(m) => message_line(m),
            Event::Receipt(r) => format!(
                "conversation {}: {} has received up to #{} and read up to #{}",
                r.conversation, r.user, r.delivered, r.read
            ),
            Event::Deleted {
                conversation,
                seq,
                by,
            } => format!("conversation {conversation}: {by} deleted #{seq}"),
        },
        Incoming::Presence {
            user, online: true, ..
        } => format!("{user} is online"),
        Incoming::Presence {
            user, last_seen, ..
        } => format!("{user} was last seen {}", rfc3339(*last_seen)),
        Incoming::Typing { conversation, user } => {
            format!("conversation {conversation}: {user} is typing")
        }
    }
}

pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub(crate) fn message_line(m: &Message) -> String {
    let time = rfc3339(m.ts);
    match &m.change {
        None => format!(
            "[{time}] conversation {} #{} {}: {}",
            m.conversation,
            m.seq,
            m.from,
            String::from_utf8_lossy(&m.body)
        ),
        Some(change) => format!(
            "[{time}] conversation {} #{} -- {} --",
            m.conversation,
            m.seq,
            describe_change(&m.from, change)
        ),
    }
}

pub(crate) fn print_line(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}
