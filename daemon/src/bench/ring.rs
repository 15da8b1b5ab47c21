//! The ring benchmark: NOP round trip between two processes (engine and daemon) and
//! batched NOP throughput, with two baselines measured in the same run: a bare
//! shared-memory ping-pong of one atomic word (the floor) and a Unix-socket
//! request/response. Each measurement that needs a second process re-executes the
//! `kvplane` binary in a hidden child role.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvplane_ffi::{Opcode, Pod, Status, kvp_cqe, kvp_sqe};
use kvplane_shm::{AttachOptions, Segment, Session, client, sys};

use super::percentiles;
use crate::config::Config;
use crate::dataplane::DataPlane;
use crate::session::Daemon;

#[derive(Debug, thiserror::Error)]
pub enum RingBenchError {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("child role {role}: {reason}")]
    Child { role: &'static str, reason: String },
    #[error(transparent)]
    Shm(#[from] kvplane_shm::ShmError),
    #[error(transparent)]
    Daemon(#[from] crate::session::DaemonError),
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> RingBenchError {
    move |source| RingBenchError::Io { op, source }
}

#[derive(Clone, Debug)]
pub struct RingBenchOptions {
    /// Round trips measured for the NOP and the floor.
    pub round_trips: u64,
    /// Round trips for the (slower) socket baseline.
    pub socket_round_trips: u64,
    /// NOPs kept in flight for the throughput run.
    pub batch: u32,
    /// Duration of the throughput run.
    pub batched_ms: u64,
    /// Pin daemon and engine to different CPUs (when there are two).
    pub pin: bool,
}

impl Default for RingBenchOptions {
    fn default() -> Self {
        RingBenchOptions {
            round_trips: 200_000,
            socket_round_trips: 20_000,
            batch: 256,
            batched_ms: 2000,
            pin: true,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RingBenchReport {
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub floor_p50_ns: u64,
    pub floor_p99_ns: u64,
    pub floor_p999_ns: u64,
    pub socket_p50_ns: u64,
    pub socket_p99_ns: u64,
    pub socket_p999_ns: u64,
    pub batched_ops_per_s: f64,
    /// p50 NOP round trip / p50 floor (goal <= 1.5).
    pub p50_over_floor: f64,
    /// p50 socket / p50 NOP round trip (goal >= 10).
    pub socket_over_p50: f64,
    pub round_trips: u64,
    pub socket_round_trips: u64,
    pub batch: u32,
    pub pinned: bool,
    pub backend: &'static str,
}

/// Hidden child roles (`kvplane bench ring --child ROLE --target PATH`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChildRole {
    Floor,
    Socket,
    Engine,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct EngineChildReport {
    p50_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
    batched_ops_per_s: f64,
}

struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How to start a child: the executable and the arguments before `--child` (for
/// `kvplane` that is `bench ring`; the bench crate's ping-pong binary needs none).
#[derive(Clone, Debug)]
pub struct ChildCommand {
    pub exe: PathBuf,
    pub prefix: Vec<String>,
}

fn spawn_child(
    cmd: &ChildCommand,
    role: &str,
    target: &Path,
    opts: &RingBenchOptions,
) -> Result<ChildGuard, RingBenchError> {
    let child = Command::new(&cmd.exe)
        .args(&cmd.prefix)
        .args(["--child", role, "--target"])
        .arg(target)
        .args(["--round-trips", &opts.round_trips.to_string()])
        .args(["--socket-round-trips", &opts.socket_round_trips.to_string()])
        .args(["--batch", &opts.batch.to_string()])
        .args(["--batched-ms", &opts.batched_ms.to_string()])
        .arg(if opts.pin {
            "--pin=true"
        } else {
            "--pin=false"
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(io("spawn bench child"))?;
    Ok(ChildGuard(child))
}

fn pin_for_role(pin: bool, cpu: usize) -> bool {
    pin && sys::pin_to_cpu(cpu).is_ok()
}

/// Run every measurement; `exe` is the `kvplane` binary for the child processes.
pub fn run(exe: &ChildCommand, opts: &RingBenchOptions) -> Result<RingBenchReport, RingBenchError> {
    let dir = tempfile_dir()?;
    let pinned = pin_for_role(opts.pin && sys::cpus_allowed() >= 2, 0);
    // The child inherits our one-CPU mask, so it cannot judge for itself: tell it.
    let opts = &RingBenchOptions {
        pin: pinned,
        ..opts.clone()
    };
    let floor = floor_parent(exe, dir.path(), opts)?;
    let socket = socket_parent(exe, dir.path(), opts)?;
    let engine = engine_parent(exe, dir.path(), opts)?;
    let (p50, p99, p999) = (engine.p50_ns, engine.p99_ns, engine.p999_ns);
    Ok(RingBenchReport {
        p50_ns: p50,
        p99_ns: p99,
        p999_ns: p999,
        floor_p50_ns: floor.0,
        floor_p99_ns: floor.1,
        floor_p999_ns: floor.2,
        socket_p50_ns: socket.0,
        socket_p99_ns: socket.1,
        socket_p999_ns: socket.2,
        batched_ops_per_s: engine.batched_ops_per_s,
        p50_over_floor: p50 as f64 / floor.0.max(1) as f64,
        socket_over_p50: socket.0 as f64 / p50.max(1) as f64,
        round_trips: opts.round_trips,
        socket_round_trips: opts.socket_round_trips,
        batch: opts.batch,
        pinned,
        backend: "host",
    })
}

/// A private temporary directory (removed on drop), on tmpfs when there is one.
fn tempfile_dir() -> Result<tempfile::TempDir, RingBenchError> {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("kvplane-bench-")
        .tempdir_in(base)
        .map_err(io("create bench dir"))
}

/// Map a small shared file (the floor's one word) through the same segment code.
fn map_word_file(path: &Path, create: bool) -> Result<Segment, RingBenchError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(io("open floor file"))?;
    if create {
        file.set_len(4096).map_err(io("size floor file"))?;
    }
    Ok(Segment::map_fd(file.into(), 4096)?)
}

fn check_child(child: &mut ChildGuard, role: &'static str) -> Result<(), RingBenchError> {
    if let Ok(Some(status)) = child.0.try_wait() {
        return Err(RingBenchError::Child {
            role,
            reason: format!("exited early: {status}"),
        });
    }
    Ok(())
}

fn floor_parent(
    exe: &ChildCommand,
    dir: &Path,
    opts: &RingBenchOptions,
) -> Result<(u64, u64, u64), RingBenchError> {
    let path = dir.join("floor");
    let seg = map_word_file(&path, true)?;
    let word = seg.atomic_u32(0)?;
    let ready = seg.atomic_u32(64)?;
    let mut child = spawn_child(exe, "floor", &path, opts)?;
    while ready.load(Ordering::Acquire) == 0 {
        check_child(&mut child, "floor")?;
        std::thread::yield_now();
    }
    let warmup = opts.round_trips / 10;
    let total = opts.round_trips + warmup;
    let mut samples = Vec::with_capacity(opts.round_trips as usize);
    for i in 0..total as u32 {
        let t0 = Instant::now();
        word.store(2 * i + 1, Ordering::Release);
        let mut spins = 0u64;
        while word.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
            spins += 1;
            if spins % (1 << 24) == 0 {
                check_child(&mut child, "floor")?;
            }
        }
        if i as u64 >= warmup {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
    }
    Ok(percentiles(&mut samples))
}

fn socket_parent(
    exe: &ChildCommand,
    dir: &Path,
    opts: &RingBenchOptions,
) -> Result<(u64, u64, u64), RingBenchError> {
    let path = dir.join("sock");
    let listener = UnixListener::bind(&path).map_err(io("bind bench socket"))?;
    let _child = spawn_child(exe, "socket", &path, opts)?;
    let (mut stream, _) = listener.accept().map_err(io("accept bench socket"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io("socket timeout"))?;
    let warmup = opts.socket_round_trips / 10;
    let mut samples = Vec::with_capacity(opts.socket_round_trips as usize);
    let mut buf = [0u8; 8];
    for i in 0..opts.socket_round_trips + warmup {
        let t0 = Instant::now();
        stream
            .write_all(&i.to_le_bytes())
            .map_err(io("socket write"))?;
        stream.read_exact(&mut buf).map_err(io("socket read"))?;
        if i >= warmup {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
        if u64::from_le_bytes(buf) != i {
            return Err(RingBenchError::Child {
                role: "socket",
                reason: "echo mismatch".into(),
            });
        }
    }
    Ok(percentiles(&mut samples))
}

fn engine_parent(
    exe: &ChildCommand,
    dir: &Path,
    opts: &RingBenchOptions,
) -> Result<EngineChildReport, RingBenchError> {
    let mut config = Config::default();
    config.serve.socket_path = dir.join("kvplane.sock");
    let daemon = Daemon::start(config, Arc::new(DataPlane::new()))?;
    let mut child = spawn_child(exe, "engine", daemon.socket_path(), opts)?;
    let stdout = child.0.stdout.take().ok_or(RingBenchError::Child {
        role: "engine",
        reason: "no stdout".into(),
    })?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(io("read engine child report"))?;
    let status = child.0.wait().map_err(io("wait engine child"))?;
    daemon.shutdown();
    if !status.success() {
        return Err(RingBenchError::Child {
            role: "engine",
            reason: format!("exited with {status}"),
        });
    }
    serde_json::from_str(&line).map_err(|e| RingBenchError::Child {
        role: "engine",
        reason: format!("bad report {line:?}: {e}"),
    })
}

/// Entry point of a child process.
pub fn run_child(
    role: ChildRole,
    target: &Path,
    opts: &RingBenchOptions,
) -> Result<(), RingBenchError> {
    pin_for_role(opts.pin, 1);
    match role {
        ChildRole::Floor => {
            let seg = map_word_file(target, false)?;
            let word = seg.atomic_u32(0)?;
            seg.atomic_u32(64)?.store(1, Ordering::Release);
            let total = opts.round_trips + opts.round_trips / 10;
            let parent = std::os::unix::process::parent_id() as i32;
            for i in 0..total as u32 {
                let mut spins = 0u64;
                while word.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                    spins += 1;
                    if spins % (1 << 24) == 0 && !sys::process_alive(parent) {
                        return Err(RingBenchError::Child {
                            role: "floor",
                            reason: "parent died".into(),
                        });
                    }
                }
                word.store(2 * i + 2, Ordering::Release);
            }
            Ok(())
        }
        ChildRole::Socket => {
            let mut stream = UnixStream::connect(target).map_err(io("connect bench socket"))?;
            let mut buf = [0u8; 8];
            loop {
                match stream.read_exact(&mut buf) {
                    Ok(()) => stream.write_all(&buf).map_err(io("socket echo"))?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => {
                        return Err(RingBenchError::Io {
                            op: "socket echo read",
                            source: e,
                        });
                    }
                }
            }
        }
        ChildRole::Engine => {
            let report = engine_child(target, opts)?;
            println!("{}", serde_json::to_string(&report).expect("serialisable"));
            Ok(())
        }
    }
}

fn engine_child(
    socket: &Path,
    opts: &RingBenchOptions,
) -> Result<EngineChildReport, RingBenchError> {
    let mut ao = AttachOptions::new(socket);
    ao.sq_entries = opts.batch.next_power_of_two().max(256);
    ao.cq_entries = ao.sq_entries;
    let mut session = Session::attach(ao)?;
    let mut qp = session.take_queue_pairs()?.remove(0);
    let timeout = Duration::from_secs(10);
    let warmup = opts.round_trips / 10;
    let mut samples = Vec::with_capacity(opts.round_trips as usize);
    for i in 0..opts.round_trips + warmup {
        let t0 = Instant::now();
        let c = qp.call(client::sqe(Opcode::Nop, i), timeout)?;
        if i >= warmup {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
        if c.status != Status::Ok.raw() || c.user_data != i {
            return Err(RingBenchError::Child {
                role: "engine",
                reason: format!("bad completion {c:?}"),
            });
        }
    }
    let (p50, p99, p999) = percentiles(&mut samples);

    // Throughput: keep up to `batch` NOPs in flight, submitting and reaping in bulk.
    let batch = opts.batch.min(qp.sq_entries()) as usize;
    let sqes: Vec<kvp_sqe> = (0..batch as u64)
        .map(|i| client::sqe(Opcode::Nop, i))
        .collect();
    let mut cqes: Vec<kvp_cqe> = vec![Pod::zeroed(); batch];
    let mut in_flight = 0usize;
    let mut done = 0u64;
    let t0 = Instant::now();
    let run_for = Duration::from_millis(opts.batched_ms);
    while t0.elapsed() < run_for || in_flight > 0 {
        if t0.elapsed() < run_for && in_flight < batch {
            in_flight += qp.submit(&sqes[..batch - in_flight])?;
        }
        let n = if in_flight > 0 {
            qp.wait(&mut cqes, timeout)?
        } else {
            0
        };
        for c in &cqes[..n] {
            if c.status != Status::Ok.raw() {
                return Err(RingBenchError::Child {
                    role: "engine",
                    reason: format!("bad completion {c:?}"),
                });
            }
        }
        in_flight -= n;
        done += n as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(EngineChildReport {
        p50_ns: p50,
        p99_ns: p99,
        p999_ns: p999,
        batched_ops_per_s: done as f64 / secs,
    })
}
