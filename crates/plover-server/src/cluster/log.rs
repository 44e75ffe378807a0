//! A shard's replicated log: one JetStream stream, one subject per shard, fenced appends.
//!
//! The building block of the cluster's durable writes (ARCHITECTURE.md, "The replicated log
//! and one message from n1 to n2"): the owner of a shard appends one batch at a time to its
//! shard's subject, each append carrying the sequence it expects to be the subject's last
//! (`Nats-Expected-Last-Subject-Sequence`). JetStream acknowledges once a quorum of servers
//! has the batch (and, with `sync_interval: always`, has fsynced it); a writer that missed
//! someone else's append is refused ([`AppendError::Deposed`]), so two owners of one shard
//! can never both write. Every record carries its own checksum (xxh3 of its bytes), checked
//! when it is read back: JetStream does not repair a corrupted replica, and a bad record must
//! stop a replay rather than be applied.
//!
//! `plover bench log` measures this writer; the router will append through it.

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use std::time::Duration;

use super::ClusterError;
use crate::config::ClusterConfig;

/// JetStream's answer to an expected last subject sequence it cannot check yet (the stream
/// leader has not applied the subject's previous append): nothing was stored, and the same
/// append may be sent again. Not 10071 ("wrong last sequence: N"), another writer's win.
pub const NOT_READY: u64 = 10164;

/// How many times an append answered [`NOT_READY`] is sent again before it fails.
const NOT_READY_RETRIES: u32 = 100;

/// The checksum's size, in front of every record.
const CHECKSUM: usize = 8;

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The subject's last sequence is not the one expected: another writer appended. The
    /// writer has been deposed and must stop writing this shard.
    #[error("shard {shard}: another writer appended after sequence {expected} (deposed)")]
    Deposed {
        /// The shard.
        shard: u32,
        /// The sequence this writer expected to be the last.
        expected: u64,
    },
    /// JetStream did not take the append (unreachable, no quorum, timed out). Whether it
    /// was stored is unknown until the subject's last sequence is read again.
    #[error("shard {shard}: append failed: {reason}")]
    Failed {
        /// The shard.
        shard: u32,
        /// Why.
        reason: String,
    },
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// A record's checksum does not match its bytes.
    #[error("shard {shard}: the record at sequence {sequence} is corrupt (checksum mismatch)")]
    Corrupt {
        /// The shard.
        shard: u32,
        /// The stream sequence of the record.
        sequence: u64,
    },
    /// JetStream could not be read.
    #[error("shard {shard}: read failed: {reason}")]
    Failed {
        /// The shard.
        shard: u32,
        /// Why.
        reason: String,
    },
}

/// A record in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its stream sequence: what the next append of the shard expects.
    pub sequence: u64,
    /// How many times JetStream answered [`NOT_READY`] before it took the append.
    pub not_ready: u32,
}

/// One stream of shard logs.
#[derive(Debug, Clone)]
pub struct ShardLog {
    js: jetstream::Context,
    stream: String,
}

