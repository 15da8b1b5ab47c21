//! The cuda backend: cudarc with dynamic loading (no toolkit needed to build), the
//! kernels compiled for the found device by NVRTC at open (PTX cached on disk), launched
//! through the driver API. Also CUDA IPC (import an engine's KV allocation and its
//! events), pinned registration of daemon-mapped host memory, and NVML topology.
//!
//! cudarc panics when libcuda cannot be loaded, so [`CudaDevice::open`] probes with
//! `is_culib_present` before any other call and returns [`DeviceError::NoDriver`].
//!
//! Not verifiable here (no GPU on the development machines): everything past the probe.
//! The kernels' logic is verified on the CPU (the same sources, and the GPU launch shapes
//! from `kvplane_kernels::geometry`, run by `kernels/tests/layouts.rs`), their GPU
//! compilation by `tests/kernel_compile.rs`; `examples/gpu_check.rs` checks this file's
//! paths on a machine with a GPU.

use crate::device::{
    BackendKind, Device, DeviceBuffer, DeviceError, DeviceRange, EngineImport, EngineWindow,
    EventId, LayoutId, StreamId, check_range,
};
use crate::nvrtc::{Arch, CudaTools, PtxCache};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, result, sys};
use kvplane_ffi::{kvp_copy_desc, kvp_kv_layout};
use kvplane_kernels::{PagedLayout, geometry, sources};
use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// True when libcuda can be loaded (a driver is installed). Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries dlopen on libcuda's candidate names; no driver call is made.
    unsafe { sys::is_culib_present() }
}

fn drv(op: &'static str) -> impl Fn(result::DriverError) -> DeviceError {
    move |e| DeviceError::Driver {
        op,
        detail: format!("{e:?}"),
    }
}

enum Region {
    /// cuMemAlloc'd device memory.
    Alloc(sys::CUdeviceptr),
    /// Host memory registered (page-locked, mapped); `dev` is its device address.
    Registered {
        host: *mut c_void,
        dev: sys::CUdeviceptr,
    },
    /// Another process's allocation opened from a CUDA IPC handle.
    Ipc(sys::CUdeviceptr),
    /// A peer device's allocation, addressed over NVLink/PCIe peer access; owned by the
    /// peer (freeing this handle only forgets the mapping).
    Peer(sys::CUdeviceptr),
    /// Another process's VMM allocations, imported from their file descriptors and mapped
    /// back to back at `dev` (a reservation of their total size this device made), one
    /// mapping of `chunk_bytes[i]` each.
    Vmm {
        dev: sys::CUdeviceptr,
        chunk_bytes: Box<[usize]>,
    },
    /// The device's whole address space, as one buffer at address 0: how one kernel
    /// launch reaches an engine's regions wherever the driver put them. Owns nothing.
    Window,
}

impl Region {
    fn dev(&self) -> sys::CUdeviceptr {
        match *self {
            Region::Alloc(d)
            | Region::Ipc(d)
            | Region::Peer(d)
            | Region::Vmm { dev: d, .. }
            | Region::Registered { dev: d, .. } => d,
            Region::Window => 0,
        }
    }
}

/// Device-side scratch of one stream for per-launch tables (page ids, descriptors).
#[derive(Default, Clone, Copy)]
struct Scratch {
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

struct State {
    next_id: u64,
    buffers: HashMap<u64, (Region, usize)>,
    layouts: HashMap<u64, (sys::CUdeviceptr, Arc<PagedLayout>)>,
    /// Indexed by stream id; `None` for a destroyed stream whose id is in `free_streams`.
    streams: Vec<Option<(Arc<CudaStream>, Scratch)>>,
    free_streams: Vec<u32>,
    events: HashMap<u64, sys::CUevent>,
}

/// Parameter sizes in bytes of every kernel, in order, as the launches below pass them.
/// `tests/kernel_compile.rs` checks this table against the PTX NVRTC produces, so a
/// signature change in a `.cu` file that is not mirrored here fails on the CPU.
pub const KERNEL_PARAM_BYTES: [(&str, &[usize]); 7] = [
    // engine, blocks, layout, pages, block_offsets (0 = contiguous), num_batch_pages
    ("kvp_paged_gather", &[8, 8, 8, 8, 8, 4]),
    ("kvp_paged_scatter", &[8, 8, 8, 8, 8, 4]),
    // src, dst, descs, num_descs
    ("kvp_copy_batch", &[8, 8, 8, 4]),
    // base, descs, num_descs, sums
    ("kvp_checksum_partial", &[8, 8, 4, 8]),
    // descs, num_descs, sums
    ("kvp_checksum_finalize", &[8, 4, 8]),
    // base, descs, num_descs, key, cvs, roots
    ("kvp_mac_chunks", &[8, 8, 4, 8, 8, 8]),
    // descs, num_descs, key, cvs, roots, level
    ("kvp_mac_parents", &[8, 4, 8, 8, 8, 4]),
];

struct Kernels {
    gather: CudaFunction,
    scatter: CudaFunction,
    copy: CudaFunction,
    checksum_partial: CudaFunction,
    checksum_finalize: CudaFunction,
    mac_chunks: CudaFunction,
    mac_parents: CudaFunction,
    _modules: Vec<Arc<CudaModule>>,
}

/// One CUDA device. See the module docs.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    name: String,
    uuid: [u8; 16],
    compute_capability: (i32, i32),
    total_mem_bytes: usize,
    kernels: Kernels,
    ptx_from_cache: bool,
    /// cuFile, opened on the first `read_file` (the reason when it cannot be).
    gds: std::sync::OnceLock<Result<crate::gds::Gds, String>>,
    /// cuFile handles of the files read so far, by (device, inode, descriptor): cuFile
    /// takes one registration per descriptor, shared by every reader; kept for the
    /// device's lifetime (the NVMe tier's files live as long as the daemon).
    gds_files: Mutex<HashMap<(u64, u64, i32), crate::gds::GdsHandle>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish_non_exhaustive()
    }
}

