//! Rendering for the terminal and for `--json`: every command prints through here.

use anyhow::Result;
use plover_client::Incoming;
use plover_proto::content::{Attachment, Content};
use plover_proto::{ConversationChange, Event, Message};
use serde_json::json;
use std::io::Write;
use std::time::Duration;

/// What a message's body says (PROTOCOL.md, "Content"): text, an attachment, or a body in
/// a newer format than this build reads.
pub(crate) fn content(m: &Message) -> Option<Content> {
    Content::decode(&m.body)
}

/// An attachment's public fields (never its key), for `--json`.
pub(crate) fn attachment_json(m: &Message, a: &Attachment) -> serde_json::Value {
    json!({
        "type": "attachment",
        "conversation": m.conversation,
        "seq": m.seq,
        "from": m.from,
        "ts": m.ts,
        "object": a.object.hex(),
        "size": a.size,
        "plain_size": a.plain_size,
        "media_type": a.media_type,
        "name": a.name,
        "width": a.dimensions.map(|d| d.0),
        "height": a.dimensions.map(|d| d.1),
        "thumbnail": a.thumbnail.as_ref().map(|t| t.len()),
        "caption": a.caption,
    })
}

/// How a message's body reads on one line.
pub(crate) fn body_text(m: &Message) -> String {
    match content(m) {
        Some(Content::Text { text }) => text,
        Some(Content::Attachment(a)) => {
            let caption = a
                .caption
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default();
            format!(
                "[attachment {} ({}, {})]{caption}",
                a.name,
                a.media_type,
                human_size(a.plain_size)
            )
        }
        None => "[a message in a newer format]".into(),
    }
}

/// `2.4 MB`, `812 B`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub(crate) fn message_json(m: &Message) -> serde_json::Value {
    let Some(change) = &m.change else {
        if let Some(Content::Attachment(a)) = content(m) {
            return attachment_json(m, &a);
        }
        return json!({
            "type": "message",
            "conversation": m.conversation,
            "seq": m.seq,
            "from": m.from,
            "text": body_text(m),
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
            body_text(m)
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
