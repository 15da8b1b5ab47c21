//! Typed views of the header's enums and constants.

use crate::bindings as b;

pub const MAGIC: u64 = b::KVP_MAGIC;
pub const ABI_VERSION: u32 = b::KVP_ABI_VERSION;
pub const CACHE_LINE: usize = b::KVP_CACHE_LINE as usize;
pub const HEADER_BYTES: usize = b::KVP_HEADER_BYTES as usize;
pub const MAX_QUEUE_PAIRS: usize = b::KVP_MAX_QUEUE_PAIRS as usize;
pub const MIN_RING_ENTRIES: u32 = b::KVP_MIN_RING_ENTRIES;
pub const MAX_RING_ENTRIES: u32 = b::KVP_MAX_RING_ENTRIES;
pub const MAX_LAYERS: usize = b::KVP_MAX_LAYERS as usize;
pub const MAX_BLOCKS_PER_OP: u32 = b::KVP_MAX_BLOCKS_PER_OP;
pub const MAX_NAMESPACES_PER_SESSION: usize = b::KVP_MAX_NAMESPACES_PER_SESSION as usize;
pub const NAMESPACE_NAME_BYTES: usize = b::KVP_NAMESPACE_NAME_BYTES as usize;
pub const MAX_KV_REGIONS: usize = b::KVP_MAX_KV_REGIONS as usize;
pub const MAX_HOST_KV_REGIONS: usize = b::KVP_MAX_HOST_KV_REGIONS as usize;
pub const REGION_F_CONTINUES: u32 = b::KVP_REGION_F_CONTINUES;
pub const GPU_UUID_BYTES: usize = b::KVP_GPU_UUID_BYTES as usize;
pub const CUDA_IPC_HANDLE_BYTES: usize = b::KVP_CUDA_IPC_HANDLE_BYTES as usize;
pub const RING_HEADER_BYTES: usize = core::mem::size_of::<b::kvp_ring_header>();

pub const SQE_F_PREFIX_ONLY: u16 = b::KVP_SQE_F_PREFIX_ONLY as u16;
pub const SQE_F_WRITE_THROUGH: u16 = b::KVP_SQE_F_WRITE_THROUGH as u16;
pub const SQE_F_HIGH_PRIORITY: u16 = b::KVP_SQE_F_HIGH_PRIORITY as u16;
pub const SQE_F_KEEP_ON_GPU: u16 = b::KVP_SQE_F_KEEP_ON_GPU as u16;
pub const SQE_F_ALL: u16 = b::KVP_SQE_F_ALL as u16;
pub const MAX_IPC_EVENTS: usize = b::KVP_MAX_IPC_EVENTS as usize;
pub const DETAIL_BAD_EVENT: u32 = b::KVP_DETAIL_BAD_EVENT;

macro_rules! c_enum {
    ($(#[$m:meta])* $name:ident : $repr:ty { $($variant:ident = $c:path),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name { $($variant = $c as $repr),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The variant for a raw value read from shared memory, if it names one.
            pub fn from_raw(raw: $repr) -> Option<Self> {
                $(if raw == $c as $repr { return Some($name::$variant); })+
                None
            }
            pub fn raw(self) -> $repr { self as $repr }
        }
    };
}

c_enum!(
    /// `enum kvp_opcode`.
    Opcode: u16 {
        Nop = b::kvp_opcode_KVP_OP_NOP,
        Stats = b::kvp_opcode_KVP_OP_STATS,
        AttachLayout = b::kvp_opcode_KVP_OP_ATTACH_LAYOUT,
        Lookup = b::kvp_opcode_KVP_OP_LOOKUP,
        Save = b::kvp_opcode_KVP_OP_SAVE,
        Load = b::kvp_opcode_KVP_OP_LOAD,
        Pin = b::kvp_opcode_KVP_OP_PIN,
        Unpin = b::kvp_opcode_KVP_OP_UNPIN,
        Drop = b::kvp_opcode_KVP_OP_DROP,
        ClearNamespace = b::kvp_opcode_KVP_OP_CLEAR_NAMESPACE,
        RegisterEvents = b::kvp_opcode_KVP_OP_REGISTER_EVENTS,
    }
);

