//! Sessions: the engine socket (see `socket`), the bounded attach handshake (see
//! `handshake`), admission against every session limit in one place (see `admission`),
//! and a fixed pool of data-plane threads that poll all admitted sessions' queue pairs
//! (spin, then one futex sleep on all their doorbells) and notice when an engine is gone
//! (see `pool`).

pub mod admission;
mod handshake;
pub mod pool;
pub mod socket;

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvplane_ffi::{self as ffi, Pod, Status, kvp_attach_reply};
use kvplane_shm::handshake::AttachRequest;
use kvplane_shm::window::HostWindow;
use kvplane_shm::{Geometry, Segment, ShmError, sys};

use crate::config::Config;
use crate::dataplane::io::{IoPool, IoSpawnError};
use crate::dataplane::{
    DataPlane, EngineMemory, MapLimits, NamespaceLimit, RegionError, SessionData, host_parts,
};
use admission::{Admission, Reservation};
use handshake::{Complete, Waker};
use socket::{SocketFile, SocketOwner, SocketPathError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    SocketPath(#[from] SocketPathError),
    #[error("creating the accept loop's wake-up eventfd: {0}")]
    Waker(#[source] io::Error),
    #[error("spawning thread {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    IoSpawn(#[from] IoSpawnError),
    #[error(
        "config key `serve.dataplane_cpus`: pinning a data-plane thread to CPU {cpu}: {source}"
    )]
    Pin {
        cpu: usize,
        #[source]
        source: io::Error,
    },
    #[error(
        "the data-plane threads sleep on many sessions' doorbells at once with futex_waitv, which this kernel lacks (Linux >= 5.16 needed): {0}"
    )]
    FutexWaitv(#[source] io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// What the daemon shares between the accept loop and session threads. Its tables hold
/// plain data that no panic leaves half-updated, so a poisoned lock (a session thread
/// panicked while holding it) is taken over, not propagated to every other session.
pub struct DaemonShared {
    pub config: Config,
    pub dataplane: Arc<DataPlane>,
    stop: AtomicBool,
    next_session: AtomicU64,
    sessions: Mutex<HashMap<u64, SessionSummary>>,
    /// The data-plane threads (sessions are assigned to them at attach).
    pool: pool::Pool,
    admission: Arc<Admission>,
    daemon_uid: u32,
    /// `serve.max_engine_mappings` and its per-uid share, resolved against
    /// vm.max_map_count at start-up.
    mapping_limits: crate::config::MappingLimits,
}

/// A live session, as `status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SessionSummary {
    pub session_id: u64,
    pub pid: i32,
    pub uid: u32,
    pub namespaces: Vec<String>,
    pub queue_pairs: u32,
}

/// A running daemon: the engine socket, its accept loop and handshake workers, the
/// data-plane threads and the I/O executors.
pub struct Daemon {
    shared: Arc<DaemonShared>,
    accept: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    dataplane_threads: Vec<JoinHandle<()>>,
    io: IoPool,
    waker: Arc<Waker>,
    socket: SocketFile,
    socket_path: PathBuf,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket_path", &self.socket_path)
            .finish()
    }
}