impl ShardLog {
    /// Binds the stream `name` (subjects `<name>.<shard>`), creating it on first use with
    /// `cluster.replicas` replicas in files.
    pub async fn open(
        js: jetstream::Context,
        name: &str,
        config: &ClusterConfig,
    ) -> Result<Self, ClusterError> {
        js.create_or_update_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{name}.*")],
            num_replicas: config.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| ClusterError::js("log stream", format!("{name}: {e}")))?;
        Ok(Self {
            js,
            stream: name.to_owned(),
        })
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.stream
    }

    fn subject(&self, shard: u32) -> String {
        format!("{}.{shard}", self.stream)
    }

    /// Deletes the stream and every shard's log (`plover bench log` cleans up with it).
    pub async fn delete(self) -> Result<(), ClusterError> {
        self.js
            .delete_stream(&self.stream)
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::js("delete log stream", e))
    }

    /// The sequence of the shard's last record, 0 if it has none: what a new owner expects
    /// before its first append (after replaying up to it).
    pub async fn last(&self, shard: u32) -> Result<u64, ReadError> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| ReadError::Failed {
                shard,
                reason: e.to_string(),
            })?;
        match stream
            .get_last_raw_message_by_subject(&self.subject(shard))
            .await
        {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(ReadError::Failed {
                shard,
                reason: e.to_string(),
            }),
        }
    }

    /// Appends `record` to the shard's log if its last sequence is still `expected`. An
    /// append answered [`NOT_READY`] is sent again (after 1 ms, up to 100 times).
    pub async fn append(
        &self,
        shard: u32,
        expected: u64,
        record: &[u8],
    ) -> Result<Appended, AppendError> {
        let payload = seal(record);
        let mut not_ready = 0;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
            let failed = |e: &dyn std::fmt::Display| AppendError::Failed {
                shard,
                reason: e.to_string(),
            };
            let answer = self
                .js
                .publish_with_headers(self.subject(shard), headers, payload.clone())
                .await
                .map_err(|e| failed(&e))?
                .await;
            match answer {
                Ok(ack) => {
                    return Ok(Appended {
                        sequence: ack.sequence,
                        not_ready,
                    });
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(AppendError::Deposed { shard, expected });
                }
                Err(e) if error_code(&e) == Some(NOT_READY) && not_ready < NOT_READY_RETRIES => {
                    not_ready += 1;
                    metrics::counter!(crate::metrics::names::LOG_NOT_READY).increment(1);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(failed(&e)),
            }
        }
    }

    /// The shard's records after sequence `after`, in order, up to the last one there was
    /// when the read began: (sequence, record). A corrupt record ends the read with
    /// [`ReadError::Corrupt`].
    pub async fn read(&self, shard: u32, after: u64) -> Result<Vec<(u64, Bytes)>, ReadError> {
        let failed = |e: &dyn std::fmt::Display| ReadError::Failed {
            shard,
            reason: e.to_string(),
        };
        let last = self.last(shard).await?;
        if last <= after {
            return Ok(Vec::new());
        }
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| failed(&e))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subject(shard),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after.saturating_add(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
        let mut records = Vec::new();
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| failed(&e))?;
            let sequence = message.info().map_err(|e| failed(&e))?.stream_sequence;
            let record = open(&message.payload).ok_or(ReadError::Corrupt { shard, sequence })?;
            records.push((sequence, record));
            if sequence >= last {
                break;
            }
        }
        Ok(records)
    }
}

/// A record with its checksum in front.
pub(super) fn seal(record: &[u8]) -> Bytes {
    let mut sealed = BytesMut::with_capacity(CHECKSUM + record.len());
    sealed.put_u64(xxhash_rust::xxh3::xxh3_64(record));
    sealed.put_slice(record);
    sealed.freeze()
}

/// The record inside `sealed`, if its checksum matches.
pub(super) fn open(sealed: &Bytes) -> Option<Bytes> {
    let sum = u64::from_be_bytes(sealed.get(..CHECKSUM)?.try_into().ok()?);
    let record = sealed.slice(CHECKSUM..);
    (xxhash_rust::xxh3::xxh3_64(&record) == sum).then_some(record)
}

/// The JetStream error code behind a failed publish, if the server sent one.
fn error_code(e: &jetstream::context::PublishError) -> Option<u64> {
    std::error::Error::source(e)?
        .downcast_ref::<jetstream::Error>()
        .map(|e| e.error_code().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_and_a_changed_one_does_not() {
        let sealed = seal(b"a batch of records");
        assert_eq!(open(&sealed).as_deref(), Some(&b"a batch of records"[..]));
        let mut bent = sealed.to_vec();
        if let Some(last) = bent.last_mut() {
            *last ^= 1;
        }
        assert_eq!(open(&Bytes::from(bent)), None);
        assert_eq!(open(&Bytes::from_static(b"short")), None);
        assert_eq!(open(&seal(b"")).as_deref(), Some(&b""[..]));
    }
}
