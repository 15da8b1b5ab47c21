//! The data plane: what each validated request does. Runs on the session threads, never
//! on tokio. Requests arrive already validated against the segment geometry
//! (`kvplane_shm::server::validate_sqe`); what is checked here is their meaning: the KV
//! layout, page ids, namespaces. Block bytes move between the engine's KV memory and the
//! block manager's slots through the mover, on the daemon's device.
//!
//! A SAVE or LOAD runs in two halves. [`DataPlane::submit`] plans it, launches its copy
//! on its queue pair's stream and records that queue pair's event: the operation is then
//! in flight ([`Submitted::InFlight`]) and the data-plane thread goes on serving other
//! sessions and the session's other queue pairs (one operation in flight per queue pair:
//! a queue pair's operations complete in order, different queue pairs' side by side). [`DataPlane::poll`] asks the device whether the event has completed (never
//! waiting) and, once it has, commits the plan and returns the completion. Nothing is
//! published, and no completion is posted, before the copy has landed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvplane_cuda::Device;
use kvplane_ffi::{
    self as ffi, Opcode, Pod, Status, kvp_block_op, kvp_cqe, kvp_kv_layout, kvp_stats,
};
use kvplane_kernels::host::KernelError;
use kvplane_kernels::layout::LayoutError;
use kvplane_shm::Segment;
use kvplane_shm::server::{Request, completion};
use kvplane_shm::sys::PeerCred;

use crate::block::{BlockError, BlockManager, LoadFailure, Tier};

pub mod engine_memory;
pub mod io;
pub mod mapped;
pub mod mover;
pub mod transfer;
pub use engine_memory::{EngineMemory, EventError, NamedEvent, RegionError, host_parts};
pub use mapped::{MapLimitError, MapLimits, MappedCharge, MappedLedger, NamespaceLimit};
pub use mover::{EngineTarget, MoveError, MoveScratch, Mover};

/// Global namespace id: stable across restarts (NVMe slots record it), derived from the
/// name. Collisions between two live names are refused at attach.
pub fn namespace_id(name: &str) -> u32 {
    let h = xxhash_rust::xxh3::xxh3_64(name.as_bytes());
    (h ^ (h >> 32)) as u32
}

/// Daemon-wide counters (relaxed atomics: statistics, not synchronisation).
#[derive(Debug, Default)]
pub struct Counters {
    pub ops_completed: AtomicU64,
    pub ops_failed: AtomicU64,
    pub sessions_active: AtomicU64,
    pub sessions_total: AtomicU64,
    pub sessions_reclaimed: AtomicU64,
    pub protocol_violations: AtomicU64,
    pub blocks_saved: AtomicU64,
    pub blocks_loaded: AtomicU64,
    pub bytes_saved: AtomicU64,
    pub bytes_loaded: AtomicU64,
    /// Block leases held by live sessions (pins not yet unpinned or released at session
    /// end): 0 once every engine has gone, however it ended.
    pub leases_held: AtomicU64,
    /// Copies that faulted in an engine's KV buffer (its backing vanished); each ended
    /// its session.
    pub engine_memory_faults: AtomicU64,
    /// Sessions ended because serving them panicked (a daemon bug, logged as an error).
    pub sessions_panicked: AtomicU64,
    /// Panics of a data-plane thread outside the guard around each operation: each ended
    /// every session of that thread, which went on serving new ones.
    pub dataplane_thread_panics: AtomicU64,
    /// Latency histograms, link bytes, per-namespace lookups (for `/metrics`).
    pub metrics: crate::metrics::DataPlaneMetrics,
}

/// What the daemon keeps about one session, private to its thread. The scratch vectors
/// are sized on first use and reused, so steady-state operations do not allocate.
#[derive(Debug)]
pub struct SessionData {
    pub id: u64,
    pub peer: PeerCred,
    /// Global namespace ids, indexed by the session's namespace_id.
    pub namespaces: Vec<u32>,
    /// The engine's KV memory, imported at attach (None: it registered none).
    pub engine: Option<EngineMemory>,
    ops: Vec<kvp_block_op>,
    hashes: Vec<u64>,
    chain: Vec<(u64, Option<u64>)>,
    tiers: Vec<Option<Tier>>,
    pages: Vec<u32>,
    /// The mover's vectors for this session's batches.
    scratch: MoveScratch,
    /// Set when a copy faulted in the engine's KV buffer: the session is ended after the
    /// batch, and no further copy touches the buffer.
    engine_fault: Option<KernelError>,
    /// The operation whose copy is on the device, per queue pair (at most one each).
    in_flight: Vec<Option<InFlight>>,
    /// Set when a copy failed on the device after its LOAD had been completed early:
    /// the session ends.
    device_fault: Option<String>,
    /// The SAVE handed to an I/O executor after its engine event completed (its queue
    /// pair and user_data): served there without querying the event again, so an engine
    /// that records it anew cannot make an executor wait.
    engine_ready_for: Option<(usize, u64)>,
    /// How fast the engine may open IPC events (KVP_OP_REGISTER_EVENTS).
    event_opens: OpenRate,
}

/// IPC event opens a session may make in a burst, and per second after that: each is
/// driver work (`cuIpcOpenEventHandle`), so an engine that re-registers in a loop gets
/// BUSY rather than keeping the driver busy for everyone. An engine registers its events
/// once (again after a CUDA graph is recaptured, say): far below either.
pub const EVENT_OPEN_BURST: u32 = 4 * ffi::MAX_IPC_EVENTS as u32;
pub const EVENT_OPENS_PER_S: u32 = ffi::MAX_IPC_EVENTS as u32;

/// A rate limit as a virtual schedule (GCRA): each open moves `due` one interval later;
/// a call is admitted while `due` stays within the burst of now.
#[derive(Debug, Default)]
struct OpenRate {
    /// When the opens admitted so far would have been paid for; None: never used.
    due: Option<Instant>,
}

impl OpenRate {
    const INTERVAL: std::time::Duration =
        std::time::Duration::from_micros(1_000_000 / EVENT_OPENS_PER_S as u64);

    /// Admits `opens` at `now`, or says how long until it would be.
    fn admit(&mut self, opens: u32, now: Instant) -> Result<(), std::time::Duration> {
        let due = self.due.map_or(now, |d| d.max(now)) + Self::INTERVAL * opens;
        let limit = now + Self::INTERVAL * EVENT_OPEN_BURST;
        if due > limit {
            return Err(due - limit);
        }
        self.due = Some(due);
        Ok(())
    }
}

impl SessionData {
    pub fn new(
        id: u64,
        peer: PeerCred,
        namespaces: Vec<u32>,
        engine: Option<EngineMemory>,
        queue_pairs: usize,
    ) -> Self {
        SessionData {
            id,
            peer,
            namespaces,
            engine,
            ops: Vec::new(),
            hashes: Vec::new(),
            chain: Vec::new(),
            tiers: Vec::new(),
            pages: Vec::new(),
            scratch: MoveScratch::default(),
            engine_fault: None,
            in_flight: (0..queue_pairs.max(1)).map(|_| None).collect(),
            device_fault: None,
            engine_ready_for: None,
            event_opens: OpenRate::default(),
        }
    }

