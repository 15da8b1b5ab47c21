//! The soak benchmark: a real `kvplane serve` child process with a host tier and an NVMe
//! tier, driven for minutes by many engine sessions (several queue pairs each, several
//! namespaces) issuing a seeded mix of SAVE / LOAD / LOOKUP / DROP through the Rust client.
//!
//! Every saved block carries a pattern derived from (namespace, block hash, byte offset in
//! the block); every LOAD checks every byte of every loaded block against it. A block is
//! **lost** when the daemon reports missing (LOOKUP: not among the leading hits; LOAD:
//! NOT_FOUND) a block that was *settled* when the op was submitted and had no DROP
//! submitted for it before the completion arrived. *Settled*: a SAVE of it completed OK,
//! no DROP of it was submitted between that SAVE's submission and its completion or
//! since, and no SAVE or DROP of it was in flight when the op was submitted. The tiers are
//! sized so the whole working set fits in the NVMe tier (the host tier holds a quarter and
//! demotes every evicted block), so the daemon has no legitimate reason to forget a
//! settled block; the daemon's own removal counters are checked for the same property
//! (no removal without a copy in a lower tier, except explicit drops).
//!
//! Under **capacity pressure** (`capacity_pressure`) the working set is twice what the
//! tiers hold together (host + NVMe slots = half the working set), so the daemon must
//! evict. Misses are counted by the same definition (a settled block reported missing, no
//! DROP racing it); each such miss also un-settles the block (the engine now knows it is
//! gone; it is checked again only after a new SAVE), so every counted miss stands for at
//! least one eviction of that block since it settled. The daemon's own count of removals
//! without a lower-tier copy (evictions out of the last tier) bounds them: misses beyond
//! it are **lost** blocks, and the run fails.
//!
//! Excused outcomes are bounded too: LOADs stopped with NO_SPACE (no host slot to stage
//! into) or BUSY (another load staging the same block) and SAVEs answered BUSY are not
//! losses, but more than `max_excused_fraction` of all SAVEs and LOADs fails the run.
//!
//! Sessions are not threads: `threads` driver threads (default 2, one per core here) each
//! own a share of the sessions and round-robin over their queue pairs, one op in flight
//! per queue pair (like one engine thread per queue pair). 64 threads of busy clients on 2
//! cores would measure the scheduler, not the daemon; the daemon serves them all from its
//! fixed pool of data-plane threads (`serve.dataplane_threads`) and I/O executors.
//!
//! The ceiling, measured first in the same run on the same sessions, queue pairs and
//! driver threads: NOP round trips per second (ring + daemon dispatch with no block work).
//! `ratio_to_ceiling` is the mixed workload's ops/s over that.
//!
//! That ceiling is no longer one the mix can approach: one polling thread answers
//! millions of NOPs a second, and the mix moves about 90 KB of verified block data per
//! op. So the run also measures, before the daemon starts, the **block work** itself: the
//! same seeded mix (same op kinds, chains, flags, pattern fill and byte-for-byte check)
//! run by `threads` threads in this process straight on the daemon library (block
//! manager, host tier, mover, NVMe engine of the same config, on a file of its own; no
//! rings, sessions or data-plane threads). `ratio_to_block_work` is the mixed workload's
//! ops/s over that: what serving the work to 64 sessions through rings costs.
//!
//! NOP latency under load: during the mixed phase one more session (a probe, not counted
//! in the mix's ops) sends one NOP at a time, a millisecond apart, and times each round
//! trip: what an engine's liveness ping or cheap call waits while the daemon is busy.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kvplane_ffi::{self as ffi, Opcode, Pod, Status, kvp_block_op, kvp_cqe, kvp_kv_layout};
use kvplane_shm::{AttachOptions, QueuePair, Segment, Session, ShmError, client, sys};
use serde::Serialize;

use super::serve_child::{ServeChild, ServeChildError};
use kvplane_daemon::config::{Config, NamespaceConfig};
use kvplane_daemon::control::admin::StatusReport;
use kvplane_daemon::tier::host::HugepageMode;

#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] ServeChildError),
    #[error("daemon: {reason}; log {log}:\n{tail}")]
    Daemon {
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("session {index}: {source}")]
    Attach {
        index: usize,
        #[source]
        source: ShmError,
    },
    #[error("session {index}: ATTACH_LAYOUT completed with {status}")]
    Layout { index: usize, status: &'static str },
    #[error("bad option {name}: {reason}")]
    Option { name: &'static str, reason: String },
    #[error("a driver thread panicked")]
    DriverPanic,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SoakError + use<> {
    let path = path.to_path_buf();
    move |source| SoakError::Io { op, path, source }
}

#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// The `kvplane` binary to run `serve` from.
    pub exe: PathBuf,
    /// Engine sessions attached to the daemon.
    pub sessions: u32,
    /// Queue pairs per session cycle through 1..=max_queue_pairs (session i has
    /// 1 + i % max_queue_pairs).
    pub max_queue_pairs: u32,
    /// Length of the mixed-workload phase.
    pub seconds: f64,
    /// Length of the NOP ceiling phase before it.
    pub ceiling_seconds: f64,
    pub seed: u64,
    /// Namespaces in the daemon config; each session binds two of them.
    pub namespaces: u32,
    /// Driver threads in this process.
    pub threads: u32,
    pub block_bytes: usize,
    /// Distinct block chains (prompts) per namespace.
    pub sequences: u32,
    /// Blocks per chain (and most blocks per op).
    pub chain_blocks: u32,
    /// Share of the working set the host tier holds (the rest lives on NVMe only).
    pub host_share: f64,
    /// Where the daemon's socket, config, log and NVMe file go (a fresh subdirectory).
    pub dir: PathBuf,
    /// An op without a completion for this long fails the run (a hung daemon).
    pub op_timeout: Duration,
    /// Print progress lines to stderr every 10 s.
    pub progress: bool,
    /// Size the tiers at half the working set (host + NVMe slots together).
    pub capacity_pressure: bool,
    /// Most NO_SPACE/BUSY-excused SAVEs and LOADs, as a fraction of all SAVEs and LOADs,
    /// before the run fails.
    pub max_excused_fraction: f64,
}

impl SoakOptions {
    fn check(&self) -> Result<(), SoakError> {
        let bad = |name, reason: String| Err(SoakError::Option { name, reason });
        if self.sessions == 0 || self.sessions > 1024 {
            return bad("--sessions", format!("1..=1024, got {}", self.sessions));
        }
        if !(1..=ffi::MAX_QUEUE_PAIRS as u32).contains(&self.max_queue_pairs) {
            return bad(
                "--max-queue-pairs",
                format!("1..=16, got {}", self.max_queue_pairs),
            );
        }
        if !(1..=16).contains(&self.namespaces) {
            return bad("--namespaces", format!("1..=16, got {}", self.namespaces));
        }
        if self.threads == 0 || self.threads > 64 {
            return bad("--threads", format!("1..=64, got {}", self.threads));
        }
        if self.block_bytes == 0 || self.block_bytes % BLOCK_UNIT != 0 {
            return bad(
                "--block-kib",
                format!("a multiple of 1 KiB, got {} bytes", self.block_bytes),
            );
        }
        if !(1..=64).contains(&self.chain_blocks) {
            return bad(
                "--chain-blocks",
                format!("1..=64, got {}", self.chain_blocks),
            );
        }
        if self.sequences == 0 {
            return bad("--sequences", "at least 1".into());
        }
        if !(self.host_share > 0.0 && self.host_share <= 1.0) {
            return bad("--host-share", format!("(0, 1], got {}", self.host_share));
        }
        if !(0.0..=1.0).contains(&self.max_excused_fraction) {
            return bad(
                "--max-excused-fraction",
                format!("[0, 1], got {}", self.max_excused_fraction),
            );
        }
        if self.capacity_pressure && self.working_set_blocks() < 64 {
            return bad(
                "--capacity-pressure",
                format!(
                    "needs a working set of at least 64 blocks, got {}",
                    self.working_set_blocks()
                ),
            );
        }
        if !(self.seconds > 0.0 && self.ceiling_seconds > 0.0) {
            return bad("--seconds", "must be > 0".into());
        }
        Ok(())
    }

    fn working_set_blocks(&self) -> u64 {
        self.namespaces as u64 * self.sequences as u64 * self.chain_blocks as u64
    }
}

// The engine layout: 4 layers x 2 planes (K, V) x 16 tokens x 4 heads x head_bytes, laid
// out like vLLM's per-layer [2, pages, tokens, heads, head_bytes] tensors.
const LAYERS: usize = 4;
const PLANES: usize = 2;
const TOKENS: u64 = 16;
const HEADS: u64 = 4;
/// Block bytes must be a multiple of this (2-byte dtype heads).
const BLOCK_UNIT: usize = 1024;

/// Per-block bookkeeping shared by all driver threads, packed in one word so a snapshot is
/// consistent: bit 63 saved, bits 48..63 SAVEs in flight, bits 32..48 DROPs in flight,
/// bits 0..32 the DROP epoch (DROPs submitted so far).
struct BlockState(AtomicU64);

const SAVED: u64 = 1 << 63;
const SAVE_ONE: u64 = 1 << 48;
const SAVE_MASK: u64 = 0x7FFF << 48;
const DROP_ONE: u64 = 1 << 32;
const DROP_MASK: u64 = 0xFFFF << 32;
const EPOCH_MASK: u64 = 0xFFFF_FFFF;

impl BlockState {
    fn update(&self, f: impl Fn(u64) -> u64) -> u64 {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| Some(f(s)))
            .expect("closure always returns Some")
    }
    fn epoch(&self) -> u64 {
        self.0.load(Ordering::SeqCst) & EPOCH_MASK
    }
    /// A SAVE is submitted; returns the state before.
    fn save_begin(&self) -> u64 {
        self.update(|s| s + SAVE_ONE)
    }
    /// A SAVE completed: the block is settled-saved if it completed OK and no DROP was in
    /// flight at its submission or submitted since.
    fn save_end(&self, before: u64, ok: bool) {
        self.update(|s| {
            let s = s - SAVE_ONE;
            let clean = before & DROP_MASK == 0 && s & EPOCH_MASK == before & EPOCH_MASK;
            if ok && clean { s | SAVED } else { s }
        });
    }
    fn drop_begin(&self) {
        self.update(|s| ((s + DROP_ONE) & !EPOCH_MASK) | ((s + 1) & EPOCH_MASK));
    }
    fn drop_end(&self) {
        self.update(|s| (s - DROP_ONE) & !SAVED);
    }
    /// The daemon reported the block missing while it was settled at `epoch` (under
    /// capacity pressure: evicted). It counts as saved again only after a new SAVE.
    fn forget(&self, epoch: u64) {
        self.update(|s| {
            if s & EPOCH_MASK == epoch {
                s & !SAVED
            } else {
                s
            }
        });
    }
    /// Epoch if the block is settled (saved, nothing in flight) right now.
    fn settled(&self) -> Option<u64> {
        let s = self.0.load(Ordering::SeqCst);
        (s & SAVED != 0 && s & (SAVE_MASK | DROP_MASK) == 0).then_some(s & EPOCH_MASK)
    }
}

