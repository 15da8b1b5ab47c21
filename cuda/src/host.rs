//! The host backend: "device memory" is host memory and the kernels are the CPU build of
//! `kernels/cuda/*.cu`. Operations execute when called, on the calling thread, so a call
//! that returns is complete. As on a GPU, operations on one stream run one at a time in
//! order, and operations on different streams run concurrently: the device-wide table
//! lock is held only to look up and check handles, never during a copy, so data-plane
//! threads with a stream each copy in parallel. Events are complete when recorded,
//! unless the device was made with a completion delay
//! ([`HostDevice::with_completion_delay`]): then each operation reports done (to events,
//! `query_event`, the syncs) only that long after it was launched, as a GPU's queued
//! work does, so the data plane's completion state machine runs on machines without one.

use crate::device::{
    BackendKind, Device, DeviceBuffer, DeviceError, DeviceRange, EngineImport, EngineWindow,
    EventId, LayoutId, StreamId, check_range,
};
use kvplane_ffi::kvp_copy_desc;
use kvplane_kernels::{EngineKv, HostLaunch, PagedLayout};
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Memory allocated here; u128 elements keep it 16-byte aligned for the vector path.
/// Shared (`Arc`) between the buffer table and every operation running on it, so a
/// `free` while a copy runs only drops the table's reference: the memory goes when the
/// copy is done.
struct OwnedMem {
    elems: NonNull<[u128]>,
}

impl OwnedMem {
    fn new(bytes: usize) -> Result<Self, DeviceError> {
        let mut v: Vec<u128> = Vec::new();
        v.try_reserve_exact(bytes.div_ceil(16))
            .map_err(|_| DeviceError::OutOfMemory { op: "alloc", bytes })?;
        v.resize(bytes.div_ceil(16), 0);
        let elems = NonNull::from(Box::leak(v.into_boxed_slice()));
        Ok(Self { elems })
    }

    fn ptr(&self) -> *mut u8 {
        self.elems.as_ptr() as *mut u8
    }
}

impl Drop for OwnedMem {
    fn drop(&mut self) {
        // SAFETY: `elems` came from Box::leak in `new` and is released only here, once.
        drop(unsafe { Box::from_raw(self.elems.as_ptr()) });
    }
}

// SAFETY: plain heap memory; all access is through raw pointers handed to operations,
// whose checks (one writer per byte per launch) and the stream order govern races.
unsafe impl Send for OwnedMem {}
// SAFETY: as above.
unsafe impl Sync for OwnedMem {}

enum Region {
    Owned(Arc<OwnedMem>),
    /// Registered memory owned by someone else (see `register_host_memory`).
    External {
        ptr: NonNull<u8>,
    },
}

/// A region as one operation holds it: its address, and the allocation kept alive until
/// the operation is done.
struct Held {
    ptr: *mut u8,
    _keep: Option<Arc<OwnedMem>>,
}

impl Region {
    fn hold(&self) -> Held {
        match self {
            Region::Owned(m) => Held {
                ptr: m.ptr(),
                _keep: Some(Arc::clone(m)),
            },
            Region::External { ptr } => Held {
                ptr: ptr.as_ptr(),
                _keep: None,
            },
        }
    }
}

/// A stream: operations on it run one at a time, in the order they take this lock (as
/// work queued on one GPU stream runs in order). Operations on different streams run
/// concurrently.
type StreamLock = Arc<Mutex<StreamClock>>;

/// When the work queued on a stream reports done (`None`: already).
#[derive(Debug, Default)]
struct StreamClock {
    done_at: Option<Instant>,
}

impl StreamClock {
    fn pending(&self) -> Option<Instant> {
        self.done_at.filter(|t| *t > Instant::now())
    }
}

