//! The data-plane threads: a fixed number (`serve.dataplane_threads`, optionally pinned to
//! `serve.dataplane_cpus`) started with the daemon. Each owns the sessions assigned to it
//! at attach (the least-loaded thread, at most [`MAX_SESSIONS_PER_THREAD`]), polls all
//! their queue pairs round-robin (at most `BATCH` submissions per queue pair per pass),
//! and sleeps on all their doorbells at once (FUTEX_WAITV) plus its own wake word when
//! every one is idle. Operations that may wait on NVMe go to the I/O executors
//! (`dataplane::io`) with their session's data checked out; until the completion comes
//! back, that queue pair takes nothing, the session's other queue pairs are answered what
//! needs none of its data (NOPs, refusals), and every other session keeps being served.
//! A SAVE or LOAD served here launches its copy and is then in flight on the device: the
//! thread polls its event each pass (`DataPlane::poll`, never a blocking sync) and posts
//! the completion when it has landed; meanwhile that queue pair takes nothing new, the
//! others are served, and an idle thread sleeps at most [`DEVICE_POLL`] at a time.
//!
//! Liveness (socket hang-up, pidfd, stop) is checked for every owned session at least
//! every [`LIVENESS_PERIOD`]; a session ends (detach, death, violation, engine memory
//! fault, a panic in its operation): its thread marks it dead and logs why, and the
//! reaper thread releases what it held (its `SessionGuard`), then closes its connection.
//! A panic in a thread's loop outside every operation's guard ends all of that thread's
//! sessions the same way (one with an operation out once it is back), and the thread
//! goes on serving the sessions assigned to it later.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering, fence};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvplane_ffi::{Opcode, Pod, SessionState, Status, kvp_cqe, kvp_sqe};
use kvplane_shm::server::{self, Request, ServerHeader, ServerQueuePair, completion, validate_sqe};
use kvplane_shm::sys::{self, FutexWaiter};
use kvplane_shm::{Geometry, QpGeometry, Segment, ShmError};

use super::{
    BATCH, DaemonError, DaemonShared, End, HANGUP_GRACE, SessionGuard, engine_exited, field_code,
};
use crate::dataplane::io::{IoDone, IoJob, IoReturn, IoSubmitter};
use crate::dataplane::{Polled, Submitted};

/// Sessions one thread serves: FUTEX_WAITV takes at most 128 words, one is the thread's
/// own wake word.
pub const MAX_SESSIONS_PER_THREAD: usize = sys::FUTEX_WAITV_MAX - 1;

/// How often every owned session's engine is checked for life (and the daemon heartbeat
/// bumped), busy or idle; also the longest sleep.
const LIVENESS_PERIOD: Duration = Duration::from_millis(100);

/// The longest sleep while a session waits for something no doorbell announces: room in
/// a completion ring its engine does not drain, or room in the full I/O queue.
const BLOCKED_RETRY: Duration = Duration::from_millis(1);

/// The longest sleep while a session's copy is on the device: a completion is noticed at
/// most this late (a 5 MiB block crosses PCIe in about 100 us).
pub const DEVICE_POLL: Duration = Duration::from_micros(20);
/// A data-plane thread reads the clock once per this many idle passes, and after each
/// pass that worked (a pass over idle sessions is tens of nanoseconds, a clock read ~20 ns:
/// reading it every pass made the pass, and so the average wait of a submission before it
/// is polled, a third longer).
/// Everything timed from it (spin, liveness, hang-up grace) is microseconds or more.
const PASSES_PER_CLOCK_READ: u32 = 16;

/// An admitted session whose reply was sent, handed to its data-plane thread.
pub(super) struct Attached {
    pub guard: SessionGuard,
    pub stream: sys::TenantStream,
    pub seg: Segment,
    pub geometry: Geometry,
    pub engine_pid: i32,
    pub id: u64,
}

/// What the handshake side and the I/O executors share with one data-plane thread.
pub(super) struct PoolThread {
    index: usize,
    /// Futex word: bumped to wake the thread (a new session, an I/O completion, stop).
    wake: AtomicU32,
    /// Set while the thread sleeps (or is about to): wakers make the system call only then.
    sleeping: AtomicU32,
    /// Set by whoever sends on `inbox` or `done`: the thread looks at the channels only
    /// then (one load, instead of two `try_recv`s per pass).
    mail: AtomicBool,
    /// Sessions assigned (reserved at admission, released when the session is gone).
    load: AtomicUsize,
    inbox_tx: crossbeam::channel::Sender<Attached>,
    inbox_rx: crossbeam::channel::Receiver<Attached>,
    done_tx: crossbeam::channel::Sender<IoDone>,
    done_rx: crossbeam::channel::Receiver<IoDone>,
}

impl PoolThread {
    fn new(index: usize) -> PoolThread {
        // Both bounded by the sessions a thread can hold: each has at most one pending
        // hand-over and one operation out.
        let (inbox_tx, inbox_rx) = crossbeam::channel::bounded(MAX_SESSIONS_PER_THREAD);
        let (done_tx, done_rx) = crossbeam::channel::bounded(MAX_SESSIONS_PER_THREAD);
        PoolThread {
            index,
            wake: AtomicU32::new(0),
            sleeping: AtomicU32::new(0),
            mail: AtomicBool::new(false),
            load: AtomicUsize::new(0),
            inbox_tx,
            inbox_rx,
            done_tx,
            done_rx,
        }
    }

    /// After publishing work for the thread: flag it, and wake the thread if it sleeps.
    /// Pairs with the fence in `sleep` (Dekker): either it sees the work, or we see its
    /// flag.
    fn wake(&self) {
        // Release: a thread that reads the flag set (by its swap) sees the message sent.
        self.mail.store(true, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) != 0 {
            self.wake.fetch_add(1, Ordering::Release);
            sys::futex_wake_all(&self.wake);
        }
    }

