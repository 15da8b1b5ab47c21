//! `kvplane bench transfer`: the transfer benchmark (the role of nixlbench for kvplane).
//!
//! Sweeps the paths a KV block takes through the daemon, over block size, batch size
//! (blocks per call), queue depth (NVMe I/O in flight) and thread count (concurrent
//! callers). Every point is reported next to a ceiling measured in the same run with the
//! same shape, the two alternating pass by pass:
//! - host paths: `memcpy` of the same bytes in the same batches on the same threads;
//! - NVMe paths: raw O_DIRECT io_uring on a plain file in the same directory, same I/O
//!   size (the 4 KiB slot header included) and queue depth (what fio's io_uring engine does);
//! - a device copy on a GPU only when there is one: this build runs on the host backend,
//!   where "engine buffer" and G1 are host memory, and it says so.
//!
//! Paths:
//! - `engine->host`: SAVE through a real `kvplane serve` child: one engine session per
//!   thread, its KV pool a registered memfd in a vLLM per-layer paged layout (8 KV heads,
//!   head_dim 128, bf16, up to 64 layers; page tokens make up the block size, see
//!   `EngineGeometry::for_block_bytes`), timed from submission to completion as the engine
//!   sees it (arena, rings, validation, registry, paged gather into a host-tier slot);
//! - `host->engine`: LOAD of host-resident blocks the same way (paged scatter into
//!   poisoned pages; every byte checked after each pass, untimed);
//! - `host->nvme`: write-through save (engine -> host slot -> NVMe slot, header and
//!   checksum), the time until the save completes;
//! - `nvme->host`: load of blocks only on NVMe (a daemon restarted on the same file):
//!   staged NVMe -> host slot, verified, then copied to the engine;
//! - `g1->engine` (only when asked for): load served from the G1 arena (host memory
//!   standing in for HBM) by an in-process `BlockManager`, copying into a flat buffer: no
//!   ring op fills G1 (it is filled by `promote`), so this one does not go through a
//!   session, and says so in its ceiling column.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::CliResult;
use kvplane_ffi::{Opcode, kvp_block_op};

use crate::bench::served::{EngineGeometry, EngineSession, ServedDaemon, ServedOptions, chain_ops};
use kvplane_daemon::block::{BlockConfig, BlockManager, ManagerOptions};
use kvplane_daemon::dataplane::transfer::LocalBlocks;
use kvplane_daemon::tier::TiersConfig;
use kvplane_daemon::tier::host::{HostConfig, HugepageMode};
use kvplane_daemon::tier::nvme::{NvmeConfig, slot_bytes};

#[derive(Debug, clap::Args)]
pub struct TransferArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write every point as CSV to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Draw bandwidth against block size per path as an SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Paths to measure (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "engine->host,host->engine,host->nvme,nvme->host"
    )]
    pub paths: Vec<String>,
    /// Block sizes in KiB (comma-separated), 4 KiB to 64 MiB.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4,16,64,256,1024,2048,4096,16384,65536"
    )]
    pub block_kib: Vec<u64>,
    /// Blocks per call (comma-separated); the first is used in the block-size sweep.
    #[arg(long, value_delimiter = ',', default_value = "16,1,64")]
    pub batch: Vec<usize>,
    /// NVMe ops in flight (comma-separated); the first is used in the block-size sweep.
    #[arg(long, value_delimiter = ',', default_value = "32,1,8")]
    pub queue_depth: Vec<u32>,
    /// Concurrent callers (comma-separated); the first is used in the block-size sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Block size (KiB) at which batch, queue depth and threads are swept.
    #[arg(long, default_value_t = 2048)]
    pub pivot_kib: u64,
    /// Bytes moved per host point, in MiB (NVMe points a quarter of it, at most 2048
    /// blocks; every point at least one batch per thread).
    #[arg(long, default_value_t = 256)]
    pub point_mib: u64,
    /// Passes per point; the median pass is reported.
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Directory for the NVMe files (default: a temporary directory under the current one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A small, fast sweep (tests, smoke runs).
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("--{flag}: {reason}")]
    Arg { flag: &'static str, reason: String },
    #[error("{path}: {reason}")]
    Path { path: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Op { path: String, detail: String },
    #[error("through kvplane serve: {0}")]
    Served(#[from] crate::bench::served::ServedError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathKind {
    EngineToHost,
    HostToEngine,
    HostToNvme,
    NvmeToHost,
    G1ToEngine,
}

impl PathKind {
    fn parse(s: &str) -> Result<PathKind, TransferError> {
        Ok(match s.trim() {
            "engine->host" => PathKind::EngineToHost,
            "host->engine" => PathKind::HostToEngine,
            "host->nvme" => PathKind::HostToNvme,
            "nvme->host" => PathKind::NvmeToHost,
            "g1->engine" => PathKind::G1ToEngine,
            other => {
                return Err(TransferError::Arg {
                    flag: "paths",
                    reason: format!(
                        "unknown path `{other}` (engine->host, host->engine, host->nvme, nvme->host, g1->engine)"
                    ),
                });
            }
        })
    }
    fn name(self) -> &'static str {
        match self {
            PathKind::EngineToHost => "engine->host",
            PathKind::HostToEngine => "host->engine",
            PathKind::HostToNvme => "host->nvme",
            PathKind::NvmeToHost => "nvme->host",
            PathKind::G1ToEngine => "g1->engine",
        }
    }
    fn nvme(self) -> bool {
        matches!(self, PathKind::HostToNvme | PathKind::NvmeToHost)
    }
    fn ceiling_name(self) -> &'static str {
        match self {
            PathKind::HostToNvme => "raw O_DIRECT io_uring write",
            PathKind::NvmeToHost => "raw O_DIRECT io_uring read",
            PathKind::G1ToEngine => "memcpy (in-process BlockManager, no ring)",
            _ => "memcpy",
        }
    }
}

