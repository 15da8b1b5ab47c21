//! Block operations as plan, execute, commit: the block manager plans (reserves slots,
//! holds blocks), the mover executes (moves bytes), the manager commits (publishes what
//! landed, releases what failed, emits events). Each function here is one operation's
//! sequence of those steps; none touches the registry or the bytes itself.
//!
//! How engine pages reach the tiers is the caller's: `fill` / `drain` run the mover's
//! gather/scatter for an engine session, or the mover's closure variants for tools and
//! tests that are their own engine.

use crate::block::plan::{LoadItem, StoreItem};
use crate::block::{BlockError, BlockManager, LoadReport, SaveReport, Tier};

use super::mover::{MoveError, Mover};

/// Demotion rounds one operation may run to make room before it settles for less.
const ROOM_ROUNDS: usize = 8;

/// Gets up to `want` slots of `tier` for `namespace`, writing admitted victims to NVMe
/// first (demotion). Fewer when everything is leased or in use.
fn acquire(
    blocks: &BlockManager,
    mover: &Mover,
    tier: Tier,
    namespace: u32,
    want: usize,
    report: &mut SaveReport,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(want);
    for _ in 0..ROOM_ROUNDS {
        let room = blocks.plan_room(tier, namespace, want, &mut out);
        if room.is_settled() {
            break;
        }
        let results = mover.write_nvme(&room.demotions);
        blocks.commit_room(room, results, &mut out, report);
        if out.len() >= want {
            break;
        }
    }
    out
}

/// Saves a chain: host slots for the blocks not stored yet (demoting as policy says),
/// `fill` copies the engine's pages into them, and with `write_through` (or the config's)
/// the blocks reach NVMe before they are published.
pub fn save(
    blocks: &BlockManager,
    mover: &Mover,
    namespace: u32,
    chain: &[(u64, Option<u64>)],
    priority: u8,
    write_through: bool,
    fill: impl FnOnce(&Mover, &[StoreItem]) -> Result<(), MoveError>,
) -> Result<SaveReport, BlockError> {
    let mut plan = blocks.begin_save(namespace, chain, priority);
    let slots = acquire(
        blocks,
        mover,
        Tier::Host,
        namespace,
        plan.slots_needed(),
        &mut plan.report,
    );
    blocks.reserve_save(&mut plan, slots);
    if !plan.stores.is_empty()
        && let Err(e) = fill(mover, &plan.stores)
    {
        let index = plan.stores.get(e.index()).map_or(0, |s| s.index);
        blocks.abort_save(plan);
        return Err(BlockError::Fill {
            index,
            source: Box::new(e),
        });
    }
    if write_through || blocks.writes_through() {
        blocks.plan_write_through(&mut plan);
    }
    let results = mover.write_nvme(&plan.writes);
    Ok(blocks.commit_save(plan, results))
}

/// Loads the leading stored blocks of a chain: blocks only on NVMe are staged into host
/// slots and verified first, then `drain` copies every block to the engine, in chain
/// order.
pub fn load(
    blocks: &BlockManager,
    mover: &Mover,
    namespace: u32,
    hashes: &[u64],
    drain: impl FnOnce(&Mover, &[LoadItem]) -> Result<(), MoveError>,
) -> Result<LoadReport, BlockError> {
    let mut plan = blocks.plan_load(namespace, hashes);
    if plan.needs_staging() > 0 {
        let mut unused = SaveReport::default();
        let slots = acquire(
            blocks,
            mover,
            Tier::Host,
            namespace,
            plan.needs_staging(),
            &mut unused,
        );
        blocks.plan_staging(&mut plan, slots);
        let results = mover.read_nvme(&plan.reads);
        let erase = blocks.commit_staging(&mut plan, results);
        mover.erase_nvme(&erase);
        blocks.commit_erase(&erase);
    }
    if plan.items.is_empty() {
        return Ok(blocks.commit_load(plan, 0));
    }
    match drain(mover, &plan.items) {
        Ok(()) => {
            let served = plan.items.len();
            Ok(blocks.commit_load(plan, served))
        }
        Err(e) => {
            let index = plan.items.get(e.index()).map_or(0, |i| i.index);
            let _ = blocks.commit_load(plan, 0);
            Err(BlockError::Drain {
                index,
                source: Box::new(e),
            })
        }
    }
}

