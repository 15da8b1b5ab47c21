//! Operations against real `kvplane serve` processes: the metrics endpoint after saves,
//! lookups and loads; `kvplane status --json`; bad control requests; config errors that
//! name the key; SIGTERM with operations in flight (prompt exit 0, a clean end for the
//! client, completed write-through saves still there after a restart).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use kvplane_ffi::{Opcode, SQE_F_WRITE_THROUGH, Status, Tier};
use kvplane_tests::{
    DaemonProc, TestEngine, control_addr, http, http_get as get, kvplane_bin, small_config,
    temp_dir, with_ephemeral_metrics, with_nvme,
};

const BLOCK: u64 = 65536;

/// Config with the control server on an ephemeral loopback port and an NVMe file.
fn config_with_nvme(dir: &Path, write_through: bool) -> std::path::PathBuf {
    small_config(dir, |c| {
        with_nvme(c, &dir.join("nvme.kvp"), 32 << 20);
        with_ephemeral_metrics(c);
        c.blocks.write_through = write_through;
    })
}

/// The value of one sample line (`name{labels}` exactly as rendered).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{metrics}"))
        .parse()
        .unwrap()
}

fn chain(n: u64, salt: u64) -> Vec<(u64, u64, u32)> {
    let h = |i: u64| 0xA11CE ^ (salt << 40) ^ (i.wrapping_mul(0x9E37_79B9) + 1);
    (0..n)
        .map(|i| (h(i), if i == 0 { 0 } else { h(i - 1) }, i as u32))
        .collect()
}

/// Saves 8 blocks (write-through), looks up 10 (8 hits, 2 misses), loads the 8.
fn traffic(e: &mut TestEngine) {
    let blocks = chain(8, 1);
    for (i, b) in blocks.iter().enumerate() {
        e.fill_page(i as u32, b.0);
    }
    let (c, _) = e.block_op(Opcode::Save, 0, &blocks);
    assert_eq!((c.status, c.blocks), (0, 8), "{c:?}");
    let longer = chain(10, 1);
    let (c, _) = e.block_op(Opcode::Lookup, 0, &longer);
    assert_eq!((c.status, c.blocks), (0, 8), "{c:?}");
    let into: Vec<_> = blocks.iter().map(|&(h, p, pg)| (h, p, pg + 16)).collect();
    let (c, _) = e.block_op(Opcode::Load, 0, &into);
    assert_eq!((c.status, c.blocks), (0, 8), "{c:?}");
}

