//! The engine's side of registering GPU memory with the daemon (ABI 2 KV regions): what
//! an engine process, or a tool acting as one, does to describe a `cudaMalloc`
//! allocation by its CUDA IPC handle, or to create a VMM allocation and export it as a
//! file descriptor. The daemon's side is [`crate::Device::import_engine_memory`].
//!
//! Not verifiable here (no GPU on the development machines); `scripts/gpu-e2e.sh` runs it
//! across processes on a GPU machine (`kvplane gpu-engine`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::{CudaContext, result, sys};
use kvplane_ffi::kvp_kv_region;

use crate::cuda::driver_present;
use crate::device::DeviceError;

fn drv(op: &'static str) -> impl Fn(result::DriverError) -> DeviceError {
    move |e| DeviceError::Driver {
        op,
        detail: format!("{e:?}"),
    }
}

/// How an engine's GPU memory was allocated, and so how it is shared with the daemon.
#[derive(Debug)]
enum Backing {
    /// `cuMemAlloc` (what `cudaMalloc` and PyTorch's caching allocator use).
    Alloc,
    /// `cuMemCreate` allocations of `chunk_bytes` each with POSIX-descriptor export,
    /// mapped back to back from the pointer (one, or a run of them as PyTorch's
    /// expandable segments map theirs).
    Vmm {
        handles: Vec<sys::CUmemGenericAllocationHandle>,
        chunk_bytes: usize,
    },
}

/// One GPU allocation of an engine: its device pointer, its size, and how to register it.
#[derive(Debug)]
pub struct EngineAlloc {
    gpu: Arc<EngineGpu>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
    backing: Backing,
}

/// The engine's GPU: a context on device `ordinal` and its UUID.
#[derive(Debug)]
pub struct EngineGpu {
    ctx: Arc<CudaContext>,
    uuid: [u8; 16],
}

impl EngineGpu {
    pub fn open(ordinal: usize) -> Result<Arc<Self>, DeviceError> {
        if !driver_present() {
            return Err(DeviceError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("cuDevicePrimaryCtxRetain"))?;
        let mut raw = sys::CUuuid_st { bytes: [0; 16] };
        // SAFETY: a valid out pointer and the device of a live context.
        unsafe { sys::cuDeviceGetUuid_v2(&mut raw, ctx.cu_device()) }
            .result()
            .map_err(drv("cuDeviceGetUuid"))?;
        Ok(Arc::new(EngineGpu {
            ctx,
            uuid: raw.bytes.map(|b| b as u8),
        }))
    }

    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    fn bind(&self) -> Result<(), DeviceError> {
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))
    }

    /// `bytes` of device memory from `cuMemAlloc`, zeroed.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<EngineAlloc, DeviceError> {
        self.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: a valid out pointer in the bound context.
        unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(1)) }
            .result()
            .map_err(|_| DeviceError::OutOfMemory {
                op: "cuMemAlloc",
                bytes,
            })?;
        let a = EngineAlloc {
            gpu: Arc::clone(self),
            ptr,
            bytes,
            backing: Backing::Alloc,
        };
        a.write(0, &vec![0u8; bytes])?;
        Ok(a)
    }

    /// At least `bytes` of VMM memory (rounded up to the allocation granularity),
    /// exportable as a POSIX file descriptor, mapped read/write here and zeroed.
    pub fn alloc_vmm(self: &Arc<Self>, bytes: usize) -> Result<EngineAlloc, DeviceError> {
        self.alloc_vmm_chunked(bytes, bytes)
    }

    /// At least `bytes` of VMM memory as allocations of `chunk_bytes` each (both rounded
    /// up to the allocation granularity), mapped back to back from one pointer, as
    /// PyTorch's expandable segments do; each exportable as a POSIX file descriptor,
    /// mapped read/write here and zeroed.
    pub fn alloc_vmm_chunked(
        self: &Arc<Self>,
        bytes: usize,
        chunk_bytes: usize,
    ) -> Result<EngineAlloc, DeviceError> {
        self.bind()?;
        let dev = self.ctx.cu_device();
        // SAFETY: all-zero is a valid CUmemAllocationProp (plain C struct, null pointer).
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.requestedHandleTypes =
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        prop.location = sys::CUmemLocation_st {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: dev,
        };
        let mut gran = 0usize;
        // SAFETY: valid pointers to a filled property struct and an out value.
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut gran,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        }
        .result()
        .map_err(drv("cuMemGetAllocationGranularity"))?;
        let gran = gran.max(1);
        let chunk = chunk_bytes.max(1).div_ceil(gran) * gran;
        let chunks = bytes.max(1).div_ceil(chunk);
        let size = chunks * chunk;
        // From here on `a` owns what exists; dropping it on an error undoes it (unmap and
        // free ignore failures; ptr 0 means nothing was reserved).
        let mut a = EngineAlloc {
            gpu: Arc::clone(self),
            ptr: 0,
            bytes: size,
            backing: Backing::Vmm {
                handles: Vec::with_capacity(chunks),
                chunk_bytes: chunk,
            },
        };
        // SAFETY: valid out pointer; a fresh reservation.
        unsafe { sys::cuMemAddressReserve(&mut a.ptr, size, gran, 0, 0) }
            .result()
            .map_err(drv("cuMemAddressReserve"))?;
        for i in 0..chunks {
            let mut handle: sys::CUmemGenericAllocationHandle = 0;
            // SAFETY: valid out pointer and property struct.
            unsafe { sys::cuMemCreate(&mut handle, chunk, &prop, 0) }
                .result()
                .map_err(|_| DeviceError::OutOfMemory {
                    op: "cuMemCreate",
                    bytes: chunk,
                })?;
            // SAFETY: the i-th chunk of our reservation, unmapped, and a fresh allocation
            // of that size.
            let mapped =
                unsafe { sys::cuMemMap(a.ptr + (i * chunk) as u64, chunk, 0, handle, 0) }.result();
            if let Err(e) = mapped {
                // SAFETY: created above, mapped nowhere; released once.
                let _ = unsafe { sys::cuMemRelease(handle) };
                return Err(drv("cuMemMap")(e));
            }
            if let Backing::Vmm { handles, .. } = &mut a.backing {
                handles.push(handle);
            }
        }
        let access = sys::CUmemAccessDesc_st {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the whole range is mapped; one valid access descriptor.
        unsafe { sys::cuMemSetAccess(a.ptr, size, &access, 1) }
            .result()
            .map_err(drv("cuMemSetAccess"))?;
        a.write(0, &vec![0u8; size])?;
        Ok(a)
    }
}

