//! Files: encrypted here with a fresh key, uploaded on a stream of their own, resumable; and
//! downloaded, checked against their id and decrypted.
//!
//! The format is PROTOCOL.md's "Content": ChaCha20-Poly1305 over chunks of
//! [`CHUNK`] plaintext bytes, each sealed with a nonce of its index and a last-chunk flag,
//! so that chunks cannot be reordered, dropped or cut off unnoticed. The server stores the
//! ciphertext only; its id is the ciphertext's SHA-256.

use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::ClientError;
use crate::answers::{closed_reason, refused, stream_failure, unexpected};
use plover_proto::content::Attachment;
use plover_proto::{ClientFrame, ObjectId, ServerFrame};
use plover_quic::{FrameReader, FrameWriter};

/// Plaintext bytes per encrypted chunk: 64 KiB.
pub const CHUNK: u32 = 64 * 1024;

/// The AEAD tag each chunk adds.
const TAG: u64 = 16;

/// File reads and writes go through buffers of this size (one blocking hop per MiB).
const IO_BUFFER: usize = 1024 * 1024;

/// The nonce of chunk `index`: the index (8 bytes, big-endian), three zero bytes, and 1 on
/// the last chunk.
fn nonce(index: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::from(n)
}

/// Chunks of a file of `plain` bytes: whole chunks, then one shorter (possibly empty).
fn chunks(plain: u64, chunk: u32) -> u64 {
    plain / u64::from(chunk) + 1
}

/// The ciphertext's size for a file of `plain` bytes.
pub fn ciphertext_size(plain: u64, chunk: u32) -> u64 {
    plain + TAG * chunks(plain, chunk)
}

/// A file's ciphertext, produced chunk by chunk from the file (it is never held whole).
struct Sealer {
    file: tokio::io::BufReader<tokio::fs::File>,
    cipher: ChaCha20Poly1305,
    chunk: u32,
    plain: u64,
    index: u64,
}

impl Sealer {
    /// The ciphertext from chunk `index` on.
    async fn open(
        path: &Path,
        key: &[u8; 32],
        chunk: u32,
        plain: u64,
        index: u64,
    ) -> Result<Self, ClientError> {
        let mut file = tokio::fs::File::open(path).await.map_err(io)?;
        file.seek(std::io::SeekFrom::Start(index * u64::from(chunk)))
            .await
            .map_err(io)?;
        Ok(Self {
            file: tokio::io::BufReader::with_capacity(IO_BUFFER, file),
            cipher: ChaCha20Poly1305::new(&Key::from(*key)),
            chunk,
            plain,
            index,
        })
    }

    /// The next sealed chunk, or `None` after the last.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        let total = chunks(self.plain, self.chunk);
        if self.index >= total {
            return Ok(None);
        }
        let last = self.index + 1 == total;
        let want = if last {
            self.plain - (total - 1) * u64::from(self.chunk)
        } else {
            u64::from(self.chunk)
        };
        let mut buf = vec![0u8; want as usize];
        self.file.read_exact(&mut buf).await.map_err(|e| {
            ClientError::Protocol(format!("the file changed while it was being sent: {e}"))
        })?;
        let sealed = self
            .cipher
            .encrypt(&nonce(self.index, last), buf.as_slice())
            .map_err(|_| ClientError::Protocol("cannot encrypt a chunk".into()))?;
        self.index += 1;
        Ok(Some(sealed))
    }
}

fn io(e: std::io::Error) -> ClientError {
    ClientError::Protocol(format!("file: {e}"))
}

/// A file encrypted and ready to upload: its key and id (the first pass over it).
#[derive(Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub plain_size: u64,
    /// The key.
    pub key: [u8; 32],
    /// The ciphertext's id and size.
    pub object: ObjectId,
    /// The ciphertext's size.
    pub size: u64,
}

