//! `plover bench` runs end to end against a server it spawns, verifies delivery, and prints
//! one JSON object with `--json`.
use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_plover"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run plover bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON object on stdout: {stdout}"
    );
    serde_json::from_str(stdout.trim()).expect("JSON")
}

#[test]
fn direct_delivers_every_message_exactly_once() {
    let v = bench(&[
        "direct",
        "--users",
        "4",
        "--rate",
        "200",
        "--duration",
        "1s",
    ]);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicated"], 0);
    assert_eq!(v["errors"], 0);
    assert!(v["acked"].as_u64().expect("acked") >= 150, "{v}");
    assert_eq!(v["received"], v["acked"]);
    assert!(v["e2e"]["p50_us"].as_f64().expect("p50") > 0.0);
    assert!(v["echo_floor"]["p50_us"].as_f64().expect("floor") > 0.0);
    // Every acknowledged message passed every stage once, and was written to its one device.
    for stage in [
        "to_shard",
        "shard_queue",
        "commit_queue",
        "write_fsync",
        "reply",
        "ack",
    ] {
        assert_eq!(v["stages"][stage]["count"], v["acked"], "{stage}: {v}");
    }
    assert_eq!(v["stages"]["delivered"]["count"], v["received"], "{v}");
    // The floor of the same run: the transport pattern and the data directory's fsync.
    assert_eq!(v["floor"]["fdatasync"]["count"], 2000, "{v}");
    assert!(v["floor"]["durable"]["p99_us"].as_f64() > v["floor"]["transport"]["p99_us"].as_f64());
    assert!(
        v["floor"]["e2e_p99_over_floor_p99"]
            .as_f64()
            .expect("ratio")
            > 0.0,
        "{v}"
    );
    assert_eq!(v["floor"]["against"], "durable");
    // Where the CPU went: the spawned server and the load generator both did some work.
    assert!(
        v["cpu"]["server_seconds"].as_f64().expect("server cpu") > 0.0,
        "{v}"
    );
    assert!(
        v["cpu"]["bench_seconds"].as_f64().expect("bench cpu") > 0.0,
        "{v}"
    );
}

#[test]
fn catchup_group_and_connections_report_their_figures() {
    let v = bench(&["catchup", "--messages", "300"]);
    assert_eq!(
        (v["received"].as_u64(), v["lost"].as_u64()),
        (Some(300), Some(0))
    );
    let v = bench(&[
        "group",
        "--members",
        "12",
        "--online",
        "5",
        "--rate",
        "20",
        "--duration",
        "1s",
    ]);
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["to_last_member"]["count"], v["acked"]);
    assert_eq!(v["stages"]["ack"]["count"], v["acked"], "{v}");
    assert!(
        v["floor"]["fanout_to_last"]["count"].as_u64() > Some(0),
        "{v}"
    );
    let v = bench(&["connections", "--connections", "50", "--duration", "1s"]);
    assert_eq!(v["open"], 50);
    assert!(v["bytes_per_connection"].is_u64(), "{v}");
    assert_eq!(v["idle_seconds"], 1.0, "{v}");
    assert!(v["idle_server_cores"].as_f64() >= Some(0.0), "{v}");
    assert!(v["idle_server_us_per_connection_second"].is_f64(), "{v}");
}

#[test]
fn flood_holds_the_limits_of_a_hostile_client() {
    let v = bench(&[
        "flood",
        "--users",
        "4",
        "--rate",
        "200",
        "--duration",
        "1s",
        "--flood-rate",
        "2000",
        "--flood-group",
        "20",
    ]);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicated"], 0);
    // The stream limit (16 conversation streams) held the client back.
    assert_eq!(v["hostile_stream_limit_held"], true, "{v}");
    assert_eq!(v["hostile_streams_opened"], 16, "{v}");
    // Far past its send limit: most sends refused with `limit`, and each one answered.
    let sent = v["hostile_sends"].as_u64().expect("sends");
    let refused = v["hostile_refused_limit"].as_u64().expect("refused");
    let accepted = v["hostile_accepted"].as_u64().expect("accepted");
    assert!(refused > sent / 2, "{v}");
    assert_eq!(refused + accepted, sent, "every send answered: {v}");
    assert!(v["p99_flooded_over_quiet"].as_f64().is_some(), "{v}");
    // Every kind of hostile client ran beside the others' load, and did its work.
    for kind in ["streams", "acks", "marks", "history", "group"] {
        assert!(
            v["kinds"][kind]["p99_over_quiet"].as_f64().is_some(),
            "{kind}: {v}"
        );
    }
    assert!(v["kinds"]["acks"]["hostile"]["frames_written"].as_u64() > Some(0));
    assert!(v["kinds"]["history"]["hostile"]["pages_read"].as_u64() > Some(0));
    assert!(v["kinds"]["group"]["hostile"]["accepted"].as_u64() > Some(0));
}

#[test]
fn echo_under_load_measures_round_trips_pushes_and_fanout() {
    let v = bench(&[
        "echo",
        "--connections",
        "8",
        "--rate",
        "400",
        "--duration",
        "1s",
    ]);
    // Roughly the offered rate for one second: the pacing works, and every push arrived
    // (the scenario fails otherwise).
    let trips = v["round_trips"].as_u64().expect("round trips");
    assert!((200..=600).contains(&trips), "{v}");
    let pushes = v["pushes"].as_u64().expect("pushes");
    assert!((200..=600).contains(&pushes), "{v}");
    // 400 a second over 8 connections: 50 bursts a second, each to all 8.
    let bursts = v["fanout_bursts"].as_u64().expect("bursts");
    assert!((25..=75).contains(&bursts), "{v}");
    assert!(v["fanout_to_last"]["p50_us"].as_f64().expect("to last") > 0.0);
    for cost in [
        "cost_per_round_trip",
        "cost_per_push",
        "cost_per_fanout_push",
    ] {
        assert!(
            v[cost]["bench_us"].as_f64().expect("cpu") > 0.0,
            "{cost}: {v}"
        );
        // At least the frame itself crossed the loopback.
        assert!(
            v[cost]["datagrams"].as_f64().expect("datagrams") >= 1.0,
            "{cost}: {v}"
        );
    }
}
