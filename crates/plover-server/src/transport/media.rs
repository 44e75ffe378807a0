//! Upload and download streams: a bidirectional stream whose first frame is `Upload` or
//! `Download` carries one object's bytes, raw, after the answer to that frame
//! (PROTOCOL.md, "Media"). A stream of its own per transfer: a large file never delays a
//! conversation.

use plover_proto::{ErrorCode, ObjectId, ServerFrame};
use plover_quic::{FrameReader, FrameWriter};
use tracing::debug;

use crate::media::{Media, MediaError};

/// Bytes a download writes at a time (one object store read): small enough that the paced
/// stream goes out smoothly, not as a megabyte's burst of packets ahead of everyone's
/// messages on the endpoint's socket.
const DOWNLOAD_PIECE: u64 = 64 * 1024;

/// Bytes asked of quinn per read of an upload.
const UPLOAD_READ: usize = 64 * 1024;

/// Ends the stream with `error` as its last frame.
async fn fail(writer: &mut FrameWriter, error: &MediaError) {
    let _ = writer
        .send(&ServerFrame::error(error.code(), error.to_string()))
        .await;
    writer.finish(super::session::LINGER).await;
}

/// `Upload { size, object }`: answers the offset held, takes the bytes, checks and stores
/// them, answers `Uploaded`.
pub(super) async fn upload(
    media: &Media,
    user: &str,
    reader: FrameReader,
    mut writer: FrameWriter,
    size: u64,
    object: ObjectId,
) {
    let mut staged = match media.begin(user, size, object).await {
        Ok(staged) => staged,
        Err(e) => return fail(&mut writer, &e).await,
    };
    let ready = ServerFrame::UploadReady {
        offset: staged.offset(),
    };
    if writer.send(&ready).await.is_err() {
        return;
    }
    let (mut recv, early) = reader.into_inner();
    // Bytes the client sent with its first frame (it should have waited; they count).
    if !early.is_empty()
        && let Err(e) = staged.append(&early).await
    {
        recv.stop(quinn::VarInt::from(ErrorCode::INVALID_REQUEST.0))
            .ok();
        return fail(&mut writer, &e).await;
    }
    loop {
        match recv.read_chunk(UPLOAD_READ, true).await {
            Ok(Some(chunk)) => {
                if let Err(e) = staged.append(&chunk.bytes).await {
                    recv.stop(quinn::VarInt::from(e.code().0)).ok();
                    return fail(&mut writer, &e).await;
                }
                // `media.upload_rate`: not reading holds the client back (flow control).
                if let Some(until) = media.pace_upload(user, chunk.bytes.len()) {
                    tokio::time::sleep_until(until.into()).await;
                }
            }
            Ok(None) => break,
            // Cut off: what arrived stays staged, and the next `Upload` resumes after it.
            Err(e) => {
                if let Err(e) = staged.flush().await {
                    debug!(%object, error = %e, "cannot keep what arrived");
                }
                debug!(%object, have = staged.offset(), error = %e, "upload cut off");
                return;
            }
        }
    }
    if !staged.complete() {
        let _ = staged.flush().await;
        let e = MediaError::Invalid(format!(
            "the stream ended at {} of {size} bytes; send Upload again to resume",
            staged.offset()
        ));
        return fail(&mut writer, &e).await;
    }
    let stored = match staged.finish().await {
        Ok(staged) => media.commit(user, staged).await,
        Err(e) => Err(e),
    };
    match stored {
        Ok(object) => {
            let _ = writer.send(&ServerFrame::Uploaded { object }).await;
            writer.finish(super::session::LINGER).await;
        }
        Err(e) => fail(&mut writer, &e).await,
    }
}

/// `Download { .. }`: answers `DownloadReady` and the range's bytes, then finishes.
#[allow(clippy::too_many_arguments)]
pub(super) async fn download(
    media: &Media,
    user: &str,
    mut writer: FrameWriter,
    object: ObjectId,
    conversation: u64,
    seq: u64,
    offset: u64,
    length: u64,
) {
    let range = match media
        .authorize(user, object, conversation, seq, offset, length)
        .await
    {
        Ok(range) => range,
        Err(e) => return fail(&mut writer, &e).await,
    };
    let ready = ServerFrame::DownloadReady {
        size: range.size,
        offset: range.offset,
        length: range.length,
    };
    if writer.send(&ready).await.is_err() {
        return;
    }
    let end = range.offset.saturating_add(range.length);
    let mut at = range.offset;
    while at < end {
        let bytes = match media.read(object, at, end, DOWNLOAD_PIECE).await {
            Ok(bytes) => bytes,
            // The store failed midway: the client sees the stream reset with the code, and
            // resumes from what it has.
            Err(e) => {
                debug!(%object, error = %e, "download failed");
                writer.reset(e.code().0);
                return;
            }
        };
        at = at.saturating_add(bytes.len() as u64);
        // `media.download_rate`: one user's downloads together take no more of the server.
        if let Some(until) = media.pace_download(user, bytes.len()) {
            tokio::time::sleep_until(until.into()).await;
        }
        if let Err(e) = writer.send_raw(bytes).await {
            debug!(%object, error = %e, "download cut off");
            return;
        }
    }
    writer.finish(super::session::LINGER).await;
    // The whole object reached its end: under `until_delivered` this member fetched it.
    if conversation != 0
        && range.offset.saturating_add(range.length) == range.size
        && let Err(e) = media.fetched(user, object, conversation, seq).await
    {
        debug!(%object, error = %e, "fetch not recorded");
    }
}