    /// A device failure the engine could not be told through a completion (see
    /// `device_fault`): the session must end.
    pub fn device_fault(&self) -> Option<&str> {
        self.device_fault.as_deref()
    }

    /// Whether an operation's copy is still on the device on queue pair `qp`: that queue
    /// pair takes no other submission until [`DataPlane::poll`] has completed it.
    pub fn in_flight_on(&self, qp: usize) -> bool {
        self.in_flight.get(qp).is_some_and(Option::is_some)
    }

    /// Whether any queue pair has an operation in flight: the session does not end
    /// until each has been completed.
    pub fn in_flight(&self) -> bool {
        self.in_flight.iter().any(Option::is_some)
    }

    /// Whether the operation in flight (if any) may be dropped at once when the session
    /// ends: a SAVE still waiting for its engine's event has planned, reserved and
    /// launched nothing.
    pub fn in_flight_holds_nothing(&self) -> bool {
        self.in_flight
            .iter()
            .flatten()
            .all(|op| matches!(op.half, Half::AwaitEngine { .. }))
    }

    /// The fault that made the engine's KV buffer unusable, if one did: the session must
    /// end (its engine made its own memory vanish).
    pub fn engine_fault(&self) -> Option<&KernelError> {
        self.engine_fault.as_ref()
    }
}

/// What [`DataPlane::poll`] found.
#[derive(Debug, Clone, Copy)]
pub enum Polled {
    /// The copy is still on the device.
    InFlight,
    /// Landed and committed: post this completion (`None`: it was posted early, or there
    /// was nothing in flight).
    Done(Option<kvp_cqe>),
    /// A SAVE whose engine event has now completed, and whose serving may wait (on NVMe,
    /// or on a copy down from G1): nothing is held; hand it to an I/O executor, which
    /// serves it without waiting on the event again.
    HandOff(Request),
}

/// What [`DataPlane::submit`] did with a request.
#[derive(Debug, Clone, Copy)]
pub enum Submitted {
    /// Served: post this completion.
    Done(kvp_cqe),
    /// Its copy is on the device; [`DataPlane::poll`] returns the completion.
    InFlight,
}

/// A SAVE or LOAD between launch and completion: the plan it commits, the engine whose
/// event says when, and what its completion needs.
#[derive(Debug)]
struct InFlight {
    req: Request,
    target: EngineTarget,
    half: Half,
    /// A completion due before the copy lands (see `DataPlane::take_early_completion`).
    early: Option<kvp_cqe>,
    /// When the request was submitted (op latency, the completion's `detail` in us).
    t0: Instant,
}

#[derive(Debug)]
enum Half {
    /// A SAVE waiting for the engine's IPC event before anything is planned: polled from
    /// the host (the daemon never queues its stream behind a tenant's event, which the
    /// tenant could keep from ever completing), given up at `deadline`.
    AwaitEngine {
        event: kvplane_cuda::EventId,
        deadline: Instant,
    },
    Save(transfer::SaveStarted),
    Load(transfer::LoadStarted),
    /// A LOAD completed early (IPC event): its blocks are held until the copy lands.
    LoadReported(crate::block::plan::LoadHolds),
}

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("namespace `{name}` collides with `{other}` (same 32-bit id {id:#x}); rename one")]
    Collision {
        name: String,
        other: String,
        id: u32,
    },
}

#[derive(Default)]
pub struct DataPlane {
    pub counters: Counters,
    /// Engine memory mapped for live sessions, against `serve.max_mapped_bytes` and the
    /// namespaces' `max_mapped_bytes`.
    pub mapped: Arc<MappedLedger>,
    names: Mutex<HashMap<u32, String>>,
    blocks: Option<Arc<BlockManager>>,
    /// Executes the block manager's plans (present with `blocks`).
    mover: Option<Mover>,
    /// `serve.engine_event_timeout_ms` (0 until set: the default applies).
    engine_event_timeout_ms: AtomicU64,
    /// Set by [`Self::inject_thread_panic_for_tests`]; taken by the first data-plane thread
    /// at its next liveness check.
    injected_thread_panic: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("blocks", &self.blocks.is_some())
            .finish()
    }
}

fn done(
    user_data: u64,
    status: Status,
    blocks: usize,
    bytes: u64,
    tier: u32,
    detail: u32,
) -> kvp_cqe {
    let mut c = completion(user_data, status);
    c.blocks = blocks as u32;
    c.bytes = bytes;
    // enum kvp_tier values are 0..=3; the completion carries them in 16 bits.
    c.tier = tier as u16;
    c.detail = detail;
    c
}

/// The engine-memory fault behind a failed copy, with the index of the block it hit.
fn engine_fault(e: &BlockError) -> Option<(usize, &KernelError)> {
    let (index, source) = match e {
        BlockError::Fill { index, source } | BlockError::Drain { index, source } => {
            (*index, source)
        }
        _ => return None,
    };
    source
        .downcast_ref::<MoveError>()
        .and_then(MoveError::engine_fault)
        .map(|k| (index, k))
}

/// Runs `launch` (queueing a batch's copies on the engine's stream) and records the
/// engine's event after them. A failure after part of the batch was queued waits for that
/// part first: its slots are about to be given back and must not be written afterwards.
fn launch_and_record(
    mover: &Mover,
    target: EngineTarget,
    launch: impl FnOnce(&Mover) -> Result<(), MoveError>,
) -> Result<(), MoveError> {
    let r = launch(mover).and_then(|()| mover.record(target));
    if r.is_err() {
        let _ = mover.wait(target);
    }
    r
}

/// How long a SAVE waits for the engine's IPC event it names before it is refused
/// (KVP_E_BUSY, detail KVP_DETAIL_BAD_EVENT) unless `serve.engine_event_timeout_ms` says
/// otherwise: an engine records it right after writing the KV, so this is far past any
/// real wait.
pub const DEFAULT_ENGINE_EVENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn micros_since(t0: Instant) -> u32 {
    t0.elapsed().as_micros().min(u32::MAX as u128) as u32
}

impl DataPlane {
    /// A data plane without block storage: NOP and STATS only (ring benchmarks).
    pub fn new() -> Self {
        Self::default()
    }

    /// A data plane serving block operations from `blocks`, moving bytes on the device
    /// its tiers live on.
    pub fn with_blocks(blocks: Arc<BlockManager>) -> Self {
        let mover = Mover::new(Arc::clone(blocks.stores()));
        DataPlane {
            blocks: Some(blocks),
            mover: Some(mover),
            ..Self::default()
        }
    }

