//! The io_uring engine: one ring per thread, fixed files, the host pool registered as fixed
//! buffers (falling back to plain reads/writes when registration is refused, e.g. by
//! RLIMIT_MEMLOCK for an unprivileged process), `queue_depth` ops in flight, submitted in
//! batches of `batch_size`.

use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

use super::engine::{IoEngine, IoKind, IoOp};

pub struct UringEngine {
    ring: IoUring,
    queue_depth: usize,
    batch_size: usize,
    /// Registered buffer regions (start address, length), sorted by address.
    regions: Vec<(usize, usize)>,
    /// Why buffers are not registered, when they are not.
    unregistered_reason: Option<String>,
}

impl UringEngine {
    /// Creates a ring with `queue_depth` entries, registers `fds` as fixed files and tries to
    /// register `regions` (each at most 1 GiB) as fixed buffers.
    pub fn new(
        fds: &[RawFd],
        regions: &[(*mut u8, usize)],
        queue_depth: u32,
        batch_size: u32,
    ) -> std::io::Result<UringEngine> {
        let ring = IoUring::builder().build(queue_depth)?;
        ring.submitter().register_files(fds)?;
        let mut engine = UringEngine {
            ring,
            queue_depth: queue_depth as usize,
            batch_size: batch_size.max(1) as usize,
            regions: Vec::new(),
            unregistered_reason: None,
        };
        if regions.is_empty() {
            engine.unregistered_reason = Some("no host pool to register".into());
        } else if regions.len() > u16::MAX as usize {
            engine.unregistered_reason = Some("more than 65535 buffer regions".into());
        } else {
            let iovecs: Vec<libc::iovec> = regions
                .iter()
                .map(|&(p, len)| libc::iovec {
                    iov_base: p as *mut libc::c_void,
                    iov_len: len,
                })
                .collect();
            // SAFETY: the regions are the host pool, which outlives every engine (the store
            // that owns the engines is dropped before the pool by BlockManager's field order).
            match unsafe { engine.ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => engine.regions = regions.iter().map(|&(p, l)| (p as usize, l)).collect(),
                Err(e) => {
                    let (soft, _) = {
                        let mut lim = libc::rlimit {
                            rlim_cur: 0,
                            rlim_max: 0,
                        };
                        // SAFETY: getrlimit writes into our struct.
                        unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
                        (lim.rlim_cur, lim.rlim_max)
                    };
                    let reason = format!(
                        "registering {} bytes of fixed buffers failed ({e}; RLIMIT_MEMLOCK soft {soft}): \
                         using unregistered reads/writes",
                        regions.iter().map(|r| r.1).sum::<usize>()
                    );
                    tracing::warn!("{reason}");
                    engine.unregistered_reason = Some(reason);
                }
            }
        }
        Ok(engine)
    }

    pub fn unregistered_reason(&self) -> Option<&str> {
        self.unregistered_reason.as_deref()
    }

    fn buffer_index(&self, buf: *mut u8, len: u32) -> Option<u16> {
        let start = buf as usize;
        let i = self
            .regions
            .partition_point(|r| r.0 <= start)
            .checked_sub(1)?;
        let (rs, rl) = self.regions[i];
        (start + len as usize <= rs + rl).then_some(i as u16)
    }

