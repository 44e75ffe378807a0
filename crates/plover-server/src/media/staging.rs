//! The staging area: one file per unfinished upload, on this node's disk, named by the
//! uploader and the object. Nothing leaves it before the whole object is there and hashes
//! to its id; an upload cut off resumes from the file's length.

use bytes::{Bytes, BytesMut};
use plover_proto::ObjectId;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

use super::MediaError;

/// Bytes read from a staged file at a time when hashing it.
const READ: usize = 256 * 1024;

/// Bytes that arrived gathered before they are hashed and written, on a blocking thread:
/// one hop off the runtime per MiB, not per QUIC read.
const WRITE: usize = 1024 * 1024;

/// The part of a staged file's name that names its uploader: the name hashed (a user name
/// may hold anything a file name may not).
fn uploader(user: &str) -> String {
    Sha256::digest(user.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The staging directory.
#[derive(Debug)]
pub(super) struct Staging {
    dir: PathBuf,
    /// Where staged bytes are hashed, written and read: threads below the message path.
    pool: Arc<super::pool::LowPool>,
    /// The staged files an upload is writing now: one writer per file.
    active: Arc<Active>,
}

/// Staged files being written, and a wake-up when one is let go.
#[derive(Debug, Default)]
struct Active {
    paths: std::sync::Mutex<HashSet<PathBuf>>,
    released: tokio::sync::Notify,
}

/// How long a new attempt at an upload waits for the previous one (whose connection was
/// cut, and whose server side has not noticed yet) to let its file go.
const TAKEOVER: Duration = Duration::from_secs(10);

/// A staged file held by one upload; let go when dropped.
#[derive(Debug)]
struct Held {
    path: PathBuf,
    active: Arc<Active>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.active
            .paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.path);
        self.active.released.notify_waiters();
    }
}

/// An upload in the staging area: its file, open for appending, and the hash of what it
/// holds so far.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    pool: Arc<super::pool::LowPool>,
    /// The file, the hash of what it holds, and the hold that keeps the file this upload's
    /// alone; `None` only while a write is under way on a blocking thread (and for good if
    /// that thread failed). The hold travels with the file: a write still running after its
    /// upload was dropped (its connection gone) keeps the file until it is done.
    state: Option<(std::fs::File, Sha256, Held)>,
    /// Bytes arrived and not written yet (at most [`WRITE`] and a read).
    pending: BytesMut,
    object: ObjectId,
    size: u64,
    /// Bytes written and pending: where an upload would resume once they are written.
    have: u64,
}

impl Staging {
    pub(super) fn open(dir: &Path) -> Result<Self, MediaError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| MediaError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_owned(),
            pool: Arc::new(super::pool::LowPool::start()),
            active: Arc::default(),
        })
    }

    /// Takes `path` for one upload, waiting (up to [`TAKEOVER`]) while another holds it.
    async fn hold(&self, path: &Path) -> Result<Held, MediaError> {
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(TAKEOVER).unwrap_or(now);
        loop {
            let released = self.active.released.notified();
            {
                let mut paths = self.active.paths.lock().unwrap_or_else(|p| p.into_inner());
                if paths.insert(path.to_owned()) {
                    return Ok(Held {
                        path: path.to_owned(),
                        active: self.active.clone(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(MediaError::Limit(
                    "an upload of this object by this user is already under way; try again \
                     once it ends"
                        .into(),
                ));
            }
        }
    }

    /// `user`'s upload of `object`, `size` bytes: what an earlier attempt left (hashed
    /// again), or a new file.
    pub(super) async fn upload(
        &self,
        user: &str,
        object: ObjectId,
        size: u64,
    ) -> Result<Staged, MediaError> {
        let path = self
            .dir
            .join(format!("{}-{}", object.hex(), uploader(user)));
        let held = self.hold(&path).await?;
        let opened = path.clone();
        // Opening, and hashing what an earlier attempt left, off the runtime.
        let (file, hash, have) = self
            .pool
            .run(move || {
                use std::io::Read;
                let path = opened;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .read(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let mut have = file.metadata().map_err(|e| e.to_string())?.len();
                if have > size {
                    // Left by an attempt that declared another size: start again.
                    file.set_len(0).map_err(|e| e.to_string())?;
                    have = 0;
                }
                let mut hash = Sha256::new();
                let mut reader = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; READ];
                let mut left = have;
                while left > 0 {
                    let want = usize::try_from(left).unwrap_or(READ).min(READ);
                    let n = reader
                        .read(buf.get_mut(..want).unwrap_or_default())
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    hash.update(buf.get(..n).unwrap_or_default());
                    left = left.saturating_sub(n as u64);
                }
                // A file shorter than its length said (it changed meanwhile): resume from what
                // was hashed.
                Ok::<_, String>((file, hash, have.saturating_sub(left)))
            })
            .await?
            .map_err(MediaError::Storage)?;
        if have > 0 {
            debug!(object = %object, have, "resuming an upload");
        }
        Ok(Staged {
            path,
            pool: self.pool.clone(),
            state: Some((file, hash, held)),
            pending: BytesMut::new(),
            object,
            size,
            have,
        })
    }

    /// Bytes `user`'s unfinished uploads hold on this node, but for `object`'s own (the
    /// upload that is starting or resuming).
    pub(super) async fn held_by(&self, user: &str, object: ObjectId) -> u64 {
        let suffix = format!("-{}", uploader(user));
        let own = format!("{}{suffix}", object.hex());
        let Ok(mut entries) = tokio::fs::read_dir(&self.dir).await else {
            return 0;
        };
        let mut held = 0u64;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !name.ends_with(&suffix) || name == own {
                continue;
            }
            if let Ok(meta) = entry.metadata().await {
                held = held.saturating_add(meta.len());
            }
        }
        held
    }

    /// Removes staged files untouched for longer than `after` (uploads nobody resumed).
    pub(super) async fn expire(&self, after: Duration) {
        let Ok(mut entries) = tokio::fs::read_dir(&self.dir).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let old = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > after);
            if old {
                if let Err(e) = tokio::fs::remove_file(entry.path()).await {
                    warn!(path = %entry.path().display(), error = %e, "cannot remove an expired upload");
                } else {
                    debug!(path = %entry.path().display(), "expired upload removed");
                }
            }
        }
    }
}

