//! `kvplane replay --engines`: a request trace through the KV router to simulated engines
//! (`kvplane engine-sim` processes) attached to real `kvplane serve` daemons, next to a
//! baseline without daemon tiers and with round-robin routing.
//!
//! Everything runs on one virtual clock owned by this driver: before each arrival it
//! advances every engine to the arrival time (each runs its passes under Dynamo's
//! mock-engine timing model and reports what happened), applies the engines' KV events to
//! the router's index, routes the request and hands it to the chosen engine. Ring
//! operations, copies and content checks are real; only the GPU's compute time is
//! modelled. So a 17-minute trace replays in a few minutes and TTFT does not depend on
//! how busy this machine is, except for the LOAD transfer times the daemons measure.
//!
//! KV state reaches the router as events: an engine reports pages stored in and evicted
//! from its pool (tier hbm) and pages the daemon confirmed on SAVE (tier host, credited to
//! every engine on that daemon, since they share its tiers).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command as Proc, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvplane_daemon::config::Config;
use kvplane_daemon::tier::host::HugepageMode;
use kvplane_ffi::{PerTier, Tier};
use kvplane_router::index::{Index, IndexConfig};
use kvplane_router::replay::TraceRequest;
use kvplane_router::route::{RouteConfig, Router, WorkerLoad};
use serde::Serialize;

use super::CliResult;
use super::replay_dynamo::{self, DynamoRow, DynamoSettings, TraceId};
use crate::bench::serve_child::{ServeChild, ServeChildError, log_tail};
use crate::engine_sim::cost::{LinkProfile, ModelGeometry, TransferCost};
use crate::engine_sim::engine::Offload;
use crate::engine_sim::pages::{KvGeometry, TRACE_BLOCK_TOKENS, page_hashes};
use crate::engine_sim::proto::{Command, Done, EngineStats, Event};

const NAMESPACE: &str = "replay";
/// Bytes in front of each block in a daemon slot (the slot header page).
const SLOT_HEADER_BYTES: u64 = kvplane_daemon::tier::SLOT_HEADER_BYTES as u64;

/// Engine settings the replay shares with Dynamo's mock engine (its defaults).
const MAX_BATCHED_TOKENS: u64 = 8192;
const MAX_RUNNING: usize = 256;

#[derive(Debug, Clone, clap::Args)]
pub struct EngineReplayArgs {
    /// Daemons the engines are spread over (engine i attaches to daemon i mod N).
    #[arg(long, default_value_t = 1)]
    pub daemons: usize,
    /// Speed factor on arrival times: 2 replays the trace twice as fast.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// KV pool pages (64-token blocks) per engine.
    #[arg(long, default_value_t = 16_384)]
    pub engine_pages: u32,
    /// Each daemon's host tier, in multiples of its engines' pools.
    #[arg(long, default_value_t = 4.0)]
    pub host_factor: f64,
    /// NVMe tier bytes per daemon, in a temporary file (0 disables the tier).
    #[arg(long, default_value_t = 2 << 30)]
    pub nvme_bytes: u64,
    /// When engines offer pages to the daemon.
    #[arg(long, value_enum, default_value_t = Offload::Eager)]
    pub offload: Offload,
    /// Directory for the temporary sockets, configs, logs and NVMe files.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Replay only the first N requests.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip the KV router without daemon tiers (run by default: it is the row that compares
    /// with Dynamo's KV router, and what the tiers add is measured against it).
    #[arg(long)]
    pub no_router_only: bool,
    /// Accepted for compatibility: the router-only run is on by default.
    #[arg(long, hide = true)]
    pub router_only: bool,
    /// Model whose KV the virtual clock charges: llama-3.1-8b (default, bf16: 128 KiB a
    /// token), llama-3.1-70b (320 KiB a token) or layers=L,kv_heads=H,head_dim=D,dtype_bytes=B.
    #[arg(long, default_value = "llama-3.1-8b")]
    pub model: String,
    /// Link model (measured bandwidths) the clock charges transfers at: `h200`
    /// (data/profiles/h200.json, figures from ../shared/GPU-NOTES.md) or a profile file.
    #[arg(long, default_value = "h200")]
    pub link: String,
    /// Also run NVIDIA Dynamo's replay (scripts/install-dynamo.sh installs it) on the same
    /// trace and settings, both router modes, and print its measured rows.
    #[arg(long)]
    pub with_dynamo: bool,
    /// Python of the Dynamo venv (default: $KVPLANE_DYNAMO_PYTHON, else the install
    /// script's venv).
    #[arg(long)]
    pub dynamo_python: Option<PathBuf>,
    /// With --with-dynamo: write the Dynamo runs (command, versions, trace hash, settings,
    /// raw reports) to this file, for data/reference/.
    #[arg(long, requires = "with_dynamo")]
    pub record_reference: Option<PathBuf>,
    /// Where recorded Dynamo runs are looked up (default: data/reference).
    #[arg(long)]
    pub reference_dir: Option<PathBuf>,
    /// How the KV router sees each engine's load: `tracked` (the requests it routed, until
    /// their first token for prefill and until they end for blocks, as Dynamo's router
    /// does) or `reported` (the engines' running requests and pool pages, plus its own
    /// recent decisions for a TTL).
    #[arg(long, value_enum, default_value_t = RouterLoad::Tracked)]
    pub router_load: RouterLoad,
    /// Skip the baseline (round-robin, no daemon tiers).
    #[arg(long)]
    pub no_baseline: bool,
    /// Write an SVG chart of TTFT percentiles per configuration.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Keep the work directory (daemon and engine logs) after the run.
    #[arg(long)]
    pub keep_work_dir: bool,
    /// Run on the wall clock instead of the virtual clock: arrivals are paced at
    /// `--speed` and every engine sleeps through its passes (the trace takes its
    /// duration divided by the speed).
    #[arg(long)]
    pub real_time: bool,
}

