//! The ring benchmark: NOP round trip between two processes (engine and daemon) and
//! batched NOP throughput, with two baselines measured in the same run: a bare
//! shared-memory ping-pong of one atomic word (the floor) and a Unix-socket
//! request/response. Each measurement that needs a second process re-executes the
//! `kvplane` binary in a hidden child role.
//!
//! The floor and the ring are interleaved: one child process (the engine, pinned to the
//! second CPU) runs `rounds` pairs of batches, a floor batch (ping-pong with this
//! process's main thread) and a ring batch (NOP calls to the daemon's data-plane thread
//! in this process), alternating which goes first. Both peers run on the first CPU, and
//! the idle one sleeps (the main thread on a futex, the data-plane thread after its spin),
//! so the VM's drift between runs (the floor alone moves ~3x from run to run here) falls
//! on both within each pair. Each pair's ring p50 over its floor p50 is reported, and the
//! aggregate over all pairs.
//!
//! A second, like-for-like ceiling runs between the two in every pair: the same two
//! threads move a ring entry's bytes (64 bytes engine -> daemon on one cache line, 32 back
//! on another), each line written by one side only and the receiver polling the entry
//! itself. The one-word floor bounces a single line whose ownership migrates with the
//! word; any queue pair with a line per direction pays an invalidation per write on top,
//! so this one is the floor of the ring's design, the one-word floor that of the machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvplane_ffi::{Opcode, Pod, Status, kvp_cqe, kvp_sqe};
use kvplane_shm::{AttachOptions, Segment, Session, client, sys};

use super::percentiles;
use kvplane_daemon::config::Config;
use kvplane_daemon::dataplane::DataPlane;
use kvplane_daemon::session::Daemon;

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
    Daemon(#[from] kvplane_daemon::session::DaemonError),
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
    /// Floor/ring batch pairs the round trips are split into.
    pub rounds: u32,
}