    fn has_work(&self) -> bool {
        !self.inbox_rx.is_empty() || !self.done_rx.is_empty()
    }
}

impl IoReturn for PoolThread {
    fn io_done(&self, done: IoDone) {
        // Full only when sessions ended by a panic still had operations out beyond the
        // sessions the thread serves (one out per session): this executor then waits
        // for the thread to drain it.
        if self.done_tx.send(done).is_ok() {
            self.wake();
        }
    }
}

/// A thread slot reserved for a session being admitted; given back unless handed over.
pub(super) struct Assignment {
    thread: Arc<PoolThread>,
    handed: bool,
}

impl Assignment {
    /// Hands the session to its thread (which owns it from here).
    pub fn hand_over(mut self, a: Attached) {
        self.handed = true;
        if let Err(e) = self.thread.inbox_tx.try_send(a) {
            // Unreachable (the reservation guarantees room); the session ends here.
            tracing::error!(thread = self.thread.index, "data-plane thread inbox full");
            drop(e.into_inner());
            self.thread.load.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.thread.wake();
    }
}

impl Drop for Assignment {
    fn drop(&mut self) {
        if !self.handed {
            self.thread.load.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The data-plane threads, as the handshake side sees them.
pub(super) struct Pool {
    threads: Vec<Arc<PoolThread>>,
    /// Set once no session can be handed over any more (the handshake workers are
    /// joined): threads exit when they own nothing.
    closed: AtomicBool,
}

impl Pool {
    pub fn new(threads: usize) -> Pool {
        Pool {
            threads: (0..threads).map(|i| Arc::new(PoolThread::new(i))).collect(),
            closed: AtomicBool::new(false),
        }
    }

    /// Reserves a place on the least-loaded thread, or `None` when every thread serves
    /// its maximum.
    pub fn assign(&self) -> Option<Assignment> {
        loop {
            let t = self
                .threads
                .iter()
                .min_by_key(|t| t.load.load(Ordering::Acquire))?;
            let n = t.load.load(Ordering::Acquire);
            if n >= MAX_SESSIONS_PER_THREAD {
                return None;
            }
            if t.load
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Some(Assignment {
                    thread: Arc::clone(t),
                    handed: false,
                });
            }
        }
    }

    /// Places taken on each thread, by index.
    pub fn loads(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|t| t.load.load(Ordering::Acquire))
            .collect()
    }

    /// Most sessions the threads serve together.
    pub fn capacity(&self) -> usize {
        self.threads.len() * MAX_SESSIONS_PER_THREAD
    }

    pub fn wake_all(&self) {
        for t in &self.threads {
            t.wake.fetch_add(1, Ordering::Release);
            sys::futex_wake_all(&t.wake);
        }
    }

    /// No more hand-overs: threads finish their sessions and exit.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake_all();
    }
}

/// What is left of a session once its data-plane thread is done with it: the release of
/// what it held (its in-flight plans and leases, its admission slot, then the engine's
/// memory, whose unmapping, or unregistering from a GPU, takes long for a large buffer),
/// then the close of its connection, in that order (an engine that waits for the close
/// may then reuse that memory). The reaper thread drops it, so no release holds up a thread that
/// polls rings.
struct Remains {
    // Held to be dropped (field order is drop order); the guard gets back the session's
    // data when it comes home after the session ended.
    guard: SessionGuard,
    _stream: sys::TenantStream,
}

/// Hands `remains` to the reaper, or releases them here when it is that far behind.
fn reap(reaper: &crossbeam::channel::Sender<Remains>, remains: Remains) {
    if let Err(full) = reaper.try_send(remains) {
        drop(full.into_inner());
    }
}

/// Sessions' remains waiting for the reaper at most; past that, a data-plane thread
/// releases a session's itself.
const REAPER_QUEUE: usize = 1024;

/// Starts the data-plane threads of `shared.pool`, pinned per `serve.dataplane_cpus`, and
/// the reaper thread they hand ended sessions to (the last handle: joined after them, it
/// has released every session's remains when it returns).
pub(super) fn start_threads(
    shared: &Arc<DaemonShared>,
    io: impl Fn() -> Option<IoSubmitter>,
) -> Result<Vec<JoinHandle<()>>, DaemonError> {
    let cpus = shared.config.serve.dataplane_cpus.clone();
    let (reap_tx, reap_rx) = crossbeam::channel::bounded::<Remains>(REAPER_QUEUE);
    let reaper = std::thread::Builder::new()
        .name("kvp-reaper".into())
        .spawn(move || reap_rx.iter().for_each(drop))
        .map_err(|source| DaemonError::Spawn {
            name: "kvp-reaper".into(),
            source,
        })?;
    let mut handles = Vec::new();
    // On a failure: the threads started end (they own no session yet), then the reaper.
    let abandon = |handles: Vec<JoinHandle<()>>, reap_tx, reaper: JoinHandle<()>| {
        shared.pool.close();
        for h in handles {
            let _ = h.join();
        }
        drop(reap_tx);
        let _ = reaper.join();
    };
    for t in &shared.pool.threads {
        let (s, t) = (Arc::clone(shared), Arc::clone(t));
        let cpu = (!cpus.is_empty()).then(|| cpus[t.index % cpus.len()]);
        let Some(io) = io() else {
            break;
        };
        let reap = reap_tx.clone();
        let name = format!("kvp-dataplane-{}", t.index);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let h = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = sys::pin_to_cpu(cpu)
                {
                    let _ = ready_tx.send(Err((cpu, e)));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                run_thread(&s, &t, &io, &reap);
            })
            .map_err(|source| DaemonError::Spawn { name, source });
        let h = match h {
            Ok(h) => h,
            Err(e) => {
                abandon(handles, reap_tx, reaper);
                return Err(e);
            }
        };
        let pinned = ready_rx.recv().unwrap_or(Ok(()));
        handles.push(h);
        if let Err((cpu, source)) = pinned {
            abandon(handles, reap_tx, reaper);
            return Err(DaemonError::Pin { cpu, source });
        }
    }
    handles.push(reaper);
    Ok(handles)
}