    /// The entry for op `user_data`'s bytes from `done` on (0 for a new op; more when a
    /// short transfer is resubmitted).
    fn sqe(&self, op: &IoOp, done: u32, user_data: u64) -> io_uring::squeue::Entry {
        let fd = types::Fixed(op.file);
        let (buf, len, offset) = (
            op.buf.wrapping_add(done as usize),
            op.len - done,
            op.offset + done as u64,
        );
        let entry = match (op.kind, self.buffer_index(buf, len)) {
            (IoKind::Read, Some(b)) => opcode::ReadFixed::new(fd, buf, len, b)
                .offset(offset)
                .build(),
            (IoKind::Write, Some(b)) => opcode::WriteFixed::new(fd, buf, len, b)
                .offset(offset)
                .build(),
            (IoKind::Read, None) => opcode::Read::new(fd, buf, len).offset(offset).build(),
            (IoKind::Write, None) => opcode::Write::new(fd, buf, len).offset(offset).build(),
        };
        entry.user_data(user_data)
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> String {
        format!(
            "io_uring (qd {}, batch {})",
            self.queue_depth, self.batch_size
        )
    }
    fn registered_buffers(&self) -> bool {
        !self.regions.is_empty()
    }
    unsafe fn run(&mut self, ops: &mut [IoOp]) -> std::io::Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.run_with(ops, &mut |_| {}, &mut |_, _| {}) }
    }

    unsafe fn run_with(
        &mut self,
        ops: &mut [IoOp],
        before: &mut dyn FnMut(usize),
        after: &mut dyn FnMut(usize, &IoOp),
    ) -> std::io::Result<()> {
        let mut inflight = 0usize;
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: forwarded contract.
            unsafe { self.run_ops(ops, before, after, &mut inflight) }
        }));
        match run {
            Ok(r) => r,
            Err(panic) => {
                // A callback panicked (a bug): the kernel may still be reading or writing
                // the buffers of the ops in flight, which the caller gives back as it
                // unwinds; wait for them first.
                self.drain(None, &mut inflight);
                std::panic::resume_unwind(panic)
            }
        }
    }
}

