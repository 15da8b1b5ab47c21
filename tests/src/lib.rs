//! Helpers for integration tests that start real processes: find the built binaries and
//! libraries, run a `kvplane serve` on a private socket, read a process's CPU time.
//!
//! The binaries come from `cargo build --workspace` (the README's test command runs it
//! before `cargo test`); a missing one is a clear failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The cargo target profile directory the test binary runs from (…/target/debug).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

fn built(name: &str) -> PathBuf {
    let p = profile_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The `kvplane` binary.
pub fn kvplane_bin() -> PathBuf {
    built("kvplane")
}

/// Directory holding libkvplane.so / libkvplane.a.
pub fn lib_dir() -> PathBuf {
    built("libkvplane.so");
    profile_dir()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repo")
        .to_path_buf()
}

/// A private temporary directory.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("kvplane-{tag}-"))
        .tempdir()
        .expect("tempdir")
}

/// A `kvplane serve` process on a private socket; SIGTERM on drop.
pub struct DaemonProc {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl DaemonProc {
    pub fn start(dir: &Path, extra_args: &[&str]) -> DaemonProc {
        let socket = dir.join("kvplane.sock");
        let log = dir.join("daemon.log");
        let child = Command::new(kvplane_bin())
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(extra_args)
            .env("KVPLANE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn kvplane serve");
        let mut d = DaemonProc { child, socket, log };
        d.wait_ready(Duration::from_secs(20));
        d
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "kvplane serve exited early with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "kvplane serve did not listen within {timeout:?}; log:\n{}",
            self.log_text()
        );
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait; returns whether it exited successfully within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        signal(self.pid(), libc::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if self.alive() && !self.terminate(Duration::from_secs(5)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Send a signal to a process.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// User + system CPU time of a process so far, in clock ticks (from /proc/PID/stat).
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Run `kvplane ping --json` against a socket and return its report.
pub fn ping_json(socket: &Path, count: u64) -> serde_json::Value {
    let out = Command::new(kvplane_bin())
        .args(["ping", "--json", "--count", &count.to_string(), "--socket"])
        .arg(socket)
        .output()
        .expect("run kvplane ping");
    assert!(
        out.status.success(),
        "kvplane ping failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ping prints JSON")
}