/// One session as its thread serves it.
struct Served {
    // Field order is drop order: the views into the segment go before the segment.
    qps: Vec<ServerQueuePair<'static>>,
    header: ServerHeader<'static>,
    /// Shared with the I/O executor while an operation is out.
    seg: Arc<Segment>,
    geometry: Geometry,
    guard: SessionGuard,
    stream: sys::TenantStream,
    pidfd: Option<OwnedFd>,
    engine_pid: i32,
    id: u64,
    num_namespaces: u32,
    /// Submissions taken from each queue pair and not yet served (an operation went in
    /// flight or to the I/O pool in the middle of the batch): served first, in order,
    /// once that queue pair may go on.
    stashes: Vec<Stash>,
    /// The queue pair a pass starts at, moved on in each pass that had blocks left for
    /// the session: the thread's PASS_BLOCKS may run out within it, and must not always
    /// run out before the same queue pairs.
    first_qp: usize,
    /// An operation is with the I/O executors (the session's data with it).
    out: bool,
    /// The queue pair of the operation out or parked: it takes nothing until that one is
    /// back. The others go on with what needs none of the session's data.
    away_qp: usize,
    /// Bit q: queue pair q has an operation whose copy is on the device (its plan in the
    /// session's data), polled each pass; `in_flight_user_data[q]` is its user_data.
    in_flight: u32,
    in_flight_user_data: Vec<u64>,
    /// A job the full I/O queue refused, retried each pass.
    parked: Option<IoJob>,
    /// Why the session ends, once known; it ends when nothing is out.
    ending: Option<End>,
    /// When its socket hung up: not served any more; a detach, or an engine death that
    /// its pidfd shows within `HANGUP_GRACE` (checked each pass, never waited for).
    hung_up: Option<Instant>,
    /// Doorbell value read before the thread last set the session's sleeping flag.
    bell_seq: u32,
}

impl Drop for Served {
    fn drop(&mut self) {
        // `finish` drops a session only with nothing out or parked, and a thread that
        // panicked moves a session with an operation out to its orphans first (taking
        // its guard and connection). Anything else dropped with an operation out (a
        // panic that escaped even that) may still have the operation touch the engine's
        // memory: its connection stays open for good, so an engine that waits for the
        // daemon's close before reusing that memory (kvp_client_daemon_done) never does.
        // Copies in flight with the session's data at home need no check here: `guard`
        // drops before `stream` (field order) and waits for them.
        if self.out || self.parked.is_some() {
            self.stream.keep_open();
        }
    }
}

impl Served {
    /// The session's views into its segment; on a bad segment, the session back (to end
    /// it) with the reason. Runs once per attach, so the large error is no burden.
    #[allow(clippy::result_large_err)]
    fn new(a: Attached) -> Result<Served, (Attached, End)> {
        let seg = Arc::new(a.seg);
        // SAFETY: the segment lives on the heap behind `seg` (a stable address) for as
        // long as any clone of the Arc; the views made from this reference are stored in
        // the same `Served`, in fields dropped before `seg`, and never leave it, so no
        // view outlives the mapping.
        let seg_ref: &'static Segment = unsafe { &*Arc::as_ptr(&seg) };
        let parts = ServerHeader::new(seg_ref)
            .and_then(|h| Ok((h, server::server_queue_pairs(seg_ref, &a.geometry)?)));
        let (header, qps) = match parts {
            Ok(x) => x,
            Err(e) => {
                let seg = Arc::try_unwrap(seg).unwrap_or_else(|_| unreachable!("one owner"));
                return Err((Attached { seg, ..a }, End::Violation(e)));
            }
        };
        header.set_state(SessionState::Active);
        let num_namespaces = a
            .guard
            .data
            .as_ref()
            .map_or(0, |d| d.namespaces.len() as u32);
        let queue_pairs = qps.len();
        Ok(Served {
            qps,
            header,
            seg,
            geometry: a.geometry,
            guard: a.guard,
            // A pidfd catches the death of the engine even while its socket is shared
            // with a child that outlives it; the socket catches everything else.
            pidfd: sys::pidfd_open(a.engine_pid).ok(),
            stream: a.stream,
            engine_pid: a.engine_pid,
            id: a.id,
            num_namespaces,
            stashes: (0..queue_pairs).map(|_| Stash::default()).collect(),
            first_qp: 0,
            out: false,
            away_qp: 0,
            in_flight: 0,
            in_flight_user_data: vec![0; queue_pairs],
            parked: None,
            ending: None,
            hung_up: None,
            bell_seq: 0,
        })
    }

    /// Whether a pass would find something to do for this session now.
    fn ready(&mut self) -> bool {
        if !self.serving() {
            return false;
        }
        let away = self.away();
        let waiting = self.waiting_qps();
        let num_namespaces = self.num_namespaces;
        self.qps
            .iter_mut()
            .zip(&self.stashes)
            .enumerate()
            .filter(|&(q, _)| waiting & (1 << q) == 0)
            .any(|(_, (qp, stash))| {
                if stash.pending() {
                    // With the data away, a stash whose next operation needs it waits
                    // for the data's return (which wakes the thread), not for a pass.
                    !away || !needs_data(&stash.entries[stash.at], &qp.geometry, num_namespaces)
                } else {
                    qp.can_take().unwrap_or(true)
                }
            })
    }

    /// Still taking submissions (not ending, socket open); a queue pair with an operation
    /// in flight or away takes none until it completes.
    fn serving(&self) -> bool {
        self.ending.is_none() && self.hung_up.is_none()
    }

    /// The session's data is away: out with an I/O executor or in a job parked for one.
    fn away(&self) -> bool {
        self.out || self.parked.is_some()
    }