/// Blocks until `at` (a delayed completion), if it is still ahead.
fn wait_until(at: Option<Instant>) {
    if let Some(at) = at {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    buffers: HashMap<u64, Region>,
    layouts: HashMap<u64, Arc<PagedLayout>>,
    /// Indexed by stream id; `None` for a destroyed stream whose id is in `free_streams`.
    streams: Vec<Option<StreamLock>>,
    free_streams: Vec<u32>,
    /// When each event reports complete (`None`: it has, or was never recorded).
    events: HashMap<u64, Option<Instant>>,
}

/// The GPU UUID of a host device made `with_ipc_events_for_tests` (events name it).
#[doc(hidden)]
pub const TEST_GPU_UUID: [u8; 16] = *b"kvplane-host-gpu";

/// Called by every copy and kernel after its checks, holding only its stream (test hook).
pub type LaunchHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// See the module docs.
pub struct HostDevice {
    state: Mutex<State>,
    launch: HostLaunch,
    hook: Option<LaunchHook>,
    /// How long after its launch an operation reports done (zero: at once).
    completion_delay: Duration,
    /// Tests only: `import_ipc_event` opens any handle as a fresh event of this device.
    ipc_events_for_tests: bool,
    /// Tests only: operations that fail with an injected driver error (while not paused).
    failing_ops_for_tests: &'static [&'static str],
    failures_paused_for_tests: std::sync::atomic::AtomicBool,
    /// Tests only: how long freeing registered host memory takes.
    unregister_delay_for_tests: Duration,
}

impl std::fmt::Debug for HostDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDevice")
            .field("launch", &self.launch)
            .finish_non_exhaustive()
    }
}

// SAFETY: the raw pointers in `Region::External` are valid from any thread until freed
// (`register_host_memory`'s contract); owned memory is Send + Sync; the tables are
// behind the state mutex.
unsafe impl Send for HostDevice {}
// SAFETY: as above.
unsafe impl Sync for HostDevice {}

impl Default for HostDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl HostDevice {
    /// One host thread per launch (so throughput compares with single-thread memcpy).
    pub fn new() -> Self {
        Self::with_launch(HostLaunch::default())
    }

    pub fn with_launch(launch: HostLaunch) -> Self {
        Self {
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
            launch,
            hook: None,
            completion_delay: Duration::ZERO,
            ipc_events_for_tests: false,
            failing_ops_for_tests: &[],
            failures_paused_for_tests: Default::default(),
            unregister_delay_for_tests: Duration::ZERO,
        }
    }

    /// A device on which freeing registered host memory (an engine's KV buffer) takes
    /// `delay`, as `cuMemHostUnregister` of a large pinned window does on a GPU: tests
    /// that a session's release does not hold up the threads that poll rings.
    #[doc(hidden)]
    pub fn with_slow_unregister_for_tests(self, delay: Duration) -> Self {
        Self {
            unregister_delay_for_tests: delay,
            ..self
        }
    }

