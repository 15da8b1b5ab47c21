//! `BlockManager`: the registry plus the three tiers, with the operations the session code
//! calls from data-plane threads. `Send + Sync`; one mutex guards the registry and is held
//! only for bookkeeping (never across a copy or an I/O). Bytes move outside the lock into
//! slots the registry has reserved (one writer) or holds busy (readers only).
//!
//! Policy (see `daemon/BLOCKS.md`):
//! - saves land in G2 (pinned host). When G2 is full its eviction candidate (a leaf, lowest
//!   priority, least recently used) is *demoted* to G3 if NVMe admission accepts it: it has
//!   been seen at least `nvme_admit_min_hits` times after its first save (lookup hits,
//!   loads, repeated saves). Blocks seen once are dropped instead, so one-off prompts do not
//!   churn the disk. `write_through` saves write G3 at save time regardless of admission.
//! - loads serve from the fastest tier; a block only on G3 is staged into G2 (checksum
//!   verified; a corrupt slot is dropped and reported, never served).
//! - G1 is filled by `promote` from G2; evicting from G1 drops that copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam::channel::Sender;
use serde::Deserialize;

use super::registry::{BlockEvent, BlockKey, Registry, RemoveReason, SessionId};
use crate::tier::hbm::{DeviceArena, HostStandInArena};
use crate::tier::host::{HostError, HostPool, HostPoolReport};
use crate::tier::nvme::engine::FaultPlan;
use crate::tier::nvme::header::SlotHeader;
use crate::tier::nvme::{NvmeError, NvmeStore};
use crate::tier::{ConfigError, SLOT_HEADER_BYTES, Tier, TiersConfig, invalid};

/// `[blocks]`: block geometry and placement policy.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BlockConfig {
    /// Bytes of one block (all layers of `block_tokens` tokens), the slot payload size.
    pub block_bytes: usize,
    /// NVMe admission on demotion: sightings after the first save (lookup hits, loads,
    /// repeated saves) a block needs before it is worth a disk write. 0 admits everything.
    pub nvme_admit_min_hits: u32,
    /// Write every save through to NVMe before it completes (durable across restarts).
    pub write_through: bool,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            block_bytes: 2 << 20,
            nvme_admit_min_hits: 1,
            write_through: false,
        }
    }
}