    /// Bit q: queue pair q takes no submission now, its operation in flight on the device
    /// or away with the session's data.
    fn waiting_qps(&self) -> u32 {
        self.in_flight | if self.away() { 1 << self.away_qp } else { 0 }
    }

    /// An operation is out (I/O executors) or in flight (device): the session can end
    /// only once each is back, since its plan holds slots and its copy our memory.
    fn busy(&self) -> bool {
        self.out || self.in_flight != 0
    }

    /// Busy only with a SAVE waiting for its engine's event, which holds nothing: an
    /// ending session need not wait for that event (it may never complete).
    fn in_flight_holds_nothing(&self) -> bool {
        !self.out
            && self.in_flight != 0
            && self
                .guard
                .data
                .as_ref()
                .is_some_and(|d| d.in_flight_holds_nothing())
    }

    /// Waiting for something no doorbell announces: room in the I/O queue or in a
    /// completion ring, or the end of a hang-up's grace period. (A queue pair waiting for
    /// the operation out, or for the data to come home with it, is not: its return wakes
    /// the thread.)
    fn blocked(&self) -> bool {
        let waiting = self.waiting_qps();
        self.ending.is_none()
            && (self.parked.is_some()
                || self.hung_up.is_some()
                || (0..self.qps.len()).any(|q| {
                    waiting & (1 << q) == 0
                        && !self.stashes[q].pending()
                        && self.qps[q].has_submissions()
                }))
    }

    /// A hung-up socket's verdict once known: the engine exited (death), or the grace
    /// period passed (detach).
    fn judge_hangup(&mut self, now: Instant) {
        if let (Some(since), None) = (self.hung_up, &self.ending) {
            if engine_exited(self.pidfd.as_ref(), self.engine_pid) {
                self.ending = Some(End::EngineDied);
            } else if now.duration_since(since) >= HANGUP_GRACE {
                self.ending = Some(End::Detached);
            }
        }
    }

    fn check_liveness(&mut self, stop: bool, now: Instant) {
        self.header.heartbeat();
        if self.ending.is_some() {
            return;
        }
        if stop {
            self.ending = Some(End::Shutdown);
        } else if self.hung_up.is_none() && sys::socket_hung_up(&self.stream) {
            self.hung_up = Some(now);
            self.judge_hangup(now);
        } else if self
            .pidfd
            .as_ref()
            .is_some_and(|p| sys::poll_ready(p.as_raw_fd()).unwrap_or(false))
        {
            self.ending = Some(End::EngineDied);
        }
    }
}

/// Submissions taken from one queue pair, `entries[at..len]` not served yet. The buffer
/// is allocated when the queue pair is first used (most engines use one or two).
#[derive(Default)]
struct Stash {
    entries: Box<[kvp_sqe]>,
    len: usize,
    at: usize,
}

impl Stash {
    fn pending(&self) -> bool {
        self.at < self.len
    }
}

/// The thread's scratch, allocated once.
struct Scratch {
    cqes: Vec<kvp_cqe>,
}

/// A data-plane thread: serves its sessions until the pool closes. A panic outside the
/// guard around each operation (a bug in the loop itself) ends every session the thread
/// holds, since any of them may be half-updated, and the thread goes on with an empty
/// table: the sessions of other threads never notice, and new sessions assigned to this
/// one are served.
fn run_thread(
    shared: &Arc<DaemonShared>,
    me: &Arc<PoolThread>,
    io: &IoSubmitter,
    reaper: &crossbeam::channel::Sender<Remains>,
) {
    let mut table = Table {
        slots: (0..MAX_SESSIONS_PER_THREAD).map(|_| None).collect(),
        orphans: Vec::with_capacity(MAX_SESSIONS_PER_THREAD),
        owned: 0,
    };
    let mut panics = 0u32;
    while let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_sessions(shared, me, io, reaper, &mut table)
    })) {
        panics = panics.saturating_add(1);
        let what = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        // A bug that panics every pass must not flood the log: the 1st, 2nd, 4th, ...
        if panics.is_power_of_two() {
            tracing::error!(
                thread = me.index,
                sessions = table.slots.iter().flatten().count(),
                panics,
                panic = what,
                "data-plane thread panicked outside an operation; ending its sessions and going on"
            );
        }
        shared
            .dataplane
            .counters
            .dataplane_thread_panics
            .fetch_add(1, Ordering::Relaxed);
        let Table {
            slots,
            orphans,
            owned,
        } = &mut table;
        for mut s in slots.iter_mut().filter_map(Option::take) {
            give_back_place(me, owned);
            s.ending.get_or_insert(End::Panicked);
            // Ending it may panic too (the same bad state): then what unwinding drops is
            // released on this thread, and the next session is ended all the same.
            let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if !s.out {
                    return finish(shared, s, reaper);
                }
                // Its operation is still with an I/O executor, holding the session's data
                // (and so its plans): released, and the connection closed, when it comes
                // back.
                let remains = end_session(shared, &mut s);
                orphans.push((s.id, remains));
            }));
            if ended.is_err() {
                tracing::error!(thread = me.index, "ending a session after a panic panicked");
            }
        }
        // Sessions the panic caught between the inbox and a slot, or between a slot and
        // the reaper: unwinding released them, their places are given back here.
        me.load.fetch_sub(std::mem::take(owned), Ordering::AcqRel);
        // Nor spin: each panic in a row waits longer before the thread goes on (1 ms,
        // doubling, at most 1 s; the thread's sessions are gone meanwhile anyway).
        std::thread::sleep(BLOCKED_RETRY * (1u32 << panics.min(10)).min(1000));
    }
}

