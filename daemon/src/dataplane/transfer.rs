//! Block operations as plan, execute, commit: the block manager plans (reserves slots,
//! holds blocks), the mover executes (moves bytes), the manager commits (publishes what
//! landed, releases what failed, emits events). Each function here is one operation's
//! sequence of those steps; none touches the registry or the bytes itself.
//!
//! How engine pages reach the tiers is the caller's: `fill` / `drain` run the mover's
//! gather/scatter for an engine session, or the mover's closure variants for tools and
//! tests that are their own engine.

use crate::block::plan::{HbmCopy, LoadHolds, LoadItem, LoadPlan, RoomPlan, SavePlan, StoreItem};
use crate::block::{BlockError, BlockManager, LoadReport, SaveReport, Tier};
use crate::tier::G1Direction;
use kvplane_cuda::StreamId;

use super::mover::{MoveError, Mover};

/// Demotion rounds one operation may run to make room before it settles for less.
const ROOM_ROUNDS: usize = 8;

/// Runs `step`, mover work for an operation that holds registry state (`held`: its
/// plan). A panic there is a bug in the mover: the session ends with it (its thread
/// catches it), but what the operation holds (slots reserved, blocks held busy, quota
/// claims) must not stay held until restart, so `give_back` returns it before the
/// unwind goes on.
fn give_back_on_panic<H, T>(
    mut held: H,
    step: impl FnOnce(&mut H) -> T,
    give_back: impl FnOnce(H),
) -> (H, T) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(&mut held))) {
        Ok(t) => (held, t),
        Err(panic) => {
            give_back(held);
            std::panic::resume_unwind(panic)
        }
    }
}

/// Gets up to `want` slots of `tier` for `namespace`, writing admitted host victims to
/// NVMe first and copying G1 victims that have no other copy down to the host tier
/// (demotion; the copy-down runs on `stream`, which making room in G1 needs), or, when
/// the host tier has no room for them and the daemon moves NVMe <-> G1 directly, writing
/// them from G1 to NVMe on `stream`. Fewer when everything is leased or in use.
fn acquire(
    blocks: &BlockManager,
    mover: &Mover,
    tier: Tier,
    namespace: u32,
    want: usize,
    report: &mut SaveReport,
    stream: Option<StreamId>,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(want);
    for _ in 0..ROOM_ROUNDS {
        let room = blocks.plan_room(tier, namespace, want, &mut out);
        if room.is_settled() {
            break;
        }
        let ((room, taken), (results, copied_down)) = give_back_on_panic(
            (room, out),
            |(room, out)| {
                // G1 victims the host tier cannot take join the demotions here, to be
                // written straight from G1 (a host room plan has no copies-down).
                let copied_down = copy_down(blocks, mover, stream, room, out, report);
                let results = mover.write_nvme(stream, &room.demotions);
                (results, copied_down)
            },
            // The victims, their reservations, the slots taken and their quota claims.
            |(room, out)| {
                // Registry first: the erase is I/O through the mover that just panicked,
                // and may panic again.
                let erase = blocks.abort_room(room);
                blocks.free_room(namespace, tier, out);
                erase_nvme(blocks, mover, &erase);
            },
        );
        out = taken;
        blocks.commit_room(room, results, copied_down, &mut out, report);
        // A failed copy-down would pick the same victims again: settle for what is there.
        if out.len() >= want || !copied_down {
            break;
        }
    }
    out
}

/// Copies a G1 room plan's victims down to host slots (found as any host room is, per
/// victim namespace) in one batched copy on `stream`, and waits for it; whether it
/// landed. Victims that get no host slot are written from G1 to NVMe or dropped from G1
/// by [`BlockManager::reserve_copies_down`].
fn copy_down(
    blocks: &BlockManager,
    mover: &Mover,
    stream: Option<StreamId>,
    room: &mut RoomPlan,
    out: &mut Vec<u32>,
    report: &mut SaveReport,
) -> bool {
    if room.copies_down.is_empty() {
        return true;
    }
    let stream = stream.expect("G1 room is made on a stream: only G1 victims copy down");
    let victim_ns: Vec<u32> = room.copies_down.iter().map(|c| c.key.namespace).collect();
    let mut namespaces = victim_ns.clone();
    namespaces.sort_unstable();
    namespaces.dedup();
    // Host room per victim namespace, each making room as it must; a panic while making
    // one namespace's room gives back the slots the earlier namespaces got (the
    // panicking one gives back its own).
    let (slots, ()) = give_back_on_panic(
        vec![None; victim_ns.len()],
        |slots| {
            for ns in namespaces {
                let positions: Vec<usize> = (0..victim_ns.len())
                    .filter(|&k| victim_ns[k] == ns)
                    .collect();
                let got = acquire(blocks, mover, Tier::Host, ns, positions.len(), report, None);
                for (k, slot) in positions.into_iter().zip(got) {
                    slots[k] = Some(slot);
                }
            }
        },
        |slots| {
            for (k, slot) in slots.into_iter().enumerate() {
                if let Some(slot) = slot {
                    blocks.free_room(victim_ns[k], Tier::Host, vec![slot]);
                }
            }
        },
    );
    blocks.reserve_copies_down(room, slots, out);
    if room.copies_down.is_empty() {
        return true;
    }
    match mover.copy_tiers(stream, &room.copies_down) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "copying G1 blocks down to the host tier failed; they stay in G1");
            false
        }
    }
}