/// One measured point.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub path: String,
    pub block_bytes: u64,
    pub batch: usize,
    pub queue_depth: u32,
    pub threads: usize,
    pub blocks: u64,
    pub gbps: f64,
    pub iops: f64,
    /// Latency of one call (a batch of `batch` blocks), microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub ceiling: String,
    pub ceiling_gbps: f64,
    pub pct_of_ceiling: f64,
    /// What was timed: `kvplane serve, <layers>x<page tokens> vLLM pages` (a session over
    /// the rings) or `in-process BlockManager`.
    pub via: String,
}

#[derive(Clone, Copy)]
struct Shape {
    block: usize,
    batch: usize,
    qd: u32,
    threads: usize,
}

/// Timing of one pass: wall seconds and per-call latencies.
struct Pass {
    secs: f64,
    lat_us: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Runs `per_thread(t)` on `threads` threads released together; each returns its call
/// latencies. Wall time is from the first thread's start to the last thread's finish
/// (each thread reads the clock itself: the releasing thread may be descheduled).
fn parallel<F>(threads: usize, per_thread: F) -> Result<Pass, TransferError>
where
    F: Fn(usize) -> Result<Vec<f64>, TransferError> + Sync,
{
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &per_thread;
                let b = &barrier;
                s.spawn(move || {
                    b.wait();
                    let start = Instant::now();
                    let r = f(t);
                    (r, start, Instant::now())
                })
            })
            .collect();
        let mut lat = Vec::new();
        let mut first: Option<Instant> = None;
        let mut last: Option<Instant> = None;
        for h in handles {
            let (r, start, end) = h.join().expect("bench thread panicked");
            lat.extend(r?);
            first = Some(first.map_or(start, |f| f.min(start)));
            last = Some(last.map_or(end, |l| l.max(end)));
        }
        let secs = match (first, last) {
            (Some(f), Some(l)) => (l - f).as_secs_f64(),
            _ => 0.0,
        };
        Ok(Pass {
            secs: secs.max(1e-9),
            lat_us: lat,
        })
    })
}

/// Blocks of this point, split over threads: thread t owns `[t * per, (t + 1) * per)`.
fn blocks_for(shape: Shape, bytes: u64) -> (u64, u64) {
    let per_thread = (bytes / shape.block as u64 / shape.threads as u64)
        .max(shape.batch as u64)
        .div_ceil(shape.batch as u64)
        * shape.batch as u64;
    (per_thread * shape.threads as u64, per_thread)
}

struct Scratch {
    dir: PathBuf,
    owned: bool,
}
impl Drop for Scratch {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A page-aligned heap buffer (O_DIRECT ceilings and engine buffers), zero-filled.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}
// SAFETY: plain owned memory; shared access is read-only or to disjoint ranges (per thread).
unsafe impl Send for Aligned {}
// SAFETY: as above.
unsafe impl Sync for Aligned {}
impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating {len} bytes");
        Aligned { ptr, layout }
    }
    /// # Safety
    /// The caller's range is not written by anyone else meanwhile.
    unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.layout.size());
        // SAFETY: in bounds (checked); exclusivity per the caller.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }
    /// # Safety
    /// The caller's range is used by no one else meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.layout.size());
        // SAFETY: in bounds (checked); exclusivity per the caller.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}
impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Fills a buffer with non-constant bytes (touches every page).
fn fill(buf: &Aligned, len: usize, seed: u64) {
    // SAFETY: single-threaded setup; the bench owns the buffer.
    let s = unsafe { buf.slice_mut(0, len) };
    for (i, w) in s.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&kvplane_kernels::checksum::mix64(seed ^ i as u64).to_le_bytes());
    }
}

fn manager(
    shape: Shape,
    blocks: u64,
    nvme_file: Option<&Path>,
    g1: bool,
) -> Result<LocalBlocks, TransferError> {
    let slot = slot_bytes(shape.block) as u64;
    let mut tiers = TiersConfig {
        host: HostConfig {
            // Every block fits (no eviction inside a pass), plus one slot of slack.
            capacity_bytes: (blocks + 1) * slot,
            lock: false,
            hugepages: HugepageMode::Never,
            touch_threads: 0,
            ..HostConfig::default()
        },
        ..TiersConfig::default()
    };
    tiers.hbm.capacity_bytes = if g1 {
        (blocks + 1) * shape.block as u64
    } else {
        0
    };
    if let Some(f) = nvme_file {
        tiers.nvme = NvmeConfig {
            paths: vec![f.to_path_buf()],
            capacity_bytes: (blocks + 1) * slot,
            queue_depth: shape.qd,
            batch_size: shape.qd,
            verify_on_scan: false,
            ..NvmeConfig::default()
        };
    }
    let block = BlockConfig {
        block_bytes: shape.block,
        nvme_admit_min_hits: 0,
        ..BlockConfig::default()
    };
    let setup = |detail: String| TransferError::Op {
        path: "setup".into(),
        detail,
    };
    // No device given: the host backend, which this in-process path measures and labels.
    let m = BlockManager::new(&block, &tiers, ManagerOptions::default())
        .map_err(|e| setup(e.to_string()))?;
    LocalBlocks::new(m).map_err(|e| setup(e.to_string()))
}

