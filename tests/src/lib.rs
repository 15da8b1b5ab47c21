//! Helpers for integration tests that start real processes: find the built binaries and
//! libraries, run a `kvplane serve` on a private socket, read a process's CPU time.
//!
//! The binaries come from `cargo build --workspace` (the README's test command runs it
//! before `cargo test`); a missing one is a clear failure, never a skip.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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

pub use kvplane_daemon::config::{Config, NamespaceConfig};

/// The small daemon config tests start from: 64 KiB blocks, a 16 MiB host pool (not
/// locked, no hugepages, one touch thread), the host backend even on a GPU machine (what
/// the tests expect of labels and backings; `tests/device.rs` covers `auto` and `cuda`),
/// everything else the daemon's default.
pub fn small_daemon_config() -> Config {
    let mut c = Config::default();
    c.device.backend = kvplane_daemon::config::BackendSetting::Host;
    c.blocks.block_bytes = 64 << 10;
    c.tiers.host.capacity_bytes = 16 << 20;
    c.tiers.host.lock = false;
    c.tiers.host.hugepages = kvplane_daemon::tier::host::HugepageMode::Never;
    c.tiers.host.touch_threads = 1;
    c
}

/// `config` written as `dir/kvplane.toml` (what `kvplane serve --config` reads).
pub fn write_config(dir: &Path, config: &Config) -> PathBuf {
    let path = dir.join("kvplane.toml");
    std::fs::write(&path, config.to_toml().expect("config as TOML")).expect("write config");
    path
}

/// [`small_daemon_config`] changed by `edit` (e.g. an NVMe tier), written to `dir`.
pub fn small_config(dir: &Path, edit: impl FnOnce(&mut Config)) -> PathBuf {
    let mut c = small_daemon_config();
    edit(&mut c);
    write_config(dir, &c)
}

/// An NVMe tier of `capacity_bytes` in the file `path`.
pub fn with_nvme(c: &mut Config, path: &Path, capacity_bytes: u64) {
    c.tiers.nvme.paths = vec![path.to_path_buf()];
    c.tiers.nvme.capacity_bytes = capacity_bytes;
}

/// The control server's TCP listener on an ephemeral loopback port (parallel tests).
pub fn with_ephemeral_metrics(c: &mut Config) {
    c.control.metrics_addr = "127.0.0.1:0".into();
}

impl DaemonProc {
    /// `kvplane serve` with the small test config unless `extra_args` names a `--config`.
    pub fn start(dir: &Path, extra_args: &[&str]) -> DaemonProc {
        Self::start_with_socket(dir, &dir.join("kvplane.sock"), extra_args)
    }

    /// Like [`DaemonProc::start`], with the engine socket at `socket`.
    pub fn start_with_socket(dir: &Path, socket: &Path, extra_args: &[&str]) -> DaemonProc {
        let socket = socket.to_path_buf();
        let log = dir.join("daemon.log");
        let mut cmd = Command::new(kvplane_bin());
        cmd.arg("serve").arg("--socket").arg(&socket);
        if !extra_args.contains(&"--config") {
            cmd.arg("--config").arg(small_config(dir, |_| {}));
        }
        let child = cmd
            .args(extra_args)
            .env("KVPLANE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn kvplane serve");
        Self::adopt(child, socket, log)
    }

