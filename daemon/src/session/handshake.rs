//! The attach handshake, bounded: one thread polls the listening socket, a wake-up
//! eventfd and every connection still sending its request (non-blocking reads, a deadline
//! per connection, a limit per uid and in all); complete requests go through a bounded
//! queue to a fixed pool of workers that admit them. No thread waits on a client, so
//! thousands of slow connections hold no threads and cannot delay another uid's attach.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam::channel::{Sender, TrySendError};
use kvplane_ffi::Status;
use kvplane_shm::handshake::{AttachRequest, RequestReader};
use kvplane_shm::sys;

use super::{DaemonShared, refuse, send_refusal};

/// Wakes the accept loop's poll (shutdown), whatever happened to the socket's path.
#[derive(Debug)]
pub(super) struct Waker(OwnedFd);

impl Waker {
    pub(super) fn new() -> io::Result<Waker> {
        // SAFETY: eventfd takes an initial value and flags, returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor from eventfd, owned by nobody else.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(super) fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd; a full counter
        // (EAGAIN) already means "woken".
        unsafe {
            libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len());
        }
    }

    fn drain(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer; non-blocking.
        unsafe {
            libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
        }
    }
}

/// KV regions held by attaches in progress (read, or being admitted), in all and per
/// uid: what bounds the descriptors and bytes the handshake holds for engines. Shared by
/// the accept loop, which takes from it, and the workers, whose [`RegionCharge`]s give
/// back when dropped.
pub(super) struct RegionBudget {
    max_total: usize,
    max_per_uid: usize,
    held: std::sync::Mutex<(usize, HashMap<u32, usize>)>,
}

impl RegionBudget {
    pub(super) fn new(max_total: u32, max_per_uid: u32) -> Arc<RegionBudget> {
        debug_assert!(max_per_uid <= max_total, "the config checks it");
        Arc::new(RegionBudget {
            max_total: max_total as usize,
            max_per_uid: max_per_uid as usize,
            held: std::sync::Mutex::new((0, HashMap::new())),
        })
    }

    /// Why `regions` can never fit, or `None` (the per-uid limit is at most the total,
    /// as the config checks, so it is the one that binds).
    fn never_fits(&self, regions: usize) -> Option<String> {
        (regions > self.max_per_uid).then(|| {
            format!(
                "{regions} KV regions, at most {} (serve.max_handshake_regions_per_uid)",
                self.max_per_uid
            )
        })
    }

    /// `regions` for `uid`, if they fit now.
    fn take(self: &Arc<Self>, uid: u32, regions: usize) -> Option<RegionCharge> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_uid) = &mut *held;
        let mine = per_uid.get(&uid).copied().unwrap_or(0);
        if *total + regions > self.max_total || mine + regions > self.max_per_uid {
            return None;
        }
        *total += regions;
        *per_uid.entry(uid).or_insert(0) += regions;
        Some(RegionCharge {
            budget: Arc::clone(self),
            uid,
            regions,
        })
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

/// Regions taken from a [`RegionBudget`], given back on drop.
pub(super) struct RegionCharge {
    budget: Arc<RegionBudget>,
    uid: u32,
    regions: usize,
}

impl Drop for RegionCharge {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_uid) = &mut *held;
        *total -= self.regions;
        if let Some(n) = per_uid.get_mut(&self.uid) {
            *n -= self.regions;
            if *n == 0 {
                per_uid.remove(&self.uid);
            }
        }
    }
}

/// A connection whose request is complete and well-formed, for a worker to admit.
pub(super) struct Complete {
    pub stream: sys::TenantStream,
    pub req: AttachRequest,
    /// The request's regions in the handshake's budget, until the worker is done.
    pub regions: Option<RegionCharge>,
}

struct Pending {
    stream: sys::TenantStream,
    uid: u32,
    deadline: Instant,
    reader: RequestReader,
    regions: Option<RegionCharge>,
}

/// Connections taken from the listen queue per wake-up, so pending handshakes are read
/// between batches even while a client floods `connect`.
const ACCEPT_BATCH: usize = 64;
/// Longest poll sleep: the stop flag is looked at this often even if a wake-up is lost.
const POLL_SLICE: Duration = Duration::from_millis(500);
/// Refusals of the same kind are logged at most this often (a flood must not flood the log).
const LOG_EVERY: Duration = Duration::from_secs(1);
/// How often a request whose regions wait for room in the budget looks again.
const BUDGET_RETRY: Duration = Duration::from_millis(10);

