//! A cluster under failures, with real processes: three `plover serve` nodes on three
//! nats-server processes. Writers keep sending to one group through the node list while a
//! node is killed with SIGKILL, a NATS server is killed, or a node is paused past its lease;
//! then a checker reads the whole history, in the manner of Jepsen: every acknowledged
//! message is there exactly once with the seq it was acknowledged with, the seqs are
//! gapless and never reused, each writer's messages are in the order it sent them, and every
//! node holds the same history.

use crate::common::nats::{JetStream, Nats};
use crate::common::{all_history, spawn_server_on};
use plover_client::{ClientConfig, Connection, Conversation};
use plover_proto::{ClientMsgId, ConversationId, Target};
use plover_server::auth::TokenKeys;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::Child;

const SECRET: &str = "a secret every node of the failover cluster shares";

struct Node {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

/// Starts node `id` on `nats`, its certificate in the shared `certs`.
async fn spawn_node(nats: &Nats, id: &str, certs: &Path) -> Node {
    spawn_node_on(nats, id, certs, "127.0.0.1:0").await
}

/// [`spawn_node`] on `listen`.
async fn spawn_node_on(nats: &Nats, id: &str, certs: &Path, listen: &str) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let quote = |v: Vec<String>| {
        v.iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let extra = format!(
        "[auth]\nsecret = {SECRET:?}\n[cluster]\nnats = [{}]\nmonitor = [{}]\nnode = {id:?}\n\
         node_ttl = \"3s\"\nlease = \"3s\"\n",
        quote(nats.urls()),
        quote(nats.monitors()),
    );
    let (child, addr) = spawn_server_on(dir.path(), certs, &extra, listen).await;
    Node {
        child,
        addr,
        _dir: dir,
    }
}

fn config(servers: &str, certs: &Path, user: &str, device: &str) -> ClientConfig {
    let token = TokenKeys::new(SECRET.as_bytes())
        .mint(user, None, Duration::from_secs(3600))
        .expect("mint");
    ClientConfig::new(servers, &certs.join("cert.pem"), token, device).expect("config")
}

/// What a writer was told: (client id, body) -> acknowledged seq.
type Acked = Arc<Mutex<Vec<(ClientMsgId, String, u64, Instant)>>>;

/// A writer: sends `w<k>-<i>` to the group, one after another, each until acknowledged
/// (reconnecting through the list and sending again with the same id), until `stop`.
async fn writer(
    servers: String,
    certs: PathBuf,
    user: String,
    group: ConversationId,
    acked: Acked,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut conv: Option<(Connection, Conversation)> = None;
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let id = ClientMsgId::random();
        let body = format!("{user}-{i}");
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            if conv.is_none() {
                let attempt = async {
                    let c = Connection::connect(&config(&servers, &certs, &user, "phone")).await?;
                    let cv = c.open(Target::Conversation(group), false).await?;
                    Ok::<_, plover_client::ClientError>((c, cv))
                };
                match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                    Ok(Ok(pair)) => conv = Some(pair),
                    _ => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let Some((_, cv)) = &conv else { continue };
            // An app's own patience: a node that died (or stopped answering) is noticed
            // long before QUIC's idle timeout.
            let sent = tokio::time::timeout(
                Duration::from_secs(3),
                cv.send_with_id(id, body.clone().into()),
            )
            .await;
            match sent {
                Ok(Ok(ack)) => {
                    acked
                        .lock()
                        .expect("acked")
                        .push((id, body.clone(), ack.seq, Instant::now()));
                    break;
                }
                _ => {
                    // The node went away (or did not answer): drop the connection, find
                    // another node, send the same id again.
                    conv = None;
                }
            }
        }
        i += 1;
    }
    if let Some((c, _)) = conv {
        c.close().await;
    }
}

/// Checks the history against what the writers were told; returns its length.
fn check(
    history: &[plover_proto::Message],
    acked: &[(ClientMsgId, String, u64, Instant)],
) -> usize {
    // Gapless, never reused.
    for (i, m) in history.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1, "seqs are gapless and unique");
    }
    // Each client id at most once.
    let mut by_id: HashMap<ClientMsgId, &plover_proto::Message> = HashMap::new();
    for m in history.iter().filter(|m| m.change.is_none()) {
        assert!(
            by_id.insert(m.id, m).is_none(),
            "message {} stored twice",
            String::from_utf8_lossy(&m.body)
        );
    }
    // Every acknowledged message, with the seq it was acknowledged with.
    for (id, body, seq, _) in acked {
        let m = by_id
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged {body} (seq {seq}) is lost"));
        assert_eq!(m.seq, *seq, "{body} moved");
        assert_eq!(String::from_utf8_lossy(&m.body), *body);
    }
    // Each writer's messages in the order it sent them.
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for m in history.iter().filter(|m| m.change.is_none()) {
        let body = String::from_utf8_lossy(&m.body).into_owned();
        let (user, i) = body.rsplit_once('-').expect("w-i");
        let i: u64 = i.parse().expect("i");
        if let Some(prev) = last.insert(user.to_owned(), i) {
            assert!(prev < i, "{user}'s {i} stored after its {prev}");
        }
    }
    history.len()
}