/// What `kvplane replay` passes in besides the engine flags.
#[derive(Debug, Clone)]
pub struct ReplayInput {
    pub trace_path: PathBuf,
    pub workers: usize,
    pub seed: u64,
    pub json: bool,
    pub route: RouteConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayEnginesError {
    #[error("--{flag}: {reason}")]
    BadFlag { flag: &'static str, reason: String },
    #[error("reading CSV trace {path} line {line}: {reason}")]
    Csv {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("daemon {index} did not come up: {source}")]
    Daemon {
        index: usize,
        #[source]
        source: ServeChildError,
    },
    #[error("engine {worker}: {reason}; log {log}:\n{tail}")]
    Engine {
        worker: usize,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("accounting: {0}")]
    Accounting(String),
    #[error(transparent)]
    Cost(#[from] crate::engine_sim::cost::CostError),
    #[error(transparent)]
    Dynamo(#[from] replay_dynamo::DynamoError),
}

type Result<T, E = ReplayEnginesError> = std::result::Result<T, E>;

/// Reads a trace: Mooncake JSONL, or CSV rows `arrival_ms,input_tokens,output_tokens`
/// (a header line is skipped). CSV requests carry no prefix information, so each gets
/// unique block ids (no request shares a prefix with another).
pub fn load_any_trace(
    path: &Path,
) -> Result<Vec<TraceRequest>, Box<dyn std::error::Error + Send + Sync>> {
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if !is_csv {
        return Ok(kvplane_router::replay::load_trace(path)?);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ReplayEnginesError::Io {
        what: "reading trace",
        path: path.into(),
        source,
    })?;
    let mut out = Vec::new();
    let mut next_id = 1u64 << 40;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let parsed: Option<Vec<f64>> = (fields.len() >= 3)
            .then(|| fields[..3].iter().map(|f| f.parse::<f64>().ok()).collect())
            .flatten();
        let Some(v) = parsed else {
            if out.is_empty() && i == 0 {
                continue; // header
            }
            return Err(ReplayEnginesError::Csv {
                path: path.into(),
                line: i + 1,
                reason: "expected arrival_ms,input_tokens,output_tokens".into(),
            }
            .into());
        };
        if v.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(ReplayEnginesError::Csv {
                path: path.into(),
                line: i + 1,
                reason: "values must be finite and non-negative".into(),
            }
            .into());
        }
        let input = v[1] as u64;
        let blocks = input.div_ceil(TRACE_BLOCK_TOKENS).max(1);
        let hash_ids = (0..blocks).map(|k| next_id + k).collect();
        next_id += blocks;
        out.push(TraceRequest {
            timestamp: v[0] as u64,
            input_length: input,
            output_length: v[2] as u64,
            hash_ids,
        });
    }
    if out.is_empty() {
        return Err(ReplayEnginesError::Csv {
            path: path.into(),
            line: 0,
            reason: "no requests".into(),
        }
        .into());
    }
    out.sort_by_key(|r| r.timestamp);
    Ok(out)
}

/// Where the KV router's load signal comes from (`--router-load`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RouterLoad {
    Tracked,
    Reported,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    KvRouter,
    RoundRobin,
}

#[derive(Clone, Copy, Debug)]
struct RunSpec {
    name: &'static str,
    routing: Routing,
    daemon_tiers: bool,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

fn summarize(mut v: Vec<f64>) -> Summary {
    if v.is_empty() {
        return Summary::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Summary {
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: at(0.50),
        p99: at(0.99),
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ByTier {
    pub engine: f64,
    pub host: f64,
    pub nvme: f64,
}

/// Virtual-clock transfer charges over all engines.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Charged {
    pub lookup_ms: f64,
    pub load_ms: f64,
    pub link_wait_ms: f64,
    pub nvme_ms: f64,
    pub save_ms: f64,
    pub evict_save_ms: f64,
    pub load_bytes: u64,
    pub save_bytes: u64,
    /// Pass time held up by transfers.
    pub stall_ms: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Throughput {
    /// Over the virtual makespan (first arrival to last completion).
    pub requests_per_s: f64,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub makespan_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub name: &'static str,
    pub routing: Routing,
    pub daemon_tiers: bool,
    pub requests: usize,
    pub finished: usize,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub computed_tokens: u64,
    pub prefix_reuse: f64,
    pub prefix_reuse_by_tier: ByTier,
    pub ttft_ms: Summary,
    pub e2e_ms: Summary,
    pub throughput: Throughput,
    pub preemptions: u64,
    pub content_mismatches: u64,
    pub ring_errors: u64,
    pub loaded_blocks: u64,
    pub saved_blocks: u64,
    /// Host copy time the daemons measured for the (small) pages, not charged.
    pub load_transfer_ms: f64,
    pub save_transfer_ms: f64,
    /// What the clock charged (declared geometry over the link model).
    pub charged: Charged,
    /// Sum over requests of their transfer wait before the first token / sum of TTFT.
    pub ttft_transfer_share: f64,
    /// Requests per worker.
    pub requests_per_worker: Vec<u64>,
    /// Max / mean over engines of requests routed and of modelled busy time.
    pub request_imbalance: f64,
    pub busy_imbalance: f64,
    pub wall_s: f64,
    /// Sum over engines of modelled pass time (the GPU time the run would take).
    pub engine_busy_s: f64,
    /// KV events received from the daemons' streams and applied to the router.
    pub daemon_events: u64,
}

/// A private directory removed on drop unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn new(base: Option<&Path>, keep: bool) -> Result<WorkDir> {
        let base = base.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = base.join(format!("kvplane-replay-{}-{stamp:x}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|source| ReplayEnginesError::Io {
            what: "creating work directory",
            path: path.clone(),
            source,
        })?;
        Ok(WorkDir { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The daemon config for a replay: block = one engine page, host tier sized in blocks.
pub fn daemon_config(
    socket: &Path,
    block_bytes: u64,
    host_blocks: u64,
    nvme: Option<(&Path, u64)>,
    events: Option<(std::net::SocketAddr, u64)>,
) -> Config {
    let slot = SLOT_HEADER_BYTES + block_bytes.div_ceil(4096) * 4096;
    let mut c = Config::default();
    c.serve.socket_path = socket.to_path_buf();
    c.serve.max_sessions = 256;
    c.blocks.block_bytes = block_bytes as usize;
    c.blocks.nvme_admit_min_hits = 1;
    c.tiers.hbm.capacity_bytes = 0;
    // `host_blocks` blocks (+ the slot header page each).
    c.tiers.host.capacity_bytes = host_blocks * slot;
    // A replay needs no pinned memory; locking would need CAP_IPC_LOCK for gigabytes.
    c.tiers.host.lock = false;
    c.tiers.host.hugepages = HugepageMode::Never;
    // Several daemons (and other runs) share the machine: no fixed metrics port, no
    // control socket.
    c.control.metrics_addr = String::new();
    c.control.socket_path = Some(PathBuf::new());
    // The daemon streams its tiers' KV events to the driver's router.
    if let Some((addr, worker)) = events {
        c.events.routers = vec![addr.to_string()];
        c.events.worker_id = worker;
    }
    if let Some((path, bytes)) = nvme {
        c.tiers.nvme.paths = vec![path.to_path_buf()];
        c.tiers.nvme.capacity_bytes = bytes;
    }
    c
}

struct EngineChild {
    worker: usize,
    daemon: Option<usize>,
    child: Child,
    stdin: std::io::BufWriter<ChildStdin>,
    /// Events from a thread that drains the engine's stdout continuously, so an engine
    /// never blocks on a full pipe while the driver waits (real-time mode).
    events: std::sync::mpsc::Receiver<Result<Event, String>>,
    log: PathBuf,
    load: WorkerLoad,
}

impl Drop for EngineChild {
    fn drop(&mut self) {
        // Closing stdin ends a healthy engine; a stuck one is killed.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl EngineChild {
    fn fail(&self, reason: impl Into<String>) -> ReplayEnginesError {
        ReplayEnginesError::Engine {
            worker: self.worker,
            reason: reason.into(),
            log: self.log.clone(),
            tail: log_tail(&self.log, 15),
        }
    }

    fn send(&mut self, cmd: &Command) -> Result<()> {
        let text = serde_json::to_string(cmd).map_err(|e| self.fail(e.to_string()))?;
        writeln!(self.stdin, "{text}").map_err(|e| self.fail(format!("write: {e}")))
    }

    fn flush(&mut self) -> Result<()> {
        self.stdin
            .flush()
            .map_err(|e| self.fail(format!("write: {e}")))
    }

    fn next_event(&mut self) -> Result<Event> {
        let ev = match self.events.recv() {
            Ok(Ok(ev)) => ev,
            Ok(Err(reason)) => return Err(self.fail(reason)),
            Err(_) => {
                let status = self.child.wait().ok();
                return Err(self.fail(format!("exited ({status:?})")));
            }
        };
        if let Event::Error { message } = &ev {
            return Err(self.fail(message.clone()));
        }
        Ok(ev)
    }
}

fn read_events(stdout: BufReader<ChildStdout>, tx: std::sync::mpsc::Sender<Result<Event, String>>) {
    for line in stdout.lines() {
        let msg = match line {
            Ok(l) => serde_json::from_str::<Event>(&l).map_err(|e| format!("bad event line: {e}")),
            Err(e) => Err(format!("read: {e}")),
        };
        let stop = msg.is_err();
        if tx.send(msg).is_err() || stop {
            return;
        }
    }
}

/// Worker id of daemon `d` in the event stream (far from the engines' 0..N).
const DAEMON_WORKER_BASE: u64 = 1 << 48;

/// The router's event listener for the daemons' streams (the wire protocol of
/// `kvplane_router::events`): their host and NVMe tier contents are credited to every
/// engine attached to that daemon, and their evictions withdrawn.
struct DaemonEvents {
    addr: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    applied: Arc<std::sync::atomic::AtomicU64>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl DaemonEvents {
    fn start(index: Arc<Index>, daemon_workers: Vec<Vec<usize>>) -> Result<DaemonEvents> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let io = |source| ReplayEnginesError::Io {
            what: "event listener",
            path: PathBuf::from("127.0.0.1:0"),
            source,
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        let stop = Arc::new(AtomicBool::new(false));
        let applied = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), applied.clone());
        let workers = Arc::new(daemon_workers);
        let accept = std::thread::Builder::new()
            .name("replay-events".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (index, workers, a) = (index.clone(), workers.clone(), a.clone());
                            let _ = stream.set_nonblocking(false);
                            let _ = std::thread::Builder::new()
                                .name("replay-events-conn".into())
                                .spawn(move || read_daemon_stream(stream, &index, &workers, &a));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .map_err(|source| ReplayEnginesError::Spawn {
                what: "event listener thread".into(),
                source,
            })?;
        Ok(DaemonEvents {
            addr,
            stop,
            applied,
            accept: Some(accept),
        })
    }
}

impl Drop for DaemonEvents {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Applies one daemon's frames until it disconnects (connection threads end with it).
fn read_daemon_stream(
    mut stream: std::net::TcpStream,
    index: &Index,
    daemon_workers: &[Vec<usize>],
    applied: &std::sync::atomic::AtomicU64,
) {
    use kvplane_router::events::{Frame, KvEvent, MAX_FRAME_BYTES, SnapshotBlock};
    use std::io::Read;
    let engines_of = |worker: u64| -> &[usize] {
        worker
            .checked_sub(DAEMON_WORKER_BASE)
            .and_then(|d| daemon_workers.get(d as usize))
            .map_or(&[], Vec::as_slice)
    };
    let daemon_tiers = |t: Option<Tier>| -> Vec<Tier> {
        match t {
            Some(Tier::Hbm) => Vec::new(),
            Some(t) => vec![t],
            None => vec![Tier::Host, Tier::Nvme],
        }
    };
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME_BYTES {
            return;
        }
        let mut body = vec![0u8; len];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let Ok(frame) = Frame::decode(&body) else {
            continue;
        };
        // A snapshot's blocks (either protocol) add to the index; nothing is cleared.
        let add = |worker: u64, namespace: &str, blocks: &[SnapshotBlock]| {
            for b in blocks {
                for t in [Tier::Host, Tier::Nvme] {
                    if b.tiers & t.bit() != 0 {
                        for &w in engines_of(worker) {
                            index.store(namespace, w as u64, t, b.parent, &[b.hash]);
                        }
                    }
                }
            }
        };
        match frame {
            Frame::Snapshot { workers } => {
                for ws in workers {
                    for ns in &ws.state.namespaces {
                        add(ws.state.worker, &ns.namespace, &ns.blocks);
                    }
                }
            }
            Frame::SnapshotBlocks {
                worker,
                namespace,
                blocks,
            } => add(worker, &namespace, &blocks),
            Frame::Event { worker, event, .. } => {
                match event {
                    KvEvent::Stored {
                        namespace,
                        parent,
                        hashes,
                        tier,
                    } => {
                        for t in daemon_tiers(Some(tier)) {
                            for &w in engines_of(worker) {
                                index.store(&namespace, w as u64, t, parent, &hashes);
                            }
                        }
                    }
                    KvEvent::Removed {
                        namespace,
                        hashes,
                        tier,
                    } => {
                        for t in daemon_tiers(tier) {
                            for &w in engines_of(worker) {
                                index.remove(&namespace, w as u64, Some(t), &hashes);
                            }
                        }
                    }
                    KvEvent::Cleared { .. } => {}
                }
                applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// Per-run state the events feed.
struct RunState {
    index: Arc<Index>,
    done: HashMap<u64, Done>,
    /// Workers of each daemon (for host-tier credit).
    daemon_workers: Vec<Vec<usize>>,
    duplicates: Vec<u64>,
    /// Requests routed to each worker.
    sent: Vec<u64>,
}

impl RunState {
    fn apply(&mut self, e: &EngineChild, ev: Event, router: &Router) {
        let w = e.worker as u64;
        match ev {
            Event::Stored { parent, hashes } => {
                self.index.store(NAMESPACE, w, Tier::Hbm, parent, &hashes);
            }
            Event::Removed { hashes } => {
                self.index.remove(NAMESPACE, w, Some(Tier::Hbm), &hashes);
            }
            Event::Offloaded { parent, hashes } => {
                if let Some(d) = e.daemon {
                    for &peer in &self.daemon_workers[d] {
                        self.index
                            .store(NAMESPACE, peer as u64, Tier::Host, parent, &hashes);
                    }
                }
            }
            Event::FirstToken { id } => router.prefill_done(id),
            Event::Done(d) => {
                router.finished(d.id);
                if self.done.insert(d.id, d.clone()).is_some() {
                    self.duplicates.push(d.id);
                }
            }
            Event::Ready { .. }
            | Event::Advanced { .. }
            | Event::Finished(_)
            | Event::Error { .. } => {}
        }
    }
}

struct RunContext<'a> {
    exe: PathBuf,
    trace: &'a [TraceRequest],
    input: &'a ReplayInput,
    args: &'a EngineReplayArgs,
    geometry: KvGeometry,
    /// `TransferCost` as JSON, for the engines' `--cost`.
    cost_json: String,
    progress: indicatif::MultiProgress,
    show_progress: bool,
}

fn run_one(ctx: &RunContext<'_>, spec: RunSpec) -> Result<RunReport> {
    let mut work = WorkDir::new(ctx.args.work_dir.as_deref(), ctx.args.keep_work_dir)?;
    let result = run_in(ctx, spec, &work);
    if result.is_err() {
        // The error names logs in it.
        work.keep = true;
    }
    result
}

fn run_in(ctx: &RunContext<'_>, spec: RunSpec, work: &WorkDir) -> Result<RunReport> {
    let t0 = Instant::now();
    let args = ctx.args;
    let n = ctx.input.workers;
    let daemons_n = if spec.daemon_tiers { args.daemons } else { 0 };
    let mut daemon_workers = vec![Vec::new(); daemons_n];
    for w in 0..n {
        if daemons_n > 0 {
            daemon_workers[w % daemons_n].push(w);
        }
    }
    let index = Arc::new(Index::new(IndexConfig {
        max_nodes_per_namespace: 1 << 22,
        ..IndexConfig::default()
    }));
    let daemon_events = if daemons_n > 0 {
        Some(DaemonEvents::start(index.clone(), daemon_workers.clone())?)
    } else {
        None
    };
    // Daemons first (engines attach to them).
    let mut daemons = Vec::new();
    let mut sockets = Vec::new();
    for (d, workers) in daemon_workers.iter().enumerate() {
        let socket = work.path.join(format!("d{d}.sock"));
        let host_blocks = (workers.len() as f64 * f64::from(args.engine_pages) * args.host_factor)
            .round()
            .max(1.0) as u64;
        let nvme_path = work.path.join(format!("d{d}-nvme.img"));
        let nvme = (args.nvme_bytes > 0).then_some((nvme_path.as_path(), args.nvme_bytes));
        let events = daemon_events
            .as_ref()
            .map(|e| (e.addr, DAEMON_WORKER_BASE + d as u64));
        let cfg = daemon_config(
            &socket,
            ctx.geometry.block_bytes(),
            host_blocks,
            nvme,
            events,
        );
        let daemon = ServeChild::start(
            &ctx.exe,
            &work.path.join(format!("daemon{d}.toml")),
            &work.path.join(format!("daemon{d}.log")),
            &cfg,
            &socket,
            Duration::from_secs(120),
        )
        .map_err(|source| ReplayEnginesError::Daemon { index: d, source })?;
        daemons.push(daemon);
        sockets.push(socket);
    }
    // Engines.
    let mut engines: Vec<EngineChild> = Vec::with_capacity(n);
    for w in 0..n {
        let log = work.path.join(format!("engine{w}.log"));
        let log_file = std::fs::File::create(&log).map_err(|source| ReplayEnginesError::Io {
            what: "creating engine log",
            path: log.clone(),
            source,
        })?;
        let daemon = (daemons_n > 0).then_some(w % daemons_n.max(1));
        let mut cmd = Proc::new(&ctx.exe);
        cmd.arg("engine-sim")
            .args(["--worker", &w.to_string()])
            .args(["--pages", &args.engine_pages.to_string()])
            .args(["--page-tokens", &ctx.geometry.page_tokens.to_string()])
            .args(["--layers", &ctx.geometry.layers.to_string()])
            .args(["--head-bytes", &ctx.geometry.head_bytes.to_string()])
            .args([
                "--offload",
                match args.offload {
                    Offload::Eager => "eager",
                    Offload::Evict => "evict",
                },
            ])
            .args(["--namespace", NAMESPACE])
            .args(["--max-batched-tokens", &MAX_BATCHED_TOKENS.to_string()])
            .args(["--max-running", &MAX_RUNNING.to_string()])
            .arg("--cost")
            .arg(&ctx.cost_json)
            .env("KVPLANE_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file);
        if let Some(d) = daemon {
            cmd.arg("--socket").arg(&sockets[d]);
        }
        if args.real_time {
            cmd.arg("--real-time");
        }
        let mut child = cmd.spawn().map_err(|source| ReplayEnginesError::Spawn {
            what: format!("engine {w}"),
            source,
        })?;
        let stdin = std::io::BufWriter::new(child.stdin.take().expect("piped"));
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("engine{w}-events"))
            .spawn(move || read_events(stdout, tx))
            .map_err(|source| ReplayEnginesError::Spawn {
                what: format!("reader thread of engine {w}"),
                source,
            })?;
        engines.push(EngineChild {
            worker: w,
            daemon,
            child,
            stdin,
            events,
            log,
            load: WorkerLoad {
                worker: w as u64,
                ..WorkerLoad::default()
            },
        });
    }
    for e in engines.iter_mut() {
        match e.next_event()? {
            Event::Ready { .. } => {}
            other => return Err(e.fail(format!("expected Ready, got {other:?}"))),
        }
    }
    let router = Router::new(index.clone(), ctx.input.route.clone(), ctx.input.seed);
    let mut state = RunState {
        index,
        done: HashMap::new(),
        daemon_workers,
        duplicates: Vec::new(),
        sent: vec![0; n],
    };
    let bar = if ctx.show_progress {
        let b = ctx
            .progress
            .add(indicatif::ProgressBar::new(ctx.trace.len() as u64));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} requests ({msg})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_prefix(spec.name);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let speed = args.speed;
    let pt = ctx.geometry.page_tokens;
    let epoch = Instant::now();
    let first_ts = ctx.trace.first().map_or(0, |r| r.timestamp);
    for (i, req) in ctx.trace.iter().enumerate() {
        let arrival = req.timestamp as f64 / speed;
        if args.real_time {
            let due = Duration::from_secs_f64(
                (req.timestamp.saturating_sub(first_ts)) as f64 / speed / 1000.0,
            );
            if let Some(wait) = due.checked_sub(epoch.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        for e in engines.iter_mut() {
            e.send(&Command::Advance { until_ms: arrival })?;
            e.flush()?;
        }
        for e in engines.iter_mut() {
            loop {
                match e.next_event()? {
                    Event::Advanced {
                        running,
                        waiting,
                        active_pages,
                        ..
                    } => {
                        e.load.active_requests = running + waiting;
                        e.load.decode_blocks = u64::from(active_pages);
                        break;
                    }
                    ev => state.apply(e, ev, &router),
                }
            }
        }
        let chosen = match spec.routing {
            Routing::RoundRobin => i % n,
            Routing::KvRouter => {
                let hashes = page_hashes(&req.hash_ids, req.input_length, pt);
                let loads: Vec<WorkerLoad> = engines.iter().map(|e| e.load).collect();
                let decision = match args.router_load {
                    RouterLoad::Tracked => {
                        router.route_request(i as u64, NAMESPACE, &hashes, &loads, arrival as u64)
                    }
                    RouterLoad::Reported => {
                        router.route(NAMESPACE, &hashes, &loads, arrival as u64)
                    }
                };
                decision.map_or(i % n, |d| d.worker as usize)
            }
        };
        state.sent[chosen] += 1;
        let e = &mut engines[chosen];
        e.send(&Command::Request {
            id: i as u64,
            arrival_ms: arrival,
            input_tokens: req.input_length,
            output_tokens: req.output_length,
            hash_ids: req.hash_ids.clone(),
        })?;
        bar.set_message(format!("{} done", state.done.len()));
        bar.inc(1);
    }
    let mut stats: Vec<EngineStats> = Vec::with_capacity(n);
    for e in engines.iter_mut() {
        e.send(&Command::Finish)?;
        e.flush()?;
    }
    for e in engines.iter_mut() {
        loop {
            match e.next_event()? {
                Event::Finished(s) => {
                    stats.push(s);
                    break;
                }
                ev => state.apply(e, ev, &router),
            }
        }
    }
    bar.finish_and_clear();
    for e in engines.iter_mut() {
        let _ = e.child.wait();
    }
    drop(engines);
    drop(daemons);
    let daemon_events_applied = daemon_events
        .as_ref()
        .map_or(0, |e| e.applied.load(std::sync::atomic::Ordering::Relaxed));
    drop(daemon_events);
    let mut r = report(ctx, spec, &state, &stats, t0.elapsed())?;
    r.daemon_events = daemon_events_applied;
    Ok(r)
}

fn report(
    ctx: &RunContext<'_>,
    spec: RunSpec,
    state: &RunState,
    stats: &[EngineStats],
    wall: Duration,
) -> Result<RunReport> {
    let trace = ctx.trace;
    if !state.duplicates.is_empty() {
        return Err(ReplayEnginesError::Accounting(format!(
            "requests finished twice: {:?}",
            &state.duplicates[..state.duplicates.len().min(10)]
        )));
    }
    if state.done.len() != trace.len() {
        return Err(ReplayEnginesError::Accounting(format!(
            "{} of {} requests finished",
            state.done.len(),
            trace.len()
        )));
    }
    let (mut input, mut cached, mut computed, mut out_tokens) =
        (0u64, PerTier::<u64>::default(), 0u64, 0u64);
    let mut ttft = Vec::with_capacity(trace.len());
    let mut e2e = Vec::with_capacity(trace.len());
    let mut transfer_ms = 0.0f64;
    let (mut first, mut last) = (f64::INFINITY, 0.0f64);
    for (i, req) in trace.iter().enumerate() {
        let d = state
            .done
            .get(&(i as u64))
            .ok_or_else(|| ReplayEnginesError::Accounting(format!("request {i} never finished")))?;
        let c = d.cached_engine + d.cached_host + d.cached_nvme;
        if c + d.computed != d.input_tokens || d.input_tokens != req.input_length.max(1) {
            return Err(ReplayEnginesError::Accounting(format!(
                "request {i}: cached {c} + computed {} != input {} (trace {})",
                d.computed, d.input_tokens, req.input_length
            )));
        }
        input += d.input_tokens;
        cached[Tier::Hbm] += d.cached_engine;
        cached[Tier::Host] += d.cached_host;
        cached[Tier::Nvme] += d.cached_nvme;
        computed += d.computed;
        out_tokens += d.output_tokens;
        ttft.push(d.first_token_ms - d.arrival_ms);
        transfer_ms += d.transfer_ms;
        e2e.push(d.done_ms - d.arrival_ms);
        first = first.min(d.arrival_ms);
        last = last.max(d.done_ms);
    }
    let total_cached: u64 = cached.values().sum();
    let frac = |x: u64| x as f64 / input.max(1) as f64;
    let makespan_s = ((last - first) / 1000.0).max(1e-9);
    let sum = |f: fn(&EngineStats) -> u64| stats.iter().map(f).sum::<u64>();
    let sumf = |f: fn(&EngineStats) -> f64| stats.iter().map(f).sum::<f64>();
    let ttft_total: f64 = ttft.iter().sum();
    Ok(RunReport {
        name: spec.name,
        routing: spec.routing,
        daemon_tiers: spec.daemon_tiers,
        requests: trace.len(),
        finished: state.done.len(),
        input_tokens: input,
        cached_tokens: total_cached,
        computed_tokens: computed,
        prefix_reuse: frac(total_cached),
        prefix_reuse_by_tier: ByTier {
            engine: frac(cached[Tier::Hbm]),
            host: frac(cached[Tier::Host]),
            nvme: frac(cached[Tier::Nvme]),
        },
        ttft_ms: summarize(ttft),
        e2e_ms: summarize(e2e),
        throughput: Throughput {
            requests_per_s: trace.len() as f64 / makespan_s,
            input_tokens_per_s: input as f64 / makespan_s,
            output_tokens_per_s: out_tokens as f64 / makespan_s,
            makespan_s,
        },
        preemptions: sum(|s| s.preemptions),
        content_mismatches: sum(|s| s.content_mismatches),
        ring_errors: sum(|s| s.ring_errors),
        loaded_blocks: sum(|s| s.loaded_blocks),
        saved_blocks: sum(|s| s.saved_blocks),
        load_transfer_ms: sum(|s| s.load_transfer_us) as f64 / 1000.0,
        save_transfer_ms: sum(|s| s.save_transfer_us) as f64 / 1000.0,
        charged: Charged {
            lookup_ms: sumf(|s| s.charged_lookup_ms),
            load_ms: sumf(|s| s.charged_load_ms),
            link_wait_ms: sumf(|s| s.charged_link_wait_ms),
            nvme_ms: sumf(|s| s.charged_nvme_ms),
            save_ms: sumf(|s| s.charged_save_ms),
            evict_save_ms: sumf(|s| s.charged_evict_save_ms),
            load_bytes: sum(|s| s.charged_load_bytes),
            save_bytes: sum(|s| s.charged_save_bytes),
            stall_ms: sumf(|s| s.stall_ms),
        },
        ttft_transfer_share: if ttft_total > 0.0 {
            transfer_ms / ttft_total
        } else {
            0.0
        },
        requests_per_worker: state.sent.clone(),
        request_imbalance: max_over_mean(&state.sent.iter().map(|&x| x as f64).collect::<Vec<_>>()),
        busy_imbalance: max_over_mean(&stats.iter().map(|s| s.busy_ms).collect::<Vec<_>>()),
        wall_s: wall.as_secs_f64(),
        engine_busy_s: stats.iter().map(|s| s.busy_ms).sum::<f64>() / 1000.0,
        daemon_events: 0,
    })
}

/// Max / mean (1 = perfectly even; 0 for no data).
fn max_over_mean(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    if mean > 0.0 {
        v.iter().copied().fold(0.0, f64::max) / mean
    } else {
        0.0
    }
}

/// Prefix reuse of one infinite shared cache at page granularity (with the last page
/// recomputed when a whole prompt is cached): the ceiling any placement can reach.
pub fn infinite_cache_reuse(trace: &[TraceRequest], page_tokens: u32) -> f64 {
    let pt = u64::from(page_tokens);
    let mut seen = std::collections::HashSet::new();
    let (mut cached, mut input) = (0u64, 0u64);
    for r in trace {
        let hashes = page_hashes(&r.hash_ids, r.input_length, page_tokens);
        let max = ((r.input_length.max(1) - 1) / pt) as usize;
        let hit = hashes.iter().take_while(|h| seen.contains(*h)).count();
        cached += hit.min(max) as u64 * pt;
        input += r.input_length.max(1);
        seen.extend(hashes);
    }
    cached as f64 / input.max(1) as f64
}

fn svg_plot(reports: &[RunReport], dynamo: &[DynamoRow], clock: &str) -> String {
    let (w, h, left, bottom, top) = (720.0, 360.0, 70.0, 60.0, 40.0);
    let max = reports.iter().map(|r| r.ttft_ms.p99).fold(1.0f64, f64::max) * 1.1;
    let plot_h = h - bottom - top;
    let group_w = (w - left - 20.0) / reports.len().max(1) as f64;
    let bar_w = group_w / 4.5;
    let colors = ["#4c78a8", "#f58518", "#e45756"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">TTFT per configuration (ms, {clock} clock)</text>\n",
        w / 2.0
    );
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let y = top + plot_h - plot_h * f64::from(k) / 4.0;
        s.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>\n",
            w - 20.0,
            left - 6.0,
            y + 4.0
        ));
    }
    // Dynamo's replay of the same trace, where measured (or recorded for it).
    for d in dynamo {
        let (label, v) = (format!("Dynamo {} p50", d.router_mode), d.ttft_p50_ms);
        if !(v.is_finite() && v <= max) {
            continue;
        }
        let y = top + plot_h - plot_h * v / max;
        s.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#555\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\" fill=\"#555\">{label} {v:.0} ms</text>\n",
            w - 20.0,
            w - 22.0,
            y - 3.0
        ));
    }
    for (g, r) in reports.iter().enumerate() {
        let x0 = left + group_w * g as f64 + group_w * 0.1;
        for (k, (label, v)) in [
            ("p50", r.ttft_ms.p50),
            ("mean", r.ttft_ms.mean),
            ("p99", r.ttft_ms.p99),
        ]
        .iter()
        .enumerate()
        {
            let bh = plot_h * v / max;
            let x = x0 + bar_w * k as f64 * 1.1;
            let y = top + plot_h - bh;
            s.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {label} {v:.1} ms</title></rect>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{v:.0}</text>\n",
                colors[k],
                r.name,
                x + bar_w / 2.0,
                y - 3.0
            ));
        }
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} (reuse {:.2})</text>\n",
            x0 + bar_w * 1.6,
            h - bottom + 18.0,
            r.name,
            r.prefix_reuse
        ));
    }
    for (k, label) in ["p50", "mean", "p99"].iter().enumerate() {
        let x = left + 10.0 + 70.0 * k as f64;
        s.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{label}</text>\n",
            h - 24.0,
            colors[k],
            x + 16.0,
            h - 14.0
        ));
    }
    s.push_str("</svg>\n");
    s
}

fn routing_name(r: Routing) -> &'static str {
    match r {
        Routing::KvRouter => "kv_router",
        Routing::RoundRobin => "round_robin",
    }
}

