//! The admin channel: what an operator does to a running server (`plover admin`, `plover
//! token revoke`), over a Unix socket in its data directory, `<data>/admin.sock`.
//!
//! Only the server's own system user (or root) gets in: the socket is created owner-only
//! (mode 0600), and each connection's peer credentials (`SO_PEERCRED`) are checked against
//! the socket's owner. A connection carries one request, a JSON object on one line, and gets
//! one answer, a JSON object on one line: `{"ok": true, ...}` or `{"ok": false, "error":
//! "..."}`. Every action is logged (target `plover::admin`) and appended to
//! `<data>/admin.log` with who (uid, pid) and when.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::auth::valid_name;
use crate::persist::SideWrite;
use crate::router::{Router, RouterError};
use crate::transport::devices::Devices;
use plover_proto::{ConversationKind, ErrorCode};

/// The socket's name in the data directory.
pub const SOCKET: &str = "admin.sock";

/// The audit log's name in the data directory.
pub const AUDIT: &str = "admin.log";

/// The longest request line read.
const MAX_REQUEST: u64 = 64 * 1024;

/// What an operator asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every user, with their devices and whether they are online.
    Users,
    /// A user's devices, with their cursors and which are connected to this node.
    Devices {
        /// The user.
        user: String,
    },
    /// Closes a user's connections (or one device's), on every node.
    Disconnect {
        /// The user.
        user: String,
        /// One device, or all of them.
        #[serde(default)]
        device: Option<String>,
    },
    /// Forgets a device: its cursor and pushers go, its connection closes.
    RemoveDevice {
        /// The user.
        user: String,
        /// The device.
        device: String,
    },
    /// Removes an account's traces: its tokens are revoked, its connections closed, its
    /// groups left, the bodies of its messages erased (tombstones keep the seqs), its
    /// devices, cursors, pushers, blocks, requests and sync log removed.
    DeleteUser {
        /// The user.
        user: String,
    },
    /// Refuses every token of a user (or of one device) issued until now, and closes their
    /// connections, on every node.
    Revoke {
        /// The user.
        user: String,
        /// One device, or all of them.
        #[serde(default)]
        device: Option<String>,
    },
}

impl Request {
    fn user(&self) -> Option<&str> {
        match self {
            Self::Users => None,
            Self::Devices { user }
            | Self::Disconnect { user, .. }
            | Self::RemoveDevice { user, .. }
            | Self::DeleteUser { user }
            | Self::Revoke { user, .. } => Some(user),
        }
    }