impl Prepared {
    /// The pointer a message carries to this file once it is uploaded: its object, size, key
    /// and the names given here. Add `dimensions`, `thumbnail` and `caption` as the file
    /// has them.
    pub fn attachment(&self, name: impl Into<String>, media_type: impl Into<String>) -> Attachment {
        Attachment {
            object: self.object,
            size: self.size,
            key: self.key,
            chunk: CHUNK,
            plain_size: self.plain_size,
            media_type: media_type.into(),
            name: name.into(),
            dimensions: None,
            thumbnail: None,
            caption: None,
        }
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("path", &self.path)
            .field("object", &self.object)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Encrypts `path` with a fresh random key once, to learn the ciphertext's id and size (the
/// upload encrypts it again, from where the server asks: the same key gives the same bytes).
pub async fn prepare(path: &Path) -> Result<Prepared, ClientError> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)
        .map_err(|e| ClientError::Protocol(format!("no randomness for a file key: {e}")))?;
    let path = path.to_owned();
    // A pass over the whole file, CPU-bound: on a blocking thread, never the caller's
    // runtime (an app's, whose other tasks would wait behind it).
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let file = std::fs::File::open(&path).map_err(io)?;
        let plain_size = file.metadata().map_err(io)?.len();
        let mut file = std::io::BufReader::with_capacity(IO_BUFFER, file);
        let cipher = ChaCha20Poly1305::new(&Key::from(key));
        let mut hash = Sha256::new();
        let total = chunks(plain_size, CHUNK);
        let mut buf = vec![0u8; CHUNK as usize];
        for index in 0..total {
            let last = index + 1 == total;
            let want = if last {
                plain_size - (total - 1) * u64::from(CHUNK)
            } else {
                u64::from(CHUNK)
            };
            let chunk = buf.get_mut(..want as usize).unwrap_or_default();
            file.read_exact(chunk).map_err(|e| {
                ClientError::Protocol(format!("the file changed while it was read: {e}"))
            })?;
            let sealed = cipher
                .encrypt(&nonce(index, last), &*chunk)
                .map_err(|_| ClientError::Protocol("cannot encrypt a chunk".into()))?;
            hash.update(&sealed);
        }
        Ok(Prepared {
            path,
            plain_size,
            key,
            object: ObjectId(hash.finalize().into()),
            size: ciphertext_size(plain_size, CHUNK),
        })
    })
    .await
    .map_err(|e| ClientError::Protocol(format!("preparing the file: {e}")))?
}

/// Uploads a prepared file on a new stream of `conn`, from the offset the server already
/// holds. `progress` hears the bytes the server holds as they grow. A cut connection leaves
/// the server holding what arrived: calling this again (on a new connection) resumes.
pub(crate) async fn upload(
    conn: &quinn::Connection,
    max_frame: u32,
    file: &Prepared,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<ObjectId, ClientError> {
    let (send, recv) = conn.open_bi().await.map_err(ClientError::Lost)?;
    let mut writer = FrameWriter::new(send, max_frame);
    let mut reader = FrameReader::new(recv, max_frame);
    writer
        .send(&ClientFrame::Upload {
            size: file.size,
            object: file.object,
        })
        .await
        .map_err(|e| stream_failure(conn, e))?;
    let offset = match reader.next().await.map_err(|e| stream_failure(conn, e))? {
        Some(ServerFrame::UploadReady { offset }) => offset,
        Some(ServerFrame::Error { code, message, .. }) => return Err(refused(code, message)),
        Some(other) => return Err(unexpected("UploadReady", &other)),
        None => return Err(closed_reason(conn)),
    };
    progress(offset);
    let sealed_chunk = u64::from(CHUNK) + TAG;
    let mut sealer = Sealer::open(
        &file.path,
        &file.key,
        CHUNK,
        file.plain_size,
        offset / sealed_chunk,
    )
    .await?;
    let mut skip = (offset % sealed_chunk) as usize;
    let mut sent = offset;
    while let Some(sealed) = sealer.next().await? {
        let bytes = Bytes::from(sealed).slice(skip..);
        skip = 0;
        sent += bytes.len() as u64;
        writer
            .send_raw(bytes)
            .await
            .map_err(|e| stream_failure(conn, e))?;
        progress(sent);
    }
    writer.finish(std::time::Duration::ZERO).await;
    match reader.next().await.map_err(|e| stream_failure(conn, e))? {
        Some(ServerFrame::Uploaded { object }) => Ok(object),
        Some(ServerFrame::Error { code, message, .. }) => Err(refused(code, message)),
        Some(other) => Err(unexpected("Uploaded", &other)),
        None => Err(closed_reason(conn)),
    }
}

/// Where an object is read through: as its uploader, or through a message that
/// references it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Through {
    /// The conversation (0: as the uploader).
    pub conversation: u64,
    /// The message's seq.
    pub seq: u64,
}

