//! `plover token`: mints a user's bearer token with the server's secret.

use anyhow::Result;
use clap::Args;
use plover_server::auth::{TokenKeys, secret_for};
use plover_server::config::Config;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub(crate) struct TokenArgs {
    /// The user id (1-64 characters of A-Z a-z 0-9 . _ -).
    user: String,
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

pub(crate) fn token(args: TokenArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(data) = args.data {
        config.data = data;
    }
    let keys = TokenKeys::new(&secret_for(&config)?);
    let token = keys.mint(&args.user, args.device.as_deref(), args.ttl)?;
    println!("{token}");
    Ok(())
}
