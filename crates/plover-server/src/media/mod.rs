//! Images and files: uploads into a staging area, checked and then stored create-only in the
//! object store; downloads for the uploader and for the members a message shares them with;
//! and the collector that removes what no message references any more.
//!
//! The server never sees a file: the SDK encrypts it first (PROTOCOL.md, "Content"), and an
//! object's id is the SHA-256 of the ciphertext. Objects are kept as parts of [`PART`]
//! bytes (`objects/<id>/<n>`), each written with a conditional create, so that a retried or
//! concurrent commit never overwrites anything and no write holds more than one part in
//! memory, on the filesystem and on S3 alike.

mod pool;
mod staging;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use plover_proto::{ConversationId, ErrorCode, ObjectId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

use crate::config::{Config, MediaConfig, MediaStore};
use crate::persist::ObjectRecord;
use crate::router::{Router, RouterError};
pub use staging::Staged;

/// The bytes of one part of a stored object: 1 MiB, what one write holds in memory.
pub const PART: u64 = 1024 * 1024;

/// The most objects one message may reference.
pub const MAX_OBJECTS_PER_MESSAGE: usize = 16;

/// Why a media request failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The object does not exist, or this user may not read it (one answer for both).
    #[error("no such object")]
    NotFound,
    /// The request is wrong (sizes, ranges, a hash that does not match).
    #[error("{0}")]
    Invalid(String),
    /// Over a limit (size, quota, uploads per hour).
    #[error("{0}")]
    Limit(String),
    /// The staging area or the object store failed.
    #[error("media storage: {0}")]
    Storage(String),
    /// The store or the router failed.
    #[error(transparent)]
    Router(#[from] RouterError),
}

impl MediaError {
    /// The error code clients see.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound => ErrorCode::NOT_FOUND,
            Self::Invalid(_) => ErrorCode::INVALID_REQUEST,
            Self::Limit(_) => ErrorCode::LIMIT,
            Self::Storage(_) => ErrorCode::UNAVAILABLE,
            Self::Router(e) => e.code(),
        }
    }

    fn storage(e: impl std::fmt::Display) -> Self {
        Self::Storage(e.to_string())
    }
}

/// Uploads, downloads and the collector, over one object store.
pub struct Media {
    objects: Arc<dyn ObjectStore>,
    /// The `fs` store's directory (where removed objects leave empty directories behind).
    fs_root: Option<std::path::PathBuf>,
    staging: staging::Staging,
    config: MediaConfig,
    router: Router,
    /// Uploads started per user in the current hour: (hour start, count).
    started: Mutex<HashMap<String, (Instant, u32)>>,
    /// One user's uploads together, at `media.upload_rate`.
    uploads: Pacer,
    /// One user's downloads together, at `media.download_rate`.
    downloads: Pacer,
}

/// The burst an upload may send at once before the rate applies: a quarter of a second's
/// worth.
const PACE_BURST: Duration = Duration::from_millis(250);

/// In a cluster, how long the collector waits after dooming objects before it looks for
/// references again: far more than a node takes to apply the log and append what it checked.
const CLUSTER_GRACE: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Media {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Media")
            .field("objects", &self.objects.to_string())
            .finish()
    }
}

/// Holds each user's transfers of one direction, together, to a rate: a token bucket a
/// quarter of a second deep ([`PACE_BURST`]).
#[derive(Debug)]
struct Pacer {
    rate: u64,
    /// When each user may next move bytes.
    next: Mutex<HashMap<String, Instant>>,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            next: Mutex::default(),
        }
    }

    /// `user` moved `bytes` more: when they may move more (`None`: at once).
    fn pace(&self, user: &str, bytes: usize) -> Option<Instant> {
        let rate = self.rate.max(1) as f64;
        let cost = Duration::from_secs_f64(bytes as f64 / rate);
        let now = Instant::now();
        let mut paced = self.next.lock().unwrap_or_else(|p| p.into_inner());
        if paced.len() > 10_000 {
            paced.retain(|_, next| *next > now);
        }
        let next = paced.entry(user.to_owned()).or_insert(now);
        // Idle time earns at most a burst.
        let start = (*next).max(now.checked_sub(PACE_BURST).unwrap_or(now));
        *next = start.checked_add(cost).unwrap_or(start);
        (*next > now).then_some(*next)
    }
}

