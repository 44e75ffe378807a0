//! The `plover` binary: the server and its command-line client.

#[path = "cli/bench.rs"]
mod bench;
#[path = "cli/chat.rs"]
mod chat;
#[path = "cli/echo.rs"]
mod echo;
#[path = "cli/flood.rs"]
mod flood;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use plover_client::{Client, ClientConfig, Connection, EventStream, Incoming};
use plover_proto::{
    ConversationChange, ConversationKind, Event, Message, Pusher, Retention, Target,
};
use plover_server::auth::{TokenKeys, secret_for};
use plover_server::config::{Config, Durability};

#[derive(Parser)]
#[command(
    name = "plover",
    version,
    about = "A QUIC-native messaging server and its client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Mint a token for a user (prints only the token).
    Token(TokenArgs),
    /// Send a message and wait until it is stored.
    Send(SendArgs),
    /// Print events as they arrive, starting with what this device missed.
    Listen(ListenArgs),
    /// Print a conversation's history, oldest first.
    History(HistoryArgs),
    /// List your conversations.
    Conversations(ConversationsArgs),
    /// Mark a conversation read (up to its latest message, or `--up-to`).
    Read(ReadArgs),
    /// Show whether a user is online, or when they were last seen.
    Presence(PresenceArgs),
    /// An interactive terminal chat.
    Chat(ChatArgs),
    /// Create and manage groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Who has received and read a conversation's messages.
    Receipts(ReceiptsArgs),
    /// Set a conversation's retention policy: keep, until-delivered, ttl=<duration>.
    Retention(RetentionArgs),
    /// Delete one of your messages for everyone.
    Delete(DeleteArgs),
    /// Hide a conversation's history from yourself only.
    Clear(ClearArgs),
    /// Register where your notifications go while you are offline.
    #[command(subcommand)]
    Push(PushCommand),
    /// Load-test a server (its own, by default) and verify every delivery.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum PushCommand {
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

#[derive(Args)]
struct RetentionArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The conversation id.
    conversation: u64,
    /// `keep`, `until-delivered` or `ttl=<duration>` (e.g. `ttl=7d`).
    policy: Retention,
}

#[derive(Args)]
struct DeleteArgs {
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
struct ClearArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The conversation id.
    #[arg(long)]
    conversation: u64,
    /// Hide up to this seq [default: everything so far].
    #[arg(long)]
    up_to: Option<u64>,
}

#[derive(Subcommand)]
enum GroupCommand {
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
struct ReceiptsArgs {
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
struct ReadArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    which: Which,
    /// Mark read up to this sequence number [default: the latest message].
    #[arg(long)]
    up_to: Option<u64>,
}

#[derive(Args)]
struct PresenceArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The user to ask about (you must share a conversation).
    user: String,
    /// One JSON object on one line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    which: Which,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (see plover.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address to listen on [default: 127.0.0.1:4433].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./plover-data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Directory of the dev certificate [default: ./certs].
    #[arg(long)]
    certs: Option<PathBuf>,
    /// `sync` (ack after fsync) or `buffered` (ack before fsync).
    #[arg(long, value_parser = parse_durability)]
    durability: Option<Durability>,
    /// Serve /metrics, /healthz and /readyz over plain HTTP on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Also shut down cleanly when standard input ends: for a program that runs plover as its
    /// child (a test, `plover bench`) and may die without stopping it. Give plover a pipe.
    #[arg(long)]
    stop_on_stdin_eof: bool,
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "sync" => Ok(Durability::Sync),
        "buffered" => Ok(Durability::Buffered),
        _ => Err(format!("{s:?} is neither `sync` nor `buffered`")),
    }
}

