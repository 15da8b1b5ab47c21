//! Transfer plans: what the block manager decided and reserved, for the mover
//! (`crate::dataplane::mover`) to execute and the manager to commit.
//!
//! A plan holds reservations in the registry (pending slots, blocks held busy) and owns
//! allocated-but-unassigned slots. Every plan is handed back to the manager exactly once,
//! through its `commit_*` or `abort_*`, with what the mover did; plans are `#[must_use]`
//! so a dropped one shows up in review rather than as a leaked slot (the registry's
//! invariant check finds it too). Plans carry slot numbers only: nothing here points at
//! bytes.

use super::registry::BlockKey;
use crate::tier::Tier;

/// One block to copy to an NVMe slot: a host block (a demotion, or a write-through
/// save), or a G1 block written straight from the GPU (a G1 victim the host tier has no
/// room for, where the daemon moves NVMe <-> G1 directly: `Stores::nvme_g1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeWrite {
    pub key: BlockKey,
    pub parent: Option<u64>,
    /// Tier (`Host` or `Hbm`) and slot holding the bytes to write.
    pub from: (Tier, u32),
    pub nvme_slot: u32,
    /// Generation written in the slot header (orders copies across restarts).
    pub generation: u64,
}

/// One NVMe slot to read into a reserved host slot and verify (a load staging a block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeRead {
    /// Index of the block in the load's chain.
    pub index: usize,
    pub key: BlockKey,
    pub nvme_slot: u32,
    /// The slot reserved for the copy: a host slot, or a G1 slot when the block is read
    /// straight into G1 (`Stores::nvme_g1`).
    pub tier: Tier,
    pub slot: u32,
    /// Generation the registry knows for the copy; the header must carry it.
    pub generation: u64,
}

/// Making room in a tier: slots already free (allocated to the plan) and the demotions that
/// free more once their copies in the tier below are written.
#[must_use = "hand the room back with BlockManager::commit_room"]
#[derive(Debug)]
pub struct RoomPlan {
    pub(super) want: usize,
    /// The namespace room is made for: slots freed for the plan are claimed for it.
    pub(super) namespace: u32,
    /// Blocks to copy to NVMe: host victims, and G1 victims written straight from G1
    /// (added by `reserve_copies_down`); each held busy until `commit_room`.
    pub demotions: Vec<NvmeWrite>,
    /// G1 blocks with no copy in any other tier, to copy down to the host tier (one
    /// batched copy) rather than lose; each held busy until `commit_room`. Their host
    /// slots are set by `reserve_copies_down` (`to` is `(Host, u32::MAX)` before).
    pub copies_down: Vec<TierCopy>,
}

impl RoomPlan {
    /// Nothing left to execute: the room plan is complete as planned.
    pub fn is_settled(&self) -> bool {
        self.demotions.is_empty() && self.copies_down.is_empty()
    }
}

/// One block a save stores: its chain index and the reserved host slot the mover fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreItem {
    pub index: usize,
    pub key: BlockKey,
    pub parent: Option<u64>,
    pub host_slot: u32,
}

/// A stored block's second copy in G1, for a save that asked to keep its blocks on the GPU:
/// `stores[store]` is also gathered into G1 slot `hbm_slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HbmCopy {
    pub store: usize,
    pub hbm_slot: u32,
}

/// A save: the host slots reserved for the blocks to store (chain order), their G1 copies
/// when the engine asked to keep them on the GPU, and, for a write-through save once
/// filled, their NVMe copies.
#[must_use = "hand the plan back with commit_save or abort_save"]
#[derive(Debug, Default)]
pub struct SavePlan {
    pub(super) namespace: u32,
    pub(super) priority: u8,
    /// Blocks to store, in chain order.
    pub stores: Vec<StoreItem>,
    /// G1 copies of a leading run of `stores` (after `reserve_save_hbm`).
    pub hbm: Vec<HbmCopy>,
    /// Write-through copies of stored blocks (after `plan_write_through`).
    pub writes: Vec<NvmeWrite>,
    /// Blocks that need a host slot (before `reserve_save`).
    pub(super) need: Vec<StoreItem>,
    /// What the save did so far (already present, no space, demotions written).
    pub report: super::SaveReport,
}

impl SavePlan {
    /// Host slots the save needs (to find with `plan_room` before `reserve_save`).
    pub fn slots_needed(&self) -> usize {
        self.need.len()
    }
}

/// Where one loaded block's bytes are read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadItem {
    pub index: usize,
    pub key: BlockKey,
    /// Tier the block was found in (`Nvme` when staged through the host).
    pub found: Tier,
    /// Tier and slot holding the bytes the mover reads (`Host` for a staged block).
    pub tier: Tier,
    pub slot: u32,
}

/// A load: the leading stored blocks, held busy; the NVMe-only ones need staging into
/// host slots first (`plan_staging`).
#[must_use = "hand the plan back with commit_load"]
#[derive(Debug, Default)]
pub struct LoadPlan {
    pub(super) namespace: u32,
    /// Blocks to serve, chain order; a staged block's slot is set by `plan_staging`.
    pub items: Vec<LoadItem>,
    /// Chain indices of `items` only on NVMe.
    pub(super) staged: Vec<usize>,
    /// Reads of the staging step.
    pub reads: Vec<NvmeRead>,
    /// Why the load stops before the end of the chain (chain index), if it does.
    pub(super) failure: Option<(usize, super::LoadFailure)>,
}

impl LoadPlan {
    /// Blocks that must be staged from NVMe before the load can be served.
    pub fn needs_staging(&self) -> usize {
        self.staged.len()
    }
}

/// The blocks a reported load still holds busy while its copies land.
#[must_use = "hand the holds back with release_load"]
#[derive(Debug, Default)]
pub struct LoadHolds {
    pub(super) items: Vec<LoadItem>,
}

/// One copy between two tiers' slots (promotion G2 -> G1, demotion G1 -> G2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierCopy {
    pub key: BlockKey,
    pub from: (Tier, u32),
    pub to: (Tier, u32),
}

/// A promotion: host blocks to copy into reserved G1 slots.
#[must_use = "hand the plan back with commit_promote"]
#[derive(Debug, Default)]
pub struct PromotePlan {
    pub copies: Vec<TierCopy>,
    /// Leading blocks already in G1 before the copies.
    pub(super) already: usize,
}

/// A drop: NVMe slots whose headers must be erased before the slots are reused (so a
/// restart does not bring the blocks back).
#[must_use = "hand the plan back with commit_drop"]
#[derive(Debug, Default)]
pub struct DropPlan {
    pub erase_nvme: Vec<u32>,
    pub(super) report: super::DropReport,
}