/// A save whose copy from the engine has been launched (or needed none): its slots are
/// reserved, nothing is published until [`finish_save`] learns the copy landed.
#[derive(Debug)]
pub struct SaveStarted {
    plan: SavePlan,
    write_through: bool,
}

impl SaveStarted {
    /// Whether device work was launched for it (else it can be finished at once).
    pub fn launched(&self) -> bool {
        !self.plan.stores.is_empty()
    }
}

/// How a save stores its blocks beyond the host tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaveOptions {
    pub priority: u8,
    /// Copy them to NVMe before they are published (the config may say so for all).
    pub write_through: bool,
    /// Also keep them in G1 on the engine's GPU (when the daemon has a G1 tier); G1
    /// victims whose only copy is in G1 are copied down to the host tier on this stream
    /// first (the engine's).
    pub keep_on_gpu: Option<StreamId>,
}

/// The first half of a save: host slots for the blocks not stored yet (demoting as
/// policy says) and, with `keep_on_gpu`, G1 slots for a leading run of them; then
/// `launch` queues the copy of the engine's pages into the host slots and the G1 ones.
/// A launch that fails gives every reservation back.
pub fn begin_save(
    blocks: &BlockManager,
    mover: &Mover,
    namespace: u32,
    chain: &[(u64, Option<u64>)],
    options: SaveOptions,
    launch: impl FnOnce(&Mover, &[StoreItem], &[HbmCopy]) -> Result<(), MoveError>,
) -> Result<SaveStarted, BlockError> {
    let plan = blocks.begin_save(namespace, chain, options.priority);
    let (plan, launched) = give_back_on_panic(
        plan,
        |plan| {
            let slots = acquire(
                blocks,
                mover,
                Tier::Host,
                namespace,
                plan.slots_needed(),
                &mut plan.report,
                None,
            );
            blocks.reserve_save(plan, slots);
            if let Some(stream) = options.keep_on_gpu
                && blocks.has_g1()
                && !plan.stores.is_empty()
            {
                let want = plan.stores.len();
                let slots = acquire(
                    blocks,
                    mover,
                    Tier::Hbm,
                    namespace,
                    want,
                    &mut plan.report,
                    Some(stream),
                );
                blocks.reserve_save_hbm(plan, slots);
            }
            match plan.stores.is_empty() {
                true => Ok(()),
                false => launch(mover, &plan.stores, &plan.hbm),
            }
        },
        |plan| give_up_save(blocks, mover, plan),
    );
    if let Err(e) = launched {
        return Err(fill_failed(blocks, mover, plan, e));
    }
    Ok(SaveStarted {
        plan,
        write_through: options.write_through,
    })
}

/// The second half, once the launched copy is done (`landed`): with `write_through` (or
/// the config's) the blocks reach NVMe before they are published. A copy that failed
/// publishes nothing.
pub fn finish_save(
    blocks: &BlockManager,
    mover: &Mover,
    started: SaveStarted,
    landed: Result<(), MoveError>,
) -> Result<SaveReport, BlockError> {
    let SaveStarted {
        mut plan,
        write_through,
    } = started;
    if let Err(e) = landed {
        return Err(fill_failed(blocks, mover, plan, e));
    }
    if write_through || blocks.writes_through() {
        let unused = blocks.plan_write_through(&mut plan);
        erase_nvme(blocks, mover, &unused);
    }
    let (plan, results) = give_back_on_panic(
        plan,
        |plan| mover.write_nvme(None, &plan.writes),
        |plan| give_up_save(blocks, mover, plan),
    );
    Ok(blocks.commit_save(plan, results))
}