/// Downloads an attachment's ciphertext into `partial` (appending to what an earlier,
/// cut-off attempt left there), checks it against the id, and decrypts it into `out`;
/// `partial` goes once `out` is written. `progress` hears the ciphertext bytes held.
pub(crate) async fn download(
    conn: &quinn::Connection,
    max_frame: u32,
    attachment: &Attachment,
    through: Through,
    out: &Path,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), ClientError> {
    let partial = partial_path(out);
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)
        .await
        .map_err(io)?;
    let mut have = file.metadata().await.map_err(io)?.len();
    if have > attachment.size {
        file.set_len(0).await.map_err(io)?;
        have = 0;
    }
    let mut file = tokio::io::BufWriter::with_capacity(IO_BUFFER, file);
    progress(have);
    if have < attachment.size {
        let (send, recv) = conn.open_bi().await.map_err(ClientError::Lost)?;
        let mut writer = FrameWriter::new(send, max_frame);
        let mut reader = FrameReader::new(recv, max_frame);
        writer
            .send(&ClientFrame::Download {
                object: attachment.object,
                conversation: through.conversation,
                seq: through.seq,
                offset: have,
                length: 0,
            })
            .await
            .map_err(|e| stream_failure(conn, e))?;
        writer.finish(std::time::Duration::ZERO).await;
        let length = match reader.next().await.map_err(|e| stream_failure(conn, e))? {
            Some(ServerFrame::DownloadReady { length, .. }) => length,
            Some(ServerFrame::Error { code, message, .. }) => {
                return Err(refused(code, message));
            }
            Some(other) => return Err(unexpected("DownloadReady", &other)),
            None => return Err(closed_reason(conn)),
        };
        let (mut recv, early) = reader.into_inner();
        let mut got = 0u64;
        if !early.is_empty() {
            file.write_all(&early).await.map_err(io)?;
            got += early.len() as u64;
            progress(have + got);
        }
        while got < length {
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => {
                    file.write_all(&chunk.bytes).await.map_err(io)?;
                    got += chunk.bytes.len() as u64;
                    progress(have + got);
                }
                Ok(None) => break,
                Err(e) => {
                    file.flush().await.map_err(io)?;
                    return Err(ClientError::Stream(std::sync::Arc::new(
                        plover_quic::StreamError::Read(e),
                    )));
                }
            }
        }
        file.flush().await.map_err(io)?;
        if got < length {
            return Err(ClientError::Closed("download stream"));
        }
    }
    drop(file);
    decrypt(&partial, attachment, out).await?;
    let _ = tokio::fs::remove_file(&partial).await;
    Ok(())
}

/// Where a download keeps its ciphertext until it is complete.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".plover-part");
    PathBuf::from(name)
}

/// Checks the ciphertext in `from` against the attachment's id and decrypts it into `out`:
/// two passes over the file, CPU-bound, on a blocking thread.
async fn decrypt(from: &Path, attachment: &Attachment, out: &Path) -> Result<(), ClientError> {
    let (from, attachment, out) = (from.to_owned(), attachment.clone(), out.to_owned());
    tokio::task::spawn_blocking(move || decrypt_blocking(&from, &attachment, &out))
        .await
        .map_err(|e| ClientError::Protocol(format!("decrypting the file: {e}")))?
}

