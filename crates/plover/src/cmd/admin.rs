//! `plover admin` and `plover token revoke`: an operator's actions on a running server,
//! through its admin socket (`<data>/admin.sock`), found from `--data` or `--config` as
//! `plover token` finds the secret.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use plover_server::admin::{Request, call};
use plover_server::config::Config;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// Where the server is: its data directory, directly or from its configuration.
#[derive(Args, Clone)]
pub(crate) struct Server {
    /// The server's data directory [default: ./plover-data].
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    /// The server's configuration file (for `data`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

impl Server {
    fn data(&self) -> Result<PathBuf> {
        if let Some(data) = &self.data {
            return Ok(data.clone());
        }
        Ok(match &self.config {
            Some(path) => Config::from_file(path)?.data,
            None => Config::default().data,
        })
    }
}

#[derive(Args)]
pub(crate) struct AdminArgs {
    #[command(subcommand)]
    command: AdminCommand,
    #[command(flatten)]
    server: Server,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Every user: devices, online, last seen.
    Users {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// A user's devices: cursor, and whether connected to this node.
    Devices {
        /// The user.
        user: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Close a user's connections (or one device's), on every node.
    Disconnect {
        /// The user.
        user: String,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
    },
    /// Forget a device: its cursor and pushers go, its connection closes.
    RemoveDevice {
        /// The user.
        user: String,
        /// The device.
        device: String,
    },
    /// Remove an account's traces: tokens revoked, connections closed, groups left, the
    /// bodies of its messages erased, its devices, pushers, blocks and sync log removed.
    DeleteUser {
        /// The user.
        user: String,
    },
}

/// `plover token revoke <user> [--device D]`.
#[derive(Args)]
pub(crate) struct RevokeArgs {
    /// The user whose tokens go.
    user: String,
    /// Only this device's tokens.
    #[arg(long)]
    device: Option<String>,
    #[command(flatten)]
    server: Server,
}

/// How long an action may take: deleting a user erases their bodies in every conversation.
const TIMEOUT: Duration = Duration::from_secs(600);

async fn send(server: &Server, request: Request) -> Result<Value> {
    let data = server.data()?;
    tokio::task::spawn_blocking(move || call(&data, &request, TIMEOUT))
        .await
        .context("the admin request's thread")?
        .map_err(Into::into)
}

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    v.get(name).unwrap_or(&Value::Null)
}

pub(crate) async fn admin(args: AdminArgs) -> Result<()> {
    match args.command {
        AdminCommand::Users { json } => {
            let answer = send(&args.server, Request::Users).await?;
            for u in field(&answer, "users").as_array().into_iter().flatten() {
                if json {
                    println!("{u}");
                } else {
                    println!(
                        "{} devices={} online={} last_seen={}",
                        field(u, "user").as_str().unwrap_or(""),
                        field(u, "devices"),
                        field(u, "online"),
                        field(u, "last_seen"),
                    );
                }
            }
        }
        AdminCommand::Devices { user, json } => {
            let answer = send(&args.server, Request::Devices { user }).await?;
            for d in field(&answer, "devices").as_array().into_iter().flatten() {
                if json {
                    println!("{d}");
                } else {
                    println!(
                        "{} cursor={} connected={}",
                        field(d, "device").as_str().unwrap_or(""),
                        field(d, "cursor"),
                        field(d, "connected"),
                    );
                }
            }
        }
        AdminCommand::Disconnect { user, device } => {
            let answer = send(
                &args.server,
                Request::Disconnect {
                    user: user.clone(),
                    device,
                },
            )
            .await?;
            println!("disconnected {user} closed={}", field(&answer, "closed"));
        }
        AdminCommand::RemoveDevice { user, device } => {
            let answer = send(
                &args.server,
                Request::RemoveDevice {
                    user: user.clone(),
                    device: device.clone(),
                },
            )
            .await?;
            println!(
                "removed {user}/{device} closed={} pushers_removed={}",
                field(&answer, "closed"),
                field(&answer, "pushers_removed")
            );
        }
        AdminCommand::DeleteUser { user } => {
            let answer = send(&args.server, Request::DeleteUser { user: user.clone() }).await?;
            println!(
                "deleted {user} closed={} groups_left={} bodies_erased={} records_removed={}",
                field(&answer, "closed"),
                field(&answer, "groups_left"),
                field(&answer, "bodies_erased"),
                field(&answer, "records_removed"),
            );
        }
    }
    Ok(())
}

pub(crate) async fn revoke(args: RevokeArgs) -> Result<()> {
    let answer = send(
        &args.server,
        Request::Revoke {
            user: args.user.clone(),
            device: args.device.clone(),
        },
    )
    .await?;
    match &args.device {
        Some(device) => print!("revoked {}/{device}", args.user),
        None => print!("revoked {}", args.user),
    }
    println!(
        " at={} closed={}",
        field(&answer, "revoked_at"),
        field(&answer, "closed")
    );
    Ok(())
}
