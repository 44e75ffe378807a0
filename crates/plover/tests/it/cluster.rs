//! A cluster's first pieces on real NATS servers: the engine checks at start, service
//! discovery (node records, `plover nodes`) and the connection registry.

use crate::common::nats::{JetStream, Nats, free_port};
use crate::common::{TestServer, test_config};
use plover_client::{ClientConfig, Connection};
use plover_server::auth::TokenKeys;
use plover_server::cluster::{self, ClusterError, ownership, registry};
use plover_server::config::{ClusterConfig, Config};
use plover_server::server::{Server, ServerError};
use std::path::Path;
use std::time::{Duration, Instant};

const SECRET: &str = "a secret every node of the test cluster shares";

fn cluster_config(nats: &Nats, node: &str, replicas: usize) -> ClusterConfig {
    ClusterConfig {
        monitor: nats.monitors(),
        node: node.into(),
        replicas,
        node_ttl: Duration::from_secs(3),
        ..ClusterConfig::client(nats.urls())
    }
}

/// Why a node with this `[cluster]` section does not start.
async fn refusal(cluster: ClusterConfig) -> ClusterError {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        cluster: Some(cluster),
        ..test_config(dir.path())
    };
    match Server::bind(config).await {
        Err(ServerError::Cluster(e)) => e,
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a node started on an engine it cannot trust"),
    }
}