/// A new POSIX descriptor for the VMM allocation `handle` (made exportable as one).
fn export_fd(handle: sys::CUmemGenericAllocationHandle) -> Result<OwnedFd, DeviceError> {
    let mut fd: std::ffi::c_int = -1;
    // SAFETY: for POSIX descriptors the driver writes an int through the pointer; the
    // new descriptor is ours.
    unsafe {
        sys::cuMemExportToShareableHandle(
            (&mut fd as *mut std::ffi::c_int).cast(),
            handle,
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            0,
        )
    }
    .result()
    .map_err(drv("cuMemExportToShareableHandle"))?;
    // SAFETY: a fresh descriptor the driver created for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl EngineAlloc {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// The region describing `[offset, offset + len)` of this allocation, and the
    /// descriptor that must travel with it (VMM allocations). A VMM allocation in
    /// several chunks is several regions: see [`Self::regions`].
    pub fn region(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(kvp_kv_region, Option<OwnedFd>), DeviceError> {
        self.gpu.bind()?;
        match &self.backing {
            Backing::Alloc => {
                let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
                // SAFETY: ptr is the base of a live cuMemAlloc allocation.
                unsafe { sys::cuIpcGetMemHandle(&mut h, self.ptr) }
                    .result()
                    .map_err(drv("cuIpcGetMemHandle"))?;
                let handle = h.reserved.map(|b| b as u8);
                Ok((
                    kvp_kv_region::cuda_ipc(
                        handle,
                        self.gpu.uuid,
                        self.bytes as u64,
                        offset_bytes,
                        len_bytes,
                    ),
                    None,
                ))
            }
            Backing::Vmm { handles, .. } => match handles[..] {
                [one] => Ok((
                    kvp_kv_region::cuda_vmm_fd(
                        self.gpu.uuid,
                        self.bytes as u64,
                        offset_bytes,
                        len_bytes,
                    ),
                    Some(export_fd(one)?),
                )),
                _ => Err(DeviceError::Unsupported {
                    op: "one region of a VMM allocation in chunks (use regions())",
                    backend: "cuda",
                }),
            },
        }
    }

    /// The regions describing all of this allocation, with their descriptors: one, or
    /// for VMM memory in chunks one per chunk, each after the first continuing the one
    /// before (`KVP_REGION_F_CONTINUES`), so a layout may address the allocation as one
    /// run from the first.
    pub fn regions(&self) -> Result<Vec<(kvp_kv_region, Option<OwnedFd>)>, DeviceError> {
        match &self.backing {
            Backing::Vmm {
                handles,
                chunk_bytes,
            } if handles.len() > 1 => {
                self.gpu.bind()?;
                handles
                    .iter()
                    .enumerate()
                    .map(|(i, &h)| {
                        let chunk = *chunk_bytes as u64;
                        let mut r = kvp_kv_region::cuda_vmm_fd(self.gpu.uuid, chunk, 0, chunk);
                        if i > 0 {
                            r.flags = kvplane_ffi::REGION_F_CONTINUES;
                        }
                        Ok((r, Some(export_fd(h)?)))
                    })
                    .collect()
            }
            _ => Ok(vec![self.region(0, self.bytes as u64)?]),
        }
    }

    /// Copies `data` to `offset` of the allocation (synchronous).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), DeviceError> {
        crate::device::check_range("EngineAlloc::write", offset, data.len(), self.bytes)?;
        self.gpu.bind()?;
        // SAFETY: the range was checked to lie inside the live allocation; data is a
        // valid host slice of that length.
        unsafe { sys::cuMemcpyHtoD_v2(self.ptr + offset as u64, data.as_ptr().cast(), data.len()) }
            .result()
            .map_err(drv("cuMemcpyHtoD"))
    }

    /// Copies `out.len()` bytes from `offset` of the allocation (synchronous).
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), DeviceError> {
        crate::device::check_range("EngineAlloc::read", offset, out.len(), self.bytes)?;
        self.gpu.bind()?;
        // SAFETY: as in write, in the other direction.
        unsafe {
            sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.ptr + offset as u64, out.len())
        }
        .result()
        .map_err(drv("cuMemcpyDtoH"))
    }
}