/// The sessions of one data-plane thread.
struct Table {
    /// Served sessions; a session's slot is its handle with the I/O executors.
    slots: Vec<Option<Served>>,
    /// Sessions ended after a panic while an operation was out with the I/O executors,
    /// by id: released when it comes back with their data (one per such session; their
    /// places on the thread are given back at once).
    orphans: Vec<(u64, Remains)>,
    /// Sessions taken from the inbox whose place on the thread (`load`) is not given
    /// back yet: a panic may catch one in neither a slot nor the reaper.
    owned: usize,
}

/// Gives back the place on the thread of a session taken from its inbox.
fn give_back_place(me: &PoolThread, owned: &mut usize) {
    *owned -= 1;
    me.load.fetch_sub(1, Ordering::AcqRel);
}

/// An I/O executor's result for a session not in its slot any more (its thread ended it
/// after a panic): the session's data goes back to what it held, and all of it to the
/// reaper.
fn release_orphan(
    shared: &Arc<DaemonShared>,
    orphans: &mut Vec<(u64, Remains)>,
    d: IoDone,
    reaper: &crossbeam::channel::Sender<Remains>,
) {
    let id = d.data.id;
    let Some(k) = orphans.iter().position(|(o, _)| *o == id) else {
        // Unreachable: a session with an operation out is in its slot or an orphan.
        tracing::error!(
            session = id,
            "an operation came back for an unknown session"
        );
        drop(SessionGuard {
            shared: Arc::clone(shared),
            data: Some(d.data),
            reservation: None,
        });
        return;
    };
    let mut remains = orphans.swap_remove(k).1;
    remains.guard.data = Some(d.data);
    reap(reaper, remains);
}

/// The loop of [`run_thread`] over `slots` (empty when it starts).
fn serve_sessions(
    shared: &Arc<DaemonShared>,
    me: &Arc<PoolThread>,
    io: &IoSubmitter,
    reaper: &crossbeam::channel::Sender<Remains>,
    table: &mut Table,
) {
    let Table {
        slots,
        orphans,
        owned,
    } = table;
    // The mail flag may have been taken by a pass a panic cut short: look at the
    // channels once in any case.
    me.mail.store(true, Ordering::Relaxed);
    let back: Arc<dyn IoReturn> = Arc::clone(me) as Arc<dyn IoReturn>;
    // Every slot at or past `high` is empty. A pass visits only `slots[..high]`: walking
    // all of them (about 1.4 KiB apart) costs a pass a few hundred ns of cache misses, which
    // a submission waits for on average half of before the thread polls its ring.
    let mut high = 0usize;
    // Where a pass begins: after the session that spent the last pass's block budget.
    let mut first_slot = 0usize;
    let mut scratch = Scratch {
        cqes: Vec::with_capacity(BATCH),
    };
    let spin = Duration::from_micros(shared.config.serve.spin_us);
    let mut now = Instant::now();
    let mut last_work = now;
    let mut next_check = last_work + LIVENESS_PERIOD;
    let mut passes = 0u32;
    loop {
        let mut worked = false;
        // Acquire: pairs with the release in `wake`, so the messages are there. A message
        // sent after the swap sets the flag again for the next pass.
        let mail = me.mail.load(Ordering::Relaxed) && me.mail.swap(false, Ordering::Acquire);
        while let Some(a) = mail.then(|| me.inbox_rx.try_recv().ok()).flatten() {
            worked = true;
            *owned += 1;
            let Some(free) = slots.iter().position(Option::is_none) else {
                // Unreachable: the load reservation bounds the sessions.
                tracing::error!(session = a.id, "data-plane thread full");
                give_back_place(me, owned);
                continue;
            };
            match Served::new(a) {
                Ok(s) => {
                    slots[free] = Some(s);
                    high = high.max(free + 1);
                }
                Err((a, end)) => {
                    give_back_place(me, owned);
                    let _ = server::mark_dead(&a.seg, &a.geometry);
                    log_end(shared, a.id, &end);
                    let remains = Remains {
                        guard: a.guard,
                        _stream: a.stream,
                    };
                    reap(reaper, remains);
                }
            }
        }
        while let Some(d) = mail.then(|| me.done_rx.try_recv().ok()).flatten() {
            worked = true;
            match slots.get_mut(d.slot as usize).and_then(Option::as_mut) {
                Some(s) if s.out && s.id == d.data.id => returned(shared, s, d, &mut scratch),
                _ => release_orphan(shared, orphans, d, reaper),
            }
        }
        let stop = shared.stop.load(Ordering::Relaxed);
        passes = passes.wrapping_add(1);
        if passes % PASSES_PER_CLOCK_READ == 0 {
            now = Instant::now();
        }
        // Blocks this pass may touch inline, all sessions together (PASS_BLOCKS). Once
        // they are spent, the sessions after are served only what needs none of their
        // data (NOPs, refusals), and the next pass starts with the first of them, so each
        // session's operations get their turn and a NOP waits for one budget at most.
        let mut blocks_left = PASS_BLOCKS;
        let start = if first_slot < high { first_slot } else { 0 };
        for i in (start..high).chain(0..start) {
            let slot = &mut slots[i];
            let Some(s) = slot else { continue };
            // An ending session's job still waiting for room in the I/O queue will not be
            // served: its data comes home, so that its operations in flight are polled
            // and it can end.
            if s.ending.is_some()
                && let Some(job) = s.parked.take()
            {
                s.guard.data = Some(job.data);
            }
            // The session's data (which holds the operations in flight) may be with an
            // I/O executor, or in a job parked for one (a hand-off from the previous
            // queue pair's poll, too): polled again once it is home.
            for qp in 0..s.qps.len() {
                if s.in_flight & (1 << qp) != 0 && s.guard.data.is_some() {
                    let at = (i as u32, qp);
                    worked |= poll_in_flight(shared, s, at, io, &back, &mut scratch);
                }
            }
            if s.serving() {
                let had_blocks = blocks_left > 0;
                worked |= serve(
                    shared,
                    s,
                    i as u32,
                    io,
                    &back,
                    &mut scratch,
                    &mut blocks_left,
                );
                if had_blocks && blocks_left == 0 {
                    first_slot = i + 1;
                }
            }
            s.judge_hangup(now);
            if stop && s.ending.is_none() {
                s.ending = Some(End::Shutdown);
            }
            if s.ending.is_some() && (!s.busy() || s.in_flight_holds_nothing()) {
                let s = slot.take().expect("checked above");
                give_back_place(me, owned);
                finish(shared, s, reaper);
            }
        }
        while high > 0 && slots[high - 1].is_none() {
            high -= 1;
        }
        if now >= next_check {
            next_check = now + LIVENESS_PERIOD;
            shared.dataplane.injected_thread_panic_point();
            for s in slots[..high].iter_mut().flatten() {
                s.check_liveness(stop, now);
            }
        }
        if shared.pool.closed.load(Ordering::SeqCst)
            && high == 0
            && orphans.is_empty()
            && me.inbox_rx.is_empty()
        {
            return;
        }
        if worked {
            // A pass that worked may have taken long: the spin counts from its end.
            now = Instant::now();
            last_work = now;
            continue;
        }
        if now.duration_since(last_work) < spin {
            std::hint::spin_loop();
            continue;
        }
        sleep(
            me,
            &mut slots[..high],
            next_check.saturating_duration_since(now),
        );
        now = Instant::now();
        last_work = now;
    }
}

