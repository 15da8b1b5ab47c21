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

    fn sqe(&self, op: &IoOp, user_data: u64) -> io_uring::squeue::Entry {
        let fd = types::Fixed(op.file);
        let entry = match (op.kind, self.buffer_index(op.buf, op.len)) {
            (IoKind::Read, Some(b)) => opcode::ReadFixed::new(fd, op.buf, op.len, b)
                .offset(op.offset)
                .build(),
            (IoKind::Write, Some(b)) => opcode::WriteFixed::new(fd, op.buf, op.len, b)
                .offset(op.offset)
                .build(),
            (IoKind::Read, None) => opcode::Read::new(fd, op.buf, op.len)
                .offset(op.offset)
                .build(),
            (IoKind::Write, None) => opcode::Write::new(fd, op.buf, op.len)
                .offset(op.offset)
                .build(),
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
        let (mut next, mut inflight, mut done) = (0usize, 0usize, 0usize);
        while done < ops.len() {
            let mut pushed = 0;
            while next < ops.len() && inflight < self.queue_depth && pushed < self.batch_size {
                let sqe = self.sqe(&ops[next], next as u64);
                // SAFETY: buffers valid until completion per the trait contract; we wait for
                // every submitted op before returning, even on error paths below.
                if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                    break; // submission queue full: submit what we have
                }
                next += 1;
                inflight += 1;
                pushed += 1;
            }
            // Keep the queue full: refill as soon as one op completes.
            loop {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EINTR)
                            || e.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        continue;
                    }
                    Err(e) => {
                        // Cannot abandon in-flight ops that point into caller buffers: drain
                        // them before reporting the ring failure.
                        while inflight > 0 {
                            if self.ring.submit_and_wait(1).is_err() {
                                break;
                            }
                            for cqe in self.ring.completion() {
                                ops[cqe.user_data() as usize].result = cqe.result();
                                inflight -= 1;
                            }
                        }
                        return Err(e);
                    }
                }
            }
            for cqe in self.ring.completion() {
                ops[cqe.user_data() as usize].result = cqe.result();
                inflight -= 1;
                done += 1;
            }
        }
        Ok(())
    }
}