    fn adopt(child: Child, socket: PathBuf, log: PathBuf) -> DaemonProc {
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
            // Ready once start-up is over, not when the socket first accepts: the daemon
            // still checks the socket file it bound (a test that removes it at once would
            // otherwise race that check).
            if self.log_text().contains("kvplane daemon listening")
                && std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
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

/// The number at `path` (object keys) in a `--json` report; panics naming the path.
pub fn json_num(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{} missing in {v}", path.join(".")))
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

/// A test engine: a session with a KV buffer (a sealed memfd laid out like vLLM's
/// `[2, pages, tokens, heads, head_bytes]` per layer) and its layout attached. Its block is
/// 4 layers x 2 planes x 16 tokens x 4 heads x 128 bytes = 64 KiB, the small config's size.
pub struct TestEngine {
    pub session: kvplane_shm::Session,
    pub qp: kvplane_shm::QueuePair,
    pub kv: kvplane_shm::Segment,
    pub layout: kvplane_ffi::kvp_kv_layout,
    next_user_data: u64,
}

pub const TEST_PAGES: u64 = 32;
pub const TEST_PAGE_BYTES: u64 = 16 * 4 * 128;
pub const TEST_LAYERS: usize = 4;
/// Bytes of a test engine's KV buffer (2 MiB: one hugepage).
pub const TEST_KV_BYTES: u64 = TEST_LAYERS as u64 * 2 * TEST_PAGES * TEST_PAGE_BYTES;

impl TestEngine {
    pub fn attach(socket: &Path, namespace: &str) -> Result<TestEngine, kvplane_shm::ShmError> {
        let fd = kvplane_shm::sys::memfd_create_sealed("test-kv", TEST_KV_BYTES).expect("memfd");
        Self::attach_with_buffer(socket, namespace, fd)
    }

    /// [`TestEngine::attach`] with a KV buffer the caller made (`TEST_KV_BYTES` of it are
    /// mapped and announced), e.g. a hugetlb memfd.
    pub fn attach_with_buffer(
        socket: &Path,
        namespace: &str,
        fd: std::os::fd::OwnedFd,
    ) -> Result<TestEngine, kvplane_shm::ShmError> {
        let bytes = TEST_KV_BYTES;
        let kv = kvplane_shm::Segment::map_fd(fd.try_clone().expect("dup"), bytes)?;
        let mut opts = kvplane_shm::AttachOptions::new(socket);
        opts.namespaces = vec![namespace.to_string()];
        opts.host_kv_buffer(fd, bytes);
        let mut session = kvplane_shm::Session::attach(opts)?;
        let qp = session.take_queue_pairs()?.remove(0);
        let layout =
            kvplane_kernels::layout::planes_per_layer(TEST_LAYERS as u32, 16, 4, 128, TEST_PAGES);
        assert_eq!(
            layout.buffer_bytes, bytes,
            "the test pool is exactly the layout"
        );
        let mut e = TestEngine {
            session,
            qp,
            kv,
            layout,
            next_user_data: 1,
        };
        let c = e.op(
            kvplane_ffi::Opcode::AttachLayout,
            0,
            kvplane_ffi::as_bytes(&layout).to_vec(),
            0,
            0,
        );
        assert_eq!(c.status, 0, "attach layout: {c:?}");
        Ok(e)
    }

    /// Submit one op with `arg` at arena offset 0 and wait for it.
    pub fn op(
        &mut self,
        opcode: kvplane_ffi::Opcode,
        flags: u16,
        arg: Vec<u8>,
        count: u32,
        namespace_id: u32,
    ) -> kvplane_ffi::kvp_cqe {
        self.qp.write_arena(0, &arg).expect("arena");
        let mut s = kvplane_shm::client::sqe(opcode, self.next_user_data);
        self.next_user_data += 1;
        s.flags = flags;
        s.arg_len = arg.len() as u32;
        s.count = count;
        s.namespace_id = namespace_id;
        self.qp
            .call(s, Duration::from_secs(10))
            .expect("completion")
    }

    /// A block op batch over (hash, parent, page).
    pub fn block_op(
        &mut self,
        opcode: kvplane_ffi::Opcode,
        flags: u16,
        blocks: &[(u64, u64, u32)],
    ) -> (kvplane_ffi::kvp_cqe, Vec<kvplane_ffi::kvp_block_op>) {
        self.try_block_op(opcode, flags, blocks, Duration::from_secs(10))
            .expect("block op")
    }

    /// Fill page `page` with bytes derived from `seed` (every byte, all layers and planes).
    pub fn fill_page(&self, page: u32, seed: u64) {
        for (i, off) in self.page_regions(page).into_iter().enumerate() {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1);
            let bytes: Vec<u8> = (0..TEST_PAGE_BYTES)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            self.kv.write_bytes(off, &bytes).expect("write page");
        }
    }

    /// The bytes of page `page` across all layers and planes.
    pub fn read_page(&self, page: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for off in self.page_regions(page) {
            let mut b = vec![0u8; TEST_PAGE_BYTES as usize];
            self.kv.read_bytes(off, &mut b).expect("read page");
            out.extend_from_slice(&b);
        }
        out
    }

    /// Overwrite a page with a poison pattern.
    pub fn poison_page(&self, page: u32) {
        for off in self.page_regions(page) {
            self.kv
                .write_bytes(off, &vec![0xEEu8; TEST_PAGE_BYTES as usize])
                .expect("poison");
        }
    }

    fn page_regions(&self, page: u32) -> Vec<u64> {
        let mut v = Vec::new();
        for l in 0..TEST_LAYERS {
            for p in 0..2 {
                v.push(self.layout.plane_offset[p][l] + page as u64 * TEST_PAGE_BYTES);
            }
        }
        v
    }
}

/// A chain of blocks as (hash, parent, page) with consecutive pages from `first_page`:
/// each block's parent is the one before it (0 for the first).
pub fn chain_ops(hashes: &[u64], first_page: u32) -> Vec<(u64, u64, u32)> {
    hashes
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            let parent = if i == 0 { 0 } else { hashes[i - 1] };
            (h, parent, first_page + i as u32)
        })
        .collect()
}