/// Sleeps on every owned session's doorbell and the thread's wake word, unless something
/// is ready after announcing it (each session's sleeping flag is set first, so an engine
/// that submits from here on rings the futex).
fn sleep(me: &PoolThread, slots: &mut [Option<Served>], until_check: Duration) {
    let wake_seq = me.wake.load(Ordering::Acquire);
    me.sleeping.store(1, Ordering::SeqCst);
    let mut blocked = false;
    let mut polling = false;
    for s in slots.iter_mut().flatten() {
        let bell = s.header.doorbell;
        s.bell_seq = bell.word().load(Ordering::Acquire);
        bell.sleeping_flag().store(1, Ordering::SeqCst);
        blocked |= s.blocked();
        polling |= s.in_flight != 0 && s.guard.data.is_some();
    }
    fence(Ordering::SeqCst);
    let ready = me.has_work() || slots.iter_mut().flatten().any(Served::ready);
    if !ready {
        let timeout = if polling {
            DEVICE_POLL
        } else if blocked {
            BLOCKED_RETRY
        } else {
            until_check.max(Duration::from_millis(1))
        };
        let waiters = slots
            .iter()
            .flatten()
            .map(|s| FutexWaiter {
                word: s.header.doorbell.word(),
                expected: s.bell_seq,
            })
            .chain(std::iter::once(FutexWaiter {
                word: &me.wake,
                expected: wake_seq,
            }));
        if let Err(e) = sys::futex_waitv(waiters, timeout) {
            // Checked at start-up; a failure here is a bug, not a reason to spin.
            tracing::error!(error = %e, "futex_waitv failed");
            std::thread::sleep(BLOCKED_RETRY);
        }
    }
    for s in slots.iter_mut().flatten() {
        s.header
            .doorbell
            .sleeping_flag()
            .store(0, Ordering::Relaxed);
    }
    me.sleeping.store(0, Ordering::Relaxed);
}

/// One pass over a session: its parked job, then each queue pair's stash and next batch
/// (with the session's data away, only what needs none of it). Returns whether it did
/// anything.
fn serve(
    shared: &DaemonShared,
    s: &mut Served,
    slot: u32,
    io: &IoSubmitter,
    back: &Arc<dyn IoReturn>,
    scratch: &mut Scratch,
    blocks_left: &mut u64,
) -> bool {
    let mut worked = false;
    if let Some(job) = s.parked.take() {
        match io.try_submit(job) {
            Ok(()) => {
                s.out = true;
                worked = true;
            }
            Err(job) => s.parked = Some(job),
        }
    }
    let n = s.qps.len();
    // (no division on this path: it runs once per pass, NOPs included)
    let first = if s.first_qp < n { s.first_qp } else { 0 };
    // Moved on only in a pass with blocks left for this session: moved on in every pass,
    // it could line up with the passes in which the session gets the thread's budget and
    // always hand that budget to the same queue pairs.
    if *blocks_left > 0 {
        s.first_qp = first + 1;
    }
    for qp in (first..n).chain(0..first) {
        if s.waiting_qps() & (1 << qp) != 0 {
            continue; // its next submissions wait for the one on the device or away
        }
        let at = s.stashes[qp].at;
        if !s.stashes[qp].pending() {
            let stash = &mut s.stashes[qp];
            if stash.entries.is_empty() {
                // Once per queue pair and session, not per operation.
                stash.entries = vec![Pod::zeroed(); BATCH].into_boxed_slice();
            }
            let n = match s.qps[qp].take(&mut stash.entries) {
                Ok(n) => n,
                Err(e) => {
                    s.ending = Some(End::Violation(e));
                    return true;
                }
            };
            if n == 0 {
                continue;
            }
            (stash.len, stash.at) = (n, 0);
            worked = true;
        }
        if let Err(end) = run_stash(shared, s, qp, slot, io, back, scratch, blocks_left) {
            s.ending = Some(end);
            return true;
        }
        // Nothing served: the stash waits for the session's data (see `ready`).
        worked |= s.stashes[qp].at != at;
    }
    worked
}

/// Whether serving `sqe` needs the session's data (the block manager, its plans, its
/// engine memory): everything but a NOP and a submission refused on its face.
fn needs_data(sqe: &kvp_sqe, geometry: &QpGeometry, num_namespaces: u32) -> bool {
    validate_sqe(sqe, geometry, num_namespaces).is_ok_and(|req| req.opcode != Opcode::Nop)
}