/// Rate-limited warning: the first of a burst is logged, the rest are counted into the
/// next one.
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn new() -> Self {
        Throttled {
            last: None,
            suppressed: 0,
        }
    }
    fn warn(&mut self, f: impl FnOnce(u64)) {
        let now = Instant::now();
        if self.last.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            f(self.suppressed);
            self.last = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

pub(super) fn accept_loop(
    shared: &Arc<DaemonShared>,
    listener: UnixListener,
    waker: &Waker,
    work: Sender<Complete>,
    budget: &Arc<RegionBudget>,
) {
    let cfg = &shared.config.serve;
    let timeout = Duration::from_millis(cfg.handshake_timeout_ms);
    let max_pending = cfg.max_pending_handshakes as usize;
    let max_per_uid = cfg.max_pending_handshakes_per_uid;
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(error = %e, "engine socket cannot be made non-blocking; not serving");
        return;
    }
    let mut pending: Vec<Pending> = Vec::with_capacity(max_pending);
    let mut per_uid: HashMap<u32, u32> = HashMap::new();
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(max_pending + 2);
    let mut refused_log = Throttled::new();
    let mut timeout_log = Throttled::new();
    let mut bad_log = Throttled::new();
    let release = |per_uid: &mut HashMap<u32, u32>, uid: u32| {
        if let Some(n) = per_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                per_uid.remove(&uid);
            }
        }
    };
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        pfds.clear();
        // A request waiting for budget is not polled for input (what it sends next stays
        // in the socket); it is looked at again every BUDGET_RETRY. While the closer of
        // tenants' descriptors is behind (one of them blocks it), nothing more is taken in:
        // no connection is accepted or read.
        let closer_ok = sys::untrusted_closer_has_room();
        let mut waiting = !closer_ok;
        let input = |yes: bool| if yes && closer_ok { libc::POLLIN } else { 0 };
        for (fd, events) in [
            (waker.0.as_raw_fd(), libc::POLLIN),
            (listener.as_raw_fd(), input(true)),
        ]
        .into_iter()
        .chain(pending.iter().map(|p| {
            let parked = p.reader.awaiting_grant().is_some();
            waiting |= parked;
            (p.stream.as_raw_fd(), input(!parked))
        })) {
            pfds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
        }
        let now = Instant::now();
        let wait = pending
            .iter()
            .map(|p| p.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(POLL_SLICE)
            .min(if waiting { BUDGET_RETRY } else { POLL_SLICE });
        // Round up so a deadline is not polled for again a hair early.
        let wait_ms = wait.as_millis() as i32 + 1;
        // SAFETY: pfds is a live array of initialised pollfds of the given length.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "poll on the engine socket failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if pfds[0].revents != 0 {
            waker.drain();
        }
        // Connections in the handshake: read what came, hand complete requests on, end
        // the ones past their deadline. Backwards, so swap_remove only moves entries
        // already looked at.
        let now = Instant::now();
        for i in (0..pending.len()).rev() {
            let mut ready = pfds[i + 2].revents != 0;
            if let Some(regions) = pending[i].reader.awaiting_grant() {
                if ready {
                    // Polled for no input: the peer hung up or the socket failed.
                    let p = pending.swap_remove(i);
                    release(&mut per_uid, p.uid);
                    tracing::debug!(
                        uid = p.uid,
                        "connection closed while its regions waited for room"
                    );
                    continue;
                }
                if now < pending[i].deadline {
                    let p = &mut pending[i];
                    if let Some(why) = budget.never_fits(regions) {
                        let p = pending.swap_remove(i);
                        release(&mut per_uid, p.uid);
                        bad_log.warn(|more| {
                            tracing::warn!(uid = p.uid, more, "{why}; attach refused")
                        });
                        send_refusal(&p.stream, Status::BadArg, &why);
                        continue;
                    }
                    // Taking in more descriptors waits while the closer is behind (a
                    // descriptor whose close blocks is holding it up).
                    if !sys::untrusted_closer_has_room() {
                        continue;
                    }
                    let Some(charge) = budget.take(p.uid, regions) else {
                        continue;
                    };
                    p.regions = Some(charge);
                    p.reader.grant();
                    // Read what already came now rather than a poll later.
                    ready = true;
                }
            }
            if !ready {
                if now >= pending[i].deadline {
                    let p = pending.swap_remove(i);
                    release(&mut per_uid, p.uid);
                    timeout_log.warn(|more| {
                        tracing::warn!(
                            uid = p.uid,
                            received = p.reader.received(),
                            timeout_ms = cfg.handshake_timeout_ms,
                            more,
                            "attach handshake timed out; connection closed"
                        )
                    });
                    // Replies carry 95 bytes of text.
                    let why = if p.reader.awaiting_grant().is_some() {
                        "no room in time for the attach's KV regions (serve.max_handshake_regions); retry"
                    } else {
                        "the attach request did not arrive in time"
                    };
                    send_refusal(&p.stream, Status::Busy, why);
                }
                continue;
            }
            let p = &mut pending[i];
            match p.reader.read_more(&p.stream, true) {
                Ok(false) => {}
                Ok(true) => {
                    let p = pending.swap_remove(i);
                    release(&mut per_uid, p.uid);
                    hand_on(shared, p, &work, &mut bad_log);
                }
                Err(e) => {
                    let p = pending.swap_remove(i);
                    release(&mut per_uid, p.uid);
                    if p.reader.received() == 0 {
                        // A probe (is the daemon up?) or a client that gave up: no request.
                        tracing::debug!(uid = p.uid, "connection closed before a request");
                    } else {
                        bad_log.warn(
                            |more| tracing::warn!(uid = p.uid, error = %e, more, "bad attach"),
                        );
                    }
                    send_refusal(&p.stream, Status::BadArg, &e.to_string());
                }
            }
        }
        if pfds[1].revents == 0 {
            continue;
        }
        for _ in 0..ACCEPT_BATCH {
            let stream = match listener.accept() {
                Ok((s, _)) => sys::TenantStream::new(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: back off, the connection stays queued.
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            };
            let Ok(peer) = sys::peer_cred(&stream) else {
                continue;
            };
            let uid = peer.uid;
            let held = per_uid.get(&uid).copied().unwrap_or(0);
            let refusal = if !shared.config.uid_may_attach(uid, shared.daemon_uid) {
                Some((
                    Status::Namespace,
                    format!("uid {uid} may use no namespace on this daemon"),
                ))
            } else if held >= max_per_uid {
                Some((
                    Status::Busy,
                    format!("uid {uid} has its maximum of {max_per_uid} attaches in progress"),
                ))
            } else if pending.len() >= max_pending {
                Some((
                    Status::Busy,
                    format!("the daemon has its maximum of {max_pending} attaches in progress"),
                ))
            } else {
                None
            };
            if let Some((status, message)) = refusal {
                refused_log.warn(|more| {
                    tracing::warn!(uid, pid = peer.pid, %status, more, "{message}; connection refused")
                });
                // The request is not read: the reply goes out on a fresh socket with room.
                send_refusal(&stream, status, &message);
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!(error = %e, "cannot make an engine connection non-blocking");
                continue;
            }
            *per_uid.entry(uid).or_insert(0) += 1;
            pending.push(Pending {
                stream,
                uid,
                deadline: Instant::now() + timeout,
                reader: RequestReader::new(),
                regions: None,
            });
        }
    }
    // Dropping `work` ends the workers once they drain the queue; pending connections
    // close here.
}