/// The group's history as node `addr` holds it (connecting again while the node is busy
/// catching up, as an app would).
async fn history_at(addr: &str, certs: &Path, group: ConversationId) -> Vec<plover_proto::Message> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let c = Connection::connect(&config(addr, certs, "reader", "checker")).await?;
            let conv = c.open(Target::Conversation(group), false).await?;
            let h = all_history(&conv).await;
            c.close().await;
            Ok::<_, plover_client::ClientError>(h)
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(Ok(h)) => return h,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "{addr} serves no history: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

struct Run {
    nats: Nats,
    nodes: Vec<Node>,
    certs: tempfile::TempDir,
    group: ConversationId,
    acked: Acked,
    stop: Arc<std::sync::atomic::AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

/// Three NATS servers, three nodes, a group of three writers (each starting on its own
/// node) and a reader, the writers running.
async fn start() -> Run {
    let nats = Nats::start(3, JetStream::SyncAlways);
    let certs = tempfile::tempdir().expect("certs");
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(spawn_node(&nats, id, certs.path()).await);
    }
    let all: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    // Every user's first connection, so the group can name them.
    for user in ["w1", "w2", "w3", "reader"] {
        Connection::connect(&config(&all[0], certs.path(), user, "setup"))
            .await
            .expect("first connection")
            .close()
            .await;
    }
    let admin = Connection::connect(&config(&all[0], certs.path(), "w1", "setup"))
        .await
        .expect("w1");
    let members: Vec<String> = ["w2", "w3", "reader"].map(String::from).to_vec();
    let group = admin
        .create_group("failover", &members)
        .await
        .expect("group");
    admin.close().await;

    let acked: Acked = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for k in 0..3 {
        // Writer k starts on node k, then the others.
        let list: Vec<String> = (0..3).map(|j| all[(k + j) % 3].clone()).collect();
        writers.push(tokio::spawn(writer(
            list.join(","),
            certs.path().to_path_buf(),
            format!("w{}", k + 1),
            group,
            acked.clone(),
            stop.clone(),
        )));
    }
    Run {
        nats,
        nodes,
        certs,
        group,
        acked,
        stop,
        writers,
    }
}

impl Run {
    fn acked(&self) -> usize {
        self.acked.lock().expect("acked").len()
    }