/// The working set: namespaces x sequences x chain blocks, with chained hashes.
struct Universe {
    sequences: u32,
    chain: u32,
    hashes: Vec<u64>,
    states: Vec<BlockState>,
}

impl Universe {
    fn new(o: &SoakOptions) -> Universe {
        let n = o.working_set_blocks() as usize;
        let mut hashes = Vec::with_capacity(n);
        for ns in 0..o.namespaces {
            for s in 0..o.sequences {
                let mut parent = 0u64;
                for j in 0..o.chain_blocks {
                    // Chained like Dynamo's sequence hash: the parent's hash and this
                    // block's identity, seeded per run and namespace.
                    let mut key = [0u8; 16];
                    key[..8].copy_from_slice(&parent.to_le_bytes());
                    key[8..12].copy_from_slice(&s.to_le_bytes());
                    key[12..].copy_from_slice(&j.to_le_bytes());
                    let salt = o.seed ^ (u64::from(ns) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let h = xxhash_rust::xxh3::xxh3_64_with_seed(&key, salt).max(1);
                    hashes.push(h);
                    parent = h;
                }
            }
        }
        Universe {
            sequences: o.sequences,
            chain: o.chain_blocks,
            states: (0..n).map(|_| BlockState(AtomicU64::new(0))).collect(),
            hashes,
        }
    }
    fn index(&self, ns: u32, seq: u32, j: u32) -> usize {
        ((ns as usize * self.sequences as usize) + seq as usize) * self.chain as usize + j as usize
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The pattern of block (namespace, hash): 8-byte word `i` of the block (in the daemon's
/// packed order [layers][planes][tokens][heads][head_bytes]) is `pattern_word(key, i)`.
fn pattern_key(ns: u32, hash: u64) -> u64 {
    splitmix(hash ^ (u64::from(ns) << 56) ^ 0x5EED_0FB1_0C00)
}
fn pattern_word(key: u64, i: u64) -> u64 {
    splitmix(key ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}
fn fill_pattern(key: u64, first_word: u64, out: &mut [u8]) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(key, first_word + i as u64).to_le_bytes());
    }
}
/// Index of the first byte that differs from the pattern, if any.
fn check_pattern(key: u64, first_word: u64, data: &[u8]) -> Option<usize> {
    for (i, w) in data.chunks_exact(8).enumerate() {
        let want = pattern_word(key, first_word + i as u64).to_le_bytes();
        if w != want {
            let b = w.iter().zip(want).position(|(a, b)| *a != b).unwrap_or(0);
            return Some(i * 8 + b);
        }
    }
    None
}

/// Deterministic per-queue-pair random numbers (seeded from the run seed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n.max(1))) >> 64) as u64
    }
}

/// The mix's random choices for one op after its namespace, in the order they are drawn
/// (the soak's queue pairs and the block-work reference draw the same way).
struct Pick {
    /// The chain: 80 % of picks from the hottest 20 % of chains.
    seq: u32,
    /// 0..100: which op kind.
    roll: u64,
    /// Blocks of the chain the op covers (1..=chain).
    len: u32,
    /// 0..100: the op's flags.
    flags_roll: u64,
    /// Where a DROP's suffix starts.
    drop_from: u32,
}

impl Pick {
    fn draw(rng: &mut Rng, sequences: u32, chain: u32) -> Pick {
        let hot = (sequences / 5).max(1);
        let seq = if rng.below(100) < 80 {
            rng.below(u64::from(hot)) as u32
        } else {
            rng.below(u64::from(sequences)) as u32
        };
        Pick {
            seq,
            roll: rng.below(100),
            len: 1 + rng.below(u64::from(chain)) as u32,
            flags_roll: rng.below(100),
            drop_from: rng.below(u64::from(chain)) as u32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Save,
    Load,
    Lookup,
    Drop,
    Nop,
}
const KINDS: [OpKind; 5] = [
    OpKind::Save,
    OpKind::Load,
    OpKind::Lookup,
    OpKind::Drop,
    OpKind::Nop,
];
impl OpKind {
    fn index(self) -> usize {
        self as usize
    }
    fn name(self) -> &'static str {
        match self {
            OpKind::Save => "save",
            OpKind::Load => "load",
            OpKind::Lookup => "lookup",
            OpKind::Drop => "drop",
            OpKind::Nop => "nop",
        }
    }
}

/// One attached engine session: its KV buffer and the namespaces it bound.
struct EngineSession {
    _session: Session,
    kv: Segment,
    /// Global namespace index of each bound namespace (sqe.namespace_id = position).
    namespaces: Vec<u32>,
    page_stride: u64,
    plane_offsets: [[u64; LAYERS]; PLANES],
}

impl EngineSession {
    /// Offsets of the 8 regions (layer, plane) of `page`, in the block's packed order.
    fn regions(&self, page: u32) -> impl Iterator<Item = u64> + '_ {
        (0..LAYERS).flat_map(move |l| {
            (0..PLANES).map(move |p| self.plane_offsets[p][l] + u64::from(page) * self.page_stride)
        })
    }
}

struct InFlight {
    kind: OpKind,
    user_data: u64,
    submitted: Instant,
    ns_global: u32,
    seq: u32,
    /// First chain index the op covers (DROP: the suffix start; others 0).
    first: u32,
    /// Blocks named.
    len: u32,
    /// SAVE: block states before submission. LOOKUP/LOAD: epochs of the leading settled
    /// run (its length = blocks we expect present).
    snaps: Vec<u64>,
}

struct DriverQp {
    qp: QueuePair,
    /// Index into the driver's sessions.
    session: usize,
    /// Session number in the run and queue-pair index within it (for messages).
    label: (usize, u32),
    first_page: u32,
    rng: Rng,
    next_user_data: u64,
    inflight: Option<InFlight>,
}

#[derive(Clone)]
struct KindStats {
    ops: u64,
    ok: u64,
    blocks: u64,
    bytes: u64,
    hist: Histogram<u64>,
}

impl KindStats {
    fn new() -> Self {
        KindStats {
            ops: 0,
            ok: 0,
            blocks: 0,
            bytes: 0,
            hist: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds"),
        }
    }
}

/// What one driver thread counted.
#[derive(Clone)]
struct DriverStats {
    kinds: Vec<KindStats>,
    ceiling_ops: u64,
    ceiling_s: f64,
    soak_s: f64,
    verified: u64,
    corrupted: u64,
    lost: u64,
    /// Under capacity pressure: settled blocks reported missing (the lost definition).
    settled_misses: u64,
    checked_present: u64,
    misses_excused_by_drop: u64,
    load_no_space: u64,
    save_no_space: u64,
    busy: u64,
    unexpected: u64,
    examples: Vec<String>,
}