impl BlockConfig {
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.block_bytes == 0 || self.block_bytes > 1 << 30 {
            return Err(invalid(
                &format!("{key}.block_bytes"),
                format!("must be in 1..=1073741824, got {}", self.block_bytes),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("config: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Nvme(#[from] NvmeError),
    #[error("G1 arena: {0}")]
    Hbm(#[source] std::io::Error),
    #[error("filling block {index} of the save: {source}")]
    Fill {
        index: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("draining block {index} of the load: {source}")]
    Drain {
        index: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Why a load stopped before the end of the chain.
#[derive(Debug, thiserror::Error)]
pub enum LoadFailure {
    #[error("block not stored")]
    Missing,
    #[error("no host slot free to stage the block (all leased or in use)")]
    NoSpace,
    #[error("another load is staging the block from NVMe right now; retry")]
    Busy,
    #[error("corrupt NVMe copy dropped: {0}")]
    Corrupt(NvmeError),
    #[error("NVMe read failed: {0}")]
    Io(NvmeError),
}

/// One block of [`BlockManager::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub namespace: u32,
    pub hash: u64,
    pub parent: Option<u64>,
    pub tiers: Vec<Tier>,
}

#[derive(Debug, Default)]
pub struct SaveReport {
    /// Blocks newly stored (in order: a leading run of the blocks that needed storing).
    pub stored: usize,
    /// Blocks already stored (or being stored by another session): skipped.
    pub already_present: usize,
    /// Blocks not stored because every slot was leased or in use.
    pub no_space: usize,
    pub bytes: u64,
    /// Blocks written to NVMe by this call (write-through and demotions it caused).
    pub nvme_written: usize,
    /// First NVMe error this call met (the operation went on without NVMe).
    pub nvme_error: Option<NvmeError>,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    /// Leading blocks handed to `drain`.
    pub loaded: usize,
    /// Tier each loaded block was found in (`Nvme` when it was staged through the host).
    pub tiers: Vec<Tier>,
    pub bytes: u64,
    /// Slowest tier used (`Tier::None` when nothing was loaded).
    pub slowest: Tier,
    /// Why the load stopped early, with the chain index, if it did.
    pub failure: Option<(usize, LoadFailure)>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DropReport {
    pub dropped: usize,
    /// Leased or in use: kept.
    pub busy: usize,
    pub missing: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TierStats {
    pub tier: Tier,
    /// What backs it, e.g. "host memory standing in for HBM (no GPU backend)".
    pub backing: String,
    pub slot_bytes: usize,
    pub capacity_slots: u32,
    pub used_slots: u32,
    /// Removals from this tier by reason name.
    pub removed: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BlockStats {
    pub block_bytes: usize,
    pub blocks: usize,
    pub tiers: Vec<TierStats>,
    pub lookup_hits: u64,
    pub lookup_misses: u64,
    pub saves_stored: u64,
    pub loads_served: u64,
    pub nvme_write_errors: u64,
    pub nvme_read_errors: u64,
    pub nvme_corrupt_dropped: u64,
    pub nvme_scan_valid: u64,
    pub nvme_scan_corrupt: u64,
    pub nvme_scan_duplicates: u64,
    pub nvme_engine: String,
    pub nvme_registered_buffers: bool,
    pub events_dropped: u64,
    pub host_pool: HostPoolReport,
    /// Namespaces with a quota.
    pub namespaces: Vec<NamespaceStats>,
}

/// Optional parts for tests and integration.
#[derive(Default)]
pub struct ManagerOptions {
    /// Wrap every NVMe engine in a fault injector driven by this plan.
    pub faults: Option<Arc<FaultPlan>>,
    /// Stored/removed events (try_send: a full channel drops events and counts them).
    pub events: Option<Sender<BlockEvent>>,
    /// Replace the G1 arena (the cuda backend's device arena).
    pub hbm: Option<Box<dyn DeviceArena>>,
    /// Per-namespace limits on each tier (`[[namespaces]]` in the config).
    pub quotas: Vec<NamespaceQuota>,
}

/// A namespace's limit per tier (HBM, host, NVMe) in bytes; `None` = no limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceQuota {
    pub namespace: u32,
    pub name: String,
    pub max_bytes: [Option<u64>; 3],
}

/// A namespace's limit and usage per tier, in slots (one block each).
#[derive(Clone, Debug, serde::Serialize)]
pub struct NamespaceStats {
    pub name: String,
    pub namespace: u32,
    /// HBM, host, NVMe; `None` = no limit.
    pub max_slots: [Option<u32>; 3],
    pub used_slots: [u32; 3],
}

#[derive(Default)]
struct Counters {
    saves_stored: AtomicU64,
    loads_served: AtomicU64,
    nvme_write_errors: AtomicU64,
    nvme_read_errors: AtomicU64,
    nvme_corrupt_dropped: AtomicU64,
    events_dropped: AtomicU64,
}

struct Demotion {
    key: BlockKey,
    parent: Option<u64>,
    host_slot: u32,
    nvme_slot: u32,
    generation: u64,
}

pub struct BlockManager {
    // Field order is drop order: the NVMe engines (which registered the host pool as fixed
    // buffers) go before the pool.
    nvme: Option<NvmeStore>,
    reg: Mutex<Registry>,
    hbm: Option<Box<dyn DeviceArena>>,
    host: HostPool,
    block_bytes: usize,
    admit_min_hits: u32,
    write_through: bool,
    events: Option<Sender<BlockEvent>>,
    counters: Counters,
    scan: (u64, u64, u64),
    /// Names of namespaces with a quota (for stats).
    quota_names: Vec<(u32, String)>,
}

/// Errors from a caller's fill/drain closure.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl BlockManager {
    /// Sets up all tiers (host pool mapped, touched and locked; NVMe opened and scanned,
    /// its blocks restored into the registry).
    pub fn new(
        block: &BlockConfig,
        tiers: &TiersConfig,
        options: ManagerOptions,
    ) -> Result<Self, BlockError> {
        block.validate("blocks")?;
        tiers.validate(block.block_bytes)?;
        let slot_bytes = crate::tier::nvme::slot_bytes(block.block_bytes);
        let host = HostPool::new(&tiers.host, slot_bytes)?;
        let hbm: Option<Box<dyn DeviceArena>> = match options.hbm {
            Some(a) => Some(a),
            None if tiers.hbm.capacity_bytes > 0 => Some(Box::new(
                HostStandInArena::new(tiers.hbm.capacity_bytes, block.block_bytes)
                    .map_err(BlockError::Hbm)?,
            )),
            None => None,
        };
        let (nvme, scan) = if tiers.nvme.paths.is_empty() {
            (None, None)
        } else {
            let (store, scan) = NvmeStore::open(
                &tiers.nvme,
                block.block_bytes,
                host.regions(1 << 30),
                options.faults,
            )?;
            (Some(store), Some(scan))
        };
        let caps = [
            hbm.as_ref().map(|a| a.slot_count()).unwrap_or(0),
            host.slot_count(),
            nvme.as_ref().map(|n| n.slot_count()).unwrap_or(0),
        ];
        let mut reg = Registry::new(caps);
        let mut quota_names = Vec::with_capacity(options.quotas.len());
        for q in &options.quotas {
            // Whole blocks: a limit below one block keeps the namespace out of the tier.
            let max_slots = q.max_bytes.map(|b| match b {
                Some(b) => u32::try_from(b / block.block_bytes as u64).unwrap_or(u32::MAX - 1),
                None => u32::MAX,
            });
            reg.set_quota(q.namespace, max_slots);
            quota_names.push((q.namespace, q.name.clone()));
        }
        let mut scan_counts = (0, 0, 0);
        if let Some(scan) = scan {
            let mut valid = scan.valid;
            valid.sort_unstable_by_key(|v| v.header.generation); // oldest first = LRU order
            scan_counts = (valid.len() as u64, scan.corrupt, scan.duplicates);
            for v in valid {
                let h = v.header;
                if let Err(e) = reg.restore(
                    BlockKey::new(h.namespace, h.hash),
                    h.parent,
                    Tier::Nvme,
                    v.slot,
                    h.generation,
                ) {
                    tracing::warn!(slot = v.slot, "NVMe scan: {e}");
                }
            }
            tracing::info!(
                blocks = scan_counts.0,
                corrupt = scan.corrupt,
                duplicates = scan.duplicates,
                old_format = scan.old_format,
                seconds = scan.seconds,
                "NVMe index rebuilt"
            );
        }
        reg.record_events = options.events.is_some();
        Ok(BlockManager {
            nvme,
            reg: Mutex::new(reg),
            hbm,
            host,
            block_bytes: block.block_bytes,
            admit_min_hits: block.nvme_admit_min_hits,
            write_through: block.write_through,
            events: options.events,
            counters: Counters::default(),
            scan: scan_counts,
            quota_names,
        })
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// fsyncs the NVMe tier through its open descriptors (graceful stop). One entry per
    /// failure; none without an NVMe tier.
    pub fn flush_nvme(&self) -> Vec<(std::path::PathBuf, std::io::Error)> {
        self.nvme
            .as_ref()
            .map(NvmeStore::sync_all)
            .unwrap_or_default()
    }

    pub fn host_pool(&self) -> &HostPool {
        &self.host
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic in a caller's closure never happens under this lock, so a poisoned lock
        // still guards consistent data.
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends recorded events (called with the lock held; try_send never blocks).
    fn flush_events(&self, reg: &mut Registry) {
        if let Some(tx) = &self.events {
            for ev in reg.drain_events() {
                if tx.try_send(ev).is_err() {
                    self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Leading blocks of the chain stored anywhere; `out_tiers[i]` = fastest tier of block i.
    pub fn lookup(&self, namespace: u32, hashes: &[u64], out_tiers: &mut [Tier]) -> usize {
        self.lock().lookup(namespace, hashes, out_tiers)
    }

    fn should_demote(&self, reg: &Registry, key: BlockKey) -> bool {
        self.nvme.is_some()
            && reg
                .view(key)
                .is_some_and(|v| v.present[2].is_none() && v.pending[2].is_none())
            && reg.seen(key) >= self.admit_min_hits
    }

    /// An NVMe slot for a block of `namespace`, evicting that namespace's own candidate
    /// when it is at its NVMe quota, else the tier's candidate when the tier is full.
    fn nvme_slot(&self, reg: &mut Registry, namespace: u32) -> Option<u32> {
        if reg.quota_room(namespace, Tier::Nvme) == 0 {
            let v = reg.victim_in(namespace, Tier::Nvme)?;
            reg.evict(v, Tier::Nvme, RemoveReason::Evicted).ok()?;
            return reg.alloc_free(Tier::Nvme);
        }
        if let Some(s) = reg.alloc_free(Tier::Nvme) {
            return Some(s);
        }
        let v = reg.victim(Tier::Nvme)?;
        reg.evict(v, Tier::Nvme, RemoveReason::Evicted).ok()?;
        reg.alloc_free(Tier::Nvme)
    }

    /// Gets up to `n` free slots of `tier` for blocks of `namespace` into `out`, evicting
    /// (and for the host tier, demoting admitted blocks to NVMe) as needed. Fewer when
    /// everything is leased. A namespace at its quota only ever evicts its own blocks.
    fn acquire(
        &self,
        tier: Tier,
        namespace: u32,
        n: usize,
        out: &mut Vec<u32>,
        report: &mut SaveReport,
    ) {
        for _round in 0..8 {
            let mut jobs: Vec<Demotion> = Vec::new();
            {
                let mut reg = self.lock();
                while out.len() + jobs.len() < n {
                    // After this round, own demotions will have freed their slots: the
                    // namespace then holds `used - own_jobs + out + jobs` slots.
                    let own_jobs = jobs.iter().filter(|j| j.key.namespace == namespace).count();
                    let at_quota = (out.len() + jobs.len() - own_jobs) as u64
                        >= u64::from(reg.quota_room(namespace, tier));
                    let v = if at_quota {
                        match reg.victim_in(namespace, tier) {
                            Some(v) => v,
                            None => break, // its own blocks are all leased or in use
                        }
                    } else {
                        if let Some(s) = reg.alloc_free(tier) {
                            out.push(s);
                            continue;
                        }
                        match reg.victim(tier) {
                            Some(v) => v,
                            None => break,
                        }
                    };
                    if tier == Tier::Host && self.should_demote(&reg, v) {
                        let view = reg.view(v).expect("victim exists");
                        let host_slot = view.present[1].expect("victim present");
                        if let Some(nvme_slot) = self.nvme_slot(&mut reg, v.namespace) {
                            let generation =
                                self.nvme.as_ref().map(|s| s.next_generation()).unwrap_or(0);
                            reg.reserve(v, view.parent, view.priority, Tier::Nvme, nvme_slot)
                                .expect("checked: no NVMe slot");
                            reg.begin_use(v);
                            jobs.push(Demotion {
                                key: v,
                                parent: view.parent,
                                host_slot,
                                nvme_slot,
                                generation,
                            });
                            continue;
                        }
                    }
                    let reason = if reg.view(v).is_some_and(|e| {
                        e.present
                            .iter()
                            .enumerate()
                            .any(|(t, s)| t > tier.index() && s.is_some())
                    }) {
                        RemoveReason::Demoted
                    } else {
                        RemoveReason::Evicted
                    };
                    reg.evict(v, tier, reason).expect("victim is evictable");
                }
                self.flush_events(&mut reg);
            }
            if jobs.is_empty() {
                return;
            }
            let results = self.write_nvme(
                jobs.iter()
                    .map(|j| (j.key, j.parent, j.host_slot, j.nvme_slot, j.generation)),
            );
            let mut reg = self.lock();
            for (job, result) in jobs.iter().zip(results) {
                reg.end_use(job.key);
                match result {
                    Ok(()) => {
                        reg.publish(job.key, Tier::Nvme, job.generation)
                            .expect("reserved");
                        report.nvme_written += 1;
                    }
                    Err(e) => {
                        reg.abort(job.key, Tier::Nvme).expect("reserved");
                        if report.nvme_error.is_none() {
                            report.nvme_error = Some(e);
                        }
                    }
                }
                // Evict even when the write failed: the host needs the space; the block is
                // a cache entry and the error is counted and reported.
                if out.len() < n && reg.evictable(job.key, Tier::Host) {
                    let reason = if reg.fastest(job.key) != Tier::Host
                        || reg.view(job.key).is_some_and(|v| v.present[2].is_some())
                    {
                        RemoveReason::Demoted
                    } else {
                        RemoveReason::IoError
                    };
                    if reg.evict(job.key, Tier::Host, reason).is_ok()
                        && let Some(s) = reg.alloc_free(Tier::Host)
                    {
                        out.push(s);
                    }
                }
            }
            self.flush_events(&mut reg);
            if out.len() >= n {
                return;
            }
        }
    }

    /// Writes host slots to NVMe slots (header page filled here). One result per item.
    fn write_nvme(
        &self,
        items: impl Iterator<Item = (BlockKey, Option<u64>, u32, u32, u64)>,
    ) -> Vec<Result<(), NvmeError>> {
        let store = self.nvme.as_ref().expect("NVMe tier configured");
        let jobs: Vec<(BlockKey, Option<u64>, u32, u32, u64)> = items.collect();
        let ios: Vec<(u32, *mut u8)> = jobs
            .iter()
            .map(|j| (j.3, self.host.slot_ptr(j.2)))
            .collect();
        // Headers (with the data checksum) are made right before each write is submitted,
        // overlapping the writes already in flight.
        let prepare = |i: usize| {
            let (key, parent, host_slot, _, generation) = jobs[i];
            let header = SlotHeader {
                namespace: key.namespace,
                hash: key.hash,
                parent,
                length: 0,
                generation,
                data_checksum: 0,
                data_mac: [0; 32],
            };
            // SAFETY: the registry holds the block busy or pending (no writer of its data),
            // and only this operation writes its header page (one NVMe copy in flight);
            // each item is prepared once, by one thread.
            let (page, data) =
                unsafe { (self.host.header_mut(host_slot), self.host.data(host_slot)) };
            store.encode_header(page, data, header);
        };
        let mut results = Vec::with_capacity(ios.len());
        // SAFETY: host slots valid for slot_bytes; not written by anyone during the I/O (see
        // above).
        unsafe { store.write_slots_with(&ios, &prepare, &mut results) };
        let errors = results.iter().filter(|r| r.is_err()).count() as u64;
        self.counters
            .nvme_write_errors
            .fetch_add(errors, Ordering::Relaxed);
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            tracing::warn!("NVMe write failed, block kept off NVMe: {r}");
        }
        results
    }

    /// Saves a chain of blocks: allocates host slots (evicting/demoting as policy says),
    /// calls `fill(i, bytes)` for each block to store (outside the lock), then publishes.
    /// Blocks already stored are skipped. With `write_through` (or the config's), stored
    /// blocks are also on NVMe before this returns.
    pub fn save<E, F>(
        &self,
        session: SessionId,
        namespace: u32,
        blocks: &[(u64, Option<u64>)],
        priority: u8,
        write_through: bool,
        mut fill: F,
    ) -> Result<SaveReport, BlockError>
    where
        E: Into<BoxError>,
        F: FnMut(usize, &mut [u8]) -> Result<(), E>,
    {
        let _ = session; // saves hold no lease; sessions pin explicitly
        let mut report = SaveReport::default();
        let mut need: Vec<usize> = Vec::with_capacity(blocks.len());
        {
            let mut reg = self.lock();
            for (i, &(h, _)) in blocks.iter().enumerate() {
                let key = BlockKey::new(namespace, h);
                match reg.view(key) {
                    Some(v)
                        if v.present
                            .iter()
                            .chain(v.pending.iter())
                            .any(|s| s.is_some()) =>
                    {
                        reg.touch(key);
                        report.already_present += 1;
                    }
                    _ => need.push(i),
                }
            }
        }
        let mut slots = Vec::with_capacity(need.len());
        self.acquire(Tier::Host, namespace, need.len(), &mut slots, &mut report);
        // Reserve in chain order; a block another session reserved meanwhile is skipped.
        let mut reserved: Vec<(usize, u32)> = Vec::with_capacity(slots.len());
        {
            let mut reg = self.lock();
            let mut spare = slots.into_iter();
            for &i in &need {
                let Some(slot) = spare.next() else {
                    report.no_space += 1;
                    continue;
                };
                let (h, parent) = blocks[i];
                match reg.reserve(
                    BlockKey::new(namespace, h),
                    parent,
                    priority,
                    Tier::Host,
                    slot,
                ) {
                    Ok(()) => reserved.push((i, slot)),
                    Err(_) => {
                        reg.free_unused(Tier::Host, slot);
                        report.already_present += 1;
                    }
                }
            }
            for slot in spare {
                reg.free_unused(Tier::Host, slot);
            }
        }
        // Fill outside the lock.
        for (n, &(i, slot)) in reserved.iter().enumerate() {
            // SAFETY: the slot is reserved for this call: no one else reads or writes it.
            let data = unsafe { &mut self.host.data_mut(slot)[..self.block_bytes] };
            if let Err(e) = fill(i, data) {
                let mut reg = self.lock();
                for &(j, _) in &reserved[n..] {
                    let _ = reg.abort(BlockKey::new(namespace, blocks[j].0), Tier::Host);
                }
                for &(j, _) in &reserved[..n] {
                    let _ = reg.abort(BlockKey::new(namespace, blocks[j].0), Tier::Host);
                }
                return Err(BlockError::Fill {
                    index: i,
                    source: e.into(),
                });
            }
        }
        // Write-through: NVMe copies before publishing.
        let mut nvme_done: Vec<Option<u64>> = vec![None; reserved.len()];
        if (write_through || self.write_through) && self.nvme.is_some() && !reserved.is_empty() {
            let mut jobs = Vec::new();
            {
                let mut reg = self.lock();
                for (n, &(i, slot)) in reserved.iter().enumerate() {
                    let Some(nvme_slot) = self.nvme_slot(&mut reg, namespace) else {
                        break;
                    };
                    let (h, parent) = blocks[i];
                    let key = BlockKey::new(namespace, h);
                    if reg
                        .reserve(key, parent, priority, Tier::Nvme, nvme_slot)
                        .is_err()
                    {
                        // The block reached NVMe meanwhile (the lock was released while the
                        // host copy was filled; an in-flight demotion can land it): its
                        // NVMe copy exists, so give the slot back rather than panic.
                        reg.free_unused(Tier::Nvme, nvme_slot);
                        continue;
                    }
                    let generation = self.nvme.as_ref().map(|s| s.next_generation()).unwrap_or(0);
                    jobs.push((n, (key, parent, slot, nvme_slot, generation)));
                }
                self.flush_events(&mut reg);
            }
            let results = self.write_nvme(jobs.iter().map(|j| j.1));
            let mut reg = self.lock();
            for ((n, job), r) in jobs.iter().zip(results) {
                match r {
                    Ok(()) => {
                        nvme_done[*n] = Some(job.4);
                        report.nvme_written += 1;
                    }
                    Err(e) => {
                        let _ = reg.abort(job.0, Tier::Nvme);
                        if report.nvme_error.is_none() {
                            report.nvme_error = Some(e);
                        }
                    }
                }
            }
        }
        {
            let mut reg = self.lock();
            for (n, &(i, _)) in reserved.iter().enumerate() {
                let key = BlockKey::new(namespace, blocks[i].0);
                reg.publish(key, Tier::Host, 0)
                    .expect("reserved by this call");
                if let Some(generation) = nvme_done[n] {
                    reg.publish(key, Tier::Nvme, generation)
                        .expect("reserved by this call");
                }
            }
            self.flush_events(&mut reg);
        }
        report.stored = reserved.len();
        report.bytes = (reserved.len() * self.block_bytes) as u64;
        self.counters
            .saves_stored
            .fetch_add(report.stored as u64, Ordering::Relaxed);
        Ok(report)
    }

    /// Loads the leading stored blocks of a chain: each block's bytes are handed to
    /// `drain(i, bytes)` (outside the lock) in chain order. Blocks only on NVMe are first
    /// staged into the host tier and verified.
    pub fn load<E, F>(
        &self,
        session: SessionId,
        namespace: u32,
        hashes: &[u64],
        mut drain: F,
    ) -> Result<LoadReport, BlockError>
    where
        E: Into<BoxError>,
        F: FnMut(usize, &[u8]) -> Result<(), E>,
    {
        let _ = session;
        let mut report = LoadReport {
            slowest: Tier::None,
            ..LoadReport::default()
        };
        // (tier served from, tier of the bytes, slot); staged blocks get their host slot later.
        let mut plan: Vec<(Tier, Tier, u32)> = Vec::with_capacity(hashes.len());
        let mut staged: Vec<usize> = Vec::new();
        {
            let mut reg = self.lock();
            for (i, &h) in hashes.iter().enumerate() {
                let key = BlockKey::new(namespace, h);
                let Some(v) = reg.view(key) else {
                    report.failure = Some((i, LoadFailure::Missing));
                    break;
                };
                let t = v.fastest();
                if t == Tier::None {
                    report.failure = Some((i, LoadFailure::Missing));
                    break;
                }
                reg.begin_use(key);
                reg.touch(key);
                if t == Tier::Nvme {
                    staged.push(i);
                    plan.push((Tier::Nvme, Tier::Host, u32::MAX));
                } else {
                    plan.push((t, t, v.present[t.index()].expect("present")));
                }
            }
        }
        // Staging NVMe -> host.
        if !staged.is_empty() {
            let mut dummy = SaveReport::default();
            let mut slots = Vec::with_capacity(staged.len());
            self.acquire(Tier::Host, namespace, staged.len(), &mut slots, &mut dummy);
            let mut reads = Vec::new();
            let mut read_idx = Vec::new();
            let mut cut = plan.len();
            {
                let mut reg = self.lock();
                let mut spare = slots.into_iter();
                for &i in &staged {
                    let key = BlockKey::new(namespace, hashes[i]);
                    let v = reg.view(key).expect("held busy");
                    if let Some(s) = v.present[1] {
                        // Another load staged it meanwhile.
                        plan[i] = (Tier::Nvme, Tier::Host, s);
                        continue;
                    }
                    let Some(slot) = spare.next() else {
                        cut = cut.min(i);
                        if report.failure.as_ref().is_none_or(|f| f.0 > i) {
                            report.failure = Some((i, LoadFailure::NoSpace));
                        }
                        break;
                    };
                    if reg
                        .reserve(key, v.parent, v.priority, Tier::Host, slot)
                        .is_err()
                    {
                        // Being staged by another load right now: stop here rather than wait
                        // (the engine retries; the block is not missing and space is not short).
                        reg.free_unused(Tier::Host, slot);
                        cut = cut.min(i);
                        report.failure = Some((i, LoadFailure::Busy));
                        break;
                    }
                    plan[i].2 = slot;
                    reads.push((
                        v.present[2].expect("on NVMe"),
                        self.host.slot_ptr(slot),
                        v.nvme_generation,
                    ));
                    read_idx.push(i);
                }
                for slot in spare {
                    reg.free_unused(Tier::Host, slot);
                }
            }
            let store = self.nvme.as_ref().expect("NVMe blocks imply an NVMe tier");
            let ios: Vec<(u32, *mut u8)> = reads.iter().map(|r| (r.0, r.1)).collect();
            let mut results = Vec::new();
            // Each slot is verified as soon as its read completes, while others are in flight.
            let mut verified: Vec<Option<Result<(), NvmeError>>> =
                (0..ios.len()).map(|_| None).collect();
            let mut check = |k: usize| {
                let (slot, buf, generation) = reads[k];
                // SAFETY: reserved for this call; the read of this slot completed.
                let buf = unsafe { std::slice::from_raw_parts(buf, store.slot_bytes()) };
                verified[k] = Some(
                    store
                        .verify(slot, buf, namespace, hashes[read_idx[k]], generation)
                        .map(|_| ()),
                );
            };
            // SAFETY: each host slot is reserved (pending) for this call alone.
            unsafe { store.read_slots_with(&ios, &mut check, &mut results) };
            // Corrupt copies' NVMe slots: held until their header is erased (as a drop does),
            // so a restart's scan does not index the bad copy again.
            let mut tomb: Vec<u32> = Vec::new();
            let mut reg = self.lock();
            for ((&i, result), verdict) in read_idx.iter().zip(results).zip(verified) {
                let key = BlockKey::new(namespace, hashes[i]);
                let outcome = result.and_then(|()| {
                    verdict.unwrap_or_else(|| {
                        Err(NvmeError::Corrupt {
                            slot: u32::MAX,
                            reason: "read completed but was not verified".into(),
                        })
                    })
                });
                match outcome {
                    Ok(()) => {
                        reg.publish(key, Tier::Host, 0).expect("reserved");
                    }
                    Err(e) => {
                        let _ = reg.abort(key, Tier::Host);
                        let failure = if matches!(e, NvmeError::Corrupt { .. }) {
                            self.counters
                                .nvme_corrupt_dropped
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("{e}: dropped, not served");
                            // Remove the bad copy so it is never served again.
                            if let Ok(slot) =
                                reg.remove_tier(key, Tier::Nvme, RemoveReason::Corrupt, true)
                            {
                                tomb.push(slot);
                            }
                            LoadFailure::Corrupt(e)
                        } else {
                            self.counters
                                .nvme_read_errors
                                .fetch_add(1, Ordering::Relaxed);
                            LoadFailure::Io(e)
                        };
                        if i < cut {
                            cut = i;
                            report.failure = Some((i, failure));
                        }
                    }
                }
            }
            self.flush_events(&mut reg);
            drop(reg);
            if !tomb.is_empty() {
                store.tombstone(&tomb);
                let mut reg = self.lock();
                for slot in tomb {
                    reg.free_detached(Tier::Nvme, slot);
                }
            }
            // Blocks past the first failure are not served: release them now.
            if cut < plan.len() {
                let mut reg = self.lock();
                for &h in &hashes[cut..plan.len()] {
                    reg.end_use(BlockKey::new(namespace, h));
                }
                plan.truncate(cut);
            }
        }
        // Drain in chain order, outside the lock.
        let mut drain_err = None;
        for (i, &(from, tier, slot)) in plan.iter().enumerate() {
            // SAFETY: the block is held busy (no eviction, no writer) until end_use below.
            let bytes: &[u8] = match tier {
                Tier::Hbm => {
                    let arena = self.hbm.as_ref().expect("G1 blocks imply a G1 arena");
                    match arena.host_ptr(slot) {
                        // SAFETY: host-addressable arena slot held busy.
                        Some(p) => unsafe { std::slice::from_raw_parts(p, self.block_bytes) },
                        None => unreachable!("device arenas are served by the device backend"),
                    }
                }
                // SAFETY: host slot held busy: readers only until end_use.
                _ => unsafe { &self.host.data(slot)[..self.block_bytes] },
            };
            if let Err(e) = drain(i, bytes) {
                drain_err = Some(BlockError::Drain {
                    index: i,
                    source: e.into(),
                });
                break;
            }
            report.loaded += 1;
            report.tiers.push(from);
        }
        {
            let mut reg = self.lock();
            for &h in &hashes[..plan.len()] {
                reg.end_use(BlockKey::new(namespace, h));
            }
        }
        if let Some(e) = drain_err {
            return Err(e);
        }
        report.slowest = report.tiers.iter().copied().max().unwrap_or(Tier::None);
        report.bytes = (report.loaded * self.block_bytes) as u64;
        self.counters
            .loads_served
            .fetch_add(report.loaded as u64, Ordering::Relaxed);
        Ok(report)
    }

    /// Copies the leading host-resident blocks of a chain into G1 (evicting G1 leaves).
    /// Returns how many blocks are in G1 afterwards (leading). Host-addressable arenas only.
    pub fn promote(&self, namespace: u32, hashes: &[u64]) -> usize {
        let Some(arena) = self.hbm.as_ref() else {
            return 0;
        };
        let mut done = 0;
        for &h in hashes {
            let key = BlockKey::new(namespace, h);
            let (host_slot, slot) = {
                let mut reg = self.lock();
                let Some(v) = reg.view(key) else { break };
                if v.present[0].is_some() {
                    done += 1;
                    continue;
                }
                let Some(host_slot) = v.present[1] else { break };
                let at_quota = reg.quota_room(namespace, Tier::Hbm) == 0;
                let free = if at_quota {
                    None
                } else {
                    reg.alloc_free(Tier::Hbm)
                };
                let slot = match free {
                    Some(s) => s,
                    None => {
                        let victim = if at_quota {
                            reg.victim_in(namespace, Tier::Hbm)
                        } else {
                            reg.victim(Tier::Hbm)
                        };
                        let Some(victim) = victim else {
                            break;
                        };
                        let _ = reg.evict(victim, Tier::Hbm, RemoveReason::Evicted);
                        match reg.alloc_free(Tier::Hbm) {
                            Some(s) => s,
                            None => break,
                        }
                    }
                };
                if reg
                    .reserve(key, v.parent, v.priority, Tier::Hbm, slot)
                    .is_err()
                {
                    reg.free_unused(Tier::Hbm, slot);
                    break;
                }
                reg.begin_use(key);
                self.flush_events(&mut reg);
                (host_slot, slot)
            };
            let Some(dst) = arena.host_ptr(slot) else {
                let mut reg = self.lock();
                reg.end_use(key);
                let _ = reg.abort(key, Tier::Hbm);
                break;
            };
            // SAFETY: the host slot is held busy (readers only); the G1 slot is reserved for
            // this call; they do not overlap (different mappings).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.host.data(host_slot).as_ptr(),
                    dst,
                    self.block_bytes,
                );
            }
            let mut reg = self.lock();
            reg.end_use(key);
            reg.publish(key, Tier::Hbm, 0).expect("reserved");
            self.flush_events(&mut reg);
            done += 1;
        }
        done
    }

    /// Leases the leading stored blocks for `session`; returns how many.
    pub fn pin(&self, session: SessionId, namespace: u32, hashes: &[u64]) -> usize {
        self.lock().pin(session, namespace, hashes)
    }

    pub fn unpin(&self, session: SessionId, namespace: u32, hashes: &[u64]) -> usize {
        self.lock().unpin(session, namespace, hashes)
    }

    /// Drops all leases of a session (engine ended or died). Returns leases released.
    pub fn release_session(&self, session: SessionId) -> u64 {
        self.lock().release_session(session)
    }

    fn drop_keys(
        &self,
        keys: impl IntoIterator<Item = BlockKey>,
        reason: RemoveReason,
    ) -> DropReport {
        let mut report = DropReport::default();
        let mut tomb = Vec::new();
        {
            let mut reg = self.lock();
            for key in keys {
                if reg.view(key).is_none_or(|v| {
                    v.fastest() == Tier::None && v.pending.iter().all(|s| s.is_none())
                }) {
                    report.missing += 1;
                    continue;
                }
                if !reg.droppable(key) {
                    report.busy += 1;
                    continue;
                }
                for t in Tier::ALL {
                    // NVMe slots stay allocated until their header is erased, so a restart
                    // does not bring the block back and the slot is not reused meanwhile.
                    if let Ok(slot) = reg.remove_tier(key, t, reason, t == Tier::Nvme)
                        && t == Tier::Nvme
                    {
                        tomb.push(slot);
                    }
                }
                report.dropped += 1;
            }
            self.flush_events(&mut reg);
        }
        if !tomb.is_empty() {
            if let Some(store) = &self.nvme {
                store.tombstone(&tomb);
            }
            let mut reg = self.lock();
            for s in tomb {
                reg.free_detached(Tier::Nvme, s);
            }
        }
        report
    }

    /// Every stored block with its parent and the tiers it is in (router snapshots).
    pub fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.lock()
            .snapshot()
            .into_iter()
            .map(|(key, parent, present)| SnapshotEntry {
                namespace: key.namespace,
                hash: key.hash,
                parent,
                tiers: Tier::ALL
                    .into_iter()
                    .filter(|t| present[t.index()])
                    .collect(),
            })
            .collect()
    }

    /// Removes blocks from every tier (leased or in-use blocks are kept and counted busy).
    pub fn drop_blocks(&self, namespace: u32, hashes: &[u64]) -> DropReport {
        self.drop_keys(
            hashes.iter().map(|&h| BlockKey::new(namespace, h)),
            RemoveReason::Dropped,
        )
    }

    /// Removes every block of a namespace (leased or in-use blocks are kept).
    pub fn clear_namespace(&self, namespace: u32) -> DropReport {
        let keys = self.lock().keys_in_namespace(namespace);
        self.drop_keys(keys, RemoveReason::Cleared)
    }

    pub fn stats(&self) -> BlockStats {
        let reg = self.lock();
        let backing = |t: Tier| match t {
            Tier::Hbm => self
                .hbm
                .as_ref()
                .map(|a| a.kind().to_string())
                .unwrap_or_else(|| "disabled".into()),
            Tier::Host => format!("pinned host pool: {}", self.host.report().pages),
            _ => self
                .nvme
                .as_ref()
                .map(|n| format!("NVMe via {}", n.engine_name()))
                .unwrap_or_else(|| "disabled".into()),
        };
        let tiers = Tier::ALL
            .into_iter()
            .map(|t| TierStats {
                tier: t,
                backing: backing(t),
                slot_bytes: if t == Tier::Hbm {
                    self.block_bytes
                } else {
                    self.host.slot_bytes()
                },
                capacity_slots: reg.capacity(t),
                used_slots: reg.used(t),
                removed: RemoveReason::ALL
                    .into_iter()
                    .map(|r| (r.name(), reg.counters.removed[t.index()][r as usize]))
                    .collect(),
            })
            .collect();
        BlockStats {
            block_bytes: self.block_bytes,
            blocks: reg.len(),
            tiers,
            lookup_hits: reg.counters.lookup_hits,
            lookup_misses: reg.counters.lookup_misses,
            saves_stored: self.counters.saves_stored.load(Ordering::Relaxed),
            loads_served: self.counters.loads_served.load(Ordering::Relaxed),
            nvme_write_errors: self.counters.nvme_write_errors.load(Ordering::Relaxed),
            nvme_read_errors: self.counters.nvme_read_errors.load(Ordering::Relaxed),
            nvme_corrupt_dropped: self.counters.nvme_corrupt_dropped.load(Ordering::Relaxed),
            nvme_scan_valid: self.scan.0,
            nvme_scan_corrupt: self.scan.1,
            nvme_scan_duplicates: self.scan.2,
            nvme_engine: self
                .nvme
                .as_ref()
                .map(|n| n.engine_name().to_string())
                .unwrap_or_default(),
            nvme_registered_buffers: self.nvme.as_ref().is_some_and(|n| n.registered_buffers()),
            events_dropped: self.counters.events_dropped.load(Ordering::Relaxed),
            host_pool: self.host.report().clone(),
            namespaces: reg
                .quota_usage()
                .into_iter()
                .map(|u| NamespaceStats {
                    name: self
                        .quota_names
                        .iter()
                        .find(|(id, _)| *id == u.namespace)
                        .map(|(_, n)| n.clone())
                        .unwrap_or_default(),
                    namespace: u.namespace,
                    max_slots: u.max_slots.map(|m| (m != u32::MAX).then_some(m)),
                    used_slots: u.used_slots,
                })
                .collect(),
        }
    }

    /// Registry invariants (tests, debug builds of the daemon's admin command).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.lock().check_invariants()
    }

    /// The slot header size in front of each host block (for callers sizing buffers).
    pub const SLOT_HEADER_BYTES: usize = SLOT_HEADER_BYTES;
}

#[cfg(test)]
mod tests;