/// Page-locked host memory of the engine's context (`cuMemHostAlloc`): where the
/// offload benchmark's ceilings copy to and from, as the daemon's pinned tier would be.
#[derive(Debug)]
pub struct PinnedHost {
    gpu: Arc<EngineGpu>,
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: plain page-locked memory owned by this value; every driver call binds the
// context first.
unsafe impl Send for PinnedHost {}

impl EngineGpu {
    /// `bytes` of page-locked host memory.
    pub fn pinned(self: &Arc<Self>, bytes: usize) -> Result<PinnedHost, DeviceError> {
        self.bind()?;
        let mut ptr: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: a valid out pointer in the bound context.
        unsafe { sys::cuMemHostAlloc(&mut ptr, bytes.max(1), 0) }
            .result()
            .map_err(|_| DeviceError::OutOfMemory {
                op: "cuMemHostAlloc",
                bytes,
            })?;
        Ok(PinnedHost {
            gpu: Arc::clone(self),
            ptr: ptr.cast(),
            bytes,
        })
    }

    /// Waits for everything queued in the context (the null stream's copies).
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.bind()?;
        // SAFETY: the bound context.
        unsafe { sys::cuCtxSynchronize() }
            .result()
            .map_err(drv("cuCtxSynchronize"))
    }
}

impl PinnedHost {
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc, freed once by its owner.
            let _ = unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
        }
    }
}

/// Which way a copy between an allocation and pinned host memory goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCopy {
    ToHost,
    FromHost,
}

impl EngineAlloc {
    /// Queues a copy of `len` bytes between `offset` of this allocation and `host_offset`
    /// of `host` on the null stream (`cuMemcpyAsync`, what vLLM's `swap_blocks` issues per
    /// page); complete after [`EngineGpu::synchronize`].
    pub fn copy_host_async(
        &self,
        way: HostCopy,
        offset: usize,
        host: &PinnedHost,
        host_offset: usize,
        len: usize,
    ) -> Result<(), DeviceError> {
        crate::device::check_range("EngineAlloc::copy_host_async", offset, len, self.bytes)?;
        crate::device::check_range("PinnedHost", host_offset, len, host.bytes)?;
        self.gpu.bind()?;
        let dev = self.ptr + offset as u64;
        // SAFETY: both ranges were checked to lie inside live allocations (the pinned one
        // page-locked, so an async copy may use it); the null stream of the bound context.
        let r = unsafe {
            let h = host.ptr.add(host_offset);
            match way {
                HostCopy::ToHost => {
                    sys::cuMemcpyDtoHAsync_v2(h.cast(), dev, len, std::ptr::null_mut())
                }
                HostCopy::FromHost => {
                    sys::cuMemcpyHtoDAsync_v2(dev, h.cast(), len, std::ptr::null_mut())
                }
            }
        };
        r.result().map_err(drv("cuMemcpyAsync"))
    }