/// The arena argument of a block op batch over (hash, parent, page).
pub fn block_op_arg(blocks: &[(u64, u64, u32)]) -> Vec<u8> {
    let ops: Vec<kvplane_ffi::kvp_block_op> = blocks
        .iter()
        .map(|&(hash, parent, page)| kvplane_ffi::kvp_block_op::new(hash, parent, page))
        .collect();
    kvplane_ffi::slice_as_bytes(&ops).to_vec()
}

impl TestEngine {
    /// Like [`TestEngine::block_op`], but a dead daemon (or any ring error) is returned
    /// instead of panicking: fault tests kill the daemon under a running engine.
    pub fn try_block_op(
        &mut self,
        opcode: kvplane_ffi::Opcode,
        flags: u16,
        blocks: &[(u64, u64, u32)],
        timeout: Duration,
    ) -> Result<(kvplane_ffi::kvp_cqe, Vec<kvplane_ffi::kvp_block_op>), kvplane_shm::ShmError> {
        let arg = block_op_arg(blocks);
        self.qp.write_arena(0, &arg)?;
        let mut s = kvplane_shm::client::sqe(opcode, self.next_user_data);
        self.next_user_data += 1;
        s.flags = flags;
        s.arg_len = arg.len() as u32;
        s.count = blocks.len() as u32;
        let c = self.qp.call(s, timeout)?;
        let mut out = vec![<kvplane_ffi::kvp_block_op as kvplane_ffi::Pod>::zeroed(); blocks.len()];
        self.qp.read_block_ops(0, &mut out)?;
        Ok((c, out))
    }

    /// The bytes [`TestEngine::fill_page`] writes for `seed`, without touching the pool
    /// (to check a loaded page against what was saved).
    pub fn expected_page(seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(TEST_LAYERS * 2 * TEST_PAGE_BYTES as usize);
        for i in 0..TEST_LAYERS * 2 {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1);
            out.extend((0..TEST_PAGE_BYTES).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }));
        }
        out
    }
}