impl DriverStats {
    fn new() -> Self {
        DriverStats {
            kinds: KINDS.iter().map(|_| KindStats::new()).collect(),
            ceiling_ops: 0,
            ceiling_s: 0.0,
            soak_s: 0.0,
            verified: 0,
            corrupted: 0,
            lost: 0,
            settled_misses: 0,
            checked_present: 0,
            misses_excused_by_drop: 0,
            load_no_space: 0,
            save_no_space: 0,
            busy: 0,
            unexpected: 0,
            examples: Vec::new(),
        }
    }
    fn example(&mut self, s: String) {
        if self.examples.len() < 10 {
            self.examples.push(s);
        }
    }
    fn merge(&mut self, o: &DriverStats) {
        for (a, b) in self.kinds.iter_mut().zip(&o.kinds) {
            a.ops += b.ops;
            a.ok += b.ok;
            a.blocks += b.blocks;
            a.bytes += b.bytes;
            a.hist.add(&b.hist).expect("same bounds");
        }
        self.ceiling_ops += o.ceiling_ops;
        self.ceiling_s = self.ceiling_s.max(o.ceiling_s);
        self.soak_s = self.soak_s.max(o.soak_s);
        self.verified += o.verified;
        self.corrupted += o.corrupted;
        self.lost += o.lost;
        self.settled_misses += o.settled_misses;
        self.checked_present += o.checked_present;
        self.misses_excused_by_drop += o.misses_excused_by_drop;
        self.load_no_space += o.load_no_space;
        self.save_no_space += o.save_no_space;
        self.busy += o.busy;
        self.unexpected += o.unexpected;
        for e in &o.examples {
            self.example(e.clone());
        }
    }
}

/// Counters the progress/RSS sampler reads while the drivers run.
#[derive(Default)]
struct Live {
    ops: AtomicU64,
    verified: AtomicU64,
    bad: AtomicU64,
    stop: AtomicBool,
}

struct Driver<'a> {
    universe: &'a Universe,
    sessions: Vec<EngineSession>,
    qps: Vec<DriverQp>,
    region_bytes: usize,
    chain: u32,
    op_timeout: Duration,
    /// Misses are expected (evictions) and bounded at the end, not failures each.
    pressure: bool,
    stats: DriverStats,
    live: &'a Live,
    scratch: Vec<u8>,
    ops_buf: Vec<kvp_block_op>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ceiling,
    Mixed,
}

