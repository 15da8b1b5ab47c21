//! The NVMe I/O engine interface and the synchronous pread/pwrite engine, plus a fault
//! injector that wraps any engine (tests: ENOSPC, EIO, torn writes, a stalled device).

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
}

/// One direct I/O: `len` bytes between `buf` and file `file` at `offset` (all 4 KiB aligned).
/// `result` is set by the engine: bytes transferred, or `-errno`.
#[derive(Debug)]
pub struct IoOp {
    pub kind: IoKind,
    pub file: u32,
    pub offset: u64,
    pub buf: *mut u8,
    pub len: u32,
    pub result: i32,
}

impl IoOp {
    pub fn new(kind: IoKind, file: u32, offset: u64, buf: *mut u8, len: u32) -> Self {
        IoOp {
            kind,
            file,
            offset,
            buf,
            len,
            result: 0,
        }
    }
    /// `Ok(())` when all `len` bytes moved, else the errno (`EIO` for a short transfer).
    pub fn outcome(&self) -> Result<(), i32> {
        if self.result < 0 {
            Err(-self.result)
        } else if self.result as u32 != self.len {
            Err(libc::EIO)
        } else {
            Ok(())
        }
    }
}

/// An NVMe I/O engine: one per thread (an io_uring is not shared between threads).
pub trait IoEngine: Send {
    /// "io_uring" / "pread/pwrite" / "fault-injector(...)".
    fn name(&self) -> String;
    /// Whether I/O into the host pool uses registered (fixed) buffers.
    fn registered_buffers(&self) -> bool;
    /// Runs every op to completion, setting each op's `result`. An `Err` means the engine
    /// itself broke (the ring), not that an op failed.
    ///
    /// # Safety
    /// Each op's `buf` is valid for `len` bytes (writable for reads) and not otherwise
    /// accessed until this returns.
    unsafe fn run(&mut self, ops: &mut [IoOp]) -> std::io::Result<()>;

    /// Like [`IoEngine::run`], calling `before(i)` right before op i is submitted (e.g. to
    /// checksum the block it writes) and `after(i)` as soon as it completes (e.g. to verify
    /// what it read), so that CPU work overlaps the I/O of the other ops in flight. The
    /// default runs all `before`s, the batch, then all `after`s.
    ///
    /// # Safety
    /// As for [`IoEngine::run`]; `before(i)` may write op i's buffer, `after(i)` may read it.
    unsafe fn run_with(
        &mut self,
        ops: &mut [IoOp],
        before: &mut dyn FnMut(usize),
        after: &mut dyn FnMut(usize, &IoOp),
    ) -> std::io::Result<()> {
        (0..ops.len()).for_each(&mut *before);
        // SAFETY: forwarded contract.
        unsafe { self.run(ops)? };
        for (i, op) in ops.iter().enumerate() {
            after(i, op);
        }
        Ok(())
    }
}

/// pread/pwrite, one op at a time: for machines where io_uring is refused (seccomp,
/// `kernel.io_uring_disabled`).
pub struct SyncEngine {
    fds: Arc<Vec<RawFd>>,
}

impl SyncEngine {
    pub fn new(fds: Arc<Vec<RawFd>>) -> Self {
        SyncEngine { fds }
    }
}

impl IoEngine for SyncEngine {
    fn name(&self) -> String {
        "pread/pwrite".into()
    }
    fn registered_buffers(&self) -> bool {
        false
    }
    unsafe fn run(&mut self, ops: &mut [IoOp]) -> std::io::Result<()> {
        for op in ops.iter_mut() {
            let Some(&fd) = self.fds.get(op.file as usize) else {
                op.result = -libc::EBADF;
                continue;
            };
            let mut done = 0usize;
            op.result = loop {
                let p = op.buf.wrapping_add(done);
                let left = op.len as usize - done;
                let off = (op.offset + done as u64) as libc::off_t;
                // SAFETY: buf valid for len bytes per the trait contract; fd is open for the
                // store's life.
                let n = unsafe {
                    match op.kind {
                        IoKind::Read => libc::pread(fd, p as *mut libc::c_void, left, off),
                        IoKind::Write => libc::pwrite(fd, p as *const libc::c_void, left, off),
                    }
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO);
                    if e == libc::EINTR {
                        continue;
                    }
                    break -e;
                }
                if n == 0 {
                    break done as i32; // EOF: short, reported by outcome()
                }
                done += n as usize;
                if done == op.len as usize {
                    break done as i32;
                }
            };
        }
        Ok(())
    }
}

