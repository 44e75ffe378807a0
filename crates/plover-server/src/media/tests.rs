//! The collector against messages sent while it removes objects, over a real store, router
//! and filesystem object store.

use std::sync::Arc;

use sha2::Digest;

use super::{Media, MediaError};
use crate::config::{Config, Durability};
use crate::persist::Store;
use crate::router::{Router, RouterError};
use plover_proto::{ClientMsgId, ConversationId, ObjectId, Target};

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    router: Router,
    media: Media,
    conversation: ConversationId,
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

async fn setup_with(tweak: impl FnOnce(&mut Config)) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path(), Durability::Buffered).expect("open"));
    let mut config = Config {
        data: dir.path().join("data"),
        ..Config::default()
    };
    tweak(&mut config);
    let router = Router::start(store.clone(), &config).expect("router");
    for user in ["alice", "bob"] {
        store.ensure_user(&*store, user, 1).expect("user");
    }
    let conversation = router
        .open("alice", Target::Direct("bob".into()), true)
        .await
        .expect("open")
        .conversation;
    let media = Media::open(&config, router.clone()).expect("media");
    Setup {
        _dir: dir,
        store,
        router,
        media,
        conversation,
    }
}

/// Uploads `bytes` as alice and stores them.
async fn upload(media: &Media, bytes: &[u8]) -> Result<ObjectId, MediaError> {
    let object = ObjectId(sha2::Sha256::digest(bytes).into());
    let mut staged = media.begin("alice", bytes.len() as u64, object).await?;
    let have = usize::try_from(staged.offset()).expect("offset");
    staged.append(&bytes[have..]).await?;
    let staged = staged.finish().await?;
    media.commit("alice", staged).await
}

async fn send_with(s: &Setup, object: ObjectId) -> Result<u64, RouterError> {
    let rx = s
        .router
        .send_referencing(
            s.conversation,
            "alice",
            "phone",
            ClientMsgId::random(),
            bytes::Bytes::from_static(b"pointer"),
            vec![object],
            0,
        )
        .await?;
    Ok(rx.await.map_err(|_| RouterError::ShuttingDown)??.seq)
}

/// Writes a batch through the router's writer, as the collector does.
async fn write(s: &Setup, f: impl FnOnce(&mut crate::persist::StoreBatch<'_>) + Send + 'static) {
    s.router
        .with_store(move |_, writer| {
            writer.write(Box::new(f))?;
            Ok(())
        })
        .await
        .expect("write");
}

fn parts(s: &Setup, object: &ObjectId) -> usize {
    let dir = s
        .media
        .fs_root
        .as_ref()
        .expect("fs store")
        .join("objects")
        .join(object.hex());
    std::fs::read_dir(dir).map_or(0, Iterator::count)
}

async fn stop(s: Setup) {
    let router = s.router.clone();
    drop(s.media);
    tokio::task::spawn_blocking(move || router.shutdown_blocking())
        .await
        .expect("join")
        .ok();
}

/// Once the collector has doomed an object, a message that names it is refused with
/// `not_found` and never takes a seq; the next pass removes the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_naming_a_doomed_object_is_refused() {
    let s = setup().await;
    let object = upload(&s.media, b"ciphertext of a photo")
        .await
        .expect("upload");
    let record = s.store.object(&object).expect("read").expect("stored");
    write(&s, move |b| b.doom_object(&object, &record)).await;

    let refused = send_with(&s, object).await.expect_err("refused");
    assert!(
        matches!(refused, RouterError::NoObject(o) if o == object),
        "{refused:?}"
    );
    assert_eq!(
        s.store.last_seq(s.conversation).expect("seq"),
        0,
        "no seq was taken"
    );

    assert_eq!(s.media.collect().await.expect("collect"), 1);
    assert_eq!(parts(&s, &object), 0, "its parts are gone");
    assert!(s.store.doomed_object(&object).expect("read").is_none());
    assert_eq!(s.store.media_usage("alice").expect("usage"), 0);
    stop(s).await;
}

