//! The staging area: one file per unfinished upload, on this node's disk, named by the
//! uploader and the object. Nothing leaves it before the whole object is there and hashes
//! to its id; an upload cut off resumes from the file's length.

use bytes::{Bytes, BytesMut};
use plover_proto::ObjectId;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::MediaError;

/// Bytes read from a staged file at a time when hashing it.
const READ: usize = 256 * 1024;

/// The staging directory.
#[derive(Debug)]
pub(super) struct Staging {
    dir: PathBuf,
}

/// An upload in the staging area: its file, open for appending, and the hash of what it
/// holds so far.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    file: tokio::fs::File,
    object: ObjectId,
    size: u64,
    have: u64,
    hash: Sha256,
}

impl Staging {
    pub(super) fn open(dir: &Path) -> Result<Self, MediaError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| MediaError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// `user`'s upload of `object`, `size` bytes: what an earlier attempt left (hashed
    /// again), or a new file.
    pub(super) async fn upload(
        &self,
        user: &str,
        object: ObjectId,
        size: u64,
    ) -> Result<Staged, MediaError> {
        // The user's name hashed: a name may hold anything, a file name may not.
        let who = Sha256::digest(user.as_bytes());
        let who: String = who.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let path = self.dir.join(format!("{}-{who}", object.hex()));
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|e| MediaError::Storage(format!("cannot open {}: {e}", path.display())))?;
        let mut have = file.metadata().await.map_err(MediaError::storage)?.len();
        if have > size {
            // Left by an attempt that declared another size: start again.
            file.set_len(0).await.map_err(MediaError::storage)?;
            have = 0;
        }
        let mut hash = Sha256::new();
        if have > 0 {
            let mut reader = tokio::fs::File::open(&path)
                .await
                .map_err(MediaError::storage)?;
            let mut buf = vec![0u8; READ];
            let mut left = have;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(READ).min(READ);
                let n = reader
                    .read(buf.get_mut(..want).unwrap_or_default())
                    .await
                    .map_err(MediaError::storage)?;
                if n == 0 {
                    break;
                }
                hash.update(buf.get(..n).unwrap_or_default());
                left = left.saturating_sub(n as u64);
            }
            debug!(object = %object, have, "resuming an upload");
        }
        Ok(Staged {
            path,
            file,
            object,
            size,
            have,
            hash,
        })
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

    /// Appends bytes that arrived; refuses any beyond the declared size.
    pub async fn append(&mut self, bytes: &[u8]) -> Result<(), MediaError> {
        let after = self.have.saturating_add(bytes.len() as u64);
        if after > self.size {
            return Err(MediaError::Invalid(format!(
                "more bytes than the {} declared",
                self.size
            )));
        }
        self.file
            .write_all(bytes)
            .await
            .map_err(MediaError::storage)?;
        self.hash.update(bytes);
        self.have = after;
        Ok(())
    }

    /// Whether every declared byte is here.
    pub fn complete(&self) -> bool {
        self.have == self.size
    }

    /// Checks a complete upload against its id and makes it durable. A mismatch removes the
    /// staged bytes: the client must upload again from the start.
    pub async fn finish(mut self) -> Result<Self, MediaError> {
        let hash: [u8; 32] = self.hash.clone().finalize().into();
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
        self.file.flush().await.map_err(MediaError::storage)?;
        self.file.sync_data().await.map_err(MediaError::storage)?;
        Ok(self)
    }

    /// A reader of the staged bytes from the start.
    pub(super) async fn reader(&self) -> Result<tokio::fs::File, MediaError> {
        tokio::fs::File::open(&self.path)
            .await
            .map_err(MediaError::storage)
    }

    /// Removes the staged bytes.
    pub(super) async fn remove(self) {
        drop(self.file);
        if let Err(e) = tokio::fs::remove_file(&self.path).await {
            warn!(path = %self.path.display(), error = %e, "cannot remove a staged upload");
        }
    }
}

/// The next `max` bytes of `file` (fewer at its end; none past it).
pub(super) async fn read_part(file: &mut tokio::fs::File, max: u64) -> Result<Bytes, MediaError> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let mut buf = BytesMut::with_capacity(max.min(READ));
    while buf.len() < max {
        let want = max.saturating_sub(buf.len()).min(READ);
        let start = buf.len();
        buf.resize(start.saturating_add(want), 0);
        let n = file
            .read(buf.get_mut(start..).unwrap_or_default())
            .await
            .map_err(MediaError::storage)?;
        buf.truncate(start.saturating_add(n));
        if n == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}