/// Gives up a started save whose session is gone (its copy waited for): nothing is
/// published, every reservation is released.
pub fn abandon_save(blocks: &BlockManager, mover: &Mover, started: SaveStarted) {
    give_up_save(blocks, mover, started.plan);
}

/// Gives every reservation of a save back ([`BlockManager::abort_save`]), erasing the
/// headers of its NVMe slots before they are free again.
fn give_up_save(blocks: &BlockManager, mover: &Mover, plan: SavePlan) {
    erase_nvme(blocks, mover, &blocks.abort_save(plan));
}

/// Erases the headers of NVMe slots the manager set aside, then frees them: a slot freed
/// unwritten may hold a valid header (a write that landed before its plan was given up,
/// or the block evicted to free it), which the next restart would index.
fn erase_nvme(blocks: &BlockManager, mover: &Mover, slots: &[u32]) {
    mover.erase_nvme(slots);
    blocks.commit_erase(slots);
}

/// Gives up a started load whose session is gone (its copy waited for): the blocks are
/// released.
pub fn abandon_load(blocks: &BlockManager, started: LoadStarted) {
    let _ = blocks.commit_load(started.plan, 0);
}

fn fill_failed(blocks: &BlockManager, mover: &Mover, plan: SavePlan, e: MoveError) -> BlockError {
    // Launch positions past the stores are their G1 copies (see `Mover::launch_gather`).
    let at = e.index();
    let store = if at < plan.stores.len() {
        Some(at)
    } else {
        plan.hbm.get(at - plan.stores.len()).map(|c| c.store)
    };
    let index = store
        .and_then(|k| plan.stores.get(k))
        .map_or(0, |s| s.index);
    give_up_save(blocks, mover, plan);
    BlockError::Fill {
        index,
        source: Box::new(e),
    }
}

/// Saves a chain into the host tier in one go: [`begin_save`] with `fill` (which fills
/// the host slots before it returns), then [`finish_save`].
pub fn save(
    blocks: &BlockManager,
    mover: &Mover,
    namespace: u32,
    chain: &[(u64, Option<u64>)],
    priority: u8,
    write_through: bool,
    fill: impl FnOnce(&Mover, &[StoreItem]) -> Result<(), MoveError>,
) -> Result<SaveReport, BlockError> {
    let options = SaveOptions {
        priority,
        write_through,
        keep_on_gpu: None,
    };
    let started = begin_save(blocks, mover, namespace, chain, options, |m, stores, _| {
        fill(m, stores)
    })?;
    finish_save(blocks, mover, started, Ok(()))
}

/// A load whose copies to the engine have been launched (or needed none): the blocks
/// are held busy until [`finish_load`].
#[derive(Debug)]
pub struct LoadStarted {
    plan: LoadPlan,
    /// What making room for the staged blocks moved between tiers.
    room: SaveReport,
}

impl LoadStarted {
    /// Whether device work was launched for it (else it can be finished at once).
    pub fn launched(&self) -> bool {
        !self.plan.items.is_empty()
    }

    /// Reports the load before its launched copies land (the engine waits on an IPC
    /// event the daemon recorded after them); the blocks stay held until
    /// [`finish_reported_load`].
    pub fn report_early(self, blocks: &BlockManager) -> (LoadReport, LoadHolds) {
        let served = self.plan.items.len();
        let (mut report, holds) = blocks.report_load(self.plan, served);
        report.room = self.room;
        (report, holds)
    }
}

/// Releases an early-reported load's blocks once its copies are done (`landed`); the
/// copy's failure, if it failed, is returned for the caller to act on (the engine was
/// told it succeeded).
pub fn finish_reported_load(
    blocks: &BlockManager,
    holds: LoadHolds,
    landed: Result<(), MoveError>,
) -> Result<(), MoveError> {
    blocks.release_load(holds);
    landed
}

