//! `kvplane replay --engines` end to end: a slice of the bundled Mooncake trace through the
//! router to `kvplane engine-sim` processes on a real `kvplane serve`, with small engine
//! pools so pages are evicted, saved to the daemon and loaded back. Checks the accounting
//! and that the daemon tiers add reuse without corrupting a single page.

use std::process::Command;

use kvplane_tests::{json_num as num, kvplane_bin, repo_root, temp_dir};
use serde_json::Value;

#[test]
fn trace_slice_through_router_engines_and_daemon() {
    let dir = temp_dir("replay-engines");
    let trace = repo_root().join("data/traces/mooncake/synthetic_trace.jsonl");
    let out = Command::new(kvplane_bin())
        .args(["replay", "--engines", "--json", "--router-only"])
        .arg("--trace")
        .arg(&trace)
        .args(["--workers", "2", "--limit", "120"])
        // 2048 pages of 64 tokens: a few prompts per engine, so the pools churn.
        .args(["--engine-pages", "2048", "--host-factor", "4"])
        .args(["--nvme-bytes", &(64u64 << 20).to_string()])
        .arg("--work-dir")
        .arg(dir.path())
        .output()
        .expect("run kvplane replay");
    assert!(
        out.status.success(),
        "kvplane replay --engines failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let runs = [v.clone(), v["router_only"].clone(), v["baseline"].clone()];
    for r in &runs {
        let name = r["name"].as_str().expect("name");
        // Every request finished exactly once (the driver fails on duplicates).
        assert_eq!(num(r, &["requests"]), 120.0, "{name}");
        assert_eq!(num(r, &["finished"]), 120.0, "{name}");
        // Cached + computed = input, in total and by tier.
        let input = num(r, &["input_tokens"]);
        let cached = num(r, &["cached_tokens"]);
        let computed = num(r, &["computed_tokens"]);
        assert_eq!(cached + computed, input, "{name}");
        let by_tier = num(r, &["prefix_reuse_by_tier", "engine"])
            + num(r, &["prefix_reuse_by_tier", "host"])
            + num(r, &["prefix_reuse_by_tier", "nvme"]);
        assert!((by_tier - num(r, &["prefix_reuse"])).abs() < 1e-9, "{name}");
        assert!((cached / input - num(r, &["prefix_reuse"])).abs() < 1e-9);
        assert_eq!(num(r, &["content_mismatches"]), 0.0, "{name}");
        assert_eq!(num(r, &["ring_errors"]), 0.0, "{name}");
        let (p50, p99) = (num(r, &["ttft_ms", "p50"]), num(r, &["ttft_ms", "p99"]));
        assert!(p50 > 0.0 && p50 <= p99, "{name}: ttft p50 {p50} p99 {p99}");
        assert!(num(r, &["e2e_ms", "p50"]) >= p50, "{name}");
    }
    // The daemon tiers served real loads, verified page by page.
    assert!(
        num(&v, &["loaded_blocks"]) > 0.0,
        "no LOAD from the daemon: {v}"
    );
    assert!(num(&v, &["prefix_reuse_by_tier", "host"]) > 0.0);
    assert_eq!(
        num(&v["router_only"], &["prefix_reuse_by_tier", "host"]),
        0.0
    );
    assert_eq!(num(&v["baseline"], &["loaded_blocks"]), 0.0);
    // Reuse with the daemon tiers is at least reuse without them (same routing), and at
    // least the round-robin baseline's.
    let with = num(&v, &["prefix_reuse"]);
    assert!(
        with >= num(&v["router_only"], &["prefix_reuse"]),
        "daemon tiers lowered reuse: {v}"
    );
    assert!(with >= num(&v["baseline"], &["prefix_reuse"]), "{v}");
    // The daemon streamed its tiers' KV events to the driver's router (the replay always
    // configures `[events]`), and the runs without daemons got none.
    assert!(num(&v, &["daemon_events"]) > 0.0, "no daemon events: {v}");
    assert_eq!(num(&v["router_only"], &["daemon_events"]), 0.0);
    assert_eq!(num(&v["baseline"], &["daemon_events"]), 0.0);
    // Nothing is left behind in the work directory's sockets: daemons were stopped.
    let leftover: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "sock"))
        .collect();
    assert!(leftover.is_empty(), "sockets left: {leftover:?}");
}

#[test]
fn engine_sim_rejects_a_daemon_with_the_wrong_block_size() {
    // The default daemon block size is 2 MiB; an engine with 4 KiB pages must get a clear
    // error from ATTACH_LAYOUT, not a crash on either side.
    let dir = temp_dir("engine-sim-layout");
    let cfg = dir.path().join("d.toml");
    std::fs::write(
        &cfg,
        "[tiers.host]\ncapacity_bytes = 67108864\nlock = false\nhugepages = \"never\"\n",
    )
    .unwrap();
    let mut daemon =
        kvplane_tests::DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let out = Command::new(kvplane_bin())
        .args(["engine-sim", "--pages", "64", "--socket"])
        .arg(&daemon.socket)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run engine-sim");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ATTACH_LAYOUT"), "{err}");
    assert!(daemon.alive(), "daemon died:\n{}", daemon.log_text());
}
