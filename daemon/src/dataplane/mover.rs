//! The mover: the only code that moves block bytes. It executes the block manager's plans
//! (`crate::block::plan`) on the `Device` (engine pages <-> tier slots, one gather or
//! scatter launch per tier buffer of a batch; tier <-> tier, one batched copy) and on the
//! NVMe store (one batch of writes, reads or header erasures), and reports what landed.
//! It never touches the registry: the block manager commits the outcomes.

use std::sync::Arc;

use kvplane_cuda::{Device, DeviceBuffer, DeviceError, EventId, LayoutId, StreamId};
use kvplane_ffi::kvp_copy_desc;
use kvplane_kernels::KernelError;

use crate::block::plan::{HbmCopy, LoadItem, NvmeRead, NvmeWrite, StoreItem, TierCopy};
use crate::tier::nvme::NvmeError;
use crate::tier::nvme::header::SlotHeader;
use crate::tier::{G1Direction, Stores, Tier};

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

/// An engine's KV memory as the device sees it: the registered buffer, the uploaded
/// layout, the stream its copies run on, and the event recorded after each batch (its
/// completion is what the data-plane thread polls).
#[derive(Debug, Clone, Copy)]
pub struct EngineTarget {
    pub buffer: DeviceBuffer,
    pub layout: LayoutId,
    pub stream: StreamId,
    pub event: EventId,
}

/// Reusable vectors of one caller (a session), so steady-state batches do not allocate.
#[derive(Debug, Default)]
pub struct MoveScratch {
    /// The device buffer and offset of each block of the batch.
    buffers: Vec<DeviceBuffer>,
    offsets: Vec<u64>,
    /// One launch's page ids and offsets, when a batch spans buffers.
    group_pages: Vec<u32>,
    group_offsets: Vec<u64>,
}

/// Executes plans on the tiers' device and the NVMe store. Shared by every data-plane
/// thread: it holds no per-operation state (scratch belongs to the caller's session).
pub struct Mover {
    stores: Arc<Stores>,
}

impl std::fmt::Debug for Mover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mover")
            .field("device", &self.stores.device.describe())
            .finish()
    }
}

/// Runs the items of `items` that are G1's (`in_g1`) through `g1` (only if there are
/// any) and the others through `host`, one batch each; one result per item, in order.
fn split_by_g1<T: Copy, R>(
    items: &[T],
    in_g1: impl Fn(&T) -> bool,
    g1: impl FnOnce(&[T]) -> Vec<R>,
    host: impl FnOnce(&[T]) -> Vec<R>,
) -> Vec<R> {
    let (on_g1, on_host): (Vec<T>, Vec<T>) = items.iter().partition(|t| in_g1(t));
    let mut g1_results = match on_g1.is_empty() {
        true => Vec::new(),
        false => g1(&on_g1),
    }
    .into_iter();
    let mut host_results = host(&on_host).into_iter();
    items
        .iter()
        .map(|t| {
            let next = match in_g1(t) {
                true => g1_results.next(),
                false => host_results.next(),
            };
            next.expect("one result per item")
        })
        .collect()
}

/// A failed `Device::read_file` / `write_file` of an NVMe slot: the disk's failure (EIO,
/// ENOSPC, a file cut short) is an I/O error of the slot, as the NVMe engine would report
/// it; anything else is the device's.
fn slot_error(
    store: &crate::tier::nvme::NvmeStore,
    op: &'static str,
    slot: u32,
    e: DeviceError,
) -> NvmeError {
    match e {
        DeviceError::FileRead { source, .. } | DeviceError::FileWrite { source, .. } => {
            store.io_failure(op, slot, source)
        }
        source => NvmeError::Device { slot, source },
    }
}

/// Where a planned slot of a memory tier lies on the device.
fn slot_of(stores: &Stores, tier: Tier, slot: u32) -> (DeviceBuffer, u64) {
    stores
        .memory_tier(tier)
        .and_then(|s| s.slot_at(slot))
        .expect("a planned slot of a configured memory tier")
}