#[test]
fn metrics_count_bytes_per_link_hits_per_namespace_and_latency() {
    let dir = temp_dir("ops-metrics");
    let cfg = config_with_nvme(dir.path(), true);
    let daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let addr = control_addr(&daemon);
    let mut e = TestEngine::attach(&daemon.socket, "tenant-a/model").unwrap();
    traffic(&mut e);
    let (code, m) = get(&addr, "/metrics");
    assert_eq!(code, 200);
    let eight = (8 * BLOCK) as f64;
    assert_eq!(
        sample(&m, "kvplane_link_bytes_total{link=\"engine_to_host\"}"),
        eight
    );
    assert_eq!(
        sample(&m, "kvplane_link_bytes_total{link=\"host_to_nvme\"}"),
        eight
    );
    assert_eq!(
        sample(&m, "kvplane_link_bytes_total{link=\"host_to_engine\"}"),
        eight
    );
    assert_eq!(
        sample(&m, "kvplane_link_bytes_total{link=\"nvme_to_host\"}"),
        0.0
    );
    assert_eq!(sample(&m, "kvplane_tier_blocks{tier=\"host\"}"), 8.0);
    assert_eq!(sample(&m, "kvplane_tier_blocks{tier=\"nvme\"}"), 8.0);
    assert_eq!(sample(&m, "kvplane_tier_used_bytes{tier=\"host\"}"), eight);
    assert!(sample(&m, "kvplane_tier_capacity_blocks{tier=\"nvme\"}") > 8.0);
    assert_eq!(
        sample(
            &m,
            "kvplane_lookup_blocks_total{namespace=\"tenant-a/model\",tier=\"host\",result=\"hit\"}"
        ),
        8.0
    );
    assert_eq!(
        sample(
            &m,
            "kvplane_lookup_blocks_total{namespace=\"tenant-a/model\",tier=\"none\",result=\"miss\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(&m, "kvplane_op_duration_seconds_count{op=\"save\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "kvplane_op_duration_seconds_count{op=\"load\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "kvplane_op_duration_seconds_bucket{op=\"save\",le=\"+Inf\"}"
        ),
        1.0
    );
    assert!(sample(&m, "kvplane_op_duration_seconds_sum{op=\"save\"}") > 0.0);
    assert_eq!(sample(&m, "kvplane_sessions"), 1.0);
    assert_eq!(sample(&m, "kvplane_ops_in_flight"), 0.0);
    assert_eq!(sample(&m, "kvplane_nvme_errors_total{kind=\"write\"}"), 0.0);
    assert_eq!(sample(&m, "kvplane_blocks_saved_total"), 8.0);
    assert!(m.contains("kvplane_build_info{version=\""), "{m}");
    assert!(m.contains("backend=\"host\"") || m.contains("backend=\"cuda\""));
    // Counters are monotonic: a second round adds the loads again.
    let into: Vec<_> = chain(8, 1)
        .iter()
        .map(|&(h, p, pg)| (h, p, pg + 16))
        .collect();
    e.block_op(Opcode::Load, 0, &into);
    let (_, m2) = get(&addr, "/metrics");
    assert_eq!(
        sample(&m2, "kvplane_link_bytes_total{link=\"host_to_engine\"}"),
        2.0 * eight
    );
}

#[test]
fn status_json_shows_tiers_sessions_namespaces_and_backend() {
    let dir = temp_dir("ops-status");
    let cfg = config_with_nvme(dir.path(), true);
    let daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let addr = control_addr(&daemon);
    let mut e = TestEngine::attach(&daemon.socket, "ns-status").unwrap();
    traffic(&mut e);
    let out = Command::new(kvplane_bin())
        .args(["status", "--json", "--socket", &addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["pid"], daemon.pid());
    assert_eq!(v["block_bytes"], BLOCK);
    assert_eq!(v["blocks"], 8);
    let tiers = v["tiers"].as_array().unwrap();
    assert_eq!(tiers.len(), 3);
    let host = tiers.iter().find(|t| t["tier"] == "host").unwrap();
    assert_eq!(host["used_blocks"], 8);
    assert_eq!(host["lookup_hits"], 8);
    assert!(
        (host["hit_rate"].as_f64().unwrap() - 0.8).abs() < 1e-9,
        "{host}"
    );
    assert!(host["capacity_bytes"].as_u64().unwrap() >= 8 * BLOCK);
    assert_eq!(v["lookup_hits"], 8);
    assert_eq!(v["lookup_misses"], 2);
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["pid"], std::process::id());
    assert_eq!(sessions[0]["namespaces"][0], "ns-status");
    assert_eq!(v["namespaces"][0]["namespace"], "ns-status");
    let link = |name: &str| {
        v["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["link"] == name)
            .unwrap()["bytes_total"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(link("engine_to_host"), 8 * BLOCK);
    assert_eq!(link("host_to_nvme"), 8 * BLOCK);
    assert!(!v["nvme"]["engine"].as_str().unwrap().is_empty());
    // The device in use, once: the top-level backend is the device's. No GPUs listed
    // comes with the reason (tests/tests/device.rs checks each `[device] backend`).
    assert_eq!(v["backend"], v["device"]["backend"], "{v}");
    if v["device"]["gpus"].as_array().unwrap().is_empty() {
        assert!(!v["device"]["gpu_note"].as_str().unwrap().is_empty(), "{v}");
    }
    // The table for people.
    let out = Command::new(kvplane_bin())
        .args(["status", "--socket", &addr])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        table.contains("ns-status") && table.contains("host_to_nvme"),
        "{table}"
    );
    // Nothing listening: a clear error, non-zero exit.
    drop(daemon);
    let out = Command::new(kvplane_bin())
        .args(["status", "--socket", &addr, "--timeout-ms", "500"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no kvplane daemon answering"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_control_requests_get_4xx_with_a_reason() {
    let dir = temp_dir("ops-http");
    let cfg = config_with_nvme(dir.path(), false);
    let daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let addr = control_addr(&daemon);
    let (code, body) = http(
        &addr,
        b"POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(code, 405, "{body}");
    assert!(body.contains("POST"));
    let (code, body) = get(&addr, "/secrets");
    assert_eq!(code, 404);
    assert!(body.contains("/secrets"));
    let (code, _) = http(&addr, b"GARBAGE\r\n\r\n");
    assert_eq!(code, 400);
    let (code, body) = http(
        &addr,
        b"GET /status HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(code, 413, "{body}");
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let (code, _) = http(&addr, huge.as_bytes());
    assert_eq!(code, 431);
    let (code, body) = get(&addr, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    // Still serving after the bad ones.
    assert_eq!(get(&addr, "/status").0, 200);
}

#[test]
fn config_errors_name_the_key_through_the_binary() {
    let dir = temp_dir("ops-config");
    let cases = [
        (
            "[control]\nmetrics_addr = \"0.0.0.0:9464\"\n",
            "control.metrics_addr",
        ),
        (
            "[control]\nmetrics_addr = \"localhost\"\n",
            "control.metrics_addr",
        ),
        ("[serve]\nmax_sessions = 0\n", "serve.max_sessions"),
        ("[blocks]\nblock_bytes = 0\n", "blocks.block_bytes"),
        ("[control]\nbogus_key = 1\n", "bogus_key"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(kvplane_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .arg("--socket")
            .arg(dir.path().join("never.sock"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} was accepted");
        assert!(
            stderr.contains(key),
            "{text:?}: stderr does not name {key}: {stderr}"
        );
    }
    // The documented default config round-trips through the binary.
    let out = Command::new(kvplane_bin())
        .args(["serve", "--print-default-config"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[control]") && text.contains("metrics_addr = \"127.0.0.1:9464\""));
}

/// One block op that may fail (the daemon is going away): Ok(cqe) or the client error.
/// One block op with a 30 s timeout: the completion, or why there was none.
fn try_block_op(
    e: &mut TestEngine,
    opcode: Opcode,
    flags: u16,
    blocks: &[(u64, u64, u32)],
) -> Result<kvplane_ffi::kvp_cqe, String> {
    e.try_block_op(opcode, flags, blocks, Duration::from_secs(30))
        .map(|(c, _)| c)
        .map_err(|x| x.to_string())
}

#[test]
fn sigterm_with_operations_in_flight_exits_promptly_and_keeps_completed_saves() {
    let dir = temp_dir("ops-sigterm");
    let cfg = config_with_nvme(dir.path(), false);
    let mut daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let mut e = TestEngine::attach(&daemon.socket, "ns-term").unwrap();
    for p in 0..16 {
        e.fill_page(p, 1000 + p as u64);
    }
    let started = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let s2 = Arc::clone(&started);
    // Hammer: write-through saves of fresh 4-block chains, each followed by a load.
    let hammer = std::thread::spawn(move || {
        let mut completed: Vec<Vec<(u64, u64, u32)>> = Vec::new();
        let mut end = String::new();
        for round in 0u64.. {
            // 100 chains (400 blocks) fit the NVMe tier (481 slots), so nothing completed is
            // evicted; after them the hammer keeps loading (staging from NVMe as the host
            // tier, 240 slots, turns over).
            let blocks = chain(4, round % 100 + 100);
            let save = round < 100;
            if save {
                match try_block_op(&mut e, Opcode::Save, SQE_F_WRITE_THROUGH, &blocks) {
                    Ok(c) if c.status == 0 => {
                        assert_eq!(u32::from(c.tier), Tier::Nvme.raw(), "{c:?}");
                        completed.push(blocks.clone());
                    }
                    Ok(c) => {
                        end = format!("save completed with status {}", c.status);
                        assert!(
                            c.status == Status::Shutdown.raw(),
                            "a save in flight at shutdown may only fail with Shutdown: {c:?}"
                        );
                        break;
                    }
                    Err(x) => {
                        end = x;
                        break;
                    }
                }
            }
            s2.store(true, Ordering::SeqCst);
            let into: Vec<_> = blocks.iter().map(|&(h, p, pg)| (h, p, pg + 8)).collect();
            match try_block_op(&mut e, Opcode::Load, 0, &into) {
                Ok(c) if c.status == 0 => assert_eq!(c.blocks, 4),
                Ok(c) => {
                    assert_eq!(c.status, Status::Shutdown.raw(), "{c:?}");
                    end = "load: Shutdown".into();
                    break;
                }
                Err(x) => {
                    end = x;
                    break;
                }
            }
        }
        tx.send((completed, end)).unwrap();
    });
    let t0 = Instant::now();
    while !started.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    let t_term = Instant::now();
    assert!(
        daemon.terminate(Duration::from_secs(10)),
        "daemon did not exit 0 within 10 s of SIGTERM; log:\n{}",
        daemon.log_text()
    );
    let exit_s = t_term.elapsed().as_secs_f64();
    assert!(exit_s < 5.0, "SIGTERM took {exit_s:.2} s");
    // The client sees a clean end, not a hang.
    let (completed, end) = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the engine's call hung after the daemon exited");
    hammer.join().unwrap();
    assert!(!completed.is_empty(), "no save completed before SIGTERM");
    assert!(!end.is_empty());
    let log = daemon.log_text();
    assert!(log.contains("NVMe flushed"), "{log}");
    // A restarted daemon on the same NVMe file still has every completed save.
    drop(daemon);
    let daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let mut e = TestEngine::attach(&daemon.socket, "ns-term").unwrap();
    for blocks in &completed {
        let (c, ops) = e.block_op(Opcode::Lookup, 0, blocks);
        assert_eq!(
            (c.status, c.blocks),
            (0, 4),
            "a completed save was lost: {c:?}"
        );
        assert!(ops.iter().all(|o| o.tier == Tier::Nvme.raw() as u8));
    }
    // ... and the bytes are the ones saved (the last chain, loaded from NVMe).
    let last = completed.last().unwrap();
    let into: Vec<_> = last.iter().map(|&(h, p, pg)| (h, p, pg + 20)).collect();
    for p in 0..4 {
        e.fill_page(p, 1000 + p as u64);
    }
    let (c, _) = e.block_op(Opcode::Load, 0, &into);
    assert_eq!((c.status, c.blocks), (0, 4), "{c:?}");
    for i in 0..4u32 {
        assert!(
            e.read_page(20 + i) == e.read_page(i),
            "block {i} differs after restart"
        );
    }
}

#[test]
fn bench_transfer_quick_prints_one_json_object_and_writes_csv_and_svg() {
    let dir = temp_dir("ops-bench");
    let csv = dir.path().join("t.csv");
    let svg = dir.path().join("t.svg");
    let out = Command::new(kvplane_bin())
        .args([
            "--log", "warn", "bench", "transfer", "--quick", "--json", "--dir",
        ])
        .arg(dir.path().join("files"))
        .arg("--csv")
        .arg(&csv)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(v["backend"].as_str().unwrap().contains("host"), "{v}");
    let points = v["points"].as_array().unwrap();
    let paths = ["engine->host", "host->engine", "host->nvme", "nvme->host"];
    for p in paths {
        let n = points.iter().filter(|x| x["path"] == p).count();
        // 3 block sizes, batch 1, 2 threads; NVMe paths also queue depth 1.
        let want = if p.contains("nvme") { 6 } else { 5 };
        assert_eq!(n, want, "{p}");
    }
    for p in points {
        let g = p["gbps"].as_f64().unwrap();
        let c = p["ceiling_gbps"].as_f64().unwrap();
        assert!(g.is_finite() && g > 0.0 && c.is_finite() && c > 0.0, "{p}");
        assert!(p["p99_us"].as_f64().unwrap() >= p["p50_us"].as_f64().unwrap());
        let ceiling = p["ceiling"].as_str().unwrap();
        if p["path"].as_str().unwrap().contains("nvme") {
            assert!(ceiling.contains("O_DIRECT io_uring"), "{ceiling}");
        } else {
            assert_eq!(ceiling, "memcpy");
            // The host paths are timed through a daemon child and engine sessions.
            assert!(
                p["via"].as_str().unwrap().starts_with("kvplane serve"),
                "{p}"
            );
        }
    }
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), points.len() + 1);
    assert!(csv.starts_with("path,block_bytes,batch,queue_depth,threads,"));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("stroke-width=\"2\" points=").count(), 4);
    assert!(!svg.contains("NaN") && !svg.contains("inf"));
}

/// `bench host` goes through a `kvplane serve` child and an engine session with a paged
/// layout, checks every loaded byte, and reports both figures and their ratio.
#[test]
fn bench_host_times_save_and_load_through_a_daemon_child() {
    let dir = temp_dir("ops-bench-host");
    let out = Command::new(kvplane_bin())
        .args(["--log", "warn", "bench", "host", "--json", "--no-lock"])
        .args([
            "--layers",
            "4",
            "--batch-blocks",
            "3",
            "--iters",
            "2",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(v["path"].as_str().unwrap().contains("kvplane serve"), "{v}");
    // 4 layers x K,V x 16 tokens x 8 heads x 256 bytes.
    assert_eq!(v["block_bytes"], 4 * 2 * 16 * 8 * 256);
    // Warm-up and 2 measured rounds of 3 blocks, each loaded block checked.
    assert_eq!(v["blocks_verified"], 9);
    for k in [
        "save_gbps",
        "load_gbps",
        "memcpy_gbps",
        "save_ratio",
        "load_ratio",
    ] {
        let x = v[k].as_f64().unwrap();
        assert!(x.is_finite() && x > 0.0, "{k}: {v}");
    }
}

/// `bench offload` goes through a `kvplane serve` child and an engine session per batch
/// size, checks the loaded bytes, takes the G1 path when asked (it fails if a load is not
/// served from G1), and reports each path next to its references. With GPU memory on a
/// machine without a driver it fails and says why.
#[test]
fn bench_offload_reports_each_batch_against_its_references() {
    let dir = temp_dir("ops-bench-offload");
    let out = Command::new(kvplane_bin())
        .args([
            "--log",
            "warn",
            "bench",
            "offload",
            "--json",
            "--no-lock",
            "--g1",
        ])
        .args(["--batches", "1,3", "--iters", "1", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(
        v["backend"].as_str().unwrap().starts_with("host backend"),
        "{v}"
    );
    // Llama-3.1-8B in 16-token pages: 32 layers x K,V x 16 x 8 x 256 bytes.
    assert_eq!(v["block_bytes"], 32 * 2 * 16 * 8 * 256);
    assert_eq!(
        v["blocks_verified"], 8,
        "the first measured round of 1 and of 3, from the host tier and from G1"
    );
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r["batch_blocks"].clone())
            .collect::<Vec<_>>(),
        [1, 3]
    );
    for r in rows {
        for k in [
            "save_gbps",
            "load_gbps",
            "bulk_d2h_gbps",
            "per_page_d2h_gbps",
            "save_vs_bulk",
            "load_vs_per_page",
        ] {
            let x = r[k].as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{k}: {r}");
        }
        let g1 = r["g1"]["load_vs_bulk_d2d"].as_f64().unwrap();
        assert!(g1.is_finite() && g1 > 0.0, "{r}");
    }
    if !kvplane_cuda::cuda::driver_present() {
        let out = Command::new(kvplane_bin())
            .args([
                "--log",
                "warn",
                "bench",
                "offload",
                "--memory",
                "ipc",
                "--batches",
                "1",
            ])
            .args(["--iters", "1", "--no-lock", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "GPU memory without a GPU must fail");
        assert!(err.contains("driver") || err.contains("cuda"), "{err}");
    }
}