/// Copies the leading host-resident blocks of a chain into G1 (evicting G1 leaves), one
/// batched copy. Returns how many leading blocks are in G1 afterwards.
pub fn promote(
    blocks: &BlockManager,
    mover: &Mover,
    stream: kvplane_cuda::StreamId,
    namespace: u32,
    hashes: &[u64],
) -> usize {
    let plan = blocks.plan_promote(namespace, hashes);
    if plan.copies.is_empty() {
        return blocks.commit_promote(plan, true);
    }
    let copied = match mover.copy_tiers(stream, &plan.copies) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "promotion to G1 failed; nothing promoted");
            false
        }
    };
    blocks.commit_promote(plan, copied)
}

/// Removes blocks from every tier (leased or in-use blocks are kept and counted busy);
/// their NVMe headers are erased so a restart does not bring them back.
pub fn drop_blocks(
    blocks: &BlockManager,
    mover: &Mover,
    namespace: u32,
    hashes: &[u64],
) -> crate::block::DropReport {
    let plan = blocks.plan_drop(namespace, hashes);
    mover.erase_nvme(&plan.erase_nvme);
    blocks.commit_drop(plan)
}

/// Removes every block of a namespace (leased or in-use blocks are kept).
pub fn clear_namespace(
    blocks: &BlockManager,
    mover: &Mover,
    namespace: u32,
) -> crate::block::DropReport {
    let plan = blocks.plan_clear(namespace);
    mover.erase_nvme(&plan.erase_nvme);
    blocks.commit_drop(plan)
}

/// A block manager with a mover on the host device, for tools and tests that are their own
/// engine: blocks are filled and drained by closures instead of gather/scatter launches.
pub struct LocalBlocks {
    // Field order is drop order: the mover unregisters the tiers before they go.
    pub mover: Mover,
    pub blocks: std::sync::Arc<BlockManager>,
    stream: kvplane_cuda::StreamId,
}

impl std::fmt::Debug for LocalBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBlocks")
            .field("mover", &self.mover)
            .finish()
    }
}

impl std::ops::Deref for LocalBlocks {
    type Target = BlockManager;
    fn deref(&self) -> &BlockManager {
        &self.blocks
    }
}

impl LocalBlocks {
    /// `blocks` with a mover on the tiers' device.
    pub fn new(blocks: BlockManager) -> Result<Self, kvplane_cuda::DeviceError> {
        let blocks = std::sync::Arc::new(blocks);
        let mover = Mover::new(std::sync::Arc::clone(blocks.stores()));
        let stream = mover.device().create_stream()?;
        Ok(LocalBlocks {
            mover,
            blocks,
            stream,
        })
    }

    /// [`save`] with the caller as the engine: `fill(i, bytes)` writes chain block `i`.
    pub fn save_with<E: Into<super::mover::BoxError>>(
        &self,
        namespace: u32,
        chain: &[(u64, Option<u64>)],
        priority: u8,
        write_through: bool,
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<SaveReport, BlockError> {
        save(
            &self.blocks,
            &self.mover,
            namespace,
            chain,
            priority,
            write_through,
            |m, stores| m.fill_with(stores, |k, bytes| fill(stores[k].index, bytes)),
        )
    }

    /// [`load`] with the caller as the engine: `drain(i, bytes)` receives chain block
    /// `i`, in chain order. A failing drain ends the load at that block.
    pub fn load_with<E: Into<super::mover::BoxError>>(
        &self,
        namespace: u32,
        hashes: &[u64],
        mut drain: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<LoadReport, BlockError> {
        load(&self.blocks, &self.mover, namespace, hashes, |m, items| {
            m.drain_with(self.stream, items, |k, bytes| drain(items[k].index, bytes))
        })
    }

    pub fn promote(&self, namespace: u32, hashes: &[u64]) -> usize {
        promote(&self.blocks, &self.mover, self.stream, namespace, hashes)
    }

    pub fn drop_blocks(&self, namespace: u32, hashes: &[u64]) -> crate::block::DropReport {
        drop_blocks(&self.blocks, &self.mover, namespace, hashes)
    }

    pub fn clear_namespace(&self, namespace: u32) -> crate::block::DropReport {
        clear_namespace(&self.blocks, &self.mover, namespace)
    }
}

#[cfg(test)]
mod tests;
