//! The `plover` binary: the server and its command-line client.
//!
//! # Layout
//!
//! - `cmd/`: one module per command family, each with its arguments and its handler:
//!   `serve`, `token`, `messages` (send, listen, history, conversations), `receipts` (read,
//!   receipts, presence), `groups` (group, retention, delete, clear), `push`, `chat`,
//!   `nodes` (a cluster's nodes), `safety` (block, unblock, blocked, requests, accept),
//!   `admin` (the operator's `admin` commands and `token revoke`).
//! - `args.rs`: the arguments every client command shares (server, CA, token, device, which
//!   conversation).
//! - `render.rs`: how events and messages print, as lines or as JSON.
//! - `bench/`: `plover bench`, the load generator: the measuring parts and one file per scenario.

mod args;
mod bench;
mod cmd;
mod render;

use anyhow::Result;
use clap::{Parser, Subcommand};

use cmd::{admin, chat, files, groups, messages, nodes, push, receipts, safety, serve, token};

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
    Serve(serve::ServeArgs),
    /// Mint a token for a user (prints only the token), or `token revoke` one.
    Token(token::TokenArgs),
    /// An operator's actions on a running server: users, devices, disconnect,
    /// remove-device, delete-user (through `<data>/admin.sock`).
    Admin(admin::AdminArgs),
    /// Send a message and wait until it is stored.
    Send(messages::SendArgs),
    /// Print events as they arrive, starting with what this device missed.
    Listen(messages::ListenArgs),
    /// Print a conversation's history, oldest first.
    History(messages::HistoryArgs),
    /// Download a message's attachment: checked, decrypted, written to a file.
    Fetch(files::FetchArgs),
    /// List your conversations.
    Conversations(messages::ConversationsArgs),
    /// Mark a conversation read (up to its latest message, or `--up-to`).
    Read(receipts::ReadArgs),
    /// Show whether a user is online, or when they were last seen.
    Presence(receipts::PresenceArgs),
    /// An interactive terminal chat.
    Chat(chat::ChatArgs),
    /// Create and manage groups.
    #[command(subcommand)]
    Group(groups::GroupCommand),
    /// Who has received and read a conversation's messages.
    Receipts(receipts::ReceiptsArgs),
    /// Set a conversation's retention policy: keep, until-delivered, ttl=<duration>.
    Retention(groups::RetentionArgs),
    /// Delete one of your messages for everyone.
    Delete(groups::DeleteArgs),
    /// Hide a conversation's history from yourself only.
    Clear(groups::ClearArgs),
    /// Block a user: they can no longer reach you or see your presence, typing or read marks.
    Block(safety::BlockArgs),
    /// Lift a block.
    Unblock(safety::BlockArgs),
    /// List the users you blocked.
    Blocked(safety::ListArgs),
    /// List your message requests: conversations strangers started or added you to.
    Requests(safety::ListArgs),
    /// Accept a message request (answering in it accepts it too).
    Accept(safety::AcceptArgs),
    /// Register where your notifications go while you are offline.
    #[command(subcommand)]
    Push(push::PushCommand),
    /// Load-test a server (its own, by default) and verify every delivery.
    Bench(bench::BenchArgs),
    /// List a cluster's nodes and each one's load.
    Nodes(nodes::NodesArgs),
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
        Command::Serve(args) => serve::serve(args).await,
        Command::Token(args) => token::token(args).await,
        Command::Admin(args) => admin::admin(args).await,
        Command::Send(args) => messages::send(args).await,
        Command::Listen(args) => messages::listen(args).await,
        Command::History(args) => messages::history(args).await,
        Command::Fetch(args) => files::fetch(args).await,
        Command::Conversations(args) => messages::conversations(args).await,
        Command::Read(args) => receipts::read(args).await,
        Command::Presence(args) => receipts::presence(args).await,
        Command::Receipts(args) => receipts::receipts(args).await,
        Command::Group(command) => groups::group(command).await,
        Command::Retention(args) => groups::retention(args).await,
        Command::Delete(args) => groups::delete(args).await,
        Command::Clear(args) => groups::clear(args).await,
        Command::Nodes(args) => nodes::nodes(args).await,
        Command::Push(command) => push::push(command).await,
        Command::Block(args) => safety::block(args, true).await,
        Command::Unblock(args) => safety::block(args, false).await,
        Command::Blocked(args) => safety::blocked(args).await,
        Command::Requests(args) => safety::requests(args).await,
        Command::Accept(args) => safety::accept(args).await,
        Command::Chat(args) => chat::chat(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}