fn decrypt_blocking(from: &Path, attachment: &Attachment, out: &Path) -> Result<(), ClientError> {
    use std::io::{Read, Write};
    let bad = |what: &str| ClientError::Protocol(format!("the downloaded file {what}"));
    let mut source = std::fs::File::open(from).map_err(io)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; IO_BUFFER];
    loop {
        let n = source.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hash.update(buf.get(..n).unwrap_or_default());
    }
    if ObjectId(hash.finalize().into()) != attachment.object {
        // Start again next time rather than resume onto bytes that are wrong.
        let _ = std::fs::remove_file(from);
        return Err(bad(
            "does not match its id (it was removed; fetch it again)",
        ));
    }
    if attachment.chunk == 0
        || ciphertext_size(attachment.plain_size, attachment.chunk) != attachment.size
    {
        return Err(bad("has sizes that do not agree"));
    }
    let cipher = ChaCha20Poly1305::new(&Key::from(attachment.key));
    let mut source =
        std::io::BufReader::with_capacity(IO_BUFFER, std::fs::File::open(from).map_err(io)?);
    let temp = {
        let mut name = out.as_os_str().to_owned();
        name.push(".plover-tmp");
        PathBuf::from(name)
    };
    let mut sink =
        std::io::BufWriter::with_capacity(IO_BUFFER, std::fs::File::create(&temp).map_err(io)?);
    let total = chunks(attachment.plain_size, attachment.chunk);
    let sealed_chunk = u64::from(attachment.chunk) + TAG;
    for index in 0..total {
        let last = index + 1 == total;
        let len = if last {
            attachment.size - (total - 1) * sealed_chunk
        } else {
            sealed_chunk
        };
        let mut sealed = vec![0u8; len as usize];
        source.read_exact(&mut sealed).map_err(io)?;
        let plain = cipher
            .decrypt(&nonce(index, last), sealed.as_slice())
            .map_err(|_| bad("does not decrypt with its key"))?;
        sink.write_all(&plain).map_err(io)?;
    }
    sink.flush().map_err(io)?;
    sink.get_ref().sync_all().map_err(io)?;
    drop(sink);
    std::fs::rename(&temp, out).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_round_trips_and_a_flipped_bit_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        for size in [0usize, 1, CHUNK as usize, CHUNK as usize * 2 + 5] {
            let path = dir.path().join(format!("f{size}"));
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            tokio::fs::write(&path, &data).await.expect("write");
            let prepared = prepare(&path).await.expect("prepare");
            assert_eq!(prepared.size, ciphertext_size(size as u64, CHUNK));
            // The ciphertext, as an upload from offset 0 would send it.
            let mut sealer = Sealer::open(&path, &prepared.key, CHUNK, size as u64, 0)
                .await
                .expect("sealer");
            let mut cipher = Vec::new();
            while let Some(c) = sealer.next().await.expect("chunk") {
                cipher.extend(c);
            }
            assert_eq!(cipher.len() as u64, prepared.size);
            if size > 16 {
                assert!(
                    !cipher.windows(16).any(|w| w == &data[..16]),
                    "plaintext in the ciphertext"
                );
            }
            let attachment = prepared.attachment("f", "application/octet-stream");
            let stored = dir.path().join("stored");
            tokio::fs::write(&stored, &cipher).await.expect("write");
            let out = dir.path().join("out");
            decrypt(&stored, &attachment, &out).await.expect("decrypt");
            assert_eq!(tokio::fs::read(&out).await.expect("read"), data);
            // One flipped bit: refused (the id no longer matches).
            let mut damaged = cipher.clone();
            damaged[0] ^= 1;
            tokio::fs::write(&stored, &damaged).await.expect("write");
            assert!(decrypt(&stored, &attachment, &out).await.is_err());
        }
    }
}