impl Mover {
    pub fn new(stores: Arc<Stores>) -> Self {
        Mover { stores }
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.stores.device
    }

    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// Queues the gather of engine pages `pages[k]` into the reserved host slots of
    /// `stores[k]` (one launch) on the engine's stream; it is done once [`Mover::landed`]
    /// says so after a [`Mover::record`], or after [`Mover::wait`].
    ///
    /// `hbm` lists blocks that also go to G1: `pages` then holds the page of each store,
    /// followed by the page of each G1 copy (the launch into G1 is a device-to-device
    /// gather on a GPU).
    pub fn launch_gather(
        &self,
        engine: EngineTarget,
        pages: &[u32],
        stores: &[StoreItem],
        hbm: &[HbmCopy],
        scratch: &mut MoveScratch,
    ) -> Result<(), MoveError> {
        assert_eq!(
            pages.len(),
            stores.len() + hbm.len(),
            "one page per block and per G1 copy"
        );
        let slots = stores
            .iter()
            .map(|s| (Tier::Host, s.host_slot))
            .chain(hbm.iter().map(|c| (Tier::Hbm, c.hbm_slot)));
        self.paged(engine, pages, slots, scratch, true)
    }

    /// Queues the scatter of each item's block into engine page `pages[k]` (one launch
    /// per tier the blocks are in) on the engine's stream; done as for
    /// [`Mover::launch_gather`].
    pub fn launch_scatter(
        &self,
        engine: EngineTarget,
        pages: &[u32],
        items: &[LoadItem],
        scratch: &mut MoveScratch,
    ) -> Result<(), MoveError> {
        assert_eq!(pages.len(), items.len(), "one page per block");
        let slots = items.iter().map(|i| (i.tier, i.slot));
        self.paged(engine, pages, slots, scratch, false)
    }

    /// One gather (`to_slots`) or scatter launch per device buffer between engine pages
    /// and tier slots (one for the whole batch unless its slots span tiers, a load from
    /// G1 and G2, or a pool registered in several chunks). Nothing waits here.
    fn paged(
        &self,
        engine: EngineTarget,
        pages: &[u32],
        slots: impl Iterator<Item = (Tier, u32)>,
        scratch: &mut MoveScratch,
        to_slots: bool,
    ) -> Result<(), MoveError> {
        let device = &self.stores.device;
        scratch.buffers.clear();
        scratch.offsets.clear();
        for (tier, slot) in slots {
            let (buffer, offset) = slot_of(&self.stores, tier, slot);
            scratch.buffers.push(buffer);
            scratch.offsets.push(offset);
        }
        let Some(&first) = scratch.buffers.first() else {
            return Ok(());
        };
        let launch = |buffer, pages: &[u32], offsets: &[u64], index| {
            let (stream, kv, layout) = (engine.stream, engine.buffer, engine.layout);
            if to_slots {
                device.gather_to_slots(stream, kv, layout, pages, buffer, offsets)
            } else {
                device.scatter_from_slots(stream, kv, layout, pages, buffer, offsets)
            }
            .map_err(|source| MoveError::Device { index, source })
        };
        if scratch.buffers.iter().all(|b| *b == first) {
            launch(first, pages, &scratch.offsets, 0)?;
        } else {
            for k in 0..scratch.buffers.len() {
                let buffer = scratch.buffers[k];
                if scratch.buffers[..k].contains(&buffer) {
                    continue; // launched with the first block in this buffer
                }
                scratch.group_pages.clear();
                scratch.group_offsets.clear();
                let rest = scratch.buffers[k..].iter().zip(&scratch.offsets[k..]);
                for ((&b, &offset), &page) in rest.zip(&pages[k..]) {
                    if b == buffer {
                        scratch.group_pages.push(page);
                        scratch.group_offsets.push(offset);
                    }
                }
                launch(buffer, &scratch.group_pages, &scratch.group_offsets, k)?;
            }
        }
        Ok(())
    }

