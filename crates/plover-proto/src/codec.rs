//! Length-prefixed postcard frames over `Buf`/`BufMut`.
//!
//! A frame is `varint(len) ++ postcard(value)`, where the varint is unsigned LEB128 (7 bits a
//! byte, low bits first, at most 5 bytes for a `u32`, and minimal: a prefix that ends in a
//! zero byte after a continuation is refused, so every length has one encoding). The length is checked against the
//! configured maximum as soon as the prefix is complete, before the body is buffered or any
//! memory is reserved for it, and the body must be consumed exactly: leftover bytes are an error.

use bytes::{Buf, BufMut, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

/// The largest encoding of a `u32` varint.
pub const MAX_VARINT_LEN: usize = 5;

/// What can go wrong while reading a frame.
///
/// [`FrameError::Incomplete`] only means "feed me more bytes"; every other variant means the
/// peer sent something that is not a valid frame and the stream cannot be trusted any further.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// More bytes are needed before a frame can be decoded; nothing was consumed.
    #[error("incomplete frame: more bytes needed")]
    Incomplete,
    /// The length prefix is longer than 5 bytes, overflows a `u32`, or is not minimal.
    #[error("malformed length prefix")]
    BadLength,
    /// The announced length is above the configured maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The length the peer announced.
        len: u64,
        /// The configured maximum.
        max: u32,
    },
    /// The body is not a valid postcard encoding of the expected type.
    #[error("invalid frame body: {0}")]
    Invalid(#[source] postcard::Error),
    /// The body decoded, but bytes were left over inside the frame.
    #[error("{0} trailing bytes after the frame body")]
    Trailing(usize),
    /// A value could not be encoded (only happens for values above the maximum size).
    #[error("cannot encode frame: {0}")]
    Encode(#[source] postcard::Error),
}

/// Reads a varint length prefix from the front of `src` without consuming it.
///
/// Returns the value and the number of prefix bytes.
fn peek_len(src: &[u8]) -> Result<(u64, usize), FrameError> {
    let mut value: u64 = 0;
    // Each byte's count (1..=5) and the shift of its 7 bits; at most 5 bytes are looked at.
    let shifts = (1usize..).zip([0u32, 7, 14, 21, 28]);
    for ((count, shift), byte) in shifts.zip(src) {
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            // A last byte of zero after a continuation adds nothing: an overlong encoding.
            if value > u64::from(u32::MAX) || (count > 1 && *byte == 0) {
                return Err(FrameError::BadLength);
            }
            return Ok((value, count));
        }
    }
    if src.len() >= MAX_VARINT_LEN {
        Err(FrameError::BadLength)
    } else {
        Err(FrameError::Incomplete)
    }
}

fn put_len(dst: &mut impl BufMut, mut len: u32) {
    while len >= 0x80 {
        dst.put_u8((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    dst.put_u8(len as u8);
}

/// Appends one frame holding `value` to `dst`.
///
/// Fails if the encoded body would be larger than `max` bytes: the peer would refuse it anyway.
pub fn encode<T: Serialize>(value: &T, max: u32, dst: &mut BytesMut) -> Result<(), FrameError> {
    let body = postcard::to_stdvec(value).map_err(FrameError::Encode)?;
    if body.len() as u64 > u64::from(max) {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            max,
        });
    }
    dst.reserve(MAX_VARINT_LEN.saturating_add(body.len()));
    put_len(dst, body.len() as u32);
    dst.put_slice(&body);
    Ok(())
}

/// Encodes one frame into a fresh buffer.
pub fn encode_to_vec<T: Serialize>(value: &T, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut buf = BytesMut::new();
    encode(value, max, &mut buf)?;
    Ok(buf.to_vec())
}

/// Checks the frame at the front of `src` and returns `(prefix_len, body_len)` once it is complete.
///
/// This is the check that keeps a hostile length from costing memory: it fails with
/// [`FrameError::TooLarge`] as soon as the prefix is readable, whatever follows it.
pub fn frame_bounds(src: &[u8], max: u32) -> Result<(usize, usize), FrameError> {
    let (len, prefix) = peek_len(src)?;
    if len > u64::from(max) {
        return Err(FrameError::TooLarge { len, max });
    }
    // At most `u32::MAX`, so a `usize` on every target plover builds for.
    let len = usize::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    if src.get(prefix..).map_or(0, <[u8]>::len) < len {
        return Err(FrameError::Incomplete);
    }
    Ok((prefix, len))
}

/// Decodes a frame body (without its prefix); every byte must belong to the value.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes::<T>(body).map_err(FrameError::Invalid)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(value)
}