/// Who owns what the daemon creates for its engine socket. After a switch to run_as_uid
/// the daemon must still be able to remove its socket, so that uid owns it.
fn socket_owner(config: &Config) -> SocketOwner {
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    let (daemon_uid, daemon_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let s = &config.serve;
    SocketOwner {
        uid: s.run_as_uid.unwrap_or(daemon_uid),
        gid: s.socket_group.or(s.run_as_gid).unwrap_or(daemon_gid),
        mode: s.socket_mode,
    }
}

/// Checks (and creates, with its mode and group) the engine socket's directory, refusing
/// links and directories others can change, before anything else is put there (the
/// control socket lives next to the engine socket by default).
pub fn prepare_socket_dir(config: &Config) -> Result<(), DaemonError> {
    socket::prepare_dir(&config.serve.socket_path, socket_owner(config))?;
    Ok(())
}

impl Daemon {
    pub fn start(config: Config, dataplane: Arc<DataPlane>) -> Result<Daemon, DaemonError> {
        Daemon::bind(config, dataplane)?.start()
    }

    /// Binds the engine socket without serving it yet, so privileges can be dropped in
    /// between (before any session thread exists).
    pub fn bind(config: Config, dataplane: Arc<DataPlane>) -> Result<BoundDaemon, DaemonError> {
        // The uid that started the daemon (before any privilege drop) is the one that may
        // use namespaces when none are configured.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let daemon_uid = unsafe { libc::geteuid() };
        let (listener, socket) = socket::bind(&config.serve.socket_path, socket_owner(&config))?;
        dataplane.set_engine_event_timeout(std::time::Duration::from_millis(
            config.serve.engine_event_timeout_ms,
        ));
        Ok(BoundDaemon {
            config,
            dataplane,
            listener,
            socket,
            daemon_uid,
        })
    }
}

/// A daemon whose socket is bound but not yet served.
pub struct BoundDaemon {
    config: Config,
    dataplane: Arc<DataPlane>,
    listener: UnixListener,
    socket: SocketFile,
    daemon_uid: u32,
}

impl BoundDaemon {
    /// Starts the data-plane threads, the I/O executors, the accept loop and the
    /// handshake workers.
    pub fn start(self) -> Result<Daemon, DaemonError> {
        let BoundDaemon {
            config,
            dataplane,
            listener,
            socket,
            daemon_uid,
        } = self;
        let socket_path = config.serve.socket_path.clone();
        let (tx, rx) =
            crossbeam::channel::bounded::<Complete>(config.serve.max_pending_handshakes as usize);
        let workers_n = config.serve.handshake_workers;
        sys::futex_waitv_available().map_err(DaemonError::FutexWaitv)?;
        let mapping_limits = config
            .serve
            .engine_mapping_limits(crate::config::max_map_count())?;
        let mut io = IoPool::start(
            &dataplane,
            config.serve.io_threads as usize,
            config.serve.io_queue as usize,
        )?;
        let shared = Arc::new(DaemonShared {
            admission: Admission::new(&config),
            pool: pool::Pool::new(config.serve.dataplane_threads_resolved()),
            config,
            dataplane,
            stop: AtomicBool::new(false),
            next_session: AtomicU64::new(1),
            sessions: Mutex::new(HashMap::new()),
            daemon_uid,
            mapping_limits,
        });
        let dataplane_threads = match pool::start_threads(&shared, || io.submitter()) {
            Ok(t) => t,
            Err(e) => {
                io.shutdown();
                return Err(e);
            }
        };
        let waker = Arc::new(Waker::new().map_err(DaemonError::Waker)?);
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(f)
                .map_err(|source| DaemonError::Spawn { name, source })
        };
        let mut workers = Vec::new();
        for i in 0..workers_n {
            let (s, rx) = (Arc::clone(&shared), rx.clone());
            let started = spawn(
                format!("kvp-handshake-{i}"),
                Box::new(move || {
                    for c in rx {
                        start_session(&s, c);
                    }
                }),
            );
            match started {
                Ok(h) => workers.push(h),
                Err(e) => {
                    drop(tx);
                    for h in workers {
                        let _ = h.join();
                    }
                    stop_pool(&shared, dataplane_threads, &mut io);
                    return Err(e);
                }
            }
        }
        drop(rx);
        let (s, w) = (Arc::clone(&shared), Arc::clone(&waker));
        let budget = handshake::RegionBudget::new(
            s.config.serve.max_handshake_regions,
            s.config.serve.max_handshake_regions_per_uid,
        );
        let accept = match spawn(
            "kvp-accept".into(),
            Box::new(move || handshake::accept_loop(&s, listener, &w, tx, &budget)),
        ) {
            Ok(a) => a,
            Err(e) => {
                // The closure (and the queue's sender) is gone: the workers end.
                for h in workers {
                    let _ = h.join();
                }
                stop_pool(&shared, dataplane_threads, &mut io);
                return Err(e);
            }
        };
        tracing::info!(socket = %socket_path.display(), "kvplane daemon listening");
        Ok(Daemon {
            shared,
            accept: Some(accept),
            workers,
            dataplane_threads,
            io,
            waker,
            socket,
            socket_path,
        })
    }
}

impl Daemon {
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }
    pub fn shared(&self) -> &Arc<DaemonShared> {
        &self.shared
    }

    pub fn sessions(&self) -> Vec<SessionSummary> {
        self.shared.sessions()
    }

    /// Sessions each data-plane thread holds a place for (assigned and not yet given
    /// back), by thread index.
    pub fn dataplane_loads(&self) -> Vec<usize> {
        self.shared.pool.loads()
    }

    /// Stop accepting, end every session (engines see state DEAD and a closed socket),
    /// wait for the data-plane threads to finish their in-flight batches.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }
}

