//! `plover push ...`: where a user's notifications go while they are offline.

use crate::args::ClientArgs;
use crate::render::*;
use anyhow::{Result, bail};
use clap::Subcommand;
use plover_client::Connection;
use plover_proto::Pusher;
use plover_server::config::Config;
use serde_json::json;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum PushCommand {
    /// Register a push gateway (Matrix Push Gateway API) or a Web Push / UnifiedPush endpoint.
    Register {
        #[command(flatten)]
        client: ClientArgs,
        /// A push gateway's base URL (with --app-id and --pushkey).
        #[arg(long, conflicts_with = "endpoint", required_unless_present = "endpoint", requires_all = ["app_id", "pushkey"])]
        gateway: Option<String>,
        /// The app id the gateway knows.
        #[arg(long)]
        app_id: Option<String>,
        /// The device's push key (APNs or FCM token).
        #[arg(long)]
        pushkey: Option<String>,
        /// A Web Push / UnifiedPush endpoint URL.
        #[arg(long)]
        endpoint: Option<String>,
        /// The device's P-256 public key, base64url (with --auth): notifications are then
        /// encrypted per RFC 8291.
        #[arg(long, requires = "auth")]
        p256dh: Option<String>,
        /// The device's authentication secret, base64url.
        #[arg(long, requires = "p256dh")]
        auth: Option<String>,
    },
    /// List your pushers.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove a pusher by its push key or endpoint.
    Unregister {
        #[command(flatten)]
        client: ClientArgs,
        /// The push key or endpoint URL.
        key: String,
    },
    /// Include (or not) message bodies in this conversation's notifications. Off by default:
    /// bodies may be end-to-end encrypted.
    Content {
        #[command(flatten)]
        client: ClientArgs,
        /// The conversation id.
        #[arg(long)]
        conversation: u64,
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        setting: String,
    },
    /// Print the server's VAPID public key (base64url), the `applicationServerKey` a Web
    /// Push app subscribes with. Made in the data directory on first use; works while the
    /// server runs.
    VapidKey {
        /// Data directory holding the key [default: ./plover-data].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Configuration file (for `data` and `push.vapid_subject`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub(crate) async fn push(command: PushCommand) -> Result<()> {
    match command {
        PushCommand::VapidKey { data, config } => {
            let mut config = match &config {
                Some(path) => Config::from_file(path)?,
                None => Config::default(),
            };
            if let Some(data) = data {
                config.data = data;
            }
            let vapid = plover_server::push::vapid::Vapid::load_or_create(
                &config.data,
                &config.push.vapid_subject,
            )?;
            println!("{}", vapid.public_key());
        }
        PushCommand::Register {
            client,
            gateway,
            app_id,
            pushkey,
            endpoint,
            p256dh,
            auth,
        } => {
            let pusher = match (gateway, endpoint) {
                (Some(url), None) => Pusher::Gateway {
                    url,
                    app_id: app_id.unwrap_or_default(),
                    pushkey: pushkey.unwrap_or_default(),
                },
                (None, Some(endpoint)) => Pusher::WebPush {
                    endpoint,
                    p256dh,
                    auth,
                },
                _ => bail!("give --gateway (with --app-id, --pushkey) or --endpoint"),
            };
            let key = pusher.key().to_owned();
            let conn = Connection::connect(&client.config()?).await?;
            let result = conn.register_pusher(pusher).await;
            conn.close().await;
            result?;
            println!("registered {key}");
        }
        PushCommand::List { client, json } => {
            let conn = Connection::connect(&client.config()?).await?;
            let result = conn.pushers().await;
            conn.close().await;
            for p in result? {
                let line = match (&p, json) {
                    (Pusher::Gateway { url, app_id, pushkey }, true) => json!({"type": "pusher", "kind": "gateway", "url": url, "app_id": app_id, "pushkey": pushkey}).to_string(),
                    (Pusher::WebPush { endpoint, p256dh, .. }, true) => json!({"type": "pusher", "kind": "webpush", "endpoint": endpoint, "encrypted": p256dh.is_some()}).to_string(),
                    (Pusher::Gateway { url, app_id, pushkey }, false) => format!("gateway  {url}  app_id={app_id}  pushkey={pushkey}"),
                    (Pusher::WebPush { endpoint, p256dh, .. }, false) => format!(
                        "webpush  {endpoint}  {}",
                        if p256dh.is_some() { "encrypted (RFC 8291)" } else { "unencrypted" }
                    ),
                };
                print_line(&line)?;
            }
        }
        PushCommand::Unregister { client, key } => {
            let conn = Connection::connect(&client.config()?).await?;
            let result = conn.unregister_pusher(&key).await;
            conn.close().await;
            if result? {
                println!("unregistered {key}");
            } else {
                bail!("no pusher {key:?}");
            }
        }
        PushCommand::Content {
            client,
            conversation,
            setting,
        } => {
            let conn = Connection::connect(&client.config()?).await?;
            let result = conn.push_content(conversation, setting == "on").await;
            conn.close().await;
            result?;
            println!("push content {setting} conversation={conversation}");
        }
    }
    Ok(())
}
