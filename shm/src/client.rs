//! The Rust client engines use (and tests, benches, the simulated engine, the C library).
//!
//! `Session::attach` performs the handshake and maps the segment; `take_queue_pairs`
//! hands out one `QueuePair` per engine thread, each lock-free and independent.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvplane_ffi::{self as ffi, Pod, Status, kvp_attach_reply, kvp_block_op, kvp_cqe, kvp_sqe};

use crate::error::{Result, ShmError};
use crate::handshake;
use crate::ring::{Consumer, Doorbell, Producer, RingKind, WaitPolicy};
use crate::segment::{Geometry, QpGeometry, Segment, header_offsets};
use crate::sys;

/// What an engine asks for when it attaches.
#[derive(Debug)]
pub struct AttachOptions {
    pub socket_path: PathBuf,
    pub queue_pairs: u32,
    pub sq_entries: u32,
    pub cq_entries: u32,
    pub arena_bytes: u64,
    pub namespaces: Vec<String>,
    /// The engine's KV memory (host memfds, GPU allocations); layouts name them by index.
    pub kv_regions: Vec<handshake::EngineRegion>,
    pub wait: WaitPolicy,
}

impl AttachOptions {
    pub fn new(socket_path: impl AsRef<Path>) -> Self {
        AttachOptions {
            socket_path: socket_path.as_ref().to_path_buf(),
            queue_pairs: 1,
            sq_entries: 256,
            cq_entries: 256,
            arena_bytes: 1 << 20,
            namespaces: Vec::new(),
            kv_regions: Vec::new(),
            wait: WaitPolicy::default(),
        }
    }

    /// Registers a sealed host memfd of `bytes` as the next KV region (the common case on
    /// the host backend: one pool in one memfd, region 0).
    pub fn host_kv_buffer(&mut self, fd: OwnedFd, bytes: u64) -> &mut Self {
        self.kv_regions
            .push(handshake::EngineRegion::host_memfd(fd, bytes));
        self
    }
}

struct Shared {
    seg: Segment,
    geometry: Geometry,
    stream: UnixStream,
    session_id: u64,
    daemon_pid: i32,
    backend: u32,
    wait: WaitPolicy,
}

impl Shared {
    fn state(&self) -> u32 {
        self.seg
            .atomic_u32(header_offsets::STATE)
            .map(|a| a.load(Ordering::Acquire))
            .unwrap_or(ffi::SessionState::Dead.raw())
    }

    /// Called between sleeps: is the daemon still there and still serving us?
    fn check_alive(&self) -> Result<()> {
        if self.state() == ffi::SessionState::Dead.raw() {
            return Err(ShmError::SessionDead {
                session_id: self.session_id,
                reason: "session state is DEAD",
            });
        }
        if sys::socket_hung_up(&self.stream) {
            return Err(ShmError::SessionDead {
                session_id: self.session_id,
                reason: "daemon connection closed",
            });
        }
        if let Ok(hb) = self.seg.atomic_u64(header_offsets::ENGINE_HEARTBEAT) {
            hb.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// An attached session.
pub struct Session {
    shared: Arc<Shared>,
    taken: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &self.shared.session_id)
            .finish()
    }
}

impl Session {
    pub fn attach(opts: AttachOptions) -> Result<Session> {
        let stream = UnixStream::connect(&opts.socket_path).map_err(|e| ShmError::Handshake {
            peer: opts.socket_path.display().to_string(),
            reason: format!("connect: {e}"),
        })?;
        let names: Vec<&str> = opts.namespaces.iter().map(String::as_str).collect();
        let req = handshake::build_request(
            opts.queue_pairs,
            opts.sq_entries,
            opts.cq_entries,
            opts.arena_bytes,
            &names,
            opts.kv_regions.len(),
        )?;
        // A daemon that refuses before reading (a uid with no namespace, too many attaches
        // in progress) has already sent its reply and closed: the send then fails, and the
        // reply, still readable, says why.
        let sent = handshake::send_request(&stream, &req, &opts.kv_regions);
        let mut buf = [0u8; std::mem::size_of::<kvp_attach_reply>()];
        let fd = match (sys::recv_with_fd(&stream, &mut buf), sent) {
            (Ok(fd), _) => fd,
            (Err(_), Err(e)) => return Err(ShmError::io("send attach request", e)),
            (Err(e), Ok(())) => {
                return Err(ShmError::Handshake {
                    peer: opts.socket_path.display().to_string(),
                    reason: format!("reading the reply: {e}"),
                });
            }
        };
        let reply: kvp_attach_reply = ffi::read_pod(&buf).expect("exact size");
        if reply.magic != ffi::MAGIC {
            return Err(ShmError::Handshake {
                peer: opts.socket_path.display().to_string(),
                reason: "reply has a bad magic".into(),
            });
        }
        if reply.status != Status::Ok.raw() {
            return Err(ShmError::AttachRefused {
                status: reply.status,
                message: handshake::reply_message(&reply),
            });
        }
        let fd = fd.ok_or_else(|| ShmError::Handshake {
            peer: opts.socket_path.display().to_string(),
            reason: "reply OK but no segment fd".into(),
        })?;
        let (seg, geometry) = Segment::open(fd, reply.segment_bytes)?;
        Ok(Session {
            shared: Arc::new(Shared {
                seg,
                geometry,
                stream,
                session_id: reply.session_id,
                daemon_pid: reply.daemon_pid,
                backend: reply.backend,
                wait: opts.wait,
            }),
            taken: false,
        })
    }