/// A message sequenced before the object was doomed, whose references land after, keeps
/// the object: the collector looks again once every shard settled, and restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_that_lands_after_the_doom_keeps_the_object() {
    let s = setup().await;
    let object = upload(&s.media, b"ciphertext of a photo")
        .await
        .expect("upload");
    let record = s.store.object(&object).expect("read").expect("stored");
    // What a message checked before the doom leaves behind once it commits after it.
    let conversation = s.conversation;
    write(&s, move |b| {
        b.doom_object(&object, &record);
        b.put_refs(
            conversation,
            1,
            1,
            &crate::persist::MediaRefs {
                objects: vec![object],
                pending: Vec::new(),
            },
        );
    })
    .await;

    assert_eq!(
        s.media.collect().await.expect("collect"),
        0,
        "nothing removed"
    );
    assert!(
        s.store.object(&object).expect("read").is_some(),
        "stored again"
    );
    assert!(s.store.doomed_object(&object).expect("read").is_none());
    assert_eq!(parts(&s, &object), 1, "its part is still there");
    // And a new message may name it again.
    send_with(&s, object).await.expect("sent");
    stop(s).await;
}

/// An upload of bytes the collector is removing is refused (its parts may be going) and
/// succeeds once they are gone, writing them anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_of_a_doomed_object_waits_for_its_removal() {
    let s = setup().await;
    let bytes = b"ciphertext of a photo";
    let object = upload(&s.media, bytes).await.expect("upload");
    let record = s.store.object(&object).expect("read").expect("stored");
    write(&s, move |b| b.doom_object(&object, &record)).await;

    let refused = upload(&s.media, bytes).await.expect_err("refused");
    assert!(matches!(refused, MediaError::Storage(_)), "{refused:?}");
    assert!(refused.to_string().contains("being removed"), "{refused}");

    assert_eq!(s.media.collect().await.expect("collect"), 1);
    assert_eq!(parts(&s, &object), 0);
    assert_eq!(upload(&s.media, bytes).await.expect("upload again"), object);
    assert_eq!(parts(&s, &object), 1, "written anew");
    send_with(&s, object).await.expect("sent");
    stop(s).await;
}

/// The quota counts the bytes a user's unfinished uploads hold on this node, not only what
/// they store: many half-finished uploads cannot fill the staging disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_uploads_count_against_the_quota() {
    let s = setup_with(|c| c.media.quota = 10_000).await;
    // 6,000 bytes of an 8,000-byte upload arrive, then the connection is cut.
    let big = vec![7u8; 8_000];
    let object = ObjectId(sha2::Sha256::digest(&big).into());
    let mut staged = s.media.begin("alice", 8_000, object).await.expect("begin");
    staged.append(&big[..6_000]).await.expect("append");
    staged.flush().await.expect("flush");
    drop(staged);
    // Another of 5,000 would make 11,000: refused, and the message says why.
    let other = vec![9u8; 5_000];
    let refused = upload(&s.media, &other).await.expect_err("over the quota");
    assert!(matches!(refused, MediaError::Limit(_)), "{refused:?}");
    assert!(
        refused.to_string().contains("6000 in unfinished uploads"),
        "{refused}"
    );
    // Resuming the first is not counted against itself, and completes.
    let mut staged = s.media.begin("alice", 8_000, object).await.expect("resume");
    assert_eq!(staged.offset(), 6_000);
    staged.append(&big[6_000..]).await.expect("append");
    let staged = staged.finish().await.expect("finish");
    s.media.commit("alice", staged).await.expect("commit");
    // Someone else's unfinished uploads are theirs.
    let mut bobs = s
        .media
        .begin("bob", 8_000, object)
        .await
        .expect("bob begins");
    bobs.append(&big[..4_000]).await.expect("append");
    bobs.flush().await.expect("flush");
    drop(bobs);
    assert!(upload(&s.media, &vec![1u8; 1_000]).await.is_ok());
    stop(s).await;
}