    /// Records one of the engine's IPC events after the work queued on its stream (the
    /// engine's stream waits on it before reading what was copied).
    pub fn signal_engine(&self, engine: EngineTarget, event: EventId) -> Result<(), MoveError> {
        self.stores
            .device
            .record_event_on(engine.stream, event)
            .map_err(|source| MoveError::Device { index: 0, source })
    }

    /// Records the engine's event after the work queued on its stream so far.
    pub fn record(&self, engine: EngineTarget) -> Result<(), MoveError> {
        self.stores
            .device
            .record_event_on(engine.stream, engine.event)
            .map_err(|source| MoveError::Device { index: 0, source })
    }

    /// Whether the work before the engine's last [`Mover::record`] is done (never waits:
    /// a data-plane thread polls this between its other sessions). An error is the
    /// work's failure, reported against the batch's first block.
    pub fn landed(&self, engine: EngineTarget) -> Result<bool, MoveError> {
        self.stores
            .device
            .query_event(engine.event)
            .map_err(|source| MoveError::Device { index: 0, source })
    }

    /// Blocks until the work queued on the engine's stream is done (the I/O executors,
    /// tools and tests; never a data-plane thread).
    pub fn wait(&self, engine: EngineTarget) -> Result<(), MoveError> {
        self.stores
            .device
            .sync_stream(engine.stream)
            .map_err(|source| MoveError::Device { index: 0, source })
    }

    /// Fills the reserved host slots of `stores` with `fill(k, bytes)` (the caller is the
    /// engine: tools and tests).
    pub fn fill_with<E: Into<BoxError>>(
        &self,
        stores: &[StoreItem],
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<(), MoveError> {
        for (k, item) in stores.iter().enumerate() {
            // SAFETY: the slot is reserved for this save: no one else reads or writes it
            // until the plan is committed.
            let data = unsafe {
                &mut self.stores.host.data_mut(item.host_slot)[..self.stores.block_bytes]
            };
            fill(k, data).map_err(|e| MoveError::Caller {
                index: k,
                source: e.into(),
            })?;
        }
        Ok(())
    }

    /// Hands each item's block bytes to `drain(k, bytes)`, in order. Blocks in G1 are
    /// first copied to host memory through the device (`stream`), as a GPU's would be.
    pub fn drain_with<E: Into<BoxError>>(
        &self,
        stream: StreamId,
        items: &[LoadItem],
        mut drain: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), MoveError> {
        let bb = self.stores.block_bytes;
        let mut staged: Vec<u8> = Vec::new();
        for (k, item) in items.iter().enumerate() {
            let data: &[u8] = match item.tier {
                Tier::Host => {
                    // SAFETY: the block is held busy by the load plan (readers only, no
                    // eviction) until it is committed.
                    unsafe { &self.stores.host.data(item.slot)[..bb] }
                }
                tier => {
                    let (buffer, offset) = slot_of(&self.stores, tier, item.slot);
                    staged.resize(bb, 0);
                    self.stores
                        .device
                        .copy_to_host(stream, buffer.range(offset as usize, bb), &mut staged)
                        .map_err(|source| MoveError::Device { index: k, source })?;
                    &staged
                }
            };
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
            let (src, src_offset) = slot_of(&self.stores, c.from.0, c.from.1);
            let (dst, dst_offset) = slot_of(&self.stores, c.to.0, c.to.1);
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
            self.stores.device.copy_batch(stream, *src, *dst, descs)?;
        }
        self.stores.device.sync_stream(stream)
    }

    /// Writes blocks to their NVMe slots: host slots through the NVMe engine
    /// ([`Self::write_host_to_nvme`]), G1 slots straight from G1
    /// ([`Self::write_g1_to_nvme`], on `stream`). One result per write, in order.
    pub fn write_nvme(
        &self,
        stream: Option<StreamId>,
        writes: &[NvmeWrite],
    ) -> Vec<Result<(), NvmeError>> {
        split_by_g1(
            writes,
            |w| w.from.0 == Tier::Hbm,
            |g1| {
                self.write_g1_to_nvme(
                    stream.expect("G1 blocks are written to NVMe only while making G1 room"),
                    g1,
                )
            },
            |host| self.write_host_to_nvme(host),
        )
    }

    /// Writes host slots to their NVMe slots (the header page, with the data checksum and
    /// MAC, is made right before each write is submitted, overlapping the writes in
    /// flight). One result per write.
    fn write_host_to_nvme(&self, writes: &[NvmeWrite]) -> Vec<Result<(), NvmeError>> {
        let mut results = Vec::with_capacity(writes.len());
        if writes.is_empty() {
            return results;
        }
        let store = self.stores.nvme.as_ref().expect("NVMe tier configured");
        let host = &self.stores.host;
        let slot = |w: &NvmeWrite| {
            assert_eq!(w.from.0, Tier::Host, "a host block");
            w.from.1
        };
        let ios: Vec<(u32, *mut u8)> = writes
            .iter()
            .map(|w| (w.nvme_slot, host.slot_ptr(slot(w))))
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
            let (page, data) = unsafe { (host.header_mut(slot(&w)), host.data(slot(&w))) };
            store.encode_header(page, data, header);
        };
        // SAFETY: host slots are valid for slot_bytes and not written by anyone during the
        // I/O (see above).
        unsafe { store.write_slots_with(&ios, &prepare, &mut results) };
        results
    }

