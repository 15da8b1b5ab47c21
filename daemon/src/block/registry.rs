//! The block registry: `BlockKey -> entry` bookkeeping for all three tiers, with no I/O and
//! no data. `BlockManager` holds it under one mutex and moves bytes around its decisions.
//!
//! Per tier, an entry is *present* (published slot), *pending* (slot reserved, bytes being
//! written, invisible to lookups) or absent. Eviction candidates of a tier are entries that
//! are present there, have no children present in that same tier (leaves go before their
//! prefixes), no leases and no operation in flight; they are ordered by (priority, last use)
//! so low priority goes first and LRU decides within a class.

pub use kvplane_router::hash::{BuildKeyHasher, KeyHasher};
use std::collections::{BTreeSet, HashMap, HashSet};

use crate::tier::{PerTier, SlotAllocator, Tier};

pub type SessionId = u64;
pub const NO_SLOT: u32 = u32::MAX;

/// `(namespace, chained block hash)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    pub namespace: u32,
    pub hash: u64,
}

impl BlockKey {
    pub fn new(namespace: u32, hash: u64) -> Self {
        BlockKey { namespace, hash }
    }
}

/// Why a block left a tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RemoveReason {
    /// Evicted for space, copy kept in a lower tier (demoted).
    Demoted,
    /// Evicted for space, no lower copy kept (not admitted, or last tier).
    Evicted,
    /// `drop_blocks`.
    Dropped,
    /// `clear_namespace`.
    Cleared,
    /// Failed verification (NVMe checksum, torn slot).
    Corrupt,
    /// An I/O error made the copy unusable.
    IoError,
}

impl RemoveReason {
    pub const ALL: [RemoveReason; 6] = [
        RemoveReason::Demoted,
        RemoveReason::Evicted,
        RemoveReason::Dropped,
        RemoveReason::Cleared,
        RemoveReason::Corrupt,
        RemoveReason::IoError,
    ];
    pub fn name(self) -> &'static str {
        match self {
            RemoveReason::Demoted => "demoted",
            RemoveReason::Evicted => "evicted",
            RemoveReason::Dropped => "dropped",
            RemoveReason::Cleared => "cleared",
            RemoveReason::Corrupt => "corrupt",
            RemoveReason::IoError => "io_error",
        }
    }
}

/// Stored/removed events, per tier, for the router's publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum BlockEvent {
    Stored {
        namespace: u32,
        hash: u64,
        parent: Option<u64>,
        tier: Tier,
    },
    Removed {
        namespace: u32,
        hash: u64,
        parent: Option<u64>,
        tier: Tier,
        reason: RemoveReason,
    },
}

#[derive(Clone, Debug)]
struct Entry {
    key: BlockKey,
    parent: Option<u64>,
    slots: PerTier<u32>,
    /// Bit t: the slot of tier t is reserved, not published.
    pending: u8,
    /// Children present (published) in each tier.
    children: PerTier<u32>,
    last_use: u64,
    priority: u8,
    leases: u32,
    busy: u32,
    nvme_generation: u64,
    /// Bit t: in `candidates[t]` under (`cand_priority`, `cand_use`).
    cand: u8,
    /// 1 + index into `Registry::quotas` when the namespace has a quota, else 0.
    quota: u16,
    cand_priority: u8,
    cand_use: u64,
    /// Neighbours in its namespace's list ([`NsList`]); `NO_ENTRY` at either end.
    ns_prev: u32,
    ns_next: u32,
    /// The last namespace walk that met this entry ([`Registry::begin_walk`]; 0: none).
    walk: u64,
}

/// No entry (the end of a namespace list).
const NO_ENTRY: u32 = u32::MAX;

/// How far up its would-be parent's chain a ghost looks for itself before it adopts that
/// parent ([`Registry::may_descend_from`]): 65,536 blocks is a million tokens at vLLM's
/// 16 per block, so a real prefix is always checked to its root.
pub const PARENT_WALK_BLOCKS: usize = 1 << 16;

/// Steps of such walks one hold of the registry lock may take, all adoptions together
/// ([`Registry::refill_walk_steps`]): a SAVE of ghosts that each name a parent deep in
/// a chain costs the lock what one block per block of the SAVE costs, not 65,536 each.
/// A walk the steps left cannot finish counts as a cycle (the link is not made).
pub const WALK_STEPS_PER_HOLD: usize = 1 << 16;

/// Steps of such walks a restart's restore may take per block restored, on top of one
/// hold's: bounds start-up however the chains on disk were made.
const RESTORE_WALK_STEPS_PER_BLOCK: usize = 16;

/// The entries of one namespace, linked through `Entry::ns_prev` / `ns_next`, so that a
/// CLEAR of a namespace visits that namespace's entries and nothing else (a walk over the
/// whole map, under the lock every session needs, let any tenant stall all the others
/// with CLEARs of a namespace holding nothing).
#[derive(Clone, Copy, Debug)]
struct NsList {
    first: u32,
    last: u32,
    len: u32,
}

impl Entry {
    fn present(&self, t: Tier) -> bool {
        self.slots[t] != NO_SLOT && self.pending & t.bit() == 0
    }
    fn eligible(&self, t: Tier) -> bool {
        self.present(t) && self.children[t] == 0 && self.leases == 0 && self.busy == 0
    }
    fn garbage(&self) -> bool {
        self.slots.values().all(|&s| s == NO_SLOT)
            && self.children.values().all(|&c| c == 0)
            && self.leases == 0
            && self.busy == 0
    }
    fn fastest(&self) -> Option<Tier> {
        Tier::ALL.into_iter().find(|&t| self.present(t))
    }
}

/// A block an NVMe scan found, for [`Registry::restore_all`].
#[derive(Clone, Copy, Debug)]
pub struct RestoredBlock {
    pub key: BlockKey,
    pub parent: Option<u64>,
    pub slot: u32,
    pub generation: u64,
}

/// A candidate's place in a tier's eviction order (lowest goes first): priority, last
/// use, entry index.
pub type EvictRank = (u8, u64, u32);

