//! `kvplane gpu-engine` across processes, the engine half of `scripts/gpu-e2e.sh`: here
//! with host memfd pools (no GPU needed), one engine with a region per layer saving, another
//! with one region loading and comparing every byte; through the host tier, and through
//! NVMe across a daemon restart. With `--memory ipc` it needs a GPU: on a machine without
//! a driver it must say so and fail, on one with a GPU the same round trip must pass.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kvplane_tests::{DaemonProc, kvplane_bin, small_config, temp_dir, with_nvme};

/// 2 layers x 2 planes x 16 tokens x 1 head x 1024 B = 64 KiB blocks (the test daemon's).
const GEOMETRY: [&str; 8] = [
    "--layers",
    "2",
    "--page-tokens",
    "16",
    "--kv-heads",
    "1",
    "--head-bytes",
    "1024",
];

fn engine(socket: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(kvplane_bin())
        .arg("gpu-engine")
        .arg("--socket")
        .arg(socket)
        .args(GEOMETRY)
        .args(["--blocks", "8", "--json"])
        .args(args)
        .output()
        .expect("run kvplane gpu-engine");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (out.status.success(), json, stderr)
}

fn assert_round_trip(
    save: (bool, serde_json::Value, String),
    load: (bool, serde_json::Value, String),
) -> serde_json::Value {
    assert!(save.0, "save failed: {} {}", save.1, save.2);
    assert_eq!(save.1["blocks_done"], 8, "{}", save.1);
    assert!(load.0, "load failed: {} {}", load.1, load.2);
    assert_eq!(load.1["blocks_done"], 8, "{}", load.1);
    assert_eq!(load.1["mismatched_blocks"], 0, "{}", load.1);
    load.1
}

#[test]
fn per_layer_host_regions_save_and_another_process_loads_byte_for_byte() {
    let dir = temp_dir("gpu-engine");
    let daemon = DaemonProc::start(dir.path(), &[]);
    let save = engine(
        &daemon.socket,
        &["--role", "save", "--memory", "host", "--per-layer"],
    );
    assert_eq!(save.1["regions"], 2, "{}", save.1);
    let load = engine(&daemon.socket, &["--role", "load", "--memory", "host"]);
    let l = assert_round_trip(save, load);
    assert_eq!(l["regions"], 1);
    assert_eq!(l["tier"], 2, "served from the host tier: {l}");
    // A chain nobody saved: the load fails (not found), and the tool says so.
    let (ok, json, _) = engine(
        &daemon.socket,
        &["--role", "load", "--memory", "host", "--first-hash", "77"],
    );
    assert!(!ok && json["status"] != 0, "{json}");
}

/// `--keep-on-gpu`: the save lands in G1 (the completion says HBM) and the other process
/// loads from G1; `--expect-tier` fails the tool when the tier is not the one named.
#[test]
fn blocks_kept_on_the_gpu_load_from_g1_in_another_process() {
    let dir = temp_dir("gpu-engine-g1");
    let config = small_config(dir.path(), |c| {
        c.tiers.hbm.capacity_bytes = 16 * 64 * 1024;
    });
    let config = config.to_str().unwrap().to_string();
    let daemon = DaemonProc::start(dir.path(), &["--config", &config]);
    let save = engine(
        &daemon.socket,
        &[
            "--role",
            "save",
            "--memory",
            "host",
            "--per-layer",
            "--keep-on-gpu",
            "--expect-tier",
            "hbm",
        ],
    );
    assert_eq!(save.1["tier"], 1, "stored to G1: {}", save.1);
    let load = engine(
        &daemon.socket,
        &["--role", "load", "--memory", "host", "--expect-tier", "hbm"],
    );
    let l = assert_round_trip(save, load);
    assert_eq!(l["tier"], 1, "served from G1: {l}");
    // The same chain, expecting the host tier: the tool fails and names both tiers.
    let (ok, _, stderr) = engine(
        &daemon.socket,
        &[
            "--role",
            "load",
            "--memory",
            "host",
            "--expect-tier",
            "host",
        ],
    );
    assert!(!ok, "a tier other than the expected one fails");
    assert!(stderr.contains("expected 2 (host)"), "{stderr}");
    // IPC events are GPU events: with host memory the tool refuses before attaching.
    let (ok, _, stderr) = engine(
        &daemon.socket,
        &["--role", "save", "--memory", "host", "--ipc-event"],
    );
    assert!(
        !ok && stderr.contains("--ipc-event needs GPU memory"),
        "{stderr}"
    );
}

#[test]
fn write_through_blocks_load_from_nvme_after_a_restart() {
    let dir = temp_dir("gpu-engine-nvme");
    let config = small_config(dir.path(), |c| {
        with_nvme(c, &dir.path().join("nvme.kvp"), 64 << 20);
    });
    let config = config.to_str().unwrap().to_string();
    let mut daemon = DaemonProc::start(dir.path(), &["--config", &config]);
    let save = engine(
        &daemon.socket,
        &[
            "--role",
            "save",
            "--memory",
            "host",
            "--per-layer",
            "--write-through",
        ],
    );
    assert!(daemon.terminate(Duration::from_secs(20)), "daemon stops");
    let daemon = DaemonProc::start(dir.path(), &["--config", &config]);
    let load = engine(&daemon.socket, &["--role", "load", "--memory", "host"]);
    let l = assert_round_trip(save, load);
    assert_eq!(l["tier"], 3, "served from NVMe after the restart: {l}");
}

#[test]
fn ipc_memory_needs_a_gpu_and_round_trips_on_one() {
    let dir = temp_dir("gpu-engine-ipc");
    let daemon = if kvplane_cuda::cuda::driver_present() {
        let config = small_config(dir.path(), |c| {
            c.device.backend = kvplane_daemon::config::BackendSetting::Cuda;
        });
        DaemonProc::start(dir.path(), &["--config", config.to_str().unwrap()])
    } else {
        DaemonProc::start(dir.path(), &[])
    };
    let save = engine(
        &daemon.socket,
        &["--role", "save", "--memory", "ipc", "--per-layer"],
    );
    if kvplane_cuda::cuda::driver_present() {
        let load = engine(&daemon.socket, &["--role", "load", "--memory", "ipc"]);
        assert_round_trip(save, load);
    } else {
        assert!(!save.0, "IPC memory without a driver: {}", save.1);
        assert!(save.2.contains("no NVIDIA driver"), "{}", save.2);
    }
}