    /// Waits until the writers have `n` more acknowledgements than now (or panics).
    async fn progress(&self, n: usize, within: Duration) {
        let target = self.acked() + n;
        let deadline = Instant::now() + within;
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "the writers stalled at {} acknowledgements",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How long after `since` the writer of `prefix` was acknowledged again (its first
    /// acknowledgement past the `before`th), within 30 s.
    async fn wrote_again(&self, prefix: &str, before: usize, since: Instant) -> Duration {
        let deadline = since + Duration::from_secs(30);
        loop {
            let after = self
                .acked
                .lock()
                .expect("acked")
                .iter()
                .skip(before)
                .find(|(_, body, _, _)| body.starts_with(prefix))
                .map(|a| a.3);
            if let Some(at) = after {
                return at.duration_since(since);
            }
            assert!(Instant::now() < deadline, "{prefix} never wrote again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the writers and checks the history on every live node; returns its length.
    async fn finish(mut self, live: &[usize]) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in self.writers.drain(..) {
            tokio::time::timeout(Duration::from_secs(60), w)
                .await
                .expect("writers stop")
                .expect("writer");
        }
        let acked = self.acked.lock().expect("acked").clone();
        // Every node applies the same log: wait until each holds the last acknowledged seq
        // and all hold as much (sends still in flight when the writers stopped may land).
        let top = acked.iter().map(|a| a.2).max().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let histories = loop {
            let mut histories = Vec::new();
            for &i in live {
                histories
                    .push(history_at(&self.nodes[i].addr, self.certs.path(), self.group).await);
            }
            let lens: Vec<usize> = histories.iter().map(Vec::len).collect();
            let settled = lens.iter().all(|l| *l == lens[0] && *l as u64 >= top);
            if settled || Instant::now() > deadline {
                break histories;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        for (h, i) in histories.iter().zip(live) {
            check(h, &acked);
            assert_eq!(h, &histories[0], "node {} holds another history", i + 1);
        }
        let first = histories.into_iter().next();
        let n = first.map_or(0, |f| f.len());
        for node in &mut self.nodes {
            let _ = node.child.start_kill();
        }
        drop(self.nats);
        n
    }
}

#[tokio::test]
async fn killing_a_node_loses_nothing_acknowledged_and_its_writer_goes_on_elsewhere() {
    let mut run = start().await;
    run.progress(60, Duration::from_secs(30)).await;

    // n1, where w1 writes, dies without a word.
    let killed = Instant::now();
    let before = run.acked();
    run.nodes[0].child.start_kill().expect("kill -9");
    let _ = run.nodes[0].child.wait().await;
    // w1 is acknowledged again through another node.
    let failover = run.wrote_again("w1-", before, killed).await;
    eprintln!("failover: w1 acknowledged again {failover:?} after the kill");
    run.progress(60, Duration::from_secs(30)).await;
    let n = run.finish(&[1, 2]).await;
    assert!(n >= 120, "{n}");
}

#[tokio::test]
async fn killing_a_nats_server_loses_nothing_acknowledged() {
    let mut run = start().await;
    run.progress(60, Duration::from_secs(30)).await;
    // One of three NATS servers dies: the log keeps its quorum.
    run.nats.kill(0);
    run.progress(60, Duration::from_secs(45)).await;
    let n = run.finish(&[0, 1, 2]).await;
    assert!(n >= 120, "{n}");
}

#[tokio::test]
async fn a_node_paused_past_its_lease_cannot_give_a_seq_twice() {
    let run = start().await;
    run.progress(60, Duration::from_secs(30)).await;
    // n2 stops answering with writes in flight, for longer than its leases.
    let pid = run.nodes[1].child.id().expect("pid") as i32;
    let pid = rustix::process::Pid::from_raw(pid).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    run.progress(30, Duration::from_secs(45)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
    // It wakes up and finishes what it held: whatever it appends takes its place in the
    // one log, after what the others appended meanwhile.
    run.progress(60, Duration::from_secs(45)).await;
    let n = run.finish(&[0, 1, 2]).await;
    assert!(n >= 150, "{n}");
}

#[tokio::test]
async fn a_node_joins_and_another_drains_while_clients_chat() {
    let mut run = start().await;
    run.progress(60, Duration::from_secs(30)).await;
    // n4 joins: it applies the log from its start, then serves; a reader on it sees the
    // history so far.
    let joined = spawn_node(&run.nats, "n4", run.certs.path()).await;
    run.nodes.push(joined);
    run.progress(30, Duration::from_secs(30)).await;
    // n1 is drained the way an operator drains it (SIGUSR1): it gives back its shards,
    // sends its clients to the other nodes (`moved`), and stops by itself.
    let pid = run.nodes[0].child.id().expect("pid") as i32;
    let pid = rustix::process::Pid::from_raw(pid).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::USR1).expect("SIGUSR1");
    let stopped = tokio::time::timeout(Duration::from_secs(30), run.nodes[0].child.wait())
        .await
        .expect("n1 drains and stops in time")
        .expect("wait");
    assert!(stopped.success(), "n1 stopped cleanly: {stopped:?}");
    // Its writer is not stuck: it goes on through another node.
    let (before, gone) = (run.acked(), Instant::now());
    let moved = run.wrote_again("w1-", before, gone).await;
    eprintln!("w1 acknowledged again {moved:?} after n1 stopped");
    run.progress(60, Duration::from_secs(30)).await;
    let n = run.finish(&[1, 2, 3]).await;
    assert!(n >= 150, "{n}");
}

/// The long version of the node-loss test: `PLOVER_CLUSTER_CYCLES` (default 10) cycles of
/// SIGKILL of one node in turn and its replacement by a new node of the same id on an empty
/// directory (which loads the latest snapshot or the log), with the writers running
/// throughout; the checker at the end. RELIABILITY.md row 15.
#[tokio::test]
#[ignore = "long: many kill and replace cycles"]
async fn many_kills_and_replacements_lose_nothing_acknowledged() {
    let cycles: usize = std::env::var("PLOVER_CLUSTER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut run = start().await;
    run.progress(30, Duration::from_secs(30)).await;
    for cycle in 0..cycles {
        let k = cycle % 3;
        run.nodes[k].child.start_kill().expect("kill -9");
        let _ = run.nodes[k].child.wait().await;
        run.progress(30, Duration::from_secs(60)).await;
        // A replacement with the same id and address, on an empty directory.
        let (id, addr) = (format!("n{}", k + 1), run.nodes[k].addr.clone());
        run.nodes[k] = spawn_node_on(&run.nats, &id, run.certs.path(), &addr).await;
        run.progress(30, Duration::from_secs(60)).await;
        eprintln!("cycle {cycle}: {} acknowledged so far", run.acked());
    }
    let n = run.finish(&[0, 1, 2]).await;
    assert!(n >= 30 * (2 * cycles + 1), "{n}");
}