/// Blocks one pass of a data-plane thread may name in the operations it serves inline,
/// all its sessions together (each operation counts at least one, and one begun is served
/// whole): a pass is bounded by its work, not by entries or sessions, so sessions whose
/// every entry names 65,536 blocks hold the thread, and the NOPs of the others on it, for
/// one such batch of blocks at a time, not 64 per queue pair and session.
const PASS_BLOCKS: u64 = 1 << 16;

/// Serves the stashed submissions of queue pair `qp` in order, inline, until one that may
/// wait on NVMe (the completions so far are posted and that one goes to the I/O pool) or
/// one that needs the session's data while it is away or the pass's `blocks_left` are
/// spent (it and the rest stay stashed for a later pass).
#[allow(clippy::too_many_arguments)]
fn run_stash(
    shared: &DaemonShared,
    s: &mut Served,
    qp: usize,
    slot: u32,
    io: &IoSubmitter,
    back: &Arc<dyn IoReturn>,
    scratch: &mut Scratch,
    blocks_left: &mut u64,
) -> Result<(), End> {
    scratch.cqes.clear();
    let dp = &shared.dataplane;
    let mut handoff = None;
    while s.stashes[qp].pending() {
        let stash = &mut s.stashes[qp];
        let sqe = stash.entries[stash.at];
        stash.at += 1;
        let q = &s.qps[qp];
        let cqe = match validate_sqe(&sqe, &q.geometry, s.num_namespaces) {
            // A NOP (liveness ping, the ring benchmark) is answered right here, outside
            // the latency histogram: nothing it does needs the data plane, and the path
            // below (panic guard, the session's data, clock reads, the in-flight poll)
            // would be most of what a NOP costs (`bench ring`: p50 / floor 1.8-1.9x
            // through it, 1.6x here).
            Ok(req) if req.opcode == Opcode::Nop => completion(req.user_data, Status::Ok),
            // The session's data is away (another queue pair's operation is with the I/O
            // executors, or this batch just sent one), or the pass's blocks are spent:
            // this one waits, stashed.
            Ok(_) if s.guard.data.is_none() || *blocks_left == 0 => {
                s.stashes[qp].at -= 1;
                break;
            }
            Ok(req) if dp.may_do_io(&req, true) => {
                handoff = Some(req);
                break;
            }
            Ok(req) => {
                *blocks_left = blocks_left.saturating_sub(u64::from(req.count).max(1));
                let data = s.guard.data.as_mut().expect("held while nothing is out");
                // Launched copies are polled once at once: on the host backend (no
                // completion delay) they have landed already, and the batch goes on.
                // An early completion (a LOAD whose engine waits on an IPC event) is posted
                // at once, before its copy lands.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    match dp.submit(data, &s.seg, &req, qp) {
                        Submitted::Done(c) => (Some(c), Polled::Done(None)),
                        Submitted::InFlight => {
                            let early = dp.take_early_completion(data, qp);
                            (early, dp.poll(data, &s.seg, qp))
                        }
                    }
                })) {
                    Ok((early, polled)) => {
                        scratch.cqes.extend(early);
                        match polled {
                            Polled::Done(last) => {
                                scratch.cqes.extend(last);
                                continue;
                            }
                            Polled::InFlight => {
                                // On the device: the rest of this queue pair's stash
                                // waits for it.
                                s.in_flight |= 1 << qp;
                                s.in_flight_user_data[qp] = req.user_data;
                                break;
                            }
                            Polled::HandOff(req) => {
                                handoff = Some(req);
                                break;
                            }
                        }
                    }
                    Err(_) => {
                        tracing::error!(session = s.id, opcode = ?req.opcode, "an operation panicked; ending the session");
                        scratch
                            .cqes
                            .push(completion(req.user_data, Status::Internal));
                        post(shared, s, qp, scratch)?;
                        return Err(End::Panicked);
                    }
                }
            }
            Err(rejection) => {
                let mut c = completion(sqe.user_data, rejection.status);
                c.detail = field_code(rejection.field);
                tracing::debug!(session = s.id, qp, field = rejection.field, status = %rejection.status, "submission rejected");
                c
            }
        };
        scratch.cqes.push(cqe);
    }
    post(shared, s, qp, scratch)?;
    if let Some(end) = s.guard.data.as_ref().and_then(data_fault) {
        return Err(end);
    }
    if let Some(req) = handoff {
        hand_to_io(s, slot, qp, req, io, back);
    }
    Ok(())
}

/// Checks the session out to the I/O executors with `req` (parked when their queue is
/// full; retried on later passes).
fn hand_to_io(
    s: &mut Served,
    slot: u32,
    qp: usize,
    req: Request,
    io: &IoSubmitter,
    back: &Arc<dyn IoReturn>,
) {
    let data = s.guard.data.take().expect("held while nothing is out");
    s.away_qp = qp;
    let job = IoJob {
        slot,
        queue_pair: qp as u32,
        data,
        seg: Arc::clone(&s.seg),
        req,
        back: Arc::clone(back),
    };
    match io.try_submit(job) {
        Ok(()) => s.out = true,
        Err(job) => s.parked = Some(job),
    }
}

