//! The host backend: "device memory" is host memory and the kernels are the CPU build of
//! `kernels/cuda/*.cu`. Operations execute when called, one at a time per device (a
//! single in-order queue, like one GPU stream), so streams and events are always
//! complete; they exist so the daemon runs the same code on both backends.

use crate::device::{
    BackendKind, Device, DeviceBuffer, DeviceError, DeviceRange, EventId, LayoutId, StreamId,
    check_range,
};
use kvplane_ffi::kvp_copy_desc;
use kvplane_kernels::{EngineKv, HostLaunch, PagedLayout};
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Mutex;

enum Region {
    /// Allocated here; u128 elements keep it 16-byte aligned for the vector path.
    Owned(Vec<u128>),
    /// Registered memory owned by someone else (see `register_host_memory`).
    External { ptr: NonNull<u8> },
}

impl Region {
    fn ptr(&mut self) -> *mut u8 {
        match self {
            Region::Owned(v) => v.as_mut_ptr() as *mut u8,
            Region::External { ptr } => ptr.as_ptr(),
        }
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    buffers: HashMap<u64, Region>,
    layouts: HashMap<u64, PagedLayout>,
    streams: u32,
    events: HashMap<u64, ()>,
}

/// See the module docs.
pub struct HostDevice {
    state: Mutex<State>,
    launch: HostLaunch,
}

impl std::fmt::Debug for HostDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDevice")
            .field("launch", &self.launch)
            .finish_non_exhaustive()
    }
}

// SAFETY: the raw pointers in `Region::External` are only dereferenced by operations
// that hold the state mutex; `register_host_memory`'s contract makes them valid from any
// thread until freed.
unsafe impl Send for HostDevice {}
// SAFETY: as above; all access goes through the mutex.
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic inside an operation leaves only plain data behind: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn unknown(op: &'static str, what: &'static str, id: u64) -> DeviceError {
    DeviceError::UnknownHandle { op, what, id }
}

impl State {
    fn region(&mut self, op: &'static str, buf: DeviceBuffer) -> Result<*mut u8, DeviceError> {
        self.buffers
            .get_mut(&buf.id)
            .map(Region::ptr)
            .ok_or_else(|| unknown(op, "buffer", buf.id))
    }

    fn range(&mut self, op: &'static str, r: DeviceRange) -> Result<*mut u8, DeviceError> {
        check_range(op, r.offset_bytes, r.len_bytes, r.buffer.len_bytes)?;
        let base = self.region(op, r.buffer)?;
        // SAFETY: offset + len <= the buffer's length (checked just above).
        Ok(unsafe { base.add(r.offset_bytes) })
    }

    fn stream(&self, op: &'static str, s: StreamId) -> Result<(), DeviceError> {
        if s.0 < self.streams {
            Ok(())
        } else {
            Err(unknown(op, "stream", u64::from(s.0)))
        }
    }
}

impl Device for HostDevice {
    fn backend(&self) -> BackendKind {
        BackendKind::Host
    }

    fn describe(&self) -> String {
        format!(
            "host backend: CPU build of kernels/cuda/*.cu, {} thread(s) per launch (no GPU in use)",
            self.launch.threads
        )
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, DeviceError> {
        let mut v = Vec::new();
        v.try_reserve_exact(bytes.div_ceil(16))
            .map_err(|_| DeviceError::OutOfMemory { op: "alloc", bytes })?;
        v.resize(bytes.div_ceil(16), 0u128);
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.buffers.insert(id, Region::Owned(v));
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
        self.lock()
            .buffers
            .remove(&buf.id)
            .map(drop)
            .ok_or_else(|| unknown("free", "buffer", buf.id))
    }

    fn create_stream(&self) -> Result<StreamId, DeviceError> {
        let mut st = self.lock();
        st.streams += 1;
        Ok(StreamId(st.streams - 1))
    }

    fn sync_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        self.lock().stream("sync_stream", stream)
    }

    fn record_event(&self, stream: StreamId) -> Result<EventId, DeviceError> {
        let mut st = self.lock();
        st.stream("record_event", stream)?;
        let id = st.next_id;
        st.next_id += 1;
        st.events.insert(id, ());
        Ok(EventId(id))
    }

    fn stream_wait_event(&self, stream: StreamId, event: EventId) -> Result<(), DeviceError> {
        let st = self.lock();
        st.stream("stream_wait_event", stream)?;
        st.events
            .get(&event.0)
            .map(|_| ())
            .ok_or_else(|| unknown("stream_wait_event", "event", event.0))
    }

    fn sync_event(&self, event: EventId) -> Result<(), DeviceError> {
        self.lock()
            .events
            .get(&event.0)
            .map(|_| ())
            .ok_or_else(|| unknown("sync_event", "event", event.0))
    }

    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError> {
        self.lock()
            .events
            .remove(&event.0)
            .ok_or_else(|| unknown("destroy_event", "event", event.0))
    }

