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

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam::channel::Sender;
use kvplane_cuda::SlotStore;
use serde::Deserialize;

use super::plan::{
    DropPlan, HbmCopy, LoadHolds, LoadItem, LoadPlan, NvmeRead, NvmeWrite, PromotePlan, RoomPlan,
    SavePlan, StoreItem, TierCopy,
};
use super::registry::{
    BlockEvent, BlockKey, EvictRank, Pinned, Registry, RemoveReason, RestoredBlock, SessionId,
};
use crate::tier::host::{HostError, HostPool, HostPoolReport};
use crate::tier::nvme::engine::FaultPlan;
use crate::tier::nvme::{NvmeError, NvmeStore};
use crate::tier::{
    ConfigError, G1Direction, PerTier, SLOT_HEADER_BYTES, Stores, Tier, TiersConfig, invalid,
};

/// Blocks a DROP or a CLEAR plans per hold of the registry lock, so that dropping 65,536
/// blocks or clearing a large namespace lets other sessions' operations in between.
pub const DROP_CHUNK_BLOCKS: u32 = 4096;

/// `blocks.max_pinned_blocks_per_session` by default: an engine pins the prefixes of the
/// requests it runs, far fewer blocks than this (65,536 x 2 MiB = 128 GiB); the daemon's
/// pin records stay under ~2.5 MiB per session.
pub const DEFAULT_MAX_PINNED_BLOCKS_PER_SESSION: u32 = 1 << 16;

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
    /// Distinct blocks one session may hold pinned at once (PIN past it: NO_SPACE; 0
    /// refuses every PIN). Each costs a registry entry and is a block no eviction may
    /// take, so an engine cannot grow the daemon's memory, or freeze a tier, without
    /// bound by pinning.
    pub max_pinned_blocks_per_session: u32,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            block_bytes: 2 << 20,
            nvme_admit_min_hits: 1,
            write_through: false,
            max_pinned_blocks_per_session: DEFAULT_MAX_PINNED_BLOCKS_PER_SESSION,
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
    #[error("device memory for the tiers: {0}")]
    Device(#[source] kvplane_cuda::DeviceError),
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

/// The G1 parents a room plan's copies-down leave without a child in G1 (see
/// [`BlockManager::plan_room`]), in eviction order, the plan's own namespace's apart (a
/// namespace at its quota takes only its own): a heap each, so that choosing a victim
/// costs a plan of n blocks O(log n), not a scan of all freed so far.
#[derive(Default)]
struct FreedParents {
    own: BinaryHeap<Reverse<(EvictRank, BlockKey)>>,
    others: BinaryHeap<Reverse<(EvictRank, BlockKey)>>,
}

impl FreedParents {
    fn push(&mut self, namespace: u32, parent: (EvictRank, BlockKey)) {
        match parent.1.namespace == namespace {
            true => self.own.push(Reverse(parent)),
            false => self.others.push(Reverse(parent)),
        }
    }

    /// The first in eviction order of `candidate` (the tier's, or the namespace's) and
    /// the freed parents (only the namespace's own with `own_only`); a parent chosen is
    /// taken out.
    fn first_victim(
        &mut self,
        candidate: Option<(EvictRank, BlockKey)>,
        own_only: bool,
    ) -> Option<BlockKey> {
        let own = self.own.peek().map(|p| p.0.0);
        let others = self.others.peek().map(|p| p.0.0).filter(|_| !own_only);
        let (heap, parent_rank) = match (own, others) {
            (Some(a), Some(b)) if b < a => (&mut self.others, b),
            (Some(a), _) => (&mut self.own, a),
            (None, Some(b)) => (&mut self.others, b),
            (None, None) => return candidate.map(|(_, key)| key),
        };
        match candidate {
            Some((rank, key)) if rank < parent_rank => Some(key),
            _ => heap.pop().map(|p| p.0.1),
        }
    }
}

/// [`BlockManager::usage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockUsage {
    /// Per tier: (capacity, used) in slots.
    pub slots: PerTier<(u32, u32)>,
    pub lookup_hits: u64,
    pub lookup_misses: u64,
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
    /// Of the blocks this save stored, how many its write-through put on NVMe, and how
    /// many it failed to (the rest of `nvme_written` and `nvme_error` may be demotions
    /// of other blocks, made to find room: not this save's outcome).
    pub written_through: usize,
    pub write_through_failed: usize,
    /// Of the blocks this save stored, how many its write-through found no NVMe slot for
    /// (everything there it may evict leased or in use).
    pub write_through_no_slot: usize,
    /// First NVMe error this call met (the operation went on without NVMe).
    pub nvme_error: Option<NvmeError>,
    /// Stored blocks also kept in G1 (a save that asked to keep its blocks on the GPU).
    pub hbm_stored: usize,
    /// G1 blocks this call copied down to the host tier to make room in G1 (their only
    /// copy was in G1).
    pub g1_copied_down: usize,
    /// Of `nvme_written`, the G1 blocks written straight from G1 (their only copy was in
    /// G1 and the host tier had no room for them).
    pub g1_written_to_nvme: usize,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    /// Leading blocks handed to `drain`.
    pub loaded: usize,
    /// Tier each loaded block was found in (`Nvme` when it was staged from NVMe).
    pub tiers: Vec<Tier>,
    /// How many of the blocks found on NVMe (`tiers`) were staged straight into G1
    /// (`tiers.nvme.direct_to_g1`) rather than through the host tier.
    pub staged_to_g1: usize,
    pub bytes: u64,
    /// Slowest tier used (`Tier::None` when nothing was loaded).
    pub slowest: Option<Tier>,
    /// Why the load stopped early, with the chain index, if it did.
    pub failure: Option<(usize, LoadFailure)>,
    /// What making room for the blocks staged from NVMe moved between tiers (host
    /// victims demoted, G1 victims copied down or written from G1).
    pub room: SaveReport,
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
    /// The device the memory tiers live on (G1 allocated on it, G2 registered with it);
    /// the host backend when none is given (in-process tests; `kvplane serve` always
    /// passes the one `[device]` chose, see `crate::device`).
    pub device: Option<Arc<dyn kvplane_cuda::Device>>,
    /// Per-namespace limits on each tier (`[[namespaces]]` in the config).
    pub quotas: Vec<NamespaceQuota>,
}