/// A read-only view of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryView {
    pub key: BlockKey,
    pub parent: Option<u64>,
    /// `Some(slot)` where present (published).
    pub present: PerTier<Option<u32>>,
    /// `Some(slot)` where reserved, not published.
    pub pending: PerTier<Option<u32>>,
    pub leases: u32,
    pub busy: u32,
    pub hits: u32,
    pub priority: u8,
    pub nvme_generation: u64,
}

impl EntryView {
    pub fn fastest(&self) -> Option<Tier> {
        Tier::ALL.into_iter().find(|&t| self.present[t].is_some())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("block {0:?} already has a slot in tier {1:?}")]
    AlreadyInTier(BlockKey, Tier),
    #[error("block {0:?} is not present in tier {1:?}")]
    NotInTier(BlockKey, Tier),
    #[error("block {0:?} is unknown")]
    Unknown(BlockKey),
    #[error("block {0:?} is leased or in use")]
    Busy(BlockKey),
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RegistryCounters {
    pub lookup_hits: u64,
    pub lookup_misses: u64,
    /// Indexed by `RemoveReason as usize`, per tier.
    pub removed: PerTier<[u64; 6]>,
}

/// What the map stores per key: enough to answer a lookup without touching the entry
/// (one cache miss per key instead of two).
#[derive(Clone, Copy, Debug)]
struct Slotref {
    idx: u32,
    /// Bit t: present (published) in tier t.
    present: u8,
    /// Sightings after the first save (lookup hits, loads, repeated saves); saturating.
    hits: u16,
}

/// Accounting of one namespace with a quota: slots it holds per tier (reserved or
/// published) and its own eviction candidates, so that a namespace at its limit evicts
/// its own least valuable block instead of a neighbour's.
struct NsQuota {
    namespace: u32,
    /// `u32::MAX`: unlimited in that tier.
    max_slots: PerTier<u32>,
    used_slots: PerTier<u32>,
    /// Slots allocated for the namespace by an operation that has not reserved them yet
    /// ([`Registry::alloc_claimed`]); they count against the quota so that two
    /// concurrent operations of one namespace cannot both take its last room.
    claimed_slots: PerTier<u32>,
    candidates: PerTier<BTreeSet<(u8, u64, u32)>>,
}

/// What a PIN leased: the leading `leased` blocks of its chain. It stopped at the first
/// block not stored, or (`at_cap`) at the session's cap on distinct pinned blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub leased: usize,
    pub at_cap: bool,
}

/// A namespace's quota and usage, for stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaUsage {
    pub namespace: u32,
    pub max_slots: PerTier<u32>,
    pub used_slots: PerTier<u32>,
}

pub struct Registry {
    map: HashMap<BlockKey, Slotref, BuildKeyHasher>,
    entries: Vec<Entry>,
    free_entries: Vec<u32>,
    alloc: PerTier<SlotAllocator>,
    candidates: PerTier<BTreeSet<(u8, u64, u32)>>,
    sessions: HashMap<SessionId, HashMap<BlockKey, u32, BuildKeyHasher>>,
    /// Slots taken out of an entry but not yet freed (e.g. an NVMe slot being tombstoned).
    detached: PerTier<HashSet<u32>>,
    /// Namespaces with a quota (set at start-up, before any block exists).
    quotas: Vec<NsQuota>,
    /// Each namespace's entries (namespaces with none have no list).
    ns_lists: HashMap<u32, NsList>,
    /// The last namespace walk begun (walks are numbered from 1).
    walks: u64,
    /// Steps left to this hold of the lock for ghosts' parent walks.
    walk_steps_left: usize,
    clock: u64,
    events: Vec<BlockEvent>,
    pub record_events: bool,
    pub counters: RegistryCounters,
}

impl Registry {
    /// A registry for tiers of `capacity[t]` slots.
    pub fn new(capacity: PerTier<u32>) -> Self {
        Registry {
            map: HashMap::with_hasher(BuildKeyHasher::default()),
            entries: Vec::new(),
            free_entries: Vec::new(),
            alloc: capacity.map(SlotAllocator::new),
            candidates: Default::default(),
            sessions: HashMap::default(),
            detached: Default::default(),
            quotas: Vec::new(),
            ns_lists: HashMap::new(),
            walks: 0,
            walk_steps_left: WALK_STEPS_PER_HOLD,
            clock: 1,
            events: Vec::new(),
            record_events: false,
            counters: RegistryCounters::default(),
        }
    }