c_enum!(
    /// `enum kvp_status`.
    Status: i32 {
        Ok = b::kvp_status_KVP_OK,
        BadOpcode = b::kvp_status_KVP_E_BAD_OPCODE,
        BadFlags = b::kvp_status_KVP_E_BAD_FLAGS,
        BadRange = b::kvp_status_KVP_E_BAD_RANGE,
        BadArg = b::kvp_status_KVP_E_BAD_ARG,
        Namespace = b::kvp_status_KVP_E_NAMESPACE,
        NoLayout = b::kvp_status_KVP_E_NO_LAYOUT,
        NotFound = b::kvp_status_KVP_E_NOT_FOUND,
        NoSpace = b::kvp_status_KVP_E_NO_SPACE,
        Io = b::kvp_status_KVP_E_IO,
        Corrupt = b::kvp_status_KVP_E_CORRUPT,
        Busy = b::kvp_status_KVP_E_BUSY,
        Unsupported = b::kvp_status_KVP_E_UNSUPPORTED,
        Shutdown = b::kvp_status_KVP_E_SHUTDOWN,
        Internal = b::kvp_status_KVP_E_INTERNAL,
    }
);

c_enum!(
    /// `enum kvp_region_kind` (without `NONE`, which is never a valid region).
    RegionKind: u32 {
        HostMemfd = b::kvp_region_kind_KVP_REGION_HOST_MEMFD,
        CudaIpc = b::kvp_region_kind_KVP_REGION_CUDA_IPC,
        CudaVmmFd = b::kvp_region_kind_KVP_REGION_CUDA_VMM_FD,
    }
);

impl RegionKind {
    /// Whether a region of this kind arrives with a file descriptor (SCM_RIGHTS).
    pub fn carries_fd(self) -> bool {
        matches!(self, RegionKind::HostMemfd | RegionKind::CudaVmmFd)
    }
    /// Whether the memory is on a GPU (needs the cuda backend).
    pub fn is_device(self) -> bool {
        matches!(self, RegionKind::CudaIpc | RegionKind::CudaVmmFd)
    }
    pub fn name(self) -> &'static str {
        match self {
            RegionKind::HostMemfd => "host memfd",
            RegionKind::CudaIpc => "CUDA IPC",
            RegionKind::CudaVmmFd => "CUDA VMM fd",
        }
    }
}

c_enum!(
    /// `enum kvp_session_state`.
    SessionState: u32 {
        Init = b::kvp_session_state_KVP_STATE_INIT,
        Active = b::kvp_session_state_KVP_STATE_ACTIVE,
        Closing = b::kvp_session_state_KVP_STATE_CLOSING,
        Dead = b::kvp_session_state_KVP_STATE_DEAD,
    }
);

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadOpcode => "bad opcode",
            Status::BadFlags => "bad flags",
            Status::BadRange => "argument outside the queue pair's arena slice",
            Status::BadArg => "bad argument",
            Status::Namespace => "namespace not bound to this session",
            Status::NoLayout => "no KV layout attached",
            Status::NotFound => "block not found",
            Status::NoSpace => "no space",
            Status::Io => "I/O error",
            Status::Corrupt => "stored data corrupt",
            Status::Busy => "busy",
            Status::Unsupported => "unsupported",
            Status::Shutdown => "daemon shutting down",
            Status::Internal => "internal error",
        }
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Plain-old-data ABI structs: `#[repr(C)]`, integers and integer arrays only, so every
/// bit pattern is a valid value. They may be zero-initialised, copied out of untrusted
/// shared memory and viewed as bytes.
///
/// # Safety
/// Implement only for `#[repr(C)]` types made of integers and arrays of integers, with no
/// padding bytes that matter for reads (padding is readable as it is initialised memory in
/// shared segments).
pub unsafe trait Pod: Copy + 'static {
    fn zeroed() -> Self {
        // SAFETY: the trait contract: all-zero bytes are a valid value of Self.
        unsafe { core::mem::zeroed() }
    }
}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: a bindgen struct of integers and integer arrays (see the header).
        unsafe impl Pod for $t {}
    )* };
}
pod!(
    b::kvp_sqe,
    b::kvp_cqe,
    b::kvp_block_op,
    b::kvp_kv_layout,
    b::kvp_kv_region,
    b::kvp_ipc_event,
    b::kvp_stats,
    b::kvp_attach_request,
    b::kvp_attach_reply,
    b::kvp_copy_desc,
    b::kvp_segment_header,
    b::kvp_queue_pair_desc,
    b::kvp_ring_header,
    u8,
    u32,
    u64
);