impl Driver<'_> {
    /// Run one phase until `duration` has passed, then drain every queue pair.
    fn run_phase(&mut self, phase: Phase, duration: Duration) -> f64 {
        let t0 = Instant::now();
        let deadline = t0 + duration;
        let mut cqes = [kvp_cqe::zeroed(); 4];
        let mut done: Vec<(usize, kvp_cqe, Instant)> = Vec::new();
        loop {
            let running = Instant::now() < deadline && !self.live.stop.load(Ordering::Relaxed);
            let mut outstanding = false;
            if running {
                for q in 0..self.qps.len() {
                    if self.qps[q].inflight.is_none() {
                        self.submit(q, phase);
                    }
                }
            }
            // Completions of every queue pair, timestamped as they are seen.
            done.clear();
            for q in 0..self.qps.len() {
                if self.qps[q].inflight.is_none() {
                    continue;
                }
                outstanding = true;
                match self.qps[q].qp.poll(&mut cqes) {
                    Ok(n) => {
                        let now = Instant::now();
                        done.extend(cqes[..n].iter().map(|c| (q, *c, now)));
                    }
                    Err(e) => self.fatal(q, format!("poll: {e}")),
                }
            }
            if !running && !outstanding {
                break;
            }
            if done.is_empty() && outstanding {
                // Nothing ready: sleep on the queue pair waiting longest (the daemon serves
                // sessions roughly in order, so it completes first).
                let oldest = (0..self.qps.len())
                    .filter_map(|q| self.qps[q].inflight.as_ref().map(|f| (f.submitted, q)))
                    .min();
                if let Some((since, q)) = oldest
                    && since.elapsed() > self.op_timeout
                {
                    // A daemon that stops answering must fail the run, not hang it.
                    let ms = self.op_timeout.as_millis();
                    self.fatal(q, format!("no completion within {ms} ms"));
                } else if let Some((_, q)) = oldest {
                    match self.qps[q].qp.wait(&mut cqes, Duration::from_millis(2)) {
                        Ok(n) => {
                            let now = Instant::now();
                            done.extend(cqes[..n].iter().map(|c| (q, *c, now)));
                        }
                        Err(ShmError::Timeout { .. }) => {}
                        Err(e) => self.fatal(q, format!("wait: {e}")),
                    }
                }
            }
            for &(q, c, at) in &done {
                self.complete(q, c, at);
            }
        }
        t0.elapsed().as_secs_f64()
    }

    fn fatal(&mut self, q: usize, what: String) {
        self.stats.unexpected += 1;
        self.live.bad.fetch_add(1, Ordering::Relaxed);
        let (session, qp) = self.qps[q].label;
        self.stats
            .example(format!("session {session} queue pair {qp}: {what}"));
        // The queue pair is unusable: forget its op and stop everyone.
        self.qps[q].inflight = None;
        self.live.stop.store(true, Ordering::Relaxed);
    }

    fn submit(&mut self, q: usize, phase: Phase) {
        if let Err(e) = self.try_submit(q, phase) {
            self.fatal(q, e);
        }
    }

    /// Choose, prepare and submit the next op of queue pair `q`.
    fn try_submit(&mut self, q: usize, phase: Phase) -> Result<(), String> {
        let Driver {
            universe: u,
            sessions,
            qps,
            region_bytes,
            chain,
            scratch,
            ops_buf,
            ..
        } = self;
        let (u, chain, region_bytes) = (*u, *chain, *region_bytes);
        let qp = &mut qps[q];
        let user_data = qp.next_user_data;
        qp.next_user_data += 1;
        if phase == Phase::Ceiling {
            qp.inflight = Some(InFlight {
                kind: OpKind::Nop,
                user_data,
                submitted: Instant::now(),
                ns_global: 0,
                seq: 0,
                first: 0,
                len: 0,
                snaps: Vec::new(),
            });
            return match qp.qp.submit(&[client::sqe(Opcode::Nop, user_data)]) {
                Ok(1) => Ok(()),
                Ok(_) => Err("submit NOP: an idle submission ring is full".into()),
                Err(e) => Err(format!("submit NOP: {e}")),
            };
        }
        let sess = &sessions[qp.session];
        let ns_slot = qp.rng.below(sess.namespaces.len() as u64) as u32;
        let ns = sess.namespaces[ns_slot as usize];
        // Skewed reuse: 80 % of picks from the hottest 20 % of chains.
        let Pick {
            seq,
            roll,
            len,
            flags_roll,
            drop_from,
        } = Pick::draw(&mut qp.rng, u.sequences, chain);
        let mut kind = match roll {
            0..30 => OpKind::Save,
            30..65 => OpKind::Load,
            65..95 => OpKind::Lookup,
            _ => OpKind::Drop,
        };
        // Leading settled run (what a LOOKUP/LOAD must find).
        let mut snaps = Vec::with_capacity(chain as usize);
        if matches!(kind, OpKind::Load | OpKind::Lookup) {
            for j in 0..len {
                match u.states[u.index(ns, seq, j)].settled() {
                    Some(e) => snaps.push(e),
                    None => break,
                }
            }
            // An engine loads what it knows is there; with nothing, it saves first.
            if kind == OpKind::Load && snaps.is_empty() {
                kind = OpKind::Save;
            }
        }
        let (first, count) = match kind {
            OpKind::Drop => (drop_from, chain - drop_from),
            OpKind::Load => (0, snaps.len() as u32),
            _ => (0, len),
        };
        ops_buf.clear();
        for j in first..first + count {
            let idx = u.index(ns, seq, j);
            let parent = if j == 0 { 0 } else { u.hashes[idx - 1] };
            ops_buf.push(kvp_block_op::new(
                u.hashes[idx],
                parent,
                qp.first_page + (j - first),
            ));
        }
        let words = (region_bytes / 8) as u64;
        let mut flags = 0u16;
        match kind {
            OpKind::Save => {
                snaps.clear();
                for (j, o) in (first..).zip(ops_buf.iter()) {
                    let key = pattern_key(ns, o.hash);
                    for (r, off) in sess.regions(o.engine_block).enumerate() {
                        fill_pattern(key, r as u64 * words, scratch);
                        sess.kv
                            .write_bytes(off, scratch)
                            .map_err(|e| format!("fill page: {e}"))?;
                    }
                    snaps.push(u.states[u.index(ns, seq, j)].save_begin());
                }
                if flags_roll < 10 {
                    flags |= ffi::SQE_F_WRITE_THROUGH;
                } else if flags_roll < 20 {
                    flags |= ffi::SQE_F_HIGH_PRIORITY;
                }
            }
            OpKind::Load => {
                // Poison the target pages so a load that writes nothing cannot pass.
                scratch.fill(0xA5);
                for o in ops_buf.iter() {
                    for off in sess.regions(o.engine_block) {
                        sess.kv
                            .write_bytes(off, scratch)
                            .map_err(|e| format!("poison page: {e}"))?;
                    }
                }
                if flags_roll < 20 {
                    flags |= ffi::SQE_F_PREFIX_ONLY;
                }
            }
            OpKind::Drop => {
                for j in first..first + count {
                    u.states[u.index(ns, seq, j)].drop_begin();
                }
            }
            OpKind::Lookup | OpKind::Nop => {}
        }
        let opcode = match kind {
            OpKind::Save => Opcode::Save,
            OpKind::Load => Opcode::Load,
            OpKind::Lookup => Opcode::Lookup,
            OpKind::Drop => Opcode::Drop,
            OpKind::Nop => Opcode::Nop,
        };
        let mut s = client::sqe(opcode, user_data);
        s.flags = flags;
        s.namespace_id = ns_slot;
        s.count = count;
        s.arg_len = (count as usize * std::mem::size_of::<kvp_block_op>()) as u32;
        s.arg_offset = 0;
        // In flight from here on, so a failed submit still undoes the block states.
        qp.inflight = Some(InFlight {
            kind,
            user_data,
            submitted: Instant::now(),
            ns_global: ns,
            seq,
            first,
            len: count,
            snaps,
        });
        qp.qp
            .write_block_ops(0, ops_buf)
            .map_err(|e| format!("{} arguments: {e}", kind.name()))?;
        if let Some(f) = qp.inflight.as_mut() {
            f.submitted = Instant::now();
        }
        match qp.qp.submit(&[s]) {
            Ok(1) => Ok(()),
            Ok(_) => Err(format!(
                "submit {}: an idle submission ring is full",
                kind.name()
            )),
            Err(e) => Err(format!("submit {}: {e}", kind.name())),
        }
    }

    fn complete(&mut self, q: usize, c: kvp_cqe, at: Instant) {
        let Some(f) = self.qps[q].inflight.take() else {
            self.fatal(
                q,
                format!("completion {} with nothing in flight", c.user_data),
            );
            return;
        };
        if c.user_data != f.user_data {
            self.fatal(
                q,
                format!(
                    "completion for {} while {} was in flight",
                    c.user_data, f.user_data
                ),
            );
            return;
        }
        let latency_ns = at.saturating_duration_since(f.submitted).as_nanos() as u64;
        let ok = c.status == Status::Ok.raw();
        {
            let st = &mut self.stats.kinds[f.kind.index()];
            st.ops += 1;
            let _ = st.hist.record(latency_ns.max(1));
            if ok {
                st.ok += 1;
            }
        }
        if f.kind == OpKind::Nop {
            self.stats.ceiling_ops += 1;
            if !ok {
                self.unexpected(q, &f, &c);
            }
            return;
        }
        self.live.ops.fetch_add(1, Ordering::Relaxed);
        let u = self.universe;
        let status = Status::from_raw(c.status);
        match f.kind {
            OpKind::Save => {
                for (j, before) in (f.first..).zip(&f.snaps) {
                    u.states[u.index(f.ns_global, f.seq, j)].save_end(*before, ok);
                }
                if ok {
                    self.add_blocks(f.kind, c.blocks, c.bytes);
                } else if status == Some(Status::Busy) {
                    self.stats.busy += 1;
                } else if status == Some(Status::NoSpace) {
                    // Every slot leased or being written: bounded, not a loss.
                    self.stats.save_no_space += 1;
                } else {
                    self.unexpected(q, &f, &c);
                }
            }
            OpKind::Drop => {
                for j in f.first..f.first + f.len {
                    u.states[u.index(f.ns_global, f.seq, j)].drop_end();
                }
                if ok {
                    self.add_blocks(f.kind, c.blocks, 0);
                } else {
                    self.unexpected(q, &f, &c);
                }
            }
            OpKind::Lookup => {
                if !ok {
                    self.unexpected(q, &f, &c);
                    return;
                }
                self.add_blocks(f.kind, c.blocks, 0);
                self.check_present(&f, c.blocks);
            }
            OpKind::Load => {
                let loaded = c.blocks.min(f.len);
                self.add_blocks(f.kind, loaded, c.bytes);
                self.verify(q, &f, loaded);
                // A PREFIX_ONLY load completes OK however it stopped; the reason is the
                // per-block status of the first block not loaded.
                let why = if ok && loaded < f.len {
                    self.ops_buf.resize(f.len as usize, kvp_block_op::zeroed());
                    match self.qps[q].qp.read_block_ops(0, &mut self.ops_buf) {
                        Ok(()) => match self.ops_buf[loaded as usize].status {
                            0 => Some(Status::NotFound),
                            s => Status::from_raw(i32::from(s)),
                        },
                        Err(e) => {
                            self.fatal(q, format!("read back LOAD ops: {e}"));
                            return;
                        }
                    }
                } else {
                    status
                };
                match why {
                    Some(Status::Ok) | Some(Status::NotFound) => self.check_present(&f, loaded),
                    // No host slot to stage into (everything leased or in use): not a loss.
                    Some(Status::NoSpace) => self.stats.load_no_space += 1,
                    // Another load was staging the same block from NVMe: retry, not a loss.
                    Some(Status::Busy) => self.stats.busy += 1,
                    Some(Status::Corrupt) => {
                        self.stats.corrupted += 1;
                        self.live.bad.fetch_add(1, Ordering::Relaxed);
                        self.stats.example(format!(
                            "LOAD ns {} seq {}: daemon reported CORRUPT at block {}",
                            f.ns_global, f.seq, loaded
                        ));
                    }
                    _ => {
                        // Report the per-block reason of a PREFIX_ONLY load, not its OK.
                        let mut c = c;
                        if let Some(w) = why {
                            c.status = w.raw();
                        }
                        self.unexpected(q, &f, &c)
                    }
                }
            }
            OpKind::Nop => {}
        }
    }

    fn add_blocks(&mut self, kind: OpKind, blocks: u32, bytes: u64) {
        let st = &mut self.stats.kinds[kind.index()];
        st.blocks += u64::from(blocks);
        st.bytes += bytes;
    }

    /// The leading `present` blocks were found; every settled block after them that saw
    /// no DROP since the submission is lost.
    fn check_present(&mut self, f: &InFlight, present: u32) {
        let u = self.universe;
        let expect = f.snaps.len() as u32;
        self.stats.checked_present += u64::from(expect.min(present));
        if present >= expect {
            return;
        }
        let j = present;
        let state = &u.states[u.index(f.ns_global, f.seq, j)];
        if state.epoch() == f.snaps[j as usize] && self.pressure {
            self.stats.settled_misses += 1;
            state.forget(f.snaps[j as usize]);
        } else if state.epoch() == f.snaps[j as usize] {
            self.stats.lost += 1;
            self.live.bad.fetch_add(1, Ordering::Relaxed);
            self.stats.example(format!(
                "{} ns {} seq {} block {} (hash {:#x}): settled but missing",
                f.kind.name(),
                f.ns_global,
                f.seq,
                j,
                u.hashes[u.index(f.ns_global, f.seq, j)]
            ));
        } else {
            self.stats.misses_excused_by_drop += 1;
        }
    }

    /// Every byte of the first `loaded` pages against the pattern.
    fn verify(&mut self, q: usize, f: &InFlight, loaded: u32) {
        let u = self.universe;
        let sess = &self.sessions[self.qps[q].session];
        let words = (self.region_bytes / 8) as u64;
        for j in 0..loaded {
            let hash = u.hashes[u.index(f.ns_global, f.seq, f.first + j)];
            let key = pattern_key(f.ns_global, hash);
            let page = self.qps[q].first_page + j;
            let mut bad = None;
            for (r, off) in sess.regions(page).enumerate() {
                if let Err(e) = sess.kv.read_bytes(off, &mut self.scratch) {
                    bad = Some(format!("read page: {e}"));
                    break;
                }
                if let Some(at) = check_pattern(key, r as u64 * words, &self.scratch) {
                    bad = Some(format!(
                        "byte {} of the block differs",
                        r * self.region_bytes + at
                    ));
                    break;
                }
            }
            match bad {
                None => {
                    self.stats.verified += 1;
                    self.live.verified.fetch_add(1, Ordering::Relaxed);
                }
                Some(why) => {
                    self.stats.corrupted += 1;
                    self.live.bad.fetch_add(1, Ordering::Relaxed);
                    self.stats.example(format!(
                        "LOAD ns {} seq {} block {} (hash {hash:#x}): {why}",
                        f.ns_global,
                        f.seq,
                        f.first + j
                    ));
                }
            }
        }
    }

    fn unexpected(&mut self, q: usize, f: &InFlight, c: &kvp_cqe) {
        self.stats.unexpected += 1;
        self.live.bad.fetch_add(1, Ordering::Relaxed);
        let (session, qp) = self.qps[q].label;
        self.stats.example(format!(
            "session {session} queue pair {qp}: {} of {} blocks: status {} ({} done, detail {})",
            f.kind.name(),
            f.len,
            kvplane_daemon::dataplane::status_name(c.status),
            c.blocks,
            c.detail
        ));
    }
}

/// `VmRSS` and `RssAnon` of a process in KiB, from /proc/PID/status.
pub fn rss_kib(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("RssAnon:")?))
}

fn open_fds(pid: i32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

fn free_loopback_port() -> Option<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    l.local_addr().ok().map(|a| a.port())
}

