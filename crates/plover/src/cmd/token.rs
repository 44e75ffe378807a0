//! `plover token`: mints a user's bearer token with the server's secret.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use plover_server::auth::{TokenKeys, secret_for};
use plover_server::config::Config;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct TokenArgs {
    #[command(subcommand)]
    command: Option<TokenCommand>,
    /// The user id (1-64 characters of A-Z a-z 0-9 . _ -).
    #[arg(required = true)]
    user: Option<String>,
    /// Limit the token to this device.
    #[arg(long)]
    device: Option<String>,
    /// How long the token is valid (e.g. 1h, 30d).
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Data directory holding the secret [default: ./plover-data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Configuration file (for `data` and `auth.secret`).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Refuse every token of a user (or of one device) issued until now, and close their
    /// connections, through the running server's admin socket.
    Revoke(super::admin::RevokeArgs),
}

pub(crate) async fn token(args: TokenArgs) -> Result<()> {
    if let Some(TokenCommand::Revoke(revoke)) = args.command {
        return super::admin::revoke(revoke).await;
    }
    let Some(user) = args.user else {
        bail!("name the user to mint a token for");
    };
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(data) = args.data {
        config.data = data;
    }
    let keys = TokenKeys::new(&secret_for(&config)?);
    let token = keys.mint(&user, args.device.as_deref(), args.ttl)?;
    println!("{token}");
    Ok(())
}