    /// How long a SAVE waits for the engine's IPC event (`serve.engine_event_timeout_ms`).
    pub fn set_engine_event_timeout(&self, timeout: std::time::Duration) {
        self.engine_event_timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// Makes one data-plane thread panic outside any operation at its next liveness check
    /// (within 100 ms): stands in for a bug in the threads' own loop, whose containment
    /// the daemon's tests check.
    pub fn inject_thread_panic_for_tests(&self) {
        self.injected_thread_panic.store(true, Ordering::SeqCst);
    }

    /// Panics once after [`Self::inject_thread_panic_for_tests`]. Called off the hot path.
    pub(crate) fn injected_thread_panic_point(&self) {
        if self.injected_thread_panic.load(Ordering::Relaxed)
            && self.injected_thread_panic.swap(false, Ordering::SeqCst)
        {
            panic!("injected data-plane thread panic");
        }
    }

    fn engine_event_timeout(&self) -> std::time::Duration {
        match self.engine_event_timeout_ms.load(Ordering::Relaxed) {
            0 => DEFAULT_ENGINE_EVENT_TIMEOUT,
            ms => std::time::Duration::from_millis(ms),
        }
    }

    /// The mover executing this data plane's plans.
    pub fn mover(&self) -> Option<&Mover> {
        self.mover.as_ref()
    }

    pub fn blocks(&self) -> Option<&Arc<BlockManager>> {
        self.blocks.as_ref()
    }

    /// Namespaces bound so far: global id -> name (metrics labels).
    pub fn namespace_names(&self) -> std::collections::BTreeMap<u32, String> {
        let known = self.names.lock().unwrap_or_else(|e| e.into_inner());
        known.iter().map(|(id, n)| (*id, n.clone())).collect()
    }

    /// The name of a global namespace id (its hex id when no session has named it since
    /// start-up, e.g. blocks restored from NVMe).
    pub fn namespace_name(&self, id: u32) -> String {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("ns-{id:08x}"))
    }

    /// Resolve a session's namespace names to global ids.
    /// The device the data plane moves bytes with (None without block tiers).
    pub fn device(&self) -> Option<&Arc<dyn Device>> {
        self.mover.as_ref().map(Mover::device)
    }

    pub fn bind_namespaces(&self, names: &[String]) -> Result<Vec<u32>, NamespaceError> {
        let mut known = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids = Vec::with_capacity(names.len());
        for name in names {
            let id = namespace_id(name);
            match known.get(&id) {
                Some(other) if other != name => {
                    return Err(NamespaceError::Collision {
                        name: name.clone(),
                        other: other.clone(),
                        id,
                    });
                }
                Some(_) => {}
                None => {
                    known.insert(id, name.clone());
                }
            }
            ids.push(id);
        }
        Ok(ids)
    }

    /// Serves one validated request to the end, waiting for its copy if it launched one
    /// (the I/O executors, which may wait; data-plane threads use `submit` and `poll`).
    /// The completion carries its user_data; the caller accounts it with `count` (once
    /// per batch, not per op).
    pub fn handle(
        &self,
        session: &mut SessionData,
        seg: &Segment,
        req: &Request,
        qp: usize,
    ) -> kvp_cqe {
        match self.submit(session, seg, req, qp) {
            Submitted::Done(cqe) => cqe,
            Submitted::InFlight => {
                let early = self.take_early_completion(session, qp);
                let last = self.wait(session, seg, qp);
                early.or(last).expect("an operation completes once")
            }
        }
    }

    /// The completion of the session's operation in flight that is due before its copy
    /// lands: a LOAD whose engine waits on an IPC event the daemon recorded after the
    /// copy. Post it now; `poll` then completes the operation with nothing to post.
    pub fn take_early_completion(&self, session: &mut SessionData, qp: usize) -> Option<kvp_cqe> {
        session.in_flight.get_mut(qp)?.as_mut()?.early.take()
    }

    /// Serves a validated request as far as it goes without waiting: done, or its copy
    /// launched and in flight on queue pair `qp` (then `poll` it until it returns the
    /// completion; that queue pair submits nothing else meanwhile).
    pub fn submit(
        &self,
        session: &mut SessionData,
        seg: &Segment,
        req: &Request,
        qp: usize,
    ) -> Submitted {
        assert!(
            qp < session.in_flight.len() && !session.in_flight_on(qp),
            "a queue pair submits nothing while its operation is in flight"
        );
        let _in_flight = self.counters.metrics.begin();
        let t0 = Instant::now();
        let submitted = self.dispatch(session, seg, req, qp, t0);
        match submitted {
            Submitted::Done(_) => self.counters.metrics.record_op(req.opcode, t0.elapsed()),
            // Counted in flight until `poll` completes it.
            Submitted::InFlight => self.counters.metrics.hold_in_flight(),
        }
        submitted
    }

    /// Whether the operation in flight on queue pair `qp` has landed (then its plan is
    /// committed and its completion returned, unless it was posted early). Never waits.
    pub fn poll(&self, session: &mut SessionData, seg: &Segment, qp: usize) -> Polled {
        let Some(op) = session.in_flight.get(qp).and_then(Option::as_ref) else {
            return Polled::Done(None);
        };
        let mover = self.mover.as_ref().expect("in flight implies a mover");
        if let Half::AwaitEngine { event, deadline } = op.half {
            return self.poll_engine_event(session, seg, qp, event, deadline);
        }
        let launched = match &op.half {
            Half::AwaitEngine { .. } => unreachable!("polled above"),
            Half::Save(h) => h.launched(),
            Half::Load(h) => h.launched(),
            Half::LoadReported(_) => true,
        };
        let landed = match launched.then(|| mover.landed(op.target)) {
            Some(Ok(false)) => return Polled::InFlight,
            None | Some(Ok(true)) => Ok(()),
            Some(Err(e)) => Err(e),
        };
        let op = session.in_flight[qp].take().expect("checked above");
        let blocks = self.blocks.as_ref().expect("in flight implies blocks");
        let cqe = match op.half {
            Half::AwaitEngine { .. } => unreachable!("polled above"),
            Half::Save(started) => {
                let r = transfer::finish_save(blocks, mover, started, landed);
                Some(self.save_done(blocks, session, &op.req, r, op.t0))
            }
            Half::Load(started) => {
                let r = transfer::finish_load(blocks, started, landed);
                Some(self.load_done(blocks, session, seg, &op.req, r, op.t0))
            }
            Half::LoadReported(holds) => {
                if let Err(e) = transfer::finish_reported_load(blocks, holds, landed) {
                    // The engine was told the LOAD succeeded and may read the pages once
                    // its event fires: the session cannot go on.
                    tracing::warn!(session = session.id, error = %e, "a LOAD's copy failed after its completion");
                    session.device_fault = Some(e.to_string());
                }
                // Posted when it was queued (an early completion not yet taken goes now).
                op.early
            }
        };
        self.counters.metrics.release_in_flight();
        self.counters
            .metrics
            .record_op(op.req.opcode, op.t0.elapsed());
        Polled::Done(cqe)
    }

