//! `plover chat`: an interactive terminal chat on the client SDK.
//!
//! One connection sends, marks read, asks presence and sends typing datagrams; an event stream
//! (its own connection, starting from now) brings messages, receipts, presence and typing. The
//! screen shows the last messages, a tick per own message (sent, delivered, read), the peer's
//! presence line and typing indicator, and an input line. Messages are marked read while the
//! window is open.

use anyhow::Result;
use bytes::Bytes;
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use plover_client::{
    Ack, ClientConfig, ClientError, Connection, Conversation, EventStream, Incoming, TYPING_REPEAT,
    TYPING_TTL,
};
use plover_proto::content::{Attachment, Content};
use plover_proto::{ClientMsgId, ConversationChange, Event, Message, Target};

use crate::args::{ClientArgs, Which};

/// `plover chat`'s arguments.
#[derive(clap::Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    which: Which,
}

/// `plover chat`.
pub(crate) async fn chat(args: ChatArgs) -> Result<()> {
    let target = args.which.target()?;
    run(args.client.config()?, target).await
}

/// Messages shown on open.
const BACKLOG: u32 = 50;

/// What the UI loop reacts to.
enum Input {
    Key(KeyCode, KeyModifiers),
    Resize,
    Incoming(Incoming),
    Sent(ClientMsgId, Result<Ack, ClientError>),
    StreamFailed(ClientError),
    /// A line for the status bar (a file saved, or why not).
    Status(String),
}

/// A line of the conversation.
struct Shown {
    from: String,
    text: String,
    ts: u64,
    /// A membership change, shown as a line of its own.
    system: bool,
}

/// An own message not yet acknowledged.
struct Pending {
    text: String,
    failed: Option<String>,
}

struct State {
    me: String,
    /// A group's title, or empty for a direct conversation.
    title: String,
    members: Vec<String>,
    conversation: u64,
    messages: BTreeMap<u64, Shown>,
    pending: Vec<(ClientMsgId, Pending)>,
    /// Each other member's (delivered, read) marks.
    marks: HashMap<String, (u64, u64)>,
    /// Each other member's presence: Some(0) online, Some(ms) last seen, None unknown.
    presence: HashMap<String, Option<u64>>,
    typing: HashMap<String, Instant>,
    input: String,
    status: String,
    /// The attachments of the messages shown, by seq (for `/save N`).
    attachments: HashMap<u64, Attachment>,
}

impl State {
    /// The lowest mark among the other members: what "delivered to all" / "read by all" means.
    fn all_marks(&self) -> (u64, u64) {
        let others = self.members.iter().filter(|m| **m != self.me);
        let mut delivered = u64::MAX;
        let mut read = u64::MAX;
        for m in others {
            let (d, r) = self.marks.get(m).copied().unwrap_or((0, 0));
            delivered = delivered.min(d);
            read = read.min(r);
        }
        (delivered, read)
    }

    fn tick(&self, seq: u64) -> &'static str {
        let (delivered, read) = self.all_marks();
        if read >= seq {
            "✓✓ read"
        } else if delivered >= seq {
            "✓✓ delivered"
        } else {
            "✓ sent"
        }
    }

    fn header(&self) -> String {
        let others: Vec<&String> = self.members.iter().filter(|m| **m != self.me).collect();
        let now = Instant::now();
        let typing: Vec<&String> = self
            .typing
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(u, _)| u)
            .collect();
        if let Some(user) = typing.first() {
            return format!("{user} is typing…");
        }
        if !self.title.is_empty() {
            return format!("{} members", self.members.len());
        }
        match others.as_slice() {
            [peer] => match self.presence.get(*peer).copied().flatten() {
                Some(0) => format!("{peer} is online"),
                Some(ms) => format!("{peer} was last seen {}", clock(ms)),
                None => peer.to_string(),
            },
            _ => format!("{} members", self.members.len()),
        }
    }

    fn add(&mut self, m: &Message) {
        if m.change.is_none()
            && let Some(Content::Attachment(a)) = Content::decode(&m.body)
        {
            self.attachments.insert(m.seq, a);
        }
        let (text, system) = match &m.change {
            None => (crate::render::body_text(m), false),
            Some(ConversationChange::Erased) => ("(message deleted)".to_owned(), false),
            Some(change) => (crate::render::describe_change(&m.from, change), true),
        };
        self.messages.insert(
            m.seq,
            Shown {
                from: m.from.clone(),
                text,
                ts: m.ts,
                system,
            },
        );
    }

    /// Keeps the member list in step with membership events that arrive live.
    fn apply(&mut self, change: &ConversationChange, from: &str) {
        match change {
            ConversationChange::Added { user } => {
                if !self.members.contains(user) {
                    self.members.push(user.clone());
                    self.members.sort();
                }
            }
            ConversationChange::Removed { user } => self.members.retain(|m| m != user),
            ConversationChange::Left { .. } => self.members.retain(|m| m != from),
            ConversationChange::Created { .. }
            | ConversationChange::Promoted { .. }
            | ConversationChange::Retention { .. }
            | ConversationChange::Erased => {}
        }
    }
}

