//! `[device] backend` through a real `kvplane serve`: the backend it runs on is the one
//! configured (or, for `auto`, the one this machine allows, with the reason), and STATS,
//! the attach reply, `/status`, `/metrics` and `kvplane status` all say which.
//!
//! `auto` and `cuda` depend on the machine: `kvplane_cuda::cuda::driver_present()` picks
//! the expectation, and each branch asserts it (no driver: `auto` is the host with the
//! driver named as the reason, `cuda` refuses to start; a driver and GPU 0: both are cuda).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kvplane_daemon::config::BackendSetting;
use kvplane_shm::{AttachOptions, Session};
use kvplane_tests::{
    DaemonProc, control_addr, http_get, kvplane_bin, serve_until_exit, small_config, stats,
    status_json, temp_dir, with_ephemeral_metrics, with_nvme,
};

/// What one running daemon reports about its device, from every place that reports it.
struct Reported {
    /// The attach reply's `backend`.
    attach: u32,
    /// STATS `backend`.
    stats: u32,
    /// `/status`.
    status: serde_json::Value,
    /// `/metrics`.
    metrics: String,
    /// `kvplane status` (the table).
    table: String,
    log: String,
}

fn start(dir: &Path, backend: BackendSetting) -> DaemonProc {
    let cfg = small_config(dir, |c| {
        c.device.backend = backend;
        with_ephemeral_metrics(c);
        // G1 and NVMe, so the start-up log says how blocks travel between them.
        c.tiers.hbm.capacity_bytes = 1 << 20;
        with_nvme(c, &dir.join("g3.kvp"), 8 << 20);
    });
    DaemonProc::start(dir, &["--config", cfg.to_str().unwrap()])
}

fn reported(daemon: &DaemonProc) -> Reported {
    let mut o = AttachOptions::new(&daemon.socket);
    o.namespaces = vec!["tenant-device".into()];
    let mut session = Session::attach(o).expect("attach");
    let mut qp = session.take_queue_pairs().expect("queue pairs").remove(0);
    let stats = stats(&mut qp).backend;
    let addr = control_addr(daemon);
    let (code, metrics) = http_get(&addr, "/metrics");
    assert_eq!(code, 200, "/metrics: {metrics}");
    let out = Command::new(kvplane_bin())
        .args(["status", "--socket", &addr])
        .output()
        .expect("run kvplane status");
    assert!(
        out.status.success(),
        "kvplane status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Reported {
        attach: session.backend(),
        stats,
        status: status_json(&addr),
        metrics,
        table: String::from_utf8_lossy(&out.stdout).into_owned(),
        log: daemon.log_text(),
    }
}

/// Every report names `backend` (with ABI code `code`) and `choice`, consistently.
fn assert_backend(r: &Reported, backend: &str, code: u32, choice: &str) {
    let s = &r.status;
    assert_eq!((r.attach, r.stats), (code, code), "attach reply, STATS");
    assert_eq!(s["backend"], backend, "{s}");
    assert_eq!(s["device"]["backend"], backend, "{s}");
    assert_eq!(s["device"]["choice"], choice, "{s}");
    assert_eq!(s["device"]["ordinal"], 0, "{s}");
    let describe = s["device"]["describe"].as_str().unwrap();
    assert!(describe.starts_with(&format!("{backend} backend")), "{s}");
    let info = format!("kvplane_device_info{{backend=\"{backend}\",choice=\"{choice}\"}} 1\n");
    assert!(r.metrics.contains(&info), "{info} not in:\n{}", r.metrics);
    let gpus = s["device"]["gpus"].as_array().unwrap().len();
    assert!(
        r.metrics.contains(&format!("\nkvplane_gpus {gpus}\n")),
        "{}",
        r.metrics
    );
    assert!(
        r.table.contains(&format!("backend: {backend} "))
            && r.table.contains(&format!("device: {describe}"))
            && r.table
                .contains(&format!("[device] backend = \"{choice}\"")),
        "{}",
        r.table
    );
}

#[test]
fn host_backend_is_reported_as_host_everywhere() {
    let dir = temp_dir("device-host");
    let mut daemon = start(dir.path(), BackendSetting::Host);
    let r = reported(&daemon);
    assert_backend(&r, "host", 0, "host");
    // Asked for and got: no reason, none printed.
    assert!(
        r.status["device"]["fallback_reason"].is_null(),
        "{}",
        r.status
    );
    assert!(!r.table.contains("because"), "{}", r.table);
    // NVMe <-> G1 goes through the pinned host tier: the start-up log and `/status` say
    // so.
    let path = r.status["device"]["nvme_g1_path"].as_str().unwrap();
    assert!(path.starts_with("through the pinned host tier"), "{path}");
    assert!(
        r.log.contains("NVMe <-> G1") && r.log.contains(path),
        "{}",
        r.log
    );
    assert!(daemon.terminate(Duration::from_secs(10)));
}

#[test]
fn auto_is_cuda_with_a_gpu_else_the_host_saying_why() {
    let dir = temp_dir("device-auto");
    let mut daemon = start(dir.path(), BackendSetting::Auto);
    let r = reported(&daemon);
    let reason = &r.status["device"]["fallback_reason"];
    if kvplane_cuda::cuda::driver_present() {
        assert_backend(&r, "cuda", 1, "auto");
        assert!(reason.is_null(), "{}", r.status);
        assert!(!r.status["device"]["gpus"].as_array().unwrap().is_empty());
    } else {
        assert_backend(&r, "host", 0, "auto");
        let reason = reason.as_str().expect("auto on the host says why");
        assert!(
            reason.contains("no NVIDIA driver") && reason.contains("libcuda.so"),
            "{reason}"
        );
        // The reason is logged at start-up and printed by `kvplane status`.
        assert!(r.log.contains(reason), "{}", r.log);
        assert!(
            r.table.contains(&format!("host backend because: {reason}")),
            "{}",
            r.table
        );
        assert!(r.metrics.contains("\nkvplane_gpus 0\n"), "{}", r.metrics);
        assert!(
            r.status["device"]["gpu_note"]
                .as_str()
                .unwrap()
                .contains("no NVIDIA driver"),
            "{}",
            r.status
        );
    }
    assert!(daemon.terminate(Duration::from_secs(10)));
}

#[test]
fn cuda_without_a_driver_refuses_to_start_naming_it() {
    let dir = temp_dir("device-cuda");
    if kvplane_cuda::cuda::driver_present() {
        let mut daemon = start(dir.path(), BackendSetting::Cuda);
        let r = reported(&daemon);
        assert_backend(&r, "cuda", 1, "cuda");
        assert!(
            r.status["device"]["fallback_reason"].is_null(),
            "{}",
            r.status
        );
        assert!(daemon.terminate(Duration::from_secs(10)));
    } else {
        let cfg = small_config(dir.path(), |c| c.device.backend = BackendSetting::Cuda);
        let socket = dir.path().join("kvplane.sock");
        let log = dir.path().join("daemon.log");
        let status = serve_until_exit(&cfg, &socket, &log, Duration::from_secs(20))
            .expect("kvplane serve with backend = \"cuda\" and no driver kept running");
        let stderr = std::fs::read_to_string(&log).unwrap();
        assert!(!status.success(), "exit {status}; stderr:\n{stderr}");
        assert!(
            stderr.contains("backend = \"cuda\"")
                && stderr.contains("no NVIDIA driver")
                && stderr.contains("libcuda.so"),
            "{stderr}"
        );
        // Refused before anything was served.
        assert!(!socket.exists(), "the engine socket was created");
    }
}