    /// A SAVE waiting for the engine's event: still waiting, given up (its deadline
    /// passed, or the event failed), or started now that the engine's KV is written.
    fn poll_engine_event(
        &self,
        session: &mut SessionData,
        seg: &Segment,
        qp: usize,
        event: kvplane_cuda::EventId,
        deadline: Instant,
    ) -> Polled {
        let device = self.device().expect("in flight implies a device");
        let ready = device.query_event(event);
        if matches!(ready, Ok(false)) && Instant::now() < deadline {
            return Polled::InFlight;
        }
        let op = session.in_flight[qp].take().expect("checked by the caller");
        let blocks = self.blocks.as_ref().expect("in flight implies blocks");
        let cqe = match ready {
            Ok(true) if self.may_do_io(&op.req, false) => {
                // Counted again when the executor submits it.
                self.counters.metrics.release_in_flight();
                session.engine_ready_for = Some((qp, op.req.user_data));
                return Polled::HandOff(op.req);
            }
            Ok(true) => {
                session.engine_ready_for = Some((qp, op.req.user_data));
                match self.save(blocks, session, seg, &op.req, qp, op.t0) {
                    // Planned and launched: in flight as any SAVE (still counted in
                    // flight).
                    Submitted::InFlight => return Polled::InFlight,
                    Submitted::Done(c) => c,
                }
            }
            not_ready => {
                tracing::warn!(session = session.id, result = ?not_ready, timeout_ms = self.engine_event_timeout().as_millis() as u64, "a SAVE's engine event did not complete; SAVE refused");
                done(
                    op.req.user_data,
                    Status::Busy,
                    0,
                    0,
                    0,
                    ffi::DETAIL_BAD_EVENT,
                )
            }
        };
        self.counters.metrics.release_in_flight();
        self.counters
            .metrics
            .record_op(op.req.opcode, op.t0.elapsed());
        Polled::Done(Some(cqe))
    }

    /// Waits for the session's operation in flight and returns its completion (`None`:
    /// it was taken early). Bounded: the daemon's own copies, or an engine event until
    /// its deadline.
    fn wait(&self, session: &mut SessionData, seg: &Segment, qp: usize) -> Option<kvp_cqe> {
        loop {
            match self.poll(session, seg, qp) {
                Polled::Done(cqe) => return cqe,
                // Already where waiting is allowed: serve it here (its event is done).
                Polled::HandOff(req) => return Some(self.handle(session, seg, &req, qp)),
                Polled::InFlight => {}
            }
            let (mover, op) = (
                self.mover.as_ref().expect("in flight implies a mover"),
                session.in_flight[qp].as_ref().expect("not yet completed"),
            );
            if matches!(op.half, Half::AwaitEngine { .. }) {
                std::thread::sleep(crate::session::pool::DEVICE_POLL);
                continue;
            }
            // An error here shows again in the next poll, which completes the op with it.
            let _ = mover.device().sync_event(op.target.event);
        }
    }

    fn dispatch(
        &self,
        session: &mut SessionData,
        seg: &Segment,
        req: &Request,
        qp: usize,
        t0: Instant,
    ) -> Submitted {
        let done = Submitted::Done;
        match req.opcode {
            Opcode::Nop => done(completion(req.user_data, Status::Ok)),
            // Both replace what a copy in flight on another queue pair may still use (the
            // layout on the device, the engine events it waits on or records): only
            // between operations.
            Opcode::AttachLayout | Opcode::RegisterEvents if session.in_flight() => {
                done(completion(req.user_data, Status::Busy))
            }
            Opcode::Stats => done(self.stats(session, seg, req)),
            Opcode::AttachLayout => done(self.attach_layout(session, seg, req)),
            Opcode::RegisterEvents => done(self.register_events(session, seg, req)),
            _ => match &self.blocks {
                None => done(completion(req.user_data, Status::Unsupported)),
                Some(blocks) => self.block_op(blocks, session, seg, req, qp, t0),
            },
        }
    }

    /// Account a batch of completions (including rejections made before `handle`).
    pub fn count(&self, cqes: &[kvp_cqe]) {
        let failed = cqes.iter().filter(|c| c.status != Status::Ok.raw()).count() as u64;
        let ok = cqes.len() as u64 - failed;
        if ok > 0 {
            self.counters.ops_completed.fetch_add(ok, Ordering::Relaxed);
        }
        if failed > 0 {
            self.counters
                .ops_failed
                .fetch_add(failed, Ordering::Relaxed);
        }
    }

    fn attach_layout(&self, session: &mut SessionData, seg: &Segment, req: &Request) -> kvp_cqe {
        let fail = |status, detail| done(req.user_data, status, 0, 0, 0, detail);
        let Ok(raw) = seg.read_pod::<kvp_kv_layout>(req.arg_offset) else {
            return fail(Status::Internal, 0);
        };
        let Some(engine) = session.engine.as_mut() else {
            // No KV buffer was registered at attach: nothing to describe.
            return fail(Status::BadArg, 1);
        };
        // Resolved and checked before anything is uploaded: a refused layout leaves the
        // one attached before in place.
        let layout = match engine.resolve_layout(&raw) {
            Ok(l) => l,
            Err(e) => {
                // An engine's integration bug, worth the operator's eye (the completion
                // carries only BadArg and the detail: 3, it does not fit its regions; 2,
                // its geometry).
                tracing::warn!(session = session.id, error = %e, "KV layout refused");
                let detail = match e {
                    LayoutError::RegionIndex { .. }
                    | LayoutError::OutOfRegion { .. }
                    | LayoutError::OutOfBounds { .. }
                    | LayoutError::PagesExceedBuffer { .. } => 3,
                    _ => 2,
                };
                return fail(Status::BadArg, detail);
            }
        };
        if let Some(blocks) = &self.blocks
            && layout.info().block_bytes != blocks.block_bytes() as u64
        {
            tracing::debug!(
                session = session.id,
                layout_block_bytes = layout.info().block_bytes,
                daemon_block_bytes = blocks.block_bytes(),
                "layout block size differs from the daemon's"
            );
            return fail(Status::BadArg, 4);
        }
        if let Err(e) = engine.install_layout(layout) {
            tracing::warn!(session = session.id, error = %e, "uploading the KV layout");
            return fail(Status::Internal, 0);
        }
        done(req.user_data, Status::Ok, 0, 0, 0, 0)
    }