    /// Queues a device-to-device copy of `len` bytes from `offset` of this allocation to
    /// `dst_offset` of `dst` on the null stream.
    pub fn copy_device_async(
        &self,
        offset: usize,
        dst: &EngineAlloc,
        dst_offset: usize,
        len: usize,
    ) -> Result<(), DeviceError> {
        crate::device::check_range("EngineAlloc::copy_device_async", offset, len, self.bytes)?;
        crate::device::check_range("EngineAlloc (dst)", dst_offset, len, dst.bytes)?;
        self.gpu.bind()?;
        // SAFETY: both ranges checked inside live allocations of the bound context.
        unsafe {
            sys::cuMemcpyDtoDAsync_v2(
                dst.ptr + dst_offset as u64,
                self.ptr + offset as u64,
                len,
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(drv("cuMemcpyDtoDAsync"))
    }
}

/// An engine's interprocess event (`CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING`),
/// registered with the daemon by [`EngineEvent::describe`] (KVP_OP_REGISTER_EVENTS): the
/// engine records it after writing KV a SAVE reads, and waits on it after a LOAD that
/// names it.
#[derive(Debug)]
pub struct EngineEvent {
    gpu: Arc<EngineGpu>,
    event: sys::CUevent,
}

// SAFETY: a CUevent is a driver handle usable from any thread with the context bound
// (every method binds it first).
unsafe impl Send for EngineEvent {}

impl EngineGpu {
    /// A new interprocess event on this GPU (recorded once before any wait on it, so a
    /// wait before the first record does not block).
    pub fn event(self: &Arc<Self>) -> Result<EngineEvent, DeviceError> {
        self.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32
            | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: a valid out pointer in the bound context.
        unsafe { sys::cuEventCreate(&mut event, flags) }
            .result()
            .map_err(drv("cuEventCreate"))?;
        let e = EngineEvent {
            gpu: Arc::clone(self),
            event,
        };
        e.record()?;
        Ok(e)
    }
}

impl EngineEvent {
    /// What KVP_OP_REGISTER_EVENTS takes for this event: its GPU and IPC handle.
    pub fn describe(&self) -> Result<kvplane_ffi::kvp_ipc_event, DeviceError> {
        self.gpu.bind()?;
        let mut h = sys::CUipcEventHandle_st { reserved: [0; 64] };
        // SAFETY: a valid out pointer; a live interprocess event of the bound context.
        unsafe { sys::cuIpcGetEventHandle(&mut h, self.event) }
            .result()
            .map_err(drv("cuIpcGetEventHandle"))?;
        let mut e: kvplane_ffi::kvp_ipc_event = kvplane_ffi::Pod::zeroed();
        e.gpu_uuid = self.gpu.uuid;
        for (d, s) in e.handle.iter_mut().zip(h.reserved) {
            *d = s as u8;
        }
        Ok(e)
    }

    /// Records the event on the default stream (after the engine's writes so far).
    pub fn record(&self) -> Result<(), DeviceError> {
        self.gpu.bind()?;
        // SAFETY: a live event; the null stream of the bound context.
        unsafe { sys::cuEventRecord(self.event, std::ptr::null_mut()) }
            .result()
            .map_err(drv("cuEventRecord"))
    }

    /// Blocks until the event's last record (here or in the daemon) has completed.
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.gpu.bind()?;
        // SAFETY: a live event.
        unsafe { sys::cuEventSynchronize(self.event) }
            .result()
            .map_err(drv("cuEventSynchronize"))
    }
}

impl Drop for EngineEvent {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: destroyed once, by its owner.
            let _ = unsafe { sys::cuEventDestroy_v2(self.event) };
        }
    }
}

impl Drop for EngineAlloc {
    fn drop(&mut self) {
        if self.gpu.bind().is_err() {
            return;
        }
        // SAFETY: each resource is released once, by the call matching how it was made;
        // nothing uses the memory after its owner is dropped.
        unsafe {
            match self.backing {
                Backing::Alloc => {
                    let _ = sys::cuMemFree_v2(self.ptr);
                }
                Backing::Vmm {
                    ref handles,
                    chunk_bytes,
                } => {
                    if self.ptr != 0 {
                        for i in 0..handles.len() {
                            let _ =
                                sys::cuMemUnmap(self.ptr + (i * chunk_bytes) as u64, chunk_bytes);
                        }
                        let _ = sys::cuMemAddressFree(self.ptr, self.bytes);
                    }
                    for &h in handles {
                        let _ = sys::cuMemRelease(h);
                    }
                }
            }
        }
    }
}