/// The first half of a load of the leading stored blocks of a chain: blocks only on
/// NVMe are staged and verified (straight into G1 slots where the daemon reads NVMe into
/// G1 and the load has a `stream` to make G1 room on, else, and for what G1 cannot take,
/// into host slots), then `launch` queues the copy of every block to the engine, in
/// chain order. A launch that fails releases the blocks.
pub fn begin_load(
    blocks: &BlockManager,
    mover: &Mover,
    namespace: u32,
    hashes: &[u64],
    stream: Option<StreamId>,
    launch: impl FnOnce(&Mover, &[LoadItem]) -> Result<(), MoveError>,
) -> Result<LoadStarted, BlockError> {
    let plan = blocks.plan_load(namespace, hashes);
    let mut room = SaveReport::default();
    let (plan, launched) = give_back_on_panic(
        plan,
        |plan| {
            if plan.needs_staging() > 0 {
                let want = plan.needs_staging();
                let g1 = match stream {
                    Some(stream) if mover.stores().direct_now(G1Direction::NvmeToG1) => acquire(
                        blocks,
                        mover,
                        Tier::Hbm,
                        namespace,
                        want,
                        &mut room,
                        Some(stream),
                    ),
                    _ => Vec::new(),
                };
                // A panic while making host room gives back the G1 slots taken.
                let (g1, host) = give_back_on_panic(
                    g1,
                    |g1| match want - g1.len() {
                        0 => Vec::new(),
                        rest => {
                            acquire(blocks, mover, Tier::Host, namespace, rest, &mut room, None)
                        }
                    },
                    |g1| blocks.free_room(namespace, Tier::Hbm, g1),
                );
                blocks.plan_staging(plan, g1, host);
                let results = mover.read_staged(stream, &plan.reads);
                let erase = blocks.commit_staging(plan, results);
                // A panic while erasing leaves these slots detached until restart:
                // freeing them could let a restart index a corrupt block's header that
                // is still on disk in a slot nobody rewrote.
                erase_nvme(blocks, mover, &erase);
            }
            match plan.items.is_empty() {
                true => Ok(()),
                false => launch(mover, &plan.items),
            }
        },
        |plan| blocks.abort_load(plan),
    );
    if let Err(e) = launched {
        return Err(drain_failed(blocks, plan, e));
    }
    Ok(LoadStarted { plan, room })
}

/// The second half, once the launched copies are done (`landed`): the blocks are
/// released and the load reported; a copy that failed is the load's error.
pub fn finish_load(
    blocks: &BlockManager,
    started: LoadStarted,
    landed: Result<(), MoveError>,
) -> Result<LoadReport, BlockError> {
    let LoadStarted { plan, room } = started;
    match landed {
        Ok(()) => {
            let served = plan.items.len();
            let mut report = blocks.commit_load(plan, served);
            report.room = room;
            Ok(report)
        }
        Err(e) => Err(drain_failed(blocks, plan, e)),
    }
}

fn drain_failed(blocks: &BlockManager, plan: LoadPlan, e: MoveError) -> BlockError {
    let index = plan.items.get(e.index()).map_or(0, |i| i.index);
    let _ = blocks.commit_load(plan, 0);
    BlockError::Drain {
        index,
        source: Box::new(e),
    }
}

/// Loads in one go: [`begin_load`] with `drain` (which completes the copies before it
/// returns), then [`finish_load`].
pub fn load(
    blocks: &BlockManager,
    mover: &Mover,
    namespace: u32,
    hashes: &[u64],
    stream: Option<StreamId>,
    drain: impl FnOnce(&Mover, &[LoadItem]) -> Result<(), MoveError>,
) -> Result<LoadReport, BlockError> {
    let started = begin_load(blocks, mover, namespace, hashes, stream, drain)?;
    finish_load(blocks, started, Ok(()))
}

/// Copies the leading host-resident blocks of a chain into G1 (making room there as a
/// save does: G1 victims with no other copy go down to the host tier), one batched copy.
/// Returns how many leading blocks are in G1 afterwards.
pub fn promote(
    blocks: &BlockManager,
    mover: &Mover,
    stream: StreamId,
    namespace: u32,
    hashes: &[u64],
) -> usize {
    let want = blocks.promotable(namespace, hashes);
    let mut unused = SaveReport::default();
    let slots = match want {
        0 => Vec::new(),
        _ => acquire(
            blocks,
            mover,
            Tier::Hbm,
            namespace,
            want,
            &mut unused,
            Some(stream),
        ),
    };
    let plan = blocks.plan_promote(namespace, hashes, slots);
    if plan.copies.is_empty() {
        return blocks.commit_promote(plan, true);
    }
    let (plan, copied) = give_back_on_panic(
        plan,
        |plan| match mover.copy_tiers(stream, &plan.copies) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "promotion to G1 failed; nothing promoted");
                false
            }
        },
        |plan| {
            blocks.commit_promote(plan, false);
        },
    );
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
        load(
            &self.blocks,
            &self.mover,
            namespace,
            hashes,
            Some(self.stream),
            |m, items| m.drain_with(self.stream, items, |k, bytes| drain(items[k].index, bytes)),
        )
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