    pub fn capacity(&self, tier: Tier) -> u32 {
        self.alloc[tier].capacity()
    }
    pub fn used(&self, tier: Tier) -> u32 {
        self.alloc[tier].used()
    }
    pub fn free_slots(&self, tier: Tier) -> u32 {
        self.alloc[tier].free_count()
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Limits `namespace` to `max_slots[t]` slots of tier t (`u32::MAX`: unlimited). Set
    /// at start-up, before any block is stored or restored.
    pub fn set_quota(&mut self, namespace: u32, max_slots: PerTier<u32>) {
        assert!(
            self.map.is_empty(),
            "quotas are set before any block exists"
        );
        assert!(self.quotas.len() < u16::MAX as usize, "too many quotas");
        match self.quotas.iter_mut().find(|q| q.namespace == namespace) {
            Some(q) => q.max_slots = max_slots,
            None => self.quotas.push(NsQuota {
                namespace,
                max_slots,
                used_slots: PerTier::default(),
                claimed_slots: PerTier::default(),
                candidates: Default::default(),
            }),
        }
    }

    /// Quota position (1-based; 0 = none) of a namespace. Linear: quotas are few
    /// (configured namespaces) and this runs once per new entry.
    fn quota_of(&self, namespace: u32) -> u16 {
        self.quotas
            .iter()
            .position(|q| q.namespace == namespace)
            .map_or(0, |i| i as u16 + 1)
    }

    /// Slots `namespace` may still take in `tier` (`u32::MAX` when it has no limit).
    pub fn quota_room(&self, namespace: u32, tier: Tier) -> u32 {
        match self.quota_of(namespace) {
            0 => u32::MAX,
            q => {
                let q = &self.quotas[q as usize - 1];
                let t = tier;
                if q.max_slots[t] == u32::MAX {
                    u32::MAX
                } else {
                    q.max_slots[t].saturating_sub(q.used_slots[t] + q.claimed_slots[t])
                }
            }
        }
    }

    /// The eviction candidate of `tier` among `namespace`'s own blocks (namespaces with a
    /// quota only).
    pub fn victim_in(&self, namespace: u32, tier: Tier) -> Option<BlockKey> {
        self.ranked_victim_in(namespace, tier).map(|(_, key)| key)
    }

    /// [`Self::victim_in`] with its place in the eviction order.
    pub fn ranked_victim_in(&self, namespace: u32, tier: Tier) -> Option<(EvictRank, BlockKey)> {
        let q = self.quota_of(namespace);
        if q == 0 {
            return None;
        }
        self.quotas[q as usize - 1].candidates[tier]
            .first()
            .map(|&rank| (rank, self.entries[rank.2 as usize].key))
    }

    /// Claimed slots of every namespace and tier (see [`Self::alloc_claimed`]).
    pub fn claimed_slots(&self) -> u64 {
        self.quotas
            .iter()
            .flat_map(|q| q.claimed_slots.values())
            .map(|&c| u64::from(c))
            .sum()
    }

    /// Every quota with its current usage.
    pub fn quota_usage(&self) -> Vec<QuotaUsage> {
        self.quotas
            .iter()
            .map(|q| QuotaUsage {
                namespace: q.namespace,
                max_slots: q.max_slots,
                used_slots: q.used_slots,
            })
            .collect()
    }

    fn count_slot(&mut self, i: u32, t: Tier, taken: bool) {
        let q = self.entries[i as usize].quota;
        if q != 0 {
            let used = &mut self.quotas[q as usize - 1].used_slots[t];
            *used = if taken { *used + 1 } else { *used - 1 };
        }
    }

    /// Takes the events recorded since the last call (when `record_events`).
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, BlockEvent> {
        self.events.drain(..)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn idx(&self, key: BlockKey) -> Option<u32> {
        self.map.get(&key).map(|r| r.idx)
    }

    /// Mirrors an entry's presence bits into its map value.
    fn sync_present(&mut self, i: u32) {
        let e = &self.entries[i as usize];
        let mut mask = 0u8;
        for t in Tier::ALL {
            if e.present(t) {
                mask |= t.bit();
            }
        }
        if let Some(r) = self.map.get_mut(&e.key) {
            r.present = mask;
        }
    }

    pub fn view(&self, key: BlockKey) -> Option<EntryView> {
        let r = *self.map.get(&key)?;
        let e = &self.entries[r.idx as usize];
        let mut present = PerTier::default();
        let mut pending = PerTier::default();
        for t in Tier::ALL {
            if e.slots[t] != NO_SLOT {
                if e.pending & t.bit() != 0 {
                    pending[t] = Some(e.slots[t]);
                } else {
                    present[t] = Some(e.slots[t]);
                }
            }
        }
        Some(EntryView {
            key: e.key,
            parent: e.parent,
            present,
            pending,
            leases: e.leases,
            busy: e.busy,
            hits: r.hits as u32,
            priority: e.priority,
            nvme_generation: e.nvme_generation,
        })
    }

    // ---- candidate bookkeeping -------------------------------------------------------

    fn uncand(&mut self, i: u32) {
        let e = &mut self.entries[i as usize];
        let (mask, p, u, q) = (e.cand, e.cand_priority, e.cand_use, e.quota);
        e.cand = 0;
        for t in Tier::ALL {
            if mask & t.bit() != 0 {
                self.candidates[t].remove(&(p, u, i));
                if q != 0 {
                    self.quotas[q as usize - 1].candidates[t].remove(&(p, u, i));
                }
            }
        }
    }

    fn recand(&mut self, i: u32) {
        self.uncand(i);
        let e = &mut self.entries[i as usize];
        let (p, u) = (e.priority, e.last_use);
        let mut mask = 0;
        for t in Tier::ALL {
            if e.eligible(t) {
                mask |= t.bit();
            }
        }
        e.cand = mask;
        e.cand_priority = p;
        e.cand_use = u;
        let q = e.quota;
        for t in Tier::ALL {
            if mask & t.bit() != 0 {
                self.candidates[t].insert((p, u, i));
                if q != 0 {
                    self.quotas[q as usize - 1].candidates[t].insert((p, u, i));
                }
            }
        }
    }

    fn get_or_create(&mut self, key: BlockKey, parent: Option<u64>, priority: u8) -> u32 {
        // A block cannot be its own prefix; treat such input as a root.
        let parent = parent.filter(|&p| p != key.hash);
        if let Some(i) = self.idx(key) {
            // A ghost made for its children learns its own parent, unless it holds a slot
            // (its parent's child counts never counted that slot, and would be taken
            // down when it goes) or the parent descends from it (a cycle: none of its
            // blocks would ever be a leaf, so none could be evicted).
            let e = &self.entries[i as usize];
            if let Some(p) = parent
                && e.parent.is_none()
                && e.slots.values().all(|&s| s == NO_SLOT)
                && !self.may_descend_from(key.namespace, p, key.hash)
            {
                self.entries[i as usize].parent = Some(p);
            }
            return i;
        }
        let entry = Entry {
            key,
            parent,
            slots: PerTier::splat(NO_SLOT),
            pending: 0,
            children: PerTier::default(),
            last_use: 0,
            priority,
            leases: 0,
            busy: 0,
            nvme_generation: 0,
            cand: 0,
            cand_priority: 0,
            cand_use: 0,
            quota: if self.quotas.is_empty() {
                0
            } else {
                self.quota_of(key.namespace)
            },
            ns_prev: NO_ENTRY,
            ns_next: NO_ENTRY,
            walk: 0,
        };
        let i = match self.free_entries.pop() {
            Some(i) => {
                self.entries[i as usize] = entry;
                i
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        self.map.insert(
            key,
            Slotref {
                idx: i,
                present: 0,
                hits: 0,
            },
        );
        self.ns_push_back(i);
        i
    }

    fn gc(&mut self, i: u32) {
        if self.entries[i as usize].garbage() {
            self.uncand(i);
            self.ns_unlink(i);
            let key = self.entries[i as usize].key;
            self.map.remove(&key);
            self.free_entries.push(i);
        }
    }

    /// Appends entry `i` (not in any list) to its namespace's list.
    fn ns_push_back(&mut self, i: u32) {
        let ns = self.entries[i as usize].key.namespace;
        let list = self.ns_lists.entry(ns).or_insert(NsList {
            first: NO_ENTRY,
            last: NO_ENTRY,
            len: 0,
        });
        let last = list.last;
        list.last = i;
        list.len += 1;
        if last == NO_ENTRY {
            list.first = i;
        }
        let e = &mut self.entries[i as usize];
        e.ns_prev = last;
        e.ns_next = NO_ENTRY;
        if last != NO_ENTRY {
            self.entries[last as usize].ns_next = i;
        }
    }

    /// Takes entry `i` out of its namespace's list (dropping the list when it empties).
    fn ns_unlink(&mut self, i: u32) {
        let (ns, prev, next) = {
            let e = &self.entries[i as usize];
            (e.key.namespace, e.ns_prev, e.ns_next)
        };
        if prev != NO_ENTRY {
            self.entries[prev as usize].ns_next = next;
        }
        if next != NO_ENTRY {
            self.entries[next as usize].ns_prev = prev;
        }
        let list = self
            .ns_lists
            .get_mut(&ns)
            .expect("a live entry is in its namespace's list");
        if list.first == i {
            list.first = next;
        }
        if list.last == i {
            list.last = prev;
        }
        list.len -= 1;
        if list.len == 0 {
            self.ns_lists.remove(&ns);
        }
        let e = &mut self.entries[i as usize];
        e.ns_prev = NO_ENTRY;
        e.ns_next = NO_ENTRY;
    }

    /// Whether block `hash` of `namespace` may have `ancestor` among its prefixes (itself
    /// included): its parent links are followed up to [`PARENT_WALK_BLOCKS`] steps, and
    /// no further than the steps left to this hold of the lock; a chain longer than that
    /// counts as may (the link it guards is then not made: the block's eviction order and
    /// the parent its events name lose it), so a tenant's long chains cannot make
    /// adoptions cost the lock more than the steps of one hold.
    fn may_descend_from(&mut self, namespace: u32, hash: u64, ancestor: u64) -> bool {
        let steps = PARENT_WALK_BLOCKS.min(self.walk_steps_left);
        let mut at = Some(hash);
        for step in 0..steps {
            match at {
                None => {
                    self.walk_steps_left -= step;
                    return false;
                }
                Some(h) if h == ancestor => {
                    self.walk_steps_left -= step;
                    return true;
                }
                Some(h) => {
                    at = self
                        .idx(BlockKey::new(namespace, h))
                        .and_then(|i| self.entries[i as usize].parent);
                }
            }
        }
        self.walk_steps_left -= steps;
        at.is_some()
    }

    /// A new hold of the lock: its ghosts' parent walks may take [`WALK_STEPS_PER_HOLD`]
    /// steps again.
    pub fn refill_walk_steps(&mut self) {
        self.walk_steps_left = WALK_STEPS_PER_HOLD;
    }

    /// Parent's child count in tier `t` changes by `delta` (creating a ghost parent entry
    /// when the parent is not stored, so the count survives until it is).
    fn adjust_parent(&mut self, i: u32, t: Tier, up: bool) {
        let e = &self.entries[i as usize];
        let Some(ph) = e.parent else { return };
        let pkey = BlockKey::new(e.key.namespace, ph);
        let pi = if up {
            self.get_or_create(pkey, None, 0)
        } else {
            match self.idx(pkey) {
                Some(pi) => pi,
                None => return,
            }
        };
        let p = &mut self.entries[pi as usize];
        if up {
            p.children[t] += 1;
        } else {
            p.children[t] = p.children[t].saturating_sub(1);
        }
        self.recand(pi);
        if !up {
            self.gc(pi);
        }
    }

    // ---- queries --------------------------------------------------------------------

    /// Leading blocks of the chain present in some tier; `out_tiers[i]` gets the fastest
    /// tier of block i (`None` after the prefix). Counts a hit per found block.
    /// Read-mostly: does not touch LRU order (a following load does).
    pub fn lookup(
        &mut self,
        namespace: u32,
        hashes: &[u64],
        out_tiers: &mut [Option<Tier>],
    ) -> usize {
        let n = hashes.len().min(out_tiers.len());
        let mut hits = 0;
        for i in 0..n {
            let tier = match self.map.get_mut(&BlockKey::new(namespace, hashes[i])) {
                Some(r) if r.present != 0 => {
                    r.hits = r.hits.saturating_add(1);
                    // Bit order is speed order: the lowest set bit is the fastest tier.
                    Tier::ALL[r.present.trailing_zeros() as usize]
                }
                _ => break,
            };
            out_tiers[i] = Some(tier);
            hits += 1;
        }
        for t in out_tiers.iter_mut().take(n).skip(hits) {
            *t = None;
        }
        self.counters.lookup_hits += hits as u64;
        self.counters.lookup_misses += (n - hits) as u64;
        hits
    }

    /// The fastest tier `key` is present in.
    pub fn fastest(&self, key: BlockKey) -> Option<Tier> {
        self.idx(key)
            .and_then(|i| self.entries[i as usize].fastest())
    }

    /// Number of times a block was seen (saved again, looked up, loaded). NVMe admission.
    pub fn seen(&self, key: BlockKey) -> u32 {
        self.map.get(&key).map(|r| r.hits as u32).unwrap_or(0)
    }

    /// Marks a use: LRU position and the seen count.
    pub fn touch(&mut self, key: BlockKey) {
        if let Some(i) = self.idx(key) {
            let now = self.tick();
            self.entries[i as usize].last_use = now;
            if let Some(r) = self.map.get_mut(&key) {
                r.hits = r.hits.saturating_add(1);
            }
            self.recand(i);
        }
    }

    // ---- slots ----------------------------------------------------------------------

    pub fn alloc_free(&mut self, tier: Tier) -> Option<u32> {
        self.alloc[tier].alloc()
    }

    /// A free slot of `tier` for an operation of `namespace` that reserves it later (in
    /// another lock hold): until [`Self::unclaim`] it counts against the namespace's
    /// quota.
    pub fn alloc_claimed(&mut self, namespace: u32, tier: Tier) -> Option<u32> {
        let slot = self.alloc[tier].alloc()?;
        if let q @ 1.. = self.quota_of(namespace) {
            self.quotas[q as usize - 1].claimed_slots[tier] += 1;
        }
        Some(slot)
    }

    /// Ends the claim on `slots` slots of `tier` taken by [`Self::alloc_claimed`] for
    /// `namespace`: each is now reserved (counted as used) or freed.
    pub fn unclaim(&mut self, namespace: u32, tier: Tier, slots: usize) {
        if let q @ 1.. = self.quota_of(namespace) {
            let claimed = &mut self.quotas[q as usize - 1].claimed_slots[tier];
            // A bug, not tenant input: loud in tests, and in release it must not take
            // the registry (everyone's) down with it.
            debug_assert!(
                slots as u64 <= u64::from(*claimed),
                "namespace {namespace:#x} tier {tier}: unclaiming {slots} of {claimed} claimed slots"
            );
            *claimed = claimed.saturating_sub(u32::try_from(slots).unwrap_or(u32::MAX));
        }
    }

    /// Returns a slot obtained from `alloc_free` or `alloc_claimed` (unclaimed first) but
    /// never reserved.
    pub fn free_unused(&mut self, tier: Tier, slot: u32) {
        self.alloc[tier].free(slot);
    }

    /// The next eviction candidate of a tier.
    pub fn victim(&self, tier: Tier) -> Option<BlockKey> {
        self.ranked_victim(tier).map(|(_, key)| key)
    }

    /// [`Self::victim`] with its place in the eviction order.
    pub fn ranked_victim(&self, tier: Tier) -> Option<(EvictRank, BlockKey)> {
        self.candidates[tier]
            .first()
            .map(|&rank| (rank, self.entries[rank.2 as usize].key))
    }

    /// The parent of `child` when it would be an eviction candidate of `tier` once
    /// `child` (present there, about to leave it) is gone: present in `tier` with no
    /// other child there, not leased, not in use. With its place in the eviction order,
    /// so that a plan making room can take it in the same round as the child.
    pub fn parent_freed_by(&self, child: BlockKey, tier: Tier) -> Option<(EvictRank, BlockKey)> {
        let parent = BlockKey::new(
            child.namespace,
            self.entries[self.idx(child)? as usize].parent?,
        );
        let i = self.idx(parent)?;
        let e = &self.entries[i as usize];
        (e.present(tier) && e.children[tier] == 1 && e.leases == 0 && e.busy == 0)
            .then_some(((e.priority, e.last_use, i), parent))
    }

    /// Whether `key` could be evicted from `tier` now.
    pub fn evictable(&self, key: BlockKey, tier: Tier) -> bool {
        self.idx(key)
            .is_some_and(|i| self.entries[i as usize].eligible(tier))
    }

    /// Reserves `slot` of `tier` for `key` (not visible until `publish`).
    pub fn reserve(
        &mut self,
        key: BlockKey,
        parent: Option<u64>,
        priority: u8,
        tier: Tier,
        slot: u32,
    ) -> Result<(), RegistryError> {
        let t = tier;
        debug_assert!(self.alloc[t].is_used(slot));
        let i = self.get_or_create(key, parent, priority);
        let e = &mut self.entries[i as usize];
        if e.slots[t] != NO_SLOT {
            self.gc(i);
            return Err(RegistryError::AlreadyInTier(key, tier));
        }
        e.slots[t] = slot;
        e.pending |= t.bit();
        if e.leases == 0 && e.busy == 0 && e.slots.values().filter(|&&s| s != NO_SLOT).count() == 1
        {
            e.priority = priority;
        }
        self.count_slot(i, t, true);
        Ok(())
    }

    /// Publishes a reserved slot: visible to lookups, counted for the parent.
    pub fn publish(
        &mut self,
        key: BlockKey,
        tier: Tier,
        nvme_generation: u64,
    ) -> Result<(), RegistryError> {
        let t = tier;
        let i = self.idx(key).ok_or(RegistryError::Unknown(key))?;
        let now = self.tick();
        let e = &mut self.entries[i as usize];
        if e.slots[t] == NO_SLOT || e.pending & t.bit() == 0 {
            return Err(RegistryError::NotInTier(key, tier));
        }
        e.pending &= !t.bit();
        e.last_use = now;
        if tier == Tier::Nvme {
            e.nvme_generation = nvme_generation;
        }
        let parent = e.parent;
        self.sync_present(i);
        self.adjust_parent(i, t, true);
        self.recand(i);
        if self.record_events {
            self.events.push(BlockEvent::Stored {
                namespace: key.namespace,
                hash: key.hash,
                parent,
                tier,
            });
        }
        Ok(())
    }

    /// Gives up a reservation (the slot returns to the free list).
    pub fn abort(&mut self, key: BlockKey, tier: Tier) -> Result<(), RegistryError> {
        self.abort_slot(key, tier, false).map(drop)
    }

    /// [`Self::abort`], the slot staying allocated and detached until
    /// [`Self::free_detached`] (an NVMe slot whose header must be erased first: the
    /// aborted write may have landed, or it may still hold the block evicted for it).
    pub fn abort_detached(&mut self, key: BlockKey, tier: Tier) -> Result<u32, RegistryError> {
        self.abort_slot(key, tier, true)
    }

    /// Sets aside a slot taken by `alloc_free`/`alloc_claimed` and never reserved, as
    /// [`Self::abort_detached`] does.
    pub fn detach_unused(&mut self, tier: Tier, slot: u32) {
        self.detached[tier].insert(slot);
    }

    fn abort_slot(
        &mut self,
        key: BlockKey,
        tier: Tier,
        detach: bool,
    ) -> Result<u32, RegistryError> {
        let t = tier;
        let i = self.idx(key).ok_or(RegistryError::Unknown(key))?;
        let e = &mut self.entries[i as usize];
        if e.slots[t] == NO_SLOT || e.pending & t.bit() == 0 {
            return Err(RegistryError::NotInTier(key, tier));
        }
        let slot = e.slots[t];
        e.slots[t] = NO_SLOT;
        e.pending &= !t.bit();
        if detach {
            self.detached[t].insert(slot);
        } else {
            self.alloc[t].free(slot);
        }
        self.count_slot(i, t, false);
        self.recand(i);
        self.gc(i);
        Ok(slot)
    }

    /// Takes `key` out of `tier` (present, not pending); frees the slot unless `detach`, in
    /// which case the slot stays allocated until `free_detached` (so it cannot be reused
    /// while, e.g., its NVMe header is being erased). Ignores leases: callers check.
    pub fn remove_tier(
        &mut self,
        key: BlockKey,
        tier: Tier,
        reason: RemoveReason,
        detach: bool,
    ) -> Result<u32, RegistryError> {
        let t = tier;
        let i = self.idx(key).ok_or(RegistryError::Unknown(key))?;
        if !self.entries[i as usize].present(t) {
            return Err(RegistryError::NotInTier(key, tier));
        }
        self.adjust_parent(i, t, false);
        let e = &mut self.entries[i as usize];
        let slot = e.slots[t];
        e.slots[t] = NO_SLOT;
        let parent = e.parent;
        self.count_slot(i, t, false);
        if detach {
            self.detached[t].insert(slot);
        } else {
            self.alloc[t].free(slot);
        }
        self.sync_present(i);
        self.counters.removed[t][reason as usize] += 1;
        if self.record_events {
            self.events.push(BlockEvent::Removed {
                namespace: key.namespace,
                hash: key.hash,
                parent,
                tier,
                reason,
            });
        }
        self.recand(i);
        self.gc(i);
        Ok(slot)
    }

    /// Evicts `key` from `tier` if it is a candidate; the slot is freed.
    pub fn evict(
        &mut self,
        key: BlockKey,
        tier: Tier,
        reason: RemoveReason,
    ) -> Result<u32, RegistryError> {
        if !self.evictable(key, tier) {
            return Err(RegistryError::Busy(key));
        }
        self.remove_tier(key, tier, reason, false)
    }

    pub fn free_detached(&mut self, tier: Tier, slot: u32) {
        if self.detached[tier].remove(&slot) {
            self.alloc[tier].free(slot);
        }
    }

    /// Restores the blocks the NVMe scan found in `tier`'s slots, in order (oldest
    /// first: LRU order by generation). Their slots are claimed at once; a block whose
    /// slot was taken, or which cannot be reserved, gives its slot back and is returned
    /// with the error.
    pub fn restore_all(
        &mut self,
        tier: Tier,
        blocks: &[RestoredBlock],
    ) -> Vec<(RestoredBlock, RegistryError)> {
        // Start-up is one hold: its ghosts' parent walks get steps in proportion to the
        // blocks. (Blocks reach NVMe leaf first, so children come back before their
        // parents, each parent adopting its own when its turn comes: one step each.)
        self.walk_steps_left = WALK_STEPS_PER_HOLD
            .saturating_add(blocks.len().saturating_mul(RESTORE_WALK_STEPS_PER_BLOCK));
        let slots: Vec<u32> = blocks.iter().map(|b| b.slot).collect();
        let taken = self.alloc[tier].claim_many(&slots);
        let mut refused = Vec::new();
        for (b, taken) in blocks.iter().zip(taken) {
            if !taken {
                refused.push((*b, RegistryError::AlreadyInTier(b.key, tier)));
                continue;
            }
            let restored = self
                .reserve(b.key, b.parent, 0, tier, b.slot)
                .inspect_err(|_| self.alloc[tier].free(b.slot))
                .and_then(|()| self.publish(b.key, tier, b.generation));
            if let Err(e) = restored {
                refused.push((*b, e));
            }
        }
        refused
    }

    // ---- in-flight operations ----------------------------------------------------------

    /// Holds `key` against eviction and drop while an operation uses its bytes.
    pub fn begin_use(&mut self, key: BlockKey) -> bool {
        let Some(i) = self.idx(key) else { return false };
        self.entries[i as usize].busy += 1;
        self.recand(i);
        true
    }

    pub fn end_use(&mut self, key: BlockKey) {
        if let Some(i) = self.idx(key) {
            let e = &mut self.entries[i as usize];
            e.busy = e.busy.saturating_sub(1);
            self.recand(i);
            self.gc(i);
        }
    }

    // ---- leases ---------------------------------------------------------------------

    /// Pins the leading present blocks of the chain for `session`, holding at most
    /// `max_blocks` distinct blocks pinned at once.
    pub fn pin(
        &mut self,
        session: SessionId,
        namespace: u32,
        hashes: &[u64],
        max_blocks: usize,
    ) -> Pinned {
        let mut n = 0;
        for &h in hashes {
            let key = BlockKey::new(namespace, h);
            let Some(i) = self.idx(key) else { break };
            // A block at the most leases a count can hold pins no further (the same
            // hash repeated in PINs must not wrap it to 0, unprotecting everyone's).
            // A session's own count is at most the block's, so it cannot wrap either.
            if self.entries[i as usize].fastest().is_none()
                || self.entries[i as usize].leases == u32::MAX
            {
                break;
            }
            // The session's distinct pinned blocks are capped: each costs the registry
            // a map entry, and each is a block no eviction may take.
            let held = self.sessions.get(&session);
            if held.map_or(0, HashMap::len) >= max_blocks
                && !held.is_some_and(|m| m.contains_key(&key))
            {
                return Pinned {
                    leased: n,
                    at_cap: true,
                };
            }
            self.entries[i as usize].leases += 1;
            self.recand(i);
            *self
                .sessions
                .entry(session)
                .or_default()
                .entry(key)
                .or_insert(0) += 1;
            n += 1;
        }
        Pinned {
            leased: n,
            at_cap: false,
        }
    }

    /// Drops one lease of `session` on each block it holds; returns how many.
    pub fn unpin(&mut self, session: SessionId, namespace: u32, hashes: &[u64]) -> usize {
        let mut n = 0;
        let Some(held) = self.sessions.get_mut(&session) else {
            return 0;
        };
        let mut touched = Vec::new();
        for &h in hashes {
            let key = BlockKey::new(namespace, h);
            if let Some(c) = held.get_mut(&key) {
                *c -= 1;
                if *c == 0 {
                    held.remove(&key);
                }
                touched.push(key);
                n += 1;
            }
        }
        if held.is_empty() {
            self.sessions.remove(&session);
        }
        for key in touched {
            if let Some(i) = self.idx(key) {
                let e = &mut self.entries[i as usize];
                e.leases = e.leases.saturating_sub(1);
                self.recand(i);
                self.gc(i);
            }
        }
        n
    }

    /// Drops every lease of `session` (engine ended or died); returns leases released.
    pub fn release_session(&mut self, session: SessionId) -> u64 {
        let Some(held) = self.sessions.remove(&session) else {
            return 0;
        };
        let mut total = 0u64;
        for (key, count) in held {
            total += count as u64;
            if let Some(i) = self.idx(key) {
                let e = &mut self.entries[i as usize];
                e.leases = e.leases.saturating_sub(count);
                self.recand(i);
                self.gc(i);
            }
        }
        total
    }

    pub fn session_leases(&self, session: SessionId) -> u64 {
        self.sessions
            .get(&session)
            .map(|h| h.values().map(|&c| c as u64).sum())
            .unwrap_or(0)
    }

    /// Every block present in some tier: `(key, parent, tiers present)`, for the router
    /// snapshot (control plane; O(blocks) under the lock).
    pub fn snapshot(&self) -> Vec<(BlockKey, Option<u64>, PerTier<bool>)> {
        self.map
            .values()
            .filter(|r| r.present != 0)
            .map(|r| {
                let e = &self.entries[r.idx as usize];
                (
                    e.key,
                    e.parent,
                    PerTier::from_fn(|t| r.present & t.bit() != 0),
                )
            })
            .collect()
    }

    /// Entries of a namespace (stored blocks and the prefixes their children keep).
    pub fn namespace_len(&self, namespace: u32) -> u32 {
        self.ns_lists.get(&namespace).map_or(0, |l| l.len)
    }

    /// A new walk of a namespace's entries, for [`Registry::rotate_namespace`].
    pub fn begin_walk(&mut self) -> u64 {
        self.walks += 1;
        self.walks
    }

    /// The key of the namespace's first entry, which `walk` meets now and which moves to
    /// the end of the list; `None` once the first entry is one `walk` met already (it
    /// came round) or the list is empty. A CLEAR calls this in chunks, with the lock
    /// released between them: it meets each entry the namespace had when it began once,
    /// wherever entries are collected meanwhile, and stops at the first entry it met
    /// before that is still there. Entries made meanwhile join the list's end and may be
    /// met too (when every entry met before them went). A walk begun later (a second
    /// CLEAR of the namespace in between) restamps what it meets; this walk stops at such
    /// an entry too, since everything ahead of it when it was moved back has been met by
    /// one walk or the other since: no walk meets an entry twice, and each entry is met
    /// by one of them. Callers also stop after `namespace_len` at the walk's start.
    pub fn rotate_namespace(&mut self, namespace: u32, walk: u64) -> Option<BlockKey> {
        let i = self.ns_lists.get(&namespace)?.first;
        let e = &mut self.entries[i as usize];
        if e.walk >= walk {
            return None;
        }
        e.walk = walk;
        self.ns_unlink(i);
        self.ns_push_back(i);
        Some(self.entries[i as usize].key)
    }

    /// Whether `key` may be dropped now (no leases, nothing in flight, nothing pending).
    pub fn droppable(&self, key: BlockKey) -> bool {
        self.idx(key).is_some_and(|i| {
            let e = &self.entries[i as usize];
            e.leases == 0 && e.busy == 0 && e.pending == 0
        })
    }

    // ---- invariants -----------------------------------------------------------------

    /// Checks every structural invariant; `Err` describes the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut owner: PerTier<HashMap<u32, BlockKey>> = Default::default();
        let mut children: HashMap<BlockKey, PerTier<u32>> = HashMap::new();
        let mut eligible = PerTier::<usize>::default();
        let mut quota_used = vec![PerTier::<u32>::default(); self.quotas.len()];
        let mut quota_eligible = vec![PerTier::<usize>::default(); self.quotas.len()];
        for t in Tier::ALL {
            self.alloc[t]
                .check()
                .map_err(|e| format!("tier {t}: {e}"))?;
        }
        for (&key, r) in &self.map {
            let i = r.idx;
            let e = self
                .entries
                .get(i as usize)
                .ok_or(format!("{key:?}: index {i} out of range"))?;
            if e.key != key {
                return Err(format!("{key:?}: entry holds {:?}", e.key));
            }
            let mask = Tier::ALL
                .into_iter()
                .filter(|&t| e.present(t))
                .fold(0u8, |m, t| m | t.bit());
            if mask != r.present {
                return Err(format!(
                    "{key:?}: map presence {:#b}, entry {mask:#b}",
                    r.present
                ));
            }
            if self.free_entries.contains(&i) {
                return Err(format!("{key:?}: entry index {i} both used and free"));
            }
            if e.garbage() {
                return Err(format!("{key:?}: empty entry not collected (leak)"));
            }
            if e.quota != self.quota_of(key.namespace) {
                return Err(format!("{key:?}: quota index {} is stale", e.quota));
            }
            if e.leases > 0 && e.fastest().is_none() {
                return Err(format!(
                    "{key:?}: leased but present nowhere (lease not respected)"
                ));
            }
            for t in Tier::ALL {
                let s = e.slots[t];
                if s != NO_SLOT {
                    if !self.alloc[t].is_used(s) {
                        return Err(format!("{key:?}: tier {t} slot {s} is on the free list"));
                    }
                    if let Some(other) = owner[t].insert(s, key) {
                        return Err(format!("tier {t} slot {s} owned by {key:?} and {other:?}"));
                    }
                    if self.detached[t].contains(&s) {
                        return Err(format!("tier {t} slot {s} both detached and owned"));
                    }
                }
                if e.present(t)
                    && let Some(p) = e.parent
                {
                    children.entry(BlockKey::new(key.namespace, p)).or_default()[t] += 1;
                }
                let in_set = self.candidates[t].contains(&(e.cand_priority, e.cand_use, i));
                let flagged = e.cand & t.bit() != 0;
                if e.eligible(t) != flagged || flagged != in_set {
                    return Err(format!(
                        "{key:?}: tier {t} candidate state wrong (eligible {}, flagged {flagged}, in set {in_set})",
                        e.eligible(t)
                    ));
                }
                if flagged && (e.cand_priority, e.cand_use) != (e.priority, e.last_use) {
                    return Err(format!("{key:?}: stale candidate order key"));
                }
                if e.eligible(t) {
                    eligible[t] += 1;
                }
                if e.quota != 0 {
                    let q = e.quota as usize - 1;
                    quota_used[q][t] += u32::from(s != NO_SLOT);
                    quota_eligible[q][t] += usize::from(e.eligible(t));
                    let in_own =
                        self.quotas[q].candidates[t].contains(&(e.cand_priority, e.cand_use, i));
                    if in_own != flagged {
                        return Err(format!(
                            "{key:?}: tier {t} namespace candidate set disagrees"
                        ));
                    }
                }
            }
        }
        for t in Tier::ALL {
            if self.candidates[t].len() != eligible[t] {
                return Err(format!(
                    "tier {t}: {} candidates for {} eligible",
                    self.candidates[t].len(),
                    eligible[t]
                ));
            }
            let used = self.alloc[t].used() as usize;
            if owner[t].len() + self.detached[t].len() != used {
                return Err(format!(
                    "tier {t}: {used} slots used but {} owned + {} detached (leaked slot)",
                    owner[t].len(),
                    self.detached[t].len()
                ));
            }
        }
        for (q, quota) in self.quotas.iter().enumerate() {
            for t in Tier::ALL {
                if quota.used_slots[t] != quota_used[q][t] {
                    return Err(format!(
                        "namespace {:#x} tier {t}: {} slots counted, {} held",
                        quota.namespace, quota.used_slots[t], quota_used[q][t]
                    ));
                }
                if quota.candidates[t].len() != quota_eligible[q][t] {
                    return Err(format!(
                        "namespace {:#x} tier {t}: {} candidates for {} eligible",
                        quota.namespace,
                        quota.candidates[t].len(),
                        quota_eligible[q][t]
                    ));
                }
            }
        }
        for (&key, &Slotref { idx: i, .. }) in &self.map {
            let want = children.get(&key).copied().unwrap_or_default();
            if self.entries[i as usize].children != want {
                return Err(format!(
                    "{key:?}: child counts {:?}, recount {want:?}",
                    self.entries[i as usize].children
                ));
            }
        }
        for (key, counts) in &children {
            if !self.map.contains_key(key) && counts.values().any(|&c| c != 0) {
                return Err(format!("parent {key:?} of stored children has no entry"));
            }
        }
        let mut leases: HashMap<BlockKey, u32> = HashMap::new();
        for held in self.sessions.values() {
            for (&k, &c) in held {
                if c == 0 {
                    return Err(format!("{k:?}: zero lease count kept"));
                }
                *leases.entry(k).or_default() += c;
            }
        }
        for (&key, &Slotref { idx: i, .. }) in &self.map {
            let want = leases.get(&key).copied().unwrap_or(0);
            if self.entries[i as usize].leases != want {
                return Err(format!(
                    "{key:?}: {} leases, sessions hold {want}",
                    self.entries[i as usize].leases
                ));
            }
        }
        for key in leases.keys() {
            if !self.map.contains_key(key) {
                return Err(format!("session lease on {key:?}, which has no entry"));
            }
        }
        let mut listed = 0usize;
        for (&ns, list) in &self.ns_lists {
            let (mut prev, mut i, mut len) = (NO_ENTRY, list.first, 0u32);
            while i != NO_ENTRY {
                let e = self
                    .entries
                    .get(i as usize)
                    .ok_or(format!("namespace {ns:#x}: list index {i} out of range"))?;
                if e.key.namespace != ns || self.idx(e.key) != Some(i) {
                    return Err(format!("namespace {ns:#x}: list holds {:?} at {i}", e.key));
                }
                if e.ns_prev != prev {
                    return Err(format!("namespace {ns:#x}: {:?} links back wrongly", e.key));
                }
                len += 1;
                if len > list.len {
                    return Err(format!("namespace {ns:#x}: list longer than {}", list.len));
                }
                (prev, i) = (i, e.ns_next);
            }
            if len != list.len || prev != list.last || len == 0 {
                return Err(format!(
                    "namespace {ns:#x}: {len} entries listed, {} counted",
                    list.len
                ));
            }
            listed += len as usize;
        }
        if listed != self.map.len() {
            return Err(format!(
                "{listed} entries in namespace lists, {} in the map",
                self.map.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