impl DaemonShared {
    /// Live sessions, by id.
    pub fn sessions(&self) -> Vec<SessionSummary> {
        let mut v: Vec<_> = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|s| s.session_id);
        v
    }
}

impl Daemon {
    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The eventfd wakes the accept loop's poll: no connection to the socket's path,
        // which may have been removed or replaced.
        self.waker.wake();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        // The accept loop dropped the queue's sender: workers finish what is queued.
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        // No session can be handed over any more: the data-plane threads end theirs
        // (waiting for operations out on the I/O threads), then the executors stop.
        let threads = std::mem::take(&mut self.dataplane_threads);
        stop_pool(&self.shared, threads, &mut self.io);
        let removal = self.socket.remove();
        tracing::debug!(path = %self.socket_path.display(), ?removal, "engine socket");
    }
}

/// Ends the data-plane threads (after `stop` or on a failed start) and then the I/O
/// executors.
fn stop_pool(shared: &DaemonShared, threads: Vec<JoinHandle<()>>, io: &mut IoPool) {
    shared.stop.store(true, Ordering::SeqCst);
    shared.pool.close();
    for t in threads {
        let _ = t.join();
    }
    io.shutdown();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop_and_join();
        }
    }
}

fn refuse(stream: &UnixStream, status: Status, message: &str) {
    tracing::warn!(status = %status, message, "attach refused");
    send_refusal(stream, status, message);
}

/// The refusal reply alone (callers that rate-limit their own logging). Best effort: a
/// peer that is gone or never reads gets nothing more.
fn send_refusal(stream: &UnixStream, status: Status, message: &str) {
    let _ = kvplane_shm::handshake::send_reply(
        stream,
        &kvplane_shm::handshake::refusal(status, message),
        None,
    );
}

/// Removes the session from the table and releases what it held, however the session
/// ends (detach, death, violation, a panic in one of its operations).
struct SessionGuard {
    shared: Arc<DaemonShared>,
    data: Option<SessionData>,
    /// Given back after the session's data, so a slot is free only once the session is.
    reservation: Option<Reservation>,
}

