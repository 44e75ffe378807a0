//! Arguments shared by the client commands: where and as whom to connect, and which
//! conversation.

use anyhow::{Result, bail};
use clap::Args;
use plover_client::ClientConfig;
use plover_proto::Target;
use std::path::PathBuf;

/// Which conversation: the direct one with a user, or one by id.
#[derive(Args)]
pub(crate) struct Which {
    /// The other user of a direct conversation.
    #[arg(
        long,
        conflicts_with = "conversation",
        required_unless_present = "conversation"
    )]
    with: Option<String>,
    /// A conversation id.
    #[arg(long)]
    conversation: Option<u64>,
}

impl Which {
    pub(crate) fn target(self) -> Result<Target> {
        target(self.with, self.conversation)
    }
}

#[derive(Args, Clone)]
pub(crate) struct ClientArgs {
    /// Server address, or several separated by commas, tried in turn (a cluster's nodes).
    #[arg(long, env = "PLOVER_SERVER", default_value = "127.0.0.1:4433")]
    server: String,
    /// Bearer token (from `plover token`).
    #[arg(long, env = "PLOVER_TOKEN", hide_env_values = true)]
    token: String,
    /// CA certificate to trust (PEM).
    #[arg(long, env = "PLOVER_CA", default_value = "./certs/cert.pem")]
    ca: PathBuf,
    /// This device's name.
    #[arg(long, env = "PLOVER_DEVICE", default_value = "cli")]
    device: String,
    /// The zone to be served in: a cluster node of another zone sends this client to a node
    /// of this one, if one is up.
    #[arg(long, env = "PLOVER_ZONE")]
    zone: Option<String>,
}

impl ClientArgs {
    pub(crate) fn config(&self) -> Result<ClientConfig> {
        let mut config = ClientConfig::new(
            self.server.clone(),
            &self.ca,
            self.token.clone(),
            self.device.clone(),
        )?;
        config.zone = self.zone.clone();
        Ok(config)
    }
}

pub(crate) fn target(to: Option<String>, conversation: Option<u64>) -> Result<Target> {
    match (to, conversation) {
        (Some(user), None) => Ok(Target::Direct(user)),
        (None, Some(id)) => Ok(Target::Conversation(id)),
        _ => bail!("give exactly one of --to/--with or --conversation"),
    }
}
