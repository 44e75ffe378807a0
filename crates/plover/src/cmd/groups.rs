//! `plover group ...`, `retention`, `delete`, `clear`: a conversation's members, policy and
//! history.

use crate::args::ClientArgs;
use crate::render::*;
use anyhow::Result;
use clap::{Args, Subcommand};
use plover_client::Connection;
use plover_proto::{Retention, Target};
use serde_json::json;

#[derive(Subcommand)]
pub(crate) enum GroupCommand {
    /// Create a group; prints `conversation=<id>`.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// The group's title.
        title: String,
        /// The other members, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
        /// `keep`, `until-delivered` or `ttl=<duration>` (e.g. `ttl=7d`).
        #[arg(long, default_value = "keep")]
        retention: Retention,
    },
    /// Add a member (admins only).
    Add {
        #[command(flatten)]
        client: ClientArgs,
        /// The group's conversation id.
        id: u64,
        /// Who.
        user: String,
    },
    /// Remove a member (admins only).
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        /// The group's conversation id.
        id: u64,
        /// Who.
        user: String,
    },
    /// Leave a group.
    Leave {
        #[command(flatten)]
        client: ClientArgs,
        /// The group's conversation id.
        id: u64,
    },
    /// Make a member an admin (admins only).
    Promote {
        #[command(flatten)]
        client: ClientArgs,
        /// The group's conversation id.
        id: u64,
        /// Who.
        user: String,
    },
    /// List a group's members with their roles.
    Members {
        #[command(flatten)]
        client: ClientArgs,
        /// The group's conversation id.
        id: u64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct RetentionArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The conversation id.
    conversation: u64,
    /// `keep`, `until-delivered` or `ttl=<duration>` (e.g. `ttl=7d`).
    policy: Retention,
}

#[derive(Args)]
pub(crate) struct DeleteArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The conversation id.
    #[arg(long)]
    conversation: u64,
    /// The message.
    #[arg(long)]
    seq: u64,
}

#[derive(Args)]
pub(crate) struct ClearArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The conversation id.
    #[arg(long)]
    conversation: u64,
    /// Hide up to this seq [default: everything so far].
    #[arg(long)]
    up_to: Option<u64>,
}

pub(crate) async fn group(command: GroupCommand) -> Result<()> {
    match command {
        GroupCommand::Create {
            client,
            title,
            members,
            retention,
        } => {
            let conn = Connection::connect(&client.config()?).await?;
            let created = conn.create_group_with(&title, &members, retention).await;
            conn.close().await;
            println!("conversation={}", created?);
            Ok(())
        }
        GroupCommand::Add { client, id, user } => membership(client, id, GroupOp::Add(user)).await,
        GroupCommand::Remove { client, id, user } => {
            membership(client, id, GroupOp::Remove(user)).await
        }
        GroupCommand::Leave { client, id } => membership(client, id, GroupOp::Leave).await,
        GroupCommand::Promote { client, id, user } => {
            membership(client, id, GroupOp::Promote(user)).await
        }
        GroupCommand::Members { client, id, json } => {
            let conn = Connection::connect(&client.config()?).await?;
            let result = async {
                let conv = conn.open(Target::Conversation(id), false).await?;
                Ok::<_, anyhow::Error>(conv.all_members().await?)
            }
            .await;
            conn.close().await;
            for m in result? {
                let line = if json {
                    json!({
                        "type": "member_info",
                        "conversation": id,
                        "user": m.user,
                        "admin": m.admin,
                        "since": m.since,
                        "delivered": m.delivered,
                        "read": m.read,
                    })
                    .to_string()
                } else {
                    let role = if m.admin { "admin" } else { "member" };
                    format!("{:<24} {role:<7} since #{}", m.user, m.since)
                };
                print_line(&line)?;
            }
            Ok(())
        }
    }
}

/// A membership change asked for on the command line.
pub(crate) enum GroupOp {
    Add(String),
    Remove(String),
    Leave,
    Promote(String),
    Retention(Retention),
    Delete(u64),
    Clear(u64),
}

/// Runs one membership change on a group and prints its outcome.
pub(crate) async fn membership(client: ClientArgs, id: u64, op: GroupOp) -> Result<()> {
    let conn = Connection::connect(&client.config()?).await?;
    let result = async {
        let conv = conn.open(Target::Conversation(id), false).await?;
        let seq = match op {
            GroupOp::Add(user) => conv.add_member(&user).await?,
            GroupOp::Remove(user) => conv.remove_member(&user).await?,
            GroupOp::Leave => conv.leave().await?,
            GroupOp::Promote(user) => conv.promote(&user).await?,
            GroupOp::Retention(policy) => conv.set_retention(policy).await?,
            GroupOp::Delete(seq) => conv.delete(seq).await?,
            GroupOp::Clear(up_to) => conv.clear_history(up_to).await?,
        };
        Ok::<_, anyhow::Error>(seq)
    }
    .await;
    conn.close().await;
    match result? {
        0 => println!("unchanged conversation={id}"),
        seq => println!("done conversation={id} seq={seq}"),
    }
    Ok(())
}

/// `plover retention`.
pub(crate) async fn retention(args: RetentionArgs) -> Result<()> {
    membership(
        args.client,
        args.conversation,
        GroupOp::Retention(args.policy),
    )
    .await
}

/// `plover delete`.
pub(crate) async fn delete(args: DeleteArgs) -> Result<()> {
    membership(args.client, args.conversation, GroupOp::Delete(args.seq)).await
}

/// `plover clear`.
pub(crate) async fn clear(args: ClearArgs) -> Result<()> {
    let up_to = args.up_to.unwrap_or(u64::MAX);
    membership(args.client, args.conversation, GroupOp::Clear(up_to)).await
}