    pub fn session_id(&self) -> u64 {
        self.shared.session_id
    }
    pub fn daemon_pid(&self) -> i32 {
        self.shared.daemon_pid
    }
    /// 0 = host backend (no GPU), 1 = cuda.
    pub fn backend(&self) -> u32 {
        self.shared.backend
    }
    pub fn geometry(&self) -> &Geometry {
        &self.shared.geometry
    }
    pub fn segment(&self) -> &Segment {
        &self.shared.seg
    }

    /// Ends the session from this side but keeps the connection: the daemon sees the
    /// hang-up, ends the session once no copy of it is in flight, and only then closes
    /// its end ([`Session::daemon_done`]). For an engine that gave up on operations the
    /// daemon never answered: until the daemon is done, they may still read or write the
    /// engine's KV memory.
    pub fn begin_detach(&self) -> Result<()> {
        self.shared
            .stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| ShmError::io("shut down the session connection", e))
    }

    /// Whether the daemon has closed its end of the connection: after
    /// [`Session::begin_detach`], it has ended the session and touches none of the
    /// engine's memory any more.
    pub fn daemon_done(&self) -> bool {
        sys::socket_hung_up(&self.shared.stream)
    }

    /// The queue pairs, once: each goes to one engine thread.
    pub fn take_queue_pairs(&mut self) -> Result<Vec<QueuePair>> {
        assert!(!self.taken, "queue pairs were already taken");
        self.taken = true;
        let shared = &self.shared;
        let mut out = Vec::new();
        for (i, q) in shared.geometry.queue_pairs.iter().enumerate() {
            // SAFETY: the rings borrow the Segment inside `shared`, an Arc that the
            // QueuePair holds and drops after its rings (field order: `sq`, `cq` before
            // `shared`). The mapping never moves while the Segment lives.
            let seg: &'static Segment = unsafe { &*(&shared.seg as *const Segment) };
            let word: &'static AtomicU32 = seg.atomic_u32(header_offsets::SQ_DOORBELL_WORD)?;
            let sleeping: &'static AtomicU32 =
                seg.atomic_u32(header_offsets::SQ_DOORBELL_SLEEPING)?;
            out.push(QueuePair {
                sq: Producer::new(
                    seg,
                    q.sq_offset,
                    q.sq_entries,
                    i as u32,
                    RingKind::Submission,
                )?,
                cq: Consumer::new(
                    seg,
                    q.cq_offset,
                    q.cq_entries,
                    i as u32,
                    RingKind::Completion,
                )?,
                daemon_bell: Doorbell::new(word, sleeping),
                heartbeat: seg.atomic_u64(header_offsets::ENGINE_HEARTBEAT)?,
                geometry: *q,
                index: i as u32,
                stash: Vec::with_capacity(q.cq_entries as usize),
                shared: Arc::clone(shared),
            });
        }
        Ok(out)
    }
}

/// One queue pair, owned by one engine thread.
pub struct QueuePair {
    sq: Producer<'static, kvp_sqe>,
    cq: Consumer<'static, kvp_cqe>,
    daemon_bell: Doorbell<'static>,
    heartbeat: &'static AtomicU64,
    geometry: QpGeometry,
    index: u32,
    /// Completions read while `call` waited for another one (bounded by cq_entries).
    stash: Vec<kvp_cqe>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("index", &self.index)
            .field("geometry", &self.geometry)
            .finish()
    }
}

impl QueuePair {
    pub fn index(&self) -> u32 {
        self.index
    }
    pub fn arena_bytes(&self) -> u64 {
        self.geometry.arena_bytes
    }
    pub fn sq_entries(&self) -> u32 {
        self.geometry.sq_entries
    }
    pub fn session_id(&self) -> u64 {
        self.shared.session_id
    }

