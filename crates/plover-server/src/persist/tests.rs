//! The store's own tests: pages, reopening, direct pairs, removal from disk.

use super::*;
use bytes::Bytes;
use plover_proto::{ClientMsgId, ConversationId, Message, Retention};

fn msg(conv: u64, seq: u64) -> Message {
    Message {
        conversation: conv,
        seq,
        from: "alice".into(),
        device: "d".into(),
        ts: seq * 10,
        id: ClientMsgId([seq as u8; 16]),
        body: Bytes::from(format!("m{seq}")),
        change: None,
    }
}

#[test]
fn messages_and_history_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), Durability::Sync).expect("open");
    let mut b = store.batch();
    for seq in 1..=10 {
        b.put_message(&msg(1, seq));
    }
    b.put_message(&msg(2, 1));
    b.commit().expect("commit");

    assert_eq!(store.last_seq(1).expect("last"), 10);
    assert_eq!(store.last_seq(3).expect("last"), 0);
    let seqs = |v: &[Message]| v.iter().map(|m| m.seq).collect::<Vec<_>>();

    let (page, more) = store.history(1, None, None, 3, 0, usize::MAX).expect("h");
    assert_eq!((seqs(&page), more), (vec![8, 9, 10], true));
    let (page, more) = store
        .history(1, Some(8), None, 3, 0, usize::MAX)
        .expect("h");
    assert_eq!((seqs(&page), more), (vec![5, 6, 7], true));
    let (page, more) = store
        .history(1, Some(3), None, 5, 0, usize::MAX)
        .expect("h");
    assert_eq!((seqs(&page), more), (vec![1, 2], false));
    let (page, more) = store
        .history(1, None, Some(7), 2, 0, usize::MAX)
        .expect("h");
    assert_eq!((seqs(&page), more), (vec![8, 9], true));
    let (page, more) = store
        .history(1, None, Some(8), 5, 0, usize::MAX)
        .expect("h");
    assert_eq!((seqs(&page), more), (vec![9, 10], false));
    // A member who joined at 6 sees nothing before it, whichever way they page.
    let (page, more) = store
        .history(1, Some(9), None, 10, 6, usize::MAX)
        .expect("h");
    assert_eq!((seqs(&page), more), (vec![6, 7, 8], false));
    let (page, _) = store
        .history(1, None, Some(2), 2, 6, usize::MAX)
        .expect("h");
    assert_eq!(seqs(&page), vec![6, 7]);
    // A byte budget ends the page early (with `more`), but never before one message.
    let (page, more) = store.history(1, None, None, 10, 0, 1).expect("h");
    assert_eq!((seqs(&page), more), (vec![10], true));
    let one = postcard::to_stdvec(&msg(1, 1)).expect("size").len();
    let (page, more) = store.history(1, None, Some(0), 10, 0, 3 * one).expect("h");
    assert_eq!((seqs(&page), more), (vec![1, 2, 3], true));
    assert_eq!(
        store
            .idempotent(1, "alice", &ClientMsgId([4; 16]))
            .expect("i"),
        Some((4, 40))
    );
}

#[test]
fn logs_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path(), Durability::Sync).expect("open");
        let mut b = store.batch();
        for pos in 1..=5 {
            b.append_log(
                "bob",
                pos,
                &LogEntry::Message {
                    conversation: 1,
                    seq: pos,
                },
            );
        }
        b.append_log(
            "bo",
            1,
            &LogEntry::Message {
                conversation: 9,
                seq: 1,
            },
        );
        b.put_cursor("bob", "phone", 3);
        b.commit().expect("commit");
    }
    let store = Store::open(dir.path(), Durability::Sync).expect("reopen");
    assert_eq!(store.log_head("bob").expect("head"), 5);
    assert_eq!(store.log_head("bo").expect("head"), 1);
    let tail = store.read_log("bob", 3, 10).expect("read");
    assert_eq!(tail.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(store.device_cursor("bob", "phone").expect("c"), Some(3));
}

#[test]
fn direct_conversation_is_shared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), Durability::Sync).expect("open");
    assert_eq!(store.direct_between("a", "b").expect("d"), None);
    let id = store
        .create_direct(&store, "b", "a", 1, false)
        .expect("create");
    assert_eq!(store.direct_between("a", "b").expect("d"), Some(id));
    assert_eq!(store.conversations_of("a").expect("c"), vec![id]);
    let rec = store.conversation(id).expect("c").expect("exists");
    assert_eq!(rec.retention, Retention::Keep);
    assert_eq!(rec.names(), vec!["a".to_string(), "b".to_string()]);
    assert!(rec.is_member("a") && !rec.is_member("c"));
    let id2 = store
        .create_direct(&store, "a", "c", 1, false)
        .expect("create");
    assert_ne!(id, id2);
}

mod removal_tests {
    use super::*;
    use bytes::Bytes;
    use plover_proto::{ClientMsgId, ConversationChange, Message};