/// The daemon config: a host tier holding `host_blocks`, an NVMe file holding the whole
/// working set with room to spare, every eviction from host demoted to NVMe. Under
/// capacity pressure the two tiers together hold half the working set (the host tier
/// its `host_share` of that half).
fn daemon_config(
    o: &SoakOptions,
    dir: &Path,
    uid: u32,
    metrics_port: Option<u16>,
) -> (Config, u64, u64) {
    let slot = kvplane_daemon::tier::nvme::slot_bytes(o.block_bytes) as u64;
    let ws = o.working_set_blocks();
    let (host_blocks, nvme_blocks) = if o.capacity_pressure {
        let tiers = ws / 2;
        let host = ((tiers as f64 * o.host_share).ceil() as u64).clamp(1, tiers - 1);
        (host, tiers - host)
    } else {
        // The whole working set, an eighth more and 64 slots spare: the NVMe tier never
        // has to evict, so nothing the soak saved may legitimately disappear.
        (
            ((ws as f64 * o.host_share).ceil() as u64).max(1),
            ws + ws / 8 + 64,
        )
    };
    let mut c = Config::default();
    c.serve.socket_path = dir.join("kvplane.sock");
    // The mix's sessions, the NOP probe, and room to spare.
    c.serve.max_sessions = o.sessions + 8;
    c.serve.max_queue_pairs = o.max_queue_pairs;
    c.blocks.block_bytes = o.block_bytes;
    // Every block evicted from the host tier is written to NVMe.
    c.blocks.nvme_admit_min_hits = 0;
    c.blocks.write_through = false;
    c.tiers.hbm.capacity_bytes = 0;
    // `host_blocks` blocks of the working set.
    c.tiers.host.capacity_bytes = host_blocks * slot;
    c.tiers.host.lock = false;
    c.tiers.host.hugepages = HugepageMode::Never;
    c.tiers.host.touch_threads = 0;
    // `nvme_blocks` slots: the whole working set fits, or, under capacity pressure, half
    // of it together with the host tier.
    c.tiers.nvme.paths = vec![dir.join("nvme0.slots")];
    c.tiers.nvme.capacity_bytes = nvme_blocks * slot;
    c.control.metrics_addr = metrics_port.map_or(String::new(), |p| format!("127.0.0.1:{p}"));
    c.namespaces = (0..o.namespaces)
        .map(|ns| NamespaceConfig::new(namespace_name(ns), vec![uid]))
        .collect();
    (c, host_blocks, nvme_blocks)
}

fn namespace_name(ns: u32) -> String {
    format!("soak-tenant-{ns}/model")
}

/// Attach session `index` with its KV buffer and layout.
fn attach(
    o: &SoakOptions,
    socket: &Path,
    index: usize,
) -> Result<(EngineSession, Vec<QueuePair>), SoakError> {
    let qps = 1 + index as u32 % o.max_queue_pairs;
    let pages = u64::from(qps) * u64::from(o.chain_blocks);
    let block = o.block_bytes as u64;
    let region = block / (LAYERS * PLANES) as u64;
    let bytes = pages * block;
    let err = |source| SoakError::Attach { index, source };
    let fd = sys::memfd_create_sealed("soak-kv", bytes)
        .map_err(|e| err(ShmError::io("memfd for the KV buffer", e)))?;
    let kv = Segment::map_fd(
        fd.try_clone()
            .map_err(|e| err(ShmError::io("dup KV memfd", e)))?,
        bytes,
    )
    .map_err(err)?;
    // Two namespaces per session (one when there is only one): neighbours overlap, so
    // every namespace is shared by several sessions.
    let mut namespaces = vec![index as u32 % o.namespaces];
    if o.namespaces > 1 {
        namespaces.push((index as u32 + 1) % o.namespaces);
    }
    let mut opts = AttachOptions::new(socket);
    opts.queue_pairs = qps;
    opts.sq_entries = 16;
    opts.cq_entries = 16;
    opts.arena_bytes = u64::from(qps) * 64 * 1024;
    opts.namespaces = namespaces.iter().map(|&n| namespace_name(n)).collect();
    opts.host_kv_buffer(fd, bytes);
    // Driver threads sleep on a queue pair only when all of theirs are idle: spin briefly.
    opts.wait.spin = Duration::from_micros(20);
    let mut session = Session::attach(opts).map_err(err)?;
    let mut qps_v = session.take_queue_pairs().map_err(err)?;
    let mut layout = kvp_kv_layout::zeroed();
    layout.num_layers = LAYERS as u32;
    layout.kv_planes = PLANES as u32;
    layout.page_tokens = TOKENS as u32;
    layout.kv_heads = HEADS as u32;
    layout.head_bytes = (region / (TOKENS * HEADS)) as u32;
    layout.dtype_bytes = 2;
    layout.num_pages = pages;
    layout.page_stride_bytes = region;
    layout.token_stride_bytes = HEADS * u64::from(layout.head_bytes);
    layout.head_stride_bytes = u64::from(layout.head_bytes);
    layout.buffer_bytes = bytes;
    let mut plane_offsets = [[0u64; LAYERS]; PLANES];
    for l in 0..LAYERS {
        for (p, row) in plane_offsets.iter_mut().enumerate() {
            row[l] = (l * PLANES + p) as u64 * pages * region;
            layout.plane_offset[p][l] = row[l];
        }
    }
    let qp0 = &mut qps_v[0];
    qp0.write_arena(0, ffi::as_bytes(&layout)).map_err(err)?;
    let mut s = client::sqe(Opcode::AttachLayout, u64::MAX);
    s.arg_len = std::mem::size_of::<kvp_kv_layout>() as u32;
    let c = qp0.call(s, Duration::from_secs(30)).map_err(err)?;
    if c.status != Status::Ok.raw() {
        return Err(SoakError::Layout {
            index,
            status: kvplane_daemon::dataplane::status_name(c.status),
        });
    }
    Ok((
        EngineSession {
            _session: session,
            kv,
            namespaces,
            page_stride: region,
            plane_offsets,
        },
        qps_v,
    ))
}

