//! Frames over quinn streams.
//!
//! [`FrameReader`] keeps its buffer in the struct, so a read cancelled by `select!` loses no
//! bytes; it refuses a frame whose announced length is over the limit as soon as the length
//! prefix has arrived, and never buffers more than one maximum frame plus one read chunk.

use bytes::{Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

use plover_proto::{ErrorCode, FrameError, codec};

/// Bytes asked of quinn per read: one QUIC packet's worth of stream data or a bit more.
const READ_CHUNK: usize = 16 * 1024;

/// Errors reading or writing frames on a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer sent bytes that are not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
    /// Reading failed (connection lost, stream reset).
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed (connection lost, stream stopped).
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished.
    #[error("stream closed")]
    Closed(#[from] quinn::ClosedStream),
}

impl StreamError {
    /// The close code when the peer broke the framing (`frame_too_large`, `bad_frame`), or
    /// `None` when the stream or the connection is simply gone.
    pub fn violation(&self) -> Option<ErrorCode> {
        match self {
            Self::Frame(FrameError::TooLarge { .. }) => Some(ErrorCode::FRAME_TOO_LARGE),
            Self::Frame(_) | Self::Truncated(_) => Some(ErrorCode::BAD_FRAME),
            Self::Read(_) | Self::Write(_) | Self::Closed(_) => None,
        }
    }
}

/// Reads frames from a receive stream.
#[derive(Debug)]
pub struct FrameReader {
    stream: quinn::RecvStream,
    buf: BytesMut,
    max: u32,
}

impl FrameReader {
    /// Wraps a stream; frames above `max` bytes are refused.
    pub fn new(stream: quinn::RecvStream, max: u32) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            max,
        }
    }

    /// The next frame, or `None` when the peer finished the stream cleanly between frames.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, StreamError> {
        self.next_with(codec::decode_body).await
    }

    /// [`FrameReader::next`] with a body decoder of the caller's (a server reads the first
    /// frame with [`plover_proto::ClientFrame::decode_first`]).
    pub async fn next_with<T>(
        &mut self,
        body: impl Fn(&[u8]) -> Result<T, FrameError>,
    ) -> Result<Option<T>, StreamError> {
        loop {
            match codec::decode_with(&mut self.buf, self.max, &body) {
                Ok(frame) => return Ok(Some(frame)),
                Err(FrameError::Incomplete) => {}
                Err(e) => return Err(e.into()),
            }
            // `decode` has refused any announced length above the limit, so the buffer never
            // holds more than one maximum frame plus one chunk, whatever the peer sends.
            match self.stream.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(StreamError::Truncated(self.buf.len())),
            }
        }
    }

    /// The stream and the bytes read from it past the last frame: for a stream that goes on
    /// with raw bytes after its first frames (an upload).
    pub fn into_inner(self) -> (quinn::RecvStream, BytesMut) {
        (self.stream, self.buf)
    }

    /// Whether a whole frame is already buffered (the next `next` will not wait).
    pub fn has_frame(&self) -> bool {
        codec::frame_bounds(&self.buf, self.max).is_ok()
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u16) {
        let _ = self.stream.stop(quinn::VarInt::from(code));
    }
}

/// Writes frames to a send stream.
#[derive(Debug)]
pub struct FrameWriter {
    stream: quinn::SendStream,
    max: u32,
    scratch: BytesMut,
}

impl FrameWriter {
    /// Wraps a stream; frames above `max` bytes are refused before anything is written.
    pub fn new(stream: quinn::SendStream, max: u32) -> Self {
        Self {
            stream,
            max,
            scratch: BytesMut::new(),
        }
    }

    /// Encodes one frame without writing it.
    pub fn encode<T: Serialize>(&mut self, frame: &T) -> Result<Bytes, StreamError> {
        codec::encode(frame, self.max, &mut self.scratch)?;
        Ok(self.scratch.split().freeze())
    }

    /// Writes one frame.
    pub async fn send<T: Serialize>(&mut self, frame: &T) -> Result<(), StreamError> {
        let bytes = self.encode(frame)?;
        self.stream.write_chunk(bytes).await?;
        Ok(())
    }

    /// Writes raw bytes (a download's, after its first frame).
    pub async fn send_raw(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.stream.write_chunk(bytes).await?;
        Ok(())
    }

    /// Writes frames already encoded.
    pub async fn send_encoded(&mut self, frames: &mut [Bytes]) -> Result<(), StreamError> {
        self.stream.write_all_chunks(frames).await?;
        Ok(())
    }

    /// Finishes the stream and waits (up to `wait`) until the peer has everything.
    pub async fn finish(&mut self, wait: std::time::Duration) {
        if self.stream.finish().is_ok() {
            let _ = tokio::time::timeout(wait, self.stream.stopped()).await;
        }
    }

    /// Abandons the stream with an error code.
    pub fn reset(&mut self, code: u16) {
        let _ = self.stream.reset(quinn::VarInt::from(code));
    }
}