    fn arena_check(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geometry.arena_bytes => {
                Ok(self.geometry.arena_offset + offset)
            }
            _ => Err(ShmError::ArenaRange {
                qp: self.index,
                offset,
                len,
                slice_bytes: self.geometry.arena_bytes,
            }),
        }
    }

    /// Copy bytes into this queue pair's arena slice at `offset` (slice-relative).
    pub fn write_arena(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let abs = self.arena_check(offset, data.len() as u64)?;
        self.shared.seg.write_bytes(abs, data)
    }

    pub fn read_arena(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let abs = self.arena_check(offset, out.len() as u64)?;
        self.shared.seg.read_bytes(abs, out)
    }

    pub fn write_block_ops(&mut self, offset: u64, ops: &[kvp_block_op]) -> Result<()> {
        self.write_arena(offset, ffi::slice_as_bytes(ops))
    }

    pub fn read_block_ops(&self, offset: u64, out: &mut [kvp_block_op]) -> Result<()> {
        self.read_arena(offset, ffi::slice_as_bytes_mut(out))
    }

    /// Submit as many entries as fit; returns how many. Rings the daemon's doorbell only
    /// if it sleeps.
    pub fn submit(&mut self, sqes: &[kvp_sqe]) -> Result<usize> {
        self.sq.push_many(sqes, Some(&self.daemon_bell))
    }

    /// Completions ready now, without waiting.
    pub fn poll(&mut self, out: &mut [kvp_cqe]) -> Result<usize> {
        let mut n = 0;
        while n < out.len() {
            match self.stash.pop() {
                Some(c) => {
                    out[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        Ok(n + self.cq.pop_many(&mut out[n..]))
    }

    /// Wait (spin, then sleep) until at least one completion is ready or `timeout`.
    pub fn wait(&mut self, out: &mut [kvp_cqe], timeout: Duration) -> Result<usize> {
        let n = self.poll(out)?;
        if n > 0 {
            return Ok(n);
        }
        let deadline = Instant::now() + timeout;
        let bell = self.cq.own_doorbell();
        let cq = &self.cq;
        let shared = &self.shared;
        let ready = bell.wait_until(
            self.shared.wait,
            Some(deadline),
            || cq.has_entries(),
            || shared.check_alive(),
        )?;
        self.heartbeat.fetch_add(1, Ordering::Relaxed);
        if !ready {
            // One last liveness check so a dead daemon is reported as such, not a timeout.
            self.shared.check_alive()?;
            return Err(ShmError::Timeout {
                what: "a completion",
                timeout_ms: timeout.as_millis() as u64,
            });
        }
        self.poll(out)
    }

    /// Submit one entry and wait for its completion (matched by user_data). Other
    /// completions that arrive meanwhile are kept for `poll`/`wait`.
    pub fn call(&mut self, sqe: kvp_sqe, timeout: Duration) -> Result<kvp_cqe> {
        // The clock is read only once the call has to wait: a round trip that completes
        // while spinning costs no clock read and no batch buffer.
        let mut deadline = None;
        let mut deadline_of = || *deadline.get_or_insert_with(|| Instant::now() + timeout);
        while self.submit(std::slice::from_ref(&sqe))? == 0 {
            // Ring full: the caller has many in flight; make room by reading completions.
            let mut buf = [Pod::zeroed(); 16];
            let left = deadline_of().saturating_duration_since(Instant::now());
            let n = self.wait(&mut buf, left)?;
            self.stash.extend_from_slice(&buf[..n]);
        }
        if let Some(pos) = self.stash.iter().position(|c| c.user_data == sqe.user_data) {
            return Ok(self.stash.swap_remove(pos));
        }
        let mut polls = 0u32;
        loop {
            // One completion at a time: the common case is exactly one, ours.
            let mut one: [kvp_cqe; 1] = [Pod::zeroed()];
            if self.cq.pop_many(&mut one) == 1 {
                if one[0].user_data == sqe.user_data {
                    return Ok(one[0]);
                }
                self.stash.push(one[0]);
                continue;
            }
            // A round trip through a polling daemon is a few hundred nanoseconds: poll
            // that long before reading the clock (the wait below reads it at once).
            if polls < FAST_POLLS {
                polls += 1;
                std::hint::spin_loop();
                continue;
            }
            let deadline = deadline_of();
            if Instant::now() >= deadline {
                return Err(ShmError::Timeout {
                    what: "a completion",
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            let bell = self.cq.own_doorbell();
            let cq = &self.cq;
            let shared = &self.shared;
            bell.wait_until(
                shared.wait,
                Some(deadline),
                || cq.has_entries(),
                || shared.check_alive(),
            )?;
        }
    }
}

/// Polls of the completion ring `QueuePair::call` makes before it reads the clock and
/// waits (a poll is one load of a cache line, a few ns while it stays in this core's
/// cache, about a line transfer once the daemon has written it).
const FAST_POLLS: u32 = 128;

/// An sqe for `opcode` with `user_data`, everything else zero.
pub fn sqe(opcode: ffi::Opcode, user_data: u64) -> kvp_sqe {
    let mut s: kvp_sqe = Pod::zeroed();
    s.opcode = opcode.raw();
    s.user_data = user_data;
    s
}