#[tokio::test]
async fn a_node_refuses_an_engine_it_cannot_trust() {
    // Nobody listening.
    let mut nobody = ClusterConfig::client(vec![format!("nats://127.0.0.1:{}", free_port())]);
    nobody.node = "n1".into();
    nobody.monitor = vec![format!("http://127.0.0.1:{}", free_port())];
    nobody.connect_timeout = Duration::from_millis(500);
    let e = refusal(nobody).await;
    assert!(matches!(e, ClusterError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("cannot reach NATS"), "{e}");

    // NATS without JetStream.
    let plain = Nats::start(1, JetStream::Off);
    let e = refusal(cluster_config(&plain, "n1", 1)).await;
    assert!(matches!(e, ClusterError::NoJetStream { .. }), "{e}");
    assert!(e.to_string().contains("jetstream"), "{e}");
    drop(plain);

    // JetStream that acknowledges before it fsyncs.
    let lazy = Nats::start(1, JetStream::Default);
    let e = refusal(cluster_config(&lazy, "n1", 1)).await;
    assert!(matches!(e, ClusterError::NotSyncAlways { .. }), "{e}");
    assert!(e.to_string().contains("sync_interval: always"), "{e}");
}

async fn node(nats: &Nats, id: &str) -> TestServer {
    node_with(nats, id, |_| {}).await
}

/// A node of a three-replica cluster on `nats`, its configuration tweaked.
pub(crate) async fn node_with(
    nats: &Nats,
    id: &str,
    tweak: impl FnOnce(&mut Config),
) -> TestServer {
    let cluster = cluster_config(nats, id, 3);
    TestServer::start_with(move |c| {
        c.auth.secret = Some(SECRET.into());
        c.cluster = Some(cluster);
        c.presence.debounce = Duration::from_millis(300);
        tweak(c);
    })
    .await
}

pub(crate) fn client(node: &TestServer, user: &str, device: &str) -> ClientConfig {
    client_trusting(node, &node.ca(), user, device)
}

/// [`client`] trusting the certificate `ca` (nodes that share one certificate directory).
fn client_trusting(node: &TestServer, ca: &Path, user: &str, device: &str) -> ClientConfig {
    let token = TokenKeys::new(SECRET.as_bytes())
        .mint(user, None, Duration::from_secs(3600))
        .expect("mint");
    ClientConfig::new(node.addr.to_string(), ca, token, device).expect("client config")
}

/// `plover nodes --json` against the cluster: one record per line.
fn plover_nodes(nats: &Nats) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plover"))
        .args(["nodes", "--json", "--nats", &nats.urls().join(",")])
        .output()
        .expect("plover nodes");
    assert!(
        out.status.success(),
        "plover nodes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

/// Polls `check` until it holds or `within` passes.
async fn eventually<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met in {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn nodes_announce_themselves_and_the_registry_knows_where_each_device_is() {
    let nats = Nats::start(3, JetStream::SyncAlways);
    let n1 = node(&nats, "n1").await;
    let n2 = node(&nats, "n2").await;

    // Both nodes are listed with the address clients reach them at.
    let listed = eventually(Duration::from_secs(10), || {
        let nodes = plover_nodes(&nats);
        (nodes.len() == 2).then_some(nodes)
    })
    .await;
    assert_eq!(listed[0]["node"], "n1");
    assert_eq!(listed[0]["advertise"], n1.addr.to_string());
    assert_eq!(listed[1]["node"], "n2");
    assert_eq!(listed[1]["advertise"], n2.addr.to_string());

    // Welcome names the node; the registry says where alice's phone is.
    let alice = Connection::connect(&client(&n1, "alice", "phone"))
        .await
        .expect("connect");
    assert_eq!(alice.welcome().server_id, "n1");
    let js = cluster::connect(&cluster_config(&nats, "probe", 3))
        .await
        .expect("NATS");
    let mut found = None;
    for _ in 0..50 {
        found = registry::lookup(&js, "alice", "phone")
            .await
            .expect("lookup");
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let entry = found.expect("alice's phone is registered");
    assert_eq!(entry.node, "n1");
    assert!(entry.heartbeat_ms >= entry.since_ms);

    // n1's record counts it.
    eventually(Duration::from_secs(10), || {
        let nodes = plover_nodes(&nats);
        nodes
            .iter()
            .any(|n| n["node"] == "n1" && n["connections"] == 1)
            .then_some(())
    })
    .await;

    // The phone moves to n2: the registry follows, and n1's late removal does not undo it.
    alice.close().await;
    let moved = Connection::connect(&client(&n2, "alice", "phone"))
        .await
        .expect("connect to n2");
    assert_eq!(moved.welcome().server_id, "n2");
    let mut entry = None;
    for _ in 0..50 {
        entry = registry::lookup(&js, "alice", "phone")
            .await
            .expect("lookup");
        if entry.as_ref().is_some_and(|e| e.node == "n2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(entry.expect("registered").node, "n2");
    // Past n1's next registry pass, the entry is still n2's.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let entry = registry::lookup(&js, "alice", "phone")
        .await
        .expect("lookup");
    assert_eq!(entry.expect("still registered").node, "n2");

    // Leaving removes the entry; a stopped node leaves the list.
    moved.close().await;
    let mut gone = false;
    for _ in 0..50 {
        if registry::lookup(&js, "alice", "phone")
            .await
            .expect("lookup")
            .is_none()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "a departed device's entry is removed");
    n2.stop().await;
    let nodes = plover_nodes(&nats);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["node"], "n1");
    n1.stop().await;
}

#[tokio::test]
async fn a_node_that_dies_leaves_the_list_within_its_ttl() {
    let nats = Nats::start(1, JetStream::SyncAlways);
    // A node that vanishes without removing its record: `plover serve` killed outright.
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[auth]\nsecret = \"{SECRET}\"\n[cluster]\nnats = {:?}\nmonitor = {:?}\nnode = \"n9\"\n\
         replicas = 1\nnode_ttl = \"3s\"\n",
        nats.urls(),
        nats.monitors()
    );
    let (mut child, _addr) = crate::common::spawn_server_with(dir.path(), &extra).await;
    eventually(Duration::from_secs(10), || {
        (plover_nodes(&nats).len() == 1).then_some(())
    })
    .await;
    child.kill().await.expect("kill");
    let killed = Instant::now();
    eventually(Duration::from_secs(10), || {
        plover_nodes(&nats).is_empty().then_some(())
    })
    .await;
    assert!(
        killed.elapsed() >= Duration::from_secs(1),
        "gone only by its TTL"
    );
}

/// Each node's shard count as `plover nodes` reports it, by node id.
fn shard_counts(nats: &Nats) -> std::collections::BTreeMap<String, u64> {
    plover_nodes(nats)
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap_or_default().to_owned(),
                n["shards"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Every shard's lease holder, read from the bucket.
async fn holders(js: &cluster::JetStream, shards: u32) -> Vec<Option<String>> {
    let leases = js
        .get_key_value(ownership::SHARDS_BUCKET)
        .await
        .expect("leases bucket");
    let mut out = Vec::new();
    for s in 0..shards {
        let holder = leases
            .get(ownership::key(s))
            .await
            .expect("read lease")
            .and_then(|v| serde_json::from_slice::<ownership::Lease>(&v).ok())
            .map(|l| l.node);
        out.push(holder);
    }
    out
}

#[tokio::test]
async fn shards_are_shared_fairly_and_follow_the_live_nodes() {
    let nats = Nats::start(3, JetStream::SyncAlways);
    let small = |c: &mut ClusterConfig| {
        c.shards = 12;
        c.lease = Duration::from_secs(3);
    };
    let start = |id: &'static str| {
        let mut cluster = cluster_config(&nats, id, 3);
        small(&mut cluster);
        TestServer::start_with(move |c| {
            c.auth.secret = Some(SECRET.into());
            c.cluster = Some(cluster);
        })
    };
    let want = |counts: &[(&str, u64)]| {
        counts
            .iter()
            .map(|(n, c)| ((*n).to_owned(), *c))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let n1 = start("n1").await;
    eventually(Duration::from_secs(15), || {
        (shard_counts(&nats) == want(&[("n1", 12)])).then_some(())
    })
    .await;
    let n2 = start("n2").await;
    eventually(Duration::from_secs(15), || {
        (shard_counts(&nats) == want(&[("n1", 6), ("n2", 6)])).then_some(())
    })
    .await;

    // A third node, as a process of its own, takes its share ...
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[auth]\nsecret = \"{SECRET}\"\n[cluster]\nnats = {:?}\nmonitor = {:?}\nnode = \"n3\"\n\
         node_ttl = \"3s\"\nshards = 12\nlease = \"3s\"\n",
        nats.urls(),
        nats.monitors()
    );
    let (mut n3, _) = crate::common::spawn_server_with(dir.path(), &extra).await;
    eventually(Duration::from_secs(20), || {
        (shard_counts(&nats) == want(&[("n1", 4), ("n2", 4), ("n3", 4)])).then_some(())
    })
    .await;

    // ... and when it is killed outright, its shards pass to the others once its leases end.
    n3.kill().await.expect("kill n3");
    let killed = Instant::now();
    eventually(Duration::from_secs(20), || {
        (shard_counts(&nats) == want(&[("n1", 6), ("n2", 6)])).then_some(())
    })
    .await;
    let failover = killed.elapsed();
    eprintln!("shards moved {failover:?} after the kill (lease 3 s)");
    assert!(
        failover >= Duration::from_secs(2),
        "not before the lease ended: {failover:?}"
    );

    // Every shard has exactly one holder, and it is a live node.
    let js = cluster::connect(&cluster_config(&nats, "probe", 3))
        .await
        .expect("NATS");
    let held = holders(&js, 12).await;
    assert!(
        held.iter()
            .all(|h| matches!(h.as_deref(), Some("n1" | "n2"))),
        "{held:?}"
    );
    n2.stop().await;
    // A node that stops gives its shards back at once: n1 takes them all.
    eventually(Duration::from_secs(15), || {
        (shard_counts(&nats) == want(&[("n1", 12)])).then_some(())
    })
    .await;
    n1.stop().await;
}

#[tokio::test]
async fn a_deposed_owner_steps_down_and_its_epochs_only_grow() {
    let nats = Nats::start(1, JetStream::SyncAlways);
    let mut config = cluster_config(&nats, "a", 1);
    config.shards = 4;
    config.lease = Duration::from_secs(3);
    // Joined but not running: this test drives the rounds itself.
    let node = cluster::Cluster::join(&config, Duration::from_secs(10))
        .await
        .expect("join");
    let own = node.ownership();
    own.balance().await.expect("balance");
    let first = own.owned();
    assert_eq!(
        first.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );

    own.renew().await;
    let renewed = own.owned();
    for ((s1, e1), (s2, e2)) in first.iter().zip(&renewed) {
        assert_eq!(s1, s2);
        assert!(e2 > e1, "a renewal is a new epoch");
    }

    // While "a" was paused its lease on shard 2 ended and another node took it.
    let js = cluster::connect(&config).await.expect("NATS");
    let leases = js
        .get_key_value(ownership::SHARDS_BUCKET)
        .await
        .expect("leases");
    let lease = ownership::Lease {
        node: "b".into(),
        since_ms: 0,
    };
    leases
        .put(
            ownership::key(2),
            serde_json::to_vec(&lease).expect("json").into(),
        )
        .await
        .expect("b takes shard 2");

    // Its next renewal fails on the epoch: it drops shard 2 and keeps the rest.
    own.renew().await;
    assert_eq!(
        own.owned().iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [0, 1, 3]
    );
    assert_eq!(holders(&js, 4).await[2].as_deref(), Some("b"));
    // It does not take it back while b's lease lives.
    own.balance().await.expect("balance");
    assert!(!own.owned().iter().any(|(s, _)| *s == 2));
    own.release_all().await;
    assert!(own.owned().is_empty());
    assert!(holders(&js, 4).await.iter().filter(|h| h.is_some()).count() == 1);
}

#[tokio::test]
async fn bench_log_measures_fenced_appends_and_cleans_up() {
    let nats = Nats::start(1, JetStream::SyncAlways);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plover"))
        .args([
            "bench",
            "log",
            "--json",
            "--nats",
            &nats.urls().join(","),
            "--replicas",
            "1",
            "--shards",
            "2",
            "--batch",
            "4",
            "--duration",
            "1s",
        ])
        .output()
        .await
        .expect("plover bench log");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["scenario"], "log");
    let appends = report["appends"].as_u64().expect("appends");
    assert!(appends > 0, "{report}");
    assert_eq!(report["append"]["count"].as_u64(), Some(appends));
    // Four records an append (each rate rounded on its own).
    let records = report["records_per_second"].as_f64().expect("records/s");
    let appends_rate = report["appends_per_second"].as_f64().expect("appends/s");
    assert!((records - appends_rate * 4.0).abs() <= 4.0, "{report}");
    // The bench's stream is gone.
    let jsz: serde_json::Value = ureq::get(&format!("{}/jsz", nats.monitors()[0]))
        .call()
        .expect("jsz")
        .body_mut()
        .read_json()
        .expect("json");
    assert_eq!(jsz["streams"], 0, "{jsz}");
}

#[tokio::test]
async fn the_shard_log_fences_a_stale_writer_and_checks_every_record() {
    use plover_server::cluster::log::{AppendError, ReadError, ShardLog};
    let nats = Nats::start(1, JetStream::SyncAlways);
    let config = cluster_config(&nats, "w1", 1);
    let js = cluster::connect(&config).await.expect("NATS");
    let log = ShardLog::open(js.clone(), "PLOVER_TEST", &config)
        .await
        .expect("log");
    assert_eq!(log.last(0).await.expect("last"), 0);

    let one = log.append(0, 0, b"one").await.expect("first append");
    let two = log
        .append(0, one.sequence, b"two")
        .await
        .expect("second append");
    assert!(two.sequence > one.sequence);
    // A writer that did not see "two" (a deposed owner waking up) cannot append.
    let stale = log.append(0, one.sequence, b"stale").await;
    assert!(
        matches!(stale, Err(AppendError::Deposed { shard: 0, .. })),
        "{stale:?}"
    );
    // Shards are independent.
    log.append(1, 0, b"other").await.expect("shard 1");
    assert_eq!(log.last(0).await.expect("last"), two.sequence);

    let texts = |records: Vec<(u64, bytes::Bytes)>| {
        records
            .into_iter()
            .map(|(seq, r)| (seq, String::from_utf8_lossy(&r).into_owned()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        texts(log.read(0, 0).await.expect("read all")),
        [(one.sequence, "one".into()), (two.sequence, "two".into())]
    );
    assert_eq!(
        texts(log.read(0, one.sequence).await.expect("read after one")),
        [(two.sequence, "two".into())]
    );
    assert!(
        log.read(0, two.sequence)
            .await
            .expect("read none")
            .is_empty()
    );

    // A record whose bytes do not match its checksum stops the read.
    let bad = js
        .publish("PLOVER_TEST.0", "not a sealed record".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let read = log.read(0, two.sequence).await;
    assert!(
        matches!(read, Err(ReadError::Corrupt { shard: 0, sequence }) if sequence == bad.sequence),
        "{read:?}"
    );
    log.delete().await.expect("delete");
}

#[tokio::test]
async fn a_node_refuses_writes_it_cannot_replicate_while_nats_is_away() {
    let nats = Nats::start(1, JetStream::SyncAlways);
    let cluster = cluster_config(&nats, "n1", 1);
    let n1 = TestServer::start_with(move |c| {
        c.auth.secret = Some(SECRET.into());
        c.cluster = Some(cluster);
    })
    .await;
    Connection::connect(&client(&n1, "bob", "setup"))
        .await
        .expect("bob")
        .close()
        .await;
    let alice = Connection::connect(&client(&n1, "alice", "phone"))
        .await
        .expect("alice");
    let conv = eventually_open(&alice, "bob").await;
    conv.send("before").await.expect("sent with NATS up");

    // A write is acknowledged only once the cluster log holds it: with NATS gone, the send
    // is refused (after the appender's patience), never acknowledged and then lost.
    drop(nats);
    let started = Instant::now();
    let refused = conv.send("after").await.expect_err("no log, no ack");
    assert!(
        refused.to_string().contains("cluster"),
        "the refusal says why: {refused}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
    alice.close().await;
    // And it still stops within its bounds.
    tokio::time::timeout(Duration::from_secs(15), n1.stop())
        .await
        .expect("stops with NATS away");
}

/// Opens `user`'s direct conversation with `peer`, once the node has applied `peer`'s
/// first connection (made on another node, it reaches this one through the log).
pub(crate) async fn eventually_open(user: &Connection, peer: &str) -> plover_client::Conversation {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match user
            .open(plover_proto::Target::Direct(peer.into()), true)
            .await
        {
            Ok(conv) => return conv,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "not yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot open the conversation with {peer}: {e}"),
        }
    }
}

#[tokio::test]
async fn alice_on_n1_and_bob_on_n2_chat_and_bob_catches_up_on_n3() {
    use crate::common::{assert_quiet, next_event, next_receipt, text};
    use plover_client::EventStream;

    let nats = Nats::start(3, JetStream::SyncAlways);
    let n1 = node(&nats, "n1").await;
    let n2 = node(&nats, "n2").await;
    let n3 = node(&nats, "n3").await;

    let mut bob = EventStream::start(client(&n2, "bob", "phone"), Some(0));
    assert!(bob.synced().await);
    let mut alice_laptop = EventStream::start(client(&n1, "alice", "laptop"), Some(0));
    assert!(alice_laptop.synced().await);
    let alice = Connection::connect(&client(&n1, "alice", "phone"))
        .await
        .expect("alice");
    let conv = eventually_open(&alice, "bob").await;

    // Live, across nodes: n1 takes the send, n2 delivers it.
    let ack = conv.send("hi bob").await.expect("send");
    assert_eq!(ack.seq, 1);
    let got = next_event(&mut bob).await;
    assert_eq!(text(&got), "hi bob");
    assert_eq!(text(&next_event(&mut alice_laptop).await), "hi bob");

    // bob's read mark reaches alice's devices on n1.
    let bob_conn = bob.connection().expect("connected");
    let bob_conv = bob_conn
        .open(plover_proto::Target::Conversation(ack.conversation), false)
        .await
        .expect("bob opens");
    // alice is a stranger to bob: he accepts, else his read mark stays hidden from her.
    bob_conn
        .accept(ack.conversation)
        .await
        .expect("bob accepts");
    bob_conv.mark_read(1).await.expect("mark");
    let receipt = next_receipt(&mut alice_laptop).await;
    assert_eq!((receipt.user.as_str(), receipt.read), ("bob", 1));
    drop(bob_conv);
    drop(bob_conn);
    // Let bob's cursor reach the log before he goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob.close().await;

    // bob is away; alice goes on.
    for i in 2..=4 {
        assert_eq!(conv.send(format!("m{i}")).await.expect("send").seq, i);
    }

    // bob comes back on n3, from the cursor his phone acknowledged on n2: exactly what he
    // missed, in order, once each.
    let mut bob = EventStream::start(client(&n3, "bob", "phone"), None);
    assert!(bob.synced().await);
    for i in 2..=4 {
        assert_eq!(text(&next_event(&mut bob).await), format!("m{i}"));
    }
    assert_quiet(&mut bob, Duration::from_millis(500)).await;

    // Every node's history is the same.
    let mut histories = Vec::new();
    for n in [&n1, &n2, &n3] {
        let c = Connection::connect(&client(n, "alice", "tablet"))
            .await
            .expect("alice's tablet");
        let conv = c
            .open(plover_proto::Target::Conversation(ack.conversation), false)
            .await
            .expect("open");
        histories.push(crate::common::all_history(&conv).await);
        c.close().await;
    }
    assert_eq!(histories[0].len(), 4);
    assert_eq!(histories[0], histories[1]);
    assert_eq!(histories[1], histories[2]);

    bob.close().await;
    alice_laptop.close().await;
    alice.close().await;
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}

#[tokio::test]
async fn presence_and_typing_cross_nodes() {
    use plover_client::{EventStream, Incoming};

    let nats = Nats::start(3, JetStream::SyncAlways);
    let n1 = node(&nats, "n1").await;
    let n2 = node(&nats, "n2").await;

    // bob on n2, who shares a conversation with alice.
    let mut bob = EventStream::start(client(&n2, "bob", "phone"), Some(0));
    assert!(bob.synced().await);
    let setup = Connection::connect(&client(&n1, "alice", "setup"))
        .await
        .expect("alice");
    let conv = eventually_open(&setup, "bob").await;
    let conversation = conv.id();
    drop(conv);
    setup.close().await;

    /// The next presence or typing item bob gets about alice (log events skipped).
    async fn next_live(bob: &mut EventStream) -> Incoming {
        loop {
            match crate::common::next_incoming(bob).await {
                Incoming::Log(_) => {}
                other => return other,
            }
        }
    }
    // Skip what the setup connection caused: wait until alice is shown offline.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        next_live(&mut bob).await,
        Incoming::Presence { online: false, .. }
    ) {
        assert!(
            Instant::now() < deadline,
            "alice's setup connection never went"
        );
    }

    // alice connects to n1: bob, on n2, sees her online; asked, n2 says so too.
    let alice = Connection::connect(&client(&n1, "alice", "phone"))
        .await
        .expect("alice");
    match next_live(&mut bob).await {
        Incoming::Presence { user, online, .. } => {
            assert_eq!((user.as_str(), online), ("alice", true))
        }
        other => panic!("expected alice online, got {other:?}"),
    }
    let bob_conn = bob.connection().expect("connected");
    assert!(bob_conn.presence("alice").await.expect("presence").0);

    // She types: bob sees it, through n1 and n2.
    alice.typing(conversation).expect("typing");
    match next_live(&mut bob).await {
        Incoming::Typing {
            conversation: c,
            user,
        } => {
            assert_eq!((c, user.as_str()), (conversation, "alice"));
        }
        other => panic!("expected typing, got {other:?}"),
    }

    // She moves to n2 (phone off, laptop on n2 within the debounce): still online for bob,
    // who is told nothing; then she goes, and bob sees her offline with her last seen.
    let laptop = Connection::connect(&client(&n2, "alice", "laptop"))
        .await
        .expect("laptop");
    alice.close().await;
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(1000), next_live(&mut bob)).await {
        panic!("bob was told of a move that changed nothing for him: {item:?}");
    }
    assert!(bob_conn.presence("alice").await.expect("presence").0);
    laptop.close().await;
    match next_live(&mut bob).await {
        Incoming::Presence {
            user,
            online,
            last_seen,
        } => {
            assert_eq!((user.as_str(), online), ("alice", false));
            assert!(last_seen > 0);
        }
        other => panic!("expected alice offline, got {other:?}"),
    }
    drop(bob_conn);
    bob.close().await;
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn snapshots_bound_the_log_and_nodes_behind_it_start_from_the_latest() {
    let nats = Nats::start(3, JetStream::SyncAlways);
    let often = |c: &mut Config| {
        if let Some(cluster) = c.cluster.as_mut() {
            cluster.snapshot_every = 20;
        }
    };
    let n1 = node_with(&nats, "n1", often).await;
    let n2 = node_with(&nats, "n2", often).await;
    Connection::connect(&client(&n2, "bob", "setup"))
        .await
        .expect("bob")
        .close()
        .await;
    // n2 goes away with the log's start in its store.
    let n2_stopped = n2.stop_keeping_data().await;

    let alice = Connection::connect(&client(&n1, "alice", "phone"))
        .await
        .expect("alice");
    let conv = eventually_open(&alice, "bob").await;
    for i in 1..=100u64 {
        assert_eq!(conv.send(format!("m{i}")).await.expect("send").seq, i);
    }
    // Two snapshots, then the log before the first is removed.
    let js = cluster::connect(&ClusterConfig::client(nats.urls()))
        .await
        .expect("js");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut stream = js
            .get_stream(cluster::replica::STREAM)
            .await
            .expect("stream");
        let first = stream.info().await.expect("info").state.first_sequence;
        if first > 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the log was never cut");
        // Keep the log moving: a snapshot is due every 20 messages.
        conv.send("tick").await.expect("send");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let expected = crate::common::all_history(&conv).await;

    // A new node, and n2 back: each loads the snapshot (the log before it is gone) and
    // applies what follows; both hold the same history.
    let n3 = node_with(&nats, "n3", often).await;
    let n2 = n2_stopped
        .start_with(|c| {
            c.auth.secret = Some(SECRET.into());
            c.cluster = Some(ClusterConfig {
                snapshot_every: 20,
                ..cluster_config(&nats, "n2", 3)
            });
        })
        .await;
    for n in [&n2, &n3] {
        let c = Connection::connect(&client(n, "bob", "phone"))
            .await
            .expect("bob");
        let conv = c
            .open(plover_proto::Target::Conversation(conv.id()), false)
            .await
            .expect("open");
        assert_eq!(crate::common::all_history(&conv).await, expected);
        c.close().await;
    }
    alice.close().await;
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}

#[tokio::test]
async fn a_stopping_node_sends_its_devices_to_another_node() {
    use crate::common::{next_event, text};
    use plover_client::EventStream;

    let nats = Nats::start(3, JetStream::SyncAlways);
    // One certificate for both nodes, as the README's nodes share one: bob's client trusts
    // whichever node it is sent to.
    let certs = tempfile::tempdir().expect("certs");
    let shared = certs.path().to_path_buf();
    let n1 = node_with(&nats, "n1", |c| c.certs = shared.clone()).await;
    let n2 = node_with(&nats, "n2", |c| c.certs = shared.clone()).await;
    // bob knows only n1: without being sent elsewhere he would wait for it forever.
    let ca = shared.join("cert.pem");
    let shared_client = |n: &TestServer, user: &str| client_trusting(n, &ca, user, "phone");
    let mut bob = EventStream::start(shared_client(&n1, "bob"), Some(0));
    assert!(bob.synced().await);
    let alice = Connection::connect(&shared_client(&n2, "alice"))
        .await
        .expect("alice");
    let conv = eventually_open(&alice, "bob").await;
    conv.send("before").await.expect("send");
    assert_eq!(text(&next_event(&mut bob).await), "before");

    // n1 stops: it closes bob's connection with `moved` and n2's address, and bob's
    // stream goes on there.
    n1.stop().await;
    conv.send("after").await.expect("send");
    assert_eq!(text(&next_event(&mut bob).await), "after");
    let now = bob.connection().expect("connected again");
    assert_eq!(now.welcome().server_id, "n2");

    bob.close().await;
    alice.close().await;
    n2.stop().await;
}

#[tokio::test]
async fn until_delivered_erases_the_same_bodies_on_every_node() {
    use crate::common::next_event;
    use plover_client::EventStream;
    use plover_proto::Retention;

    let nats = Nats::start(3, JetStream::SyncAlways);
    let n1 = node(&nats, "n1").await;
    let n2 = node(&nats, "n2").await;
    let mut bob = EventStream::start(client(&n2, "bob", "phone"), Some(0));
    assert!(bob.synced().await);
    let alice = Connection::connect(&client(&n1, "alice", "phone"))
        .await
        .expect("alice");
    let conv = eventually_open(&alice, "bob").await;
    conv.set_retention(Retention::UntilDelivered)
        .await
        .expect("retention");
    for i in 0..20 {
        conv.send(format!("gone once delivered {i}"))
            .await
            .expect("send");
    }
    // bob's device on n2 takes them all and reports them delivered.
    let mut got = 0;
    while got < 20 {
        if matches!(
            next_event(&mut bob).await.event,
            plover_proto::Event::Message(ref m) if m.change.is_none()
        ) {
            got += 1;
        }
    }
    // On both nodes, every body goes (tombstones keep the seqs), and the histories match.
    let history_at = |n: &TestServer| {
        let config = client(n, "alice", "reader");
        let id = conv.id();
        async move {
            let c = Connection::connect(&config).await.expect("reader");
            let h = crate::common::all_history(
                &c.open(plover_proto::Target::Conversation(id), false)
                    .await
                    .expect("open"),
            )
            .await;
            c.close().await;
            h
        }
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (a, b) = (history_at(&n1).await, history_at(&n2).await);
        let bodies = |h: &[plover_proto::Message]| {
            h.iter()
                .filter(|m| m.change.is_none() && !m.body.is_empty())
                .count()
        };
        if bodies(&a) == 0 && bodies(&b) == 0 {
            assert_eq!(a, b, "both nodes erased the same");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bodies left: {} and {}",
            bodies(&a),
            bodies(&b)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bob.close().await;
    alice.close().await;
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn a_node_with_many_more_devices_sends_new_ones_to_the_least_loaded() {
    let nats = Nats::start(3, JetStream::SyncAlways);
    let certs = tempfile::tempdir().expect("certs");
    let shared = certs.path().to_path_buf();
    let tweak = |c: &mut Config| {
        c.certs = shared.clone();
        if let Some(cluster) = c.cluster.as_mut() {
            cluster.rebalance_above = 2;
        }
    };
    let n1 = node_with(&nats, "n1", tweak).await;
    let n2 = node_with(&nats, "n2", tweak).await;
    let ca = shared.join("cert.pem");
    let to = |n: &TestServer, user: &str| client_trusting(n, &ca, user, "phone");
    // Three devices on n1, none on n2.
    let mut held = Vec::new();
    for user in ["u1", "u2", "u3"] {
        let c = Connection::connect(&to(&n1, user)).await.expect("connect");
        assert_eq!(c.welcome().server_id, "n1");
        held.push(c);
    }
    // Once n1 has seen the gap (records refreshed every second here), a new device that
    // asks n1 is sent to n2 (`moved`), which the SDK follows.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = Connection::connect(&to(&n1, "u4")).await.expect("connect");
        let on = c.welcome().server_id.clone();
        c.close().await;
        if on == "n2" {
            break;
        }
        assert!(Instant::now() < deadline, "n1 kept taking new devices");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The gap closes: n1 takes new devices again.
    for c in held {
        c.close().await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = Connection::connect(&to(&n1, "u5")).await.expect("connect");
        let on = c.welcome().server_id.clone();
        c.close().await;
        if on == "n1" {
            break;
        }
        assert!(Instant::now() < deadline, "n1 never took new devices again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn a_client_that_asks_for_a_zone_is_served_by_a_node_of_it() {
    let nats = Nats::start(3, JetStream::SyncAlways);
    let certs = tempfile::tempdir().expect("certs");
    let shared = certs.path().to_path_buf();
    let in_zone = |zone: &'static str| {
        let shared = shared.clone();
        move |c: &mut Config| {
            c.certs = shared;
            if let Some(cluster) = c.cluster.as_mut() {
                cluster.zone = Some(zone.into());
            }
        }
    };
    let n1 = node_with(&nats, "n1", in_zone("west")).await;
    let n2 = node_with(&nats, "n2", in_zone("east")).await;
    let ca = shared.join("cert.pem");
    let asking = |zone: Option<&str>| {
        let mut c = client_trusting(&n1, &ca, "alice", "phone");
        c.zone = zone.map(str::to_owned);
        c
    };
    let served_by = |config: ClientConfig| async move {
        let c = Connection::connect(&config).await.expect("connect");
        let on = c.welcome().server_id.clone();
        c.close().await;
        on
    };
    // Once n1 has read n2's record (every second here), a client that asks n1 for "east"
    // is sent to n2, which the SDK follows.
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_by(asking(Some("east"))).await != "n2" {
        assert!(
            Instant::now() < deadline,
            "n1 never sent an east client east"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A client of n1's own zone, of no zone, or of a zone nobody serves stays on n1.
    assert_eq!(served_by(asking(Some("west"))).await, "n1");
    assert_eq!(served_by(asking(None)).await, "n1");
    assert_eq!(served_by(asking(Some("north"))).await, "n1");
    // Both ways round.
    let mut east_to_west = client_trusting(&n2, &ca, "bob", "phone");
    east_to_west.zone = Some("west".into());
    assert_eq!(served_by(east_to_west).await, "n1");
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn a_draining_node_moves_its_devices_a_few_at_a_time_then_stops() {
    use crate::common::{next_event, text};
    use plover_client::EventStream;

    let nats = Nats::start(3, JetStream::SyncAlways);
    let certs = tempfile::tempdir().expect("certs");
    let shared = certs.path().to_path_buf();
    let tweak = |c: &mut Config| {
        c.certs = shared.clone();
        if let Some(cluster) = c.cluster.as_mut() {
            cluster.drain_rate = 4;
            cluster.rebalance_above = 0;
        }
    };
    let mut n1 = node_with(&nats, "n1", tweak).await;
    let n2 = node_with(&nats, "n2", tweak).await;
    let ca = shared.join("cert.pem");
    // Eight devices that know only n1, and alice on n2 who writes to each.
    let mut devices = Vec::new();
    for i in 0..8 {
        let mut s = EventStream::start(
            client_trusting(&n1, &ca, &format!("u{i}"), "phone"),
            Some(0),
        );
        assert!(s.synced().await);
        devices.push(s);
    }
    let alice = Connection::connect(&client_trusting(&n2, &ca, "alice", "phone"))
        .await
        .expect("alice");
    let mut convs = Vec::new();
    for i in 0..8 {
        convs.push(eventually_open(&alice, &format!("u{i}")).await);
    }
    // n1 has taken its share of the shards.
    eventually(Duration::from_secs(15), || {
        (shard_counts(&nats).get("n1").copied().unwrap_or(0) > 0).then_some(())
    })
    .await;

    let asked = Instant::now();
    n1.drain();
    // While it drains: its record says so, it gives back every shard, and a new device
    // that asks it is sent to n2.
    eventually(Duration::from_secs(10), || {
        let records = plover_nodes(&nats);
        let n1 = records.iter().find(|r| r["node"] == "n1")?;
        (n1["draining"] == true && n1["shards"] == 0).then_some(())
    })
    .await;
    let late = Connection::connect(&client_trusting(&n1, &ca, "late", "phone"))
        .await
        .expect("a device that asks a draining node");
    assert_eq!(late.welcome().server_id, "n2");
    late.close().await;
    // It stops by itself once every device is on n2: at four a second, eight take about
    // two seconds, not an instant.
    n1.drained(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    assert!(took >= Duration::from_millis(1500), "drained in {took:?}");
    // Every device goes on, on n2, with nothing missed.
    for (i, (conv, device)) in convs.iter().zip(devices.iter_mut()).enumerate() {
        conv.send(format!("after the drain {i}"))
            .await
            .expect("send");
        assert_eq!(
            text(&next_event(device).await),
            format!("after the drain {i}")
        );
        assert_eq!(
            device.connection().expect("connected").welcome().server_id,
            "n2"
        );
    }
    for d in devices {
        d.close().await;
    }
    alice.close().await;
    n2.stop().await;
}

#[tokio::test]
async fn a_file_sent_through_one_node_is_fetched_through_another() {
    use plover_client::media::{Through, prepare};
    use plover_proto::content::Content;

    let nats = Nats::start(3, JetStream::SyncAlways);
    // The nodes share one object store (here a directory both see; in production S3).
    let objects = tempfile::tempdir().expect("objects");
    let shared = objects.path().to_path_buf();
    let tweak = |c: &mut Config| {
        c.media.dir = Some(shared.clone());
        c.retention.sweep_interval = Duration::from_millis(300);
    };
    let n1 = node_with(&nats, "n1", tweak).await;
    let n2 = node_with(&nats, "n2", tweak).await;
    let bob = Connection::connect(&client(&n2, "bob", "phone"))
        .await
        .expect("bob");
    let alice = Connection::connect(&client(&n1, "alice", "phone"))
        .await
        .expect("alice");
    let conv = eventually_open(&alice, "bob").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("photo.jpg");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &data).expect("write");
    let file = prepare(&path).await.expect("prepare");
    alice
        .upload(&file, &mut |_| {})
        .await
        .expect("upload on n1");
    let attachment = file.attachment("photo.jpg", "image/jpeg");
    let ack = conv
        .send_referencing(
            plover_proto::ClientMsgId::random(),
            Content::Attachment(attachment.clone()).encode().into(),
            vec![file.object],
        )
        .await
        .expect("send on n1");
    // bob, on n2, fetches it at once: n2 knows the object and the reference from the log,
    // and waits to have applied what the log held before it answers `not_found`.
    let out = dir.path().join("fetched.jpg");
    let through = Through {
        conversation: conv.id(),
        seq: ack.seq,
    };
    bob.download(&attachment, through, &out, &mut |_| {})
        .await
        .expect("bob fetches through n2 right after the send through n1");
    assert_eq!(std::fs::read(&out).expect("read"), data);

    // Deleted for everyone: whichever node collects, the shared store empties.
    let files = |dir: &Path| -> usize {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| std::fs::read_dir(e.path()).map(|p| p.count()).unwrap_or(1))
                    .sum()
            })
            .unwrap_or(0)
    };
    assert!(files(&shared.join("objects")) > 0, "nothing stored");
    conv.delete(ack.seq).await.expect("delete");
    eventually(Duration::from_secs(15), || {
        (files(&shared.join("objects")) == 0).then_some(())
    })
    .await;
    bob.close().await;
    alice.close().await;
    n1.stop().await;
    n2.stop().await;
}

/// `plover token revoke`, run against one node's data directory, closes the user's
/// connections on every node within a second, and every node refuses the old token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_node_closes_connections_on_every_node() {
    use crate::common::{close_code, raw_device};
    use plover_proto::ErrorCode;
    let nats = Nats::start(3, JetStream::SyncAlways);
    let n1 = node(&nats, "n1").await;
    let n2 = node(&nats, "n2").await;
    let old = n2.token("bob");
    let (_e, on_n2, _s, _r) = raw_device(&n2, "bob", "phone").await;

    let data = n1.dir.path().join("data");
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_plover"))
            .args(["token", "revoke", "bob", "--data"])
            .arg(&data)
            .output()
            .expect("plover token revoke")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(close_code(&on_n2).await, ErrorCode::TOKEN_REVOKED.0);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed on the other node after {:?}",
        started.elapsed()
    );
    for node in [&n1, &n2] {
        let config = ClientConfig::new(node.addr.to_string(), &node.ca(), old.clone(), "phone")
            .expect("config");
        let refused = Connection::connect(&config).await.expect_err("refused");
        assert_eq!(refused.code(), Some(ErrorCode::TOKEN_REVOKED));
    }
    n1.stop().await;
    n2.stop().await;
}