/// What an injected fault does to a matching op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultEffect {
    /// Fail with this errno without touching the disk (ENOSPC, EIO, ...).
    Errno(i32),
    /// Write only the first `bytes` (4 KiB multiple), then fail with EIO: a crash mid-write.
    TornWrite { bytes: u32 },
    /// Let the op succeed, then flip one bit of the buffer at `offset` (a read that returns
    /// corrupt data, or a write of corrupt data).
    FlipBit { offset: u32 },
    /// Let the op succeed after `ms` milliseconds: a stalled or very slow device (the
    /// calling thread waits, as it would on a disk that takes that long).
    Delay { ms: u32 },
    /// Panic instead of running the op: a bug in the I/O path, for tests of what the
    /// daemon gives back when an operation panics.
    Panic,
}

/// A rule: skip `skip` matching ops, then apply `effect` to the next `count`.
#[derive(Clone, Copy, Debug)]
pub struct FaultRule {
    pub kind: Option<IoKind>,
    pub skip: u64,
    pub count: u64,
    pub effect: FaultEffect,
}

/// Shared fault plan: tests keep a handle and add rules while the store runs.
#[derive(Default, Debug)]
pub struct FaultPlan {
    rules: Mutex<Vec<FaultRule>>,
    fired: std::sync::atomic::AtomicU64,
}

impl FaultPlan {
    pub fn add(&self, rule: FaultRule) {
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rule);
    }
    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    /// How many faults fired so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Every matching rule counts the op (its `skip` goes down); the first rule already
    /// past its skips fires.
    fn take(&self, kind: IoKind) -> Option<FaultEffect> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let mut fire = None;
        for rule in rules.iter_mut() {
            if rule.kind.is_some_and(|k| k != kind) || rule.count == 0 {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
            } else if fire.is_none() {
                rule.count -= 1;
                fire = Some(rule.effect);
            }
        }
        if fire.is_some() {
            self.fired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        fire
    }
}

/// Wraps a real engine and applies a [`FaultPlan`].
pub struct FaultInjector {
    inner: Box<dyn IoEngine>,
    plan: Arc<FaultPlan>,
}

impl FaultInjector {
    pub fn new(inner: Box<dyn IoEngine>, plan: Arc<FaultPlan>) -> Self {
        FaultInjector { inner, plan }
    }
}

impl IoEngine for FaultInjector {
    fn name(&self) -> String {
        format!("fault-injector({})", self.inner.name())
    }
    fn registered_buffers(&self) -> bool {
        self.inner.registered_buffers()
    }
    unsafe fn run(&mut self, ops: &mut [IoOp]) -> std::io::Result<()> {
        for op in ops.iter_mut() {
            match self.plan.take(op.kind) {
                None => {
                    // SAFETY: forwarded contract.
                    unsafe { self.inner.run(std::slice::from_mut(op))? }
                }
                Some(FaultEffect::Errno(e)) => op.result = -e,
                Some(FaultEffect::Panic) => panic!("injected fault: {:?} panics", op.kind),
                Some(FaultEffect::Delay { ms }) => {
                    std::thread::sleep(std::time::Duration::from_millis(u64::from(ms)));
                    // SAFETY: forwarded contract.
                    unsafe { self.inner.run(std::slice::from_mut(op))? }
                }
                Some(FaultEffect::TornWrite { bytes }) => {
                    let mut part =
                        IoOp::new(op.kind, op.file, op.offset, op.buf, bytes.min(op.len));
                    // SAFETY: a prefix of the caller's buffer.
                    unsafe { self.inner.run(std::slice::from_mut(&mut part))? };
                    op.result = -libc::EIO;
                }
                Some(FaultEffect::FlipBit { offset }) => {
                    if op.kind == IoKind::Write && offset < op.len {
                        // Corrupt what goes to disk, then restore the caller's buffer.
                        // SAFETY: offset < len, buffer exclusively ours during run.
                        unsafe { *op.buf.add(offset as usize) ^= 1 };
                        // SAFETY: forwarded contract.
                        let r = unsafe { self.inner.run(std::slice::from_mut(op)) };
                        // SAFETY: as above.
                        unsafe { *op.buf.add(offset as usize) ^= 1 };
                        r?;
                    } else {
                        // SAFETY: forwarded contract.
                        unsafe { self.inner.run(std::slice::from_mut(op))? };
                        if offset < op.len {
                            // SAFETY: as above.
                            unsafe { *op.buf.add(offset as usize) ^= 1 };
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