/// What a download sends: the object's size and the range that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The whole object's size.
    pub size: u64,
    /// The first byte.
    pub offset: u64,
    /// How many bytes.
    pub length: u64,
}

impl Media {
    /// Opens the object store `config.media` names and the staging area under the data
    /// directory.
    pub fn open(config: &Config, router: Router) -> Result<Self, MediaError> {
        let media = &config.media;
        let mut fs_root = None;
        let objects: Arc<dyn ObjectStore> = match media.store {
            MediaStore::Fs => {
                let dir = media
                    .dir
                    .clone()
                    .unwrap_or_else(|| config.data.join("media").join("objects"));
                fs_root = Some(dir.clone());
                std::fs::create_dir_all(&dir).map_err(|e| {
                    MediaError::Storage(format!("cannot create {}: {e}", dir.display()))
                })?;
                // Each part fsynced (and its directory): `Uploaded` means on disk.
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(&dir)
                        .map_err(MediaError::storage)?
                        .with_fsync(true),
                )
            }
            MediaStore::S3 => {
                let Some(s3) = &media.s3 else {
                    return Err(MediaError::Storage(
                        "media.store = \"s3\" needs a [media.s3] section".into(),
                    ));
                };
                // Credentials (and anything else `AWS_*`) from the environment, never from
                // the configuration file.
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    // Create-only writes (`If-None-Match: *`).
                    .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch);
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                Arc::new(builder.build().map_err(MediaError::storage)?)
            }
        };
        let staging = staging::Staging::open(&config.data.join("media").join("staging"))?;
        Ok(Self {
            objects,
            fs_root,
            staging,
            config: media.clone(),
            router,
            started: Mutex::default(),
            uploads: Pacer::new(media.upload_rate),
            downloads: Pacer::new(media.download_rate),
        })
    }

    /// Starts (or resumes) `user`'s upload of `object`, `size` bytes: checks the limits and
    /// returns the staged upload, which already holds the bytes before its `offset`.
    pub async fn begin(
        &self,
        user: &str,
        size: u64,
        object: ObjectId,
    ) -> Result<Staged, MediaError> {
        if size == 0 {
            return Err(MediaError::Invalid(
                "an object has at least one byte".into(),
            ));
        }
        let max = max_object(self.config.max_size);
        if size > max {
            return Err(MediaError::Limit(format!(
                "an object of {size} bytes is over the limit of {max} (media.max_size, {}, \
                 and the encryption's overhead)",
                self.config.max_size
            )));
        }
        self.count_start(user)?;
        // This user's other unfinished uploads on this node count too: staging is bounded
        // by the same quota as storage.
        let staged = self.staging.held_by(user, object).await;
        self.check_quota(user, size, staged).await?;
        self.staging.upload(user, object, size).await
    }

    /// Refuses `size` more bytes for `user` past `media.quota`, counting what they store and
    /// `staged` bytes of their other unfinished uploads (at an upload's start; again at its
    /// commit, with `staged` 0, since other uploads may have been stored meanwhile).
    async fn check_quota(&self, user: &str, size: u64, staged: u64) -> Result<(), MediaError> {
        let usage = {
            let user = user.to_owned();
            self.router
                .with_store(move |store, _| Ok(store.media_usage(&user)?))
                .await?
        };
        if usage.saturating_add(staged).saturating_add(size) > self.config.quota {
            return Err(MediaError::Limit(format!(
                "{user} keeps {usage} bytes of objects and {staged} in unfinished uploads; \
                 {size} more is over the quota of {} (media.quota)",
                self.config.quota
            )));
        }
        Ok(())
    }

    /// Counts an upload's start against the user's hourly budget.
    fn count_start(&self, user: &str) -> Result<(), MediaError> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if started.len() > 10_000 {
            started.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(3600));
        }
        let entry = started.entry(user.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(3600) {
            *entry = (now, 0);
        }
        if entry.1 >= self.config.uploads_per_hour {
            return Err(MediaError::Limit(format!(
                "{user} started {} uploads this hour, the most allowed (media.uploads_per_hour)",
                entry.1
            )));
        }
        entry.1 = entry.1.saturating_add(1);
        Ok(())
    }

    /// `user`'s uploads took `bytes` more: when they may read again (`None`: at once), so
    /// that together they go no faster than `media.upload_rate`.
    pub fn pace_upload(&self, user: &str, bytes: usize) -> Option<Instant> {
        self.uploads.pace(user, bytes)
    }

    /// `user`'s downloads sent `bytes` more: when they may send again (`None`: at once), so
    /// that together they go no faster than `media.download_rate`.
    pub fn pace_download(&self, user: &str, bytes: usize) -> Option<Instant> {
        self.downloads.pace(user, bytes)
    }

    /// Stores a complete, checked upload: its parts (create-only), then its record; the
    /// staged bytes go.
    pub async fn commit(&self, user: &str, staged: Staged) -> Result<ObjectId, MediaError> {
        let (object, size) = (staged.object(), staged.size());
        self.check_quota(user, size, 0).await?;
        // The same bytes may be stored already, or be on their way out: parts the collector
        // is deleting must not count as written (`AlreadyExists` below).
        let before = self.stored_state(object).await?;
        let mut part = 0u64;
        let mut source = staged.reader().await?;
        loop {
            let bytes = source.part(PART).await?;
            if bytes.is_empty() {
                break;
            }
            let path = part_path(&object, part);
            let put = self
                .objects
                .put_opts(
                    &path,
                    PutPayload::from(bytes),
                    PutOptions::from(PutMode::Create),
                )
                .await;
            match put {
                Ok(_) => {}
                // A retried or concurrent commit of the same bytes (the id is their hash).
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(MediaError::storage(e)),
            }
            part = part.saturating_add(1);
        }
        let collect_at = crate::clock::now_ms().saturating_add(
            u64::try_from(self.config.expire_after.as_millis()).unwrap_or(u64::MAX),
        );
        let who = user.to_owned();
        let written = self
            .router
            .with_store(move |store, writer| {
                // Removed while these parts were written (doomed, or gone and stored again):
                // some of the parts this commit found in place may be gone.
                let now = match (store.doomed_object(&object)?, store.object(&object)?) {
                    (Some(_), _) => return Ok(false),
                    (None, record) => record,
                };
                if let Some(was) = before
                    && now.as_ref().map(|r| r.stored_ms) != Some(was)
                {
                    return Ok(false);
                }
                let mut record = now.unwrap_or(ObjectRecord {
                    size,
                    stored_ms: crate::clock::now_ms(),
                    uploaders: Vec::new(),
                });
                let usage = if record.uploaders.contains(&who) {
                    None
                } else {
                    record.uploaders.push(who.clone());
                    Some(store.media_usage(&who)?.saturating_add(size))
                };
                writer.write(Box::new(move |b| {
                    b.put_object(
                        &object,
                        &record,
                        usage.as_ref().map(|u| (who.as_str(), *u)),
                        collect_at,
                    );
                }))?;
                Ok(true)
            })
            .await?;
        if !written {
            return Err(being_removed(object));
        }
        staged.remove().await;
        info!(%object, size, parts = part, "object stored");
        Ok(object)
    }

    /// When the object now stored under this id was stored (`None`: it is not), refusing
    /// one the collector is removing.
    async fn stored_state(&self, object: ObjectId) -> Result<Option<u64>, MediaError> {
        let (doomed, record) = self
            .router
            .with_store(move |store, _| Ok((store.doomed_object(&object)?, store.object(&object)?)))
            .await?;
        if doomed.is_some() {
            return Err(being_removed(object));
        }
        Ok(record.map(|r| r.stored_ms))
    }

    /// Checks that `user` may read `object` (as its uploader when `conversation` is 0, else
    /// as a member who sees message `seq` of `conversation`, which references it) and
    /// resolves the range asked for (`length` 0: to the end).
    pub async fn authorize(
        &self,
        user: &str,
        object: ObjectId,
        conversation: ConversationId,
        seq: u64,
        offset: u64,
        length: u64,
    ) -> Result<Range, MediaError> {
        let mut record = self.readable(user, object, conversation, seq).await?;
        if record.is_none() && self.router.in_cluster() {
            // Sent through another node a moment ago: this node may not have applied it yet.
            self.router.settle_all().await?;
            record = self.readable(user, object, conversation, seq).await?;
        }
        let size = record.ok_or(MediaError::NotFound)?.size;
        if offset > size {
            return Err(MediaError::Invalid(format!(
                "offset {offset} is past the object's end ({size} bytes)"
            )));
        }
        let left = size.saturating_sub(offset);
        let length = if length == 0 { left } else { length };
        if length > left {
            return Err(MediaError::Invalid(format!(
                "{length} bytes from {offset} is past the object's end ({size} bytes)"
            )));
        }
        Ok(Range {
            size,
            offset,
            length,
        })
    }

    /// `object`'s record if `user` may read it (see [`Media::authorize`]).
    async fn readable(
        &self,
        user: &str,
        object: ObjectId,
        conversation: ConversationId,
        seq: u64,
    ) -> Result<Option<ObjectRecord>, MediaError> {
        let who = user.to_owned();
        Ok(self
            .router
            .with_store(move |store, _| {
                let Some(record) = store.object(&object)? else {
                    return Ok(None);
                };
                if conversation == 0 {
                    return Ok(record.uploaders.contains(&who).then_some(record));
                }
                if store.object_ref(&object, conversation, seq)?.is_none() {
                    return Ok(None);
                }
                // A member who joined after the message, or who cleared it, does not see it.
                let since = store
                    .conversation(conversation)?
                    .and_then(|c| c.member(&who).map(|m| m.since));
                let sees = match since {
                    Some(since) if since <= seq => store.cleared(conversation, &who)? < seq,
                    _ => false,
                };
                Ok(sees.then_some(record))
            })
            .await?)
    }

    /// The object's bytes from `at`, at most `max` of them and never past `end` (nor past
    /// the part that holds `at`): a download reads its range piece by piece with this.
    pub async fn read(
        &self,
        object: ObjectId,
        at: u64,
        end: u64,
        max: u64,
    ) -> Result<Bytes, MediaError> {
        let part = at / PART;
        let within = at % PART;
        let take = PART
            .saturating_sub(within)
            .min(end.saturating_sub(at))
            .min(max.max(1));
        let bytes = self
            .objects
            .get_range(
                &part_path(&object, part),
                within..within.saturating_add(take),
            )
            .await
            .map_err(MediaError::storage)?;
        if bytes.is_empty() && take > 0 {
            return Err(MediaError::Storage(format!(
                "object {object} ends early, at {at} bytes"
            )));
        }
        Ok(bytes)
    }

    /// `user` fetched all of `object` through message `seq` of `conversation`: under
    /// `until_delivered` they are no longer waited for, and the reference goes with the last.
    pub async fn fetched(
        &self,
        user: &str,
        object: ObjectId,
        conversation: ConversationId,
        seq: u64,
    ) -> Result<(), MediaError> {
        let who = user.to_owned();
        self.router
            .with_store(move |store, writer| {
                let Some(mut record) = store.object_ref(&object, conversation, seq)? else {
                    return Ok(());
                };
                if !record.pending.contains(&who) {
                    return Ok(());
                }
                record.pending.retain(|u| *u != who);
                let left = (!record.pending.is_empty()).then_some(record);
                writer.write(Box::new(move |b| {
                    b.put_ref(&object, conversation, seq, left.as_ref());
                }))?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Removes this node's unfinished uploads untouched for `media.expire_after`.
    pub async fn expire_uploads(&self) {
        self.staging.expire(self.config.expire_after).await;
    }

    /// One pass of the collector: removes the objects no message references whose time
    /// came (`g` entries). Returns how many it removed.
    ///
    /// In three steps, so that a message sent meanwhile never references a removed object:
    /// each object due and unreferenced is first doomed (its record leaves `o`, which every
    /// new reference is checked against); then the collector waits until every message
    /// sequenced before that is stored ([`Router::settle_all`]); then it looks for references
    /// again, restores the objects that have one, and deletes the others' parts. Objects a
    /// pass doomed but did not finish (the server stopped) are finished by the next.
    pub async fn collect(&self) -> Result<u64, MediaError> {
        let now = crate::clock::now_ms();
        let due = self
            .router
            .with_store(move |store, _| Ok(store.objects_due(now)?))
            .await?;
        for object in due {
            self.router
                .with_store(move |store, writer| {
                    let record = store.object(&object)?;
                    let referenced = store.object_referenced(&object)?;
                    writer.write(Box::new(move |b| match record {
                        Some(record) if !referenced => b.doom_object(&object, &record),
                        _ => b.object_kept(&object),
                    }))?;
                    Ok(())
                })
                .await?;
        }
        let doomed = self
            .router
            .with_store(|store, _| Ok(store.doomed_objects()?))
            .await?;
        if doomed.is_empty() {
            return Ok(0);
        }
        self.router.settle_all().await?;
        if self.router.in_cluster() {
            // A node that checked a `SendWith` before it applied the doom appends it to the
            // log within moments: let it land, then look again.
            tokio::time::sleep(CLUSTER_GRACE).await;
            self.router.settle_all().await?;
        }
        let mut removed = 0u64;
        for object in doomed {
            let (referenced, record) = self
                .router
                .with_store(move |store, _| {
                    Ok((
                        store.object_referenced(&object)?,
                        store.doomed_object(&object)?,
                    ))
                })
                .await?;
            let Some(record) = record else { continue };
            if referenced {
                self.router
                    .with_store(move |_, writer| {
                        writer.write(Box::new(move |b| b.restore_object(&object, &record)))?;
                        Ok(())
                    })
                    .await?;
                info!(%object, "object kept: a message sent as it was due references it");
                continue;
            }
            self.remove_parts(&object).await?;
            let size = record.size;
            self.router
                .with_store(move |store, writer| {
                    let mut usage = Vec::new();
                    for user in record.uploaders {
                        let now = store.media_usage(&user)?.saturating_sub(size);
                        usage.push((user, now));
                    }
                    writer.write(Box::new(move |b| b.remove_object(&object, &usage)))?;
                    Ok(())
                })
                .await?;
            debug!(%object, "object removed: no message references it");
            removed = removed.saturating_add(1);
        }
        if removed > 0 {
            info!(removed, "removed objects no message references");
        }
        Ok(removed)
    }

    async fn remove_parts(&self, object: &ObjectId) -> Result<(), MediaError> {
        use futures_util::StreamExt;
        let prefix = StorePath::from(format!("objects/{}", object.hex()));
        let mut listed = self.objects.list(Some(&prefix));
        let mut paths = Vec::new();
        while let Some(meta) = listed.next().await {
            paths.push(meta.map_err(MediaError::storage)?.location);
        }
        for path in paths {
            match self.objects.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    warn!(%path, error = %e, "cannot remove a part; the next pass tries again");
                    return Err(MediaError::storage(e));
                }
            }
        }
        // The filesystem store leaves the object's directory behind, empty.
        if let Some(root) = &self.fs_root {
            let _ = tokio::fs::remove_dir(root.join("objects").join(object.hex())).await;
        }
        Ok(())
    }
}

/// The largest object for files of at most `max_size` bytes: the SDK's encryption adds 16
/// bytes per 64 KiB chunk (1/4096), and a little slack for other clients' formats.
pub fn max_object(max_size: u64) -> u64 {
    max_size
        .saturating_add(max_size / 4096)
        .saturating_add(4096)
}

/// The answer to an upload of bytes the collector is removing: the staged upload is kept,
/// and the same upload a moment later stores them again.
fn being_removed(object: ObjectId) -> MediaError {
    MediaError::Storage(format!(
        "object {object} is being removed as unreferenced; upload it again in a moment"
    ))
}

/// Where part `n` of an object lives in the object store.
fn part_path(object: &ObjectId, n: u64) -> StorePath {
    StorePath::from(format!("objects/{}/{n:06}", object.hex()))
}
