//! The `Device` trait: what the daemon asks of a GPU (or of the host standing in for
//! one): memory, copies, the gather/scatter/copy/checksum kernels, streams and events.
//!
//! Buffers, streams, events and layouts are small copyable handles owned by the device;
//! the device checks every handle, offset and length, so a wrong one is an error, never
//! an access outside an allocation. As on a GPU, operations on one stream run in order;
//! work on different streams is ordered only through events, and may run at the same
//! time (so threads that copy in parallel use a stream each).

use kvplane_ffi::kvp_copy_desc;
use kvplane_kernels::{KernelError, PagedLayout};

/// Which backend a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Host memory and the CPU build of the kernels.
    Host,
    /// An NVIDIA GPU through the CUDA driver.
    Cuda,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Host => "host",
            BackendKind::Cuda => "cuda",
        }
    }
    /// The `backend` value of the ABI's stats and attach reply (0 = host, 1 = cuda).
    pub fn abi_code(self) -> u32 {
        match self {
            BackendKind::Host => 0,
            BackendKind::Cuda => 1,
        }
    }
}

/// A device allocation (or registered/imported memory): handle plus its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceBuffer {
    pub(crate) id: u64,
    pub(crate) len_bytes: usize,
}

impl DeviceBuffer {
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }
    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }
}

/// A range of a device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRange {
    pub buffer: DeviceBuffer,
    pub offset_bytes: usize,
    pub len_bytes: usize,
}

