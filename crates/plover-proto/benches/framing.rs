//! Frame encode and decode: the per-message cost every hop pays.
#![allow(missing_docs)]

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use plover_proto::{ClientFrame, ClientMsgId, Event, Message, ServerFrame, codec};
use std::hint::black_box;

fn event(body: usize) -> ServerFrame {
    ServerFrame::Event {
        log: 123_456,
        event: Event::Message(Message {
            conversation: 42,
            seq: 1_000_000,
            from: "alice".into(),
            device: "phone".into(),
            ts: 1_795_000_000_000,
            id: ClientMsgId([7; 16]),
            body: Bytes::from(vec![b'x'; body]),
            change: None,
        }),
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("framing");
    for size in [64usize, 1024] {
        let frame = event(size);
        let bytes = codec::encode_to_vec(&frame, 1 << 16).expect("encode");
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("encode_event_{size}B"), |b| {
            let mut buf = BytesMut::with_capacity(4096);
            b.iter(|| {
                codec::encode(black_box(&frame), 1 << 16, &mut buf).expect("encode");
                buf.clear();
            })
        });
        group.bench_function(format!("decode_event_{size}B"), |b| {
            b.iter(|| {
                let mut src = BytesMut::from(black_box(&bytes[..]));
                let f: ServerFrame = codec::decode(&mut src, 1 << 16).expect("decode");
                black_box(f)
            })
        });
    }
    let send = ClientFrame::Send {
        id: ClientMsgId([1; 16]),
        body: Bytes::from(vec![b'y'; 64]),
    };
    let bytes = codec::encode_to_vec(&send, 1 << 16).expect("encode");
    group.bench_function("decode_send_64B", |b| {
        b.iter(|| {
            let mut src = BytesMut::from(black_box(&bytes[..]));
            let f: ClientFrame = codec::decode(&mut src, 1 << 16).expect("decode");
            black_box(f)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