    /// KVP_OP_REGISTER_EVENTS: opens the engine's IPC events on the device, replacing the
    /// set before (or releasing it: count 0). BadArg with detail 1 when the session has no
    /// KV memory, else the refused event's index; Unsupported on the host backend; Busy
    /// past the session's rate of opens (`EVENT_OPEN_BURST`, `EVENT_OPENS_PER_S`), detail
    /// the milliseconds until the call would be admitted.
    fn register_events(&self, session: &mut SessionData, seg: &Segment, req: &Request) -> kvp_cqe {
        let fail = |status, detail| done(req.user_data, status, 0, 0, 0, detail);
        let mut events = [ffi::kvp_ipc_event::zeroed(); ffi::MAX_IPC_EVENTS];
        let events = &mut events[..req.count as usize];
        if seg
            .read_bytes(req.arg_offset, ffi::slice_as_bytes_mut(events))
            .is_err()
        {
            return fail(Status::Internal, 0);
        }
        let Some(engine) = session.engine.as_mut() else {
            return fail(Status::BadArg, 1);
        };
        if let Err(wait) = session
            .event_opens
            .admit(events.len() as u32, Instant::now())
        {
            tracing::debug!(
                session = session.id,
                wait_ms = wait.as_millis() as u64,
                "IPC event opens over the rate"
            );
            let wait_ms = wait.as_millis().clamp(1, u32::MAX as u128) as u32;
            return fail(Status::Busy, wait_ms);
        }
        match engine.register_events(events) {
            Ok(()) => done(req.user_data, Status::Ok, events.len(), 0, 0, 0),
            Err(e) => {
                tracing::warn!(session = session.id, error = %e, "IPC events refused");
                match e {
                    EventError::NoGpu { index } => fail(Status::Unsupported, index as u32),
                    EventError::Reserved { index }
                    | EventError::OtherGpu { index, .. }
                    | EventError::Import { index, .. } => fail(Status::BadArg, index as u32),
                    EventError::NoMemory => fail(Status::BadArg, 1),
                }
            }
        }
    }

    /// The IPC event a SAVE or LOAD names (`param0`), or the completion refusing it.
    fn named_event(session: &SessionData, req: &Request) -> Result<NamedEvent, kvp_cqe> {
        session
            .engine
            .as_ref()
            .and_then(|e| e.ipc_event(req.param0))
            .ok_or_else(|| {
                done(
                    req.user_data,
                    Status::BadArg,
                    0,
                    0,
                    0,
                    ffi::DETAIL_BAD_EVENT,
                )
            })
    }

    /// Copy the request's block ops out of shared memory (what the operation acts on is
    /// this copy, never a re-read: the engine may change them under us; a LOAD reads them
    /// again only to write its results back into the engine's own slice) and resolve the
    /// namespace.
    fn read_ops(session: &mut SessionData, seg: &Segment, req: &Request) -> Option<u32> {
        let ns = *session.namespaces.get(req.namespace_id as usize)?;
        let n = req.count as usize;
        session.ops.resize(n, kvp_block_op::zeroed());
        seg.read_bytes(req.arg_offset, ffi::slice_as_bytes_mut(&mut session.ops))
            .ok()?;
        session.hashes.clear();
        session.hashes.extend(session.ops.iter().map(|o| o.hash));
        Some(ns)
    }

    fn write_ops_back(session: &SessionData, seg: &Segment, req: &Request) {
        // The range was validated (arg_len == count * 24 inside the slice).
        let _ = seg.write_bytes(req.arg_offset, ffi::slice_as_bytes(&session.ops));
    }

    fn block_op(
        &self,
        blocks: &BlockManager,
        session: &mut SessionData,
        seg: &Segment,
        req: &Request,
        qp: usize,
        t0: Instant,
    ) -> Submitted {
        match req.opcode {
            Opcode::Save => return self.save(blocks, session, seg, req, qp, t0),
            Opcode::Load => return self.load(blocks, session, seg, req, qp, t0),
            _ => {}
        }
        Submitted::Done(self.registry_op(blocks, session, seg, req))
    }

    /// The block operations that move no bytes through the device.
    fn registry_op(
        &self,
        blocks: &BlockManager,
        session: &mut SessionData,
        seg: &Segment,
        req: &Request,
    ) -> kvp_cqe {
        let ud = req.user_data;
        let mover = self
            .mover
            .as_ref()
            .expect("a data plane with blocks has a mover");
        if req.opcode == Opcode::ClearNamespace {
            let Some(&ns) = session.namespaces.get(req.namespace_id as usize) else {
                return done(ud, Status::Namespace, 0, 0, 0, 0);
            };
            let r = transfer::clear_namespace(blocks, mover, ns);
            return done(ud, Status::Ok, r.dropped, 0, 0, r.busy as u32);
        }
        let Some(ns) = Self::read_ops(session, seg, req) else {
            return done(ud, Status::Namespace, 0, 0, 0, 0);
        };
        match req.opcode {
            Opcode::Lookup => {
                session.tiers.clear();
                session.tiers.resize(session.hashes.len(), None);
                let hits = blocks.lookup(ns, &session.hashes, &mut session.tiers);
                self.counters
                    .metrics
                    .record_lookup(ns, &session.tiers, hits, session.hashes.len());
                for (op, t) in session.ops.iter_mut().zip(&session.tiers) {
                    op.tier = Tier::raw_or_none(*t) as u8;
                    op.status = 0;
                }
                Self::write_ops_back(session, seg, req);
                let slowest = session.tiers[..hits].iter().copied().max().flatten();
                done(ud, Status::Ok, hits, 0, Tier::raw_or_none(slowest), 0)
            }
            Opcode::Pin => {
                let pinned = blocks.pin(session.id, ns, &session.hashes);
                self.counters
                    .leases_held
                    .fetch_add(pinned.leased as u64, Ordering::Relaxed);
                match pinned.at_cap {
                    // The blocks leased before the cap stay leased.
                    true => done(
                        ud,
                        Status::NoSpace,
                        pinned.leased,
                        0,
                        0,
                        blocks.max_pinned_blocks_per_session(),
                    ),
                    false => done(ud, Status::Ok, pinned.leased, 0, 0, 0),
                }
            }
            Opcode::Unpin => {
                let n = blocks.unpin(session.id, ns, &session.hashes);
                self.counters
                    .leases_held
                    .fetch_sub(n as u64, Ordering::Relaxed);
                done(ud, Status::Ok, n, 0, 0, 0)
            }
            Opcode::Drop => {
                let r = transfer::drop_blocks(blocks, mover, ns, &session.hashes);
                done(ud, Status::Ok, r.dropped, 0, 0, r.busy as u32)
            }
            _ => done(ud, Status::Internal, 0, 0, 0, 0),
        }
    }

    /// A SAVE's or LOAD's namespace and engine target, its ops read; otherwise the
    /// completion to return.
    fn batch(
        session: &mut SessionData,
        seg: &Segment,
        req: &Request,
        qp: usize,
    ) -> Result<(u32, EngineTarget), kvp_cqe> {
        let ud = req.user_data;
        let ns = Self::read_ops(session, seg, req)
            .ok_or_else(|| done(ud, Status::Namespace, 0, 0, 0, 0))?;
        let target =
            Self::engine_pages(&session.engine, &session.engine_fault, &session.ops, qp, ud)?;
        Ok((ns, target))
    }