/// Decodes the frame at the front of `src` and advances past it.
///
/// On [`FrameError::Incomplete`] nothing is consumed, so the caller appends more bytes and
/// calls again. On any other error the stream is unusable.
pub fn decode<T: DeserializeOwned>(src: &mut BytesMut, max: u32) -> Result<T, FrameError> {
    decode_with(src, max, decode_body)
}

/// [`decode`] with a body decoder of the caller's (such as
/// [`crate::ClientFrame::decode_first`]).
pub fn decode_with<T>(
    src: &mut BytesMut,
    max: u32,
    body: impl FnOnce(&[u8]) -> Result<T, FrameError>,
) -> Result<T, FrameError> {
    let (prefix, len) = frame_bounds(src, max)?;
    // `frame_bounds` found the whole body in `src`, so neither the sum nor the range fails.
    let end = prefix.saturating_add(len);
    let value = src
        .get(prefix..end)
        .map_or(Err(FrameError::Incomplete), body);
    // A bad body still consumes its frame, so a caller that logs and carries on stays aligned.
    src.advance(end);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_prefix_boundaries() {
        for (len, bytes) in [
            (0u32, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (300, vec![0xac, 0x02]),
            (u32::MAX, vec![0xff, 0xff, 0xff, 0xff, 0x0f]),
        ] {
            let mut out = BytesMut::new();
            put_len(&mut out, len);
            assert_eq!(&out[..], &bytes[..], "encoding {len}");
            assert_eq!(peek_len(&bytes), Ok((u64::from(len), bytes.len())));
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        // u32::MAX announced, no body at all: refused from the prefix alone.
        let src = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(
            frame_bounds(&src, 65_536),
            Err(FrameError::TooLarge {
                len: u64::from(u32::MAX),
                max: 65_536
            })
        );
        // The limit plus one.
        let mut src = BytesMut::new();
        put_len(&mut src, 65_537);
        assert!(matches!(
            frame_bounds(&src, 65_536),
            Err(FrameError::TooLarge { len: 65_537, .. })
        ));
    }

    #[test]
    fn overlong_or_overflowing_prefix_is_malformed() {
        assert_eq!(
            peek_len(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(FrameError::BadLength)
        );
        assert_eq!(
            peek_len(&[0xff, 0xff, 0xff, 0xff, 0x1f]),
            Err(FrameError::BadLength)
        );
        // Non-minimal: 0 as `80 00`, 2 as `82 00`, 130 as `82 81 00`.
        for overlong in [&[0x80, 0x00][..], &[0x82, 0x00], &[0x82, 0x81, 0x00]] {
            assert_eq!(
                peek_len(overlong),
                Err(FrameError::BadLength),
                "{overlong:?}"
            );
        }
        assert_eq!(peek_len(&[0x00]), Ok((0, 1)), "zero itself is one byte");
        assert_eq!(peek_len(&[0x80, 0x01]), Ok((128, 2)));
    }

    /// Inside a body, varints are postcard's: its decoder takes a non-minimal encoding
    /// (PROTOCOL.md says so; encoders must write minimal ones, as the pinned vectors are).
    #[test]
    fn body_varints_may_be_non_minimal() {
        #[derive(serde::Deserialize, PartialEq, Debug)]
        struct One(u64);
        assert_eq!(decode_body::<One>(&[0x2a]), Ok(One(42)));
        assert_eq!(decode_body::<One>(&[0xaa, 0x00]), Ok(One(42)));
    }

    #[test]
    fn truncated_input_asks_for_more_and_consumes_nothing() {
        let full = encode_to_vec(&(7u64, String::from("hello")), 1024).expect("encode");
        for cut in 0..full.len() {
            let mut src = BytesMut::from(&full[..cut]);
            assert_eq!(
                decode::<(u64, String)>(&mut src, 1024),
                Err(FrameError::Incomplete)
            );
            assert_eq!(src.len(), cut);
        }
        let mut src = BytesMut::from(&full[..]);
        assert_eq!(
            decode::<(u64, String)>(&mut src, 1024),
            Ok((7, "hello".into()))
        );
        assert!(src.is_empty());
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_refused() {
        // A frame announcing 3 bytes whose body is a u8 (1 byte) plus 2 spare bytes.
        let mut src = BytesMut::from(&[0x03, 0x05, 0x00, 0x00][..]);
        assert_eq!(decode::<u8>(&mut src, 1024), Err(FrameError::Trailing(2)));
    }

    #[test]
    fn garbage_body_is_invalid_not_incomplete() {
        // A bool must be 0 or 1.
        let mut src = BytesMut::from(&[0x01, 0x07][..]);
        assert!(matches!(
            decode::<bool>(&mut src, 1024),
            Err(FrameError::Invalid(_))
        ));
    }

    #[test]
    fn encoding_above_the_limit_is_refused() {
        let big = vec![0u8; 100];
        assert!(matches!(
            encode_to_vec(&big, 50),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
