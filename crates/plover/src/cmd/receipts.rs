//! `plover read`, `receipts`, `presence`: who has what, and who is there.

use crate::args::{ClientArgs, Which};
use crate::render::*;
use anyhow::Result;
use clap::Args;
use plover_client::Connection;
use serde_json::json;

#[derive(Args)]
pub(crate) struct ReadArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    which: Which,
    /// Mark read up to this sequence number [default: the latest message].
    #[arg(long)]
    up_to: Option<u64>,
}

#[derive(Args)]
pub(crate) struct ReceiptsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    which: Which,
    /// One message: who has it and who read it [default: every member's marks].
    #[arg(long)]
    seq: Option<u64>,
    /// One JSON object per line (per member), or one object for `--seq`.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct PresenceArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The user to ask about (you must share a conversation).
    user: String,
    /// One JSON object on one line.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn read(args: ReadArgs) -> Result<()> {
    let conn = Connection::connect(&args.client.config()?).await?;
    let target = args.which.target()?;
    let result = async {
        let conv = conn.open(target, false).await?;
        let up_to = args.up_to.unwrap_or(conv.last_seq());
        let id = conv.id();
        conv.mark_read(up_to).await?;
        conv.close().await;
        Ok::<_, anyhow::Error>((id, up_to))
    }
    .await;
    conn.close().await;
    let (id, up_to) = result?;
    println!("read conversation={id} up_to={up_to}");
    Ok(())
}

pub(crate) async fn receipts(args: ReceiptsArgs) -> Result<()> {
    let conn = Connection::connect(&args.client.config()?).await?;
    let me = conn.user().to_owned();
    let target = args.which.target()?;
    let result = async {
        let conv = conn.open(target, false).await?;
        Ok::<_, anyhow::Error>((conv.id(), conv.all_members().await?))
    }
    .await;
    conn.close().await;
    let (id, members) = result?;
    let Some(seq) = args.seq else {
        for m in members {
            let line = if args.json {
                json!({"type": "receipt", "conversation": id, "user": m.user,
                       "delivered": m.delivered, "read": m.read})
                .to_string()
            } else {
                format!(
                    "{:<24} delivered up to #{:<8} read up to #{}",
                    m.user, m.delivered, m.read
                )
            };
            print_line(&line)?;
        }
        return Ok(());
    };
    // One message: everyone but its sender (who has it by definition), as far as they were
    // members when it was sent.
    let others: Vec<_> = members
        .iter()
        .filter(|m| m.user != me && m.since <= seq)
        .collect();
    let read: Vec<&str> = others
        .iter()
        .filter(|m| m.read >= seq)
        .map(|m| m.user.as_str())
        .collect();
    let delivered: Vec<&str> = others
        .iter()
        .filter(|m| m.delivered >= seq)
        .map(|m| m.user.as_str())
        .collect();
    let waiting: Vec<&str> = others
        .iter()
        .filter(|m| m.delivered < seq)
        .map(|m| m.user.as_str())
        .collect();
    let all_delivered = waiting.is_empty();
    let all_read = read.len() == others.len();
    if args.json {
        let v = json!({"type": "message_receipts", "conversation": id, "seq": seq,
                       "delivered": delivered, "read": read, "waiting": waiting,
                       "delivered_to_all": all_delivered, "read_by_all": all_read});
        println!("{v}");
    } else {
        println!("delivered to: {}", delivered.join(", "));
        println!("read by: {}", read.join(", "));
        println!("waiting: {}", waiting.join(", "));
        println!(
            "{}",
            if all_read {
                "read by all"
            } else if all_delivered {
                "delivered to all"
            } else {
                "not yet delivered to all"
            }
        );
    }
    Ok(())
}

pub(crate) async fn presence(args: PresenceArgs) -> Result<()> {
    let conn = Connection::connect(&args.client.config()?).await?;
    let answer = conn.presence(&args.user).await;
    conn.close().await;
    let (online, last_seen) = answer?;
    if args.json {
        let v = json!({"type": "presence", "user": args.user, "online": online, "last_seen": last_seen});
        println!("{v}");
    } else if online {
        println!("online");
    } else if last_seen == 0 {
        println!("never seen");
    } else {
        println!("last seen {}", rfc3339(last_seen));
    }
    Ok(())
}