#[derive(Args)]
struct TokenArgs {
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

/// Which conversation: the direct one with a user, or one by id.
#[derive(Args)]
struct Which {
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
    fn target(self) -> Result<Target> {
        target(self.with, self.conversation)
    }
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Server address.
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
}

impl ClientArgs {
    fn config(&self) -> Result<ClientConfig> {
        Ok(ClientConfig::new(
            self.server.clone(),
            &self.ca,
            self.token.clone(),
            self.device.clone(),
        )?)
    }
}

#[derive(Args)]
struct SendArgs {
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
    /// The message.
    text: String,
}

#[derive(Args)]
struct ListenArgs {
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
struct HistoryArgs {
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
struct ConversationsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "error",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLOVER_LOG").unwrap_or_else(|_| {
                // The store's own progress lines are noise at info; its warnings are not.
                tracing_subscriber::EnvFilter::new(format!(
                    "{default_level},fjall=warn,lsm_tree=warn"
                ))
            }),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Token(args) => token(args),
        Command::Send(args) => send(args).await,
        Command::Listen(args) => listen(args).await,
        Command::History(args) => history(args).await,
        Command::Conversations(args) => conversations(args).await,
        Command::Read(args) => read(args).await,
        Command::Presence(args) => presence(args).await,
        Command::Group(command) => group(command).await,
        Command::Receipts(args) => receipts(args).await,
        Command::Push(command) => push(command).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Retention(args) => {
            membership(
                args.client,
                args.conversation,
                GroupOp::Retention(args.policy),
            )
            .await
        }
        Command::Delete(args) => {
            membership(args.client, args.conversation, GroupOp::Delete(args.seq)).await
        }
        Command::Clear(args) => {
            let up_to = args.up_to.unwrap_or(u64::MAX);
            membership(args.client, args.conversation, GroupOp::Clear(up_to)).await
        }
        Command::Chat(args) => {
            let target = args.which.target()?;
            chat::run(args.client.config()?, target).await
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(data) = args.data {
        config.data = data;
    }
    if let Some(certs) = args.certs {
        config.certs = certs;
    }
    if let Some(durability) = args.durability {
        config.store.durability = durability;
    }
    if let Some(metrics) = args.metrics {
        config.metrics.listen = Some(metrics);
    }
    let with_metrics = config.metrics.listen.is_some();
    let mut server = plover_server::server::Server::bind(config).await?;
    if with_metrics {
        // The global recorder belongs to the binary, not the library.
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(plover_server::metrics::LATENCY_BUCKETS)?
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    plover_server::metrics::names::COMMIT_BATCH.to_owned(),
                ),
                &[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            )?
            .install_recorder()?;
        server = server.with_metrics(std::sync::Arc::new(move || handle.render()));
    }
    if args.stop_on_stdin_eof {
        let eof = stdin_eof();
        server
            .run(async {
                tokio::select! {
                    () = shutdown_signal() => {}
                    () = eof => tracing::info!("standard input ended; shutting down"),
                }
            })
            .await?;
    } else {
        server.run(shutdown_signal()).await?;
    }
    Ok(())
}

/// Completes when standard input reaches its end (or fails). The read runs on a thread of
/// its own, never joined: a blocking task would hold the runtime open at exit.
fn stdin_eof() -> impl Future<Output = ()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("plover-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 512];
            let mut stdin = std::io::stdin().lock();
            loop {
                match std::io::Read::read(&mut stdin, &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            drop(tx);
        });
    async move {
        match spawned {
            // The sender is dropped at the end of input: the receiver then yields an error.
            Ok(_) => {
                let _ = rx.await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch standard input");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

fn token(args: TokenArgs) -> Result<()> {
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

fn target(to: Option<String>, conversation: Option<u64>) -> Result<Target> {
    match (to, conversation) {
        (Some(user), None) => Ok(Target::Direct(user)),
        (None, Some(id)) => Ok(Target::Conversation(id)),
        _ => bail!("give exactly one of --to/--with or --conversation"),
    }
}

async fn send(args: SendArgs) -> Result<()> {
    if args.text.is_empty() {
        bail!("the message is empty");
    }
    let client = Client::new(args.client.config()?);
    let target = target(args.to, args.conversation)?;
    let ack = client
        .send(target, Bytes::from(args.text.into_bytes()))
        .await;
    client.close().await;
    let ack = ack?;
    println!("sent conversation={} seq={}", ack.conversation, ack.seq);
    Ok(())
}

fn message_json(m: &Message) -> serde_json::Value {
    let Some(change) = &m.change else {
        return json!({
            "type": "message",
            "conversation": m.conversation,
            "seq": m.seq,
            "from": m.from,
            "text": String::from_utf8_lossy(&m.body),
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

fn incoming_json(incoming: &Incoming) -> serde_json::Value {
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

fn incoming_line(incoming: &Incoming) -> String {
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

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn message_line(m: &Message) -> String {
    let time = rfc3339(m.ts);
    match &m.change {
        None => format!(
            "[{time}] conversation {} #{} {}: {}",
            m.conversation,
            m.seq,
            m.from,
            String::from_utf8_lossy(&m.body)
        ),
        Some(change) => format!(
            "[{time}] conversation {} #{} -- {} --",
            m.conversation,
            m.seq,
            describe_change(&m.from, change)
        ),
    }
}

fn print_line(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

async fn listen(args: ListenArgs) -> Result<()> {
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

async fn history(args: HistoryArgs) -> Result<()> {
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

async fn conversations(args: ConversationsArgs) -> Result<()> {
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

async fn read(args: ReadArgs) -> Result<()> {
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

async fn presence(args: PresenceArgs) -> Result<()> {
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

async fn group(command: GroupCommand) -> Result<()> {
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
enum GroupOp {
    Add(String),
    Remove(String),
    Leave,
    Promote(String),
    Retention(Retention),
    Delete(u64),
    Clear(u64),
}

/// Runs one membership change on a group and prints its outcome.
async fn membership(client: ClientArgs, id: u64, op: GroupOp) -> Result<()> {
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

async fn receipts(args: ReceiptsArgs) -> Result<()> {
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

async fn push(command: PushCommand) -> Result<()> {
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