/// A namespace's limit per tier (HBM, host, NVMe) in bytes; `None` = no limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceQuota {
    pub namespace: u32,
    pub name: String,
    pub max_bytes: PerTier<Option<u64>>,
}

/// A namespace's limit and usage per tier, in slots (one block each).
#[derive(Clone, Debug, serde::Serialize)]
pub struct NamespaceStats {
    pub name: String,
    pub namespace: u32,
    /// HBM, host, NVMe; `None` = no limit.
    pub max_slots: PerTier<Option<u32>>,
    pub used_slots: PerTier<u32>,
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

pub struct BlockManager {
    /// The tiers' bytes: the manager reads only their geometry and the NVMe index it
    /// rebuilt at start-up; the mover (`crate::dataplane::mover`) moves the bytes.
    stores: Arc<Stores>,
    reg: Mutex<Registry>,
    block_bytes: usize,
    admit_min_hits: u32,
    write_through: bool,
    max_pinned_blocks_per_session: u32,
    events: Option<Sender<BlockEvent>>,
    counters: Counters,
    scan: (u64, u64, u64),
    /// Names of namespaces with a quota (for stats).
    quota_names: Vec<(u32, String)>,
}

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
        let device = options
            .device
            .unwrap_or_else(|| Arc::new(kvplane_cuda::host::HostDevice::new()));
        let mut host = HostPool::new(&tiers.host, slot_bytes)?;
        host.register_with(Arc::clone(&device), block.block_bytes)
            .map_err(BlockError::Device)?;
        let hbm = match tiers.hbm.capacity_bytes {
            0 => None,
            bytes => Some(
                kvplane_cuda::SlotArena::new(Arc::clone(&device), bytes, block.block_bytes)
                    .map_err(BlockError::Device)?,
            ),
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
        let nvme_g1 = crate::tier::NvmeG1Path::decide(
            tiers.nvme.direct_to_g1,
            device.backend(),
            hbm.is_some() && nvme.is_some(),
        )?;
        let caps = PerTier([
            hbm.as_ref().map(|a| a.slot_count()).unwrap_or(0),
            host.slot_count(),
            nvme.as_ref().map(|n| n.slot_count()).unwrap_or(0),
        ]);
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
            let blocks: Vec<RestoredBlock> = valid
                .iter()
                .map(|v| RestoredBlock {
                    key: BlockKey::new(v.header.namespace, v.header.hash),
                    parent: v.header.parent,
                    slot: v.slot,
                    generation: v.header.generation,
                })
                .collect();
            for (b, e) in reg.restore_all(Tier::Nvme, &blocks) {
                tracing::warn!(slot = b.slot, "NVMe scan: {e}");
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
            stores: Arc::new(Stores {
                nvme,
                hbm,
                host,
                block_bytes: block.block_bytes,
                device,
                nvme_g1,
                nvme_g1_backoff: Default::default(),
            }),
            reg: Mutex::new(reg),
            block_bytes: block.block_bytes,
            admit_min_hits: block.nvme_admit_min_hits,
            write_through: block.write_through,
            max_pinned_blocks_per_session: block.max_pinned_blocks_per_session,
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
        self.stores
            .nvme
            .as_ref()
            .map(NvmeStore::sync_all)
            .unwrap_or_default()
    }

    pub fn host_pool(&self) -> &HostPool {
        &self.stores.host
    }

    /// The tiers' bytes, for the mover.
    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// The device the memory tiers live on and the mover copies with.
    pub fn device(&self) -> &Arc<dyn kvplane_cuda::Device> {
        &self.stores.device
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic in a caller's closure never happens under this lock, so a poisoned lock
        // still guards consistent data.
        let mut reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        reg.refill_walk_steps();
        reg
    }

    /// Sends recorded events (called with the lock held; try_send never blocks).
    fn flush_events(&self, reg: &mut Registry) {
        if let Some(tx) = &self.events {
            for ev in reg.drain_events() {
                // The forwarder resyncs the routers when it sees the count move (no
                // sequence number was given, so they cannot see the gap themselves).
                if tx.try_send(ev).is_err() {
                    self.counters.events_dropped.fetch_add(1, Ordering::Release);
                }
            }
        }
    }

    /// Events the full event channel refused so far (see [`Self::flush_events`]).
    pub fn events_dropped(&self) -> u64 {
        self.counters.events_dropped.load(Ordering::Acquire)
    }

    /// Leading blocks of the chain stored anywhere; `out_tiers[i]` = fastest tier of block i.
    pub fn lookup(&self, namespace: u32, hashes: &[u64], out_tiers: &mut [Option<Tier>]) -> usize {
        self.lock().lookup(namespace, hashes, out_tiers)
    }

    fn should_demote(&self, reg: &Registry, key: BlockKey) -> bool {
        self.stores.nvme.is_some()
            && reg
                .view(key)
                .is_some_and(|v| v.present[Tier::Nvme].is_none() && v.pending[Tier::Nvme].is_none())
            && reg.seen(key) >= self.admit_min_hits
    }

    /// Whether G1 holds the only copy of `key` (none present or coming in a slower tier):
    /// evicting it from G1 would lose it, so it is copied down instead.
    fn only_in_g1(reg: &Registry, key: BlockKey) -> bool {
        reg.view(key).is_some_and(|v| {
            [Tier::Host, Tier::Nvme]
                .iter()
                .all(|&t| v.present[t].is_none() && v.pending[t].is_none())
        })
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

    fn next_generation(&self) -> u64 {
        self.stores
            .nvme
            .as_ref()
            .map(|s| s.next_generation())
            .unwrap_or(0)
    }

    /// Counts and logs the failed NVMe writes of a batch.
    fn note_write_errors(&self, results: &[Result<(), NvmeError>]) {
        let errors = results.iter().filter(|r| r.is_err()).count() as u64;
        if errors > 0 {
            self.counters
                .nvme_write_errors
                .fetch_add(errors, Ordering::Relaxed);
        }
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            tracing::warn!("NVMe write failed, block kept off NVMe: {r}");
        }
    }

    // ---- making room ----------------------------------------------------------------

    /// Plans room for `want` blocks of `namespace` in `tier` (counting those already in
    /// `out`): free slots are allocated into `out` at once (the caller owns them until it
    /// reserves or frees them, and they count against the namespace's quota until then:
    /// each consumer of `out` unclaims them); victims NVMe admission accepts become demotions in the
    /// returned plan, to be written by the mover and handed back to [`Self::commit_room`];
    /// other victims are evicted. Fewer when everything is leased or in use. A namespace
    /// at its quota only ever evicts its own blocks.
    pub fn plan_room(
        &self,
        tier: Tier,
        namespace: u32,
        want: usize,
        out: &mut Vec<u32>,
    ) -> RoomPlan {
        let mut room = RoomPlan {
            want,
            namespace,
            demotions: Vec::new(),
            copies_down: Vec::new(),
        };
        // G1 parents this plan's copies-down will leave without a child in G1, themselves
        // with no other copy: candidates in their own right once those children go, so
        // the plan takes them now in eviction order (a G1-only chain comes down in one
        // round, not one block per round).
        let mut freed_parents = FreedParents::default();
        // Demotions and copies-down of this plan that are the namespace's own blocks
        // (counted as they are planned: a recount each round made a large SAVE's room
        // quadratic under the registry lock).
        let mut own_jobs = 0usize;
        let mut reg = self.lock();
        loop {
            let jobs = room.demotions.len() + room.copies_down.len();
            if out.len() + jobs >= want {
                break;
            }
            // After this round, own demotions will have freed their slots: the namespace
            // then holds `used - own_jobs + claimed + jobs` slots, `claimed` (slots taken
            // but not yet reserved, by this plan's `out` or a concurrent operation's)
            // being part of what `quota_room` subtracts.
            let at_quota = (jobs - own_jobs) as u64 >= u64::from(reg.quota_room(namespace, tier));
            let v = if at_quota {
                match freed_parents.first_victim(reg.ranked_victim_in(namespace, tier), true) {
                    Some(v) => v,
                    None => break, // its own blocks are all leased or in use
                }
            } else {
                if let Some(s) = reg.alloc_claimed(namespace, tier) {
                    out.push(s);
                    continue;
                }
                match freed_parents.first_victim(reg.ranked_victim(tier), false) {
                    Some(v) => v,
                    None => break,
                }
            };
            if tier == Tier::Hbm && Self::only_in_g1(&reg, v) {
                let view = reg.view(v).expect("victim exists");
                let hbm_slot = view.present[Tier::Hbm].expect("victim present");
                if let Some(parent) = reg.parent_freed_by(v, Tier::Hbm)
                    && Self::only_in_g1(&reg, parent.1)
                {
                    freed_parents.push(namespace, parent);
                }
                reg.begin_use(v);
                own_jobs += usize::from(v.namespace == namespace);
                room.copies_down.push(TierCopy {
                    key: v,
                    from: (Tier::Hbm, hbm_slot),
                    to: (Tier::Host, u32::MAX),
                });
                continue;
            }
            if tier == Tier::Host && self.should_demote(&reg, v) {
                let view = reg.view(v).expect("victim exists");
                let host_slot = view.present[Tier::Host].expect("victim present");
                if let Some(nvme_slot) = self.nvme_slot(&mut reg, v.namespace) {
                    reg.reserve(v, view.parent, view.priority, Tier::Nvme, nvme_slot)
                        .expect("checked: no NVMe slot");
                    reg.begin_use(v);
                    own_jobs += usize::from(v.namespace == namespace);
                    room.demotions.push(NvmeWrite {
                        key: v,
                        parent: view.parent,
                        from: (Tier::Host, host_slot),
                        nvme_slot,
                        generation: self.next_generation(),
                    });
                    continue;
                }
            }
            let reason = if reg
                .view(v)
                .is_some_and(|e| e.present.iter().any(|(t, s)| t > tier && s.is_some()))
            {
                RemoveReason::Demoted
            } else {
                RemoveReason::Evicted
            };
            reg.evict(v, tier, reason).expect("victim is evictable");
        }
        self.flush_events(&mut reg);
        room
    }

    /// Commits a room plan with the mover's result for each demotion: NVMe copies that
    /// landed are published, the victims leave the tier they were written from (the host,
    /// or G1 for those written straight from G1), even when their write failed: the tier
    /// needs the space; the block is a cache entry and the error is counted and
    /// reported; and their slots go to `out`, up to the plan's `want`. G1 blocks copied
    /// down (`copied_down`: the batched copy landed) are published in the host tier and
    /// leave G1; when the copy failed they stay in G1 and free nothing.
    pub fn commit_room(
        &self,
        room: RoomPlan,
        results: Vec<Result<(), NvmeError>>,
        copied_down: bool,
        out: &mut Vec<u32>,
        report: &mut SaveReport,
    ) {
        assert_eq!(
            results.len(),
            room.demotions.len(),
            "one result per demotion"
        );
        self.note_write_errors(&results);
        let mut reg = self.lock();
        // Copies-down first: a child copied down leaves G1 before its parent, which a
        // write from G1 may have taken, is considered for eviction below.
        for c in &room.copies_down {
            reg.end_use(c.key);
            if !copied_down {
                let _ = reg.abort(c.key, Tier::Host);
                continue;
            }
            reg.publish(c.key, Tier::Host, 0).expect("reserved");
            report.g1_copied_down += 1;
            if out.len() < room.want {
                Self::evict_into(
                    &mut reg,
                    c.key,
                    Tier::Hbm,
                    RemoveReason::Demoted,
                    room.namespace,
                    out,
                );
            }
        }
        for (job, result) in room.demotions.iter().zip(results) {
            reg.end_use(job.key);
            let from = job.from.0;
            match result {
                Ok(()) => {
                    reg.publish(job.key, Tier::Nvme, job.generation)
                        .expect("reserved");
                    report.nvme_written += 1;
                    report.g1_written_to_nvme += usize::from(from == Tier::Hbm);
                }
                Err(e) => {
                    reg.abort(job.key, Tier::Nvme).expect("reserved");
                    if report.nvme_error.is_none() {
                        report.nvme_error = Some(e);
                    }
                }
            }
            if out.len() < room.want && reg.evictable(job.key, from) {
                // Demoted while another tier still holds it; lost to the failed write
                // otherwise.
                let reason = if reg.view(job.key).is_some_and(|v| {
                    v.present
                        .iter()
                        .any(|(t, slot)| t != from && slot.is_some())
                }) {
                    RemoveReason::Demoted
                } else {
                    RemoveReason::IoError
                };
                Self::evict_into(&mut reg, job.key, from, reason, room.namespace, out);
            }
        }
        self.flush_events(&mut reg);
    }

    /// Gives back a room plan whose execution failed without results (the mover panicked):
    /// its victims' holds, their NVMe reservations and the host slots reserved for its
    /// copies-down. Nothing is published; the victims stay where they were. Returns the
    /// NVMe slots set aside for the mover to erase before [`Self::commit_erase`] frees
    /// them (a demotion's write may have landed).
    #[must_use = "erase the returned NVMe slots, then commit_erase them"]
    pub fn abort_room(&self, room: RoomPlan) -> Vec<u32> {
        let mut reg = self.lock();
        let mut erase = Vec::new();
        for job in &room.demotions {
            reg.end_use(job.key);
            erase.extend(reg.abort_detached(job.key, Tier::Nvme));
        }
        for c in &room.copies_down {
            reg.end_use(c.key);
            if c.to.1 != u32::MAX {
                let _ = reg.abort(c.key, Tier::Host);
            }
        }
        self.flush_events(&mut reg);
        erase
    }

    /// Evicts `key` from `tier` (if it may go) and allocates the freed room into `out`,
    /// claimed for `namespace` (the room plan's), if its quota still has room: a
    /// concurrent plan of the same namespace may have freed its share meanwhile (demotions
    /// are written outside the registry lock), and the freed slot then stays free.
    fn evict_into(
        reg: &mut Registry,
        key: BlockKey,
        tier: Tier,
        reason: RemoveReason,
        namespace: u32,
        out: &mut Vec<u32>,
    ) {
        if reg.evict(key, tier, reason).is_ok()
            && reg.quota_room(namespace, tier) > 0
            && let Some(s) = reg.alloc_claimed(namespace, tier)
        {
            out.push(s);
        }
    }

    /// Reserves the host slots found for a room plan's G1 copies-down (`slots[k]` for
    /// `copies_down[k]`). A block left without one (the host tier has no room it may
    /// take) is written from G1 straight to NVMe where the daemon moves blocks between
    /// them directly and NVMe admits it (an NVMe slot is reserved and the write joins the
    /// plan's `demotions`); otherwise it is not copied: it leaves G1 (evicted, a cache
    /// entry) and its slot goes to `out`, up to the plan's `want`.
    pub fn reserve_copies_down(
        &self,
        room: &mut RoomPlan,
        slots: Vec<Option<u32>>,
        out: &mut Vec<u32>,
    ) {
        assert_eq!(slots.len(), room.copies_down.len(), "one slot per copy");
        // Asked only for a victim that needs it: asking may claim the path's probe.
        let mut direct_to_nvme = None;
        let mut reg = self.lock();
        let mut kept = Vec::with_capacity(room.copies_down.len());
        for (c, slot) in room.copies_down.drain(..).zip(slots) {
            if let Some(host_slot) = slot {
                // Taken by a host room plan of the victim's namespace.
                reg.unclaim(c.key.namespace, Tier::Host, 1);
                let view = reg.view(c.key).expect("held busy by the plan");
                match reg.reserve(c.key, view.parent, view.priority, Tier::Host, host_slot) {
                    Ok(()) => {
                        kept.push(TierCopy {
                            to: (Tier::Host, host_slot),
                            ..c
                        });
                        continue;
                    }
                    // Another save reserved its host copy meanwhile: nothing to copy.
                    Err(_) => reg.free_unused(Tier::Host, host_slot),
                }
            } else if Self::only_in_g1(&reg, c.key)
                && *direct_to_nvme
                    .get_or_insert_with(|| self.stores.direct_now(G1Direction::G1ToNvme))
                && self.should_demote(&reg, c.key)
                && let Some(nvme_slot) = self.nvme_slot(&mut reg, c.key.namespace)
            {
                // Held busy until commit_room, as the host demotions are.
                let view = reg.view(c.key).expect("held busy by the plan");
                reg.reserve(c.key, view.parent, view.priority, Tier::Nvme, nvme_slot)
                    .expect("checked: no NVMe copy");
                room.demotions.push(NvmeWrite {
                    key: c.key,
                    parent: view.parent,
                    from: c.from,
                    nvme_slot,
                    generation: self.next_generation(),
                });
                continue;
            }
            reg.end_use(c.key);
            let reason = if Self::only_in_g1(&reg, c.key) {
                RemoveReason::Evicted
            } else {
                RemoveReason::Demoted
            };
            if out.len() < room.want {
                Self::evict_into(&mut reg, c.key, Tier::Hbm, reason, room.namespace, out);
            }
        }
        room.copies_down = kept;
        self.flush_events(&mut reg);
    }

    /// Gives back slots a [`Self::plan_room`] of `namespace` allocated that were not used.
    pub fn free_room(&self, namespace: u32, tier: Tier, slots: Vec<u32>) {
        let mut reg = self.lock();
        reg.unclaim(namespace, tier, slots.len());
        for s in slots {
            reg.free_unused(tier, s);
        }
    }

    // ---- save -----------------------------------------------------------------------

    /// Starts a save of a chain: blocks stored already (or being stored) are skipped and
    /// touched; the plan lists the chain indices that need a host slot
    /// ([`SavePlan::slots_needed`]), to be found with [`Self::plan_room`] and reserved
    /// with [`Self::reserve_save`].
    pub fn begin_save(
        &self,
        namespace: u32,
        blocks: &[(u64, Option<u64>)],
        priority: u8,
    ) -> SavePlan {
        let mut plan = SavePlan {
            namespace,
            priority,
            ..SavePlan::default()
        };
        let mut reg = self.lock();
        for (i, &(h, parent)) in blocks.iter().enumerate() {
            let key = BlockKey::new(namespace, h);
            match reg.view(key) {
                Some(v)
                    if v.present
                        .iter()
                        .chain(v.pending.iter())
                        .any(|(_, s)| s.is_some()) =>
                {
                    reg.touch(key);
                    plan.report.already_present += 1;
                }
                _ => plan.need.push(StoreItem {
                    index: i,
                    key,
                    parent,
                    host_slot: u32::MAX,
                }),
            }
        }
        plan
    }

    /// Reserves `slots` (from [`Self::plan_room`]) for the blocks the save needs, in chain
    /// order; blocks left without a slot count as no space, spare slots are freed, and a
    /// block another session reserved meanwhile is skipped.
    pub fn reserve_save(&self, plan: &mut SavePlan, slots: Vec<u32>) {
        let mut reg = self.lock();
        reg.unclaim(plan.namespace, Tier::Host, slots.len());
        let mut spare = slots.into_iter();
        for item in std::mem::take(&mut plan.need) {
            let Some(slot) = spare.next() else {
                plan.report.no_space += 1;
                continue;
            };
            match reg.reserve(item.key, item.parent, plan.priority, Tier::Host, slot) {
                Ok(()) => plan.stores.push(StoreItem {
                    host_slot: slot,
                    ..item
                }),
                Err(_) => {
                    reg.free_unused(Tier::Host, slot);
                    plan.report.already_present += 1;
                }
            }
        }
        for slot in spare {
            reg.free_unused(Tier::Host, slot);
        }
    }

    /// Reserves G1 `slots` (from [`Self::plan_room`] on G1) for a second copy of the
    /// blocks the save stores, in chain order (the engine asked to keep them on its GPU,
    /// where any engine on it loads them at device bandwidth); stops at the first block
    /// that gets none, and frees spare slots. The host copies stay. Nothing without a G1
    /// tier.
    pub fn reserve_save_hbm(&self, plan: &mut SavePlan, slots: Vec<u32>) {
        let mut reg = self.lock();
        reg.unclaim(plan.namespace, Tier::Hbm, slots.len());
        let mut spare = slots.into_iter();
        for (store, item) in plan.stores.iter().enumerate() {
            let Some(slot) = spare.next() else { break };
            if reg
                .reserve(item.key, item.parent, plan.priority, Tier::Hbm, slot)
                .is_err()
            {
                reg.free_unused(Tier::Hbm, slot);
                break;
            }
            plan.hbm.push(HbmCopy {
                store,
                hbm_slot: slot,
            });
        }
        for slot in spare {
            reg.free_unused(Tier::Hbm, slot);
        }
    }

    /// Whether the daemon has a G1 tier.
    pub fn has_g1(&self) -> bool {
        self.stores.hbm.is_some()
    }

    /// Reserves NVMe slots for a write-through copy of every block the save stores (after
    /// the mover filled their host slots); the mover writes `plan.writes`. Returns slots
    /// taken and not used, set aside for the mover to erase before [`Self::commit_erase`]
    /// frees them: each may still hold the header of the block evicted to free it, which
    /// would otherwise come back at the next restart, after a DROP or CLEAR too.
    #[must_use = "erase the returned NVMe slots, then commit_erase them"]
    pub fn plan_write_through(&self, plan: &mut SavePlan) -> Vec<u32> {
        let mut erase = Vec::new();
        if self.stores.nvme.is_none() {
            return erase;
        }
        let mut reg = self.lock();
        for (k, item) in plan.stores.iter().enumerate() {
            let Some(nvme_slot) = self.nvme_slot(&mut reg, plan.namespace) else {
                // Everything on NVMe this namespace may evict is leased or in use.
                plan.report.write_through_no_slot = plan.stores.len() - k;
                break;
            };
            if reg
                .reserve(item.key, item.parent, plan.priority, Tier::Nvme, nvme_slot)
                .is_err()
            {
                // The block reached NVMe meanwhile (an in-flight demotion can land it
                // while the host copy is filled): its NVMe copy exists, so give the slot
                // back rather than panic.
                reg.detach_unused(Tier::Nvme, nvme_slot);
                erase.push(nvme_slot);
                continue;
            }
            plan.writes.push(NvmeWrite {
                key: item.key,
                parent: item.parent,
                from: (Tier::Host, item.host_slot),
                nvme_slot,
                generation: self.next_generation(),
            });
        }
        self.flush_events(&mut reg);
        erase
    }

    /// Whether saves write through to NVMe by configuration.
    pub fn writes_through(&self) -> bool {
        self.write_through && self.stores.nvme.is_some()
    }

    /// The mover could not fill the save's slots (the engine's memory faulted), or its
    /// write-through panicked: every reservation is given up, nothing is published.
    /// Returns the NVMe slots of its writes, set aside for the mover to erase before
    /// [`Self::commit_erase`] frees them (a write may have landed).
    #[must_use = "erase the returned NVMe slots, then commit_erase them"]
    pub fn abort_save(&self, plan: SavePlan) -> Vec<u32> {
        let mut reg = self.lock();
        let erase = plan
            .writes
            .iter()
            .filter_map(|w| reg.abort_detached(w.key, Tier::Nvme).ok())
            .collect();
        for c in &plan.hbm {
            let _ = reg.abort(plan.stores[c.store].key, Tier::Hbm);
        }
        for item in &plan.stores {
            let _ = reg.abort(item.key, Tier::Host);
        }
        erase
    }

    /// Publishes what the save stored (the mover filled every host slot of `plan.stores`)
    /// with the result of each write-through copy (`write_results[k]` for `plan.writes[k]`).
    pub fn commit_save(
        &self,
        plan: SavePlan,
        write_results: Vec<Result<(), NvmeError>>,
    ) -> SaveReport {
        assert_eq!(
            write_results.len(),
            plan.writes.len(),
            "one result per NVMe write"
        );
        self.note_write_errors(&write_results);
        let SavePlan {
            stores,
            hbm,
            writes,
            mut report,
            ..
        } = plan;
        let mut reg = self.lock();
        for item in &stores {
            reg.publish(item.key, Tier::Host, 0)
                .expect("reserved by this save");
        }
        for c in &hbm {
            reg.publish(stores[c.store].key, Tier::Hbm, 0)
                .expect("reserved by this save");
        }
        report.hbm_stored = hbm.len();
        for (w, r) in writes.iter().zip(write_results) {
            match r {
                Ok(()) => {
                    reg.publish(w.key, Tier::Nvme, w.generation)
                        .expect("reserved by this save");
                    report.nvme_written += 1;
                    report.written_through += 1;
                }
                Err(e) => {
                    let _ = reg.abort(w.key, Tier::Nvme);
                    report.write_through_failed += 1;
                    if report.nvme_error.is_none() {
                        report.nvme_error = Some(e);
                    }
                }
            }
        }
        self.flush_events(&mut reg);
        drop(reg);
        report.stored = stores.len();
        report.bytes = (stores.len() * self.block_bytes) as u64;
        self.counters
            .saves_stored
            .fetch_add(report.stored as u64, Ordering::Relaxed);
        report
    }

    // ---- load -----------------------------------------------------------------------

    /// Plans a load of the leading stored blocks of a chain: each is held busy and read
    /// from its fastest tier; blocks only on NVMe need staging into the host tier first
    /// ([`LoadPlan::needs_staging`], [`Self::plan_staging`]).
    pub fn plan_load(&self, namespace: u32, hashes: &[u64]) -> LoadPlan {
        let mut plan = LoadPlan {
            namespace,
            ..LoadPlan::default()
        };
        let mut reg = self.lock();
        for (i, &h) in hashes.iter().enumerate() {
            let key = BlockKey::new(namespace, h);
            let Some(v) = reg.view(key) else {
                plan.failure = Some((i, LoadFailure::Missing));
                break;
            };
            let Some(t) = v.fastest() else {
                plan.failure = Some((i, LoadFailure::Missing));
                break;
            };
            reg.begin_use(key);
            reg.touch(key);
            if t == Tier::Nvme {
                plan.staged.push(i);
                plan.items.push(LoadItem {
                    index: i,
                    key,
                    found: Tier::Nvme,
                    tier: Tier::Host,
                    slot: u32::MAX,
                });
            } else {
                plan.items.push(LoadItem {
                    index: i,
                    key,
                    found: t,
                    tier: t,
                    slot: v.present[t].expect("present"),
                });
            }
        }
        plan
    }

    /// Reserves slots (from [`Self::plan_room`]) for the blocks a load stages from NVMe,
    /// in chain order: the `g1` slots first (read straight into G1, see
    /// `Stores::nvme_g1`), then the `host` ones, and lists the reads in `plan.reads`. The
    /// load is cut at the first block that gets no slot (no space) or is being staged by
    /// another load (busy); spare slots are freed.
    pub fn plan_staging(&self, plan: &mut LoadPlan, g1: Vec<u32>, host: Vec<u32>) {
        let mut cut = plan.items.len();
        let mut reg = self.lock();
        reg.unclaim(plan.namespace, Tier::Hbm, g1.len());
        reg.unclaim(plan.namespace, Tier::Host, host.len());
        let mut spare_g1 = g1.into_iter();
        let mut spare_host = host.into_iter();
        for &i in &plan.staged {
            let key = plan.items[i].key;
            let v = reg.view(key).expect("held busy");
            if let Some(t) = [Tier::Hbm, Tier::Host]
                .into_iter()
                .find(|&t| v.present[t].is_some())
            {
                // Another load staged it meanwhile: this one serves it from there.
                plan.items[i].found = t;
                plan.items[i].tier = t;
                plan.items[i].slot = v.present[t].expect("present");
                continue;
            }
            if [Tier::Hbm, Tier::Host]
                .into_iter()
                .any(|t| v.pending[t].is_some())
            {
                // Being staged by another load right now (into G1 or the host tier): stop
                // here rather than wait or read it twice (the engine retries; the block
                // is not missing and space is not short).
                cut = cut.min(i);
                plan.failure = Some((i, LoadFailure::Busy));
                break;
            }
            let Some(nvme_slot) = v.present[Tier::Nvme] else {
                // Another load found its NVMe copy corrupt and dropped it meanwhile (our
                // hold keeps the entry, not the copy): there is nothing left to stage.
                cut = cut.min(i);
                plan.failure = Some((i, LoadFailure::Missing));
                break;
            };
            let Some((tier, slot)) = spare_g1
                .next()
                .map(|s| (Tier::Hbm, s))
                .or_else(|| spare_host.next().map(|s| (Tier::Host, s)))
            else {
                cut = cut.min(i);
                if plan.failure.as_ref().is_none_or(|f| f.0 > i) {
                    plan.failure = Some((i, LoadFailure::NoSpace));
                }
                break;
            };
            if reg.reserve(key, v.parent, v.priority, tier, slot).is_err() {
                // Being staged by another load right now: stop here rather than wait (the
                // engine retries; the block is not missing and space is not short).
                reg.free_unused(tier, slot);
                cut = cut.min(i);
                plan.failure = Some((i, LoadFailure::Busy));
                break;
            }
            plan.items[i].tier = tier;
            plan.items[i].slot = slot;
            plan.reads.push(NvmeRead {
                index: i,
                key,
                nvme_slot,
                tier,
                slot,
                generation: v.nvme_generation,
            });
        }
        for slot in spare_g1 {
            reg.free_unused(Tier::Hbm, slot);
        }
        for slot in spare_host {
            reg.free_unused(Tier::Host, slot);
        }
        plan.staged.clear();
        Self::cut_load(&mut reg, plan, cut);
    }

    /// Releases the blocks of a load from chain index `cut` on (not served).
    fn cut_load(reg: &mut Registry, plan: &mut LoadPlan, cut: usize) {
        if cut < plan.items.len() {
            for item in &plan.items[cut..] {
                reg.end_use(item.key);
            }
            plan.items.truncate(cut);
            plan.reads.retain(|r| r.index < cut);
        }
    }

    /// Commits the staging reads with the mover's verdict for each (read and verified
    /// against the slot key, namespace, hash and generation): verified copies are published
    /// in the host tier; a corrupt copy is removed from NVMe and never served, and the load
    /// is cut at the first failure. Returns the NVMe slots whose headers the mover must
    /// erase (then [`Self::commit_erase`]), so a restart does not index the bad copy again.
    pub fn commit_staging(
        &self,
        plan: &mut LoadPlan,
        results: Vec<Result<(), NvmeError>>,
    ) -> Vec<u32> {
        assert_eq!(results.len(), plan.reads.len(), "one result per read");
        let mut tomb = Vec::new();
        let mut cut = plan.items.len();
        let mut reg = self.lock();
        for (read, result) in plan.reads.iter().zip(results) {
            match result {
                Ok(()) => {
                    reg.publish(read.key, read.tier, 0).expect("reserved");
                }
                Err(e) => {
                    let _ = reg.abort(read.key, read.tier);
                    let failure = if matches!(e, NvmeError::Corrupt { .. }) {
                        self.counters
                            .nvme_corrupt_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("{e}: dropped, not served");
                        if let Ok(slot) =
                            reg.remove_tier(read.key, Tier::Nvme, RemoveReason::Corrupt, true)
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
                    if read.index < cut {
                        cut = read.index;
                        plan.failure = Some((read.index, failure));
                    }
                }
            }
        }
        plan.reads.clear();
        self.flush_events(&mut reg);
        Self::cut_load(&mut reg, plan, cut);
        tomb
    }

    /// Frees NVMe slots whose headers the mover erased (after a drop or a corrupt copy).
    pub fn commit_erase(&self, slots: &[u32]) {
        for chunk in slots.chunks(DROP_CHUNK_BLOCKS as usize) {
            let mut reg = self.lock();
            for &s in chunk {
                reg.free_detached(Tier::Nvme, s);
            }
        }
    }

    /// Ends a load: `served` leading items of the plan reached the engine (all of them
    /// unless the mover failed). Every block the plan held is released.
    pub fn commit_load(&self, plan: LoadPlan, served: usize) -> LoadReport {
        let (report, holds) = self.report_load(plan, served);
        self.release_load(holds);
        report
    }

    /// Gives up a load whose mover work panicked: host slots reserved for staging reads
    /// not yet committed are freed, and every block the plan held is released.
    pub fn abort_load(&self, mut plan: LoadPlan) {
        {
            let mut reg = self.lock();
            for read in plan.reads.drain(..) {
                let _ = reg.abort(read.key, read.tier);
            }
            self.flush_events(&mut reg);
        }
        let _ = self.commit_load(plan, 0);
    }

    /// The report of a load whose copies are queued but not landed (a LOAD completed to
    /// an engine that waits on an IPC event instead): its blocks stay held until
    /// [`Self::release_load`].
    pub fn report_load(&self, plan: LoadPlan, served: usize) -> (LoadReport, LoadHolds) {
        let LoadPlan { items, failure, .. } = plan;
        let served = served.min(items.len());
        let tiers: Vec<Tier> = items[..served].iter().map(|i| i.found).collect();
        let staged_to_g1 = items[..served]
            .iter()
            .filter(|i| i.found == Tier::Nvme && i.tier == Tier::Hbm)
            .count();
        let report = LoadReport {
            loaded: served,
            slowest: tiers.iter().copied().max(),
            bytes: (served * self.block_bytes) as u64,
            tiers,
            staged_to_g1,
            failure,
            room: SaveReport::default(),
        };
        self.counters
            .loads_served
            .fetch_add(report.loaded as u64, Ordering::Relaxed);
        (report, LoadHolds { items })
    }

    /// Releases a reported load's blocks once its copies have landed (or failed).
    pub fn release_load(&self, holds: LoadHolds) {
        let mut reg = self.lock();
        for item in &holds.items {
            reg.end_use(item.key);
        }
    }

    // ---- promotion ------------------------------------------------------------------

    /// How many blocks a promotion of the chain would copy: after its leading blocks
    /// already in G1, the run of blocks in the host tier and not in G1.
    pub fn promotable(&self, namespace: u32, hashes: &[u64]) -> usize {
        if !self.has_g1() {
            return 0;
        }
        let reg = self.lock();
        let views = hashes
            .iter()
            .map_while(|&h| reg.view(BlockKey::new(namespace, h)));
        views
            .skip_while(|v| v.present[Tier::Hbm].is_some())
            .take_while(|v| v.present[Tier::Hbm].is_none() && v.present[Tier::Host].is_some())
            .count()
    }

    /// Plans copies of the leading host-resident blocks of a chain into the G1 `slots`
    /// (from [`Self::plan_room`] on G1): G1 slots reserved, host copies held busy. Stops
    /// at the first block that is neither in G1 nor in the host tier, or gets no slot;
    /// spare slots are freed.
    pub fn plan_promote(&self, namespace: u32, hashes: &[u64], slots: Vec<u32>) -> PromotePlan {
        let mut plan = PromotePlan::default();
        let mut reg = self.lock();
        reg.unclaim(namespace, Tier::Hbm, slots.len());
        let mut spare = slots.into_iter();
        for &h in hashes {
            let key = BlockKey::new(namespace, h);
            let Some(v) = reg.view(key) else { break };
            if v.present[Tier::Hbm].is_some() {
                if plan.copies.is_empty() {
                    plan.already += 1;
                    continue;
                }
                break;
            }
            let Some(host_slot) = v.present[Tier::Host] else {
                break;
            };
            let Some(slot) = spare.next() else { break };
            if reg
                .reserve(key, v.parent, v.priority, Tier::Hbm, slot)
                .is_err()
            {
                reg.free_unused(Tier::Hbm, slot);
                break;
            }
            reg.begin_use(key);
            plan.copies.push(TierCopy {
                key,
                from: (Tier::Host, host_slot),
                to: (Tier::Hbm, slot),
            });
        }
        for slot in spare {
            reg.free_unused(Tier::Hbm, slot);
        }
        self.flush_events(&mut reg);
        plan
    }

    /// Commits a promotion: with `copied`, every planned copy landed and is published;
    /// otherwise every reservation is given up. Returns the leading blocks now in G1.
    pub fn commit_promote(&self, plan: PromotePlan, copied: bool) -> usize {
        let mut reg = self.lock();
        for c in &plan.copies {
            reg.end_use(c.key);
            if copied {
                reg.publish(c.key, Tier::Hbm, 0).expect("reserved");
            } else {
                let _ = reg.abort(c.key, Tier::Hbm);
            }
        }
        self.flush_events(&mut reg);
        plan.already + if copied { plan.copies.len() } else { 0 }
    }

    /// Leases the leading stored blocks for `session`, up to its cap on pinned blocks
    /// (`blocks.max_pinned_blocks_per_session`).
    pub fn pin(&self, session: SessionId, namespace: u32, hashes: &[u64]) -> Pinned {
        let cap = self.max_pinned_blocks_per_session as usize;
        self.lock().pin(session, namespace, hashes, cap)
    }

    /// `blocks.max_pinned_blocks_per_session`.
    pub fn max_pinned_blocks_per_session(&self) -> u32 {
        self.max_pinned_blocks_per_session
    }

    pub fn unpin(&self, session: SessionId, namespace: u32, hashes: &[u64]) -> usize {
        self.lock().unpin(session, namespace, hashes)
    }

    /// Drops all leases of a session (engine ended or died). Returns leases released.
    pub fn release_session(&self, session: SessionId) -> u64 {
        self.lock().release_session(session)
    }

    /// Every stored block with its parent and the tiers it is in (router snapshots).
    pub fn snapshot(&self) -> Vec<SnapshotEntry> {
        // Only the walk holds the lock (a temporary guard would live through the
        // conversion below, an allocation per block, stalling every session meanwhile).
        let entries = self.lock().snapshot();
        entries
            .into_iter()
            .map(|(key, parent, present)| SnapshotEntry {
                namespace: key.namespace,
                hash: key.hash,
                parent,
                tiers: Tier::ALL.into_iter().filter(|&t| present[t]).collect(),
            })
            .collect()
    }

    /// Plans removing one block from every tier, counting it dropped, busy (leased or in
    /// use: kept) or missing.
    fn plan_drop_one(reg: &mut Registry, key: BlockKey, reason: RemoveReason, plan: &mut DropPlan) {
        if reg
            .view(key)
            .is_none_or(|v| v.fastest().is_none() && v.pending.values().all(|s| s.is_none()))
        {
            plan.report.missing += 1;
            return;
        }
        if !reg.droppable(key) {
            plan.report.busy += 1;
            return;
        }
        for t in Tier::ALL {
            // NVMe slots stay allocated until their header is erased, so a restart does not
            // bring the block back and the slot is not reused meanwhile.
            if let Ok(slot) = reg.remove_tier(key, t, reason, t == Tier::Nvme)
                && t == Tier::Nvme
            {
                plan.erase_nvme.push(slot);
            }
        }
        plan.report.dropped += 1;
    }

    /// Plans removing blocks from every tier (leased or in-use blocks are kept and counted
    /// busy); the mover erases `erase_nvme`, then [`Self::commit_drop`].
    pub fn plan_drop(&self, namespace: u32, hashes: &[u64]) -> DropPlan {
        let mut plan = DropPlan::default();
        for chunk in hashes.chunks(DROP_CHUNK_BLOCKS as usize) {
            let mut reg = self.lock();
            for &hash in chunk {
                let key = BlockKey::new(namespace, hash);
                Self::plan_drop_one(&mut reg, key, RemoveReason::Dropped, &mut plan);
            }
            self.flush_events(&mut reg);
        }
        plan
    }

    /// Plans removing every block of a namespace (leased or in-use blocks are kept). Visits
    /// that namespace's entries only, [`DROP_CHUNK_BLOCKS`] per hold of the lock.
    pub fn plan_clear(&self, namespace: u32) -> DropPlan {
        let mut plan = DropPlan::default();
        let (mut left, walk) = {
            let mut reg = self.lock();
            (reg.namespace_len(namespace), reg.begin_walk())
        };
        while left > 0 {
            let mut reg = self.lock();
            for _ in 0..left.min(DROP_CHUNK_BLOCKS) {
                left -= 1;
                let Some(key) = reg.rotate_namespace(namespace, walk) else {
                    left = 0;
                    break;
                };
                Self::plan_drop_one(&mut reg, key, RemoveReason::Cleared, &mut plan);
            }
            self.flush_events(&mut reg);
        }
        plan
    }

    /// Ends a drop once the mover erased its NVMe headers: the slots are free again.
    pub fn commit_drop(&self, plan: DropPlan) -> DropReport {
        self.commit_erase(&plan.erase_nvme);
        plan.report
    }

    /// What an engine's STATS reports of the blocks: each tier's slots (capacity, used)
    /// and the lookup counters. A few loads under the lock and nothing allocated: engines
    /// may ask as often as they like ([`Self::stats`] formats and allocates, for the
    /// control endpoints).
    pub fn usage(&self) -> BlockUsage {
        let reg = self.lock();
        BlockUsage {
            slots: PerTier(Tier::ALL.map(|t| (reg.capacity(t), reg.used(t)))),
            lookup_hits: reg.counters.lookup_hits,
            lookup_misses: reg.counters.lookup_misses,
        }
    }

    pub fn stats(&self) -> BlockStats {
        let reg = self.lock();
        let backing = |t: Tier| match t {
            Tier::Hbm => self
                .stores
                .hbm
                .as_ref()
                .map(kvplane_cuda::SlotStore::describe)
                .unwrap_or_else(|| "disabled".into()),
            Tier::Host => kvplane_cuda::SlotStore::describe(&self.stores.host),
            _ => self
                .stores
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
                    self.stores.host.slot_bytes()
                },
                capacity_slots: reg.capacity(t),
                used_slots: reg.used(t),
                removed: RemoveReason::ALL
                    .into_iter()
                    .map(|r| (r.name(), reg.counters.removed[t][r as usize]))
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
                .stores
                .nvme
                .as_ref()
                .map(|n| n.engine_name().to_string())
                .unwrap_or_default(),
            nvme_registered_buffers: self
                .stores
                .nvme
                .as_ref()
                .is_some_and(|n| n.registered_buffers()),
            events_dropped: self.counters.events_dropped.load(Ordering::Relaxed),
            host_pool: self.stores.host.report().clone(),
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

    /// Slots allocated for namespaces with a quota and not yet reserved or freed (zero
    /// between operations; a leak otherwise).
    pub fn claimed_slots(&self) -> u64 {
        self.lock().claimed_slots()
    }

    /// The slot header size in front of each host block (for callers sizing buffers).
    pub const SLOT_HEADER_BYTES: usize = SLOT_HEADER_BYTES;
}
