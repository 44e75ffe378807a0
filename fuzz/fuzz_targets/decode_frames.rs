//! Arbitrary bytes as a stream of client frames (what a server reads), of server frames (what a
//! client reads) and as datagrams: decoding must never panic, never buffer past the limit, and
//! whatever decodes must encode back to a frame that decodes to the same value.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use plover_proto::{ClientDatagram, ClientFrame, FrameError, ServerDatagram, ServerFrame, codec};

const MAX: u32 = 64 * 1024;

fn stream<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let mut buf = BytesMut::from(data);
    loop {
        match codec::decode::<T>(&mut buf, MAX) {
            Ok(frame) => {
                let bytes = codec::encode_to_vec(&frame, MAX).expect("a decoded frame encodes");
                let mut again = BytesMut::from(&bytes[..]);
                let back: T = codec::decode(&mut again, MAX).expect("and decodes again");
                assert_eq!(back, frame);
            }
            Err(FrameError::Incomplete) => return,
            // A bad frame is consumed (or the prefix is unusable); either way, stop or go on.
            Err(FrameError::BadLength | FrameError::TooLarge { .. }) => return,
            Err(_) => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    stream::<ClientFrame>(data);
    stream::<ServerFrame>(data);
    let _ = postcard::from_bytes::<ClientDatagram>(data);
    let _ = postcard::from_bytes::<ServerDatagram>(data);
});