fn hash_of(i: u64) -> u64 {
    kvplane_kernels::checksum::mix64(i ^ 0x7ea5_0000_0000) | 1
}

/// One save pass over every block (per thread: its own chain, in batches).
fn save_pass(
    m: &LocalBlocks,
    engine: &Aligned,
    shape: Shape,
    per_thread: u64,
    write_through: bool,
) -> Result<Pass, TransferError> {
    let bb = shape.block;
    parallel(shape.threads, |t| {
        let mut lat = Vec::new();
        let first = t as u64 * per_thread;
        let mut i = first;
        while i < first + per_thread {
            let chain: Vec<(u64, Option<u64>)> = (i..i + shape.batch as u64)
                .map(|k| (hash_of(k), (k > first).then(|| hash_of(k - 1))))
                .collect();
            let t0 = Instant::now();
            let r = m
                .save_with(1, &chain, 0, write_through, |j, dst| {
                    let off = (i as usize + j) * bb;
                    // SAFETY: each thread reads its own blocks; no one writes the engine buffer.
                    dst.copy_from_slice(unsafe { engine.slice(off, bb) });
                    Ok::<(), std::io::Error>(())
                })
                .map_err(|e| TransferError::Op {
                    path: "save".into(),
                    detail: e.to_string(),
                })?;
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
            if r.stored != shape.batch || (write_through && r.written_through != shape.batch) {
                return Err(TransferError::Op {
                    path: "save".into(),
                    detail: format!(
                        "stored {} of {} (written through {}; no space {}; {:?})",
                        r.stored, shape.batch, r.written_through, r.no_space, r.nvme_error
                    ),
                });
            }
            i += shape.batch as u64;
        }
        Ok(lat)
    })
}

/// One load pass over every block, into the engine buffer.
fn load_pass(
    m: &LocalBlocks,
    engine: &Aligned,
    shape: Shape,
    per_thread: u64,
) -> Result<Pass, TransferError> {
    let bb = shape.block;
    parallel(shape.threads, |t| {
        let mut lat = Vec::new();
        let first = t as u64 * per_thread;
        let mut i = first;
        while i < first + per_thread {
            let hashes: Vec<u64> = (i..i + shape.batch as u64).map(hash_of).collect();
            let t0 = Instant::now();
            let r = m
                .load_with(1, &hashes, |j, src| {
                    let off = (i as usize + j) * bb;
                    // SAFETY: each thread writes its own blocks of the engine buffer.
                    unsafe { engine.slice_mut(off, bb) }.copy_from_slice(src);
                    Ok::<(), std::io::Error>(())
                })
                .map_err(|e| TransferError::Op {
                    path: "load".into(),
                    detail: e.to_string(),
                })?;
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
            if r.loaded != shape.batch {
                return Err(TransferError::Op {
                    path: "load".into(),
                    detail: format!("loaded {} of {}: {:?}", r.loaded, shape.batch, r.failure),
                });
            }
            i += shape.batch as u64;
        }
        Ok(lat)
    })
}

fn page_seed(thread: usize, page: u32) -> u64 {
    ((thread as u64) << 32) | u64::from(page)
}

/// Thread t's chain of batch `i` (its blocks `[first + i, first + i + batch)`) as block ops
/// into its session's pages `[i, i + batch)`.
fn served_ops(shape: Shape, per_thread: u64, t: usize, i: u64) -> Vec<kvp_block_op> {
    let first = t as u64 * per_thread;
    let hashes: Vec<u64> = (first + i..first + i + shape.batch as u64)
        .map(hash_of)
        .collect();
    let parent = if i > 0 { hash_of(first + i - 1) } else { 0 };
    chain_ops(&hashes, parent, i as u32)
}

/// One pass of `opcode` (SAVE or LOAD) over every block, each thread through its own
/// engine session, in batches; latency per call is submission to completion.
fn served_pass(
    sessions: &[std::sync::Mutex<EngineSession>],
    shape: Shape,
    per_thread: u64,
    opcode: Opcode,
) -> Result<Pass, TransferError> {
    let name = if opcode == Opcode::Save {
        "SAVE"
    } else {
        "LOAD"
    };
    parallel(shape.threads, |t| {
        let mut e = sessions[t].lock().unwrap_or_else(|e| e.into_inner());
        let mut lat = Vec::with_capacity((per_thread / shape.batch as u64) as usize);
        let mut i = 0;
        while i < per_thread {
            let ops = served_ops(shape, per_thread, t, i);
            lat.push(e.op_all(name, opcode, &ops)?.seconds * 1e6);
            i += shape.batch as u64;
        }
        Ok(lat)
    })
}