// SAFETY: the raw device/host pointers in State are only used under the mutex with the
// context bound to the calling thread; CUDA handles are usable from any thread.
unsafe impl Send for CudaDevice {}
// SAFETY: as above.
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    /// Opens device `ordinal`: probes for the driver (no panic without one), creates the
    /// primary context, and compiles (or loads from the PTX cache) the kernels for the
    /// device's compute capability.
    pub fn open(ordinal: usize) -> Result<Self, DeviceError> {
        if !driver_present() {
            return Err(DeviceError::NoDriver);
        }
        result::init().map_err(drv("cuInit"))?;
        let count = CudaContext::device_count().map_err(drv("cuDeviceGetCount"))? as usize;
        if ordinal >= count {
            return Err(DeviceError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("cuDevicePrimaryCtxRetain"))?;
        let name = ctx.name().map_err(drv("cuDeviceGetName"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(drv("cuDeviceGetAttribute"))?;
        let total_mem_bytes = ctx.total_mem().map_err(drv("cuDeviceTotalMem"))?;
        let mut raw_uuid = sys::CUuuid_st { bytes: [0; 16] };
        // SAFETY: a valid out pointer and the device of a live context.
        unsafe { sys::cuDeviceGetUuid_v2(&mut raw_uuid, ctx.cu_device()) }
            .result()
            .map_err(drv("cuDeviceGetUuid"))?;
        let uuid = raw_uuid.bytes.map(|b| b as u8);
        let arch = Arch {
            major: compute_capability.0 as u32,
            minor: compute_capability.1 as u32,
        };
        let tools = CudaTools::find().map_err(crate::nvrtc::CompileError::from)?;
        let cache = PtxCache::new(PtxCache::default_dir());
        let mut modules = Vec::new();
        let mut all_cached = true;
        let mut func = HashMap::new();
        for src in sources::ALL {
            let (ptx, cached) = cache.get_or_compile(&tools, &src, arch)?;
            all_cached &= cached;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(drv("cuModuleLoadData"))?;
            for k in src.kernels {
                func.insert(
                    *k,
                    module
                        .load_function(k)
                        .map_err(drv("cuModuleGetFunction"))?,
                );
            }
            modules.push(module);
        }
        let mut take = |k: &str| {
            func.remove(k)
                .expect("every kernel of sources::ALL was loaded")
        };
        let kernels = Kernels {
            gather: take("kvp_paged_gather"),
            scatter: take("kvp_paged_scatter"),
            copy: take("kvp_copy_batch"),
            checksum_partial: take("kvp_checksum_partial"),
            checksum_finalize: take("kvp_checksum_finalize"),
            mac_chunks: take("kvp_mac_chunks"),
            mac_parents: take("kvp_mac_parents"),
            _modules: modules,
        };
        Ok(Self {
            ctx,
            name,
            uuid,
            compute_capability,
            total_mem_bytes,
            kernels,
            ptx_from_cache: all_cached,
            gds: std::sync::OnceLock::new(),
            gds_files: Mutex::new(HashMap::new()),
            state: Mutex::new(State {
                next_id: 1,
                buffers: HashMap::new(),
                layouts: HashMap::new(),
                streams: Vec::new(),
                free_streams: Vec::new(),
                events: HashMap::new(),
            }),
        })
    }

    /// The cuFile handle of `fd`, registered on its first use (see `gds_files`).
    fn gds_file(
        &self,
        gds: &crate::gds::Gds,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<crate::gds::GdsHandle, DeviceError> {
        use std::os::fd::AsRawFd;
        // SAFETY: fstat fills a zeroed stat of a live descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(DeviceError::Driver {
                op: "fstat",
                detail: std::io::Error::last_os_error().to_string(),
            });
        }
        let key = (st.st_dev, st.st_ino, fd.as_raw_fd());
        let mut files = self.gds_files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = files.get(&key) {
            return Ok(*h);
        }
        let h = gds.register_handle(fd).map_err(|e| DeviceError::Driver {
            op: "cuFileHandleRegister",
            detail: e.to_string(),
        })?;
        files.insert(key, h);
        Ok(h)
    }

    /// Device base address of `range`'s buffer and the checked offset into it (for
    /// cuFile, which takes base + offset).
    pub(crate) fn raw_range(
        &self,
        op: &'static str,
        range: DeviceRange,
    ) -> Result<(sys::CUdeviceptr, usize), DeviceError> {
        let st = self.lock()?;
        check_range(
            op,
            range.offset_bytes,
            range.len_bytes,
            range.buffer.len_bytes,
        )?;
        Ok((dev_of(&st, op, range.buffer)?, range.offset_bytes))
    }

    /// Lets this device's kernels and copies address `peer`'s memory directly (NVLink
    /// where NVML reports it, else PCIe peer-to-peer). Idempotent.
    pub fn enable_peer_access(&self, peer: &CudaDevice) -> Result<(), DeviceError> {
        let _st = self.lock()?;
        let mut can: std::ffi::c_int = 0;
        // SAFETY: valid out pointer and device handles of open contexts.
        unsafe { sys::cuDeviceCanAccessPeer(&mut can, self.ctx.cu_device(), peer.ctx.cu_device()) }
            .result()
            .map_err(drv("cuDeviceCanAccessPeer"))?;
        if can == 0 {
            return Err(DeviceError::Driver {
                op: "cuDeviceCanAccessPeer",
                detail: format!("{} cannot access {}", self.name, peer.name),
            });
        }
        // SAFETY: this context is bound (lock); the peer context is alive (borrowed).
        match unsafe { sys::cuCtxEnablePeerAccess(peer.ctx.cu_ctx(), 0) } {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
                Ok(())
            }
            e => Err(drv("cuCtxEnablePeerAccess")(result::DriverError(e))),
        }
    }

    /// A handle on this device for `buf` of `peer` (after [`CudaDevice::enable_peer_access`]),
    /// so `copy_batch` and the kernels can read or write it: peer GPU over NVLink.
    pub fn map_peer_buffer(
        &self,
        peer: &CudaDevice,
        buf: DeviceBuffer,
    ) -> Result<DeviceBuffer, DeviceError> {
        let dev = {
            let pst = peer.lock()?;
            dev_of(&pst, "map_peer_buffer", buf)?
        };
        let mut st = self.lock()?;
        Ok(insert_buffer(&mut st, Region::Peer(dev), buf.len_bytes))
    }

    /// Whether open() found every kernel's PTX in the disk cache.
    pub fn ptx_from_cache(&self) -> bool {
        self.ptx_from_cache
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, DeviceError> {
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Opens an engine's allocation from its CUDA IPC handle (cudaIpcGetMemHandle's 64
    /// bytes) as a buffer of `len_bytes`, refused (and closed again) unless the handle
    /// names an allocation's base and the allocation holds `len_bytes`. Undo with
    /// [`Device::free`].
    pub fn import_ipc_memory(
        &self,
        handle: &[u8; 64],
        len_bytes: usize,
    ) -> Result<DeviceBuffer, DeviceError> {
        let mut st = self.lock()?;
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        for (d, s) in h.reserved.iter_mut().zip(handle) {
            *d = *s as _;
        }
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: valid out pointer; the driver validates the handle.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut dev,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        }
        .result()
        .map_err(drv("cuIpcOpenMemHandle"))?;
        // The engine says how long the allocation is; the driver knows. Believing the
        // engine would let every later launch read and write past it.
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: valid out pointers; dev is a live mapping opened just above.
        let range = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, dev) }
            .result()
            .map_err(drv("cuMemGetAddressRange"));
        let fits = match range {
            Ok(()) if base == dev && size >= len_bytes => Ok(()),
            Ok(()) => Err(DeviceError::Driver {
                op: "cuMemGetAddressRange",
                detail: format!(
                    "the IPC allocation is {size} bytes at offset {} of its base; the engine announced {len_bytes} from the base",
                    dev - base
                ),
            }),
            Err(e) => Err(e),
        };
        if let Err(e) = fits {
            // SAFETY: dev was opened above and is not recorded anywhere else.
            let _ = unsafe { sys::cuIpcCloseMemHandle(dev) };
            return Err(e);
        }
        Ok(insert_buffer(&mut st, Region::Ipc(dev), len_bytes))
    }

    /// Imports VMM allocations from their POSIX descriptors, each with its size in
    /// bytes, and maps them back to back in one reservation with read/write access for
    /// this device: one buffer of their total size, which must be `len_bytes`. Refused (and all undone) unless the
    /// driver maps each at its size; the mappings hold the allocations, so the engine
    /// may close its descriptors. Undo with [`Device::free`].
    pub fn import_vmm(
        &self,
        chunks: &[(std::os::fd::BorrowedFd<'_>, u64)],
        len_bytes: usize,
    ) -> Result<DeviceBuffer, DeviceError> {
        use std::os::fd::AsRawFd;
        let too_big = || DeviceError::OutOfRange {
            op: "import_engine_memory",
            offset_bytes: 0,
            len_bytes: usize::MAX,
            buffer_bytes: usize::MAX,
        };
        let sizes: Vec<usize> = chunks
            .iter()
            .map(|&(_, b)| usize::try_from(b).map_err(|_| too_big()))
            .collect::<Result<_, _>>()?;
        let total = sizes
            .iter()
            .try_fold(0usize, |t, &b| t.checked_add(b))
            .ok_or_else(too_big)?;
        if total != len_bytes {
            return Err(DeviceError::OutOfRange {
                op: "import_engine_memory",
                offset_bytes: 0,
                len_bytes,
                buffer_bytes: total,
            });
        }
        // Thousands of chunks are thousands of driver calls: made without the table lock
        // every launch and event query takes (the context bound to this thread all the
        // same); the lock is taken to enter the result.
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: valid out pointer; a fresh reservation (no fixed address).
        unsafe { sys::cuMemAddressReserve(&mut dev, total, 0, 0, 0) }
            .result()
            .map_err(drv("cuMemAddressReserve"))?;
        let mut mapped = 0usize;
        let mut at = 0usize;
        let undo = |mapped: usize| {
            // SAFETY: undoing the maps (each whole, in the order made) and the
            // reservation made above; nothing else uses them yet.
            unsafe {
                let mut off = 0usize;
                for &b in &sizes[..mapped] {
                    let _ = sys::cuMemUnmap(dev + off as u64, b);
                    off += b;
                }
                let _ = sys::cuMemAddressFree(dev, total);
            }
        };
        for (&(fd, _), &bytes) in chunks.iter().zip(&sizes) {
            let mut handle: sys::CUmemGenericAllocationHandle = 0;
            // SAFETY: valid out pointer; for POSIX descriptors the driver takes the fd
            // number in the pointer argument and dups what it needs (the caller keeps
            // its fd).
            let imported = unsafe {
                sys::cuMemImportFromShareableHandle(
                    &mut handle,
                    fd.as_raw_fd() as usize as *mut c_void,
                    sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                )
            }
            .result();
            if let Err(e) = imported {
                undo(mapped);
                return Err(drv("cuMemImportFromShareableHandle")(e));
            }
            // SAFETY: dev+at..dev+at+bytes lies in our reservation, unmapped; the driver
            // checks bytes against the allocation's size and fails rather than map past it.
            let map = unsafe { sys::cuMemMap(dev + at as u64, bytes, 0, handle, 0) }.result();
            // The mapping holds its own reference to the allocation; ours goes either way.
            // SAFETY: handle was imported above and is released exactly once.
            let _ = unsafe { sys::cuMemRelease(handle) };
            if let Err(e) = map {
                undo(mapped);
                return Err(drv("cuMemMap")(e));
            }
            mapped += 1;
            at += bytes;
        }
        let access = sys::CUmemAccessDesc_st {
            location: sys::CUmemLocation_st {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.ctx.cu_device(),
            },
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the whole range was mapped just above; one valid access descriptor.
        if let Err(e) = unsafe { sys::cuMemSetAccess(dev, total, &access, 1) }.result() {
            undo(mapped);
            return Err(drv("cuMemSetAccess")(e));
        }
        let mut st = match self.lock() {
            Ok(st) => st,
            Err(e) => {
                undo(mapped);
                return Err(e);
            }
        };
        Ok(insert_buffer(
            &mut st,
            Region::Vmm {
                dev,
                chunk_bytes: sizes.into_boxed_slice(),
            },
            total,
        ))
    }

    /// Uploads `parts` into `stream`'s scratch table (grown as needed), each at the
    /// offset [`scratch_align`] gives it (16-byte aligned), and returns the table's
    /// address. Stream-ordered, so the previous launch on the stream has consumed the old
    /// contents.
    fn scratch_upload(
        &self,
        st: &mut State,
        stream: StreamId,
        parts: &[&[u8]],
    ) -> Result<sys::CUdeviceptr, DeviceError> {
        self.scratch_table(st, stream, parts, 0)
    }

    /// [`Self::scratch_upload`], then `reserve_bytes` more after the parts (at the next
    /// aligned offset) that the kernels fill themselves: nothing is uploaded there.
    fn scratch_table(
        &self,
        st: &mut State,
        stream: StreamId,
        parts: &[&[u8]],
        reserve_bytes: usize,
    ) -> Result<sys::CUdeviceptr, DeviceError> {
        let (s, scratch) = stream_slot(st, "launch", stream)?
            .as_mut()
            .ok_or_else(|| unknown_stream("launch", stream))?;
        let uploaded = parts
            .iter()
            .fold(0usize, |at, p| scratch_align(at) + p.len());
        let total = match reserve_bytes {
            0 => uploaded,
            n => scratch_align(uploaded) + n,
        };
        if scratch.bytes < total {
            let s_raw = s.cu_stream();
            if scratch.ptr != 0 {
                // SAFETY: stream-ordered free of our own scratch after its last use.
                unsafe { result::free_async(scratch.ptr, s_raw) }.map_err(drv("cuMemFreeAsync"))?;
            }
            let grown = total.next_power_of_two().max(4096);
            // SAFETY: plain allocation on our stream.
            scratch.ptr =
                unsafe { result::malloc_async(s_raw, grown) }.map_err(drv("cuMemAllocAsync"))?;
            scratch.bytes = grown;
        }
        let mut at = 0usize;
        for part in parts {
            at = scratch_align(at);
            if !part.is_empty() {
                // SAFETY: scratch holds at least `total` bytes, of which this part takes
                // [at, at + len); a pageable source is staged by the driver before this
                // returns.
                unsafe { result::memcpy_htod_async(scratch.ptr + at as u64, part, s.cu_stream()) }
                    .map_err(drv("cuMemcpyHtoDAsync"))?;
            }
            at += part.len();
        }
        Ok(scratch.ptr)
    }

    /// Launches `f` with `params` (pointer to each argument value and its size). The
    /// sizes must equal the kernel's row in [`KERNEL_PARAM_BYTES`], itself checked
    /// against the PTX, so a mismatched argument list is refused, not launched.
    fn launch(
        &self,
        name: &'static str,
        f: &CudaFunction,
        shape: geometry::GpuLaunch,
        stream: sys::CUstream,
        params: &[(*mut c_void, usize)],
    ) -> Result<(), DeviceError> {
        let expected = KERNEL_PARAM_BYTES
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, p)| *p);
        let sizes: Vec<usize> = params.iter().map(|(_, size)| *size).collect();
        if expected != Some(sizes.as_slice()) {
            return Err(DeviceError::Driver {
                op: "cuLaunchKernel",
                detail: format!("{name}: argument sizes {sizes:?} differ from {expected:?}"),
            });
        }
        let mut ptrs: Vec<*mut c_void> = params.iter().map(|(p, _)| *p).collect();
        // SAFETY: `ptrs` point at live values whose sizes match the kernel's parameters
        // (checked above against the table the compile test checks against the PTX).
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                shape.grid,
                shape.block,
                0,
                stream,
                &mut ptrs,
            )
        }
        .map_err(drv("cuLaunchKernel"))
    }
}

