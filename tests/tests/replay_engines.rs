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
        .args(["replay", "--engines", "--json"])
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
    // The clock charged the declared geometry (Llama-3.1-8B by default: 8 MiB a 64-token
    // page) for every block loaded, and transfers took a share of TTFT only where the
    // daemon's tiers were used.
    assert_eq!(num(&v, &["bytes_per_token"]), 131_072.0);
    assert_eq!(
        num(&v, &["charged", "load_bytes"]),
        num(&v, &["loaded_blocks"]) * num(&v, &["declared_page_bytes"])
    );
    assert!(num(&v, &["charged", "load_ms"]) > 0.0, "{v}");
    assert!(num(&v, &["ttft_transfer_share"]) > 0.0, "{v}");
    for r in [&v["router_only"], &v["baseline"]] {
        assert_eq!(num(r, &["ttft_transfer_share"]), 0.0);
        assert_eq!(num(r, &["charged", "load_bytes"]), 0.0);
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
    let mut config = kvplane_tests::Config::default();
    config.tiers.host.capacity_bytes = 64 << 20;
    config.tiers.host.lock = false;
    config.tiers.host.hugepages = kvplane_daemon::tier::host::HugepageMode::Never;
    let cfg = kvplane_tests::write_config(dir.path(), &config);
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

/// One `kvplane engine-sim` process on `socket`, with `cost` (a `TransferCost` as JSON):
/// sends one request (prompt of trace blocks `ids`, 1024 tokens, one output token) and
/// returns its `Done` event.
fn engine_sim_request(socket: &std::path::Path, cost: &Value, ids: &[u64]) -> Value {
    use std::io::{BufRead, Write};
    let mut child = Command::new(kvplane_bin())
        .args([
            "engine-sim",
            "--pages",
            "64",
            "--layers",
            "2",
            "--head-bytes",
            "256",
        ])
        .arg("--socket")
        .arg(socket)
        .arg("--cost")
        .arg(cost.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run engine-sim");
    let mut stdin = child.stdin.take().unwrap();
    let req = serde_json::json!({"Request": {"id": 1, "arrival_ms": 0.0, "input_tokens": 1024,
        "output_tokens": 1, "hash_ids": ids}});
    writeln!(stdin, "{req}\n\"Finish\"").unwrap();
    drop(stdin);
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut done = None;
    for line in out.lines() {
        let ev: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if let Some(d) = ev.get("Done") {
            done = Some(d.clone());
        }
        assert!(ev.get("Error").is_none(), "engine error: {ev}");
    }
    assert!(child.wait().unwrap().success());
    done.expect("the request finished")
}

#[test]
fn the_clock_charges_declared_bytes_over_the_link() {
    // 64 KiB engine pages (2 layers x K,V x 64 tokens x 256 B) = the test daemon's blocks.
    let dir = temp_dir("replay-charges");
    let daemon = kvplane_tests::DaemonProc::start(dir.path(), &[]);
    let cost = |bytes_per_token: u64, load_gbps: f64| {
        serde_json::json!({"page_bytes": bytes_per_token * 64, "load_gbps": load_gbps,
            "save_gbps": 52.0, "nvme_read_gbps": 1.0, "charge_lookups": false})
    };
    // A first engine computes the 1024-token prompt and offers its 16 pages to the daemon.
    let first = engine_sim_request(&daemon.socket, &cost(131_072, 52.3), &[5, 6]);
    assert_eq!(num(&first, &["computed"]), 1024.0);
    assert_eq!(num(&first, &["transfer_ms"]), 0.0);
    // Fresh engines (empty pools) load 15 of those pages (the last is recomputed), charged
    // at the declared page size over the link: 8 MiB pages (Llama-3.1-8B) and twice that.
    let ttft = |d: &Value| num(d, &["first_token_ms"]) - num(d, &["arrival_ms"]);
    let d1 = engine_sim_request(&daemon.socket, &cost(131_072, 52.3), &[5, 6]);
    let d2 = engine_sim_request(&daemon.socket, &cost(262_144, 52.3), &[5, 6]);
    let d0 = engine_sim_request(&daemon.socket, &cost(131_072, 1e12), &[5, 6]);
    for d in [&d1, &d2, &d0] {
        assert_eq!(num(d, &["cached_host"]), 15.0 * 64.0, "{d}");
        assert_eq!(num(d, &["computed"]), 64.0, "{d}");
    }
    let x1 = num(&d1, &["transfer_ms"]);
    let expect = 15.0 * 131_072.0 * 64.0 / 52.3e6;
    assert!(
        (x1 - expect).abs() < 1e-9,
        "charged {x1} ms, expected {expect}"
    );
    // Twice the bytes per token: twice the transfer, and TTFT longer by exactly that.
    let x2 = num(&d2, &["transfer_ms"]);
    assert!((x2 - 2.0 * x1).abs() < 1e-9, "{x2} vs 2 x {x1}");
    assert!((ttft(&d2) - ttft(&d1) - x1).abs() < 1e-9);
    // A free link: no transfer time, and TTFT is the compute alone, the same compute as in
    // the charged runs (TTFT minus their transfer).
    assert!(num(&d0, &["transfer_ms"]) < 1e-6);
    assert!((ttft(&d1) - x1 - ttft(&d0)).abs() < 1e-6);
    assert!(ttft(&d0) > 0.0);
}

/// `kvplane replay --engines --json` on the first 20 requests of `trace`, one
/// configuration, with recorded Dynamo runs looked up in `refs`.
fn small_replay(
    dir: &std::path::Path,
    trace: &str,
    workers: &str,
    refs: &std::path::Path,
) -> Value {
    let out = Command::new(kvplane_bin())
        .args([
            "replay",
            "--engines",
            "--json",
            "--no-baseline",
            "--no-router-only",
        ])
        .arg("--trace")
        .arg(repo_root().join(trace))
        .args([
            "--workers",
            workers,
            "--limit",
            "20",
            "--engine-pages",
            "2048",
        ])
        .args(["--nvme-bytes", "0"])
        .arg("--reference-dir")
        .arg(refs)
        .arg("--work-dir")
        .arg(dir)
        .output()
        .expect("run kvplane replay");
    assert!(
        out.status.success(),
        "kvplane replay failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn recorded_dynamo_rows_only_for_the_same_trace_and_settings() {
    let dir = temp_dir("replay-reference");
    let refs = dir.path().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    let bundled = "data/traces/mooncake/synthetic_trace.jsonl";
    // No recorded run: no Dynamo figure at all.
    let v = small_replay(dir.path(), bundled, "2", &refs);
    assert_eq!(v["dynamo"], serde_json::json!({}), "{v}");
    assert!(v["dynamo_source"].as_str().unwrap().starts_with("none"));
    let hash = v["trace_xxh3_128"].as_str().expect("trace hash").to_owned();
    // A recorded run of exactly this trace slice and these settings.
    let report = serde_json::json!({"prefix_cache_reused_ratio": 0.25, "median_ttft_ms": 77.0,
        "p99_ttft_ms": 300.0, "mean_ttft_ms": 90.0, "median_e2e_latency_ms": 500.0,
        "p99_e2e_latency_ms": 900.0, "total_input_tokens": 1000});
    let reference = serde_json::json!({
        "recorded": "2026-12-04", "machine": "test", "produced_by": "test",
        "versions": {"ai-dynamo": "1.4.2"},
        "trace": {"file": "synthetic_trace.jsonl", "xxh3_128": hash, "requests": 20},
        "settings": {"workers": 2, "block_size": 64, "trace_block_size": 512,
            "num_gpu_blocks": 2048, "max_num_batched_tokens": 8192, "max_num_seqs": 256,
            "arrival_speedup_ratio": 1.0, "replay_mode": "offline"},
        "runs": [{"router_mode": "kv_router", "command": ["python"], "wall_s": 1.0,
            "report": report}]
    });
    std::fs::write(refs.join("dynamo-replay-test.json"), reference.to_string()).unwrap();
    let v = small_replay(dir.path(), bundled, "2", &refs);
    let row = &v["dynamo"]["kv_router"];
    assert_eq!(row["label"], "recorded 2026-12-04, not re-run", "{v}");
    assert_eq!(num(row, &["ttft_p50_ms"]), 77.0);
    assert_eq!(num(row, &["prefix_reuse"]), 0.25);
    assert_eq!(num(row, &["computed_tokens"]), 750.0);
    // Another trace, or the same trace with another setting: the recorded run is not shown.
    let other = small_replay(
        dir.path(),
        "data/traces/derived/sessions_trace.jsonl",
        "2",
        &refs,
    );
    assert_ne!(other["trace_xxh3_128"], v["trace_xxh3_128"]);
    assert_eq!(other["dynamo"], serde_json::json!({}), "{other}");
    let three = small_replay(dir.path(), bundled, "3", &refs);
    assert_eq!(three["dynamo"], serde_json::json!({}), "{three}");
}