    /// Reads NVMe slots into their reserved slots and verifies each (key, namespace,
    /// hash, generation, checksum, MAC): host slots through the NVMe engine
    /// ([`Self::read_nvme`]), G1 slots straight from the file ([`Self::read_nvme_to_g1`],
    /// on `stream`). One result per read, in order.
    pub fn read_staged(
        &self,
        stream: Option<StreamId>,
        reads: &[NvmeRead],
    ) -> Vec<Result<(), NvmeError>> {
        split_by_g1(
            reads,
            |r| r.tier == Tier::Hbm,
            |g1| {
                self.read_nvme_to_g1(
                    stream.expect("G1 staging is planned only for a load with a stream"),
                    g1,
                )
            },
            |host| self.read_nvme(host),
        )
    }

    /// Reads NVMe slots straight into their reserved G1 slots (GPUDirect Storage on the
    /// cuda backend): the header pages through the NVMe engine, checked on the CPU (MAC,
    /// key, generation, length), then each block's data with `Device::read_file`, then
    /// the checksum and MAC of every block that arrived, computed on the device in one
    /// batch each and compared with its header. Nothing read here is served unless all
    /// of that passed. One result per read.
    pub fn read_nvme_to_g1(
        &self,
        stream: StreamId,
        reads: &[NvmeRead],
    ) -> Vec<Result<(), NvmeError>> {
        let store = self
            .stores
            .nvme
            .as_ref()
            .expect("NVMe blocks imply an NVMe tier");
        let bb = self.stores.block_bytes;
        let expect: Vec<(u32, u32, u64, u64)> = reads
            .iter()
            .map(|r| (r.nvme_slot, r.key.namespace, r.key.hash, r.generation))
            .collect();
        let epoch = self.stores.backoff(G1Direction::NvmeToG1).epoch();
        let headers = store.read_headers(&expect);
        let device = &self.stores.device;
        let g1_slots: Vec<(DeviceBuffer, u64)> = reads
            .iter()
            .map(|r| slot_of(&self.stores, Tier::Hbm, r.slot))
            .collect();
        // Data of the blocks whose header passed, straight into their G1 slots.
        let mut landed: Vec<Result<SlotHeader, NvmeError>> = reads
            .iter()
            .zip(headers)
            .zip(&g1_slots)
            .map(|((r, header), &(buffer, offset))| {
                let h = header?;
                let (fd, file_offset) = store.data_at(r.nvme_slot);
                device
                    .read_file(stream, buffer.range(offset as usize, bb), fd, file_offset)
                    .map_err(|e| slot_error(store, "read into G1", r.nvme_slot, e))?;
                Ok(h)
            })
            .collect();
        // Checksums and MACs where the blocks landed: one batch per G1 buffer.
        let arrived: Vec<usize> = (0..reads.len()).filter(|&k| landed[k].is_ok()).collect();
        let sums = self.g1_sums(stream, &g1_slots, &arrived, store.data_mac_key());
        for (k, sums) in sums.into_iter().enumerate() {
            let (Some(sums), Ok(h)) = (sums, &landed[k]) else {
                continue;
            };
            let slot = reads[k].nvme_slot;
            let checked = match sums {
                Ok((checksum, mac)) => store.check_sums(slot, h, checksum, &mac),
                // Unchecked blocks are never served.
                Err(detail) => Err(NvmeError::Device {
                    slot,
                    source: DeviceError::Driver {
                        op: "checksum and MAC of blocks read into G1",
                        detail,
                    },
                }),
            };
            if let Err(e) = checked {
                landed[k] = Err(e);
            }
        }
        self.note_g1_failure(&landed, G1Direction::NvmeToG1, epoch);
        landed.into_iter().map(|r| r.map(|_| ())).collect()
    }

