//! The network-free session harness behind the `session_frames` fuzz target: its seed inputs
//! go through the real request code, router and store, and get the answers a client would.

use plover_proto::{ClientFrame, ErrorCode, ServerFrame};
use plover_server::transport::fuzzing::{Harness, record, seeds};

#[test]
fn seeds_get_real_answers() {
    let mut harness = Harness::new();
    let [direct, group, delete] = &seeds()[..] else {
        panic!("three seeds");
    };

    let answers = harness.run(direct);
    let sent: Vec<u64> = answers
        .iter()
        .filter_map(|a| match a {
            ServerFrame::Sent { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [1, 1], "a retried id gets its first seq: {answers:?}");
    assert!(
        answers
            .iter()
            .any(|a| matches!(a, ServerFrame::Pong { nonce: 9 }))
    );
    // History is read when asked, while the sends before it may still be committing.
    assert!(
        answers
            .iter()
            .any(|a| matches!(a, ServerFrame::HistoryPage { messages, .. } if messages.len() <= 1))
    );
    // The first `Sent` is the message's delivery to this connection, at log position 1. The
    // feed skips it when it comes live, and carries it when it reads the store (the feed may
    // have caught up before or after the commit): position 1 either way, never another.
    assert!(
        answers
            .iter()
            .any(|a| matches!(a, ServerFrame::Sent { seq: 1, log: 1, .. })),
        "{answers:?}"
    );
    let events: Vec<u64> = answers
        .iter()
        .filter_map(|a| match a {
            ServerFrame::Event { log, .. } => Some(*log),
            _ => None,
        })
        .collect();
    assert!(events.is_empty() || events == [1], "{answers:?}");

    let answers = harness.run(group);
    assert!(
        answers
            .iter()
            .any(|a| matches!(a, ServerFrame::GroupCreated { .. })),
        "{answers:?}"
    );
    let done = answers
        .iter()
        .filter(|a| matches!(a, ServerFrame::Done { .. }))
        .count();
    assert_eq!(done, 1, "the member is added: {answers:?}");

    let answers = harness.run(delete);
    assert!(
        matches!(
            &answers[..],
            [
                ServerFrame::Opened { .. },
                ServerFrame::Done { .. },
                ServerFrame::Done { .. }
            ]
        ),
        "{answers:?}"
    );
}

#[test]
fn misplaced_and_undecodable_frames_end_the_input() {
    let mut harness = Harness::new();
    // A Send on the control stream is refused and nothing after it runs.
    let send = ClientFrame::Send {
        id: plover_proto::ClientMsgId([1; 16]),
        body: bytes::Bytes::from_static(b"x"),
    };
    let input = [
        vec![1],
        record(0, &send),
        record(0, &ClientFrame::Ping { nonce: 1 }),
    ]
    .concat();
    let answers = harness.run(&input);
    assert!(
        matches!(&answers[..], [ServerFrame::Error { code, .. }] if *code == ErrorCode::UNEXPECTED_FRAME),
        "{answers:?}"
    );
    // Garbage after a good frame: the good one is answered, then the input ends.
    let mut input = [vec![2], record(0, &ClientFrame::Ping { nonce: 2 })].concat();
    input.extend([0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]);
    input.extend(record(0, &ClientFrame::Ping { nonce: 3 }));
    let answers = harness.run(&input);
    assert!(
        matches!(&answers[..], [ServerFrame::Pong { nonce: 2 }]),
        "{answers:?}"
    );
}

/// Writes the seeds where the fuzzer's corpus starts:
/// `cargo test --test it -- --ignored session_harness::write_fuzz_seeds`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/session_frames");
    std::fs::create_dir_all(&dir).expect("the seed directory");
    for (i, seed) in seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), seed).expect("a seed file");
    }
}

/// A few thousand mutations of the seeds (byte flips, cuts, splices) through the harness, in
/// the default suite: a small, deterministic version of the `session_frames` fuzz run.
#[test]
fn mutated_frame_sequences_break_no_invariant() {
    let seeds = seeds();
    let mut harness = Harness::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut answered = 0;
    for _ in 0..3000 {
        let mut input = seeds[(next() % seeds.len() as u64) as usize].clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() % input.len().max(1) as u64) as usize;
            match next() % 4 {
                0 if !input.is_empty() => input[at] ^= 1 << (next() % 8),
                1 if !input.is_empty() => input[at] = next() as u8,
                2 => input.truncate(at.max(1)),
                _ => {
                    let other = &seeds[(next() % seeds.len() as u64) as usize];
                    let from = (next() % other.len() as u64) as usize;
                    input.extend_from_slice(&other[from..]);
                }
            }
        }
        answered += harness.run(&input).len();
    }
    assert!(
        answered > 3000,
        "the mutations still reach the server: {answered} answers"
    );
}