    /// The engine buffer and its layout, with every page id of the batch checked to
    /// exist in the engine's pool; otherwise the completion to return (NoLayout, or
    /// BadArg with the index of the first bad page).
    fn engine_pages(
        engine: &Option<EngineMemory>,
        fault: &Option<KernelError>,
        ops: &[kvp_block_op],
        qp: usize,
        user_data: u64,
    ) -> Result<EngineTarget, kvp_cqe> {
        if fault.is_some() {
            // The buffer faulted earlier in this batch; the session ends after it.
            return Err(done(user_data, Status::BadArg, 0, 0, 0, 0));
        }
        let Some(engine) = engine.as_ref() else {
            return Err(done(user_data, Status::NoLayout, 0, 0, 0, 0));
        };
        let (Some(layout), Some(target)) = (engine.layout.as_ref(), engine.target(qp)) else {
            return Err(done(user_data, Status::NoLayout, 0, 0, 0, 0));
        };
        match ops
            .iter()
            .position(|o| u64::from(o.engine_block) >= layout.num_pages())
        {
            Some(i) => Err(done(user_data, Status::BadArg, 0, 0, 0, i as u32)),
            None => Ok(target),
        }
    }

    /// Launches a SAVE: host slots reserved, one gather from the engine's pages into them
    /// queued on the queue pair's stream, its event recorded. In flight from there. A SAVE
    /// naming an engine event whose work is not done yet waits for it first, holding
    /// nothing (unless `engine_ready_for` says it was seen done: then it is not queried
    /// again).
    fn save(
        &self,
        blocks: &BlockManager,
        session: &mut SessionData,
        seg: &Segment,
        req: &Request,
        qp: usize,
        t0: Instant,
    ) -> Submitted {
        let engine_ready = session.engine_ready_for.take() == Some((qp, req.user_data));
        let mover = self
            .mover
            .as_ref()
            .expect("a data plane with blocks has a mover");
        let (ns, target) = match Self::batch(session, seg, req, qp) {
            Ok(x) => x,
            Err(cqe) => return Submitted::Done(cqe),
        };
        match Self::named_event(session, req) {
            Ok(NamedEvent::Ipc(event)) if !engine_ready => {
                match mover.device().query_event(event) {
                    // Not done yet; or done, but serving it may wait: it then goes to an
                    // I/O executor from `poll`.
                    Ok(complete) if !complete || self.may_do_io(req, false) => {
                        let deadline = Instant::now() + self.engine_event_timeout();
                        let half = Half::AwaitEngine { event, deadline };
                        return self.in_flight(session, qp, req, target, half, t0);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(session = session.id, error = %e, "querying a SAVE's engine event");
                        let detail = ffi::DETAIL_BAD_EVENT;
                        return Submitted::Done(done(
                            req.user_data,
                            Status::BadArg,
                            0,
                            0,
                            0,
                            detail,
                        ));
                    }
                }
            }
            Ok(_) => {}
            Err(cqe) => return Submitted::Done(cqe),
        }
        session.chain.clear();
        session.chain.extend(
            session
                .ops
                .iter()
                .map(|o| (o.hash, (o.parent_hash != 0).then_some(o.parent_hash))),
        );
        let options = transfer::SaveOptions {
            priority: u8::from(req.flags & ffi::SQE_F_HIGH_PRIORITY != 0),
            write_through: req.flags & ffi::SQE_F_WRITE_THROUGH != 0,
            keep_on_gpu: (req.flags & ffi::SQE_F_KEEP_ON_GPU != 0).then_some(target.stream),
        };
        let ops = &session.ops;
        let pages = &mut session.pages;
        let scratch = &mut session.scratch;
        let started = transfer::begin_save(
            blocks,
            mover,
            ns,
            &session.chain,
            options,
            |m, stores, hbm| {
                pages.clear();
                pages.extend(stores.iter().map(|s| ops[s.index].engine_block));
                pages.extend(hbm.iter().map(|c| ops[stores[c.store].index].engine_block));
                launch_and_record(m, target, |m| {
                    m.launch_gather(target, pages, stores, hbm, scratch)
                })
            },
        );
        match started {
            Ok(started) => self.in_flight(session, qp, req, target, Half::Save(started), t0),
            Err(e) => Submitted::Done(self.save_done(blocks, session, req, Err(e), t0)),
        }
    }

    /// A SAVE's completion, once its copy has landed (or failed).
    fn save_done(
        &self,
        blocks: &BlockManager,
        session: &mut SessionData,
        req: &Request,
        result: Result<crate::block::SaveReport, BlockError>,
        t0: Instant,
    ) -> kvp_cqe {
        let ud = req.user_data;
        let write_through = req.flags & ffi::SQE_F_WRITE_THROUGH != 0 || blocks.writes_through();
        let us = micros_since(t0);
        match result {
            Ok(r) => {
                let saved = r.stored + r.already_present;
                self.counters
                    .blocks_saved
                    .fetch_add(r.stored as u64, Ordering::Relaxed);
                self.counters
                    .bytes_saved
                    .fetch_add(r.bytes, Ordering::Relaxed);
                self.counters.metrics.record_save(&r, blocks.block_bytes());
                let (status, tier) = save_outcome(write_through, &r);
                done(ud, status, saved, r.bytes, tier.raw(), us)
            }
            Err(e) => {
                if let Some((index, fault)) = engine_fault(&e) {
                    return self.engine_faulted(session, fault.clone(), ud, index);
                }
                tracing::warn!(session = session.id, error = %e, "save failed");
                done(ud, Status::Internal, 0, 0, 0, us)
            }
        }
    }

    /// Launches a LOAD: blocks held (staged from NVMe first where needed), one scatter
    /// per tier buffer into the engine's pages queued on the queue pair's stream, its event
    /// recorded. In flight from there.
    fn load(
        &self,
        blocks: &BlockManager,
        session: &mut SessionData,
        seg: &Segment,
        req: &Request,
        qp: usize,
        t0: Instant,
    ) -> Submitted {
        let ud = req.user_data;
        let mover = self
            .mover
            .as_ref()
            .expect("a data plane with blocks has a mover");
        let (ns, target) = match Self::batch(session, seg, req, qp) {
            Ok(x) => x,
            Err(cqe) => return Submitted::Done(cqe),
        };
        let signal = match Self::named_event(session, req) {
            Ok(e) => e,
            Err(cqe) => return Submitted::Done(cqe),
        };
        // Two blocks into one page in one batch is a bug in the engine (and a race on a GPU).
        session.pages.clear();
        session
            .pages
            .extend(session.ops.iter().map(|o| o.engine_block));
        session.pages.sort_unstable();
        if session.pages.windows(2).any(|w| w[0] == w[1]) {
            return Submitted::Done(done(ud, Status::BadArg, 0, 0, 0, 0));
        }
        let ops = &session.ops;
        let pages = &mut session.pages;
        let scratch = &mut session.scratch;
        let stream = Some(target.stream);
        let started =
            transfer::begin_load(blocks, mover, ns, &session.hashes, stream, |m, items| {
                pages.clear();
                pages.extend(items.iter().map(|i| ops[i.index].engine_block));
                launch_and_record(m, target, |m| {
                    m.launch_scatter(target, pages, items, scratch)?;
                    if let NamedEvent::Ipc(ev) = signal {
                        m.signal_engine(target, ev)?;
                    }
                    Ok(())
                })
            });
        match started {
            Ok(started) if signal != NamedEvent::None && started.launched() => {
                // The engine waits on its event on the GPU: complete now, hold the
                // blocks until the copy lands.
                let (report, holds) = started.report_early(blocks);
                let cqe = self.load_done(blocks, session, seg, req, Ok(report), t0);
                let half = Half::LoadReported(holds);
                let submitted = self.in_flight(session, qp, req, target, half, t0);
                if let Some(op) = session.in_flight[qp].as_mut() {
                    op.early = Some(cqe);
                }
                submitted
            }
            Ok(started) => self.in_flight(session, qp, req, target, Half::Load(started), t0),
            Err(e) => Submitted::Done(self.load_done(blocks, session, seg, req, Err(e), t0)),
        }
    }

