//! The store's group commit and the router's sequencing path, on a real store in a temporary
//! directory: what one message costs from `Router::send` to its durable ack, for a direct
//! conversation and for a group of 1000 members.
#![allow(missing_docs)]

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use plover_proto::{ClientMsgId, Message, Target};
use plover_server::config::{Config, Durability};
use plover_server::persist::Store;
use plover_server::router::Router;
use std::sync::Arc;
use std::time::Duration;

fn message(conv: u64, seq: u64) -> Message {
    Message {
        conversation: conv,
        seq,
        from: "alice".into(),
        device: "phone".into(),
        ts: 1_795_000_000_000,
        id: ClientMsgId::random(),
        body: Bytes::from(vec![b'x'; 64]),
        change: None,
    }
}

fn store_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_append");
    group.measurement_time(Duration::from_secs(5));
    for batch in [1usize, 100, 1000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), Durability::Sync).expect("open");
        let mut seq = 0;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("fsync_batch", batch), &batch, |b, &n| {
            b.iter(|| {
                let mut w = store.batch();
                for _ in 0..n {
                    seq += 1;
                    w.put_message(&message(1, seq));
                }
                w.commit().expect("commit");
            })
        });
    }
    group.finish();
}

struct Setup {
    _dir: tempfile::TempDir,
    router: Router,
    direct: u64,
    group: u64,
}

fn setup(rt: &tokio::runtime::Runtime, durability: Durability) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        data: dir.path().join("data"),
        ..Config::default()
    };
    let store = Arc::new(Store::open(&config.data, durability).expect("open"));
    let _runtime = rt.enter();
    let router = Router::start(store.clone(), &config).expect("router");
    let members: Vec<String> = (0..999).map(|i| format!("m{i:03}")).collect();
    for m in members
        .iter()
        .chain(["alice".to_string(), "bob".to_string()].iter())
    {
        store.ensure_user(&*store, m, 1).expect("user");
    }
    let (direct, group) = rt.block_on(async {
        let direct = router
            .open("alice", Target::Direct("bob".into()), true)
            .await
            .expect("open")
            .conversation;
        let group = router
            .create_group(
                "alice",
                "d",
                "town",
                &members,
                plover_proto::Retention::Keep,
            )
            .await
            .expect("group");
        (direct, group)
    });
    Setup {
        _dir: dir,
        router,
        direct,
        group,
    }
}

fn router_send(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("router_send");
    group.measurement_time(Duration::from_secs(5));
    for (name, durability) in [
        ("sync", Durability::Sync),
        ("buffered", Durability::Buffered),
    ] {
        let s = setup(&rt, durability);
        for (kind, conv) in [("direct", s.direct), ("group1000", s.group)] {
            // One message at a time: the latency of the path, fsync included.
            group.bench_function(format!("{kind}_{name}_one"), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let rx = s
                            .router
                            .send(
                                conv,
                                "alice",
                                "phone",
                                ClientMsgId::random(),
                                Bytes::from_static(b"hello"),
                                0,
                            )
                            .await
                            .expect("queued");
                        rx.await.expect("answer").expect("stored")
                    })
                })
            });
            // 256 in flight: what group commit makes of it.
            group.throughput(Throughput::Elements(256));
            group.bench_function(format!("{kind}_{name}_256_in_flight"), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let mut acks = Vec::with_capacity(256);
                        for _ in 0..256 {
                            acks.push(
                                s.router
                                    .send(
                                        conv,
                                        "alice",
                                        "phone",
                                        ClientMsgId::random(),
                                        Bytes::from_static(b"hello"),
                                        0,
                                    )
                                    .await
                                    .expect("queued"),
                            );
                        }
                        for rx in acks {
                            rx.await.expect("answer").expect("stored");
                        }
                    })
                })
            });
            group.throughput(Throughput::Elements(1));
        }
        let router = s.router.clone();
        rt.block_on(async {
            tokio::task::spawn_blocking(move || router.shutdown_blocking())
                .await
                .expect("join")
                .expect("shutdown");
        });
    }
    group.finish();
}

/// What measuring one direct message's stages costs, with the Prometheus recorder the binary
/// installs: the clock reads of its stamps, its shared record, and the histogram updates of
/// its answer and of one delivery.
fn stage_recording(c: &mut Criterion) {
    use plover_server::router::timing::{StageRecorder, Stamps, Traced};
    use std::time::Instant;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                plover_server::metrics::names::STAGE_SECONDS.to_owned(),
            ),
            &plover_server::metrics::stage_buckets(),
        )
        .expect("buckets")
        .install_recorder()
        .expect("recorder");
    let stages = StageRecorder {
        enabled: true,
        slow: Duration::from_secs(60),
    };
    let mut group = c.benchmark_group("stages");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_direct_message", |b| {
        let mut n = 0u32;
        b.iter(|| {
            let mut stamps = Stamps::new(Instant::now());
            stamps.dequeued = Instant::now();
            stamps.sequenced = Instant::now();
            let now = Instant::now();
            let traced = Arc::new(Traced::new(stamps, now, Instant::now(), Instant::now()));
            let delivery = traced.clone();
            traced.answered(Instant::now(), stages);
            delivery.delivered(Instant::now(), Instant::now(), stages);
            n += 1;
            // What the upkeep task does every 5 s in a server.
            if n.is_multiple_of(100_000) {
                recorder.run_upkeep();
            }
        });
    });
    group.finish();
}

criterion_group!(benches, store_append, router_send, stage_recording);
criterion_main!(benches);