fn clock(ms: u64) -> String {
    let rfc = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        .to_string();
    // "2026-11-27T19:57:23Z" -> "2026-11-27 19:57:23"
    rfc.replace('T', " ").trim_end_matches('Z').to_owned()
}

/// `/send PATH`: the file encrypted, uploaded, and the message that points to it sent.
async fn send_file(
    conn: &Connection,
    conv: &Conversation,
    id: ClientMsgId,
    path: &std::path::Path,
) -> Result<Ack, ClientError> {
    let file = plover_client::media::prepare(path).await?;
    conn.upload(&file, &mut |_| {}).await?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let attachment = crate::cmd::files::attachment(&file, name, None);
    let body = Content::Attachment(attachment).encode();
    conv.send_referencing(id, Bytes::from(body), vec![file.object])
        .await
}

/// `/save N`: message N's file, downloaded, checked and decrypted into the current
/// directory under its name.
async fn save(
    conn: Arc<Connection>,
    conversation: u64,
    (seq, attachment): (u64, Attachment),
    tx: mpsc::Sender<Input>,
) {
    let name = std::path::Path::new(&attachment.name)
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| "attachment".into());
    let out = std::path::PathBuf::from(name);
    let through = plover_client::media::Through { conversation, seq };
    let line = match conn.download(&attachment, through, &out, &mut |_| {}).await {
        Ok(()) => format!("saved {}", out.display()),
        Err(e) => format!("could not save {}: {e}", attachment.name),
    };
    let _ = tx.send(Input::Status(line)).await;
}