/// A complete request: validate it and queue it for a worker.
fn hand_on(shared: &DaemonShared, p: Pending, work: &Sender<Complete>, bad_log: &mut Throttled) {
    let Pending {
        stream,
        reader,
        uid,
        regions,
        ..
    } = p;
    let req = match reader.finish(&stream) {
        Ok(r) => r,
        Err(e) => {
            if !shared.stop.load(Ordering::SeqCst) {
                bad_log.warn(|more| tracing::warn!(uid, error = %e, more, "bad attach"));
                send_refusal(&stream, Status::BadArg, &e.to_string());
            }
            return;
        }
    };
    // Back to blocking for the reply and the session's life; a bounded send time keeps a
    // peer that never reads from holding a worker.
    if stream.set_nonblocking(false).is_err()
        || stream
            .set_write_timeout(Some(Duration::from_secs(1)))
            .is_err()
    {
        return;
    }
    match work.try_send(Complete {
        stream,
        req,
        regions,
    }) {
        Ok(()) => {}
        Err(TrySendError::Full(c)) => refuse(
            &c.stream,
            Status::Busy,
            "the daemon has its maximum of attaches in progress",
        ),
        Err(TrySendError::Disconnected(_)) => {}
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn charges_bound_regions_in_all_and_per_uid_and_are_given_back_on_drop() {
        let b = RegionBudget::new(10, 6);
        let a1 = b.take(1, 4).expect("fits");
        assert!(b.take(1, 3).is_none(), "uid 1 would hold 7 of its 6");
        let a2 = b.take(1, 2).expect("uid 1 at 6 of 6");
        let c = b.take(2, 4).expect("uid 2: 4, 10 of 10 in all");
        assert!(b.take(3, 1).is_none(), "the total is spent");
        assert_eq!(b.held(), 10);
        drop(a1);
        assert_eq!(b.held(), 6);
        assert!(b.take(2, 3).is_none(), "uid 2 would hold 7 of its 6");
        let d = b.take(3, 4).expect("room again");
        drop((a2, c, d));
        assert_eq!(b.held(), 0);
        assert!(b.held.lock().unwrap().1.is_empty(), "no uid left counted");
        assert!(
            b.never_fits(7)
                .unwrap()
                .contains("max_handshake_regions_per_uid")
        );
        assert!(b.never_fits(6).is_none());
        let tight = RegionBudget::new(5, 5);
        assert!(tight.never_fits(6).is_some());
    }
}