/// The bytes of a plain-old-data value.
pub fn as_bytes<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: T is Pod (no pointers, no invalid bit patterns); reading its size in bytes
    // from a valid reference stays inside the object.
    unsafe {
        core::slice::from_raw_parts((value as *const T).cast::<u8>(), core::mem::size_of::<T>())
    }
}

/// The bytes of a slice of plain-old-data values.
pub fn slice_as_bytes<T: Pod>(values: &[T]) -> &[u8] {
    // SAFETY: T is Pod; the byte view covers exactly the slice's memory.
    unsafe {
        core::slice::from_raw_parts(values.as_ptr().cast::<u8>(), core::mem::size_of_val(values))
    }
}

/// The bytes of a slice of plain-old-data values, writable: any bytes written form valid
/// values, since every bit pattern is a valid T.
pub fn slice_as_bytes_mut<T: Pod>(values: &mut [T]) -> &mut [u8] {
    // SAFETY: T is Pod (any bit pattern valid); the byte view covers exactly the slice's
    // memory and borrows it exclusively.
    unsafe {
        core::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<u8>(),
            core::mem::size_of_val(values),
        )
    }
}

/// Read a plain-old-data value from possibly unaligned bytes; `None` if too short.
pub fn read_pod<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: length checked above; read_unaligned copes with any alignment and T is Pod,
    // so any bytes form a valid T.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

impl b::kvp_block_op {
    /// A request entry: block `hash` whose prefix ends at `parent_hash` (0: none), in engine
    /// page `engine_block`; the daemon fills `tier` and `status`.
    pub fn new(hash: u64, parent_hash: u64, engine_block: u32) -> Self {
        b::kvp_block_op {
            hash,
            parent_hash,
            engine_block,
            tier: 0,
            status: 0,
            reserved: [0; 2],
        }
    }
}

impl b::kvp_kv_region {
    fn with(kind: RegionKind, alloc_bytes: u64, offset_bytes: u64, len_bytes: u64) -> Self {
        let mut r: b::kvp_kv_region = Pod::zeroed();
        r.kind = kind.raw();
        r.alloc_bytes = alloc_bytes;
        r.offset_bytes = offset_bytes;
        r.len_bytes = len_bytes;
        r
    }
    /// The whole of a sealed host memfd of `bytes` (its descriptor travels with it).
    pub fn host_memfd(bytes: u64) -> Self {
        Self::with(RegionKind::HostMemfd, bytes, 0, bytes)
    }
    /// `[offset_bytes, +len_bytes)` of the `cudaMalloc` allocation of `alloc_bytes` whose
    /// base `handle` (cudaIpcGetMemHandle) names, on the GPU `gpu_uuid`.
    pub fn cuda_ipc(
        handle: [u8; CUDA_IPC_HANDLE_BYTES],
        gpu_uuid: [u8; GPU_UUID_BYTES],
        alloc_bytes: u64,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Self {
        let mut r = Self::with(RegionKind::CudaIpc, alloc_bytes, offset_bytes, len_bytes);
        r.handle = handle;
        r.gpu_uuid = gpu_uuid;
        r
    }
    /// `[offset_bytes, +len_bytes)` of a VMM allocation of `alloc_bytes` exported as a POSIX
    /// file descriptor (which travels with it), on the GPU `gpu_uuid`.
    pub fn cuda_vmm_fd(
        gpu_uuid: [u8; GPU_UUID_BYTES],
        alloc_bytes: u64,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Self {
        let mut r = Self::with(RegionKind::CudaVmmFd, alloc_bytes, offset_bytes, len_bytes);
        r.gpu_uuid = gpu_uuid;
        r
    }
    /// The region's kind, if `kind` names one.
    pub fn region_kind(&self) -> Option<RegionKind> {
        RegionKind::from_raw(self.kind)
    }
}
