//! A torn journal tail recovers the valid prefix; damage before the end makes the store (and
//! `plover serve`) refuse to start with a clear message instead of skipping data.
use bytes::Bytes;
use plover_proto::{ClientMsgId, Message};
use plover_server::config::Durability;
use plover_server::persist::{Store, StoreError};
use std::path::{Path, PathBuf};

fn write_messages(dir: &Path, n: u64) {
    let store = Store::open(dir, Durability::Sync).expect("open");
    for seq in 1..=n {
        let mut b = store.batch();
        b.put_message(&Message {
            conversation: 1,
            seq,
            from: "alice".into(),
            device: "d".into(),
            ts: seq,
            id: ClientMsgId([seq as u8; 16]),
            body: Bytes::from(format!("message {seq}")),
            change: None,
        });
        b.commit().expect("commit");
    }
}

/// The active journal and the offset just past its last non-zero byte.
fn journal(dir: &Path) -> (PathBuf, usize) {
    let mut journals: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .collect();
    journals.sort();
    let path = journals.pop().expect("a journal");
    let bytes = std::fs::read(&path).expect("read");
    let end = bytes.iter().rposition(|b| *b != 0).expect("data") + 1;
    (path, end)
}

#[test]
fn a_torn_last_batch_is_dropped_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_messages(dir.path(), 50);
    let (path, end) = journal(dir.path());
    let mut bytes = std::fs::read(&path).expect("read");
    // A crash in the middle of writing the last batch: its end never reached the disk.
    for b in &mut bytes[end - 12..end] {
        *b = 0;
    }
    std::fs::write(&path, &bytes).expect("write");
    let store = Store::open(dir.path(), Durability::Sync).expect("recovers");
    assert_eq!(store.last_seq(1).expect("last"), 49);
    for seq in 1..=49 {
        let m = store.message(1, seq).expect("read").expect("kept");
        assert_eq!(m.body, Bytes::from(format!("message {seq}")));
    }
}

#[test]
fn damage_before_the_end_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_messages(dir.path(), 50);
    let (path, end) = journal(dir.path());
    let mut bytes = std::fs::read(&path).expect("read");
    // Flip one byte of a message body halfway through the journal.
    let needle = b"message 25";
    let at = bytes[..end]
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("body in the journal");
    bytes[at + 8] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    match Store::open(dir.path(), Durability::Sync) {
        Err(StoreError::CorruptJournal { reason, .. }) => {
            assert!(reason.contains("Checksum"), "{reason}");
        }
        Err(other) => panic!("expected CorruptJournal, got {other}"),
        Ok(_) => panic!("a damaged journal must not open"),
    }

    // The server says so and exits non-zero.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plover"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data")
        .arg(dir.path())
        .arg("--certs")
        .arg(dir.path().join("certs"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("journal") && stderr.contains("refusing to start"),
        "{stderr}"
    );
}
