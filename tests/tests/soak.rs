//! `kvplane bench soak` end to end, short: a real daemon with host and NVMe tiers under 8
//! sessions (1 to 3 queue pairs each, 4 namespaces) for a few seconds. Every loaded block
//! is checked byte for byte by the bench; here the JSON must show blocks verified, none
//! corrupted or lost, no unexpected error, both tiers used, excused NO_SPACE/BUSY outcomes
//! under their stated bound, and a flat daemon RSS. A second run puts the tiers under
//! capacity pressure (they hold half the working set) and counts lost blocks by the same
//! definition, bounded by the daemon's evictions.

use std::process::Command;

use kvplane_tests::{json_num as num, kvplane_bin, temp_dir};
use serde_json::Value;

#[test]
fn short_soak_verifies_blocks_and_loses_none() {
    let dir = temp_dir("soak");
    let out = Command::new(kvplane_bin())
        .args([
            "bench",
            "soak",
            "--json",
            "--sessions",
            "8",
            "--seconds",
            "3",
        ])
        .args(["--ceiling-seconds", "1", "--block-kib", "16"])
        // 4 namespaces x 32 chains x 8 blocks = 1024 blocks; the host tier holds 256, so
        // most loads go through NVMe.
        .args(["--sequences", "32", "--seed", "7"])
        .arg("--dir")
        .arg(dir.path())
        .env("KVPLANE_LOG", "warn")
        .output()
        .expect("run kvplane bench soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kvplane bench soak failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["passed"], Value::Bool(true), "{v}");
    assert_eq!(num(&v, &["sessions"]), 8.0);
    // Sessions cycle through 1..=3 queue pairs: 1+2+3+1+2+3+1+2.
    assert_eq!(num(&v, &["queue_pairs"]), 15.0);
    assert!(num(&v, &["blocks_verified"]) > 0.0, "{v}");
    assert_eq!(num(&v, &["blocks_corrupted"]), 0.0, "{v}");
    assert_eq!(num(&v, &["blocks_lost"]), 0.0, "{v}");
    assert_eq!(num(&v, &["unexpected_errors"]), 0.0, "{v}");
    // Excused outcomes stay under the stated bound (the run fails above it).
    assert_eq!(num(&v, &["max_excused_fraction"]), 0.02);
    assert!(num(&v, &["excused_fraction"]) <= 0.02, "{v}");
    assert_eq!(v["capacity_pressure"], Value::Bool(false));
    // The lost check covered real blocks, not an empty set.
    assert!(num(&v, &["blocks_checked_present"]) > 0.0, "{v}");
    for op in ["save", "load", "lookup", "drop"] {
        assert!(num(&v, &["by_op", op, "ops"]) > 0.0, "no {op} in {v}");
        let (p50, p99, p999) = (
            num(&v, &["by_op", op, "p50_us"]),
            num(&v, &["by_op", op, "p99_us"]),
            num(&v, &["by_op", op, "p999_us"]),
        );
        assert!(
            0.0 < p50 && p50 <= p99 && p99 <= p999,
            "{op}: {p50} {p99} {p999}"
        );
    }
    assert!(num(&v, &["ceiling", "ops_per_s"]) > 0.0);
    assert!(num(&v, &["ratio_to_ceiling"]) > 0.0);
    // The block work alone, measured in the same run: it moved and verified blocks.
    assert!(num(&v, &["block_work", "ops_per_s"]) > 0.0, "{v}");
    assert!(num(&v, &["block_work", "blocks_verified"]) > 0.0, "{v}");
    assert!(num(&v, &["ratio_to_block_work"]) > 0.0, "{v}");
    // Both tiers took part: the host tier demoted blocks to NVMe, nothing was removed
    // without a lower copy, and the daemon shut down cleanly.
    assert_eq!(num(&v, &["daemon_removed_without_copy"]), 0.0, "{v}");
    let tiers = v["daemon_status"]["tiers"].as_array().expect("tiers");
    let host = tiers.iter().find(|t| t["tier"] == "host").expect("host");
    let nvme = tiers.iter().find(|t| t["tier"] == "nvme").expect("nvme");
    assert!(num(host, &["removed", "demoted"]) > 0.0, "{host}");
    assert!(num(nvme, &["used_blocks"]) > 0.0, "{nvme}");
    assert_eq!(v["daemon_exit_clean"], Value::Bool(true));
    // RSS sampled every second; after the first quarter it stays within 16 MiB.
    let samples = v["daemon_rss"]["samples_kib"].as_array().expect("series");
    assert!(samples.len() >= 2, "{samples:?}");
    let growth = num(&v, &["daemon_rss", "growth_after_25pct_kib"]);
    assert!(growth < 16.0 * 1024.0, "daemon RSS grew {growth} KiB");
    // No descriptor leak while sessions come and go within the run.
    assert!(num(&v, &["daemon_fds_max"]) < 4.0 * num(&v, &["daemon_fds_first"]) + 64.0);
}

#[test]
fn short_soak_under_capacity_pressure_loses_nothing_the_daemon_did_not_evict() {
    let dir = temp_dir("soak-pressure");
    let out = Command::new(kvplane_bin())
        .args(["bench", "soak", "--json", "--capacity-pressure"])
        .args([
            "--sessions",
            "8",
            "--seconds",
            "3",
            "--ceiling-seconds",
            "1",
        ])
        // 1024-block working set; host 128 + NVMe 384 blocks.
        .args(["--block-kib", "16", "--sequences", "32", "--seed", "11"])
        .arg("--dir")
        .arg(dir.path())
        .env("KVPLANE_LOG", "warn")
        .output()
        .expect("run kvplane bench soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kvplane bench soak --capacity-pressure failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["passed"], Value::Bool(true), "{v}");
    assert_eq!(v["capacity_pressure"], Value::Bool(true));
    let ws = num(&v, &["working_set_blocks"]);
    assert_eq!(ws, 1024.0);
    assert_eq!(
        num(&v, &["host_capacity_blocks"]) + num(&v, &["nvme_capacity_blocks"]),
        ws / 2.0
    );
    // The daemon evicted (the run was under pressure) and every miss of a settled block
    // is covered by an eviction: none lost, none corrupted, every load checked.
    let evicted = num(&v, &["daemon_removed_without_copy"]);
    assert!(evicted > 0.0, "{v}");
    assert!(num(&v, &["settled_misses"]) <= evicted, "{v}");
    assert_eq!(num(&v, &["blocks_lost"]), 0.0, "{v}");
    assert_eq!(num(&v, &["blocks_corrupted"]), 0.0, "{v}");
    assert_eq!(num(&v, &["unexpected_errors"]), 0.0, "{v}");
    assert!(num(&v, &["blocks_verified"]) > 0.0, "{v}");
    assert!(num(&v, &["excused_fraction"]) <= num(&v, &["max_excused_fraction"]));
    assert_eq!(v["daemon_exit_clean"], Value::Bool(true));
}

#[test]
fn bad_options_fail_with_the_flag_named() {
    let dir = temp_dir("soak-bad");
    let out = Command::new(kvplane_bin())
        .args(["bench", "soak", "--json", "--block-kib", "0", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run kvplane bench soak");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--block-kib"), "{err}");
}