    fn copy_to_device(
        &self,
        stream: StreamId,
        src: &[u8],
        dst: DeviceRange,
    ) -> Result<(), DeviceError> {
        let op = "copy_to_device";
        let mut st = self.lock();
        st.stream(op, stream)?;
        if src.len() != dst.len_bytes {
            return Err(DeviceError::LengthMismatch {
                op,
                host_bytes: src.len(),
                device_bytes: dst.len_bytes,
            });
        }
        let d = st.range(op, dst)?;
        // SAFETY: `d` is valid for dst.len_bytes (checked range of a live region, the
        // lock held); `src` is a Rust slice, so not device memory being written.
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
        let mut st = self.lock();
        st.stream(op, stream)?;
        if dst.len() != src.len_bytes {
            return Err(DeviceError::LengthMismatch {
                op,
                host_bytes: dst.len(),
                device_bytes: src.len_bytes,
            });
        }
        let s = st.range(op, src)?;
        // SAFETY: as in copy_to_device, reversed.
        unsafe { std::ptr::copy(s, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy_device(
        &self,
        stream: StreamId,
        src: DeviceRange,
        dst: DeviceRange,
    ) -> Result<(), DeviceError> {
        let op = "copy_device";
        let mut st = self.lock();
        st.stream(op, stream)?;
        if src.len_bytes != dst.len_bytes {
            return Err(DeviceError::LengthMismatch {
                op,
                host_bytes: src.len_bytes,
                device_bytes: dst.len_bytes,
            });
        }
        let s = st.range(op, src)?;
        let d = st.range(op, dst)?;
        // SAFETY: checked ranges of live regions, lock held; `copy` allows overlap.
        unsafe { std::ptr::copy(s, d, src.len_bytes) };
        Ok(())
    }

    fn upload_layout(&self, layout: &PagedLayout) -> Result<LayoutId, DeviceError> {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.layouts.insert(id, layout.clone());
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
        self.paged("gather", stream, engine, layout, pages, blocks, true)
    }

    fn scatter(
        &self,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceRange,
    ) -> Result<(), DeviceError> {
        self.paged("scatter", stream, engine, layout, pages, blocks, false)
    }

    fn copy_batch(
        &self,
        stream: StreamId,
        src: DeviceBuffer,
        dst: DeviceBuffer,
        descs: &[kvp_copy_desc],
    ) -> Result<(), DeviceError> {
        let op = "copy_batch";
        let mut st = self.lock();
        st.stream(op, stream)?;
        let s = st.region(op, src)?;
        let d = st.region(op, dst)?;
        // SAFETY: both regions are live for their recorded lengths while the lock is
        // held; distinct handles are distinct allocations (registered external memory
        // could alias another registration: the caller registered both), and the same
        // handle is checked for overlapping descriptors by copy_batch_raw.
        unsafe {
            kvplane_kernels::copy_batch_raw(s, src.len_bytes, d, dst.len_bytes, descs, self.launch)
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
        let mut st = self.lock();
        st.stream(op, stream)?;
        let b = st.region(op, base)?;
        let mut sums = vec![0u64; descs.len()];
        // SAFETY: live region of base.len_bytes, only read, lock held.
        unsafe {
            kvplane_kernels::checksum_batch_raw(b, base.len_bytes, descs, &mut sums, self.launch)
        }
        .map_err(|source| DeviceError::Kernel { op, source })?;
        Ok(sums)
    }
}

impl HostDevice {
    #[allow(clippy::too_many_arguments)]
    fn paged(
        &self,
        op: &'static str,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceRange,
        to_blocks: bool,
    ) -> Result<(), DeviceError> {
        let mut st = self.lock();
        st.stream(op, stream)?;
        if engine.id == blocks.buffer.id {
            return Err(DeviceError::SameBuffer { op });
        }
        let e = st.region(op, engine)?;
        let b = st.range(op, blocks)?;
        let layout = st
            .layouts
            .get(&layout.0)
            .ok_or_else(|| unknown(op, "layout", layout.0))?;
        let e = NonNull::new(e).ok_or_else(|| unknown(op, "buffer", engine.id))?;
        // SAFETY: a live region of engine.len_bytes (lock held; external regions are
        // valid per register_host_memory's contract) that is not the blocks buffer.
        let kv = unsafe { EngineKv::new(e, engine.len_bytes) };
        let res = if to_blocks {
            // SAFETY: `b` is a checked range of another live region, accessed by nothing
            // else while the lock is held.
            unsafe {
                kvplane_kernels::gather_raw(&kv, layout, pages, b, blocks.len_bytes, self.launch)
            }
        } else {
            // SAFETY: as above.
            unsafe {
                kvplane_kernels::scatter_raw(&kv, layout, pages, b, blocks.len_bytes, self.launch)
            }
        };
        res.map_err(|source| DeviceError::Kernel { op, source })
    }
}