    /// A LOAD's completion, once its copies have landed (or failed): each op's tier and
    /// status written back to the engine's array.
    fn load_done(
        &self,
        blocks: &BlockManager,
        session: &mut SessionData,
        seg: &Segment,
        req: &Request,
        result: Result<crate::block::LoadReport, BlockError>,
        t0: Instant,
    ) -> kvp_cqe {
        let ud = req.user_data;
        let us = micros_since(t0);
        let r = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some((index, fault)) = engine_fault(&e) {
                    return self.engine_faulted(session, fault.clone(), ud, index);
                }
                tracing::warn!(session = session.id, error = %e, "load failed");
                return done(ud, Status::Internal, 0, 0, 0, us);
            }
        };
        self.counters
            .blocks_loaded
            .fetch_add(r.loaded as u64, Ordering::Relaxed);
        self.counters
            .bytes_loaded
            .fetch_add(r.bytes, Ordering::Relaxed);
        self.counters.metrics.record_load(&r, blocks.block_bytes());
        // Another queue pair may have reused `session.ops` while this LOAD was on the
        // device: read its ops again from its own arena slice (only written back; the
        // range was validated at submission).
        session
            .ops
            .resize(req.count as usize, kvp_block_op::zeroed());
        let _ = seg.read_bytes(req.arg_offset, ffi::slice_as_bytes_mut(&mut session.ops));
        for (i, op) in session.ops.iter_mut().enumerate() {
            op.tier = r.tiers.get(i).map_or(Tier::NONE_RAW, |t| t.raw()) as u8;
            op.status = 0;
        }
        let prefix_only = req.flags & ffi::SQE_F_PREFIX_ONLY != 0;
        let status = match &r.failure {
            None => Status::Ok,
            Some((i, why)) => {
                let s = match why {
                    LoadFailure::Missing => Status::NotFound,
                    LoadFailure::NoSpace => Status::NoSpace,
                    LoadFailure::Busy => Status::Busy,
                    LoadFailure::Corrupt(_) => Status::Corrupt,
                    LoadFailure::Io(_) => Status::Io,
                };
                if let Some(op) = session.ops.get_mut(*i) {
                    op.status = s.raw() as u8;
                }
                if prefix_only { Status::Ok } else { s }
            }
        };
        Self::write_ops_back(session, seg, req);
        let detail = match (&r.failure, status) {
            (Some((i, _)), s) if s != Status::Ok => *i as u32,
            _ => us,
        };
        done(
            ud,
            status,
            r.loaded,
            r.bytes,
            Tier::raw_or_none(r.slowest),
            detail,
        )
    }

    /// Parks a launched operation on its queue pair until `poll` sees its event complete.
    fn in_flight(
        &self,
        session: &mut SessionData,
        qp: usize,
        req: &Request,
        target: EngineTarget,
        half: Half,
        t0: Instant,
    ) -> Submitted {
        session.in_flight[qp] = Some(InFlight {
            req: *req,
            target,
            half,
            early: None,
            t0,
        });
        Submitted::InFlight
    }

    /// A copy faulted in the engine's KV buffer: its memory is gone (or was never there).
    /// The op fails with BadArg naming the block (`detail`), nothing it touched is
    /// published, and the session is marked to end after this batch.
    fn engine_faulted(
        &self,
        session: &mut SessionData,
        fault: KernelError,
        user_data: u64,
        index: usize,
    ) -> kvp_cqe {
        tracing::warn!(session = session.id, pid = session.peer.pid, uid = session.peer.uid, block = index, error = %fault, "engine KV buffer faulted; ending the session");
        self.counters
            .engine_memory_faults
            .fetch_add(1, Ordering::Relaxed);
        session.engine_fault = Some(fault);
        done(user_data, Status::BadArg, 0, 0, 0, index as u32)
    }

    fn stats(&self, session: &SessionData, seg: &Segment, req: &Request) -> kvp_cqe {
        let mut st: kvp_stats = Pod::zeroed();
        let c = &self.counters;
        st.session_id = session.id;
        st.ops_completed = c.ops_completed.load(Ordering::Relaxed);
        st.ops_failed = c.ops_failed.load(Ordering::Relaxed);
        st.sessions_active = c.sessions_active.load(Ordering::Relaxed);
        st.blocks_saved = c.blocks_saved.load(Ordering::Relaxed);
        st.blocks_loaded = c.blocks_loaded.load(Ordering::Relaxed);
        st.bytes_saved = c.bytes_saved.load(Ordering::Relaxed);
        st.bytes_loaded = c.bytes_loaded.load(Ordering::Relaxed);
        st.backend = crate::device::abi_backend(self.blocks.as_ref());
        if let Some(blocks) = &self.blocks {
            let u = blocks.usage();
            for t in crate::tier::Tier::ALL {
                let (capacity, used) = u.slots[t];
                st.tier_capacity_blocks[t.raw() as usize] = u64::from(capacity);
                st.tier_used_blocks[t.raw() as usize] = u64::from(used);
            }
            st.lookup_hits = u.lookup_hits;
            st.lookup_misses = u.lookup_misses;
        }
        match seg.write_pod(req.arg_offset, &st) {
            Ok(()) => {
                let mut c = completion(req.user_data, Status::Ok);
                c.bytes = std::mem::size_of::<kvp_stats>() as u64;
                c
            }
            // Unreachable after validation; an error status rather than a panic anyway.
            Err(_) => completion(req.user_data, Status::Internal),
        }
    }

    /// The session is gone (detached, killed or cut off): release what it held. An
    /// operation still in flight (normally a session ends only after they land; after a
    /// panic one may not have) is waited for on its queue pair's stream, which holds only
    /// the daemon's own copies, and then given up.
    pub fn session_ended(&self, session: &mut SessionData) {
        let (Some(blocks), Some(mover)) = (&self.blocks, &self.mover) else {
            return self.release_leases(session);
        };
        for op in session.in_flight.iter_mut().filter_map(Option::take) {
            if let Err(e) = mover.wait(op.target) {
                tracing::warn!(session = session.id, error = %e, "waiting for an abandoned copy");
            }
            let held = match op.half {
                // Ended while its SAVE waited for the engine: nothing to give back.
                Half::AwaitEngine { .. } => false,
                Half::Save(started) => {
                    transfer::abandon_save(blocks, mover, started);
                    true
                }
                Half::Load(started) => {
                    transfer::abandon_load(blocks, started);
                    true
                }
                Half::LoadReported(holds) => {
                    blocks.release_load(holds);
                    true
                }
            };
            self.counters.metrics.release_in_flight();
            if held {
                tracing::warn!(
                    session = session.id,
                    "an operation in flight was abandoned with its session"
                );
            }
        }
        self.release_leases(session);
    }

    /// The session's leases, given back when it ends.
    fn release_leases(&self, session: &SessionData) {
        if let Some(blocks) = &self.blocks {
            let released = blocks.release_session(session.id);
            self.counters
                .leases_held
                .fetch_sub(released, Ordering::Relaxed);
            if released > 0 {
                tracing::info!(
                    session = session.id,
                    leases = released,
                    "released the session's leases"
                );
            }
        }
    }
}