impl DeviceBuffer {
    /// `[offset, offset + len)` of this buffer (checked when used).
    pub fn range(&self, offset_bytes: usize, len_bytes: usize) -> DeviceRange {
        DeviceRange {
            buffer: *self,
            offset_bytes,
            len_bytes,
        }
    }
    pub fn whole(&self) -> DeviceRange {
        self.range(0, self.len_bytes)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(pub(crate) u32);

impl StreamId {
    /// A handle no device issued, for tests of handle checking.
    #[doc(hidden)]
    pub fn from_raw_for_tests(id: u32) -> Self {
        StreamId(id)
    }
    /// The handle's number, for tests that check the stream table stays bounded.
    #[doc(hidden)]
    pub fn raw_for_tests(self) -> u32 {
        self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId(pub(crate) u64);

impl EventId {
    /// A handle no device issued, for tests of handle checking.
    #[doc(hidden)]
    pub fn from_raw_for_tests(id: u64) -> Self {
        EventId(id)
    }
}

/// A kernel layout descriptor resident on the device (uploaded once per engine attach).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayoutId(pub(crate) u64);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "no NVIDIA driver: libcuda.so could not be loaded (no GPU driver on this machine); \
         use the host backend"
    )]
    NoDriver,
    #[error("CUDA driver call {op} failed: {detail}")]
    Driver { op: &'static str, detail: String },
    #[error("no CUDA device {ordinal} (found {count})")]
    NoDevice { ordinal: usize, count: usize },
    #[error("{op}: unknown {what} handle {id}")]
    UnknownHandle {
        op: &'static str,
        what: &'static str,
        id: u64,
    },
    #[error("{op}: range [{offset_bytes}, +{len_bytes}) exceeds the buffer's {buffer_bytes} bytes")]
    OutOfRange {
        op: &'static str,
        offset_bytes: usize,
        len_bytes: usize,
        buffer_bytes: usize,
    },
    #[error("{op}: host buffer is {host_bytes} bytes, device range is {device_bytes}")]
    LengthMismatch {
        op: &'static str,
        host_bytes: usize,
        device_bytes: usize,
    },
    #[error("{op}: engine buffer and block buffer are the same allocation")]
    SameBuffer { op: &'static str },
    #[error("{op}: {source}")]
    Kernel {
        op: &'static str,
        source: KernelError,
    },
    #[error("kernel compile: {0}")]
    Compile(#[from] crate::nvrtc::CompileError),
    #[error("{op}: out of memory allocating {bytes} bytes")]
    OutOfMemory { op: &'static str, bytes: usize },
    #[error("slot arena of {capacity_bytes} bytes for blocks of {block_bytes} bytes: {reason}")]
    SlotArena {
        capacity_bytes: u64,
        block_bytes: usize,
        reason: &'static str,
    },
    #[error("{op}: reading {len_bytes} bytes at file offset {file_offset}: {source}")]
    FileRead {
        op: &'static str,
        file_offset: u64,
        len_bytes: usize,
        source: std::io::Error,
    },
    #[error("{op}: writing {len_bytes} bytes at file offset {file_offset}: {source}")]
    FileWrite {
        op: &'static str,
        file_offset: u64,
        len_bytes: usize,
        source: std::io::Error,
    },
    #[error("{op} is not available on the {backend} backend")]
    Unsupported {
        op: &'static str,
        backend: &'static str,
    },
}

/// GPU memory another process exported, for [`Device::import_engine_memory`].
#[derive(Debug, Clone, Copy)]
pub enum EngineImport<'a> {
    /// The legacy CUDA IPC handle of a `cudaMalloc` allocation's base.
    CudaIpc { handle: &'a [u8; 64] },
    /// VMM allocations (`cuMemCreate`), each exported as a POSIX file descriptor, with
    /// its size: mapped back to back in one reservation, in order (an allocator that maps
    /// its memory in chunks, such as PyTorch's expandable segments, gives a run of them;
    /// most engines one).
    CudaVmm {
        chunks: &'a [(std::os::fd::BorrowedFd<'a>, u64)],
    },
}

/// One buffer through which a device's kernels address several others (an engine's
/// regions): `buffer` + `part_offsets[i]` is the start of part `i`.
#[derive(Debug, Clone)]
pub struct EngineWindow {
    pub buffer: DeviceBuffer,
    pub part_offsets: Vec<u64>,
    /// Whether `buffer` is a handle of its own (free it before the parts) or one of them.
    pub owns_buffer: bool,
}

/// The device layer. Implementations: [`crate::host::HostDevice`] and
/// [`crate::cuda::CudaDevice`].
pub trait Device: Send + Sync + std::fmt::Debug {
    fn backend(&self) -> BackendKind;
    /// One line for logs and `kvplane status` (name, memory, compute capability).
    fn describe(&self) -> String;

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, DeviceError>;
    /// Makes host memory the daemon mapped (a pinned pool, an engine's shared KV buffer)
    /// usable by copies and kernels: on CUDA it is page-locked and mapped into the
    /// device's address space (kernels read it over PCIe/NVLink-C2C); on the host it is
    /// used in place. Undo with [`Device::free`].
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len_bytes` until the returned buffer
    /// is freed, and not overlap another live registration. Another process may write
    /// it concurrently (engine KV buffers); data
    /// read then is whatever it wrote.
    unsafe fn register_host_memory(
        &self,
        ptr: std::ptr::NonNull<u8>,
        len_bytes: usize,
    ) -> Result<DeviceBuffer, DeviceError>;
    /// Frees an allocation, or drops a registration/import of external memory.
    fn free(&self, buf: DeviceBuffer) -> Result<(), DeviceError>;

    /// The GPU's UUID (`cuDeviceGetUuid`); `None` on the host backend.
    fn gpu_uuid(&self) -> Option<[u8; 16]>;
    /// Opens GPU memory an engine exported, as a buffer of `alloc_bytes` (the whole
    /// allocation): the import is refused when the allocation is smaller, so no later
    /// access can leave it. Undo with [`Device::free`]. The host backend has no GPU
    /// memory to import and says so.
    fn import_engine_memory(
        &self,
        what: EngineImport<'_>,
        alloc_bytes: u64,
    ) -> Result<DeviceBuffer, DeviceError>;
    /// A buffer through which one kernel launch addresses all of `parts` (an engine's
    /// registered and imported regions). With one part, that part.
    fn engine_window(&self, parts: &[DeviceBuffer]) -> Result<EngineWindow, DeviceError>;

    fn create_stream(&self) -> Result<StreamId, DeviceError>;
    /// Destroys a stream once its owner is done with it (after waiting for its work); its
    /// handle may be issued again by a later `create_stream`. Without this, a daemon that
    /// gives each session a stream would grow its stream table for as long as it runs.
    fn destroy_stream(&self, stream: StreamId) -> Result<(), DeviceError>;
    /// Blocks until everything queued on `stream` has finished.
    fn sync_stream(&self, stream: StreamId) -> Result<(), DeviceError>;
    /// An event, not yet recorded (complete until it is). One per queue of work that is
    /// recorded again and again, so the data path creates none per operation.
    fn create_event(&self) -> Result<EventId, DeviceError>;
    /// Records `event` at the current end of `stream`: it completes when everything
    /// queued there so far has.
    fn record_event_on(&self, stream: StreamId, event: EventId) -> Result<(), DeviceError>;
    /// Records a new event at the current end of `stream`.
    fn record_event(&self, stream: StreamId) -> Result<EventId, DeviceError> {
        let event = self.create_event()?;
        if let Err(e) = self.record_event_on(stream, event) {
            let _ = self.destroy_event(event);
            return Err(e);
        }
        Ok(event)
    }
    /// Opens an engine's CUDA IPC event (cuIpcGetEventHandle's 64 bytes; the event was
    /// created with CU_EVENT_INTERPROCESS on this GPU): the daemon's streams can wait on
    /// it and record it. Undo with [`Device::destroy_event`]. The host backend has no
    /// GPU events to open and says so.
    fn import_ipc_event(&self, handle: &[u8; 64]) -> Result<EventId, DeviceError>;
    /// Makes later work on `stream` wait for `event` (no CPU round trip).
    fn stream_wait_event(&self, stream: StreamId, event: EventId) -> Result<(), DeviceError>;
    /// Whether the work `event` was recorded after has finished, without waiting
    /// (`cuEventQuery`): how a data-plane thread learns of completions while it keeps
    /// serving other sessions. An error is the work's failure (or a bad handle).
    fn query_event(&self, event: EventId) -> Result<bool, DeviceError>;
    /// Blocks until `event` has completed.
    fn sync_event(&self, event: EventId) -> Result<(), DeviceError>;
    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError>;

    /// Host -> device copy; `src` may be reused when this returns.
    fn copy_to_device(
        &self,
        stream: StreamId,
        src: &[u8],
        dst: DeviceRange,
    ) -> Result<(), DeviceError>;
    /// Device -> host copy; complete when this returns.
    fn copy_to_host(
        &self,
        stream: StreamId,
        src: DeviceRange,
        dst: &mut [u8],
    ) -> Result<(), DeviceError>;

    /// Device-side copy of one range through the copy engines (cudaMemcpyAsync; works
    /// for device, registered host and peer memory alike). Lengths must match.
    fn copy_device(
        &self,
        stream: StreamId,
        src: DeviceRange,
        dst: DeviceRange,
    ) -> Result<(), DeviceError>;

    /// Uploads a validated engine layout; kernels read it from device memory.
    fn upload_layout(&self, layout: &PagedLayout) -> Result<LayoutId, DeviceError>;
    fn free_layout(&self, layout: LayoutId) -> Result<(), DeviceError>;

    /// Gathers engine pages `pages[i]` from `engine` (the engine's KV buffer: imported or
    /// registered memory) into contiguous blocks at `blocks` (exactly
    /// `pages.len() * block_bytes`), one launch.
    fn gather(
        &self,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceRange,
    ) -> Result<(), DeviceError>;
    /// The reverse of [`Device::gather`]; each page at most once per batch.
    fn scatter(
        &self,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceRange,
    ) -> Result<(), DeviceError>;
    /// Gathers engine pages `pages[i]` into the block at `blocks` + `block_offsets[i]`
    /// (each a whole block inside `blocks`; destinations pairwise disjoint), one launch.
    /// The same kernel as [`Device::gather`], addressing a tier's slots directly.
    fn gather_to_slots(
        &self,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceBuffer,
        block_offsets: &[u64],
    ) -> Result<(), DeviceError>;
    /// The reverse: block at `blocks` + `block_offsets[i]` into engine page `pages[i]`
    /// (each page at most once per batch).
    fn scatter_from_slots(
        &self,
        stream: StreamId,
        engine: DeviceBuffer,
        layout: LayoutId,
        pages: &[u32],
        blocks: DeviceBuffer,
        block_offsets: &[u64],
    ) -> Result<(), DeviceError>;
    /// Copies every descriptor's range of `src` to `dst` in one launch.
    fn copy_batch(
        &self,
        stream: StreamId,
        src: DeviceBuffer,
        dst: DeviceBuffer,
        descs: &[kvp_copy_desc],
    ) -> Result<(), DeviceError>;
    /// Checksums ("kvp checksum v1") of every descriptor's source range of `base`;
    /// complete when this returns.
    fn checksum(
        &self,
        stream: StreamId,
        base: DeviceBuffer,
        descs: &[kvp_copy_desc],
    ) -> Result<Vec<u64>, DeviceError>;
    /// Slot MACs (keyed BLAKE3 under `key`: the NVMe tier's data MAC) of every
    /// descriptor's source range of `base`, so a block that reached device memory
    /// without the CPU can be authenticated there; complete when this returns. The key
    /// goes to the stream's own scratch memory, never to memory an engine shares.
    fn mac(
        &self,
        stream: StreamId,
        base: DeviceBuffer,
        descs: &[kvp_copy_desc],
        key: &[u8; 32],
    ) -> Result<Vec<[u8; 32]>, DeviceError>;
    /// Reads `dst.len_bytes` at `file_offset` of `fd` (an NVMe tier file, opened with
    /// O_DIRECT) straight into `dst`, after the work queued on `stream`; complete when
    /// this returns. The cuda backend reads with cuFile (GPUDirect Storage: the bytes
    /// never pass through host memory), the host backend with pread.
    fn read_file(
        &self,
        stream: StreamId,
        dst: DeviceRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
    ) -> Result<(), DeviceError>;
    /// Writes `src` at `file_offset` of `fd` (an NVMe tier file, opened with O_DIRECT),
    /// after the work queued on `stream`; complete when this returns. The cuda backend
    /// writes with cuFile (GPUDirect Storage), the host backend with pwrite. Bytes of the
    /// file outside `[file_offset, file_offset + len)` are left as they were (partial
    /// pages are read, overlaid and written back; a file that ends inside the last page
    /// grows to that page's end, zero-filled).
    fn write_file(
        &self,
        stream: StreamId,
        src: DeviceRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
    ) -> Result<(), DeviceError>;
}

/// Checks `[offset, offset + len)` against a buffer of `buffer_bytes`.
pub(crate) fn check_range(
    op: &'static str,
    offset_bytes: usize,
    len_bytes: usize,
    buffer_bytes: usize,
) -> Result<(), DeviceError> {
    match offset_bytes.checked_add(len_bytes) {
        Some(end) if end <= buffer_bytes => Ok(()),
        _ => Err(DeviceError::OutOfRange {
            op,
            offset_bytes,
            len_bytes,
            buffer_bytes,
        }),
    }
}

/// Which backend to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The host backend.
    Host,
    /// CUDA device `ordinal`; an error if there is no driver or device.
    Cuda { ordinal: usize },
    /// CUDA device `ordinal` if a driver is present, else the host backend.
    CudaOrHost { ordinal: usize },
}

/// An opened device, and why the host was used when CUDA was asked for.
#[derive(Debug)]
pub struct Opened {
    pub device: std::sync::Arc<dyn Device>,
    pub fallback_reason: Option<String>,
}

/// Opens the device `choice` asks for; with [`BackendChoice::CudaOrHost`], falls back to
/// the host backend with the reason (e.g. "no NVIDIA driver") instead of failing.
pub fn open(choice: BackendChoice) -> Result<Opened, DeviceError> {
    match choice {
        BackendChoice::Host => Ok(Opened {
            device: std::sync::Arc::new(crate::host::HostDevice::new()),
            fallback_reason: None,
        }),
        BackendChoice::Cuda { ordinal } => Ok(Opened {
            device: std::sync::Arc::new(crate::cuda::CudaDevice::open(ordinal)?),
            fallback_reason: None,
        }),
        BackendChoice::CudaOrHost { ordinal } => match crate::cuda::CudaDevice::open(ordinal) {
            Ok(dev) => Ok(Opened {
                device: std::sync::Arc::new(dev),
                fallback_reason: None,
            }),
            Err(e) => Ok(Opened {
                device: std::sync::Arc::new(crate::host::HostDevice::new()),
                fallback_reason: Some(e.to_string()),
            }),
        },
    }
}
