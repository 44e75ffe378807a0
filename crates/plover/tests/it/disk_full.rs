//! Disk full: on a small tmpfs the test mounts, writes fail; no message is acknowledged after a
//! failed write, clients get `unavailable`, `/readyz` would say not ready, and after space is
//! freed and the server restarts every acknowledged message is there.
//!
//! Needs root (it mounts a tmpfs): `cargo test --test it disk_full:: -- --ignored` (CI runs it as root).
use crate::common;

use crate::common::TestServer;
use bytes::Bytes;
use plover_proto::{ErrorCode, Target};
use std::process::Command;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
#[ignore = "needs root to mount a tmpfs (see RELIABILITY.md)"]
async fn a_full_disk_stops_acks_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=80m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount")
        .success();
    assert!(ok, "mounting a tmpfs needs root");
    let _mount = Mount(mnt.clone());

    let data = mnt.join("data");
    let d = data.clone();
    let server = TestServer::start_with(move |config| {
        config.data = d;
        config.limits.sends_per_second = 1_000_000;
        config.limits.writes_per_second = 1_000_000;
        config.limits.frames_per_second = 1_000_000;
    })
    .await;
    server.register("bob").await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");

    // Fill most of what is left, then send 60 KB messages until the store refuses.
    let free = fs_free(&mnt);
    std::fs::write(
        mnt.join("filler"),
        vec![0u8; (free as usize).saturating_sub(4 << 20)],
    )
    .expect("filler");
    let body = Bytes::from(vec![b'x'; 60 * 1024]);
    let mut acked = Vec::new();
    let mut refused = None;
    for _ in 0..5000 {
        match conv.send(body.clone()).await {
            Ok(ack) => acked.push(ack.seq),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("the disk filled up");
    assert_eq!(refused.code(), Some(ErrorCode::UNAVAILABLE), "{refused}");
    // Nothing is acknowledged after a failed write.
    let again = conv
        .send("after the failure")
        .await
        .expect_err("still refused");
    assert_eq!(again.code(), Some(ErrorCode::UNAVAILABLE));
    assert!(server.router.store().is_poisoned(), "/readyz reports this");
    drop(conv);
    alice.close().await;
    server.stop().await;

    // Free space, restart: every acknowledged message is there.
    std::fs::remove_file(mnt.join("filler")).expect("free space");
    let server = TestServer::start_with(move |c| c.data = data).await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), false)
        .await
        .expect("open");
    let have: Vec<u64> = common::all_history(&conv)
        .await
        .into_iter()
        .map(|m| m.seq)
        .collect();
    for seq in &acked {
        assert!(have.contains(seq), "acknowledged #{seq} kept");
    }
    eprintln!(
        "disk full: {} acknowledged before the failure, all {} kept after restart",
        acked.len(),
        acked.len()
    );
    drop(conv);
    alice.close().await;
    server.stop().await;
}

fn fs_free(path: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("free bytes")
}