impl Default for RingBenchOptions {
    fn default() -> Self {
        RingBenchOptions {
            round_trips: 200_000,
            socket_round_trips: 20_000,
            batch: 256,
            batched_ms: 2000,
            pin: true,
            rounds: 20,
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
    /// The like-for-like floor: a 64-byte request line and a 32-byte response line.
    pub entry_floor_p50_ns: u64,
    pub entry_floor_p99_ns: u64,
    pub entry_floor_p999_ns: u64,
    pub socket_p50_ns: u64,
    pub socket_p99_ns: u64,
    pub socket_p999_ns: u64,
    pub batched_ops_per_s: f64,
    /// p50 NOP round trip / p50 floor over all pairs' samples (goal <= 1.5).
    pub p50_over_floor: f64,
    /// p50 NOP round trip / p50 entry-sized floor over all pairs' samples.
    pub p50_over_entry_floor: f64,
    /// p50 entry-sized floor / p50 one-word floor: what separate lines per direction cost.
    pub entry_floor_over_floor: f64,
    /// Each pair's ring p50 / floor p50, in run order.
    pub pairs: Vec<PairReport>,
    /// Median, min and max of the pairs' ratios.
    pub pair_ratio_median: f64,
    pub pair_ratio_min: f64,
    pub pair_ratio_max: f64,
    /// Median, min and max of the pairs' ring p50 / entry-sized floor p50.
    pub pair_entry_ratio_median: f64,
    pub pair_entry_ratio_min: f64,
    pub pair_entry_ratio_max: f64,
    pub rounds: u32,
    /// p50 socket / p50 NOP round trip (goal >= 10).
    pub socket_over_p50: f64,
    pub round_trips: u64,
    pub socket_round_trips: u64,
    pub batch: u32,
    pub pinned: bool,
    pub backend: &'static str,
}

/// One floor batch, one entry-sized floor batch and one ring batch, run back to back
/// (the entry-sized floor always in the middle).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PairReport {
    /// Which batch of the pair ran first: the one-word floor or the ring.
    pub floor_first: bool,
    pub floor_p50_ns: u64,
    pub entry_floor_p50_ns: u64,
    pub p50_ns: u64,
    /// p50_ns / floor_p50_ns.
    pub ratio: f64,
    /// p50_ns / entry_floor_p50_ns.
    pub entry_ratio: f64,
}

/// Hidden child roles (`kvplane bench ring --child ROLE --target PATH`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChildRole {
    /// The engine: floor and ring batches interleaved (target: the bench directory).
    Interleaved,
    Socket,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct EngineChildReport {
    p50_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
    floor_p50_ns: u64,
    floor_p99_ns: u64,
    floor_p999_ns: u64,
    entry_floor_p50_ns: u64,
    entry_floor_p99_ns: u64,
    entry_floor_p999_ns: u64,
    pairs: Vec<PairReport>,
    batched_ops_per_s: f64,
}

/// The control word of the floor file (its own cache line, away from the ping-pong word).
const CTL_OFFSET: u64 = 64;
/// Nothing to answer: the main thread sleeps on the control word.
const CTL_IDLE: u32 = 0;
/// The engine asks for a floor batch.
const CTL_FLOOR: u32 = 1;
/// The main thread spins on the ping-pong word.
const CTL_FLOOR_READY: u32 = 2;
/// The engine is finished.
const CTL_DONE: u32 = 3;
/// The engine asks for an entry-sized floor batch.
const CTL_ENTRY: u32 = 4;
/// The main thread polls the request line.
const CTL_ENTRY_READY: u32 = 5;
/// The entry-sized floor's request line (a submission's 64 bytes; word 0 is the sequence
/// number, written last) and response line (a completion's 32 bytes, likewise), each on
/// its own cache line, away from the one-word floor's and the control word's.
const REQ_OFFSET: u64 = 1024;
const REQ_WORDS: u64 = 8;
const RESP_OFFSET: u64 = 2048;
const RESP_WORDS: u64 = 4;

/// The words of an entry-sized line at `offset` (word 0 the sequence number).
fn entry_line(seg: &Segment, offset: u64, words: u64) -> Result<Vec<&AtomicU64>, RingBenchError> {
    (0..words)
        .map(|k| seg.atomic_u64(offset + 8 * k).map_err(RingBenchError::from))
        .collect()
}

/// Write an entry's payload words, then publish it by its sequence number (release).
#[inline]
fn publish_entry(line: &[&AtomicU64], seq: u64, payload: u64) {
    for (k, w) in line.iter().enumerate().skip(1) {
        w.store(payload ^ k as u64, Ordering::Relaxed);
    }
    line[0].store(seq, Ordering::Release);
}

/// Read an entry's payload (after its sequence number was seen with acquire); returns
/// the payload word 1 was built from.
#[inline]
fn read_entry(line: &[&AtomicU64]) -> u64 {
    let mut x = 0;
    for (k, w) in line.iter().enumerate().skip(1) {
        x ^= w.load(Ordering::Relaxed) ^ k as u64;
    }
    x
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
        .args(["--rounds", &opts.rounds.to_string()])
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
    let socket = socket_parent(exe, dir.path(), opts)?;
    let engine = interleaved_parent(exe, dir.path(), opts)?;
    let (p50, p99, p999) = (engine.p50_ns, engine.p99_ns, engine.p999_ns);
    let sorted = |f: fn(&PairReport) -> f64| {
        let mut v: Vec<f64> = engine.pairs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let ratios = sorted(|p| p.ratio);
    let entry_ratios = sorted(|p| p.entry_ratio);
    Ok(RingBenchReport {
        p50_ns: p50,
        p99_ns: p99,
        p999_ns: p999,
        floor_p50_ns: engine.floor_p50_ns,
        floor_p99_ns: engine.floor_p99_ns,
        floor_p999_ns: engine.floor_p999_ns,
        entry_floor_p50_ns: engine.entry_floor_p50_ns,
        entry_floor_p99_ns: engine.entry_floor_p99_ns,
        entry_floor_p999_ns: engine.entry_floor_p999_ns,
        socket_p50_ns: socket.0,
        socket_p99_ns: socket.1,
        socket_p999_ns: socket.2,
        batched_ops_per_s: engine.batched_ops_per_s,
        p50_over_floor: p50 as f64 / engine.floor_p50_ns.max(1) as f64,
        p50_over_entry_floor: p50 as f64 / engine.entry_floor_p50_ns.max(1) as f64,
        entry_floor_over_floor: engine.entry_floor_p50_ns as f64
            / engine.floor_p50_ns.max(1) as f64,
        pair_ratio_median: ratios.get(ratios.len() / 2).copied().unwrap_or(0.0),
        pair_ratio_min: ratios.first().copied().unwrap_or(0.0),
        pair_ratio_max: ratios.last().copied().unwrap_or(0.0),
        pair_entry_ratio_median: entry_ratios
            .get(entry_ratios.len() / 2)
            .copied()
            .unwrap_or(0.0),
        pair_entry_ratio_min: entry_ratios.first().copied().unwrap_or(0.0),
        pair_entry_ratio_max: entry_ratios.last().copied().unwrap_or(0.0),
        pairs: engine.pairs,
        rounds: opts.rounds,
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

/// Starts a daemon in this process and the engine child, then answers the child's floor
/// batches on this thread until it is done; returns the child's report.
fn interleaved_parent(
    exe: &ChildCommand,
    dir: &Path,
    opts: &RingBenchOptions,
) -> Result<EngineChildReport, RingBenchError> {
    let seg = map_word_file(&dir.join("floor"), true)?;
    let word = seg.atomic_u32(0)?;
    let ctl = seg.atomic_u32(CTL_OFFSET)?;
    let req = entry_line(&seg, REQ_OFFSET, REQ_WORDS)?;
    let resp = entry_line(&seg, RESP_OFFSET, RESP_WORDS)?;
    let mut config = Config::default();
    config.serve.socket_path = dir.join("kvplane.sock");
    // Started after this process pinned itself: the data-plane thread shares the first
    // CPU with the floor's answering thread, and the engine has the second.
    let daemon = Daemon::start(config, Arc::new(DataPlane::new()))?;
    let mut child = spawn_child(exe, "interleaved", dir, opts)?;
    let stdout = child.0.stdout.take().ok_or(RingBenchError::Child {
        role: "interleaved",
        reason: "no stdout".into(),
    })?;
    // The report arrives at the end; read it on a thread so this one can answer.
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    loop {
        match ctl.load(Ordering::Acquire) {
            CTL_FLOOR => {
                ctl.store(CTL_FLOOR_READY, Ordering::Release);
                let mut spins = 0u64;
                loop {
                    let w = word.load(Ordering::Acquire);
                    if w & 1 == 1 {
                        word.store(w.wrapping_add(1), Ordering::Release);
                        continue;
                    }
                    std::hint::spin_loop();
                    spins += 1;
                    // The engine ends the batch only while nothing is in flight, so
                    // looking at the control word now and then delays no round trip.
                    if spins % 256 == 0 && ctl.load(Ordering::Acquire) != CTL_FLOOR_READY {
                        break;
                    }
                    if spins % (1 << 24) == 0 {
                        check_child(&mut child, "interleaved")?;
                    }
                }
            }
            CTL_ENTRY => {
                // The engine writes nothing before it sees READY: what is there now was
                // answered in an earlier batch.
                let mut served = req[0].load(Ordering::Acquire);
                ctl.store(CTL_ENTRY_READY, Ordering::Release);
                let mut spins = 0u64;
                loop {
                    let seq = req[0].load(Ordering::Acquire);
                    if seq != served {
                        let payload = read_entry(&req);
                        publish_entry(&resp, seq, payload);
                        served = seq;
                        continue;
                    }
                    std::hint::spin_loop();
                    spins += 1;
                    if spins % 256 == 0 && ctl.load(Ordering::Acquire) != CTL_ENTRY_READY {
                        break;
                    }
                    if spins % (1 << 24) == 0 {
                        check_child(&mut child, "interleaved")?;
                    }
                }
            }
            CTL_DONE => break,
            _ => {
                if child.0.try_wait().ok().flatten().is_some() {
                    break;
                }
                sys::futex_wait(ctl, CTL_IDLE, Some(Duration::from_millis(50)));
            }
        }
    }
    let line = reader
        .join()
        .map_err(|_| RingBenchError::Child {
            role: "interleaved",
            reason: "report reader panicked".into(),
        })?
        .map_err(io("read engine child report"))?;
    let status = child.0.wait().map_err(io("wait engine child"))?;
    daemon.shutdown();
    if !status.success() {
        return Err(RingBenchError::Child {
            role: "interleaved",
            reason: format!("exited with {status}"),
        });
    }
    serde_json::from_str(&line).map_err(|e| RingBenchError::Child {
        role: "interleaved",
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
        ChildRole::Interleaved => {
            let report = engine_child(target, opts)?;
            println!("{}", serde_json::to_string(&report).expect("serialisable"));
            Ok(())
        }
    }
}

fn engine_child(dir: &Path, opts: &RingBenchOptions) -> Result<EngineChildReport, RingBenchError> {
    let seg = map_word_file(&dir.join("floor"), false)?;
    let word = seg.atomic_u32(0)?;
    let ctl = seg.atomic_u32(CTL_OFFSET)?;
    let req = entry_line(&seg, REQ_OFFSET, REQ_WORDS)?;
    let resp = entry_line(&seg, RESP_OFFSET, RESP_WORDS)?;
    let mut ao = AttachOptions::new(dir.join("kvplane.sock"));
    ao.sq_entries = opts.batch.next_power_of_two().max(256);
    ao.cq_entries = ao.sq_entries;
    let mut session = Session::attach(ao)?;
    let mut qp = session.take_queue_pairs()?.remove(0);
    let timeout = Duration::from_secs(10);
    let parent = std::os::unix::process::parent_id() as i32;
    let rounds = opts.rounds.max(1) as u64;
    let per_batch = (opts.round_trips / rounds).max(10);
    // The first tenth of each batch warms it up: the peer was asleep until it began.
    let warmup = per_batch / 10;
    let mut ring_all = Vec::with_capacity((per_batch * rounds) as usize);
    let mut floor_all = Vec::with_capacity((per_batch * rounds) as usize);
    let mut entry_all = Vec::with_capacity((per_batch * rounds) as usize);
    let mut seq = req[0].load(Ordering::Relaxed);
    let mut pairs = Vec::with_capacity(rounds as usize);
    let mut counter = 0u32;
    let mut ud = 0u64;
    for round in 0..rounds {
        let floor_first = round % 2 == 0;
        let mut floor = Vec::with_capacity(per_batch as usize);
        let mut entry = Vec::with_capacity(per_batch as usize);
        let mut ring = Vec::with_capacity(per_batch as usize);
        // Wake the main thread for a floor batch of either kind and wait until it polls.
        let ask = |request: u32, ready: u32| -> Result<(), RingBenchError> {
            ctl.store(request, Ordering::Release);
            sys::futex_wake_all(ctl);
            let mut spins = 0u64;
            while ctl.load(Ordering::Acquire) != ready {
                std::hint::spin_loop();
                spins += 1;
                if spins % (1 << 24) == 0 && !sys::process_alive(parent) {
                    return Err(RingBenchError::Child {
                        role: "interleaved",
                        reason: "parent died".into(),
                    });
                }
            }
            Ok(())
        };
        for step in 0..3 {
            if step == 1 {
                // Entry-sized floor: a submission's bytes out, a completion's back.
                ask(CTL_ENTRY, CTL_ENTRY_READY)?;
                for i in 0..per_batch + warmup {
                    seq = seq.wrapping_add(1);
                    let payload = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let t0 = Instant::now();
                    publish_entry(&req, seq, payload);
                    while resp[0].load(Ordering::Acquire) != seq {
                        std::hint::spin_loop();
                    }
                    let echoed = read_entry(&resp);
                    let ns = t0.elapsed().as_nanos() as u64;
                    if echoed != payload {
                        return Err(RingBenchError::Child {
                            role: "interleaved",
                            reason: format!("entry floor echoed {echoed:#x}, sent {payload:#x}"),
                        });
                    }
                    if i >= warmup {
                        entry.push(ns);
                    }
                }
                ctl.store(CTL_IDLE, Ordering::Release);
            } else if (step == 0) == floor_first {
                // Floor batch: wake the main thread, wait until it spins, ping-pong.
                ask(CTL_FLOOR, CTL_FLOOR_READY)?;
                for i in 0..per_batch + warmup {
                    let ping = counter.wrapping_add(1);
                    let t0 = Instant::now();
                    word.store(ping, Ordering::Release);
                    while word.load(Ordering::Acquire) != ping.wrapping_add(1) {
                        std::hint::spin_loop();
                    }
                    let ns = t0.elapsed().as_nanos() as u64;
                    counter = counter.wrapping_add(2);
                    if i >= warmup {
                        floor.push(ns);
                    }
                }
                ctl.store(CTL_IDLE, Ordering::Release);
            } else {
                for i in 0..per_batch + warmup {
                    ud += 1;
                    let t0 = Instant::now();
                    let c = qp.call(client::sqe(Opcode::Nop, ud), timeout)?;
                    let ns = t0.elapsed().as_nanos() as u64;
                    if c.status != Status::Ok.raw() || c.user_data != ud {
                        return Err(RingBenchError::Child {
                            role: "interleaved",
                            reason: format!("bad completion {c:?}"),
                        });
                    }
                    if i >= warmup {
                        ring.push(ns);
                    }
                }
            }
        }
        ring_all.extend_from_slice(&ring);
        floor_all.extend_from_slice(&floor);
        entry_all.extend_from_slice(&entry);
        let (floor_p50, _, _) = percentiles(&mut floor);
        let (entry_p50, _, _) = percentiles(&mut entry);
        let (ring_p50, _, _) = percentiles(&mut ring);
        pairs.push(PairReport {
            floor_first,
            floor_p50_ns: floor_p50,
            entry_floor_p50_ns: entry_p50,
            p50_ns: ring_p50,
            ratio: ring_p50 as f64 / floor_p50.max(1) as f64,
            entry_ratio: ring_p50 as f64 / entry_p50.max(1) as f64,
        });
    }
    let (p50, p99, p999) = percentiles(&mut ring_all);
    let (floor_p50, floor_p99, floor_p999) = percentiles(&mut floor_all);
    let (entry_p50, entry_p99, entry_p999) = percentiles(&mut entry_all);

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
    ctl.store(CTL_DONE, Ordering::Release);
    sys::futex_wake_all(ctl);
    Ok(EngineChildReport {
        p50_ns: p50,
        p99_ns: p99,
        p999_ns: p999,
        floor_p50_ns: floor_p50,
        floor_p99_ns: floor_p99,
        floor_p999_ns: floor_p999,
        entry_floor_p50_ns: entry_p50,
        entry_floor_p99_ns: entry_p99,
        entry_floor_p999_ns: entry_p999,
        pairs,
        batched_ops_per_s: done as f64 / secs,
    })
}