    fn device(&self) -> Option<&str> {
        match self {
            Self::Disconnect { device, .. } | Self::Revoke { device, .. } => device.as_deref(),
            Self::RemoveDevice { device, .. } => Some(device),
            _ => None,
        }
    }
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request is malformed or names a bad user or device.
    #[error("{0}")]
    Invalid(String),
    /// No such user.
    #[error("no user {0:?}")]
    UnknownUser(String),
    /// The store or the router failed.
    #[error(transparent)]
    Router(#[from] RouterError),
    /// The server refused the request (its answer's `error`).
    #[error("{0}")]
    Refused(String),
    /// The socket could not be set up, or reached.
    #[error("admin socket {path}")]
    Socket {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The admin channel of one server.
pub struct Admin {
    router: Router,
    devices: Arc<Devices>,
    data: PathBuf,
    listener: UnixListener,
    /// The socket's owner: the only user (besides root) let in.
    owner: u32,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("data", &self.data).finish()
    }
}

impl Admin {
    /// Binds `<data>/admin.sock`, owner-only. A socket file left by a server that is gone is
    /// replaced (the store's lock already keeps a second server off this data directory).
    pub(crate) fn bind(
        data: &Path,
        router: Router,
        devices: Arc<Devices>,
    ) -> Result<Self, AdminError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let path = data.join(SOCKET);
        let fail = |source| AdminError::Socket {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        let listener = UnixListener::bind(&path).map_err(fail)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        let owner = std::fs::metadata(&path).map_err(fail)?.uid();
        Ok(Self {
            router,
            devices,
            data: data.to_owned(),
            listener,
            owner,
        })
    }

    /// Serves requests until dropped (aborted).
    pub(crate) async fn serve(self: Arc<Self>) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(self.clone().connection(stream));
                }
                Err(e) => {
                    warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Removes the socket file (at a clean stop).
    pub(crate) fn remove_socket(&self) {
        let _ = std::fs::remove_file(self.data.join(SOCKET));
    }

    async fn connection(self: Arc<Self>, stream: UnixStream) {
        let (uid, pid) = match stream.peer_cred() {
            Ok(cred) => (cred.uid(), cred.pid().unwrap_or(0)),
            Err(e) => {
                warn!(error = %e, "admin socket: no peer credentials; refused");
                return;
            }
        };
        let (read, mut write) = stream.into_split();
        let answer = if uid != self.owner && uid != 0 {
            warn!(target: "plover::admin", uid, pid, "refused: not the server's user");
            json!({"ok": false, "error": "only the server's own user (or root) may use this socket"})
        } else {
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(MAX_REQUEST));
            match reader.read_line(&mut line).await {
                Ok(_) => self.answer(&line, uid, pid).await,
                Err(e) => json!({"ok": false, "error": format!("unreadable request: {e}")}),
            }
        };
        let mut text = answer.to_string();
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
        let _ = write.shutdown().await;
    }

    async fn answer(&self, line: &str, uid: u32, pid: i32) -> Value {
        let request: Request = match serde_json::from_str(line.trim()) {
            Ok(r) => r,
            Err(e) => return json!({"ok": false, "error": format!("not a request: {e}")}),
        };
        let result = self.run(&request).await;
        let outcome = match &result {
            Ok(_) => "done".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        info!(
            target: "plover::admin",
            uid,
            pid,
            request = ?request,
            outcome,
            "admin action"
        );
        self.audit(&request, uid, pid, &outcome).await;
        match result {
            Ok(Value::Object(mut map)) => {
                map.insert("ok".into(), Value::Bool(true));
                Value::Object(map)
            }
            Ok(other) => json!({"ok": true, "result": other}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        }
    }

    /// Appends one line to `<data>/admin.log`: when, who, what, and how it went.
    async fn audit(&self, request: &Request, uid: u32, pid: i32, outcome: &str) {
        let line = json!({
            "at_ms": crate::clock::now_ms(),
            "uid": uid,
            "pid": pid,
            "request": request,
            "outcome": outcome,
        })
        .to_string();
        let path = self.data.join(AUDIT);
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            writeln!(file, "{line}")?;
            file.sync_data()
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            warn!(target: "plover::admin", "cannot append to the admin audit log");
        }
    }

    async fn run(&self, request: &Request) -> Result<Value, AdminError> {
        if let Some(user) = request.user() {
            if !valid_name(user) {
                return Err(AdminError::Invalid(format!(
                    "{user:?} is not a user name (1-64 characters of A-Z a-z 0-9 . _ -)"
                )));
            }
            let exists = {
                let user = user.to_owned();
                self.router
                    .with_store(move |store, _| Ok(store.user_exists(&user)?))
                    .await?
            };
            if !exists {
                return Err(AdminError::UnknownUser(user.to_owned()));
            }
        }
        if let Some(device) = request.device()
            && !valid_name(device)
        {
            return Err(AdminError::Invalid(format!(
                "{device:?} is not a device name (1-64 characters of A-Z a-z 0-9 . _ -)"
            )));
        }
        let now_ms = crate::clock::now_ms();
        match request {
            Request::Users => self.users().await,
            Request::Devices { user } => self.devices(user).await,
            Request::Disconnect { user, device } => {
                let closed = self
                    .close(
                        user,
                        device.as_deref(),
                        ErrorCode::DISCONNECTED,
                        None,
                        now_ms,
                    )
                    .await?;
                Ok(json!({"closed": closed}))
            }
            Request::Revoke { user, device } => {
                let at = now_ms / 1000;
                let (u, d) = (user.clone(), device.clone());
                let revoke: SideWrite = Box::new(move |b| b.put_revocation(&u, d.as_deref(), at));
                let closed = self
                    .close(
                        user,
                        device.as_deref(),
                        ErrorCode::TOKEN_REVOKED,
                        Some(revoke),
                        now_ms,
                    )
                    .await?;
                Ok(json!({"revoked_at": at, "closed": closed}))
            }
            Request::RemoveDevice { user, device } => {
                let pushers = {
                    let (u, d) = (user.clone(), device.clone());
                    self.router
                        .with_store(move |store, _| Ok(store.pusher_keys_of_device(&u, &d)?))
                        .await?
                };
                let removed = pushers.len();
                let (u, d) = (user.clone(), device.clone());
                let forget: SideWrite = Box::new(move |b| b.remove_device(&u, &d, pushers));
                let closed = self
                    .close(
                        user,
                        Some(device),
                        ErrorCode::DISCONNECTED,
                        Some(forget),
                        now_ms,
                    )
                    .await?;
                self.router.refresh_pushers(user).await?;
                Ok(json!({"closed": closed, "pushers_removed": removed}))
            }
            Request::DeleteUser { user } => self.delete_user(user, now_ms).await,
        }
    }

    /// Writes `write` with a kick for `user` (or `device`) through the router, and closes
    /// the matching connections of this node; returns how many it closed here.
    async fn close(
        &self,
        user: &str,
        device: Option<&str>,
        code: ErrorCode,
        write: Option<SideWrite>,
        now_ms: u64,
    ) -> Result<usize, AdminError> {
        let (u, d) = (user.to_owned(), device.map(str::to_owned));
        let kick: SideWrite = Box::new(move |b| {
            if let Some(write) = write {
                write(b);
            }
            b.put_kick(&u, d.as_deref(), code, now_ms);
        });
        // Through the log in a cluster: every other node closes its own as it applies it.
        self.router
            .with_store(move |_, writer| Ok(writer.write(kick)?))
            .await?;
        let reason = match code {
            ErrorCode::TOKEN_REVOKED => "this token was revoked",
            _ => "an operator closed this connection",
        };
        Ok(self.devices.close(user, device, code, reason))
    }

    async fn users(&self) -> Result<Value, AdminError> {
        let presence = self.router.presence().clone();
        let users = self
            .router
            .with_store(move |store, _| {
                let mut out = Vec::new();
                for user in store.users()? {
                    let devices = store.devices_of(&user)?.len();
                    let last_seen = store.last_seen(&user)?.unwrap_or(0);
                    out.push(json!({
                        "user": user,
                        "devices": devices,
                        "online": presence.is_online(&user),
                        "last_seen": last_seen,
                    }));
                }
                Ok(out)
            })
            .await?;
        Ok(json!({"users": users}))
    }

    async fn devices(&self, user: &str) -> Result<Value, AdminError> {
        let connected = self.devices.connected(user);
        let u = user.to_owned();
        let devices = self
            .router
            .with_store(move |store, _| Ok(store.devices_of(&u)?))
            .await?;
        let mut out: Vec<Value> = devices
            .iter()
            .map(|(device, cursor)| {
                json!({
                    "device": device,
                    "cursor": cursor,
                    "connected": connected.contains(device),
                })
            })
            .collect();
        // Connected and not yet acknowledging anything: listed too.
        for device in connected
            .iter()
            .filter(|d| !devices.iter().any(|(x, _)| x == *d))
        {
            out.push(json!({"device": device, "cursor": 0, "connected": true}));
        }
        Ok(json!({"user": user, "devices": out}))
    }

    /// `delete-user`: in this order, so that the user cannot come back midway: tokens
    /// revoked and connections closed; groups left (their history stays, one for all);
    /// the bodies of the user's messages erased everywhere (tombstones keep the seqs; the
    /// files they referenced lose that reference); then the account's own records.
    async fn delete_user(&self, user: &str, now_ms: u64) -> Result<Value, AdminError> {
        let at = now_ms / 1000;
        let u = user.to_owned();
        let revoke: SideWrite = Box::new(move |b| b.put_revocation(&u, None, at));
        let closed = self
            .close(user, None, ErrorCode::DISCONNECTED, Some(revoke), now_ms)
            .await?;
        // Groups: left like the user would (the last admin hands the role on).
        let u = user.to_owned();
        let conversations = self
            .router
            .with_store(move |store, _| {
                let mut out = Vec::new();
                for conv in store.conversations_of(&u)? {
                    if let Some(record) = store.conversation(conv)? {
                        out.push((conv, record.kind));
                    }
                }
                Ok(out)
            })
            .await?;
        let mut left = 0usize;
        for (conv, kind) in &conversations {
            if *kind == ConversationKind::Group {
                self.router.leave_for_operator(*conv, user).await?;
                left = left.saturating_add(1);
            }
        }
        // Bodies, in every conversation the user was ever in (direct ones stay, with
        // tombstones, for the other side).
        let mut erased = 0u64;
        for (conv, _) in &conversations {
            erased = erased.saturating_add(self.erase_bodies(*conv, user).await?);
        }
        // The account's records.
        let u = user.to_owned();
        let removed = self
            .router
            .with_store(move |store, writer| {
                let forget = store.account_keys(&u)?;
                let count = forget.len();
                writer.write(Box::new(move |b| b.forget_account(forget)))?;
                Ok(count)
            })
            .await?;
        self.router.refresh_pushers(user).await?;
        Ok(json!({
            "closed": closed,
            "groups_left": left,
            "bodies_erased": erased,
            "records_removed": removed,
        }))
    }

    /// Turns every message of `user` in `conv` that still has a body into its tombstone,
    /// a page at a time; returns how many.
    async fn erase_bodies(&self, conv: u64, user: &str) -> Result<u64, AdminError> {
        let mut next = 1u64;
        let mut erased = 0u64;
        loop {
            let u = user.to_owned();
            let (count, last, done) = self
                .router
                .with_store(move |store, writer| {
                    let page = store.messages_from(conv, next, 512)?;
                    let done = page.len() < 512;
                    let last = page.last().map_or(next, |m| m.seq);
                    let mine: Vec<_> = page
                        .into_iter()
                        .filter(|m| m.from == u && crate::persist::has_body(m))
                        .collect();
                    let count = mine.len() as u64;
                    if !mine.is_empty() {
                        writer.write(Box::new(move |b| {
                            for m in &mine {
                                b.put_message(&crate::persist::tombstone(m));
                                if let Err(e) = b.drop_refs(m.conversation, m.seq) {
                                    warn!(error = %e, "a deleted user's message keeps its files' references");
                                }
                            }
                        }))?;
                    }
                    Ok((count, last, done))
                })
                .await?;
            erased = erased.saturating_add(count);
            if done {
                return Ok(erased);
            }
            next = last.saturating_add(1);
        }
    }
}

/// Sends one request to the server whose data directory is `data` and returns its answer
/// (blocking: the CLI's side of the channel). The answer's `ok` is checked: a refusal is
/// [`AdminError::Refused`] with the server's explanation.
pub fn call(data: &Path, request: &Request, timeout: Duration) -> Result<Value, AdminError> {
    use std::io::{BufRead, Write};
    let path = data.join(SOCKET);
    let fail = |source: std::io::Error| AdminError::Socket {
        path: path.clone(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        fail(std::io::Error::new(
            e.kind(),
            format!("{e} (is a server running on this data directory?)"),
        ))
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    let mut line =
        serde_json::to_string(request).map_err(|e| AdminError::Invalid(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(fail)?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(fail)?;
    let value: Value = serde_json::from_str(answer.trim())
        .map_err(|e| AdminError::Invalid(format!("the server's answer is not JSON: {e}")))?;
    if value.get("ok") == Some(&Value::Bool(true)) {
        Ok(value)
    } else {
        Err(AdminError::Refused(
            value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("refused")
                .to_owned(),
        ))
    }
}