/// The value of `key=` on the first log line containing `message`, waiting for it.
fn logged_value(daemon: &DaemonProc, message: &str, key: &str) -> String {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let log = daemon.log_text();
        if let Some(line) = log.lines().find(|l| l.contains(message))
            && let Some(v) = line.split(key).nth(1)
        {
            return v.split_whitespace().next().expect("value").to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no `{message}` {key} in the log:\n{}", daemon.log_text());
}

/// The daemon's control socket (it logs "control socket listening ... path=PATH"), where
/// the test process, the daemon's own uid, sees everything. The helpers below take it
/// (a path) or a TCP address alike.
pub fn control_addr(daemon: &DaemonProc) -> String {
    logged_value(daemon, "control socket listening", "path=")
}

/// The loopback TCP address of the control server ("control server listening ...
/// addr=IP:PORT"); use with `[control] metrics_addr = "127.0.0.1:0"` so parallel tests
/// never share a port. It serves `/healthz` and aggregate `/metrics` only by default.
pub fn control_tcp_addr(daemon: &DaemonProc) -> String {
    logged_value(daemon, "control server listening", "addr=")
}

/// Connects to a control endpoint: a Unix socket path (starting with `/`) or `IP:port`.
pub fn control_connect(endpoint: &str) -> Box<dyn ReadWrite> {
    if endpoint.starts_with('/') {
        let s = std::os::unix::net::UnixStream::connect(endpoint)
            .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Box::new(s)
    } else {
        let s = std::net::TcpStream::connect(endpoint)
            .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Box::new(s)
    }
}

/// A byte stream (TCP or Unix).
pub trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// A raw HTTP exchange with a control server (socket path or `IP:port`); returns
/// (status code, body).
pub fn http(endpoint: &str, request: &[u8]) -> (u16, String) {
    let mut s = control_connect(endpoint);
    s.write_all(request).expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A server that answers an oversized request and closes without reading the
            // rest of it resets the connection; what it answered is already here.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => panic!("read the response ({} bytes so far): {e}", raw.len()),
        }
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

/// `GET path` from a control server (socket path or `IP:port`), as a local client does
/// (`Host: localhost`); returns (status code, body).
pub fn http_get(endpoint: &str, path: &str) -> (u16, String) {
    http(
        endpoint,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
}

/// `GET /status` from a daemon's control server, parsed.
pub fn status_json(endpoint: &str) -> serde_json::Value {
    let (code, body) = http_get(endpoint, "/status");
    assert_eq!(code, 200, "/status: {body}");
    serde_json::from_str(&body).expect("/status is JSON")
}

/// Runs `f` in a forked child that has become `uid`/`gid` (no supplementary groups), and
/// returns the string it produced: a client that really is another user. Needs root; the
/// child's failure (or panic) fails the caller.
pub fn as_user(uid: u32, gid: u32, f: impl FnOnce() -> String) -> String {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the child only switches ids, runs `f` and leaves with _exit (no return into
    // the test harness, no destructors of the parent's state).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: plain syscalls on integers; a null list of zero groups is valid.
        let switched = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(gid, gid, gid) == 0
                && libc::setresuid(uid, uid, uid) == 0
        };
        let (out, code) = if !switched {
            (
                format!(
                    "switching to uid {uid}: {}",
                    std::io::Error::last_os_error()
                ),
                2,
            )
        } else {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                Ok(out) => (out, 0),
                Err(p) => (
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into()),
                    3,
                ),
            }
        };
        let mut rest = out.as_bytes();
        while !rest.is_empty() {
            // SAFETY: writing from a live buffer of `rest.len()` bytes to our pipe end.
            let n = unsafe { libc::write(fds[1], rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                break;
            }
            rest = &rest[n as usize..];
        }
        // SAFETY: ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: closing our copy of the write end, which we own.
    unsafe { libc::close(fds[1]) };
    // SAFETY: the read end is ours alone from here.
    let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let mut out = String::new();
    r.read_to_string(&mut out).expect("read the child's output");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child as uid {uid} failed (status {status:#x}): {out}"
    );
    out
}

/// `used_blocks` of one tier ("hbm", "host", "nvme") in a `/status` report.
pub fn tier_used(status: &serde_json::Value, tier: &str) -> u64 {
    status["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["tier"] == tier)
        .unwrap_or_else(|| panic!("no tier {tier} in {status}"))["used_blocks"]
        .as_u64()
        .expect("used_blocks")
}

/// Threads of a process now (`Threads:` in /proc/PID/status).
pub fn thread_count(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/pid/status");
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads")
}

/// The uid and gid tests use as "another user" (nobody/nogroup on Debian).
pub const OTHER_UID: u32 = 65534;

/// Fails (never skips) a test that needs root to act as another uid.
pub fn require_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{test} runs processes as another uid (setuid/setgid) and needs root; CI runs tests as root"
    );
}

/// A `kvplane` command that runs as `uid`/`gid` (no supplementary groups): a real other
/// user for tenant tests.
pub fn kvplane_as(uid: u32, gid: u32) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(kvplane_bin());
    c.uid(uid).gid(gid);
    c
}

