//! `plover block`, `unblock`, `blocked`, `accept`, `requests`: who may reach you.

use crate::args::{ClientArgs, Which};
use anyhow::Result;
use clap::Args;
use plover_client::Connection;
use plover_proto::Target;
use serde_json::json;

#[derive(Args)]
pub(crate) struct BlockArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The user.
    user: String,
}

#[derive(Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct AcceptArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    which: Which,
}

/// `plover block U` (`on`) or `plover unblock U`.
pub(crate) async fn block(args: BlockArgs, on: bool) -> Result<()> {
    let conn = Connection::connect(&args.client.config()?).await?;
    let done = if on {
        conn.block(&args.user).await
    } else {
        conn.unblock(&args.user).await
    };
    conn.close().await;
    done?;
    println!("{} {}", if on { "blocked" } else { "unblocked" }, args.user);
    Ok(())
}

/// `plover blocked`: one user a line.
pub(crate) async fn blocked(args: ListArgs) -> Result<()> {
    let conn = Connection::connect(&args.client.config()?).await?;
    let users = conn.blocked().await;
    conn.close().await;
    for user in users? {
        if args.json {
            println!("{}", json!({"type": "blocked", "user": user}));
        } else {
            println!("{user}");
        }
    }
    Ok(())
}

/// `plover requests`: one message request a line.
pub(crate) async fn requests(args: ListArgs) -> Result<()> {
    let conn = Connection::connect(&args.client.config()?).await?;
    let requests = conn.requests().await;
    conn.close().await;
    for r in requests? {
        if args.json {
            println!(
                "{}",
                json!({"type": "request", "conversation": r.conversation, "from": r.from})
            );
        } else {
            println!("request conversation={} from={}", r.conversation, r.from);
        }
    }
    Ok(())
}

/// `plover accept --with U | --conversation C`.
pub(crate) async fn accept(args: AcceptArgs) -> Result<()> {
    let conn = Connection::connect(&args.client.config()?).await?;
    let result = async {
        let conversation = match args.which.target()? {
            Target::Conversation(id) => id,
            direct => conn.open(direct, false).await?.id(),
        };
        conn.accept(conversation).await?;
        Ok::<_, anyhow::Error>(conversation)
    }
    .await;
    conn.close().await;
    println!("accepted conversation={}", result?);
    Ok(())
}