/// `opcode` (DROP) over every block, untimed.
fn served_all(
    sessions: &[std::sync::Mutex<EngineSession>],
    shape: Shape,
    per_thread: u64,
    opcode: Opcode,
) -> Result<(), TransferError> {
    for (t, s) in sessions.iter().enumerate() {
        let mut e = s.lock().unwrap_or_else(|e| e.into_inner());
        let mut i = 0;
        while i < per_thread {
            e.op_all("DROP", opcode, &served_ops(shape, per_thread, t, i))?;
            i += shape.batch as u64;
        }
    }
    Ok(())
}

/// The memcpy ceiling: the same blocks, batches and threads, buffer to buffer.
fn memcpy_pass(
    src: &Aligned,
    dst: &Aligned,
    shape: Shape,
    per_thread: u64,
) -> Result<Pass, TransferError> {
    let bb = shape.block;
    parallel(shape.threads, |t| {
        let mut lat = Vec::new();
        let first = t as u64 * per_thread;
        let mut i = first;
        while i < first + per_thread {
            let t0 = Instant::now();
            for k in i..i + shape.batch as u64 {
                let off = k as usize * bb;
                // SAFETY: each thread copies its own disjoint blocks.
                unsafe { dst.slice_mut(off, bb).copy_from_slice(src.slice(off, bb)) };
            }
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
            i += shape.batch as u64;
        }
        Ok(lat)
    })
}