/// Resident set size of a process, in KiB (VmRSS from /proc/PID/status).
pub fn rss_kib(pid: i32) -> u64 {
    proc_status_kib(pid, "VmRSS")
}

/// A KiB figure of /proc/PID/status (`VmRSS`, `VmSize`, ...).
pub fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/pid/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// A small seeded generator (SplitMix64) for fault tests: the same seed gives the same
/// kill points, delays and fault choices, so a failure replays.
#[derive(Clone, Debug)]
pub struct FaultRng(u64);

impl FaultRng {
    pub fn new(seed: u64) -> Self {
        FaultRng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// The seeds a fault test runs: `KVPLANE_FAULT_SEED` (decimal or 0x-hex) alone when set,
/// to replay one failure, else `defaults`.
pub fn fault_seeds(defaults: &[u64]) -> Vec<u64> {
    match std::env::var("KVPLANE_FAULT_SEED") {
        Ok(s) => {
            let s = s.trim();
            let seed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            vec![seed.unwrap_or_else(|e| panic!("KVPLANE_FAULT_SEED={s}: {e}"))]
        }
        Err(_) => defaults.to_vec(),
    }
}

/// Runs `run(seed)` for each of [`fault_seeds`]; if it panics, the seed and the command
/// that replays it are printed first.
pub fn for_each_seed(test: &str, defaults: &[u64], mut run: impl FnMut(u64)) {
    struct Replay<'a>(&'a str, u64);
    impl Drop for Replay<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!(
                    "\n*** {} failed with seed {:#x}; replay with:\n    KVPLANE_FAULT_SEED={:#x} cargo test -p kvplane-tests -- --exact {}\n",
                    self.0, self.1, self.1, self.0
                );
            }
        }
    }
    for seed in fault_seeds(defaults) {
        let _replay = Replay(test, seed);
        eprintln!("{test}: seed {seed:#x}");
        run(seed);
    }
}

/// The STATS op on `qp` (its reply lands at arena offset 0), asserted to succeed.
pub fn stats(qp: &mut kvplane_shm::QueuePair) -> kvplane_ffi::kvp_stats {
    use kvplane_ffi::kvp_stats;
    let mut s = kvplane_shm::client::sqe(kvplane_ffi::Opcode::Stats, 77);
    s.arg_len = std::mem::size_of::<kvp_stats>() as u32;
    let c = qp.call(s, Duration::from_secs(10)).expect("stats");
    assert_eq!(c.status, kvplane_ffi::Status::Ok.raw(), "stats: {c:?}");
    let mut raw = [0u8; std::mem::size_of::<kvp_stats>()];
    qp.read_arena(0, &mut raw).expect("read the stats reply");
    kvplane_ffi::read_pod::<kvp_stats>(&raw).expect("a kvp_stats")
}

/// Runs `kvplane serve --config CONFIG --socket SOCKET` (stderr to `log`) and waits up to
/// `timeout` for it to exit, for tests of start-up refusals. `None`: it was still up (and
/// is then killed), i.e. it accepted what it should have refused.
pub fn serve_until_exit(
    config: &Path,
    socket: &Path,
    log: &Path,
    timeout: Duration,
) -> Option<ExitStatus> {
    let mut child = Command::new(kvplane_bin())
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--socket")
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn kvplane serve");
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for kvplane serve") {
            return Some(status);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
