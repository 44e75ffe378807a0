//! The content format the SDK and the CLI give message bodies. The server never reads it:
//! to the server a body is opaque bytes, and an end-to-end encrypted client may put this
//! inside its own encryption.
//!
//! A body is one byte, [`CONTENT_VERSION`], then a [`Content`] in postcard. A body that does
//! not start with that byte is plain UTF-8 text (bodies sent before the format existed).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

use super::types::ObjectId;

/// The first byte of a body in this format.
pub const CONTENT_VERSION: u8 = 1;

/// What a message says. Variant order is the format: append, never reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// A file, encrypted on the sender's device, in the server's object store.
    Attachment(Attachment),
}

/// The pointer to an encrypted file: what a member needs to fetch and decrypt it.
///
/// The file is encrypted with ChaCha20-Poly1305 (RFC 8439) under `key`, in chunks of
/// `chunk` plaintext bytes (the last one shorter, possibly empty): chunk `i` is sealed with
/// the nonce made of `i` as 8 bytes big-endian, then 3 zero bytes, then 1 for the last chunk
/// and 0 for the others, and no associated data, so each chunk is its plaintext and a 16-byte
/// tag. The stored object is the chunks one after another; its id is their SHA-256.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The stored object (the SHA-256 of the ciphertext).
    pub object: ObjectId,
    /// The ciphertext's size in bytes.
    pub size: u64,
    /// The file's key: 32 random bytes, a fresh one per file.
    pub key: [u8; 32],
    /// The plaintext bytes per chunk.
    pub chunk: u32,
    /// The file's size in bytes.
    pub plain_size: u64,
    /// Its media type (`image/jpeg`, `application/octet-stream`, ...).
    pub media_type: String,
    /// Its file name (no directory).
    pub name: String,
    /// An image's width and height in pixels.
    pub dimensions: Option<(u32, u32)>,
    /// A small JPEG of an image, made on the sender's device, to show before the download.
    pub thumbnail: Option<Bytes>,
    /// Text sent with the file.
    pub caption: Option<String>,
}

/// Never shows the key.
impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("object", &self.object)
            .field("size", &self.size)
            .field("key", &"<redacted>")
            .field("chunk", &self.chunk)
            .field("plain_size", &self.plain_size)
            .field("media_type", &self.media_type)
            .field("name", &self.name)
            .field("dimensions", &self.dimensions)
            .field("thumbnail", &self.thumbnail.as_ref().map(Bytes::len))
            .field("caption", &self.caption)
            .finish()
    }
}

impl Content {
    /// The body bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![CONTENT_VERSION];
        // Serializing to a vector fails only for types postcard cannot represent.
        if let Ok(more) = postcard::to_stdvec(self) {
            out.extend(more);
        }
        out
    }

    /// Reads a body: this format, or plain text for a body that is not in it. `None` for a
    /// body that claims the format but does not decode (a newer variant, or damage).
    pub fn decode(body: &[u8]) -> Option<Self> {
        match body.split_first() {
            Some((&CONTENT_VERSION, rest)) => postcard::from_bytes(rest).ok(),
            _ => Some(Self::Text {
                text: String::from_utf8_lossy(body).into_owned(),
            }),
        }
    }

    /// The objects this content references (what `SendWith` names).
    pub fn objects(&self) -> Vec<ObjectId> {
        match self {
            Self::Text { .. } => Vec::new(),
            Self::Attachment(a) => vec![a.object],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::hex;

    #[test]
    fn text_and_attachment_have_pinned_bytes() {
        let text = Content::Text { text: "hi".into() };
        assert_eq!(hex(&text.encode()), "01 00 02 68 69");
        let attachment = Content::Attachment(Attachment {
            object: ObjectId([0xab; 32]),
            size: 20,
            key: [0x07; 32],
            chunk: 65_536,
            plain_size: 4,
            media_type: "a/b".into(),
            name: "f".into(),
            dimensions: None,
            thumbnail: None,
            caption: None,
        });
        let bytes = attachment.encode();
        let expected = format!(
            "01 01 {} 14 {} 80 80 04 04 03 61 2f 62 01 66 00 00 00",
            ["ab"; 32].join(" "),
            ["07"; 32].join(" ")
        );
        assert_eq!(hex(&bytes), expected);
        let doc = include_str!("../../../PROTOCOL.md");
        assert!(doc.contains("`01 00 02 68 69`"));
        assert!(doc.contains("80 80 04 04 03 61 2f 62 01 66 00 00 00"));
        assert_eq!(Content::decode(&bytes), Some(attachment.clone()));
        assert_eq!(Content::decode(&text.encode()), Some(text));
        // A body from before the format is text; one that claims it and is cut short is not.
        assert_eq!(
            Content::decode(b"plain"),
            Some(Content::Text {
                text: "plain".into()
            })
        );
        assert_eq!(Content::decode(&bytes[..10]), None);
        assert!(!format!("{attachment:?}").contains("07, 7"));
    }
}