fn print_table(reports: &[RunReport], ceiling: f64, dynamo: &[DynamoRow]) {
    println!(
        "{:<12} {:<11} {:>5} {:>6} {:>6} {:>6} {:>6} {:>9} {:>8} {:>8} {:>6} {:>12} {:>8} {:>8}",
        "config",
        "routing",
        "tiers",
        "reuse",
        "engine",
        "host",
        "nvme",
        "ttft_mean",
        "ttft_p50",
        "ttft_p99",
        "xfer%",
        "prefill_tok",
        "e2e_p50",
        "e2e_p99"
    );
    for r in reports {
        println!(
            "{:<12} {:<11} {:>5} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>9.1} {:>8.1} {:>8.1} {:>6.2} {:>12} {:>8.1} {:>8.1}",
            r.name,
            routing_name(r.routing),
            if r.daemon_tiers { "yes" } else { "no" },
            r.prefix_reuse,
            r.prefix_reuse_by_tier.engine,
            r.prefix_reuse_by_tier.host,
            r.prefix_reuse_by_tier.nvme,
            r.ttft_ms.mean,
            r.ttft_ms.p50,
            r.ttft_ms.p99,
            100.0 * r.ttft_transfer_share,
            r.computed_tokens,
            r.e2e_ms.p50,
            r.e2e_ms.p99,
        );
    }
    println!(
        "{:<12} {:<11} {:>5} {:>6.3}   (one infinite shared cache)",
        "ceiling", "infinite", "-", ceiling
    );
    for d in dynamo {
        println!(
            "{:<12} {:<11} {:>5} {:>6.3} {:>6} {:>6} {:>6} {:>9.1} {:>8.1} {:>8.1} {:>6} {:>12} {:>8.1} {:>8.1}   (ai-dynamo replay, {})",
            "dynamo",
            d.router_mode,
            "no",
            d.prefix_reuse,
            "",
            "",
            "",
            d.ttft_mean_ms,
            d.ttft_p50_ms,
            d.ttft_p99_ms,
            "0.00",
            d.computed_tokens,
            d.e2e_p50_ms,
            d.e2e_p99_ms,
            d.label
        );
    }
    // Like with like: the router alone against Dynamo's KV router (neither has tiers),
    // then what the tiers add to the same router.
    let find = |n: &str| reports.iter().find(|r| r.name == n);
    let pct = |a: f64, b: f64| 100.0 * (a / b - 1.0);
    if let (Some(r), Some(d)) = (
        find("router_only"),
        dynamo.iter().find(|d| d.router_mode == "kv_router"),
    ) {
        println!(
            "router only vs Dynamo's KV router (no tiers either side): reuse {:.3} vs {:.3}, TTFT p50 {:.1} vs {:.1} ms ({:+.1} %), p99 {:.0} vs {:.0} ms, prefill tokens {} vs {} ({:+.1} %)",
            r.prefix_reuse,
            d.prefix_reuse,
            r.ttft_ms.p50,
            d.ttft_p50_ms,
            pct(r.ttft_ms.p50, d.ttft_p50_ms),
            r.ttft_ms.p99,
            d.ttft_p99_ms,
            r.computed_tokens,
            d.computed_tokens,
            pct(r.computed_tokens as f64, d.computed_tokens as f64),
        );
    }
    if let (Some(k), Some(r)) = (find("kvplane"), find("router_only")) {
        println!(
            "router + tiers vs router only (same router): reuse {:.3} vs {:.3}, TTFT p50 {:.1} vs {:.1} ms ({:+.1} %), p99 {:.0} vs {:.0} ms, prefill tokens {} vs {} ({:+.1} %); {:.2} % of TTFT was transfers",
            k.prefix_reuse,
            r.prefix_reuse,
            k.ttft_ms.p50,
            r.ttft_ms.p50,
            pct(k.ttft_ms.p50, r.ttft_ms.p50),
            k.ttft_ms.p99,
            r.ttft_ms.p99,
            k.computed_tokens,
            r.computed_tokens,
            pct(k.computed_tokens as f64, r.computed_tokens as f64),
            100.0 * k.ttft_transfer_share,
        );
    }
    if let (Some(m), Some(b)) = (find("kvplane"), find("baseline")) {
        println!(
            "{} computes {:.1} % fewer prefill tokens than the baseline ({} vs {}); engines busy {:.0} s vs {:.0} s ({:.1} % less)",
            m.name,
            100.0 * (1.0 - m.computed_tokens as f64 / b.computed_tokens.max(1) as f64),
            m.computed_tokens,
            b.computed_tokens,
            m.engine_busy_s,
            b.engine_busy_s,
            100.0 * (1.0 - m.engine_busy_s / b.engine_busy_s.max(1e-9))
        );
    }
    for r in reports {
        let c = &r.charged;
        println!(
            "{}: {} requests over a {:.0} s makespan ({:.1} s wall), imbalance (max/mean over engines) {:.3} in requests, {:.3} in busy time, preemptions {}, loads {} blocks ({:.1} GB declared: link {:.0} ms + waiting for saves {:.0} ms + NVMe {:.0} ms), lookups {:.0} ms, saves {} blocks ({:.1} GB declared, link {:.0} ms; {:.0} ms of it for evictions, which hold up the pass), passes held up {:.0} ms in all, content mismatches {}, ring errors {}",
            r.name,
            r.finished,
            r.throughput.makespan_s,
            r.wall_s,
            r.request_imbalance,
            r.busy_imbalance,
            r.preemptions,
            r.loaded_blocks,
            c.load_bytes as f64 / 1e9,
            c.load_ms,
            c.link_wait_ms,
            c.nvme_ms,
            c.lookup_ms,
            r.saved_blocks,
            c.save_bytes as f64 / 1e9,
            c.save_ms + c.evict_save_ms,
            c.evict_save_ms,
            c.stall_ms,
            r.content_mismatches,
            r.ring_errors
        );
    }
}