/// Human name of a status, for logs.
pub fn status_name(raw: i32) -> &'static str {
    ffi::Status::from_raw(raw).map_or("unknown", |s| s.name())
}

/// A SAVE's completion status and tier from its report (`write_through`: asked for by
/// the SQE or the configuration): where its blocks landed (NVMe for a write-through that
/// reached it, G1 when kept on the GPU, else the host tier); `Io` only when its own
/// write-through failed (a demotion of another block, made to find room, failing is
/// counted and logged, not this save's outcome), `NoSpace` when it found no NVMe slot.
/// So a SAVE that completes `Ok` with write-through has every block it stored on NVMe.
fn save_outcome(write_through: bool, r: &crate::block::SaveReport) -> (Status, Tier) {
    let tier = if write_through && r.written_through > 0 {
        Tier::Nvme
    } else if r.hbm_stored > 0 {
        Tier::Hbm
    } else {
        Tier::Host
    };
    let status = if r.no_space > 0 {
        Status::NoSpace
    } else if write_through && r.write_through_failed > 0 {
        Status::Io
    } else if write_through && r.write_through_no_slot > 0 {
        Status::NoSpace
    } else {
        Status::Ok
    };
    (status, tier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A write-through SAVE reports `Io` only for its own blocks' writes: a failed
    /// demotion of another block, made to find it room, leaves it `Ok` on NVMe.
    #[test]
    fn a_save_is_judged_by_its_own_write_through() {
        use crate::block::SaveReport;
        let demotion_failed = SaveReport {
            stored: 2,
            nvme_written: 2,
            written_through: 2,
            nvme_error: Some(crate::tier::nvme::NvmeError::Corrupt {
                slot: 0,
                reason: "a demotion's".into(),
            }),
            ..SaveReport::default()
        };
        assert_eq!(
            save_outcome(true, &demotion_failed),
            (Status::Ok, Tier::Nvme)
        );
        let own_failed = SaveReport {
            stored: 2,
            written_through: 1,
            write_through_failed: 1,
            ..SaveReport::default()
        };
        assert_eq!(save_outcome(true, &own_failed), (Status::Io, Tier::Nvme));
        let no_slot = SaveReport {
            stored: 2,
            written_through: 1,
            write_through_no_slot: 1,
            ..SaveReport::default()
        };
        assert_eq!(save_outcome(true, &no_slot), (Status::NoSpace, Tier::Nvme));
        // Without write-through, demotions it caused say nothing of where it landed.
        assert_eq!(
            save_outcome(false, &demotion_failed),
            (Status::Ok, Tier::Host)
        );
        let kept = SaveReport {
            hbm_stored: 1,
            ..SaveReport::default()
        };
        assert_eq!(save_outcome(false, &kept), (Status::Ok, Tier::Hbm));
    }

    /// A CLEAR_NAMESPACE visits every entry of its namespace, so it never runs on a
    /// data-plane thread, NVMe tier or not; a LOOKUP or a host-only SAVE does.
    #[test]
    fn a_clear_goes_to_the_io_threads_without_an_nvme_tier() {
        let mut tiers = crate::tier::TiersConfig::default();
        tiers.hbm.capacity_bytes = 0;
        tiers.host.capacity_bytes = 4 * (4096 + 8192);
        tiers.host.lock = false;
        tiers.host.touch_threads = 1;
        let blocks = crate::block::BlockConfig {
            block_bytes: 8192,
            ..crate::block::BlockConfig::default()
        };
        let manager = crate::block::BlockManager::new(
            &blocks,
            &tiers,
            crate::block::ManagerOptions::default(),
        )
        .unwrap();
        let dp = DataPlane::with_blocks(Arc::new(manager));
        let req = |opcode| Request {
            user_data: 1,
            opcode,
            flags: 0,
            namespace_id: 0,
            arg_offset: 0,
            arg_len: 0,
            count: 0,
            param0: 0,
            param1: 0,
        };
        assert!(dp.may_do_io(&req(Opcode::ClearNamespace), true));
        assert!(!dp.may_do_io(&req(Opcode::Lookup), true));
        assert!(
            !dp.may_do_io(&req(Opcode::Save), true),
            "no NVMe tier to wait on"
        );
    }

    /// A burst of `EVENT_OPEN_BURST` opens goes through, the next one waits an interval,
    /// and after a second `EVENT_OPENS_PER_S` more go through.
    #[test]
    fn event_opens_are_rate_limited_after_a_burst() {
        let t0 = Instant::now();
        let mut rate = OpenRate::default();
        let per_call = ffi::MAX_IPC_EVENTS as u32;
        for call in 0..EVENT_OPEN_BURST / per_call {
            assert_eq!(rate.admit(per_call, t0), Ok(()), "call {call} of the burst");
        }
        let wait = rate.admit(1, t0).unwrap_err();
        assert_eq!(wait, OpenRate::INTERVAL, "one open past the burst");
        assert_eq!(rate.admit(0, t0), Ok(()), "releasing opens nothing");
        let later = t0 + Duration::from_secs(1);
        assert_eq!(rate.admit(EVENT_OPENS_PER_S, later), Ok(()));
        assert!(rate.admit(1, later).is_err(), "the second's worth is used");
        // Idle for longer than the burst takes: the whole burst again, not more.
        let idle = later + Duration::from_secs(60);
        assert_eq!(rate.admit(EVENT_OPEN_BURST, idle), Ok(()));
        assert!(rate.admit(1, idle).is_err());
    }
}