    #[test]
    fn erased_bodies_leave_the_disk_after_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), Durability::Buffered).expect("open");
        let body = Bytes::from(vec![0x5au8; 16 * 1024]);
        let mut messages = Vec::new();
        for seq in 1..=2000u64 {
            // Bodies that do not compress (end-to-end encrypted payloads look like this).
            let mut b = body.to_vec();
            getrandom::fill(&mut b).expect("random");
            messages.push(Message {
                conversation: 1,
                seq,
                from: "alice".into(),
                device: "d".into(),
                ts: seq,
                id: ClientMsgId([seq as u8; 16]),
                body: Bytes::from(b),
                change: None,
            });
        }
        for chunk in messages.chunks(100) {
            let mut w = store.batch();
            for m in chunk {
                w.put_message(m);
            }
            w.commit().expect("commit");
        }
        store.compact().expect("flush");
        let full = store.messages_disk_space();
        let total = store.disk_space().expect("size");
        let mut w = store.batch();
        for m in &messages {
            w.put_message(&tombstone(m));
        }
        w.commit().expect("commit");
        store.compact().expect("compact");
        let after = store.messages_disk_space();
        assert!(
            full > 10_000_000 && after < full / 20,
            "messages take {after} bytes on disk after erasing, {full} before"
        );
        // The journal is a preallocated file of a fixed size; the bodies it recorded go when
        // it is rotated, after `DEFAULT_JOURNAL_SIZE` of newer writes.
        assert!(store.disk_space().expect("size") < total);
        let kept = store.message(1, 7).expect("read").expect("tombstone");
        assert!(kept.body.is_empty() && kept.change == Some(ConversationChange::Erased));
        assert_eq!((kept.seq, kept.from.as_str()), (7, "alice"));
    }
}

/// A writer that records a side write instead of committing it, as a cluster node's does.
/// The third field is the conversation id its cluster hands out.
struct Recording<'a>(&'a Store, std::sync::Mutex<Vec<Recorded>>, ConversationId);

impl Writer for Recording<'_> {
    fn write(&self, write: SideWrite) -> Result<(), StoreError> {
        let mut b = self.0.recorder();
        write(&mut b);
        self.1
            .lock()
            .expect("recorded")
            .push(b.recorded().expect("a recording batch"));
        Ok(())
    }

    fn allocate_conversation(&self) -> Option<Result<ConversationId, StoreError>> {
        Some(Ok(self.2))
    }
}

#[test]
fn recorded_writes_applied_elsewhere_give_the_same_store_and_a_second_direct_pair_is_cancelled() {
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let origin = Store::open(a.path(), Durability::Sync).expect("origin");
    let replica = Store::open(b.path(), Durability::Sync).expect("replica");
    let rec = Recording(&origin, Default::default(), 41);
    origin.ensure_user(&rec, "alice", 5).expect("user");
    let id = origin
        .create_direct(&rec, "alice", "bob", 7, false)
        .expect("direct");
    assert_eq!(
        id, 41,
        "the id comes from the writer (the cluster's counter)"
    );
    // The same pair created again on another node at the same moment.
    let c = tempfile::tempdir().expect("c");
    let other = Store::open(c.path(), Durability::Sync).expect("other");
    let late = Recording(&other, Default::default(), 42);
    other
        .create_direct(&late, "bob", "alice", 9, false)
        .expect("late");
    let mut late_writes = late.1.into_inner().expect("late");
    let mut recorded = rec.1.into_inner().expect("recorded");
    assert_eq!(recorded.len(), 2);
    recorded.append(&mut late_writes);

    // Nothing was written where they were recorded.
    assert!(!origin.user_exists("alice").expect("read"));
    // Applied in order on the replica: the first creation wins, the second writes nothing.
    let mut applied = Vec::new();
    for r in &recorded {
        let mut batch = replica.batch();
        applied.push(batch.apply_recorded(r).expect("apply"));
        batch.commit().expect("commit");
    }
    assert_eq!(applied, [true, true, false]);
    assert!(replica.user_exists("alice").expect("read"));
    assert_eq!(
        replica.direct_between("bob", "alice").expect("read"),
        Some(41)
    );
    assert!(replica.conversation(41).expect("read").is_some());
    assert!(
        replica.conversation(42).expect("read").is_none(),
        "the cancelled creation left no conversation"
    );
    // The applied checkpoint.
    let mut batch = replica.batch();
    batch.put_applied(12, 3);
    batch.commit().expect("commit");
    assert_eq!(replica.applied().expect("applied"), Some((12, 3)));
}

#[test]
fn a_snapshot_replaces_another_store_whole_and_a_damaged_one_changes_nothing() {
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let origin = Store::open(a.path(), Durability::Sync).expect("origin");
    let mut batch = origin.batch();
    for seq in 1..=50 {
        batch.put_message(&msg(7, seq));
        batch.append_log(
            "bob",
            seq,
            &LogEntry::Message {
                conversation: 7,
                seq,
            },
        );
    }
    batch.put_user("bob", 3);
    batch.put_applied(90, 4);
    batch.commit().expect("commit");
    let file = a.path().join("snap");
    let at = origin
        .export(std::fs::File::create(&file).expect("create"))
        .expect("export");
    assert_eq!(at, Some((90, 4)));

    // Another store, with keys of its own that must go.
    let other = Store::open(b.path(), Durability::Sync).expect("other");
    let mut batch = other.batch();
    batch.put_message(&msg(8, 1));
    batch.put_user("carol", 1);
    batch.commit().expect("commit");

    // Damaged: refused, nothing changed.
    let mut bytes = std::fs::read(&file).expect("read");
    let damaged = b.path().join("damaged");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&damaged, &bytes).expect("write");
    assert!(other.import(&damaged).is_err());
    assert!(other.user_exists("carol").expect("read"));

    // Whole: the other store is now the origin's, byte for byte.
    assert_eq!(other.import(&file).expect("import"), (90, 4));
    assert!(!other.user_exists("carol").expect("read"));
    assert_eq!(other.last_seq(8).expect("read"), 0);
    assert_eq!(other.last_seq(7).expect("read"), 50);
    assert_eq!(other.applied().expect("applied"), Some((90, 4)));
    let again = b.path().join("again");
    other
        .export(std::fs::File::create(&again).expect("create"))
        .expect("export");
    assert_eq!(
        std::fs::read(&again).expect("a"),
        std::fs::read(&file).expect("b")
    );
}