    /// A device whose `ops` ("read_file", "write_file", "checksum", "mac") fail with a
    /// driver error, as a GPU's driver or cuFile may (or, named "read_file: EIO" /
    /// "write_file: EIO", with the disk's EIO): tests of what the daemon does then.
    #[doc(hidden)]
    pub fn with_failing_ops_for_tests(ops: &'static [&'static str]) -> Self {
        Self {
            failing_ops_for_tests: ops,
            ..Self::new()
        }
    }

    /// Pauses (or resumes) the failures of [`Self::with_failing_ops_for_tests`]: a
    /// device that fails for a while, then works.
    #[doc(hidden)]
    pub fn pause_failures_for_tests(&self, paused: bool) {
        self.failures_paused_for_tests
            .store(paused, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a test device fails `op` (named as `failing`) now.
    fn injects(&self, failing: impl Fn(&str) -> bool) -> bool {
        !self
            .failures_paused_for_tests
            .load(std::sync::atomic::Ordering::Relaxed)
            && self.failing_ops_for_tests.iter().any(|f| failing(f))
    }

    /// The disk's error a test device injects for `op` ("read_file" / "write_file"):
    /// EIO when its failing ops name "<op>: EIO".
    fn injected_file_error(&self, op: &'static str) -> std::io::Result<()> {
        match self.injects(|f| f.strip_suffix(": EIO") == Some(op)) {
            true => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            false => Ok(()),
        }
    }

    fn injected_failure(&self, op: &'static str) -> Result<(), DeviceError> {
        match self.injects(|f| f == op) {
            true => Err(DeviceError::Driver {
                op,
                detail: "injected failure (test device)".into(),
            }),
            false => Ok(()),
        }
    }

    /// This device, opening any CUDA IPC event handle as a fresh event of its own (no other
    /// process can wait on or record it), complete the number of milliseconds after its
    /// import that bytes 8..16 of the handle say (little-endian; 0: at once, u64::MAX:
    /// never): tests of the data plane's logic around engines' IPC events run on it
    /// without a GPU. Never in the daemon.
    #[doc(hidden)]
    pub fn with_ipc_events_for_tests(self) -> Self {
        Self {
            ipc_events_for_tests: true,
            ..self
        }
    }

    /// A device whose operations report done `delay` after they are launched (the bytes
    /// still move at launch): events stay incomplete, `query_event` says so, and the syncs
    /// wait, for that long. It stands in for a GPU's asynchronous completions, so the
    /// data plane's polling of them is exercised without one (`[device]
    /// host_completion_delay_us`).
    pub fn with_completion_delay(launch: HostLaunch, delay: Duration) -> Self {
        Self {
            completion_delay: delay,
            ..Self::with_launch(launch)
        }
    }

    /// A device that calls `hook(op)` inside every copy and kernel, after the op's checks,
    /// holding only its stream: tests use it to stop an operation midway.
    #[doc(hidden)]
    pub fn with_launch_hook_for_tests(launch: HostLaunch, hook: LaunchHook) -> Self {
        Self {
            hook: Some(hook),
            ..Self::with_launch(launch)
        }
    }

    fn event_done_at(
        &self,
        op: &'static str,
        event: EventId,
    ) -> Result<Option<Instant>, DeviceError> {
        self.lock()
            .events
            .get(&event.0)
            .copied()
            .ok_or_else(|| unknown(op, "event", event.0))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic inside an operation leaves only plain data behind: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters `stream` (waits for the operation running on it, if any), then runs the
    /// test hook. The device-wide state lock is not held.
    fn enter<'a>(&self, op: &'static str, stream: &'a StreamLock) -> MutexGuard<'a, StreamClock> {
        let mut guard = stream.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hook) = &self.hook {
            hook(op);
        }
        if !self.completion_delay.is_zero() {
            guard.done_at = Some(Instant::now() + self.completion_delay);
        }
        guard
    }
}

fn unknown(op: &'static str, what: &'static str, id: u64) -> DeviceError {
    DeviceError::UnknownHandle { op, what, id }
}

impl State {
    fn region(&self, op: &'static str, buf: DeviceBuffer) -> Result<Held, DeviceError> {
        self.buffers
            .get(&buf.id)
            .map(Region::hold)
            .ok_or_else(|| unknown(op, "buffer", buf.id))
    }

    /// The held region of `r.buffer` and the address of `r`'s first byte.
    fn range(&self, op: &'static str, r: DeviceRange) -> Result<(Held, *mut u8), DeviceError> {
        check_range(op, r.offset_bytes, r.len_bytes, r.buffer.len_bytes)?;
        let held = self.region(op, r.buffer)?;
        // SAFETY: offset + len <= the buffer's length (checked just above).
        let at = unsafe { held.ptr.add(r.offset_bytes) };
        Ok((held, at))
    }

    fn stream(&self, op: &'static str, s: StreamId) -> Result<StreamLock, DeviceError> {
        self.streams
            .get(s.0 as usize)
            .and_then(Clone::clone)
            .ok_or_else(|| unknown(op, "stream", u64::from(s.0)))
    }

    fn layout(&self, op: &'static str, l: LayoutId) -> Result<Arc<PagedLayout>, DeviceError> {
        self.layouts
            .get(&l.0)
            .cloned()
            .ok_or_else(|| unknown(op, "layout", l.0))
    }
}

impl Device for HostDevice {
    fn backend(&self) -> BackendKind {
        BackendKind::Host
    }

    fn describe(&self) -> String {
        let delayed = if self.completion_delay.is_zero() {
            String::new()
        } else {
            format!(
                ", completions reported {} us after launch (testing)",
                self.completion_delay.as_micros()
            )
        };
        format!(
            "host backend: CPU build of kernels/cuda/*.cu, {} thread(s) per launch{delayed} (no GPU in use)",
            self.launch.threads
        )
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, DeviceError> {
        // Allocated and zeroed outside the lock.
        let mem = OwnedMem::new(bytes)?;
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.buffers.insert(id, Region::Owned(Arc::new(mem)));
        Ok(DeviceBuffer {
            id,
            len_bytes: bytes,
        })
    }

    unsafe fn register_host_memory(
        &self,
        ptr: NonNull<u8>,
        len_bytes: usize,
    ) -> Result<DeviceBuffer, DeviceError> {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.buffers.insert(id, Region::External { ptr });
        Ok(DeviceBuffer { id, len_bytes })
    }

    fn free(&self, buf: DeviceBuffer) -> Result<(), DeviceError> {
        let region = self
            .lock()
            .buffers
            .remove(&buf.id)
            .ok_or_else(|| unknown("free", "buffer", buf.id))?;
        if matches!(region, Region::External { .. }) && !self.unregister_delay_for_tests.is_zero() {
            std::thread::sleep(self.unregister_delay_for_tests);
        }
        // Outside the lock: the last reference (if no operation holds one) unmaps here.
        drop(region);
        Ok(())
    }

    fn gpu_uuid(&self) -> Option<[u8; 16]> {
        // The test stand-in for IPC events has a GPU identity for them to name.
        self.ipc_events_for_tests.then_some(TEST_GPU_UUID)
    }

    fn import_engine_memory(
        &self,
        _what: EngineImport<'_>,
        _alloc_bytes: u64,
    ) -> Result<DeviceBuffer, DeviceError> {
        Err(DeviceError::Unsupported {
            op: "importing GPU memory",
            backend: "host",
        })
    }

    fn engine_window(&self, parts: &[DeviceBuffer]) -> Result<EngineWindow, DeviceError> {
        // Host memory an engine registers arrives as one contiguous mapping (the daemon
        // maps all its memfds into one window), so one part is all there can be here.
        match parts {
            [one] => {
                self.lock().region("engine_window", *one)?;
                Ok(EngineWindow {
                    buffer: *one,
                    part_offsets: vec![0],
                    owns_buffer: false,
                })
            }
            _ => Err(DeviceError::Unsupported {
                op: "a window over several buffers",
                backend: "host",
            }),
        }
    }

    fn create_stream(&self) -> Result<StreamId, DeviceError> {
        let mut st = self.lock();
        if let Some(id) = st.free_streams.pop() {
            st.streams[id as usize] = Some(StreamLock::default());
            return Ok(StreamId(id));
        }
        let id = u32::try_from(st.streams.len()).map_err(|_| DeviceError::OutOfMemory {
            op: "create_stream",
            bytes: 0,
        })?;
        st.streams.push(Some(StreamLock::default()));
        Ok(StreamId(id))
    }

    fn destroy_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        let mut st = self.lock();
        st.streams
            .get_mut(stream.0 as usize)
            .and_then(Option::take)
            .ok_or_else(|| unknown("destroy_stream", "stream", u64::from(stream.0)))?;
        st.free_streams.push(stream.0);
        Ok(())
    }

    fn sync_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        let s = self.lock().stream("sync_stream", stream)?;
        // Waits for an operation another thread is running on it, then for its delayed
        // completion.
        let done_at = s.lock().unwrap_or_else(|p| p.into_inner()).pending();
        wait_until(done_at);
        Ok(())
    }

    fn create_event(&self) -> Result<EventId, DeviceError> {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.events.insert(id, None);
        Ok(EventId(id))
    }

    fn record_event_on(&self, stream: StreamId, event: EventId) -> Result<(), DeviceError> {
        let s = self.lock().stream("record_event", stream)?;
        // At the end of the stream: after the operation running on it, if any.
        let done_at = s.lock().unwrap_or_else(|p| p.into_inner()).pending();
        let mut st = self.lock();
        let slot = st
            .events
            .get_mut(&event.0)
            .ok_or_else(|| unknown("record_event", "event", event.0))?;
        *slot = done_at;
        Ok(())
    }

    fn import_ipc_event(&self, handle: &[u8; 64]) -> Result<EventId, DeviceError> {
        if self.ipc_events_for_tests {
            // Bytes 8..16 of a test handle: milliseconds from the import until the event
            // completes, as if its engine had just recorded it behind that much work
            // (u64::MAX: never).
            let ms = u64::from_le_bytes(handle[8..16].try_into().expect("8 bytes"));
            let done_at = (ms > 0).then(|| {
                let never = Duration::from_secs(1 << 30);
                let wait = Duration::from_millis(ms).min(never);
                Instant::now()
                    .checked_add(wait)
                    .unwrap_or_else(Instant::now)
            });
            let ev = self.create_event()?;
            self.lock().events.insert(ev.0, done_at);
            return Ok(ev);
        }
        Err(DeviceError::Unsupported {
            op: "a CUDA IPC event",
            backend: "host",
        })
    }

    fn stream_wait_event(&self, stream: StreamId, event: EventId) -> Result<(), DeviceError> {
        self.lock().stream("stream_wait_event", stream)?;
        // Work here runs on the caller's thread at launch: waiting now is what keeps
        // the stream's later work after the event.
        wait_until(self.event_done_at("stream_wait_event", event)?);
        Ok(())
    }

    fn query_event(&self, event: EventId) -> Result<bool, DeviceError> {
        let done_at = self.event_done_at("query_event", event)?;
        Ok(done_at.is_none_or(|t| t <= Instant::now()))
    }

    fn sync_event(&self, event: EventId) -> Result<(), DeviceError> {
        wait_until(self.event_done_at("sync_event", event)?);
        Ok(())
    }

    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError> {
        self.lock()
            .events
            .remove(&event.0)
            .map(|_| ())
            .ok_or_else(|| unknown("destroy_event", "event", event.0))
    }

    fn copy_to_device(
        &self,
        stream: StreamId,
        src: &[u8],
        dst: DeviceRange,
    ) -> Result<(), DeviceError> {
        let op = "copy_to_device";
        if src.len() != dst.len_bytes {
            return Err(DeviceError::LengthMismatch {
                op,
                host_bytes: src.len(),
                device_bytes: dst.len_bytes,
            });
        }
        let (s, (_held, d)) = {
            let st = self.lock();
            (st.stream(op, stream)?, st.range(op, dst)?)
        };
        let _in_stream = self.enter(op, &s);
        // SAFETY: `d` is valid for dst.len_bytes (checked range of a region `_held` keeps
        // alive); `src` is a Rust slice, so not device memory being written.
        unsafe { std::ptr::copy(src.as_ptr(), d, src.len()) };
        Ok(())
    }

    fn copy_to_host(
        &self,
        stream: StreamId,
        src: DeviceRange,
        dst: &mut [u8],
    ) -> Result<(), DeviceError> {
        let op = "copy_to_host";
        if dst.len() != src.len_bytes {
            return Err(DeviceError::LengthMismatch {
                op,
                host_bytes: dst.len(),
                device_bytes: src.len_bytes,
            });
        }
        let (s, (_held, p)) = {
            let st = self.lock();
            (st.stream(op, stream)?, st.range(op, src)?)
        };
        let _in_stream = self.enter(op, &s);
        // SAFETY: as in copy_to_device, reversed.
        unsafe { std::ptr::copy(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy_device(
        &self,
        stream: StreamId,
        src: DeviceRange,
        dst: DeviceRange,
    ) -> Result<(), DeviceError> {
        let op = "copy_device";
        if src.len_bytes != dst.len_bytes {
            return Err(DeviceError::LengthMismatch {
                op,
                host_bytes: src.len_bytes,
                device_bytes: dst.len_bytes,
            });
        }
        let (s, (_hs, sp), (_hd, dp)) = {
            let st = self.lock();
            (
                st.stream(op, stream)?,
                st.range(op, src)?,
                st.range(op, dst)?,
            )
        };
        let _in_stream = self.enter(op, &s);
        // SAFETY: checked ranges of regions kept alive by `_hs`/`_hd`; `copy` allows overlap.
        unsafe { std::ptr::copy(sp, dp, src.len_bytes) };
        Ok(())
    }

    fn upload_layout(&self, layout: &PagedLayout) -> Result<LayoutId, DeviceError> {
        let layout = Arc::new(layout.clone());
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.layouts.insert(id, layout);
        Ok(LayoutId(id))
    }

    fn free_layout(&self, layout: LayoutId) -> Result<(), DeviceError> {
        self.lock()
            .layouts
            .remove(&layout.0)
            .map(drop)
            .ok_or_else(|| unknown("free_layout", "layout", layout.0))
    }

    fn gather(
        &self,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceRange,
    ) -> Result<(), DeviceError> {
        self.paged("gather", stream, engine, layout, pages, blocks, None)
    }

    fn scatter(
        &self,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceRange,
    ) -> Result<(), DeviceError> {
        self.paged("scatter", stream, engine, layout, pages, blocks, None)
    }

    fn gather_to_slots(
        &self,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceBuffer,
        block_offsets: &[u64],
    ) -> Result<(), DeviceError> {
        let whole = blocks.whole();
        self.paged(
            "gather",
            stream,
            engine,
            layout,
            pages,
            whole,
            Some(block_offsets),
        )
    }

    fn scatter_from_slots(
        &self,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceBuffer,
        block_offsets: &[u64],
    ) -> Result<(), DeviceError> {
        let whole = blocks.whole();
        self.paged(
            "scatter",
            stream,
            engine,
            layout,
            pages,
            whole,
            Some(block_offsets),
        )
    }

    fn copy_batch(
        &self,
        stream: StreamId,
        src: DeviceBuffer,
        dst: DeviceBuffer,
        descs: &[kvp_copy_desc],
    ) -> Result<(), DeviceError> {
        let op = "copy_batch";
        let (st_lock, s, d) = {
            let st = self.lock();
            (
                st.stream(op, stream)?,
                st.region(op, src)?,
                st.region(op, dst)?,
            )
        };
        let _in_stream = self.enter(op, &st_lock);
        // SAFETY: both regions are kept alive for their recorded lengths by `s`/`d`;
        // distinct handles are distinct allocations (registered external memory could
        // alias another registration: the caller registered both), and the same handle is
        // checked for overlapping descriptors by copy_batch_raw.
        unsafe {
            kvplane_kernels::copy_batch_raw(
                s.ptr,
                src.len_bytes,
                d.ptr,
                dst.len_bytes,
                descs,
                self.launch,
            )
        }
        .map_err(|source| DeviceError::Kernel { op, source })
    }

    fn checksum(
        &self,
        stream: StreamId,
        base: DeviceBuffer,
        descs: &[kvp_copy_desc],
    ) -> Result<Vec<u64>, DeviceError> {
        let op = "checksum";
        self.injected_failure(op)?;
        let (s, b) = {
            let st = self.lock();
            (st.stream(op, stream)?, st.region(op, base)?)
        };
        let mut sums = vec![0u64; descs.len()];
        let _in_stream = self.enter(op, &s);
        // SAFETY: a region of base.len_bytes kept alive by `b`, only read.
        unsafe {
            kvplane_kernels::checksum_batch_raw(
                b.ptr,
                base.len_bytes,
                descs,
                &mut sums,
                self.launch,
            )
        }
        .map_err(|source| DeviceError::Kernel { op, source })?;
        Ok(sums)
    }

    fn mac(
        &self,
        stream: StreamId,
        base: DeviceBuffer,
        descs: &[kvp_copy_desc],
        key: &[u8; 32],
    ) -> Result<Vec<[u8; 32]>, DeviceError> {
        let op = "mac";
        self.injected_failure(op)?;
        let (s, b) = {
            let st = self.lock();
            (st.stream(op, stream)?, st.region(op, base)?)
        };
        let mut macs = vec![[0u8; 32]; descs.len()];
        let _in_stream = self.enter(op, &s);
        // SAFETY: a region of base.len_bytes kept alive by `b`, only read.
        unsafe {
            kvplane_kernels::mac_batch_raw(
                b.ptr,
                base.len_bytes,
                descs,
                key,
                &mut macs,
                self.launch,
            )
        }
        .map_err(|source| DeviceError::Kernel { op, source })?;
        Ok(macs)
    }

    fn read_file(
        &self,
        stream: StreamId,
        dst: DeviceRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
    ) -> Result<(), DeviceError> {
        let op = "read_file";
        self.injected_failure(op)?;
        let (s, (_held, p)) = {
            let st = self.lock();
            (st.stream(op, stream)?, st.range(op, dst)?)
        };
        let _in_stream = self.enter(op, &s);
        let failed = |source| DeviceError::FileRead {
            op,
            file_offset,
            len_bytes: dst.len_bytes,
            source,
        };
        self.injected_file_error(op).map_err(failed)?;
        if dst.len_bytes == 0 {
            return Ok(());
        }
        // The tier's files are O_DIRECT: reads go through an aligned bounce buffer, whole
        // 4 KiB pages at 4 KiB offsets (what a GPU's DMA would do without the CPU).
        let start = file_offset - file_offset % FILE_PAGE;
        let end = file_offset + dst.len_bytes as u64;
        let bounce = Bounce::new(op)?;
        let mut at = start;
        while at < end {
            let want = ((end - at).div_ceil(FILE_PAGE) * FILE_PAGE).min(BOUNCE_BYTES as u64);
            let got = bounce.pread(fd, want as usize, at).map_err(failed)? as u64;
            // The bytes of [at, at + got) that `dst` wants.
            let from = file_offset.max(at);
            let to = end.min(at + got);
            if to > from {
                // SAFETY: [from - at, to - at) lies inside what pread filled; the
                // destination [from - file_offset, to - file_offset) lies inside `dst`,
                // checked by `range` and kept alive by `_held`; no one else writes it
                // during the call.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bounce.ptr.add((from - at) as usize),
                        p.add((from - file_offset) as usize),
                        (to - from) as usize,
                    )
                };
            }
            if at + got >= end {
                break;
            }
            if got < want {
                // Short before the end of what was asked: the file ends there.
                return Err(failed(std::io::ErrorKind::UnexpectedEof.into()));
            }
            at += got;
        }
        Ok(())
    }

    fn write_file(
        &self,
        stream: StreamId,
        src: DeviceRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
    ) -> Result<(), DeviceError> {
        let op = "write_file";
        self.injected_failure(op)?;
        let (s, (_held, p)) = {
            let st = self.lock();
            (st.stream(op, stream)?, st.range(op, src)?)
        };
        let _in_stream = self.enter(op, &s);
        let failed = |source| DeviceError::FileWrite {
            op,
            file_offset,
            len_bytes: src.len_bytes,
            source,
        };
        self.injected_file_error(op).map_err(failed)?;
        if src.len_bytes == 0 {
            return Ok(());
        }
        // Whole aligned pages through the bounce buffer (O_DIRECT).
        let start = file_offset - file_offset % FILE_PAGE;
        let end = file_offset + src.len_bytes as u64;
        let bounce = Bounce::new(op)?;
        let mut at = start;
        while at < end {
            let want = ((end - at).div_ceil(FILE_PAGE) * FILE_PAGE).min(BOUNCE_BYTES as u64);
            let from = file_offset.max(at);
            let to = end.min(at + want);
            // The pages `src` covers in part: read first (past the end of the file they
            // stay zero), so the file keeps its other bytes.
            let first = from - from % FILE_PAGE;
            let last = (to - 1) - (to - 1) % FILE_PAGE;
            let pages = if first == last { 1 } else { 2 };
            for page in [first, last].into_iter().take(pages) {
                let partial = from > page || to < page + FILE_PAGE;
                if partial {
                    let at_in_bounce = (page - at) as usize;
                    bounce.zero(at_in_bounce, FILE_PAGE as usize);
                    bounce
                        .pread_into(at_in_bounce, fd, FILE_PAGE as usize, page)
                        .map_err(failed)?;
                }
            }
            // SAFETY: the source [from - file_offset, to - file_offset) lies inside `src`
            // (checked by `range`, kept alive by `_held`); the destination
            // [from - at, to - at) inside the bounce buffer's `want` <= BOUNCE_BYTES bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    p.add((from - file_offset) as usize),
                    bounce.ptr.add((from - at) as usize),
                    (to - from) as usize,
                )
            };
            bounce.pwrite(fd, want as usize, at).map_err(failed)?;
            at += want;
        }
        Ok(())
    }
}