impl Staged {
    /// The object's id.
    pub fn object(&self) -> ObjectId {
        self.object
    }

    /// Its declared size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The bytes already staged: where the upload resumes.
    pub fn offset(&self) -> u64 {
        self.have
    }

    /// Appends bytes that arrived; refuses any beyond the declared size. They are hashed
    /// and written a MiB at a time, off the runtime.
    pub async fn append(&mut self, bytes: &[u8]) -> Result<(), MediaError> {
        let after = self.have.saturating_add(bytes.len() as u64);
        if after > self.size {
            return Err(MediaError::Invalid(format!(
                "more bytes than the {} declared",
                self.size
            )));
        }
        self.pending.extend_from_slice(bytes);
        self.have = after;
        if self.pending.len() >= WRITE {
            self.write_pending().await?;
        }
        Ok(())
    }

    /// Hashes and writes what is pending, on a blocking thread.
    async fn write_pending(&mut self) -> Result<(), MediaError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = self.pending.split().freeze();
        let Some((mut file, mut hash, held)) = self.state.take() else {
            return Err(MediaError::Storage("an earlier write failed".into()));
        };
        let written = self
            .pool
            .run(move || {
                use std::io::Write;
                hash.update(&bytes);
                file.write_all(&bytes).map(|()| (file, hash, held))
            })
            .await?
            .map_err(MediaError::storage)?;
        self.state = Some(written);
        Ok(())
    }

    /// Writes what is pending (a cut upload keeps every byte that arrived).
    pub async fn flush(&mut self) -> Result<(), MediaError> {
        self.write_pending().await
    }

    /// Whether every declared byte is here.
    pub fn complete(&self) -> bool {
        self.have == self.size
    }

    /// Checks a complete upload against its id. A mismatch removes the staged bytes: the
    /// client must upload again from the start. (The staged file is not fsynced: it is only
    /// read by the commit that follows, and after a crash a resumed upload is checked
    /// against its id again.)
    pub async fn finish(mut self) -> Result<Self, MediaError> {
        self.write_pending().await?;
        let hash: [u8; 32] = match &self.state {
            Some((_, hash, _)) => hash.clone().finalize().into(),
            None => return Err(MediaError::Storage("an earlier write failed".into())),
        };
        if hash != self.object.0 {
            let message = format!(
                "the bytes do not hash to {} (their SHA-256 is {}); upload them again from \
                 the start",
                self.object,
                ObjectId(hash)
            );
            self.remove().await;
            return Err(MediaError::Invalid(message));
        }
        Ok(self)
    }

    /// A reader of the staged bytes from the start.
    pub(super) async fn reader(&self) -> Result<Reader, MediaError> {
        let file = tokio::fs::File::open(&self.path)
            .await
            .map_err(MediaError::storage)?;
        Ok(Reader(Some(file.into_std().await), self.pool.clone()))
    }

    /// Removes the staged bytes.
    pub(super) async fn remove(mut self) {
        // The hold is let go only once the file is gone.
        let held = self.state.take();
        if let Err(e) = tokio::fs::remove_file(&self.path).await {
            warn!(path = %self.path.display(), error = %e, "cannot remove a staged upload");
        }
        drop(held);
    }
}

/// A staged file read from the start, a part at a time, off the runtime.
#[derive(Debug)]
pub(super) struct Reader(Option<std::fs::File>, Arc<super::pool::LowPool>);

impl Reader {
    /// The next `max` bytes (fewer at the end; none past it).
    pub(super) async fn part(&mut self, max: u64) -> Result<Bytes, MediaError> {
        let Some(mut file) = self.0.take() else {
            return Err(MediaError::Storage("an earlier read failed".into()));
        };
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let (file, bytes) = self
            .1
            .run(move || {
                use std::io::Read;
                let mut buf = BytesMut::zeroed(max);
                let mut got = 0usize;
                while got < max {
                    match file.read(buf.get_mut(got..).unwrap_or_default()) {
                        Ok(0) => break,
                        Ok(n) => got = got.saturating_add(n),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(got);
                Ok((file, buf.freeze()))
            })
            .await?
            .map_err(MediaError::storage)?;
        self.0 = Some(file);
        Ok(bytes)
    }
}
