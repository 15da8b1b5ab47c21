//! The mover: the only code that moves block bytes. It executes the block manager's plans
//! (`crate::block::plan`) on the `Device` (engine pages <-> tier slots, one gather or
//! scatter launch per tier buffer of a batch; tier <-> tier, one batched copy) and on the
//! NVMe store (one batch of writes, reads or header erasures), and reports what landed.
//! It never touches the registry: the block manager commits the outcomes.

use std::sync::Arc;

use kvplane_cuda::{Device, DeviceBuffer, DeviceError, LayoutId, StreamId};
use kvplane_ffi::kvp_copy_desc;
use kvplane_kernels::KernelError;

use crate::block::plan::{LoadItem, NvmeRead, NvmeWrite, StoreItem, TierCopy};
use crate::tier::nvme::NvmeError;
use crate::tier::nvme::header::SlotHeader;
use crate::tier::{SLOT_HEADER_BYTES, Stores, Tier};

/// CUDA registers host memory in chunks of at most 64 GiB (ARCHITECTURE.md, tiers).
const MAX_REGISTRATION_BYTES: usize = 64 << 30;

/// Errors from a caller's fill/drain closure (tools and tests that are their own engine).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a batch between the engine and the tiers failed.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The device refused or failed the copy (an engine buffer that faulted is a
    /// `DeviceError::Kernel` with `KernelError::EngineFault`).
    #[error("block {index} of the batch: {source}")]
    Device {
        index: usize,
        #[source]
        source: DeviceError,
    },
    /// A fill or drain closure failed.
    #[error("block {index} of the batch: {source}")]
    Caller {
        index: usize,
        #[source]
        source: BoxError,
    },
}

impl MoveError {
    /// Index (in the batch's items) of the block the failure is reported against.
    pub fn index(&self) -> usize {
        match self {
            MoveError::Device { index, .. } | MoveError::Caller { index, .. } => *index,
        }
    }

    /// The engine-memory fault behind the failure, if that is what it was.
    pub fn engine_fault(&self) -> Option<&KernelError> {
        match self {
            MoveError::Device {
                source: DeviceError::Kernel { source, .. },
                ..
            } if matches!(source, KernelError::EngineFault { .. }) => Some(source),
            _ => None,
        }
    }
}

/// A range of a tier's memory registered with the device.
#[derive(Debug, Clone, Copy)]
struct Region {
    buffer: DeviceBuffer,
    base: usize,
    len_bytes: usize,
}

/// An engine's KV memory as the device sees it: the registered buffer, the uploaded
/// layout, and the stream its copies run on.
#[derive(Debug, Clone, Copy)]
pub struct EngineTarget {
    pub buffer: DeviceBuffer,
    pub layout: LayoutId,
    pub stream: StreamId,
}

/// Executes plans on a device and the NVMe store. Shared by every data-plane thread: it
/// holds no per-operation state (scratch vectors belong to the caller's session).
pub struct Mover {
    device: Arc<dyn Device>,
    stores: Arc<Stores>,
    /// The host pool, registered with the device in chunks (whole slots each).
    host_regions: Vec<Region>,
    /// The G1 arena, registered with the device.
    hbm: Option<Region>,
}

impl std::fmt::Debug for Mover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mover")
            .field("device", &self.device.describe())
            .field("host_regions", &self.host_regions.len())
            .finish()
    }
}

impl Mover {
    /// Registers the tiers' memory with `device` (on CUDA: page-locked and mapped, so
    /// kernels and copy engines reach it directly).
    pub fn new(device: Arc<dyn Device>, stores: Arc<Stores>) -> Result<Self, DeviceError> {
        let mut mover = Mover {
            device,
            stores,
            host_regions: Vec::new(),
            hbm: None,
        };
        for (ptr, len_bytes) in mover.stores.host.regions(MAX_REGISTRATION_BYTES) {
            let region = mover.register(ptr, len_bytes)?;
            mover.host_regions.push(region);
        }
        if let Some(arena) = &mover.stores.hbm
            && arena.slot_count() > 0
        {
            let ptr = arena
                .host_ptr(0)
                .expect("the G1 arena of the host backend is host memory");
            let len = arena.slot_count() as usize * arena.slot_bytes();
            mover.hbm = Some(mover.register(ptr, len)?);
        }
        Ok(mover)
    }