#[derive(Clone, Debug, Serialize)]
pub struct KindReport {
    pub ops: u64,
    pub ok: u64,
    pub ops_per_s: f64,
    /// Blocks named by successful ops (SAVE: stored or already present; LOAD: loaded;
    /// LOOKUP: leading hits; DROP: dropped).
    pub blocks: u64,
    /// Bytes moved (SAVE: stored; LOAD: loaded).
    pub bytes: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RssReport {
    /// One sample of the daemon's VmRSS per second of the mixed phase, KiB.
    pub samples_kib: Vec<u64>,
    pub first_kib: u64,
    pub last_kib: u64,
    pub max_kib: u64,
    /// The sample at 25 % of the run (warm-up done: pools touched, every path taken).
    pub at_25pct_kib: u64,
    /// last - at_25pct: the "flat" check (negative = shrank).
    pub growth_after_25pct_kib: i64,
    pub growth_after_25pct_pct: f64,
}

impl RssReport {
    fn from_samples(samples: Vec<u64>) -> RssReport {
        let first = samples.first().copied().unwrap_or(0);
        let last = samples.last().copied().unwrap_or(0);
        let at25 = samples.get(samples.len() / 4).copied().unwrap_or(first);
        let growth = last as i64 - at25 as i64;
        RssReport {
            first_kib: first,
            last_kib: last,
            max_kib: samples.iter().copied().max().unwrap_or(0),
            at_25pct_kib: at25,
            growth_after_25pct_kib: growth,
            growth_after_25pct_pct: if at25 > 0 {
                (growth as f64 / at25 as f64 * 1000.0).round() / 10.0
            } else {
                0.0
            },
            samples_kib: samples,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub bench: &'static str,
    pub backend: &'static str,
    pub seed: u64,
    pub sessions: u32,
    pub queue_pairs: u32,
    pub driver_threads: u32,
    pub namespaces: u32,
    pub block_bytes: usize,
    pub working_set_blocks: u64,
    pub host_capacity_blocks: u64,
    pub nvme_capacity_blocks: u64,
    pub mix: &'static str,
    pub seconds: f64,
    pub ceiling: CeilingReport,
    /// The same mix done in this process on the daemon library, no sessions.
    pub block_work: BlockWorkReport,
    pub nop_under_load: NopUnderLoadReport,
    pub ops: u64,
    pub ops_per_s: f64,
    /// ops_per_s / ceiling.ops_per_s.
    pub ratio_to_ceiling: f64,
    /// ops_per_s / block_work.ops_per_s.
    pub ratio_to_block_work: f64,
    /// Bytes saved + loaded per second.
    pub data_bytes_per_s: f64,
    pub by_op: BTreeMap<&'static str, KindReport>,
    pub blocks_verified: u64,
    pub blocks_corrupted: u64,
    pub blocks_lost: u64,
    pub lost_definition: &'static str,
    /// Tiers sized at half the working set.
    pub capacity_pressure: bool,
    /// Under capacity pressure: settled blocks reported missing (each un-settles the block
    /// until its next SAVE), bounded by the daemon's evictions.
    pub settled_misses: u64,
    /// SAVEs that completed NO_SPACE (no slot could be freed for them).
    pub save_no_space: u64,
    /// (LOAD NO_SPACE + SAVE NO_SPACE + BUSY) / (SAVEs + LOADs).
    pub excused_fraction: f64,
    /// The run fails above this.
    pub max_excused_fraction: f64,
    /// Settled blocks a LOOKUP or LOAD found present (the blocks the lost check covered).
    pub blocks_checked_present: u64,
    /// Misses of once-settled blocks a concurrent DROP explains (not losses).
    pub misses_excused_by_drop: u64,
    /// LOADs stopped with NO_SPACE because another session was staging the same block
    /// from NVMe at that moment (the daemon does not wait; the engine retries).
    pub load_no_space_transient: u64,
    pub busy: u64,
    pub unexpected_errors: u64,
    pub examples: Vec<String>,
    /// The daemon's VmRSS: its host pool, the engines' KV buffers it maps (shared, counted
    /// once touched) and its own heap.
    pub daemon_rss: RssReport,
    /// The daemon's RssAnon alone (heap, stacks): where a leak would show.
    pub daemon_rss_anon: RssReport,
    /// Open file descriptors of the daemon, sampled with the RSS (first, last, max).
    pub daemon_fds_first: u64,
    pub daemon_fds_last: u64,
    pub daemon_fds_max: u64,
    /// Removals the daemon counted without a lower-tier copy (reasons other than
    /// "demoted" and explicit "dropped"): must be 0 when the working set fits.
    pub daemon_removed_without_copy: Option<u64>,
    pub daemon_exit_clean: bool,
    /// The daemon's own /status at the end (tiers, removals, op latency, NVMe errors).
    pub daemon_status: Option<StatusReport>,
    pub passed: bool,
    pub failures: Vec<String>,
}

/// The mix's block work done in this process, no daemon (see the module docs).
#[derive(Clone, Debug, Serialize)]
pub struct BlockWorkReport {
    pub what: &'static str,
    pub threads: u32,
    pub seconds: f64,
    pub ops: u64,
    pub ops_per_s: f64,
    pub data_bytes_per_s: f64,
    pub blocks_verified: u64,
}

const BLOCK_WORK: &str = "the mix's op kinds, chains, flags, fill and byte-for-byte check, run by the driver threads in this process on the daemon library (block manager, host tier, mover, NVMe engine of the same config on a file of its own), no rings, sessions or data-plane threads; measured before the daemon starts, after as long again uncounted to fill the tiers";

/// Runs the mix's block work for `seconds` on `threads` threads straight on the daemon
/// library built from `cfg` (its NVMe tier moved to `nvme_path`), no daemon.
fn block_work(
    o: &SoakOptions,
    cfg: &Config,
    nvme_path: &Path,
    threads: usize,
    seconds: f64,
) -> Result<BlockWorkReport, SoakError> {
    use kvplane_daemon::block::{BlockManager, ManagerOptions};
    use kvplane_daemon::dataplane::transfer::LocalBlocks;
    let mut tiers = cfg.tiers.clone();
    tiers.nvme.paths = vec![nvme_path.to_path_buf()];
    let daemon_err = |reason: String| SoakError::Daemon {
        reason,
        log: nvme_path.to_path_buf(),
        tail: String::new(),
    };
    let manager = BlockManager::new(&cfg.blocks, &tiers, ManagerOptions::default())
        .map_err(|e| daemon_err(format!("block work: the daemon library: {e}")))?;
    let local = LocalBlocks::new(manager)
        .map_err(|e| daemon_err(format!("block work: the device: {e}")))?;
    let universe = Universe::new(o);
    let ids: Vec<u32> = (0..o.namespaces)
        .map(|ns| kvplane_daemon::dataplane::namespace_id(&namespace_name(ns)))
        .collect();
    // As long again before counting, so the tiers hold what a running mix finds in them
    // (LOADs of a cold start miss and cost nothing).
    let t0 = Instant::now() + Duration::from_secs_f64(seconds);
    let deadline = t0 + Duration::from_secs_f64(seconds);
    let totals = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (local, universe, ids) = (&local, &universe, &ids);
                scope.spawn(move || {
                    let mut rng = Rng(splitmix(o.seed ^ 0xB10C_0000 ^ t as u64));
                    let (mut ops, mut bytes, mut verified, mut bad) = (0u64, 0u64, 0u64, 0u64);
                    let mut chain_buf = Vec::with_capacity(o.chain_blocks as usize);
                    let mut tiers_buf = vec![None; o.chain_blocks as usize];
                    loop {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        if now < t0 {
                            (ops, bytes, verified) = (0, 0, 0);
                        }
                        let ns = rng.below(u64::from(o.namespaces)) as u32;
                        let Pick {
                            seq,
                            roll,
                            len,
                            flags_roll,
                            drop_from,
                        } = Pick::draw(&mut rng, universe.sequences, o.chain_blocks);
                        let first = universe.index(ns, seq, 0);
                        let hashes = &universe.hashes[first..first + o.chain_blocks as usize];
                        let id = ids[ns as usize];
                        match roll {
                            0..30 => {
                                chain_buf.clear();
                                chain_buf.extend(
                                    (0..len as usize)
                                        .map(|j| (hashes[j], (j > 0).then(|| hashes[j - 1]))),
                                );
                                let r = local.save_with(
                                    id,
                                    &chain_buf,
                                    u8::from((10..20).contains(&flags_roll)),
                                    flags_roll < 10,
                                    |i, buf: &mut [u8]| {
                                        fill_pattern(pattern_key(ns, hashes[i]), 0, buf);
                                        Ok::<(), std::io::Error>(())
                                    },
                                );
                                if let Ok(r) = r {
                                    bytes += r.stored as u64 * o.block_bytes as u64;
                                }
                            }
                            30..65 => {
                                let r = local.load_with(
                                    id,
                                    &hashes[..len as usize],
                                    |i, data: &[u8]| {
                                        if check_pattern(pattern_key(ns, hashes[i]), 0, data)
                                            .is_some()
                                        {
                                            bad += 1;
                                        }
                                        Ok::<(), std::io::Error>(())
                                    },
                                );
                                if let Ok(r) = r {
                                    bytes += r.bytes;
                                    verified += r.loaded as u64;
                                }
                            }
                            65..95 => {
                                local.blocks.lookup(
                                    id,
                                    &hashes[..len as usize],
                                    &mut tiers_buf[..len as usize],
                                );
                            }
                            _ => {
                                local.drop_blocks(id, &hashes[drop_from as usize..]);
                            }
                        }
                        ops += 1;
                    }
                    (ops, bytes, verified, bad)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or((0, 0, 0, 1)))
            .fold((0, 0, 0, 0), |a, b| {
                (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3)
            })
    });
    let elapsed = t0.elapsed().as_secs_f64();
    drop(local);
    let _ = std::fs::remove_file(nvme_path);
    let (ops, bytes, verified, bad) = totals;
    if bad > 0 {
        return Err(daemon_err(format!(
            "block work: {bad} blocks read back wrong from the daemon library"
        )));
    }
    Ok(BlockWorkReport {
        what: BLOCK_WORK,
        threads: threads as u32,
        seconds: (elapsed * 100.0).round() / 100.0,
        ops,
        ops_per_s: (ops as f64 / elapsed).round(),
        data_bytes_per_s: (bytes as f64 / elapsed).round(),
        blocks_verified: verified,
    })
}

/// NOP round trips of the probe session during the mixed phase.
#[derive(Clone, Debug, Serialize)]
pub struct NopUnderLoadReport {
    pub what: &'static str,
    pub ops: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CeilingReport {
    pub op: &'static str,
    pub what: &'static str,
    pub seconds: f64,
    pub ops: u64,
    pub ops_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

pub const LOST_DEFINITION: &str = "a block the daemon reports missing (LOOKUP: not among the leading hits; LOAD: NOT_FOUND) that was settled when the op was submitted (a SAVE of it completed OK with no DROP of it in flight or submitted since, and no SAVE or DROP of it in flight) and had no DROP submitted before the completion; the NVMe tier holds the whole working set, so no eviction may explain a miss";

pub const LOST_UNDER_PRESSURE: &str = "capacity pressure (tiers hold half the working set): a settled block the daemon reports missing counts as a miss by the same definition as without pressure, and un-settles the block until its next SAVE; misses beyond the daemon's own count of removals without a lower-tier copy (evictions) are lost";

const MIX: &str = "per op: 30% SAVE (1..=chain blocks; 10% write-through, 10% high priority), 35% LOAD of the leading settled blocks (20% PREFIX_ONLY; a SAVE when none is settled), 30% LOOKUP, 5% DROP of a chain suffix; 80% of picks from the hottest 20% of chains";

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    (h.value_at_quantile(q) as f64 / 100.0).round() / 10.0
}

/// Run the soak: start the daemon, attach, NOP ceiling, mixed phase, collect.
pub fn run(o: &SoakOptions) -> Result<SoakReport, SoakError> {
    o.check()?;
    std::fs::create_dir_all(&o.dir).map_err(io_err("creating", &o.dir))?;
    let work = tempfile::Builder::new()
        .prefix("kvplane-soak-")
        .tempdir_in(&o.dir)
        .map_err(io_err("creating a directory in", &o.dir))?;
    let dir = work.path();
    let uid = std::fs::metadata("/proc/self")
        .map_err(io_err("stat", Path::new("/proc/self")))?
        .uid();
    let port = free_loopback_port();
    let (cfg, host_blocks, nvme_blocks) = daemon_config(o, dir, uid, port);
    // The block work alone first, while nothing else runs (the ceiling phase's length).
    let threads = o.threads.min(o.sessions) as usize;
    let block_work = block_work(
        o,
        &cfg,
        &dir.join("block-work.slots"),
        threads,
        o.ceiling_seconds.max(1.0),
    )?;
    let mut daemon = ServeChild::start(
        &o.exe,
        &dir.join("kvplane.toml"),
        &dir.join("daemon.log"),
        &cfg,
        &dir.join("kvplane.sock"),
        Duration::from_secs(120),
    )?;
    let pid = daemon.pid();
    let socket = dir.join("kvplane.sock");
    // `/status` names sessions and namespaces: it is served on the control socket (next
    // to the engine socket), where this process, the daemon's own uid, sees everything.
    let control = crate::cli::status::Endpoint::Unix(
        kvplane_daemon::control::admin::default_socket_path(&socket),
    );
    let fetch_status = || crate::cli::status::fetch(&control, Duration::from_secs(5)).ok();
    if let Some(st) = fetch_status() {
        let cap = |name: &str| {
            st.tiers
                .iter()
                .find(|t| t.tier == name)
                .map_or(0, |t| t.capacity_blocks)
        };
        let (host, nvme) = (cap("host"), cap("nvme"));
        let ws = o.working_set_blocks();
        let wrong = if o.capacity_pressure {
            (host + nvme > ws / 2).then(|| {
                format!(
                    "tiers hold {host} + {nvme} blocks, more than half the {ws}-block working set"
                )
            })
        } else {
            (nvme < ws).then(|| {
                format!("NVMe tier holds {nvme} blocks, less than the {ws}-block working set")
            })
        };
        if let Some(reason) = wrong {
            return Err(SoakError::Daemon {
                reason,
                tail: daemon.tail(),
                log: daemon.log.clone(),
            });
        }
    }

    let universe = Universe::new(o);
    let live = Live::default();
    let region_bytes = o.block_bytes / (LAYERS * PLANES);
    let mut drivers: Vec<Driver> = (0..threads)
        .map(|_| Driver {
            universe: &universe,
            sessions: Vec::new(),
            qps: Vec::new(),
            region_bytes,
            chain: o.chain_blocks,
            op_timeout: o.op_timeout,
            pressure: o.capacity_pressure,
            stats: DriverStats::new(),
            live: &live,
            scratch: vec![0u8; region_bytes],
            ops_buf: Vec::with_capacity(o.chain_blocks as usize),
        })
        .collect();
    let mut total_qps = 0u32;
    for i in 0..o.sessions as usize {
        let (sess, qps) = attach(o, &socket, i)?;
        let d = &mut drivers[i % threads];
        let si = d.sessions.len();
        for qp in qps {
            let qi = qp.index();
            d.qps.push(DriverQp {
                qp,
                session: si,
                label: (i, qi),
                first_page: qi * o.chain_blocks,
                rng: Rng(splitmix(
                    o.seed ^ ((i as u64) << 20) ^ u64::from(qi).wrapping_mul(0xA24B_AED4),
                )),
                next_user_data: 1,
                inflight: None,
            });
            total_qps += 1;
        }
        d.sessions.push(sess);
    }

    // The NOP probe: its own session (one queue pair, no KV buffer), not one of the mix's.
    let mut probe_opts = AttachOptions::new(&socket);
    probe_opts.namespaces = vec![namespace_name(0)];
    probe_opts.sq_entries = 16;
    probe_opts.cq_entries = 16;
    let mut probe_session = Session::attach(probe_opts).map_err(|source| SoakError::Attach {
        index: o.sessions as usize,
        source,
    })?;
    let mut probe_qp = probe_session
        .take_queue_pairs()
        .map_err(|source| SoakError::Attach {
            index: o.sessions as usize,
            source,
        })?
        .remove(0);
    let probe_stop = AtomicBool::new(false);
    let probe_failed = AtomicU64::new(0);

    let barrier = Barrier::new(threads + 1);
    let ceiling = Duration::from_secs_f64(o.ceiling_seconds);
    let soak = Duration::from_secs_f64(o.seconds);
    let rss: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let mut rss_anon: Vec<u64> = Vec::new();
    let mut fds: Vec<u64> = Vec::new();
    let (stats, probe_hist): (Vec<DriverStats>, Histogram<u64>) = std::thread::scope(|scope| {
        let handles: Vec<_> = drivers
            .into_iter()
            .enumerate()
            .map(|(t, mut d)| {
                let barrier = &barrier;
                std::thread::Builder::new()
                    .name(format!("soak-driver-{t}"))
                    .spawn_scoped(scope, move || {
                        barrier.wait();
                        d.stats.ceiling_s = d.run_phase(Phase::Ceiling, ceiling);
                        barrier.wait();
                        d.stats.soak_s = d.run_phase(Phase::Mixed, soak);
                        d.stats
                    })
                    .expect("spawn a driver thread")
            })
            .collect();
        barrier.wait();
        barrier.wait();
        let (probe_stop, probe_failed, probe_qp) = (&probe_stop, &probe_failed, &mut probe_qp);
        let probe = std::thread::Builder::new()
            .name("soak-nop-probe".into())
            .spawn_scoped(scope, move || {
                let mut hist = KindStats::new().hist;
                let mut user_data = 1u64;
                while !probe_stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match probe_qp
                        .call(client::sqe(Opcode::Nop, user_data), Duration::from_secs(60))
                    {
                        Ok(c) if c.status == Status::Ok.raw() && c.user_data == user_data => {
                            let _ = hist.record((t.elapsed().as_nanos() as u64).max(1));
                        }
                        _ => {
                            probe_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    user_data += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                hist
            })
            .expect("spawn the NOP probe thread");
        // The mixed phase runs: sample the daemon's RSS every second.
        let t0 = Instant::now();
        let mut next = t0;
        let mut last_progress = t0;
        while handles.iter().any(|h| !h.is_finished()) {
            let now = Instant::now();
            if now >= next {
                if let Some((kib, anon_kib)) = rss_kib(pid) {
                    rss.lock().unwrap_or_else(|e| e.into_inner()).push(kib);
                    rss_anon.push(anon_kib);
                }
                fds.extend(open_fds(pid));
                while next <= now {
                    next += Duration::from_secs(1);
                }
                if o.progress && now.duration_since(last_progress) >= Duration::from_secs(10) {
                    last_progress = now;
                    let n = rss.lock().unwrap_or_else(|e| e.into_inner());
                    eprintln!(
                        "soak: {:>5.0} s  {:>10} ops  {:>10} blocks verified  {} bad  daemon RSS {} MiB",
                        now.duration_since(t0).as_secs_f64(),
                        live.ops.load(Ordering::Relaxed),
                        live.verified.load(Ordering::Relaxed),
                        live.bad.load(Ordering::Relaxed),
                        n.last().copied().unwrap_or(0) / 1024
                    );
                    let _ = std::io::stderr().flush();
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        probe_stop.store(true, Ordering::Relaxed);
        let probe_hist = probe.join().map_err(|_| SoakError::DriverPanic)?;
        let stats = handles
            .into_iter()
            .map(|h| h.join().map_err(|_| SoakError::DriverPanic))
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, SoakError>((stats, probe_hist))
    })?;
    drop((probe_qp, probe_session));
    let mut all = DriverStats::new();
    for s in &stats {
        all.merge(s);
    }
    let daemon_status = fetch_status();
    let daemon_alive = daemon.alive();
    // Sessions end with the drivers (dropped above); then the daemon shuts down cleanly.
    let daemon_exit_clean = daemon_alive && daemon.terminate(Duration::from_secs(30));

    let rss = RssReport::from_samples(rss.into_inner().unwrap_or_else(|e| e.into_inner()));
    let rss_anon = RssReport::from_samples(rss_anon);

    let soak_s = all.soak_s.max(1e-9);
    let mut by_op = BTreeMap::new();
    let mut ops = 0;
    let mut data_bytes = 0;
    for k in [OpKind::Save, OpKind::Load, OpKind::Lookup, OpKind::Drop] {
        let s = &all.kinds[k.index()];
        ops += s.ops;
        data_bytes += s.bytes;
        by_op.insert(
            k.name(),
            KindReport {
                ops: s.ops,
                ok: s.ok,
                ops_per_s: (s.ops as f64 / soak_s).round(),
                blocks: s.blocks,
                bytes: s.bytes,
                p50_us: us(&s.hist, 0.50),
                p99_us: us(&s.hist, 0.99),
                p999_us: us(&s.hist, 0.999),
                max_us: (s.hist.max() as f64 / 100.0).round() / 10.0,
            },
        );
    }
    let nop = &all.kinds[OpKind::Nop.index()];
    let ceiling_s = all.ceiling_s.max(1e-9);
    let ceiling = CeilingReport {
        op: "nop",
        what: "NOP round trips/s on the same sessions, queue pairs (one op in flight each) and driver threads, measured just before the mixed phase: the ring and dispatch with no block work",
        seconds: (all.ceiling_s * 100.0).round() / 100.0,
        ops: all.ceiling_ops,
        ops_per_s: (all.ceiling_ops as f64 / ceiling_s).round(),
        p50_us: us(&nop.hist, 0.50),
        p99_us: us(&nop.hist, 0.99),
    };
    let nop_under_load = NopUnderLoadReport {
        what: "NOP round trips of one more session (one at a time, 1 ms apart) during the mixed phase",
        ops: probe_hist.len(),
        p50_us: us(&probe_hist, 0.50),
        p99_us: us(&probe_hist, 0.99),
        p999_us: us(&probe_hist, 0.999),
        max_us: (probe_hist.max() as f64 / 100.0).round() / 10.0,
    };
    let ops_per_s = ops as f64 / soak_s;
    let removed_without_copy = daemon_status.as_ref().map(|st| {
        st.tiers
            .iter()
            .flat_map(|t| t.removed.iter())
            .filter(|(reason, _)| !matches!(reason.as_str(), "demoted" | "dropped"))
            .map(|(_, n)| *n)
            .sum::<u64>()
    });
    let mut failures = Vec::new();
    if all.corrupted > 0 {
        failures.push(format!("{} blocks corrupted", all.corrupted));
    }
    // Under pressure a miss is lost only beyond what the daemon's evictions explain.
    let lost = if o.capacity_pressure {
        match removed_without_copy {
            Some(evicted) => {
                if evicted == 0 {
                    failures.push(
                        "capacity pressure: the daemon evicted nothing, so the run was not under pressure"
                            .into(),
                    );
                }
                all.settled_misses.saturating_sub(evicted)
            }
            None => {
                failures.push(
                    "capacity pressure: no eviction count from the daemon's /status to bound the misses"
                        .into(),
                );
                all.settled_misses
            }
        }
    } else {
        all.lost
    };
    if lost > 0 {
        failures.push(format!("{lost} blocks lost"));
    }
    let saves_and_loads = all.kinds[OpKind::Save.index()].ops + all.kinds[OpKind::Load.index()].ops;
    let excused = all.load_no_space + all.save_no_space + all.busy;
    let excused_fraction = excused as f64 / saves_and_loads.max(1) as f64;
    if excused_fraction > o.max_excused_fraction {
        failures.push(format!(
            "{excused} of {saves_and_loads} SAVEs and LOADs excused as NO_SPACE or BUSY ({:.2} %), over the stated maximum of {:.2} %",
            excused_fraction * 100.0,
            o.max_excused_fraction * 100.0
        ));
    }
    let probe_failed = probe_failed.into_inner();
    if probe_failed > 0 {
        failures.push(format!("{probe_failed} NOPs of the probe session failed"));
    }
    if probe_hist.is_empty() {
        failures.push("the NOP probe completed no round trip during the mixed phase".into());
    }
    if all.unexpected > 0 {
        failures.push(format!("{} unexpected errors", all.unexpected));
    }
    if all.verified == 0 {
        failures.push("no block was verified".into());
    }
    if let Some(n) = removed_without_copy
        && n > 0
        && !o.capacity_pressure
    {
        failures.push(format!(
            "the daemon removed {n} blocks without a lower-tier copy"
        ));
    }
    if !daemon_alive {
        failures.push("the daemon died during the soak".into());
    } else if !daemon_exit_clean {
        failures.push("the daemon did not exit cleanly on SIGTERM".into());
    }
    Ok(SoakReport {
        bench: "soak",
        backend: "host",
        seed: o.seed,
        sessions: o.sessions,
        queue_pairs: total_qps,
        driver_threads: threads as u32,
        namespaces: o.namespaces,
        block_bytes: o.block_bytes,
        working_set_blocks: o.working_set_blocks(),
        host_capacity_blocks: host_blocks,
        nvme_capacity_blocks: nvme_blocks,
        mix: MIX,
        seconds: (soak_s * 100.0).round() / 100.0,
        ceiling,
        ratio_to_block_work: (ops_per_s / block_work.ops_per_s.max(1e-9) * 1000.0).round() / 1000.0,
        block_work,
        nop_under_load,
        ops,
        ops_per_s: ops_per_s.round(),
        ratio_to_ceiling: (ops_per_s / (all.ceiling_ops as f64 / ceiling_s).max(1e-9) * 1000.0)
            .round()
            / 1000.0,
        data_bytes_per_s: (data_bytes as f64 / soak_s).round(),
        by_op,
        blocks_verified: all.verified,
        blocks_corrupted: all.corrupted,
        blocks_lost: lost,
        lost_definition: if o.capacity_pressure {
            LOST_UNDER_PRESSURE
        } else {
            LOST_DEFINITION
        },
        capacity_pressure: o.capacity_pressure,
        settled_misses: all.settled_misses,
        save_no_space: all.save_no_space,
        excused_fraction,
        max_excused_fraction: o.max_excused_fraction,
        blocks_checked_present: all.checked_present,
        misses_excused_by_drop: all.misses_excused_by_drop,
        load_no_space_transient: all.load_no_space,
        busy: all.busy,
        unexpected_errors: all.unexpected,
        examples: all.examples,
        daemon_rss: rss,
        daemon_rss_anon: rss_anon,
        daemon_fds_first: fds.first().copied().unwrap_or(0),
        daemon_fds_last: fds.last().copied().unwrap_or(0),
        daemon_fds_max: fds.iter().copied().max().unwrap_or(0),
        daemon_removed_without_copy: removed_without_copy,
        daemon_exit_clean,
        daemon_status,
        passed: failures.is_empty(),
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_round_trips_and_catches_one_flipped_bit() {
        let key = pattern_key(2, 0xABCD);
        let mut buf = vec![0u8; 4096];
        fill_pattern(key, 512, &mut buf);
        assert_eq!(check_pattern(key, 512, &buf), None);
        // Same bytes checked as another region, block or namespace: caught.
        assert!(check_pattern(key, 0, &buf).is_some());
        assert!(check_pattern(pattern_key(2, 0xABCE), 512, &buf).is_some());
        assert!(check_pattern(pattern_key(3, 0xABCD), 512, &buf).is_some());
        buf[1234] ^= 0x10;
        assert_eq!(check_pattern(key, 512, &buf), Some(1234));
    }

    #[test]
    fn block_state_settles_only_without_a_racing_drop() {
        let b = BlockState(AtomicU64::new(0));
        assert_eq!(b.settled(), None);
        // A clean save settles the block.
        let before = b.save_begin();
        assert_eq!(b.settled(), None, "save in flight");
        b.save_end(before, true);
        let epoch = b.settled().expect("settled");
        // A drop submitted during a save: that save does not settle it.
        b.drop_begin();
        assert_eq!(b.settled(), None);
        assert_ne!(b.epoch(), epoch);
        let before = b.save_begin();
        b.drop_end();
        b.save_end(before, true);
        assert_eq!(b.settled(), None, "save began while a drop was in flight");
        // A drop submitted after a save began but before it completed.
        let before = b.save_begin();
        b.drop_begin();
        b.save_end(before, true);
        b.drop_end();
        assert_eq!(b.settled(), None);
        // A failed save settles nothing; a later clean one does.
        let before = b.save_begin();
        b.save_end(before, false);
        assert_eq!(b.settled(), None);
        let before = b.save_begin();
        b.save_end(before, true);
        assert!(b.settled().is_some());
    }

    #[test]
    fn config_fits_the_working_set_and_parses() {
        let o = SoakOptions {
            exe: PathBuf::from("kvplane"),
            sessions: 64,
            max_queue_pairs: 3,
            seconds: 1.0,
            ceiling_seconds: 1.0,
            seed: 1,
            namespaces: 4,
            threads: 2,
            block_bytes: 64 << 10,
            sequences: 256,
            chain_blocks: 8,
            host_share: 0.25,
            dir: PathBuf::from("/tmp"),
            op_timeout: Duration::from_secs(60),
            progress: false,
            capacity_pressure: false,
            max_excused_fraction: 0.01,
        };
        o.check().unwrap();
        let (c, host, nvme) = daemon_config(&o, Path::new("/tmp/x"), 1000, Some(9999));
        // What the daemon reads back is what was built, and it validates.
        let text = c.to_toml().unwrap();
        assert_eq!(Config::from_toml(&text, Path::new("soak.toml")).unwrap(), c);
        assert_eq!(c.namespaces.len(), 4);
        assert!(c.namespace_allowed(&namespace_name(3), 1000, 0));
        assert_eq!(host, 2048);
        assert!(nvme >= o.working_set_blocks());
        assert_eq!(c.blocks.nvme_admit_min_hits, 0);
        let u = Universe::new(&o);
        let mut distinct = u.hashes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), u.hashes.len(), "hashes are distinct");
        // Under capacity pressure both tiers together hold half the working set.
        let p = SoakOptions {
            capacity_pressure: true,
            ..o.clone()
        };
        p.check().unwrap();
        let (c, host, nvme) = daemon_config(&p, Path::new("/tmp/x"), 1000, None);
        Config::from_toml(&c.to_toml().unwrap(), Path::new("soak.toml")).unwrap();
        assert_eq!(host + nvme, p.working_set_blocks() / 2);
        assert_eq!(host, 1024);
    }

    #[test]
    fn a_reported_miss_unsettles_the_block_until_the_next_save() {
        let b = BlockState(AtomicU64::new(0));
        let before = b.save_begin();
        b.save_end(before, true);
        let epoch = b.settled().unwrap();
        b.forget(epoch);
        assert_eq!(b.settled(), None);
        let before = b.save_begin();
        b.save_end(before, true);
        assert_eq!(b.settled(), Some(epoch));
        // A miss seen for an older epoch (a DROP came between) changes nothing.
        b.drop_begin();
        b.drop_end();
        let before = b.save_begin();
        b.save_end(before, true);
        let newer = b.settled().unwrap();
        b.forget(epoch);
        assert_eq!(b.settled(), Some(newer));
    }
}