    /// Writes G1 slots straight to their NVMe slots (GPUDirect Storage on the cuda
    /// backend): each block's checksum and MAC computed on the device in one batch per
    /// G1 buffer, the slot's old header erased (a slot whose erasure failed is not
    /// written: a daemon crash part-way then leaves no header rather than the previous
    /// block's over new data; a power loss that reorders the disk's cache is caught by
    /// the data checksum and MAC on load), the data written with `Device::write_file`,
    /// then the header pages, sealed on the CPU, in one batch. One result per write.
    pub fn write_g1_to_nvme(
        &self,
        stream: StreamId,
        writes: &[NvmeWrite],
    ) -> Vec<Result<(), NvmeError>> {
        let store = self.stores.nvme.as_ref().expect("NVMe tier configured");
        let bb = self.stores.block_bytes;
        let device = &self.stores.device;
        let g1_slots: Vec<(DeviceBuffer, u64)> = writes
            .iter()
            .map(|w| {
                assert_eq!(w.from.0, Tier::Hbm, "a G1 block");
                slot_of(&self.stores, Tier::Hbm, w.from.1)
            })
            .collect();
        let epoch = self.stores.backoff(G1Direction::G1ToNvme).epoch();
        let all: Vec<usize> = (0..writes.len()).collect();
        let sums = self.g1_sums(stream, &g1_slots, &all, store.data_mac_key());
        let nvme_slots: Vec<u32> = writes.iter().map(|w| w.nvme_slot).collect();
        let cleared = store.clear_headers(&nvme_slots);
        let mut written: Vec<Result<(u32, SlotHeader), NvmeError>> = writes
            .iter()
            .zip(sums)
            .zip(&g1_slots)
            .zip(cleared)
            .map(|(((w, sums), &(buffer, offset)), cleared)| {
                // Data is never written over a header that may still name another block.
                cleared?;
                let (checksum, mac) =
                    sums.expect("every block summed")
                        .map_err(|detail| NvmeError::Device {
                            slot: w.nvme_slot,
                            source: DeviceError::Driver {
                                op: "checksum and MAC of G1 blocks written to NVMe",
                                detail,
                            },
                        })?;
                let (fd, file_offset) = store.data_at(w.nvme_slot);
                device
                    .write_file(stream, buffer.range(offset as usize, bb), fd, file_offset)
                    .map_err(|e| slot_error(store, "write from G1", w.nvme_slot, e))?;
                Ok((
                    w.nvme_slot,
                    SlotHeader {
                        namespace: w.key.namespace,
                        hash: w.key.hash,
                        parent: w.parent,
                        length: bb as u64,
                        generation: w.generation,
                        data_checksum: checksum,
                        data_mac: mac,
                    },
                ))
            })
            .collect();
        let headers: Vec<(u32, SlotHeader)> = written
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        let mut sealed = store.write_headers(&headers).into_iter();
        for r in written.iter_mut() {
            if r.is_ok() {
                let header = sealed.next().expect("one result per header");
                if let Err(e) = header {
                    *r = Err(e);
                }
            }
        }
        self.note_g1_failure(&written, G1Direction::G1ToNvme, epoch);
        written.into_iter().map(|r| r.map(|_| ())).collect()
    }

