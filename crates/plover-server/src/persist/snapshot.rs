//! Snapshots of the whole store, for a cluster: a node that joins, or that was away while
//! the replicated log before it was removed, loads the latest snapshot and applies the log
//! from the snapshot's position (`cluster/replica.rs`).
//!
//! The format: `PLOVSNP1`, the log position the snapshot holds (stream sequence u64, entry
//! index u32, both big-endian), then one record per key (keyspace u8, key length u32, key,
//! value length u32, value), then the end marker 0xff, then the xxh3 of everything before it
//! (u64). It is read from one fjall snapshot, so it is a consistent state: exactly the store
//! after the entries up to its position.

use std::io::{Read, Write};

use super::batch::Ks;
use super::{Store, StoreError};

const MAGIC: &[u8; 8] = b"PLOVSNP1";
const END: u8 = 0xff;
/// Writes per batch while loading or clearing.
const BATCH: usize = 10_000;

fn corrupt(message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        keyspace: "snapshot",
        message: message.into(),
    }
}

fn io(e: std::io::Error) -> StoreError {
    corrupt(format!("I/O: {e}"))
}

/// Writes through to `out` and hashes what it wrote.
struct Hashed<W> {
    out: W,
    hash: xxhash_rust::xxh3::Xxh3,
}

impl<W: Write> Hashed<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.hash.update(bytes);
        self.out.write_all(bytes).map_err(io)
    }
}

/// Reads from `input` and hashes what it read.
struct Checked<R> {
    input: R,
    hash: xxhash_rust::xxh3::Xxh3,
}

impl<R: Read> Checked<R> {
    fn take(&mut self, n: usize) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; n];
        self.input
            .read_exact(&mut buf)
            .map_err(|e| corrupt(format!("truncated: {e}")))?;
        self.hash.update(&buf);
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }
}

/// Reads a snapshot's header and records, handing each record to `each`; checks the end
/// marker and the checksum. Returns the snapshot's log position.
fn read_records<R: Read>(
    input: R,
    mut each: impl FnMut(Ks, Vec<u8>, Vec<u8>) -> Result<(), StoreError>,
) -> Result<(u64, u32), StoreError> {
    let mut r = Checked {
        input,
        hash: xxhash_rust::xxh3::Xxh3::new(),
    };
    if r.take(8)? != MAGIC {
        return Err(corrupt("not a plover snapshot"));
    }
    let at = (r.u64()?, r.u32()?);
    loop {
        let ks = r.take(1)?[0];
        if ks == END {
            break;
        }
        let ks = *Ks::ALL
            .get(usize::from(ks))
            .ok_or_else(|| corrupt(format!("unknown keyspace {ks}")))?;
        let key_len = r.u32()? as usize;
        let key = r.take(key_len)?;
        let value_len = r.u32()? as usize;
        let value = r.take(value_len)?;
        each(ks, key, value)?;
    }
    let sum = r.hash.digest();
    let mut stored = [0u8; 8];
    r.input
        .read_exact(&mut stored)
        .map_err(|e| corrupt(format!("no checksum: {e}")))?;
    if u64::from_be_bytes(stored) != sum {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(at)
}

impl Store {
    /// Writes a consistent copy of the whole store to `out`; returns the log position it
    /// holds, or `None` (and writes nothing) when the store holds no entry of a log.
    pub fn export(&self, out: impl Write) -> Result<Option<(u64, u32)>, StoreError> {
        use fjall::Readable;
        let snapshot = self.db.snapshot();
        let applied = snapshot.get(self.keyspace(Ks::Meta), "applied")?;
        let Some(applied) = applied
            .as_deref()
            .and_then(super::conversations::applied_of)
        else {
            return Ok(None);
        };
        let mut w = Hashed {
            out,
            hash: xxhash_rust::xxh3::Xxh3::new(),
        };
        w.put(MAGIC)?;
        w.put(&applied.0.to_be_bytes())?;
        w.put(&applied.1.to_be_bytes())?;
        for (i, ks) in Ks::ALL.iter().enumerate() {
            for guard in snapshot.iter(self.keyspace(*ks)) {
                let (key, value) = guard.into_inner()?;
                w.put(&[i as u8])?;
                w.put(&(key.len() as u32).to_be_bytes())?;
                w.put(&key)?;
                w.put(&(value.len() as u32).to_be_bytes())?;
                w.put(&value)?;
            }
        }
        w.put(&[END])?;
        let sum = w.hash.digest();
        w.out.write_all(&sum.to_be_bytes()).map_err(io)?;
        w.out.flush().map_err(io)?;
        Ok(Some(applied))
    }

    /// Checks the snapshot in `file` (its checksum), then replaces the whole store with it;
    /// returns the log position it holds. Nothing is changed when the check fails.
    pub fn import(&self, file: &std::path::Path) -> Result<(u64, u32), StoreError> {
        let open = || {
            std::fs::File::open(file)
                .map(std::io::BufReader::new)
                .map_err(io)
        };
        read_records(open()?, |_, _, _| Ok(()))?;
        // Everything goes, then the snapshot's keys come, in batches (each durable).
        for ks in Ks::ALL {
            let keyspace = self.keyspace(ks).clone();
            loop {
                let keys: Vec<_> = keyspace
                    .iter()
                    .take(BATCH)
                    .map(|g| g.key())
                    .collect::<Result<_, _>>()?;
                if keys.is_empty() {
                    break;
                }
                let mut batch = self.db.batch();
                for key in keys {
                    batch.remove(&keyspace, key);
                }
                batch.durability(Some(self.mode())).commit()?;
            }
        }
        let mut batch = self.batch();
        let at = read_records(open()?, |ks, key, value| {
            batch.apply(&[super::Op {
                ks,
                key,
                value: Some(value),
            }]);
            if batch.len() >= BATCH {
                std::mem::replace(&mut batch, self.batch()).commit()?;
            }
            Ok(())
        })?;
        batch.commit()?;
        Ok(at)
    }
}