/// Where the next part of a scratch upload starts: 16-byte aligned for any table type.
const fn scratch_align(at: usize) -> usize {
    at.next_multiple_of(16)
}

fn insert_buffer(st: &mut State, region: Region, len_bytes: usize) -> DeviceBuffer {
    let id = st.next_id;
    st.next_id += 1;
    st.buffers.insert(id, (region, len_bytes));
    DeviceBuffer { id, len_bytes }
}

fn insert_event(st: &mut State, ev: sys::CUevent) -> EventId {
    let id = st.next_id;
    st.next_id += 1;
    st.events.insert(id, ev);
    EventId(id)
}

fn unknown_stream(op: &'static str, s: StreamId) -> DeviceError {
    DeviceError::UnknownHandle {
        op,
        what: "stream",
        id: u64::from(s.0),
    }
}

/// The table slot of stream `s` (`None` inside: destroyed, its id free).
fn stream_slot<'a>(
    st: &'a mut State,
    op: &'static str,
    s: StreamId,
) -> Result<&'a mut Option<(Arc<CudaStream>, Scratch)>, DeviceError> {
    st.streams
        .get_mut(s.0 as usize)
        .ok_or_else(|| unknown_stream(op, s))
}

fn stream_of(st: &State, op: &'static str, s: StreamId) -> Result<sys::CUstream, DeviceError> {
    st.streams
        .get(s.0 as usize)
        .and_then(Option::as_ref)
        .map(|(s, _)| s.cu_stream())
        .ok_or_else(|| unknown_stream(op, s))
}