/// Pages of the NVMe tier's O_DIRECT files: offsets and lengths of their I/O.
const FILE_PAGE: u64 = 4096;
/// The host backend's file I/O goes through this much aligned memory at a time.
const BOUNCE_BYTES: usize = 1 << 20;

/// An aligned buffer for the host backend's O_DIRECT file I/O.
struct Bounce {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Bounce {
    fn new(op: &'static str) -> Result<Self, DeviceError> {
        let layout = std::alloc::Layout::from_size_align(BOUNCE_BYTES, FILE_PAGE as usize)
            .expect("a valid layout");
        // SAFETY: a non-zero size layout; freed in drop.
        let ptr = unsafe { std::alloc::alloc(layout) };
        match ptr.is_null() {
            true => Err(DeviceError::OutOfMemory {
                op,
                bytes: BOUNCE_BYTES,
            }),
            false => Ok(Self { ptr, layout }),
        }
    }

    fn zero(&self, at: usize, len: usize) {
        assert!(at + len <= BOUNCE_BYTES);
        // SAFETY: [at, at + len) lies inside the BOUNCE_BYTES owned by self.
        unsafe { std::ptr::write_bytes(self.ptr.add(at), 0, len) };
    }

    /// Reads up to `len` bytes at `offset` into the start of the buffer (retrying on
    /// EINTR); how many it got (fewer only at the end of the file).
    fn pread(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        len: usize,
        offset: u64,
    ) -> std::io::Result<usize> {
        self.pread_into(0, fd, len, offset)
    }