/// Restores the terminal when dropped, whatever way the chat ends.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the chat until Esc or Ctrl-C.
pub(crate) async fn run(config: ClientConfig, target: Target) -> Result<()> {
    // One connection: events arrive on it, and the conversation is opened on it (live from
    // now on; the backlog comes from history). The chat does not move the device's cursor,
    // so `plover listen` on this device still shows everything.
    let mut events = EventStream::start(config, Some(u64::MAX));
    if !events.synced().await {
        return Err(match events.next().await {
            Some(Err(e)) => e.into(),
            _ => anyhow::anyhow!("could not connect"),
        });
    }
    let mut conn = events
        .connection()
        .ok_or_else(|| anyhow::anyhow!("the connection was lost while opening the chat"))?;
    let mut conv = Arc::new(conn.open(target, true).await?);
    let me = conn.user().to_owned();
    let roster = conv.all_members().await?;
    let mut state = State {
        me: me.clone(),
        title: conv.title().to_owned(),
        members: roster.iter().map(|m| m.user.clone()).collect(),
        conversation: conv.id(),
        messages: BTreeMap::new(),
        pending: Vec::new(),
        marks: HashMap::new(),
        presence: HashMap::new(),
        typing: HashMap::new(),
        input: String::new(),
        status: "Enter: send · /send PATH: a file · /save N: save message N's file · Esc: quit"
            .into(),
        attachments: HashMap::new(),
    };
    let (history, _) = conv.history(None, None, BACKLOG).await?;
    for m in &history {
        state.add(m);
    }
    for m in roster {
        state.marks.insert(m.user, (m.delivered, m.read));
    }
    // Presence lines make sense for a direct conversation (and a small group's header shows
    // typing only).
    let peers: Vec<String> = if state.members.len() == 2 {
        state
            .members
            .iter()
            .filter(|m| **m != me)
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    for peer in &peers {
        if let Ok((online, last_seen)) = conn.presence(peer).await {
            let value = if online { 0 } else { last_seen };
            state.presence.insert(peer.clone(), Some(value));
        }
    }
    let mut read_up_to = conv.last_seq();
    conv.mark_read(read_up_to).await?;

    let (tx, mut rx) = mpsc::channel::<Input>(256);
    spawn_keys(tx.clone());
    let _guard = TerminalGuard;
    let mut terminal = ratatui::try_init()?;
    let mut last_typing = Instant::now() - TYPING_REPEAT;
    let mut redraw = tokio::time::interval(Duration::from_millis(500));
    loop {
        terminal.draw(|frame| draw(frame, &state))?;
        let input = tokio::select! {
            input = rx.recv() => match input {
                Some(input) => input,
                None => break,
            },
            next = events.next() => match next {
                Some(Ok(incoming)) => Input::Incoming(incoming),
                Some(Err(e)) => Input::StreamFailed(e),
                None => break,
            },
            _ = redraw.tick() => continue,
        };
        if conv.is_broken()
            && let Some((c, reopened)) = reopen(&events, &conn, state.conversation).await
        {
            // The event stream reconnected: send, type and mark read on its new connection.
            (conn, conv) = (c, reopened);
        }
        match input {
            Input::Key(KeyCode::Esc, _) => break,
            Input::Key(KeyCode::Char('c'), m) if m.contains(KeyModifiers::CONTROL) => break,
            Input::Key(KeyCode::Enter, _) => {
                let text = std::mem::take(&mut state.input);
                if text.trim().is_empty() {
                    continue;
                }
                if let Some(seq) = text.trim().strip_prefix("/save ") {
                    let Some(attachment) = seq
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .and_then(|n| state.attachments.get(&n).map(|a| (n, a.clone())))
                    else {
                        state.status = format!("no file in message {}", seq.trim());
                        continue;
                    };
                    state.status = format!("saving {}...", attachment.1.name);
                    tokio::spawn(save(
                        conn.clone(),
                        state.conversation,
                        attachment,
                        tx.clone(),
                    ));
                    continue;
                }
                if let Some(path) = text.trim().strip_prefix("/send ") {
                    let path = std::path::PathBuf::from(path.trim());
                    let id = ClientMsgId::random();
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    state.pending.push((
                        id,
                        Pending {
                            text: format!("[attachment {name}]"),
                            failed: None,
                        },
                    ));
                    let (conn, conv, tx) = (conn.clone(), conv.clone(), tx.clone());
                    tokio::spawn(async move {
                        let result = send_file(&conn, &conv, id, &path).await;
                        let _ = tx.send(Input::Sent(id, result)).await;
                    });
                    continue;
                }
                let id = ClientMsgId::random();
                state.pending.push((
                    id,
                    Pending {
                        text: text.clone(),
                        failed: None,
                    },
                ));
                let (conv, tx) = (conv.clone(), tx.clone());
                tokio::spawn(async move {
                    let body = Content::Text { text }.encode();
                    let result = conv.send_with_id(id, Bytes::from(body)).await;
                    let _ = tx.send(Input::Sent(id, result)).await;
                });
            }
            Input::Key(KeyCode::Backspace, _) => {
                state.input.pop();
            }
            Input::Key(KeyCode::Char(c), _) => {
                state.input.push(c);
                if last_typing.elapsed() >= TYPING_REPEAT {
                    last_typing = Instant::now();
                    let _ = conn.typing(state.conversation);
                }
            }
            Input::Key(..) | Input::Resize => {}
            Input::Status(line) => state.status = line,
            Input::Sent(id, result) => match result {
                Ok(ack) => {
                    if let Some(pos) = state.pending.iter().position(|(p, _)| *p == id) {
                        let (_, pending) = state.pending.remove(pos);
                        state.messages.entry(ack.seq).or_insert(Shown {
                            from: me.clone(),
                            text: pending.text,
                            ts: ack.ts,
                            system: false,
                        });
                    }
                }
                Err(e) => {
                    if let Some((_, p)) = state.pending.iter_mut().find(|(p, _)| *p == id) {
                        p.failed = Some(e.to_string());
                    }
                }
            },
            Input::Incoming(Incoming::Log(e)) => match &e.event {
                Event::Message(m) if m.conversation == state.conversation => {
                    state.add(m);
                    if let Some(change) = &m.change {
                        state.apply(change, &m.from);
                    }
                    state.typing.remove(&m.from);
                    // A sender has read everything up to their own message.
                    let marks = state.marks.entry(m.from.clone()).or_insert((0, 0));
                    *marks = (marks.0.max(m.seq), marks.1.max(m.seq));
                    if m.from != me && m.seq > read_up_to {
                        // The window is open: what arrives is read.
                        read_up_to = m.seq;
                        let _ = conv.mark_read(read_up_to).await;
                    }
                }
                Event::Deleted {
                    conversation, seq, ..
                } if *conversation == state.conversation => {
                    if let Some(shown) = state.messages.get_mut(seq) {
                        shown.text = "(message deleted)".to_owned();
                    }
                }
                Event::Receipt(r) if r.conversation == state.conversation && r.user != me => {
                    state.marks.insert(r.user.clone(), (r.delivered, r.read));
                }
                _ => {}
            },
            Input::Incoming(Incoming::Presence {
                user,
                online,
                last_seen,
            }) => {
                if state.presence.contains_key(&user) {
                    let value = if online { 0 } else { last_seen };
                    state.presence.insert(user, Some(value));
                }
            }
            Input::Incoming(Incoming::Typing { conversation, user }) => {
                if conversation == state.conversation && user != me {
                    state.typing.insert(user, Instant::now() + TYPING_TTL);
                }
            }
            Input::StreamFailed(e) => {
                state.status = format!("event stream failed: {e}");
            }
        }
    }
    drop(terminal);
    drop(_guard);
    if let Ok(conv) = Arc::try_unwrap(conv) {
        Conversation::close(conv).await;
    }
    // The connection is the event stream's: let go of it so that the stream closes it cleanly.
    drop(conn);
    events.close().await;
    Ok(())
}

/// The conversation opened again on the event stream's connection, if that is a new one.
async fn reopen(
    events: &EventStream,
    old: &Arc<Connection>,
    conversation: plover_proto::ConversationId,
) -> Option<(Arc<Connection>, Arc<Conversation>)> {
    let conn = events.connection().filter(|c| !Arc::ptr_eq(c, old))?;
    let conv = conn
        .open(Target::Conversation(conversation), false)
        .await
        .ok()?;
    Some((conn, Arc::new(conv)))
}

/// Reads the keyboard on a thread of its own (crossterm's reads block).
fn spawn_keys(tx: mpsc::Sender<Input>) {
    std::thread::spawn(move || {
        loop {
            let input = match event::read() {
                Ok(TermEvent::Key(k)) if k.kind != KeyEventKind::Release => {
                    Input::Key(k.code, k.modifiers)
                }
                Ok(TermEvent::Resize(..)) => Input::Resize,
                Ok(_) => continue,
                Err(_) => return,
            };
            if tx.blocking_send(input).is_err() {
                return;
            }
        }
    });
}

fn draw(frame: &mut ratatui::Frame<'_>, state: &State) {
    let [top, body, input, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let name = if state.title.is_empty() {
        state
            .members
            .iter()
            .filter(|m| **m != state.me)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        state.title.clone()
    };
    let title = format!(" {name} · conversation {} ", state.conversation);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(title, Style::default().add_modifier(Modifier::BOLD)),
            Span::raw("  "),
            Span::styled(state.header(), Style::default().fg(Color::Green)),
        ])),
        top,
    );

    let mut lines: Vec<Line<'_>> = Vec::new();
    for (seq, m) in &state.messages {
        if m.system {
            lines.push(Line::from(Span::styled(
                format!("{} -- {} --", clock(m.ts), m.text),
                Style::default()
                    .fg(Color::DarkGray)
                    .add_modifier(Modifier::ITALIC),
            )));
            continue;
        }
        let mut spans = vec![
            Span::styled(
                format!("{} ", clock(m.ts)),
                Style::default().fg(Color::DarkGray),
            ),
            Span::styled(
                format!("{}: ", m.from),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::raw(m.text.clone()),
        ];
        if m.from == state.me {
            spans.push(Span::styled(
                format!("  {}", state.tick(*seq)),
                Style::default().fg(Color::Cyan),
            ));
        }
        lines.push(Line::from(spans));
    }
    for (_, p) in &state.pending {
        let tick = match &p.failed {
            Some(e) => format!("  ✗ not sent: {e}"),
            None => "  … sending".to_owned(),
        };
        lines.push(Line::from(vec![
            Span::styled(
                format!("{}: ", state.me),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::raw(p.text.clone()),
            Span::styled(tick, Style::default().fg(Color::Yellow)),
        ]));
    }
    let visible = body.height.saturating_sub(2) as usize;
    let skip = lines.len().saturating_sub(visible);
    let lines: Vec<Line<'_>> = lines.into_iter().skip(skip).collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL)),
        body,
    );
    frame.render_widget(
        Paragraph::new(format!("> {}", state.input))
            .block(Block::default().borders(Borders::ALL).title(" message ")),
        input,
    );
    frame.render_widget(
        Paragraph::new(state.status.as_str()).style(Style::default().fg(Color::DarkGray)),
        help,
    );
}