    fn register(&self, ptr: *mut u8, len_bytes: usize) -> Result<Region, DeviceError> {
        let base = std::ptr::NonNull::new(ptr).expect("tier memory is never at address 0");
        // SAFETY: the tier's mapping lives in `stores`, which this mover holds (an Arc) and
        // outlives the registration (freed in Drop below, before the Arc); regions of one
        // pool do not overlap, and the G1 arena is a separate mapping.
        let buffer = unsafe { self.device.register_host_memory(base, len_bytes)? };
        Ok(Region {
            buffer,
            base: ptr as usize,
            len_bytes,
        })
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// The device buffer and offset of a tier slot's block bytes.
    fn locate(&self, tier: Tier, slot: u32) -> (DeviceBuffer, u64) {
        match tier {
            Tier::Hbm => {
                let region = self.hbm.expect("G1 blocks imply a G1 arena");
                let offset = slot as usize * self.stores.block_bytes;
                assert!(offset + self.stores.block_bytes <= region.len_bytes);
                (region.buffer, offset as u64)
            }
            Tier::Host => {
                let addr = self.stores.host.slot_ptr(slot) as usize + SLOT_HEADER_BYTES;
                let region = self
                    .host_regions
                    .iter()
                    .find(|r| addr >= r.base && addr < r.base + r.len_bytes)
                    .expect("every host slot lies in a registered region");
                (region.buffer, (addr - region.base) as u64)
            }
            Tier::Nvme => unreachable!("engine copies run between memory tiers"),
        }
    }

    /// Gathers engine pages `pages[k]` into the reserved host slots of `stores[k]` and
    /// waits for the copies.
    pub fn gather(
        &self,
        engine: EngineTarget,
        pages: &[u32],
        stores: &[StoreItem],
    ) -> Result<(), MoveError> {
        assert_eq!(pages.len(), stores.len(), "one page per block");
        let bb = self.stores.block_bytes;
        for (k, (item, &page)) in stores.iter().zip(pages).enumerate() {
            let (buffer, offset) = self.locate(Tier::Host, item.host_slot);
            self.device
                .gather(
                    engine.stream,
                    engine.buffer,
                    engine.layout,
                    &[page],
                    buffer.range(offset as usize, bb),
                )
                .map_err(|source| MoveError::Device { index: k, source })?;
        }
        self.device
            .sync_stream(engine.stream)
            .map_err(|source| MoveError::Device { index: 0, source })
    }

    /// Scatters each item's block into engine page `pages[k]` and waits for the copies.
    pub fn scatter(
        &self,
        engine: EngineTarget,
        pages: &[u32],
        items: &[LoadItem],
    ) -> Result<(), MoveError> {
        assert_eq!(pages.len(), items.len(), "one page per block");
        let bb = self.stores.block_bytes;
        for (k, (item, &page)) in items.iter().zip(pages).enumerate() {
            let (buffer, offset) = self.locate(item.tier, item.slot);
            self.device
                .scatter(
                    engine.stream,
                    engine.buffer,
                    engine.layout,
                    &[page],
                    buffer.range(offset as usize, bb),
                )
                .map_err(|source| MoveError::Device { index: k, source })?;
        }
        self.device
            .sync_stream(engine.stream)
            .map_err(|source| MoveError::Device { index: 0, source })
    }

    /// Host bytes of a memory tier's slot (tools and tests that are their own engine).
    fn slot_bytes_ptr(&self, tier: Tier, slot: u32) -> *mut u8 {
        match tier {
            Tier::Hbm => self
                .stores
                .hbm
                .as_ref()
                .and_then(|a| a.host_ptr(slot))
                .expect("a host-addressable G1 slot"),
            _ => self
                .stores
                .host
                .slot_ptr(slot)
                .wrapping_add(SLOT_HEADER_BYTES),
        }
    }

    /// Fills the reserved host slots of `stores` with `fill(k, bytes)` (the caller is the
    /// engine: tools and tests).
    pub fn fill_with<E: Into<BoxError>>(
        &self,
        stores: &[StoreItem],
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<(), MoveError> {
        for (k, item) in stores.iter().enumerate() {
            let p = self.slot_bytes_ptr(Tier::Host, item.host_slot);
            // SAFETY: the slot is reserved for this save: no one else reads or writes it
            // until the plan is committed; block_bytes lie inside the slot.
            let data = unsafe { std::slice::from_raw_parts_mut(p, self.stores.block_bytes) };
            fill(k, data).map_err(|e| MoveError::Caller {
                index: k,
                source: e.into(),
            })?;
        }
        Ok(())
    }

    /// Hands each item's block bytes to `drain(k, bytes)`, in order.
    pub fn drain_with<E: Into<BoxError>>(
        &self,
        items: &[LoadItem],
        mut drain: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), MoveError> {
        for (k, item) in items.iter().enumerate() {
            let p = self.slot_bytes_ptr(item.tier, item.slot);
            // SAFETY: the block is held busy by the load plan (readers only, no eviction)
            // until it is committed.
            let data = unsafe { std::slice::from_raw_parts(p, self.stores.block_bytes) };
            drain(k, data).map_err(|e| MoveError::Caller {
                index: k,
                source: e.into(),
            })?;
        }
        Ok(())
    }

    /// Copies blocks between memory tiers (promotion), one batched copy per pair of
    /// buffers, and waits for it.
    pub fn copy_tiers(&self, stream: StreamId, copies: &[TierCopy]) -> Result<(), DeviceError> {
        let bb = self.stores.block_bytes as u64;
        let mut groups: Vec<(DeviceBuffer, DeviceBuffer, Vec<kvp_copy_desc>)> = Vec::new();
        for c in copies {
            let (src, src_offset) = self.locate(c.from.0, c.from.1);
            let (dst, dst_offset) = self.locate(c.to.0, c.to.1);
            let desc = kvp_copy_desc {
                src_offset,
                dst_offset,
                bytes: bb,
            };
            match groups.iter_mut().find(|g| g.0 == src && g.1 == dst) {
                Some(g) => g.2.push(desc),
                None => groups.push((src, dst, vec![desc])),
            }
        }
        for (src, dst, descs) in &groups {
            self.device.copy_batch(stream, *src, *dst, descs)?;
        }
        self.device.sync_stream(stream)
    }

    /// Writes host slots to their NVMe slots (the header page, with the data checksum and
    /// MAC, is made right before each write is submitted, overlapping the writes in
    /// flight). One result per write.
    pub fn write_nvme(&self, writes: &[NvmeWrite]) -> Vec<Result<(), NvmeError>> {
        let mut results = Vec::with_capacity(writes.len());
        if writes.is_empty() {
            return results;
        }
        let store = self.stores.nvme.as_ref().expect("NVMe tier configured");
        let host = &self.stores.host;
        let ios: Vec<(u32, *mut u8)> = writes
            .iter()
            .map(|w| (w.nvme_slot, host.slot_ptr(w.host_slot)))
            .collect();
        let prepare = |i: usize| {
            let w = writes[i];
            let header = SlotHeader {
                namespace: w.key.namespace,
                hash: w.key.hash,
                parent: w.parent,
                length: 0,
                generation: w.generation,
                data_checksum: 0,
                data_mac: [0; 32],
            };
            // SAFETY: the registry holds the block busy or pending (no writer of its data),
            // and only this write touches its header page (one NVMe copy of a block in
            // flight); each item is prepared once, by one thread.
            let (page, data) = unsafe { (host.header_mut(w.host_slot), host.data(w.host_slot)) };
            store.encode_header(page, data, header);
        };
        // SAFETY: host slots are valid for slot_bytes and not written by anyone during the
        // I/O (see above).
        unsafe { store.write_slots_with(&ios, &prepare, &mut results) };
        results
    }

    /// Reads NVMe slots into their reserved host slots, each verified (key, namespace,
    /// hash, generation, checksum, MAC) as soon as its read completes while the others
    /// are in flight. One result per read.
    pub fn read_nvme(&self, reads: &[NvmeRead]) -> Vec<Result<(), NvmeError>> {
        let mut results = Vec::with_capacity(reads.len());
        if reads.is_empty() {
            return results;
        }
        let store = self
            .stores
            .nvme
            .as_ref()
            .expect("NVMe blocks imply an NVMe tier");
        let host = &self.stores.host;
        let ios: Vec<(u32, *mut u8)> = reads
            .iter()
            .map(|r| (r.nvme_slot, host.slot_ptr(r.host_slot)))
            .collect();
        let mut verified: Vec<Option<Result<(), NvmeError>>> =
            (0..reads.len()).map(|_| None).collect();
        let mut check = |k: usize| {
            let r = reads[k];
            // SAFETY: reserved for this load; the read of this slot completed.
            let buf = unsafe { std::slice::from_raw_parts(ios[k].1, store.slot_bytes()) };
            verified[k] = Some(
                store
                    .verify(r.nvme_slot, buf, r.key.namespace, r.key.hash, r.generation)
                    .map(|_| ()),
            );
        };
        // SAFETY: each host slot is reserved (pending) for this load alone.
        unsafe { store.read_slots_with(&ios, &mut check, &mut results) };
        results
            .into_iter()
            .zip(verified)
            .map(|(io, verdict)| {
                io.and_then(|()| {
                    verdict.unwrap_or_else(|| {
                        Err(NvmeError::Corrupt {
                            slot: u32::MAX,
                            reason: "read completed but was not verified".into(),
                        })
                    })
                })
            })
            .collect()
    }

    /// Erases the headers of NVMe slots (dropped or corrupt blocks), so a restart does not
    /// bring them back. Best effort: a failure is logged, the slot is overwritten on reuse.
    pub fn erase_nvme(&self, slots: &[u32]) {
        if let (false, Some(store)) = (slots.is_empty(), &self.stores.nvme) {
            store.tombstone(slots);
        }
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        for r in self.host_regions.iter().chain(self.hbm.iter()) {
            if let Err(e) = self.device.free(r.buffer) {
                tracing::warn!(error = %e, "unregistering tier memory from the device");
            }
        }
    }
}