fn event_of(st: &State, op: &'static str, e: EventId) -> Result<sys::CUevent, DeviceError> {
    st.events
        .get(&e.0)
        .copied()
        .ok_or(DeviceError::UnknownHandle {
            op,
            what: "event",
            id: e.0,
        })
}

fn dev_of(st: &State, op: &'static str, b: DeviceBuffer) -> Result<sys::CUdeviceptr, DeviceError> {
    st.buffers
        .get(&b.id)
        .map(|(r, _)| r.dev())
        .ok_or(DeviceError::UnknownHandle {
            op,
            what: "buffer",
            id: b.id,
        })
}

fn as_bytes<T>(v: &[T]) -> &[u8] {
    // SAFETY: T is a plain-old-data ABI type (u32, kvp_copy_desc) here; reading its bytes
    // is always valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// A kernel argument: pointer to the value and its size.
fn arg<T>(v: &mut T) -> (*mut c_void, usize) {
    (v as *mut T as *mut c_void, std::mem::size_of::<T>())
}

impl Device for CudaDevice {
    fn backend(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn describe(&self) -> String {
        format!(
            "cuda backend: {} (sm_{}{}, {:.1} GiB)",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_mem_bytes as f64 / (1u64 << 30) as f64
        )
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, DeviceError> {
        let mut st = self.lock()?;
        // SAFETY: plain allocation in the bound context.
        let dev = unsafe { result::malloc_sync(bytes.max(1)) }
            .map_err(|_| DeviceError::OutOfMemory { op: "alloc", bytes })?;
        Ok(insert_buffer(&mut st, Region::Alloc(dev), bytes))
    }

    unsafe fn register_host_memory(
        &self,
        ptr: NonNull<u8>,
        len_bytes: usize,
    ) -> Result<DeviceBuffer, DeviceError> {
        // Registering pins (faults in and locks) every page: seconds for a large engine
        // buffer, so it runs without the table lock every launch and event query of
        // every session takes; the context is bound to this thread all the same.
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
        let host = ptr.as_ptr() as *mut c_void;
        // Portable (all contexts) and mapped (kernels can address it).
        let flags = 0x01 | 0x02;
        // SAFETY: the caller guarantees [ptr, ptr + len) is valid until freed.
        unsafe { sys::cuMemHostRegister_v2(host, len_bytes, flags) }
            .result()
            .map_err(drv("cuMemHostRegister"))?;
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: registered just above with the DEVICEMAP flag.
        if let Err(e) = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) }.result() {
            // SAFETY: registered above, by this call only; undone once.
            let _ = unsafe { sys::cuMemHostUnregister(host) };
            return Err(drv("cuMemHostGetDevicePointer")(e));
        }
        let mut st = self.lock()?;
        Ok(insert_buffer(
            &mut st,
            Region::Registered { host, dev },
            len_bytes,
        ))
    }

    fn free(&self, buf: DeviceBuffer) -> Result<(), DeviceError> {
        let (region, _) =
            self.lock()?
                .buffers
                .remove(&buf.id)
                .ok_or(DeviceError::UnknownHandle {
                    op: "free",
                    what: "buffer",
                    id: buf.id,
                })?;
        // Released after the table lock is dropped (unpinning a large registration takes
        // long; the context stays bound to this thread): the handle is out of the table,
        // so nothing else reaches the region.
        // SAFETY: each region is released exactly once, by the call matching how it was
        // obtained; callers synchronise work using it first (as with cudaFree).
        unsafe {
            match region {
                Region::Alloc(d) => result::free_sync(d).map_err(drv("cuMemFree")),
                Region::Registered { host, .. } => sys::cuMemHostUnregister(host)
                    .result()
                    .map_err(drv("cuMemHostUnregister")),
                Region::Ipc(d) => sys::cuIpcCloseMemHandle(d)
                    .result()
                    .map_err(drv("cuIpcCloseMemHandle")),
                Region::Vmm { dev, chunk_bytes } => {
                    // Each mapping whole (a driver may refuse to unmap part of one or
                    // several at once), then the reservation.
                    let mut off = 0usize;
                    let mut unmapped = Ok(());
                    for &b in chunk_bytes.iter() {
                        let r = sys::cuMemUnmap(dev + off as u64, b)
                            .result()
                            .map_err(drv("cuMemUnmap"));
                        unmapped = unmapped.and(r);
                        off += b;
                    }
                    unmapped.and_then(|()| {
                        sys::cuMemAddressFree(dev, off)
                            .result()
                            .map_err(drv("cuMemAddressFree"))
                    })
                }
                Region::Peer(_) | Region::Window => Ok(()),
            }
        }
    }

    fn gpu_uuid(&self) -> Option<[u8; 16]> {
        Some(self.uuid)
    }

    fn import_engine_memory(
        &self,
        what: EngineImport<'_>,
        alloc_bytes: u64,
    ) -> Result<DeviceBuffer, DeviceError> {
        let len_bytes = usize::try_from(alloc_bytes).map_err(|_| DeviceError::OutOfRange {
            op: "import_engine_memory",
            offset_bytes: 0,
            len_bytes: usize::MAX,
            buffer_bytes: usize::MAX,
        })?;
        match what {
            EngineImport::CudaIpc { handle } => self.import_ipc_memory(handle, len_bytes),
            EngineImport::CudaVmm { chunks } => self.import_vmm(chunks, len_bytes),
        }
    }

    fn engine_window(&self, parts: &[DeviceBuffer]) -> Result<EngineWindow, DeviceError> {
        if let [one] = parts {
            let st = self.lock()?;
            dev_of(&st, "engine_window", *one)?;
            return Ok(EngineWindow {
                buffer: *one,
                part_offsets: vec![0],
                owns_buffer: false,
            });
        }
        // Regions the driver placed anywhere: address them from 0, each at its device
        // address. The window's length covers the highest; the layout checks keep every
        // access inside its own region.
        let mut st = self.lock()?;
        let mut part_offsets = Vec::with_capacity(parts.len());
        let mut end = 0usize;
        for p in parts {
            let dev = dev_of(&st, "engine_window", *p)?;
            part_offsets.push(dev);
            end = end.max(dev as usize + p.len_bytes);
        }
        Ok(EngineWindow {
            buffer: insert_buffer(&mut st, Region::Window, end),
            part_offsets,
            owns_buffer: true,
        })
    }

    fn create_stream(&self) -> Result<StreamId, DeviceError> {
        let mut st = self.lock()?;
        let s = self.ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        if let Some(id) = st.free_streams.pop() {
            st.streams[id as usize] = Some((s, Scratch::default()));
            return Ok(StreamId(id));
        }
        st.streams.push(Some((s, Scratch::default())));
        Ok(StreamId(st.streams.len() as u32 - 1))
    }

    fn destroy_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        let mut st = self.lock()?;
        let (s, scratch) = stream_slot(&mut st, "destroy_stream", stream)?
            .take()
            .ok_or_else(|| unknown_stream("destroy_stream", stream))?;
        st.free_streams.push(stream.0);
        if scratch.ptr != 0 {
            // SAFETY: the stream's own scratch, freed in stream order after its last use.
            unsafe { result::free_async(scratch.ptr, s.cu_stream()) }
                .map_err(drv("cuMemFreeAsync"))?;
        }
        // Dropping the last reference destroys the stream once its work is done.
        drop(s);
        Ok(())
    }

    fn sync_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        let st = self.lock()?;
        let s = stream_of(&st, "sync_stream", stream)?;
        // Waiting for the GPU must not hold the device's table lock: every other session's
        // launch would queue behind this one's copy. Only the stream's owner destroys it,
        // and not while it waits on it, so the handle stays valid (the context stays bound
        // to this thread).
        drop(st);
        // SAFETY: a live stream of this context.
        unsafe { result::stream::synchronize(s) }.map_err(drv("cuStreamSynchronize"))
    }

    fn create_event(&self) -> Result<EventId, DeviceError> {
        let mut st = self.lock()?;
        // No timing: the data path only asks whether work is done, and timing events
        // cost the device a timestamp write per record.
        let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(drv("cuEventCreate"))?;
        Ok(insert_event(&mut st, ev))
    }

    fn record_event_on(&self, stream: StreamId, event: EventId) -> Result<(), DeviceError> {
        let st = self.lock()?;
        let s = stream_of(&st, "record_event", stream)?;
        let ev = event_of(&st, "record_event", event)?;
        // SAFETY: live event and stream of this context.
        unsafe { result::event::record(ev, s) }.map_err(drv("cuEventRecord"))
    }

    fn import_ipc_event(&self, handle: &[u8; 64]) -> Result<EventId, DeviceError> {
        let mut st = self.lock()?;
        let mut h = sys::CUipcEventHandle_st { reserved: [0; 64] };
        for (d, s) in h.reserved.iter_mut().zip(handle) {
            *d = *s as _;
        }
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: valid out pointer; the driver validates the handle (another process's
        // interprocess event on this context's device, or an error).
        unsafe { sys::cuIpcOpenEventHandle(&mut ev, h) }
            .result()
            .map_err(drv("cuIpcOpenEventHandle"))?;
        Ok(insert_event(&mut st, ev))
    }

    fn stream_wait_event(&self, stream: StreamId, event: EventId) -> Result<(), DeviceError> {
        let st = self.lock()?;
        let s = stream_of(&st, "stream_wait_event", stream)?;
        let ev = event_of(&st, "stream_wait_event", event)?;
        // SAFETY: live stream and event.
        unsafe { result::stream::wait_event(s, ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(drv("cuStreamWaitEvent"))
    }

    fn query_event(&self, event: EventId) -> Result<bool, DeviceError> {
        let st = self.lock()?;
        let ev = event_of(&st, "query_event", event)?;
        drop(st);
        // SAFETY: a live event; only its owner destroys it, and not while it queries it.
        match unsafe { result::event::query(ev) } {
            Ok(()) => Ok(true),
            Err(result::DriverError(sys::cudaError_enum::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(drv("cuEventQuery")(e)),
        }
    }

    fn sync_event(&self, event: EventId) -> Result<(), DeviceError> {
        let st = self.lock()?;
        let ev = event_of(&st, "sync_event", event)?;
        // As in sync_stream: no table lock while the GPU works.
        drop(st);
        // SAFETY: a live event; only its owner destroys it, and not while it waits on it.
        unsafe { result::event::synchronize(ev) }.map_err(drv("cuEventSynchronize"))
    }

    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError> {
        let mut st = self.lock()?;
        let ev = st
            .events
            .remove(&event.0)
            .ok_or(DeviceError::UnknownHandle {
                op: "destroy_event",
                what: "event",
                id: event.0,
            })?;
        // SAFETY: removed from the table, so destroyed once.
        unsafe { result::event::destroy(ev) }.map_err(drv("cuEventDestroy"))
    }

    fn copy_to_device(
        &self,
        stream: StreamId,
        src: &[u8],
        dst: DeviceRange,
    ) -> Result<(), DeviceError> {
        let op = "copy_to_device";
        let st = self.lock()?;
        if src.len() != dst.len_bytes {
            return Err(DeviceError::LengthMismatch {
                op,
                host_bytes: src.len(),
                device_bytes: dst.len_bytes,
            });
        }
        check_range(op, dst.offset_bytes, dst.len_bytes, dst.buffer.len_bytes)?;
        let d = dev_of(&st, op, dst.buffer)? + dst.offset_bytes as u64;
        let s = stream_of(&st, op, stream)?;
        // SAFETY: checked range of a live buffer. Synchronous copy: `src` is an ordinary
        // borrow that may be reused when this returns (pinned pools use copy_batch).
        unsafe {
            result::stream::synchronize(s).map_err(drv("cuStreamSynchronize"))?;
            result::memcpy_htod_sync(d, src).map_err(drv("cuMemcpyHtoD"))
        }
    }

    fn copy_to_host(
        &self,
        stream: StreamId,
        src: DeviceRange,
        dst: &mut [u8],
    ) -> Result<(), DeviceError> {
        let op = "copy_to_host";
        let st = self.lock()?;
        if dst.len() != src.len_bytes {
            return Err(DeviceError::LengthMismatch {
                op,
                host_bytes: dst.len(),
                device_bytes: src.len_bytes,
            });
        }
        check_range(op, src.offset_bytes, src.len_bytes, src.buffer.len_bytes)?;
        let d = dev_of(&st, op, src.buffer)? + src.offset_bytes as u64;
        let s = stream_of(&st, op, stream)?;
        // Not holding the table lock while the GPU drains (see sync_stream); the buffer
        // stays allocated, as free's contract requires of callers with work on it.
        drop(st);
        // SAFETY: checked range; the stream is drained first so earlier work is visible.
        unsafe {
            result::stream::synchronize(s).map_err(drv("cuStreamSynchronize"))?;
            result::memcpy_dtoh_sync(dst, d).map_err(drv("cuMemcpyDtoH"))
        }
    }

    fn copy_device(
        &self,
        stream: StreamId,
        src: DeviceRange,
        dst: DeviceRange,
    ) -> Result<(), DeviceError> {
        let op = "copy_device";
        let st = self.lock()?;
        if src.len_bytes != dst.len_bytes {
            return Err(DeviceError::LengthMismatch {
                op,
                host_bytes: src.len_bytes,
                device_bytes: dst.len_bytes,
            });
        }
        check_range(op, src.offset_bytes, src.len_bytes, src.buffer.len_bytes)?;
        check_range(op, dst.offset_bytes, dst.len_bytes, dst.buffer.len_bytes)?;
        let s_dev = dev_of(&st, op, src.buffer)? + src.offset_bytes as u64;
        let d_dev = dev_of(&st, op, dst.buffer)? + dst.offset_bytes as u64;
        let s = stream_of(&st, op, stream)?;
        // SAFETY: checked ranges of live buffers; unified addressing lets one call serve
        // device, registered-host and peer memory (copy engines, no SMs).
        unsafe { sys::cuMemcpyAsync(d_dev, s_dev, src.len_bytes, s) }
            .result()
            .map_err(drv("cuMemcpyAsync"))
    }

    fn upload_layout(&self, layout: &PagedLayout) -> Result<LayoutId, DeviceError> {
        let mut st = self.lock()?;
        let bytes = as_bytes(std::slice::from_ref(layout.raw()));
        // SAFETY: allocation sized for one kvp_kv_layout, then a synchronous upload.
        let dev = unsafe {
            let dev = result::malloc_sync(std::mem::size_of::<kvp_kv_layout>())
                .map_err(drv("cuMemAlloc"))?;
            result::memcpy_htod_sync(dev, bytes).map_err(drv("cuMemcpyHtoD"))?;
            dev
        };
        let id = st.next_id;
        st.next_id += 1;
        st.layouts.insert(id, (dev, Arc::new(layout.clone())));
        Ok(LayoutId(id))
    }

    fn free_layout(&self, layout: LayoutId) -> Result<(), DeviceError> {
        let mut st = self.lock()?;
        let (dev, _) = st
            .layouts
            .remove(&layout.0)
            .ok_or(DeviceError::UnknownHandle {
                op: "free_layout",
                what: "layout",
                id: layout.0,
            })?;
        // SAFETY: removed from the table, freed once.
        unsafe { result::free_sync(dev) }.map_err(drv("cuMemFree"))
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
        let mut st = self.lock()?;
        let mut s_dev = dev_of(&st, op, src)?;
        let mut d_dev = dev_of(&st, op, dst)?;
        validate_descs(op, descs, src, Some(dst))?;
        if descs.is_empty() {
            return Ok(());
        }
        let s = stream_of(&st, op, stream)?;
        let mut table = self.scratch_upload(&mut st, stream, &[as_bytes(descs)])?;
        let mut n = descs.len() as u32;
        let params = [
            arg(&mut s_dev),
            arg(&mut d_dev),
            arg(&mut table),
            arg(&mut n),
        ];
        self.launch(
            "kvp_copy_batch",
            &self.kernels.copy,
            geometry::copy(descs),
            s,
            &params,
        )
    }

    fn checksum(
        &self,
        stream: StreamId,
        base: DeviceBuffer,
        descs: &[kvp_copy_desc],
    ) -> Result<Vec<u64>, DeviceError> {
        let op = "checksum";
        let mut st = self.lock()?;
        let mut b_dev = dev_of(&st, op, base)?;
        validate_descs(op, descs, base, None)?;
        if descs.is_empty() {
            return Ok(Vec::new());
        }
        let s = stream_of(&st, op, stream)?;
        // One table: descriptors, then the 8-byte sums (zeroed by the upload).
        let desc_bytes = std::mem::size_of_val(descs);
        let mut upload = as_bytes(descs).to_vec();
        upload.resize(desc_bytes + 8 * descs.len(), 0);
        let mut table = self.scratch_upload(&mut st, stream, &[&upload])?;
        let mut sums_dev = table + desc_bytes as u64;
        let mut n = descs.len() as u32;
        let p1 = [
            arg(&mut b_dev),
            arg(&mut table),
            arg(&mut n),
            arg(&mut sums_dev),
        ];
        self.launch(
            "kvp_checksum_partial",
            &self.kernels.checksum_partial,
            geometry::checksum(descs),
            s,
            &p1,
        )?;
        let p2 = [arg(&mut table), arg(&mut n), arg(&mut sums_dev)];
        self.launch(
            "kvp_checksum_finalize",
            &self.kernels.checksum_finalize,
            geometry::checksum_finalize(descs.len()),
            s,
            &p2,
        )?;
        let mut sums = vec![0u64; descs.len()];
        // The scratch table is this stream's alone (one caller per stream): no lock needed
        // while the GPU drains (see sync_stream).
        drop(st);
        // SAFETY: sums_dev holds descs.len() u64s; the stream is drained first.
        unsafe {
            result::stream::synchronize(s).map_err(drv("cuStreamSynchronize"))?;
            result::memcpy_dtoh_sync(&mut sums, sums_dev).map_err(drv("cuMemcpyDtoH"))?;
        }
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
        let mut st = self.lock()?;
        let mut b_dev = dev_of(&st, op, base)?;
        validate_descs(op, descs, base, None)?;
        if descs.is_empty() {
            return Ok(Vec::new());
        }
        let s = stream_of(&st, op, stream)?;
        // One table: the descriptors with their chaining-value offsets, the key words,
        // then room the kernels fill before anything reads it: the packed results (32
        // bytes per descriptor, one copy back) and the chaining values (32 bytes per
        // 1 KiB chunk).
        let (table, entries, levels) = kvplane_kernels::mac_table(descs);
        let key_words = kvplane_kernels::mac_key_words(key);
        let key_bytes: Vec<u8> = key_words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let table_bytes = std::mem::size_of_val(table.as_slice());
        let mac_bytes = kvplane_kernels::host::MAC_BYTES;
        let roots_bytes = table.len() * mac_bytes;
        let cv_bytes = entries as usize * mac_bytes;
        let mut table_dev = self.scratch_table(
            &mut st,
            stream,
            &[as_bytes(&table), &key_bytes],
            roots_bytes + cv_bytes,
        )?;
        let mut key_dev = table_dev + scratch_align(table_bytes) as u64;
        let mut roots_dev = key_dev + scratch_align(key_bytes.len()) as u64;
        let mut cvs_dev = roots_dev + roots_bytes as u64;
        let mut n = table.len() as u32;
        let p1 = [
            arg(&mut b_dev),
            arg(&mut table_dev),
            arg(&mut n),
            arg(&mut key_dev),
            arg(&mut cvs_dev),
            arg(&mut roots_dev),
        ];
        self.launch(
            "kvp_mac_chunks",
            &self.kernels.mac_chunks,
            geometry::mac_chunks(&table),
            s,
            &p1,
        )?;
        for level in 0..levels {
            let mut level_arg = level;
            let p = [
                arg(&mut table_dev),
                arg(&mut n),
                arg(&mut key_dev),
                arg(&mut cvs_dev),
                arg(&mut roots_dev),
                arg(&mut level_arg),
            ];
            self.launch(
                "kvp_mac_parents",
                &self.kernels.mac_parents,
                geometry::mac_parents(&table, level),
                s,
                &p,
            )?;
        }
        drop(st);
        let mut roots = vec![0u32; table.len() * 8];
        // SAFETY: roots_dev holds table.len() results of 8 words, written by the kernels
        // queued above; the stream is drained first, and the scratch is this stream's
        // alone (as in `checksum`).
        unsafe {
            result::stream::synchronize(s).map_err(drv("cuStreamSynchronize"))?;
            result::memcpy_dtoh_sync(&mut roots, roots_dev).map_err(drv("cuMemcpyDtoH"))?;
        }
        let mut macs = vec![[0u8; 32]; descs.len()];
        kvplane_kernels::host::mac_results(&roots, &mut macs);
        Ok(macs)
    }

    fn read_file(
        &self,
        stream: StreamId,
        dst: DeviceRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
    ) -> Result<(), DeviceError> {
        let (gds, file) = self.gds_for(stream, fd)?;
        gds.read(file, self, dst, file_offset)
            .map_err(|e| file_error(e, false, file_offset, dst.len_bytes))
    }

    fn write_file(
        &self,
        stream: StreamId,
        src: DeviceRange,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
    ) -> Result<(), DeviceError> {
        let (gds, file) = self.gds_for(stream, fd)?;
        gds.write(file, self, src, file_offset)
            .map_err(|e| file_error(e, true, file_offset, src.len_bytes))
    }
}

impl CudaDevice {
    /// cuFile (opened on first use) and `fd`'s registered handle, once the work queued
    /// on `stream` is done: cuFile I/O is not stream-ordered.
    fn gds_for(
        &self,
        stream: StreamId,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(&crate::gds::Gds, crate::gds::GdsHandle), DeviceError> {
        let gds = self
            .gds
            .get_or_init(|| crate::gds::Gds::open().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|detail| DeviceError::Driver {
                op: "cuFileDriverOpen",
                detail: detail.clone(),
            })?;
        self.sync_stream(stream)?;
        let file = self.gds_file(gds, fd)?;
        Ok((gds, file))
    }
}

/// Errnos that are the file's or the disk's failure (the slot's I/O error); any other
/// errno from cuFile (EINVAL, EFAULT, ENOMEM, ...) says the driver or the DMA path
/// refused, which is the device's (the daemon backs off its direct path for those).
const FILE_ERRNOS: [i32; 7] = [
    libc::EIO,
    libc::ENOSPC,
    libc::EDQUOT,
    libc::EROFS,
    libc::EFBIG,
    libc::ENXIO,
    libc::ENODEV,
];

/// A cuFile transfer's error: an errno of [`FILE_ERRNOS`] or a short transfer is the
/// file's failure, not the device's; cuFile's own errors (numbered from 5000) and other
/// errnos are the device's.
fn file_error(
    e: crate::gds::GdsError,
    writing: bool,
    file_offset: u64,
    len_bytes: usize,
) -> DeviceError {
    let op = match writing {
        true => "cuFileWrite",
        false => "cuFileRead",
    };
    let source = match e {
        crate::gds::GdsError::Io { ret, .. }
            if (-4999..0).contains(&ret) && FILE_ERRNOS.contains(&(-ret as i32)) =>
        {
            std::io::Error::from_raw_os_error(-ret as i32)
        }
        crate::gds::GdsError::Io { ret, .. } if ret >= 0 => match writing {
            true => std::io::ErrorKind::WriteZero.into(),
            false => std::io::ErrorKind::UnexpectedEof.into(),
        },
        e => {
            return DeviceError::Driver {
                op,
                detail: e.to_string(),
            };
        }
    };
    match writing {
        true => DeviceError::FileWrite {
            op,
            file_offset,
            len_bytes,
            source,
        },
        false => DeviceError::FileRead {
            op,
            file_offset,
            len_bytes,
            source,
        },
    }
}

/// Range checks of a copy/checksum table against the buffers' lengths (the same rules
/// as the host wrappers), before anything is uploaded.
fn validate_descs(
    op: &'static str,
    descs: &[kvp_copy_desc],
    src: DeviceBuffer,
    dst: Option<DeviceBuffer>,
) -> Result<(), DeviceError> {
    let fits =
        |off: u64, bytes: u64, len: usize| off.checked_add(bytes).is_some_and(|e| e <= len as u64);
    for d in descs {
        if !fits(d.src_offset, d.bytes, src.len_bytes) {
            return Err(DeviceError::OutOfRange {
                op,
                offset_bytes: d.src_offset as usize,
                len_bytes: d.bytes as usize,
                buffer_bytes: src.len_bytes,
            });
        }
        if let Some(dst) = dst {
            if !fits(d.dst_offset, d.bytes, dst.len_bytes) {
                return Err(DeviceError::OutOfRange {
                    op,
                    offset_bytes: d.dst_offset as usize,
                    len_bytes: d.bytes as usize,
                    buffer_bytes: dst.len_bytes,
                });
            }
            if dst.id == src.id
                && d.bytes > 0
                && d.src_offset < d.dst_offset + d.bytes
                && d.dst_offset < d.src_offset + d.bytes
            {
                return Err(DeviceError::SameBuffer { op });
            }
        }
    }
    if descs.len() > u32::MAX as usize {
        return Err(DeviceError::OutOfRange {
            op,
            offset_bytes: 0,
            len_bytes: descs.len(),
            buffer_bytes: u32::MAX as usize,
        });
    }
    Ok(())
}

impl CudaDevice {
    /// Gather (`op` "gather") or scatter of `pages` against `blocks`: contiguous blocks
    /// filling the range (`block_offsets` None: the kernel gets NULL) or blocks at
    /// `blocks.offset_bytes + block_offsets[i]` (slots; the table is uploaded beside the
    /// page ids).
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
        let mut st = self.lock()?;
        if engine.id == blocks.buffer.id {
            return Err(DeviceError::SameBuffer { op });
        }
        let (layout_dev, host_layout) = st
            .layouts
            .get(&layout.0)
            .map(|(d, l)| (*d, Arc::clone(l)))
            .ok_or(DeviceError::UnknownHandle {
                op,
                what: "layout",
                id: layout.0,
            })?;
        check_range(
            op,
            blocks.offset_bytes,
            blocks.len_bytes,
            blocks.buffer.len_bytes,
        )?;
        // The host wrappers' checks, against the device buffers' lengths.
        kvplane_kernels::check_paged_batch(
            op,
            &host_layout,
            engine.len_bytes,
            pages,
            blocks.len_bytes,
            block_offsets,
            op == "scatter",
        )
        .map_err(|source| DeviceError::Kernel { op, source })?;
        if pages.is_empty() {
            return Ok(());
        }
        let mut e_dev = dev_of(&st, op, engine)?;
        let mut b_dev = dev_of(&st, op, blocks.buffer)? + blocks.offset_bytes as u64;
        let s = stream_of(&st, op, stream)?;
        // One table: the block offsets (if any), then the page ids.
        let offsets_bytes = block_offsets.map_or(&[][..], as_bytes);
        let table = self.scratch_upload(&mut st, stream, &[offsets_bytes, as_bytes(pages)])?;
        let mut offsets_dev = if block_offsets.is_some() { table } else { 0 };
        let mut pages_dev = table + scratch_align(offsets_bytes.len()) as u64;
        let mut layout_ptr = layout_dev;
        let mut n = pages.len() as u32;
        let info = *host_layout.info();
        let shape = geometry::paged(
            &info,
            host_layout.raw().num_layers * host_layout.raw().kv_planes,
            n,
        );
        let (name, f) = if op == "gather" {
            ("kvp_paged_gather", &self.kernels.gather)
        } else {
            ("kvp_paged_scatter", &self.kernels.scatter)
        };
        let params = [
            arg(&mut e_dev),
            arg(&mut b_dev),
            arg(&mut layout_ptr),
            arg(&mut pages_dev),
            arg(&mut offsets_dev),
            arg(&mut n),
        ];
        self.launch(name, f, shape, s, &params)
    }
}

/// One GPU as NVML sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    /// `GPU-xxxxxxxx-...`: what names a GPU across processes and CUDA_VISIBLE_DEVICES
    /// orderings (an engine's device memory region carries it).
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub pci_bus_id: String,
    pub pcie_link_gen: Option<u32>,
    pub pcie_link_width: Option<u32>,
    /// PCI bus ids at the far end of each active NVLink.
    pub nvlink_peers: Vec<String>,
}

/// GPUs, memory, PCIe links and NVLink peers from NVML (for `kvplane status`). Without
/// a driver this is an error, never a panic.
pub fn topology() -> Result<Vec<GpuInfo>, DeviceError> {
    let nvml_err = |op: &'static str| {
        move |e: nvml_wrapper::error::NvmlError| DeviceError::Driver {
            op,
            detail: e.to_string(),
        }
    };
    let nvml = nvml_wrapper::Nvml::init().map_err(nvml_err("nvmlInit"))?;
    let count = nvml
        .device_count()
        .map_err(nvml_err("nvmlDeviceGetCount"))?;
    let mut out = Vec::new();
    for index in 0..count {
        let dev = nvml
            .device_by_index(index)
            .map_err(nvml_err("nvmlDeviceGetHandleByIndex"))?;
        let mut nvlink_peers = Vec::new();
        // NVML_NVLINK_MAX_LINKS is 18 on current parts; inactive links report false/error.
        for link in 0..18 {
            let l = dev.link_wrapper_for(link);
            if l.is_active().unwrap_or(false)
                && let Ok(pci) = l.remote_pci_info()
            {
                nvlink_peers.push(pci.bus_id);
            }
        }
        out.push(GpuInfo {
            index,
            name: dev.name().map_err(nvml_err("nvmlDeviceGetName"))?,
            uuid: dev.uuid().map_err(nvml_err("nvmlDeviceGetUUID"))?,
            memory_total_bytes: dev
                .memory_info()
                .map_err(nvml_err("nvmlDeviceGetMemoryInfo"))?
                .total,
            pci_bus_id: dev
                .pci_info()
                .map_err(nvml_err("nvmlDeviceGetPciInfo"))?
                .bus_id,
            pcie_link_gen: dev.current_pcie_link_gen().ok(),
            pcie_link_width: dev.current_pcie_link_width().ok(),
            nvlink_peers,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(ret: isize) -> crate::gds::GdsError {
        crate::gds::GdsError::Io {
            op: "cuFileRead",
            fd: 3,
            what: "error",
            ret,
        }
    }

    /// A disk's errno or a short transfer is the file's failure (the slot's I/O error);
    /// a driver's errno (EINVAL) or cuFile's own error is the device's.
    #[test]
    fn cufile_errors_split_into_the_files_and_the_devices() {
        let errno = |e: i32| io(-(e as isize));
        for e in [libc::EIO, libc::ENOSPC] {
            assert!(matches!(
                file_error(errno(e), true, 0, 1),
                DeviceError::FileWrite { .. }
            ));
            assert!(matches!(
                file_error(errno(e), false, 0, 1),
                DeviceError::FileRead { .. }
            ));
        }
        assert!(matches!(
            file_error(io(5), false, 0, 8),
            DeviceError::FileRead { .. }
        ));
        assert!(matches!(
            file_error(errno(libc::EINVAL), true, 0, 1),
            DeviceError::Driver { .. }
        ));
        assert!(matches!(
            file_error(io(-5011), false, 0, 1),
            DeviceError::Driver { .. }
        ));
    }
}
