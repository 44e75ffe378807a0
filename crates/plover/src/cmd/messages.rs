//! `plover send`, `listen`, `history`, `conversations`: messages in and out.

use crate::args::{ClientArgs, Which, target};
use crate::cmd::serve::shutdown_signal;
use crate::render::*;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use plover_client::{Client, Connection, EventStream};
use plover_proto::{ConversationKind, Message};
use serde_json::json;

#[derive(Args)]
pub(crate) struct SendArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The recipient of a direct message.
    #[arg(
        long,
        conflicts_with = "conversation",
        required_unless_present = "conversation"
    )]
    to: Option<String>,
    /// A conversation id.
    #[arg(long)]
    conversation: Option<u64>,
    /// A file to send (encrypted here; the server stores only the ciphertext).
    #[arg(long, conflicts_with = "text")]
    file: Option<std::path::PathBuf>,
    /// Text sent with `--file`.
    #[arg(long, requires = "file")]
    caption: Option<String>,
    /// The message.
    #[arg(required_unless_present = "file")]
    text: Option<String>,
}

#[derive(Args)]
pub(crate) struct ListenArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Start after this position of your sync log instead of where this device left off.
    #[arg(long)]
    cursor: Option<u64>,
}

#[derive(Args)]
pub(crate) struct HistoryArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    which: Which,
    /// How many messages.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Only messages before this sequence number.
    #[arg(long, conflicts_with = "after")]
    before: Option<u64>,
    /// Only messages after this sequence number.
    #[arg(long)]
    after: Option<u64>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct ConversationsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn send(args: SendArgs) -> Result<()> {
    let target = target(args.to, args.conversation)?;
    if let Some(file) = args.file {
        return crate::cmd::files::send_file(&args.client, target, &file, args.caption).await;
    }
    let text = args.text.unwrap_or_default();
    if text.is_empty() {
        bail!("the message is empty");
    }
    let client = Client::new(args.client.config()?);
    let body = plover_proto::content::Content::Text { text }.encode();
    let ack = client.send(target, Bytes::from(body)).await;
    client.close().await;
    let ack = ack?;
    println!("sent conversation={} seq={}", ack.conversation, ack.seq);
    Ok(())
}

pub(crate) async fn listen(args: ListenArgs) -> Result<()> {
    let mut events = EventStream::start(args.client.config()?, args.cursor);
    let interrupted = shutdown_signal();
    tokio::pin!(interrupted);
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            _ = &mut interrupted => break,
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                events.close().await;
                return Err(e.into());
            }
            None => break,
        };
        let line = if args.json {
            incoming_json(&event).to_string()
        } else {
            incoming_line(&event)
        };
        if print_line(&line).is_err() {
            // stdout is gone (a closed pipe): stop like an interrupted listener.
            break;
        }
    }
    events.close().await;
    Ok(())
}

pub(crate) async fn history(args: HistoryArgs) -> Result<()> {
    if args.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let conn = Connection::connect(&args.client.config()?).await?;
    let target = args.which.target()?;
    let result = async {
        let conv = conn.open(target, false).await?;
        // Pages of at most 500 (the server's default page limit), walked in the asked
        // direction until `limit` messages are gathered.
        let mut messages: Vec<Message> = Vec::new();
        let mut before = args.before;
        let mut after = args.after;
        while (messages.len() as u32) < args.limit {
            let want = (args.limit - messages.len() as u32).min(500);
            let (page, more) = conv.history(before, after, want).await?;
            if args.after.is_some() {
                after = page.last().map(|m| m.seq).or(after);
                messages.extend(page);
            } else {
                before = page.first().map(|m| m.seq).or(before);
                let mut page = page;
                page.extend(messages);
                messages = page;
            }
            if !more {
                break;
            }
        }
        Ok::<_, anyhow::Error>(messages)
    }
    .await;
    conn.close().await;
    for m in result? {
        let line = if args.json {
            message_json(&m).to_string()
        } else {
            message_line(&m)
        };
        print_line(&line)?;
    }
    Ok(())
}

pub(crate) async fn conversations(args: ConversationsArgs) -> Result<()> {
    let conn = Connection::connect(&args.client.config()?).await?;
    let conn_user = conn.user().to_owned();
    let items = conn.conversations().await;
    conn.close().await;
    for c in items.context("listing conversations")? {
        let kind = match c.kind {
            ConversationKind::Direct => "direct",
            ConversationKind::Group => "group",
        };
        let me = conn_user.as_str();
        let read = c.marks.iter().find(|m| m.user == me).map_or(0, |m| m.read);
        let line = if args.json {
            json!({
                "type": "conversation",
                "conversation": c.conversation,
                "kind": kind,
                "title": c.title,
                "member_count": c.member_count,
                "retention": c.retention.to_string(),
                "members": c.members,
                "last_seq": c.last_seq,
                "read": read,
                "unread": c.unread,
                "marks": c.marks.iter().map(|m| json!({
                    "user": m.user,
                    "delivered": m.delivered,
                    "read": m.read,
                })).collect::<Vec<_>>(),
            })
            .to_string()
        } else {
            let others: Vec<String> = c
                .marks
                .iter()
                .filter(|m| m.user != me)
                .map(|m| format!("{} delivered={} read={}", m.user, m.delivered, m.read))
                .collect();
            let who = if c.members.is_empty() {
                format!("{} members", c.member_count)
            } else {
                c.members.join(", ")
            };
            let name = if c.title.is_empty() {
                who
            } else {
                format!("{:?} ({who})", c.title)
            };
            format!(
                "{:>6}  {kind:<7} {name:<24} last_seq={} unread={} retention={}  {}",
                c.conversation,
                c.last_seq,
                c.unread,
                c.retention,
                others.join("; ")
            )
        };
        print_line(&line)?;
    }
    Ok(())
}