/// Polls the session's operation in flight on queue pair `qp`; once its copy has landed,
/// posts its completion (room was reserved when it was taken). Returns whether it did.
fn poll_in_flight(
    shared: &DaemonShared,
    s: &mut Served,
    (slot, qp): (u32, usize),
    io: &IoSubmitter,
    back: &Arc<dyn IoReturn>,
    scratch: &mut Scratch,
) -> bool {
    let dp = &shared.dataplane;
    let data = s.guard.data.as_mut().expect("held while in flight");
    let polled =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dp.poll(data, &s.seg, qp)));
    let cqe = match polled {
        Ok(Polled::Done(c)) => c,
        Ok(Polled::InFlight) => return false,
        Ok(Polled::HandOff(req)) => {
            s.in_flight &= !(1 << qp);
            hand_to_io(s, slot, qp, req, io, back);
            return true;
        }
        Err(_) => {
            tracing::error!(
                session = s.id,
                "completing an operation panicked; ending the session"
            );
            s.in_flight &= !(1 << qp);
            s.ending.get_or_insert(End::Panicked);
            // Its completion, so the engine does not wait for it; what the operation
            // held is released when the session ends (`DataPlane::session_ended`).
            scratch.cqes.clear();
            scratch
                .cqes
                .push(completion(s.in_flight_user_data[qp], Status::Internal));
            let _ = post(shared, s, qp, scratch);
            return true;
        }
    };
    s.in_flight &= !(1 << qp);
    scratch.cqes.clear();
    scratch.cqes.extend(cqe);
    let posted = post(shared, s, qp, scratch);
    if s.ending.is_some() {
        return true;
    }
    if let Err(end) = posted {
        s.ending = Some(end);
    } else if let Some(end) = s.guard.data.as_ref().and_then(data_fault) {
        s.ending = Some(end);
    }
    true
}

/// Why the session must end after an operation, if one of its copies failed in a way
/// that leaves it unusable: its engine's memory faulted, or a copy failed on the device
/// after its LOAD had been completed early.
fn data_fault(data: &crate::dataplane::SessionData) -> Option<End> {
    if let Some(fault) = data.engine_fault() {
        return Some(End::EngineMemoryFault(fault.to_string()));
    }
    data.device_fault()
        .map(|e| End::EngineMemoryFault(format!("device copy failed after completion: {e}")))
}

/// Posts the completions in `scratch` on queue pair `qp` (room was reserved by `take`).
fn post(
    shared: &DaemonShared,
    s: &mut Served,
    qp: usize,
    scratch: &mut Scratch,
) -> Result<(), End> {
    if scratch.cqes.is_empty() {
        return Ok(());
    }
    // A short count means the engine published a head that shrank our free space, which
    // only a broken peer does.
    let r = match s.qps[qp].complete(&scratch.cqes) {
        Ok(k) if k == scratch.cqes.len() => Ok(()),
        Ok(_) => Err(End::Violation(ShmError::BadSegment {
            session_id: s.id,
            reason: "completion ring head moved backwards".into(),
        })),
        Err(e) => Err(End::Violation(e)),
    };
    // Counted after they are posted: the counters' atomics are not on the engine's wait.
    shared.dataplane.count(&scratch.cqes);
    scratch.cqes.clear();
    r
}

/// An operation came back from the I/O pool: the session's data returns, its completion
/// is posted, and the rest of its batch is served on the next pass.
fn returned(shared: &DaemonShared, s: &mut Served, d: IoDone, scratch: &mut Scratch) {
    s.out = false;
    s.guard.data = Some(d.data);
    scratch.cqes.clear();
    scratch.cqes.push(d.cqe);
    let posted = post(shared, s, d.queue_pair as usize, scratch);
    if s.ending.is_some() {
        return;
    }
    if d.panicked {
        s.ending = Some(End::Panicked);
    } else if let Err(end) = posted {
        s.ending = Some(end);
    } else if let Some(end) = s.guard.data.as_ref().and_then(data_fault) {
        s.ending = Some(end);
    }
}

/// The session is over: tell the engine (state DEAD, its waiters woken), log why, and
/// hand what it held, and then its connection, to the reaper to release ([`Remains`]);
/// when the reaper is that far behind, release them here.
fn finish(shared: &DaemonShared, mut s: Served, reaper: &crossbeam::channel::Sender<Remains>) {
    if let Some(job) = s.parked.take() {
        // Never queued: its session data comes home, so the guard releases it.
        s.guard.data = Some(job.data);
    }
    let remains = end_session(shared, &mut s);
    // Nothing is out or parked (`finish` is called only then): the views and the segment
    // go here, before the guard, as they always did.
    drop(s);
    reap(reaper, remains);
}

/// Tells the engine its session is over (state DEAD, waiters woken), logs why, and takes
/// what the session holds and its connection, to be released in that order.
fn end_session(shared: &DaemonShared, s: &mut Served) -> Remains {
    let _ = server::mark_dead(&s.seg, &s.geometry);
    if let Some(end) = &s.ending {
        log_end(shared, s.id, end);
    }
    Remains {
        guard: s.guard.take(),
        _stream: s.stream.take(),
    }
}

pub(super) fn log_end(shared: &DaemonShared, session: u64, end: &End) {
    let c = &shared.dataplane.counters;
    match end {
        End::Detached | End::Shutdown => {
            tracing::info!(session, reason = ?end, "session ended")
        }
        End::EngineDied => {
            c.sessions_reclaimed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(session, "engine died; session reclaimed")
        }
        End::EngineMemoryFault(e) => {
            tracing::warn!(session, error = %e, "engine memory fault; session ended")
        }
        End::Violation(e) => {
            c.protocol_violations.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(session, error = %e, "protocol violation; session ended")
        }
        End::Panicked => {
            c.sessions_panicked.fetch_add(1, Ordering::Relaxed);
            tracing::error!(session, "serving the session panicked; session ended")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_picks_the_least_loaded_thread_and_refuses_beyond_the_bound() {
        let pool = Pool::new(2);
        let a = pool.assign().unwrap();
        let b = pool.assign().unwrap();
        assert_ne!(a.thread.index, b.thread.index, "spread over both threads");
        drop(a);
        let c = pool.assign().unwrap();
        assert_ne!(c.thread.index, b.thread.index, "the freed place is reused");
        let mut held = vec![b, c];
        while let Some(x) = pool.assign() {
            held.push(x);
        }
        assert_eq!(held.len(), pool.capacity());
        assert!(pool.assign().is_none(), "every thread at its bound");
        held.pop();
        assert!(pool.assign().is_some(), "a place freed by a session's end");
    }
}