/// Waits until none of the `inflight` ops is left with the kernel, `enter` being the
/// system call that submits what is queued and waits for a completion. Never returns
/// before: the caller gives the ops' buffers back as soon as it does, and a read landing
/// in a host slot another block took, or a write overtaking the erasure of its header,
/// would serve or persist the wrong bytes. A failing `enter` (EINTR, EBUSY with the
/// completion ring full, EAGAIN or ENOMEM while the kernel is short) is retried;
/// completions are read from the shared ring whether or not it succeeds. A ring whose
/// `enter` fails for good hangs its I/O thread here, logged, rather than hand back
/// buffers the kernel may still use.
fn drain_ring(
    ring: &mut IoUring,
    mut ops: Option<&mut [IoOp]>,
    inflight: &mut usize,
    enter: &mut dyn FnMut(&IoUring) -> std::io::Result<usize>,
) {
    let mut failures = 0u64;
    loop {
        for cqe in ring.completion() {
            if let Some(ops) = ops.as_deref_mut() {
                ops[cqe.user_data() as usize].result = cqe.result();
            }
            *inflight -= 1;
        }
        if *inflight == 0 {
            return;
        }
        if let Err(e) = enter(ring) {
            failures += 1;
            if failures.is_power_of_two() {
                tracing::warn!(error = %e, in_flight = *inflight, failures, "io_uring: waiting for the ops in flight");
            }
            if !matches!(e.raw_os_error(), Some(libc::EINTR)) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

impl UringEngine {
    /// [`IoEngine::run_with`]'s loop; `inflight` counts the ops queued and not reaped.
    ///
    /// # Safety
    /// As for [`IoEngine::run_with`].
    unsafe fn run_ops(
        &mut self,
        ops: &mut [IoOp],
        before: &mut dyn FnMut(usize),
        after: &mut dyn FnMut(usize, &IoOp),
        inflight: &mut usize,
    ) -> std::io::Result<()> {
        let (mut next, mut done) = (0usize, 0usize);
        let mut unsubmitted = 0usize;
        // Bytes each op has moved so far (short transfers are continued, see `reap`).
        let mut moved = vec![0u32; ops.len()];
        while done < ops.len() {
            // Prepare and queue ops while there is room.
            while next < ops.len() && *inflight < self.queue_depth {
                before(next);
                let sqe = self.sqe(&ops[next], 0, next as u64);
                // SAFETY: buffers valid until completion per the trait contract; every
                // submitted op is waited for before returning, also on errors.
                if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                    break;
                }
                next += 1;
                *inflight += 1;
                unsubmitted += 1;
                // Batch submissions only while the device already has a batch queued;
                // otherwise submit at once so it never idles while we prepare the next op.
                if unsubmitted >= self.batch_size || *inflight - unsubmitted < self.batch_size {
                    self.submit(ops, inflight, 0)?;
                    unsubmitted = 0;
                }
                // Completions that are already there: hand them over early.
                done += self.reap(ops, &mut moved, inflight, after);
            }
            let want = if done < ops.len() && *inflight > 0 {
                1
            } else {
                0
            };
            self.submit(ops, inflight, want)?;
            unsubmitted = 0;
            done += self.reap(ops, &mut moved, inflight, after);
        }
        Ok(())
    }

    /// Waits for every op in flight to complete (recording results in `ops` when given).
    fn drain(&mut self, ops: Option<&mut [IoOp]>, inflight: &mut usize) {
        drain_ring(&mut self.ring, ops, inflight, &mut |ring| {
            ring.submit_and_wait(1)
        });
    }

    fn submit(
        &mut self,
        ops: &mut [IoOp],
        inflight: &mut usize,
        want: usize,
    ) -> std::io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {
                    continue;
                }
                Err(e) => {
                    // In-flight ops point into caller buffers: drain them before failing.
                    self.drain(Some(ops), inflight);
                    return Err(e);
                }
            }
        }
    }

    /// Takes the completions there are; returns how many ops finished. A short transfer
    /// (a file system out of space after part of a write, a read at the end of a file) is
    /// continued from where it stopped, like pwrite/pread loops do, so the op ends with the
    /// error that stopped it (ENOSPC, ...) or a 0-byte transfer, never a bare short count
    /// that would be reported as EIO.
    fn reap(
        &mut self,
        ops: &mut [IoOp],
        moved: &mut [u32],
        inflight: &mut usize,
        after: &mut dyn FnMut(usize, &IoOp),
    ) -> usize {
        let mut n = 0;
        let mut cq = self.ring.completion();
        cq.sync();
        let ready: Vec<(usize, i32)> = (&mut cq)
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        drop(cq);
        for (i, res) in ready {
            if res > 0 && moved[i] + (res as u32) < ops[i].len {
                moved[i] += res as u32;
                let sqe = self.sqe(&ops[i], moved[i], i as u64);
                // SAFETY: the op's buffer stays valid until it completes (trait contract);
                // the slot this completion freed makes room in the submission queue.
                if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                    continue; // still in flight; submitted with the next submit
                }
                ops[i].result = moved[i] as i32; // reported short (EIO)
            } else if res < 0 {
                ops[i].result = res;
            } else {
                // res == 0 (end of file: short) or the rest of the op.
                ops[i].result = (moved[i] + res as u32) as i32;
            }
            *inflight -= 1;
            n += 1;
            after(i, &ops[i]);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A read stays with the kernel (on an empty pipe) while `io_uring_enter` fails three
    /// times: the drain goes on waiting, and returns only once the read has landed in its
    /// buffer. It used to return at the first failure, its buffer still the kernel's.
    #[test]
    fn a_drain_waits_for_the_ops_in_flight_through_failing_enters() {
        let mut ring = IoUring::new(4).unwrap();
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let [read_fd, write_fd] = fds;
        // Leaked: should the drain return early (the defect this test catches), the
        // kernel's late write lands in memory nothing else uses.
        let buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
        let sqe = opcode::Read::new(types::Fd(read_fd), buf.as_mut_ptr(), 8)
            .build()
            .user_data(0);
        // SAFETY: `buf` is never freed.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit().unwrap();
        let mut inflight = 1;
        let t0 = Instant::now();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: 8 valid bytes; write_fd is the pipe's open write end.
            let n = unsafe { libc::write(write_fd, b"landed!!".as_ptr().cast(), 8) };
            assert_eq!(n, 8);
        });
        let mut calls = 0;
        drain_ring(&mut ring, None, &mut inflight, &mut |ring| {
            calls += 1;
            if calls <= 3 {
                return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
            }
            ring.submit_and_wait(1)
        });
        assert_eq!(inflight, 0);
        assert!(
            t0.elapsed() >= Duration::from_millis(90),
            "returned after {:?}, before the read could land",
            t0.elapsed()
        );
        assert_eq!(buf, b"landed!!");
        assert!(calls > 3);
        writer.join().unwrap();
        // SAFETY: both descriptors are open and ours.
        unsafe {
            libc::close(read_fd);
            libc::close(write_fd);
        }
    }
}