    /// Checksums and MACs (under `key`) of the G1 slots `slots[k]` for each k in
    /// `which`, computed on the device, one batch per G1 buffer: entry k is `None` for a
    /// slot not asked for, else its sums or why the device could not compute them.
    #[allow(clippy::type_complexity)]
    fn g1_sums(
        &self,
        stream: StreamId,
        slots: &[(DeviceBuffer, u64)],
        which: &[usize],
        key: &[u8; 32],
    ) -> Vec<Option<Result<(u64, [u8; 32]), String>>> {
        let bb = self.stores.block_bytes as u64;
        let device = &self.stores.device;
        let mut out: Vec<Option<Result<(u64, [u8; 32]), String>>> = vec![None; slots.len()];
        let mut groups: Vec<(DeviceBuffer, Vec<usize>)> = Vec::new();
        for &k in which {
            let buffer = slots[k].0;
            match groups.iter_mut().find(|g| g.0 == buffer) {
                Some(g) => g.1.push(k),
                None => groups.push((buffer, vec![k])),
            }
        }
        for (buffer, members) in groups {
            let descs: Vec<kvp_copy_desc> = members
                .iter()
                .map(|&k| kvp_copy_desc {
                    src_offset: slots[k].1,
                    dst_offset: 0,
                    bytes: bb,
                })
                .collect();
            let sums = device
                .checksum(stream, buffer, &descs)
                .and_then(|c| Ok((c, device.mac(stream, buffer, &descs, key)?)));
            match sums {
                Ok((checksums, macs)) => {
                    for (j, &k) in members.iter().enumerate() {
                        out[k] = Some(Ok((checksums[j], macs[j])));
                    }
                }
                Err(e) => {
                    let detail = e.to_string();
                    for &k in &members {
                        out[k] = Some(Err(detail.clone()));
                    }
                }
            }
        }
        out
    }

    /// Turns `direction` of the direct NVMe <-> G1 path off for a while (logged once
    /// per back-off) when any block failed on the device in an operation that began in
    /// `epoch`: meanwhile loads or G1 victims go through the host tier. When none failed
    /// on the device and some block moved, the path works: a back-off is over.
    fn note_g1_failure<T>(
        &self,
        results: &[Result<T, NvmeError>],
        direction: G1Direction,
        epoch: u64,
    ) {
        let backoff = self.stores.backoff(direction);
        let device_error = results.iter().find_map(|r| match r {
            Err(e @ NvmeError::Device { .. }) => Some(e),
            _ => None,
        });
        match device_error {
            Some(e) => {
                if let Some(wait) = backoff.failed(epoch) {
                    tracing::warn!(
                        error = %e,
                        ?direction,
                        failures_in_a_row = backoff.failures(),
                        "moving blocks straight between NVMe and G1 failed on the device; \
                         for the next {} s they go this way through the pinned host tier \
                         (MACs checked on the CPU), then the direct path is tried again",
                        wait.as_secs().max(1)
                    );
                }
            }
            None if results.iter().any(|r| r.is_ok()) && backoff.worked(epoch) => {
                tracing::info!(
                    ?direction,
                    "the direct NVMe <-> G1 path works again this way: back on"
                );
            }
            None => {}
        }
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
            .map(|r| (r.nvme_slot, host.slot_ptr(r.slot)))
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