/// The NVMe ceiling: raw O_DIRECT io_uring, `qd` I/Os of `io_bytes` in flight per thread,
/// each thread on its own range of the file; latency per batch of `batch` I/Os.
fn raw_uring_pass(
    file: &Path,
    write: bool,
    buf: &Aligned,
    io_bytes: usize,
    shape: Shape,
    per_thread: u64,
) -> Result<Pass, TransferError> {
    use io_uring::{IoUring, opcode, types};
    use std::os::unix::fs::OpenOptionsExt;
    let io_err = |source| TransferError::Io {
        path: file.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .map_err(io_err)?;
    let total = per_thread * shape.threads as u64 * io_bytes as u64;
    if f.metadata().map_err(io_err)?.len() < total {
        f.set_len(total).map_err(io_err)?;
        // Allocate the extents first, as the tier's files are.
        // SAFETY: fallocate on our own fd.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, total as libc::off_t) };
        if rc != 0 {
            return Err(io_err(std::io::Error::last_os_error()));
        }
    }
    let fd = f.as_raw_fd();
    parallel(shape.threads, |t| {
        let mut ring = IoUring::new(shape.qd.max(1)).map_err(io_err)?;
        let mut lat = Vec::new();
        let first = t as u64 * per_thread;
        let end = first + per_thread;
        let mut next = first;
        let mut done = 0u64;
        let mut inflight = 0u32;
        let mut batch_t0 = Instant::now();
        while done < per_thread {
            while inflight < shape.qd && next < end {
                // Each thread reuses one I/O-sized buffer per in-flight slot of its own range
                // of `buf` (its own `qd` buffers), so no two I/Os share memory.
                let b = (t * shape.qd as usize + (next % shape.qd as u64) as usize) * io_bytes;
                // SAFETY: in bounds (checked by slice_mut); this thread's own buffer.
                let ptr = unsafe { buf.slice_mut(b, io_bytes) }.as_mut_ptr();
                let off = next * io_bytes as u64;
                let e = if write {
                    opcode::Write::new(types::Fd(fd), ptr, io_bytes as u32)
                        .offset(off)
                        .build()
                } else {
                    opcode::Read::new(types::Fd(fd), ptr, io_bytes as u32)
                        .offset(off)
                        .build()
                };
                // SAFETY: the buffer and fd outlive the I/O (we reap every completion below).
                unsafe { ring.submission().push(&e.user_data(next)) }
                    .map_err(|_| io_err(std::io::Error::other("submission queue full")))?;
                inflight += 1;
                next += 1;
            }
            ring.submit_and_wait(1).map_err(io_err)?;
            let cqes: Vec<i32> = ring.completion().map(|c| c.result()).collect();
            for res in cqes {
                if res < 0 {
                    return Err(io_err(std::io::Error::from_raw_os_error(-res)));
                }
                if res as usize != io_bytes {
                    return Err(io_err(std::io::Error::other(format!(
                        "short I/O: {res} of {io_bytes}"
                    ))));
                }
                inflight -= 1;
                done += 1;
                if done % shape.batch as u64 == 0 {
                    lat.push(batch_t0.elapsed().as_secs_f64() * 1e6);
                    batch_t0 = Instant::now();
                }
            }
        }
        Ok(lat)
    })
}

/// Summarises `passes` (the median pass by wall time) against the ceiling's median pass.
fn point(
    kind: PathKind,
    shape: Shape,
    blocks: u64,
    passes: Vec<Pass>,
    ceiling: Vec<Pass>,
    via: String,
) -> Point {
    let bytes = blocks as f64 * shape.block as f64;
    let mut passes = passes;
    passes.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let mid = passes.swap_remove(passes.len() / 2);
    let mut lat = mid.lat_us;
    lat.sort_by(f64::total_cmp);
    let ceiling_secs = median(ceiling.iter().map(|p| p.secs).collect());
    let gbps = bytes / mid.secs / 1e9;
    let ceiling_gbps = bytes / ceiling_secs / 1e9;
    Point {
        path: kind.name().into(),
        block_bytes: shape.block as u64,
        batch: shape.batch,
        queue_depth: shape.qd,
        threads: shape.threads,
        blocks,
        gbps,
        iops: blocks as f64 / mid.secs,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        ceiling: kind.ceiling_name().into(),
        ceiling_gbps,
        pct_of_ceiling: 100.0 * gbps / ceiling_gbps,
        via,
    }
}

fn run_point(
    kind: PathKind,
    shape: Shape,
    host_bytes: u64,
    passes: usize,
    dir: &Path,
) -> Result<Point, TransferError> {
    // NVMe points move a quarter of the bytes, and at most 2048 blocks (small I/O on a slow
    // disk would otherwise take minutes per point).
    let bytes = if kind.nvme() {
        (host_bytes / 4).min(2048 * shape.block as u64)
    } else {
        host_bytes.min(65536 * shape.block as u64)
    };
    let (blocks, per_thread) = blocks_for(shape, bytes);
    let bb = shape.block;
    let engine = Aligned::new(blocks as usize * bb);
    fill(&engine, blocks as usize * bb, bb as u64);
    let nvme_file = dir.join("kvplane-transfer.kvp");
    let raw_file = dir.join("raw-uring.dat");
    let _ = std::fs::remove_file(&nvme_file);
    let mut measured = Vec::new();
    let mut ceiling = Vec::new();
    let mut via = "in-process BlockManager".to_owned();
    match kind {
        PathKind::EngineToHost | PathKind::HostToEngine => {
            let g = EngineGeometry::for_block_bytes(bb as u64)?;
            via = format!(
                "kvplane serve, engine session per thread, vLLM pages {}x{}",
                g.layers, g.page_tokens
            );
            let daemon = ServedDaemon::start(&ServedOptions {
                exe: std::env::current_exe().map_err(|source| TransferError::Io {
                    path: "/proc/self/exe".into(),
                    source,
                })?,
                dir: dir.to_path_buf(),
                block_bytes: bb as u64,
                // Every block fits (no eviction inside a pass), plus one slot of slack.
                host_blocks: blocks + 1,
                lock: false,
                sessions: shape.threads as u32,
                backend: kvplane_daemon::config::BackendSetting::Host,
                gpu_ordinal: 0,
                hbm_blocks: 0,
            })?;
            let mut sessions = Vec::with_capacity(shape.threads);
            for t in 0..shape.threads {
                let mut e = daemon.attach(g, per_thread as u32)?;
                if e.max_ops() < shape.batch {
                    return Err(TransferError::Arg {
                        flag: "batch",
                        reason: format!(
                            "{} exceeds the session arena's {} block ops",
                            shape.batch,
                            e.max_ops()
                        ),
                    });
                }
                for page in 0..per_thread as u32 {
                    e.fill_page(page, page_seed(t, page))?;
                }
                sessions.push(std::sync::Mutex::new(e));
            }
            let dst = Aligned::new(blocks as usize * bb);
            fill(&dst, blocks as usize * bb, 1);
            for p in 0..passes {
                if kind == PathKind::EngineToHost {
                    if p > 0 {
                        served_all(&sessions, shape, per_thread, Opcode::Drop)?;
                    }
                    measured.push(served_pass(&sessions, shape, per_thread, Opcode::Save)?);
                } else {
                    if p == 0 {
                        served_pass(&sessions, shape, per_thread, Opcode::Save)?;
                    }
                    for s in &sessions {
                        let mut e = s.lock().unwrap_or_else(|e| e.into_inner());
                        for page in 0..per_thread as u32 {
                            e.poison_page(page)?;
                        }
                    }
                    measured.push(served_pass(&sessions, shape, per_thread, Opcode::Load)?);
                    for (t, s) in sessions.iter().enumerate() {
                        let mut e = s.lock().unwrap_or_else(|e| e.into_inner());
                        for page in 0..per_thread as u32 {
                            e.check_page(page, page_seed(t, page))?;
                        }
                    }
                }
                ceiling.push(memcpy_pass(&engine, &dst, shape, per_thread)?);
            }
        }
        PathKind::G1ToEngine => {
            let m = manager(shape, blocks, None, true)?;
            let dst = Aligned::new(blocks as usize * bb);
            fill(&dst, blocks as usize * bb, 1);
            for p in 0..passes {
                if p == 0 {
                    save_pass(&m, &engine, shape, per_thread, false)?;
                    let all: Vec<u64> = (0..blocks).map(hash_of).collect();
                    for t in 0..shape.threads as u64 {
                        let s = (t * per_thread) as usize;
                        m.promote(1, &all[s..s + per_thread as usize]);
                    }
                }
                measured.push(load_pass(&m, &dst, shape, per_thread)?);
                ceiling.push(memcpy_pass(&engine, &dst, shape, per_thread)?);
            }
            if m.stats().tiers[0].used_slots as u64 != blocks {
                return Err(TransferError::Op {
                    path: kind.name().into(),
                    detail: "blocks were not all promoted to G1".into(),
                });
            }
        }
        PathKind::HostToNvme | PathKind::NvmeToHost => {
            let io_bytes = slot_bytes(bb);
            let raw_buf = Aligned::new(shape.threads * shape.qd as usize * io_bytes);
            fill(&raw_buf, shape.threads * shape.qd as usize * io_bytes, 7);
            for _ in 0..passes {
                let _ = std::fs::remove_file(&nvme_file);
                let m = manager(shape, blocks, Some(&nvme_file), false)?;
                let p = save_pass(&m, &engine, shape, per_thread, true)?;
                if kind == PathKind::HostToNvme {
                    measured.push(p);
                    ceiling.push(raw_uring_pass(
                        &raw_file, true, &raw_buf, io_bytes, shape, per_thread,
                    )?);
                } else {
                    // A daemon restarted on the same file: blocks only on NVMe.
                    drop(m);
                    let m = manager(shape, blocks, Some(&nvme_file), false)?;
                    let on_nvme_only = m.stats().tiers[1].used_slots == 0
                        && m.stats().tiers[2].used_slots as u64 == blocks;
                    if !on_nvme_only {
                        return Err(TransferError::Op {
                            path: kind.name().into(),
                            detail: "restart did not restore every block from NVMe".into(),
                        });
                    }
                    measured.push(load_pass(&m, &engine, shape, per_thread)?);
                    // Ceiling reads what the write pass put in the raw file.
                    raw_uring_pass(&raw_file, true, &raw_buf, io_bytes, shape, per_thread)?;
                    ceiling.push(raw_uring_pass(
                        &raw_file, false, &raw_buf, io_bytes, shape, per_thread,
                    )?);
                }
            }
            let _ = std::fs::remove_file(&nvme_file);
            let _ = std::fs::remove_file(&raw_file);
        }
    }
    Ok(point(kind, shape, blocks, measured, ceiling, via))
}

/// The sweep: every path over block sizes at the first batch/qd/threads, then batch, queue
/// depth (NVMe paths) and threads at the pivot block size.
fn plan(args: &TransferArgs, kinds: &[PathKind]) -> Vec<(PathKind, Shape)> {
    let base = |block| Shape {
        block,
        batch: args.batch[0],
        qd: args.queue_depth[0],
        threads: args.threads[0],
    };
    let pivot = (args.pivot_kib * 1024) as usize;
    let mut out = Vec::new();
    for &k in kinds {
        for &kib in &args.block_kib {
            out.push((k, base((kib * 1024) as usize)));
        }
        for &b in &args.batch[1..] {
            out.push((
                k,
                Shape {
                    batch: b,
                    ..base(pivot)
                },
            ));
        }
        if k.nvme() {
            for &q in &args.queue_depth[1..] {
                out.push((
                    k,
                    Shape {
                        qd: q,
                        ..base(pivot)
                    },
                ));
            }
        }
        for &t in &args.threads[1..] {
            out.push((
                k,
                Shape {
                    threads: t,
                    ..base(pivot)
                },
            ));
        }
    }
    out
}

fn validate(args: &mut TransferArgs) -> Result<Vec<PathKind>, TransferError> {
    if args.quick {
        args.block_kib = vec![4, 64, 1024];
        args.batch = vec![4, 1];
        args.queue_depth = vec![8, 1];
        args.threads = vec![1, 2];
        args.pivot_kib = 64;
        args.point_mib = 8;
        args.passes = 1;
    }
    let arg = |flag, reason: String| TransferError::Arg { flag, reason };
    if let Some(k) = args
        .block_kib
        .iter()
        .find(|&&k| !(4..=65536).contains(&k) || k % 4 != 0)
    {
        return Err(arg(
            "block-kib",
            format!("{k} KiB: block sizes are multiples of 4 KiB, 4 KiB to 64 MiB"),
        ));
    }
    if !(4..=65536).contains(&args.pivot_kib) || args.pivot_kib % 4 != 0 {
        return Err(arg(
            "pivot-kib",
            format!("{}: 4..=65536, a multiple of 4", args.pivot_kib),
        ));
    }
    if args.batch.is_empty() || args.batch.iter().any(|&b| b == 0 || b > 4096) {
        return Err(arg("batch", "each in 1..=4096".into()));
    }
    if args.queue_depth.is_empty() || args.queue_depth.iter().any(|&q| q == 0 || q > 1024) {
        return Err(arg("queue-depth", "each in 1..=1024".into()));
    }
    if args.threads.is_empty() || args.threads.iter().any(|&t| t == 0 || t > 64) {
        return Err(arg("threads", "each in 1..=64".into()));
    }
    if args.passes == 0 || args.passes > 100 {
        return Err(arg("passes", "1..=100".into()));
    }
    if args.point_mib == 0 || args.point_mib > 16384 {
        return Err(arg("point-mib", "1..=16384".into()));
    }
    let mut kinds = Vec::new();
    for p in &args.paths {
        let k = PathKind::parse(p)?;
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if kinds.is_empty() {
        return Err(arg("paths", "no path given".into()));
    }
    Ok(kinds)
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

fn csv(points: &[Point]) -> String {
    let mut s = String::from(
        "path,block_bytes,batch,queue_depth,threads,blocks,gbps,iops,p50_us,p99_us,ceiling,ceiling_gbps,pct_of_ceiling,via\n",
    );
    for p in points {
        s += &format!(
            "{},{},{},{},{},{},{:.4},{:.1},{:.1},{:.1},{},{:.4},{:.1},{}\n",
            p.path,
            p.block_bytes,
            p.batch,
            p.queue_depth,
            p.threads,
            p.blocks,
            p.gbps,
            p.iops,
            p.p50_us,
            p.p99_us,
            p.ceiling,
            p.ceiling_gbps,
            p.pct_of_ceiling,
            p.via
        );
    }
    s
}

/// Hand-written SVG: GB/s (linear) against block size (log2) per path, from the block-size
/// sweep points (first batch/qd/threads), with each path's ceiling dashed.
pub fn svg(points: &[Point], title: &str) -> String {
    const W: f64 = 1020.0;
    const H: f64 = 520.0;
    const L: f64 = 70.0;
    const R: f64 = 290.0;
    const T: f64 = 50.0;
    const B: f64 = 60.0;
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let mut paths: Vec<&str> = Vec::new();
    for p in points {
        if !paths.contains(&p.path.as_str()) {
            paths.push(&p.path);
        }
    }
    // The block-size sweep of each path: its points at the path's first shape.
    let series: Vec<Vec<&Point>> = paths
        .iter()
        .map(|name| {
            let first = points
                .iter()
                .find(|p| p.path == *name)
                .expect("path has points");
            let mut v: Vec<&Point> = points
                .iter()
                .filter(|p| {
                    p.path == *name
                        && p.batch == first.batch
                        && p.queue_depth == first.queue_depth
                        && p.threads == first.threads
                })
                .collect();
            v.sort_by_key(|p| p.block_bytes);
            v.dedup_by_key(|p| p.block_bytes);
            v
        })
        .collect();
    let all = series.iter().flatten();
    let xmin = all
        .clone()
        .map(|p| (p.block_bytes as f64).log2())
        .fold(f64::MAX, f64::min);
    let xmax = all
        .clone()
        .map(|p| (p.block_bytes as f64).log2())
        .fold(f64::MIN, f64::max);
    let ymax = all
        .map(|p| p.gbps.max(p.ceiling_gbps))
        .fold(0.0f64, f64::max)
        .max(0.1)
        * 1.1;
    let xspan = (xmax - xmin).max(1.0);
    let x = |b: u64| L + ((b as f64).log2() - xmin) / xspan * (W - L - R);
    let y = |g: f64| H - B - g / ymax * (H - T - B);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        (W - R + L) / 2.0,
        xml(title)
    );
    // Axes, grid, ticks.
    s += &format!(
        "<line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{}\" stroke=\"black\"/>\n",
        H - B,
        W - R,
        H - B,
        H - B
    );
    for i in 0..=5 {
        let g = ymax / 1.1 * i as f64 / 5.0;
        s += &format!(
            "<line x1=\"{L}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{g:.1}</text>\n",
            W - R,
            L - 6.0,
            y(g) + 4.0,
            y = y(g)
        );
    }
    let mut e = xmin.ceil() as u32;
    while e as f64 <= xmax {
        let b = 1u64 << e;
        if e % 2 == 0 || xspan <= 6.0 {
            s += &format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                x(b),
                H - B + 18.0,
                human_bytes(b)
            );
        }
        e += 1;
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">block size (log scale)</text>\n<text x=\"18\" y=\"{}\" transform=\"rotate(-90 18 {})\" text-anchor=\"middle\">GB/s</text>\n",
        (W - R + L) / 2.0,
        H - 15.0,
        (H - B + T) / 2.0,
        (H - B + T) / 2.0
    );
    for (i, (name, pts)) in paths.iter().zip(&series).enumerate() {
        let c = colors[i % colors.len()];
        let line: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.block_bytes), y(p.gbps)))
            .collect();
        let ceil: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.block_bytes), y(p.ceiling_gbps)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            line.join(" ")
        );
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1\" stroke-dasharray=\"5,4\" points=\"{}\"/>\n",
            ceil.join(" ")
        );
        for p in pts {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"><title>{} {}: {:.2} GB/s ({:.0}% of {})</title></circle>\n",
                x(p.block_bytes),
                y(p.gbps),
                xml(&p.path),
                human_bytes(p.block_bytes),
                p.gbps,
                p.pct_of_ceiling,
                xml(&p.ceiling)
            );
        }
        let ly = T + 10.0 + i as f64 * 36.0;
        s += &format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>\n<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{c}\" stroke-dasharray=\"5,4\"/><text x=\"{}\" y=\"{}\" fill=\"#555\" font-size=\"11\">ceiling: {}</text>\n",
            W - R + 15.0,
            W - R + 40.0,
            W - R + 46.0,
            ly + 4.0,
            xml(name),
            W - R + 15.0,
            ly + 15.0,
            W - R + 40.0,
            ly + 15.0,
            W - R + 46.0,
            ly + 19.0,
            xml(&pts.first().map(|p| p.ceiling.clone()).unwrap_or_default())
        );
    }
    s += "</svg>\n";
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn run(mut args: TransferArgs) -> CliResult {
    let kinds = validate(&mut args)?;
    let scratch = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|source| TransferError::Io {
                path: d.clone(),
                source,
            })?;
            Scratch {
                dir: d.clone(),
                owned: false,
            }
        }
        None => {
            let d = std::env::current_dir()?
                .join(format!(".kvplane-bench-transfer-{}", std::process::id()));
            std::fs::create_dir_all(&d).map_err(|source| TransferError::Io {
                path: d.clone(),
                source,
            })?;
            Scratch {
                dir: d,
                owned: true,
            }
        }
    };
    let backend = match kvplane_cuda::cuda::topology() {
        Ok(g) if !g.is_empty() => format!(
            "{} GPU(s) present, but this benchmark measures the host backend (engine buffer and G1 are host memory); no device-copy ceiling is measured",
            g.len()
        ),
        _ => "host backend (no NVIDIA driver): engine buffer and G1 are host memory; no GPU figure is measured".into(),
    };
    let todo = plan(&args, &kinds);
    let bar = if std::io::stderr().is_terminal() && !args.json {
        let b = indicatif::ProgressBar::new(todo.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        Some(b)
    } else {
        None
    };
    let t0 = Instant::now();
    let mut points = Vec::with_capacity(todo.len());
    for (kind, shape) in &todo {
        if let Some(b) = &bar {
            b.set_message(format!(
                "{} {} x{} qd{} t{}",
                kind.name(),
                human_bytes(shape.block as u64),
                shape.batch,
                shape.qd,
                shape.threads
            ));
        }
        points.push(run_point(
            *kind,
            *shape,
            args.point_mib << 20,
            args.passes,
            &scratch.dir,
        )?);
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let elapsed_s = t0.elapsed().as_secs_f64();
    if let Some(path) = &args.csv {
        std::fs::write(path, csv(&points)).map_err(|source| TransferError::Io {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "kvplane bench transfer: GB/s vs block size ({})",
            if backend.starts_with("host") {
                "host backend"
            } else {
                "host backend on a GPU node"
            }
        );
        std::fs::write(path, svg(&points, &title)).map_err(|source| TransferError::Io {
            path: path.clone(),
            source,
        })?;
    }
    if args.json {
        let v = serde_json::json!({
            "bench": "transfer",
            "backend": backend,
            "dir": scratch.dir.display().to_string(),
            "passes": args.passes,
            "elapsed_s": elapsed_s,
            "points": points,
        });
        println!("{v}");
        return Ok(());
    }
    println!("kvplane bench transfer: {backend}");
    println!(
        "NVMe files in {} (O_DIRECT); {} pass(es) per point, median; latency is per call of `batch` blocks",
        scratch.dir.display(),
        args.passes
    );
    println!(
        "{:<13} {:>8} {:>5} {:>4} {:>3} {:>8} {:>10} {:>10} {:>10} {:>8} {:>6}  ceiling; timed via",
        "path", "block", "batch", "qd", "thr", "GB/s", "IOPS", "p50 us", "p99 us", "ceil", "%ceil"
    );
    for p in &points {
        println!(
            "{:<13} {:>8} {:>5} {:>4} {:>3} {:>8.2} {:>10.0} {:>10.1} {:>10.1} {:>8.2} {:>5.0}%  {}; {}",
            p.path,
            human_bytes(p.block_bytes),
            p.batch,
            p.queue_depth,
            p.threads,
            p.gbps,
            p.iops,
            p.p50_us,
            p.p99_us,
            p.ceiling_gbps,
            p.pct_of_ceiling,
            p.ceiling,
            p.via
        );
    }
    println!("{} points in {elapsed_s:.1} s", points.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(path: &str, block: u64, gbps: f64) -> Point {
        Point {
            path: path.into(),
            block_bytes: block,
            batch: 4,
            queue_depth: 8,
            threads: 1,
            blocks: 4,
            gbps,
            iops: 1.0,
            p50_us: 1.0,
            p99_us: 2.0,
            ceiling: "memcpy".into(),
            ceiling_gbps: gbps * 2.0,
            pct_of_ceiling: 50.0,
            via: "in-process BlockManager".into(),
        }
    }

    #[test]
    fn blocks_are_whole_batches_per_thread() {
        let s = Shape {
            block: 1 << 20,
            batch: 16,
            qd: 8,
            threads: 2,
        };
        let (n, per) = blocks_for(s, 100 << 20);
        assert_eq!(per % 16, 0);
        assert_eq!(n, per * 2);
        assert!(n * (1 << 20) >= 100 << 20);
        // Tiny budgets still move one batch per thread.
        assert_eq!(
            blocks_for(
                Shape {
                    block: 64 << 20,
                    ..s
                },
                1 << 20
            ),
            (32, 16)
        );
    }

    #[test]
    fn svg_has_one_series_per_path_and_escapes_names() {
        let pts = vec![
            pt("engine->host", 4096, 1.0),
            pt("engine->host", 1 << 20, 5.0),
            pt("host->nvme", 4096, 0.5),
        ];
        let s = svg(&pts, "t<1>");
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("stroke-width=\"2\" points=").count(), 2);
        assert!(s.contains("engine-&gt;host"));
        assert!(s.contains("t&lt;1&gt;"));
        assert!(!s.contains("NaN"));
    }

    #[test]
    fn bad_sizes_are_refused_with_the_flag() {
        let mut a = <TransferArgs as clap::FromArgMatches>::from_arg_matches(
            &<TransferArgs as clap::Args>::augment_args(clap::Command::new("t"))
                .get_matches_from(["t", "--block-kib", "3"]),
        )
        .unwrap();
        let e = validate(&mut a).unwrap_err().to_string();
        assert!(e.contains("--block-kib"), "{e}");
    }
}