/// Runs the configurations and prints the comparison.
pub fn run(input: ReplayInput, args: EngineReplayArgs) -> CliResult {
    if input.workers == 0 {
        return Err(ReplayEnginesError::BadFlag {
            flag: "workers",
            reason: "must be at least 1".into(),
        }
        .into());
    }
    if !(args.speed.is_finite() && args.speed > 0.0) {
        return Err(ReplayEnginesError::BadFlag {
            flag: "speed",
            reason: format!("must be a positive number, got {}", args.speed),
        }
        .into());
    }
    if args.daemons == 0 || args.daemons > input.workers {
        return Err(ReplayEnginesError::BadFlag {
            flag: "daemons",
            reason: format!(
                "must be in 1..=workers ({}), got {}",
                input.workers, args.daemons
            ),
        }
        .into());
    }
    if !(args.host_factor.is_finite() && args.host_factor > 0.0) {
        return Err(ReplayEnginesError::BadFlag {
            flag: "host-factor",
            reason: format!("must be a positive number, got {}", args.host_factor),
        }
        .into());
    }
    let geometry = KvGeometry {
        num_pages: args.engine_pages,
        ..KvGeometry::default()
    };
    geometry
        .validate()
        .map_err(|reason| ReplayEnginesError::BadFlag {
            flag: "engine-pages",
            reason,
        })?;
    let is_csv = input
        .trace_path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if args.with_dynamo && is_csv {
        return Err(ReplayEnginesError::BadFlag {
            flag: "with-dynamo",
            reason: "Dynamo's replay reads Mooncake JSONL traces, not CSV".into(),
        }
        .into());
    }
    let model = ModelGeometry::parse(&args.model)?;
    let link = LinkProfile::parse(&args.link)?;
    let cost = TransferCost::new(&model, geometry.page_tokens, &link);
    let mut trace = load_any_trace(&input.trace_path)?;
    if let Some(limit) = args.limit {
        trace.truncate(limit.max(1));
    }
    // The trace as replayed, for Dynamo: its content hash, and a file to hand to Dynamo
    // (the original, or the first --limit lines of a JSONL trace).
    let trace_bytes =
        std::fs::read(&input.trace_path).map_err(|source| ReplayEnginesError::Io {
            what: "reading trace",
            path: input.trace_path.clone(),
            source,
        })?;
    let trace_file = input
        .trace_path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let (trace_id, replayed_bytes) = if args.limit.is_some() {
        let text = String::from_utf8_lossy(&trace_bytes);
        let mut cut: String = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(trace.len())
            .collect::<Vec<_>>()
            .join("\n");
        cut.push('\n');
        let id = TraceId::of_bytes(&trace_file, cut.as_bytes(), trace.len());
        (id, Some(cut))
    } else {
        (
            TraceId::of_bytes(&trace_file, &trace_bytes, trace.len()),
            None,
        )
    };
    let dynamo_settings = DynamoSettings {
        workers: input.workers,
        block_size: geometry.page_tokens,
        trace_block_size: TRACE_BLOCK_TOKENS,
        num_gpu_blocks: args.engine_pages,
        max_num_batched_tokens: MAX_BATCHED_TOKENS,
        max_num_seqs: MAX_RUNNING,
        arrival_speedup_ratio: args.speed,
        replay_mode: "offline".into(),
    };
    let exe = std::env::current_exe().map_err(|source| ReplayEnginesError::Io {
        what: "locating the kvplane binary",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let show_progress = !input.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let ctx = RunContext {
        exe,
        trace: &trace,
        input: &input,
        args: &args,
        geometry,
        cost_json: serde_json::to_string(&cost)?,
        progress: indicatif::MultiProgress::new(),
        show_progress,
    };
    let mut specs = vec![RunSpec {
        name: "kvplane",
        routing: Routing::KvRouter,
        daemon_tiers: true,
    }];
    if !args.no_router_only {
        specs.push(RunSpec {
            name: "router_only",
            routing: Routing::KvRouter,
            daemon_tiers: false,
        });
    }
    if !args.no_baseline {
        specs.push(RunSpec {
            name: "baseline",
            routing: Routing::RoundRobin,
            daemon_tiers: false,
        });
    }
    let mut reports = Vec::new();
    for spec in specs {
        reports.push(run_one(&ctx, spec)?);
    }
    let ceiling = infinite_cache_reuse(&trace, geometry.page_tokens);
    // Dynamo's figures: measured now, or recorded for exactly this trace and settings.
    let (dynamo, dynamo_source) = if args.with_dynamo {
        let mut work = WorkDir::new(args.work_dir.as_deref(), args.keep_work_dir)?;
        let trace_for_dynamo = match &replayed_bytes {
            Some(cut) => {
                let p = work.path.join(&trace_file);
                std::fs::write(&p, cut).map_err(|source| ReplayEnginesError::Io {
                    what: "writing the replayed part of the trace",
                    path: p.clone(),
                    source,
                })?;
                p
            }
            None => input.trace_path.clone(),
        };
        let python = replay_dynamo::dynamo_python(args.dynamo_python.as_deref());
        let measured = replay_dynamo::run_dynamo(
            &python,
            &trace_for_dynamo,
            trace_id.clone(),
            &dynamo_settings,
            &work.path,
        );
        let measured = match measured {
            Ok(m) => m,
            Err(e) => {
                work.keep = true;
                return Err(ReplayEnginesError::from(e).into());
            }
        };
        if let Some(path) = &args.record_reference {
            replay_dynamo::write_reference(path, &measured)?;
        }
        let source = format!(
            "ai-dynamo {} measured in this run",
            measured.versions["ai-dynamo"].as_str().unwrap_or("?")
        );
        (
            replay_dynamo::rows(&measured, "measured in this run"),
            source,
        )
    } else {
        match replay_dynamo::reference_dir(args.reference_dir.as_deref())
            .and_then(|dir| replay_dynamo::find_reference(&dir, &trace_id, &dynamo_settings))
        {
            Some((path, r)) => {
                let label = format!("recorded {}, not re-run", r.recorded);
                let source = format!(
                    "ai-dynamo {} {} ({})",
                    r.versions["ai-dynamo"].as_str().unwrap_or("?"),
                    label,
                    path.display()
                );
                (replay_dynamo::rows(&r, &label), source)
            }
            None => (
                Vec::new(),
                "none: no recorded Dynamo run matches this trace's hash and settings (--with-dynamo runs it)".to_owned(),
            ),
        }
    };
    if let Some(path) = &args.plot {
        std::fs::write(
            path,
            svg_plot(
                &reports,
                &dynamo,
                if args.real_time { "wall" } else { "virtual" },
            ),
        )
        .map_err(|source| ReplayEnginesError::Io {
            what: "writing plot",
            path: path.clone(),
            source,
        })?;
    }
    if input.json {
        let main = &reports[0];
        let mut obj = match serde_json::to_value(main)? {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        obj.insert(
            "trace".into(),
            input.trace_path.display().to_string().into(),
        );
        obj.insert("workers".into(), input.workers.into());
        obj.insert("daemons".into(), args.daemons.into());
        obj.insert("speed".into(), args.speed.into());
        obj.insert("engine_pages".into(), args.engine_pages.into());
        obj.insert("page_tokens".into(), geometry.page_tokens.into());
        obj.insert("block_bytes".into(), geometry.block_bytes().into());
        obj.insert("host_factor".into(), args.host_factor.into());
        obj.insert("nvme_bytes".into(), args.nvme_bytes.into());
        obj.insert(
            "clock".into(),
            if args.real_time { "wall" } else { "virtual" }.into(),
        );
        obj.insert("infinite_cache_prefix_reuse".into(), ceiling.into());
        obj.insert("trace_xxh3_128".into(), trace_id.xxh3_128.clone().into());
        obj.insert(
            "router_load".into(),
            serde_json::to_value(args.router_load)?,
        );
        obj.insert("route".into(), serde_json::to_value(&input.route)?);
        obj.insert("model".into(), serde_json::to_value(&model)?);
        obj.insert("bytes_per_token".into(), model.bytes_per_token().into());
        obj.insert("declared_page_bytes".into(), cost.page_bytes.into());
        obj.insert("link".into(), serde_json::to_value(&link)?);
        obj.insert("dynamo_source".into(), dynamo_source.clone().into());
        let mut dyn_obj = serde_json::Map::new();
        for d in &dynamo {
            dyn_obj.insert(d.router_mode.clone(), serde_json::to_value(d)?);
        }
        obj.insert("dynamo".into(), serde_json::Value::Object(dyn_obj));
        for r in &reports[1..] {
            obj.insert(r.name.into(), serde_json::to_value(r)?);
        }
        if let Some(b) = reports.iter().find(|r| r.name == "baseline") {
            obj.insert(
                "prefill_tokens_saved_vs_baseline".into(),
                (1.0 - main.computed_tokens as f64 / b.computed_tokens.max(1) as f64).into(),
            );
            obj.insert(
                "engine_busy_saved_vs_baseline".into(),
                (1.0 - main.engine_busy_s / b.engine_busy_s.max(1e-9)).into(),
            );
        }
        println!("{}", serde_json::Value::Object(obj));
    } else {
        println!(
            "trace {} ({} requests, xxh3-128 {}), {} engines on {} daemon(s), {} pages x {} tokens each, host tier {}x the pools, {} clock at speed {}",
            input.trace_path.display(),
            trace.len(),
            trace_id.xxh3_128,
            input.workers,
            args.daemons,
            args.engine_pages,
            geometry.page_tokens,
            args.host_factor,
            if args.real_time { "wall" } else { "virtual" },
            args.speed
        );
        println!(
            "model {}: {} layers x {} KV heads x {} dim x {} B x K,V = {} bytes per token ({:.1} MiB per {}-token page); the clock charges these bytes, the engines move {}-byte pages and check them byte for byte",
            model.name,
            model.layers,
            model.kv_heads,
            model.head_dim,
            model.dtype_bytes,
            model.bytes_per_token(),
            cost.page_bytes as f64 / f64::from(1u32 << 20),
            geometry.page_tokens,
            geometry.block_bytes()
        );
        println!(
            "link profile {}: load {} GB/s ({}); save {} GB/s ({}); NVMe read {} GB/s ({}); lookups: measured ring round trip",
            link.name,
            link.load_gbps,
            link.load_source,
            link.save_gbps,
            link.save_source,
            link.nvme_read_gbps,
            link.nvme_read_source
        );
        println!("Dynamo rows: {dynamo_source}");
        print_table(&reports, ceiling, &dynamo);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replay's reader of a daemon's event stream takes a chunked (protocol 2)
    /// snapshot's blocks, and a protocol-1 snapshot's, for every engine of that daemon.
    #[test]
    fn the_daemon_stream_reader_takes_both_snapshot_forms() {
        use kvplane_router::events::{
            Frame, NamespaceBlocks, SnapshotBlock, WorkerBlocks, WorkerSeq, WorkerSnapshot,
        };
        use std::io::Write;
        let block = |hash, parent| SnapshotBlock {
            hash,
            parent,
            tiers: Tier::Host.bit(),
        };
        let worker = DAEMON_WORKER_BASE;
        let frames = [
            Frame::SnapshotBegin {
                workers: vec![WorkerSeq { worker, seq: 0 }],
            },
            Frame::SnapshotBlocks {
                worker,
                namespace: NAMESPACE.into(),
                blocks: vec![block(1, None), block(2, Some(1))],
            },
            Frame::SnapshotEnd,
            Frame::Snapshot {
                workers: vec![WorkerSnapshot {
                    seq: 0,
                    state: WorkerBlocks {
                        worker,
                        namespaces: vec![NamespaceBlocks {
                            namespace: NAMESPACE.into(),
                            blocks: vec![block(3, Some(2))],
                        }],
                    },
                }],
            },
        ];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        for f in &frames {
            tx.write_all(&f.encode().unwrap()).unwrap();
        }
        drop(tx);
        let index = Index::new(IndexConfig::default());
        let applied = std::sync::atomic::AtomicU64::new(0);
        read_daemon_stream(rx, &index, &[vec![0, 1]], &applied);
        for engine in [0u64, 1] {
            for hash in [1, 2, 3] {
                assert!(
                    index
                        .with_tree(NAMESPACE, |t| t.holds(engine, hash, Some(Tier::Host)))
                        .unwrap_or(false),
                    "engine {engine} block {hash}"
                );
            }
        }
    }

    #[test]
    fn percentiles_and_ceiling() {
        let s = summarize((1..=100).map(f64::from).collect());
        assert_eq!(s.p50, 51.0);
        assert_eq!(s.p99, 99.0);
        assert!((s.mean - 50.5).abs() < 1e-9);
        assert_eq!(max_over_mean(&[1.0, 1.0, 4.0]), 2.0);
        assert_eq!(max_over_mean(&[]), 0.0);
        let r = |t, ids: &[u64]| TraceRequest {
            timestamp: t,
            input_length: ids.len() as u64 * 512,
            output_length: 1,
            hash_ids: ids.to_vec(),
        };
        // Second request shares all 8 pages of the first block; the whole prompt is
        // cached, so its last page is recomputed: 7 of 8 pages.
        let trace = vec![r(0, &[1]), r(1, &[1])];
        let c = infinite_cache_reuse(&trace, 64);
        assert!((c - 7.0 * 64.0 / 1024.0).abs() < 1e-12);
    }

    #[test]
    fn plot_has_a_bar_per_percentile_and_configuration() {
        let r = RunReport {
            name: "kvplane",
            routing: Routing::KvRouter,
            daemon_tiers: true,
            requests: 1,
            finished: 1,
            input_tokens: 10,
            cached_tokens: 5,
            computed_tokens: 5,
            prefix_reuse: 0.5,
            prefix_reuse_by_tier: ByTier::default(),
            ttft_ms: Summary {
                mean: 20.0,
                p50: 10.0,
                p99: 300.0,
            },
            e2e_ms: Summary::default(),
            throughput: Throughput::default(),
            preemptions: 0,
            content_mismatches: 0,
            ring_errors: 0,
            loaded_blocks: 0,
            saved_blocks: 0,
            load_transfer_ms: 0.0,
            save_transfer_ms: 0.0,
            charged: Charged::default(),
            ttft_transfer_share: 0.0,
            requests_per_worker: vec![1],
            request_imbalance: 1.0,
            busy_imbalance: 1.0,
            wall_s: 0.0,
            engine_busy_s: 0.0,
            daemon_events: 0,
        };
        let mut b = r.clone();
        b.name = "baseline";
        let d = DynamoRow {
            router_mode: "kv_router".into(),
            prefix_reuse: 0.5,
            ttft_mean_ms: 100.0,
            ttft_p50_ms: 31.0,
            ttft_p99_ms: 1000.0,
            e2e_p50_ms: 0.0,
            e2e_p99_ms: 0.0,
            input_tokens: 0,
            computed_tokens: 0,
            label: "test".into(),
        };
        let svg = svg_plot(&[r.clone(), b.clone()], &[d], "virtual");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for name in ["kvplane", "baseline"] {
            for p in ["p50 10.0", "mean 20.0", "p99 300.0"] {
                assert!(
                    svg.contains(&format!("<title>{name} {p} ms</title>")),
                    "{name} {p}"
                );
            }
        }
        assert!(svg.contains("Dynamo kv_router p50 31 ms"));
        // No Dynamo row given, no Dynamo line drawn.
        assert!(!svg_plot(&[r, b], &[], "virtual").contains("Dynamo"));
    }

    #[test]
    fn csv_trace_and_config_text() {
        let dir = std::env::temp_dir().join(format!("kvp-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.csv");
        std::fs::write(&p, "arrival_ms,input,output\n10,1000,5\n0,600,2\n").unwrap();
        let t = load_any_trace(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].timestamp, 0);
        assert_eq!(t[0].hash_ids.len(), 2);
        assert_eq!(t[1].hash_ids.len(), 2);
        assert!(t[0].hash_ids.iter().all(|h| !t[1].hash_ids.contains(h)));
        std::fs::write(&p, "1,2\n").unwrap();
        assert!(load_any_trace(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        let c = daemon_config(Path::new("/tmp/s.sock"), 4096, 10, None, None);
        assert_eq!(c.blocks.block_bytes, 4096);
        assert_eq!(c.tiers.host.capacity_bytes, 10 * 8192);
        assert!(!c.events.enabled());
        // The generated config is one this daemon accepts and reads back as built,
        // events section included.
        let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        let c = daemon_config(
            Path::new("/tmp/s.sock"),
            4096,
            10,
            Some((Path::new("/tmp/n.img"), 1 << 20)),
            Some((addr, 7)),
        );
        let text = c.to_toml().unwrap();
        let cfg = Config::from_toml(&text, Path::new("replay.toml")).unwrap();
        assert_eq!(cfg, c);
        assert_eq!(cfg.events.router_addrs(), vec![addr]);
        assert_eq!(
            cfg.control.resolved_socket_path(Path::new("/tmp/s.sock")),
            None
        );
    }
}