    /// [`Self::pread`] into the buffer at `at` (a page boundary).
    fn pread_into(
        &self,
        at: usize,
        fd: std::os::fd::BorrowedFd<'_>,
        len: usize,
        offset: u64,
    ) -> std::io::Result<usize> {
        assert!(at + len <= BOUNCE_BYTES && at % FILE_PAGE as usize == 0);
        loop {
            // SAFETY: [at, at + len) lies inside the BOUNCE_BYTES owned by self.
            let got = unsafe {
                libc::pread(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    self.ptr.add(at) as *mut libc::c_void,
                    len,
                    offset as libc::off_t,
                )
            };
            if got >= 0 {
                return Ok(got as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Writes all `len` bytes at `offset` (retrying on EINTR and short writes).
    fn pwrite(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        len: usize,
        offset: u64,
    ) -> std::io::Result<()> {
        assert!(len <= BOUNCE_BYTES);
        let mut done = 0;
        while done < len {
            // SAFETY: [done, len) lies inside the buffer's BOUNCE_BYTES bytes.
            let put = unsafe {
                libc::pwrite(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    self.ptr.add(done) as *const libc::c_void,
                    len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match put {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n if n > 0 => done += n as usize,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

impl HostDevice {
    /// Gather (`op` "gather") or scatter of `pages` against `blocks`: contiguous blocks
    /// filling the range (`block_offsets` None) or blocks at `blocks.offset_bytes +
    /// block_offsets[i]` (slots; `blocks` is then the whole buffer).
    #[allow(clippy::too_many_arguments)]
    fn paged(
        &self,
        op: &'static str,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceRange,
        block_offsets: Option<&[u64]>,
    ) -> Result<(), DeviceError> {
        if engine.id == blocks.buffer.id {
            return Err(DeviceError::SameBuffer { op });
        }
        let (s, e, (_hb, b), layout) = {
            let st = self.lock();
            (
                st.stream(op, stream)?,
                st.region(op, engine)?,
                st.range(op, blocks)?,
                st.layout(op, layout)?,
            )
        };
        let e_ptr = NonNull::new(e.ptr).ok_or_else(|| unknown(op, "buffer", engine.id))?;
        // SAFETY: a region of engine.len_bytes kept alive by `e` (external regions are
        // valid per register_host_memory's contract) that is not the blocks buffer.
        let kv = unsafe { EngineKv::new(e_ptr, engine.len_bytes) };
        let kernel = |source| DeviceError::Kernel { op, source };
        let _in_stream = self.enter(op, &s);
        let (n, launch) = (blocks.len_bytes, self.launch);
        // SAFETY: (all four calls) `b` is a checked range of another region kept alive by `_hb`;
        // the wrappers check every block against `n` and, for a gather into slots, that
        // the destinations are disjoint. Nothing else writes it: operations on this
        // stream run one at a time, and other streams touching the same bytes at once
        // race exactly as they would on a GPU (the caller's ordering, through events).
        let res = unsafe {
            match (op, block_offsets) {
                ("gather", None) => kvplane_kernels::gather_raw(&kv, &layout, pages, b, n, launch),
                ("gather", Some(o)) => {
                    kvplane_kernels::gather_slots_raw(&kv, &layout, pages, b, n, o, launch)
                }
                (_, None) => kvplane_kernels::scatter_raw(&kv, &layout, pages, b, n, launch),
                (_, Some(o)) => {
                    kvplane_kernels::scatter_slots_raw(&kv, &layout, pages, b, n, o, launch)
                }
            }
        };
        res.map_err(kernel)
    }
}