impl SessionGuard {
    /// What this guard releases, leaving it releasing nothing (for the reaper thread).
    fn take(&mut self) -> SessionGuard {
        SessionGuard {
            shared: Arc::clone(&self.shared),
            data: self.data.take(),
            reservation: self.reservation.take(),
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some(data) = &mut self.data {
            self.shared.dataplane.session_ended(data);
            self.shared
                .sessions
                .lock()
                .map(|mut s| s.remove(&data.id))
                .ok();
        }
        // Released before the counter drops: whoever sees `sessions_active` fall may
        // attach in the freed slot.
        drop(self.reservation.take());
        if self.data.is_some() {
            self.shared
                .dataplane
                .counters
                .sessions_active
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A handshake worker's part: admit a complete request (reserving its slot and a place on
/// a data-plane thread), reply, then hand the session to that thread, which serves it.
fn start_session(shared: &Arc<DaemonShared>, c: Complete) {
    // The request's regions stay charged to the handshake's budget until this returns
    // (their descriptors are closed by then, or owned by the session's memory).
    let Complete {
        regions: _regions,
        stream,
        req,
    } = c;
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let admitted = match admit(shared, &req, session_id) {
        Ok(x) => x,
        Err((status, message)) => {
            refuse(&stream, status, &message);
            return;
        }
    };
    let Some(place) = shared.pool.assign() else {
        refuse(
            &stream,
            Status::Busy,
            &format!(
                "every data-plane thread serves its maximum of {} sessions ({} in all; raise serve.dataplane_threads)",
                pool::MAX_SESSIONS_PER_THREAD,
                shared.pool.capacity()
            ),
        );
        return;
    };
    let Admitted {
        seg,
        geometry,
        data,
        reservation,
    } = admitted;
    let mut reply: kvp_attach_reply = Pod::zeroed();
    reply.magic = ffi::MAGIC;
    reply.abi_version = ffi::ABI_VERSION;
    reply.status = Status::Ok.raw();
    reply.session_id = session_id;
    reply.segment_bytes = geometry.segment_bytes;
    reply.daemon_pid = sys::getpid();
    reply.backend = crate::device::abi_backend(shared.dataplane.blocks());
    shared
        .dataplane
        .counters
        .sessions_active
        .fetch_add(1, Ordering::Relaxed);
    shared
        .dataplane
        .counters
        .sessions_total
        .fetch_add(1, Ordering::Relaxed);
    shared
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            session_id,
            SessionSummary {
                session_id,
                pid: req.peer.pid,
                uid: req.peer.uid,
                namespaces: req.namespaces.clone(),
                queue_pairs: req.num_queue_pairs,
            },
        );
    let guard = SessionGuard {
        shared: Arc::clone(shared),
        data: Some(data),
        reservation: Some(reservation),
    };
    if let Err(e) = kvplane_shm::handshake::send_reply(&stream, &reply, Some(seg.file())) {
        tracing::warn!(session = session_id, error = %e, "engine left during attach");
        return;
    }
    // The reply had a bounded send time; the session's socket is only polled from here.
    let _ = stream.set_write_timeout(None);
    tracing::info!(session = session_id, pid = req.peer.pid, uid = req.peer.uid, namespaces = ?req.namespaces, "session attached");
    place.hand_over(pool::Attached {
        guard,
        stream,
        seg,
        geometry,
        engine_pid: req.peer.pid,
        id: session_id,
    });
}

/// What admission hands a session thread.
struct Admitted {
    seg: Segment,
    geometry: Geometry,
    data: SessionData,
    reservation: Reservation,
}

/// Check the request against the config, reserve its share of the session limits (one
/// reserve-or-refuse: see `admission`), and create the segment. The reservation is held
/// by what is returned, and released if anything after it fails.
fn admit(
    shared: &DaemonShared,
    req: &AttachRequest,
    session_id: u64,
) -> Result<Admitted, (Status, String)> {
    let cfg = &shared.config.serve;
    if req.num_queue_pairs > cfg.max_queue_pairs {
        return Err((
            Status::BadArg,
            format!(
                "{} queue pairs asked, at most {}",
                req.num_queue_pairs, cfg.max_queue_pairs
            ),
        ));
    }
    if req.arena_bytes > cfg.max_arena_bytes {
        return Err((
            Status::BadArg,
            format!(
                "arena of {} bytes asked, at most {}",
                req.arena_bytes, cfg.max_arena_bytes
            ),
        ));
    }
    // Per-namespace limits (sessions, queue pairs, mapped bytes) bind a session through
    // the namespaces it names: where namespaces are configured, one naming none would
    // be bound by none of them.
    if req.namespaces.is_empty() && !shared.config.namespaces.is_empty() {
        return Err((
            Status::Namespace,
            "name at least one namespace: this daemon's limits are per namespace".into(),
        ));
    }
    for ns in &req.namespaces {
        if !shared
            .config
            .namespace_allowed(ns, req.peer.uid, shared.daemon_uid)
        {
            return Err((
                Status::Namespace,
                format!("uid {} may not use namespace `{ns}`", req.peer.uid),
            ));
        }
    }
    let reservation = shared
        .admission
        .reserve(req.peer.uid, &req.namespaces, req.num_queue_pairs)
        .map_err(|r| (Status::Busy, r.to_string()))?;
    let namespaces = shared
        .dataplane
        .bind_namespaces(&req.namespaces)
        .map_err(|e| (Status::Namespace, e.to_string()))?;
    let geometry = Geometry::new(
        req.num_queue_pairs,
        req.sq_entries,
        req.cq_entries,
        req.arena_bytes,
    )
    .map_err(|e| (Status::BadArg, e.to_string()))?;
    let seg = Segment::create(
        &geometry,
        session_id,
        req.peer.pid,
        req.namespaces.len() as u32,
    )
    .map_err(|e| (Status::Internal, e.to_string()))?;
    let engine = if req.kv_regions.is_empty() {
        None
    } else {
        Some(import_kv_regions(shared, req, &namespaces)?)
    };
    let data = SessionData::new(
        session_id,
        req.peer,
        namespaces,
        engine,
        geometry.queue_pairs.len(),
    );
    Ok(Admitted {
        seg,
        geometry,
        data,
        reservation,
    })
}

/// Imports an engine's KV regions, which the handshake checked field by field: refuses
/// hugetlb host memory unless the operator allowed it, charges the host mappings to the
/// daemon's and the namespaces' limits of mapped engine memory, and the host window's
/// mappings to `serve.max_engine_mappings`, first, then maps and
/// imports everything (see [`EngineMemory::import`]). GPU memory is not charged: it takes
/// no daemon address space (what a CUDA import maps has not been counted on a GPU).
fn import_kv_regions(
    shared: &DaemonShared,
    req: &AttachRequest,
    namespace_ids: &[u32],
) -> Result<EngineMemory, (Status, String)> {
    let cfg = &shared.config.serve;
    for (i, r) in req.kv_regions.iter().enumerate() {
        if r.backing == Some(sys::Backing::Hugetlb) && !cfg.allow_hugetlb_kv_buffers {
            return Err((
                Status::BadArg,
                format!(
                    "KV region #{i}: hugetlb refused, its pages can vanish (serve.allow_hugetlb_kv_buffers)"
                ),
            ));
        }
    }
    let limits: Vec<NamespaceLimit<'_>> = req
        .namespaces
        .iter()
        .zip(namespace_ids)
        .map(|(name, &id)| NamespaceLimit {
            id,
            name,
            max_mapped_bytes: shared
                .config
                .namespaces
                .iter()
                .find(|n| &n.name == name)
                .and_then(|n| n.max_mapped_bytes),
        })
        .collect();
    let parts = host_parts(&req.kv_regions);
    let host_bytes = parts
        .iter()
        .fold(0u64, |sum, &(_, bytes)| sum.saturating_add(bytes));
    // The host window's parts and the gaps between them (the session's segment, one
    // mapping, is bounded by serve.max_sessions and left to the other half).
    let mappings = HostWindow::mappings(&parts).map_err(|e| (Status::BadArg, e.to_string()))?;
    let map_limits = MapLimits {
        bytes: cfg.mapped_bytes_limit(),
        mappings: shared.mapping_limits.total,
        mappings_per_uid: shared.mapping_limits.per_uid,
    };
    let charge = shared
        .dataplane
        .mapped
        .charge(host_bytes, mappings, req.peer.uid, map_limits, &limits)
        .map_err(|e| (Status::NoSpace, e.to_string()))?;
    let queue_pairs = req.num_queue_pairs as usize;
    EngineMemory::import(
        shared.dataplane.device(),
        &req.kv_regions,
        queue_pairs,
        charge,
    )
    .map_err(|e| {
        let status = match e {
            RegionError::Device(_) => Status::Internal,
            RegionError::NoGpu { .. } => Status::Unsupported,
            _ => Status::BadArg,
        };
        (status, e.to_string())
    })
}

#[derive(Debug)]
enum End {
    Detached,
    EngineDied,
    Shutdown,
    Violation(ShmError),
    /// A copy faulted in the engine's KV buffer (its backing vanished).
    EngineMemoryFault(String),
    /// One of its operations panicked (a daemon bug): that session ends, the others are
    /// served.
    Panicked,
}

/// Submissions taken per queue pair per pass: bounded work before looking at the others,
/// so one busy queue pair cannot starve its siblings.
const BATCH: usize = 64;

/// How long a closed engine socket waits for the engine's exit to become visible before
/// the session counts as a clean detach. A dying process's files are closed before its
/// pidfd reports the exit, and `kill(pid, 0)` still finds it in between (the window is
/// short, but a preempted exit can stretch it), so a SIGKILLed engine can look alive for a
/// moment after its socket hangs up; without this grace it would be logged and counted as
/// a clean detach rather than a reclaimed session. The data-plane thread re-checks each
/// pass; it never waits.
const HANGUP_GRACE: Duration = Duration::from_millis(100);

/// Whether the engine process has exited (its pidfd, or its pid gone).
fn engine_exited(pidfd: Option<&std::os::fd::OwnedFd>, engine_pid: i32) -> bool {
    pidfd.is_some_and(|p| sys::poll_ready(p.as_raw_fd()).unwrap_or(false))
        || !sys::process_alive(engine_pid)
}

/// A small code for the rejected field, reported in `cqe.detail` so a client can tell
/// which field was wrong without parsing logs.
pub fn field_code(field: &str) -> u32 {
    match field {
        "opcode" => 1,
        "flags" => 2,
        "namespace_id" => 3,
        "arg_offset/arg_len" | "arg_offset" => 4,
        "arg_len" => 5,
        "count" => 6,
        "reserved" => 7,
        "param0" => 8,
        _ => 0,
    }
}
