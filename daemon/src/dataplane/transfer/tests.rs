use super::*;
use crate::block::{BlockConfig, DropReport, LoadFailure, ManagerOptions, NamespaceQuota};
use crate::block::{BlockEvent, RemoveReason};
use crate::tier::hbm::HbmConfig;
use crate::tier::host::HostConfig;
use crate::tier::nvme::engine::FaultPlan;
use crate::tier::nvme::engine::{FaultEffect, FaultRule, IoKind};
use crate::tier::nvme::header::SlotHeader;
use crate::tier::nvme::{EngineKind, NvmeConfig, NvmeError};
use crate::tier::{PerTier, TiersConfig};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const BLOCK: usize = 4096;
const SLOT: u64 = 8192;

fn pattern(ns: u32, hash: u64, buf: &mut [u8]) {
    let mut x = (ns as u64) << 48 ^ hash;
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let w = crate::tier::nvme::header::MAGIC ^ kvplane_kernels::checksum::mix64(x);
        chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
    }
}

fn expect(ns: u32, hash: u64) -> Vec<u8> {
    let mut v = vec![0; BLOCK];
    pattern(ns, hash, &mut v);
    v
}

fn config(
    dir: Option<&Path>,
    host_slots: u64,
    nvme_slots: u64,
    engine: EngineKind,
) -> (BlockConfig, TiersConfig) {
    let block = BlockConfig {
        block_bytes: BLOCK,
        ..BlockConfig::default()
    };
    let tiers = TiersConfig {
        hbm: HbmConfig {
            capacity_bytes: 2 * BLOCK as u64,
        },
        host: HostConfig {
            capacity_bytes: host_slots * SLOT,
            lock: false,
            touch_threads: 1,
            ..HostConfig::default()
        },
        nvme: NvmeConfig {
            paths: dir.map(|d| vec![d.join("g3.kvp")]).unwrap_or_default(),
            capacity_bytes: nvme_slots * SLOT,
            engine,
            queue_depth: 8,
            batch_size: 4,
            ..NvmeConfig::default()
        },
    };
    (block, tiers)
}

fn manager(dir: Option<&Path>, host_slots: u64, nvme_slots: u64) -> LocalBlocks {
    let (b, t) = config(dir, host_slots, nvme_slots, EngineKind::Sync);
    local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap())
}

fn local(m: BlockManager) -> LocalBlocks {
    LocalBlocks::new(m).unwrap()
}

fn chain(base: u64, n: usize) -> Vec<(u64, Option<u64>)> {
    (0..n as u64)
        .map(|i| (base + i, if i == 0 { None } else { Some(base + i - 1) }))
        .collect()
}

fn save(m: &LocalBlocks, ns: u32, blocks: &[(u64, Option<u64>)], wt: bool) -> SaveReport {
    m.save_with(ns, blocks, 0, wt, |i, buf: &mut [u8]| {
        pattern(ns, blocks[i].0, buf);
        Ok::<(), std::io::Error>(())
    })
    .unwrap()
}

/// Loads and checks every served block is bit-identical to what was saved.
fn load(m: &LocalBlocks, ns: u32, hashes: &[u64]) -> LoadReport {
    m.load_with(ns, hashes, |i, bytes: &[u8]| {
        assert_eq!(
            bytes,
            &expect(ns, hashes[i])[..],
            "block {i} ({:#x}) differs",
            hashes[i]
        );
        Ok::<(), std::io::Error>(())
    })
    .unwrap()
}

#[test]
fn save_lookup_load_round_trip_on_host() {
    let m = manager(None, 8, 0);
    let c = chain(100, 5);
    let r = save(&m, 7, &c, false);
    assert_eq!(
        (r.stored, r.already_present, r.bytes),
        (5, 0, 5 * BLOCK as u64)
    );
    assert_eq!(save(&m, 7, &c, false).already_present, 5);
    let hashes: Vec<u64> = c.iter().map(|b| b.0).collect();
    let mut tiers = [None; 6];
    let mut with_miss = hashes.clone();
    with_miss.push(999);
    assert_eq!(m.lookup(7, &with_miss, &mut tiers), 5);
    assert_eq!(
        tiers,
        [
            Some(Tier::Host),
            Some(Tier::Host),
            Some(Tier::Host),
            Some(Tier::Host),
            Some(Tier::Host),
            None
        ]
    );
    assert_eq!(
        m.lookup(8, &hashes, &mut tiers[..5]),
        0,
        "other namespace sees nothing"
    );
    let r = load(&m, 7, &with_miss);
    assert_eq!(r.loaded, 5);
    assert_eq!(r.slowest, Some(Tier::Host));
    assert!(matches!(r.failure, Some((5, LoadFailure::Missing))));
    m.check_invariants().unwrap();
    let s = m.stats();
    assert!(
        s.tiers[0].backing.contains("standing in for HBM"),
        "{}",
        s.tiers[0].backing
    );
    assert_eq!(s.tiers[1].used_slots, 5);
}

#[test]
fn full_host_demotes_admitted_blocks_and_loads_stage_from_nvme() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(Some(dir.path()), 4, 16);
    let hot = chain(1, 2);
    save(&m, 1, &hot, false);
    // Seen again (a lookup hit) => admitted to NVMe on demotion.
    let mut t = [None; 2];
    assert_eq!(m.lookup(1, &[1, 2], &mut t), 2);
    let cold = chain(50, 2);
    save(&m, 1, &cold, false);
    // Host full (4 slots). Four more blocks push everything out.
    let r = save(&m, 1, &chain(200, 4), false);
    assert_eq!(r.stored, 4);
    assert_eq!(r.nvme_written, 2, "only the blocks seen twice were written");
    assert_eq!(m.lookup(1, &[1, 2], &mut t), 2);
    assert_eq!(t, [Some(Tier::Nvme); 2]);
    assert_eq!(
        m.lookup(1, &[50], &mut t[..1]),
        0,
        "seen once: dropped, not demoted"
    );
    let r = load(&m, 1, &[1, 2]);
    assert_eq!((r.loaded, r.slowest), (2, Some(Tier::Nvme)));
    assert_eq!(r.tiers, vec![Tier::Nvme, Tier::Nvme]);
    assert_eq!(m.lookup(1, &[1, 2], &mut t), 2);
    assert_eq!(
        t,
        [Some(Tier::Host); 2],
        "staged copies stay in the host tier"
    );
    m.check_invariants().unwrap();
    let s = m.stats();
    assert_eq!(s.tiers[1].removed["demoted"], 2);
    assert!(s.tiers[1].removed["evicted"] >= 2);
}

#[test]
fn restart_restores_nvme_blocks_and_corruption_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let c = chain(10, 6);
    let hashes: Vec<u64> = c.iter().map(|b| b.0).collect();
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        let (b, t) = config(Some(dir.path()), 8, 16, engine);
        {
            let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
            let r = save(&m, 3, &c, true);
            assert_eq!((r.stored, r.nvme_written), (6, 6), "{:?}", r.nvme_error);
            // Dropped without any shutdown step: what a SIGKILL leaves.
        }
        let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
        assert_eq!(m.stats().nvme_scan_valid, 6);
        let mut tiers = [None; 6];
        assert_eq!(m.lookup(3, &hashes, &mut tiers), 6);
        assert!(tiers.iter().all(|&t| t == Some(Tier::Nvme)));
        let r = load(&m, 3, &hashes);
        assert_eq!(r.loaded, 6);
        m.check_invariants().unwrap();
        std::fs::remove_file(dir.path().join("g3.kvp")).unwrap();
    }

    // Flip one data byte of the slot holding block 13, then reopen and load.
    let (b, t) = config(Some(dir.path()), 8, 16, EngineKind::Sync);
    {
        let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
        save(&m, 3, &c, true);
    }
    let slot_of_13 = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("g3.kvp"))
            .unwrap();
        let key = crate::tier::nvme::key::SlotKey::load(&dir.path().join("g3.kvp.key")).unwrap();
        let mut found = None;
        for s in 0..16u64 {
            let mut page = vec![0u8; 4096];
            f.read_exact_at(&mut page, s * SLOT).unwrap();
            if let Ok(h) = SlotHeader::decode(&page, BLOCK, &key)
                && h.hash == 13
            {
                found = Some(s);
            }
        }
        let s = found.expect("block 13 on disk");
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, s * SLOT + 4096 + 100).unwrap();
        byte[0] ^= 1;
        f.write_all_at(&byte, s * SLOT + 4096 + 100).unwrap();
        s
    };
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    let r = m
        .load_with(3, &hashes, |i, bytes: &[u8]| {
            assert_eq!(bytes, &expect(3, hashes[i])[..]);
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
    assert_eq!(
        r.loaded, 3,
        "blocks 10..=12 served, 13 is corrupt (slot {slot_of_13})"
    );
    assert!(
        matches!(&r.failure, Some((3, LoadFailure::Corrupt(e))) if e.to_string().contains("checksum")),
        "{:?}",
        r.failure
    );
    assert_eq!(m.stats().nvme_corrupt_dropped, 1);
    let mut tiers = [None; 6];
    assert_eq!(
        m.lookup(3, &hashes, &mut tiers),
        3,
        "the corrupt block is gone"
    );
    m.check_invariants().unwrap();
    // Its header was erased too: a restart's scan does not index the bad copy again.
    drop(m);
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    assert_eq!(
        m.stats().nvme_scan_valid,
        5,
        "only the 5 intact blocks come back"
    );
    assert_eq!(m.stats().nvme_scan_corrupt, 0);
    assert_eq!(m.lookup(3, &hashes, &mut tiers), 3);
}

/// A bug in the mover while making room (an NVMe demotion write that panics) gives back
/// what the operation held before the panic goes on: the room plan's victims and their
/// NVMe reservations, the slots taken and the namespace's quota claims. Before, they all
/// stayed held until restart, and the namespace's quota shrank for good.
#[test]
fn a_panic_while_making_room_gives_back_the_plan_and_its_claims() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, t) = config(Some(dir.path()), 5, 16, EngineKind::Sync);
    b.nvme_admit_min_hits = 0;
    let (m, plan) = with_faults(&b, &t, vec![quota(7, PerTier([None, Some(4), None]))]);
    // Namespace 3 holds 2 of the 5 host slots, namespace 7 2 of its quota of 4; 1 is free.
    assert_eq!(save(&m, 3, &chain(300, 2), false).stored, 2);
    assert_eq!(save(&m, 7, &chain(700, 2), false).stored, 2);
    plan.add(FaultRule {
        kind: Some(IoKind::Write),
        skip: 0,
        count: 1,
        effect: FaultEffect::Panic,
    });
    // Two more blocks of 7: the free slot (claimed for 7), then a victim to demote, whose
    // NVMe write panics.
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        save(&m, 7, &chain(710, 2), false)
    }));
    assert!(panicked.is_err(), "the injected fault panicked the save");
    assert_eq!(plan.fired(), 1);
    assert_eq!(m.blocks.claimed_slots(), 0, "quota claims given back");
    m.check_invariants().unwrap();
    // Nothing stayed held: the victim can go, and namespace 7 stores its whole quota.
    let r = save(&m, 7, &chain(720, 4), false);
    assert_eq!((r.stored, r.no_space), (4, 0), "{r:?}");
    m.check_invariants().unwrap();
}

fn panic_rule(kind: IoKind) -> FaultRule {
    FaultRule {
        kind: Some(kind),
        skip: 0,
        count: 1,
        effect: FaultEffect::Panic,
    }
}

/// A manager over `b` and `t` with `quotas`, its NVMe engines driven by the fault plan
/// returned with it.
fn with_faults(
    b: &BlockConfig,
    t: &TiersConfig,
    quotas: Vec<NamespaceQuota>,
) -> (LocalBlocks, Arc<FaultPlan>) {
    let plan = Arc::new(FaultPlan::default());
    let options = ManagerOptions {
        faults: Some(plan.clone()),
        quotas,
        ..ManagerOptions::default()
    };
    (local(BlockManager::new(b, t, options).unwrap()), plan)
}

/// The NVMe slot whose header names (`namespace`, `hash`), found by reading the
/// unauthenticated header fields of the tier file `f` as an attacker would.
fn slot_on_disk(f: &std::fs::File, namespace: u32, hash: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    (0..16u64)
        .find(|s| {
            let mut page = [0u8; 32];
            f.read_exact_at(&mut page, s * SLOT).unwrap();
            page[16..20] == namespace.to_le_bytes() && page[24..32] == hash.to_le_bytes()
        })
        .expect("the block's slot on disk")
}

/// How many slots of `tier` are taken (stored, reserved or claimed).
fn used_slots(m: &LocalBlocks, tier: Tier) -> u32 {
    let s = m.stats();
    s.tiers.iter().find(|t| t.tier == tier).unwrap().used_slots
}

#[test]
fn a_panic_in_a_write_through_gives_back_the_save() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), 4, 16, EngineKind::Sync);
    let (m, plan) = with_faults(&b, &t, Vec::new());
    plan.add(panic_rule(IoKind::Write));
    let c = chain(10, 4);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| save(&m, 1, &c, true)));
    assert!(panicked.is_err(), "the injected fault panicked the save");
    assert_eq!(plan.fired(), 1);
    m.check_invariants().unwrap();
    assert_eq!(
        used_slots(&m, Tier::Host),
        0,
        "the save's host slots given back"
    );
    assert_eq!(used_slots(&m, Tier::Nvme), 0, "its NVMe slots given back");
    // Nothing stayed reserved: the same chain stores whole, host and NVMe.
    let r = save(&m, 1, &c, true);
    assert_eq!((r.stored, r.nvme_written, r.no_space), (4, 4, 0), "{r:?}");
    assert_eq!(load(&m, 1, &[10, 11, 12, 13]).loaded, 4);
    m.check_invariants().unwrap();
}

/// A write-through save whose NVMe write panics after its first block landed gives the
/// save back, and that block's header is erased before its slot is free: a restart
/// brings back no block the save never stored. (The slot used to be freed as it was,
/// its header valid.)
#[test]
fn a_write_through_given_back_after_a_write_landed_leaves_nothing_for_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), 4, 16, EngineKind::Sync);
    {
        let (m, plan) = with_faults(&b, &t, Vec::new());
        plan.add(FaultRule {
            skip: 1,
            ..panic_rule(IoKind::Write)
        });
        let c = chain(10, 4);
        let panicked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| save(&m, 1, &c, true)));
        assert!(panicked.is_err(), "the injected fault panicked the save");
        assert_eq!(
            plan.fired(),
            1,
            "the second write panicked, the first landed"
        );
        m.check_invariants().unwrap();
        assert_eq!(used_slots(&m, Tier::Nvme), 0, "its NVMe slots given back");
    }
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    let mut tiers = [None; 4];
    assert_eq!(
        m.lookup(1, &[10, 11, 12, 13], &mut tiers),
        0,
        "restored after the restart: {tiers:?}"
    );
    m.check_invariants().unwrap();
}

#[test]
fn a_panic_in_a_staging_read_gives_back_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, t) = config(Some(dir.path()), 2, 16, EngineKind::Sync);
    b.nvme_admit_min_hits = 0;
    let (m, plan) = with_faults(&b, &t, Vec::new());
    // Chain 1 is demoted to NVMe by chain 2; the host tier (2 slots) holds chain 2.
    save(&m, 1, &chain(1, 2), false);
    save(&m, 1, &chain(50, 2), false);
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(1, &[1, 2], &mut tiers), 2);
    assert_eq!(tiers, [Some(Tier::Nvme); 2]);
    plan.add(panic_rule(IoKind::Read));
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(&m, 1, &[1, 2])));
    assert!(panicked.is_err(), "the injected fault panicked the load");
    assert_eq!(plan.fired(), 1);
    m.check_invariants().unwrap();
    // The staging slots and the held blocks were given back: chain 2 can be dropped (a
    // held block is kept busy) and chain 1 loads whole from NVMe.
    let d = m.drop_blocks(1, &[1, 2, 50, 51]);
    assert_eq!(d.busy, 0, "no block stayed held: {d:?}");
    save(&m, 1, &chain(1, 2), true);
    save(&m, 1, &chain(50, 2), false);
    let r = load(&m, 1, &[1, 2]);
    assert_eq!((r.loaded, r.slowest), (2, Some(Tier::Nvme)), "{r:?}");
    m.check_invariants().unwrap();
}

#[test]
fn a_panic_in_a_promotion_copy_gives_back_the_g1_slots() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (b, t) = config(None, 8, 0, EngineKind::Sync);
    let armed = Arc::new(AtomicBool::new(false));
    let trip = Arc::clone(&armed);
    let hook: kvplane_cuda::host::LaunchHook = Arc::new(move |op| {
        if op == "copy_batch" && trip.swap(false, Ordering::SeqCst) {
            panic!("injected panic in a {op}");
        }
    });
    let device = Arc::new(kvplane_cuda::host::HostDevice::with_launch_hook_for_tests(
        kvplane_kernels::HostLaunch::default(),
        hook,
    ));
    let options = ManagerOptions {
        device: Some(device),
        ..ManagerOptions::default()
    };
    let m = local(BlockManager::new(&b, &t, options).unwrap());
    save(&m, 5, &chain(1, 2), false);
    armed.store(true, Ordering::SeqCst);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.promote(5, &[1, 2])));
    assert!(
        panicked.is_err(),
        "the injected fault panicked the promotion"
    );
    m.check_invariants().unwrap();
    assert_eq!(used_slots(&m, Tier::Hbm), 0, "the G1 slots given back");
    let d = m.drop_blocks(5, &[1, 2]);
    assert_eq!(d.busy, 0, "the host copies are not held: {d:?}");
    save(&m, 5, &chain(1, 2), false);
    assert_eq!(
        m.promote(5, &[1, 2]),
        2,
        "G1 (2 slots) takes the chain whole"
    );
    m.check_invariants().unwrap();
}

/// A save kept on the GPU (the test's stream) of `blocks`, filled with their patterns.
fn save_kept_on_gpu(m: &LocalBlocks, ns: u32, blocks: &[(u64, Option<u64>)]) -> SaveReport {
    let options = SaveOptions {
        priority: 0,
        write_through: false,
        keep_on_gpu: Some(m.stream),
    };
    let started = begin_save(&m.blocks, &m.mover, ns, blocks, options, |mv, stores, _| {
        mv.fill_with(stores, |k, buf: &mut [u8]| {
            pattern(ns, blocks[stores[k].index].0, buf);
            Ok::<(), std::io::Error>(())
        })
    })
    .unwrap();
    finish_save(&m.blocks, &m.mover, started, Ok(())).unwrap()
}

/// Making G1 room copies down victims of two namespaces, each needing host room of its
/// own; the second namespace's room-making panics (its demotion write): the host slot
/// the first namespace already got is given back too. (Found by a review.)
#[test]
fn a_panic_while_copying_down_two_namespaces_gives_back_both_rooms() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), 4, 16, EngineKind::Sync);
    let (m, plan) = with_faults(&b, &t, Vec::new());
    assert_eq!(save_kept_on_gpu(&m, 1, &chain(100, 1)).hbm_stored, 1);
    assert_eq!(save_kept_on_gpu(&m, 2, &chain(200, 1)).hbm_stored, 1);
    // Their host copies are evicted (seen once: not admitted to NVMe); G1 holds the only
    // copy of each.
    assert_eq!(save(&m, 3, &chain(300, 4), false).stored, 4);
    let mut tiers = [None; 1];
    m.lookup(1, &[100], &mut tiers);
    assert_eq!(tiers[0], Some(Tier::Hbm));
    // Namespace 3's blocks are seen again: admitted, so making host room demotes them
    // (NVMe writes), the fourth of which panics.
    let mut tiers = [None; 4];
    assert_eq!(m.lookup(3, &[300, 301, 302, 303], &mut tiers), 4);
    plan.add(FaultRule {
        kind: Some(IoKind::Write),
        skip: 3,
        count: 1,
        effect: FaultEffect::Panic,
    });
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        save_kept_on_gpu(&m, 4, &chain(400, 2))
    }));
    assert!(panicked.is_err(), "the injected fault panicked the save");
    assert_eq!(plan.fired(), 1);
    assert_eq!(m.blocks.claimed_slots(), 0, "quota claims given back");
    m.check_invariants().unwrap();
}

#[test]
fn nvme_faults_fail_the_operation_and_the_manager_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), 8, 16, EngineKind::IoUring);
    let plan = Arc::new(FaultPlan::default());
    let m = local(
        BlockManager::new(
            &b,
            &t,
            ManagerOptions {
                faults: Some(plan.clone()),
                ..ManagerOptions::default()
            },
        )
        .unwrap(),
    );
    plan.add(FaultRule {
        kind: Some(IoKind::Write),
        skip: 0,
        count: 1,
        effect: FaultEffect::Errno(libc::ENOSPC),
    });
    let r = save(&m, 1, &chain(1, 2), true);
    assert_eq!(r.stored, 2, "host copies are stored");
    assert_eq!(r.nvme_written, 1);
    assert!(
        r.nvme_error.as_ref().is_some_and(|e| e.is_no_space()),
        "{:?}",
        r.nvme_error
    );
    assert!(r.nvme_error.unwrap().to_string().contains("No space left"));
    assert_eq!(m.stats().nvme_write_errors, 1);
    let mut t2 = [None; 2];
    m.lookup(1, &[1, 2], &mut t2);
    // An EIO on the staging read of block 2 fails that load at that block only.
    let c = chain(100, 2);
    let r = save(&m, 1, &c, true);
    assert_eq!(r.nvme_written, 2);
    assert_eq!(m.drop_blocks(1, &[]).dropped, 0);
    // Push 100/101 out of the host tier: fill it with pinned-free blocks.
    save(&m, 1, &chain(500, 8), false);
    let mut t = [None; 2];
    assert_eq!(m.lookup(1, &[100, 101], &mut t), 2);
    assert_eq!(t, [Some(Tier::Nvme); 2]);
    plan.add(FaultRule {
        kind: Some(IoKind::Read),
        skip: 1,
        count: 1,
        effect: FaultEffect::Errno(libc::EIO),
    });
    let r = load(&m, 1, &[100, 101]);
    assert_eq!(r.loaded, 1);
    assert!(
        matches!(&r.failure, Some((1, LoadFailure::Io(_)))),
        "{:?}",
        r.failure
    );
    // The copy is still on NVMe and loads once the disk recovers.
    assert_eq!(load(&m, 1, &[100, 101]).loaded, 2);
    assert_eq!(m.stats().nvme_read_errors, 1);
    // A read that returns flipped bits is caught by the checksum and dropped.
    save(&m, 1, &chain(600, 8), false);
    assert_eq!(m.lookup(1, &[100, 101], &mut t), 2);
    if t[0] == Some(Tier::Nvme) {
        plan.add(FaultRule {
            kind: Some(IoKind::Read),
            skip: 0,
            count: 1,
            effect: FaultEffect::FlipBit { offset: 5000 },
        });
        let r = load(&m, 1, &[100]);
        assert!(
            matches!(&r.failure, Some((0, LoadFailure::Corrupt(_)))),
            "{:?}",
            r.failure
        );
    }
    m.check_invariants().unwrap();
}

#[test]
fn leases_block_eviction_until_the_session_is_released() {
    let m = manager(None, 4, 0);
    save(&m, 1, &chain(1, 4), false);
    assert_eq!(m.pin(42, 1, &[1, 2, 3, 4, 5]).leased, 4);
    let r = save(&m, 1, &chain(10, 2), false);
    assert_eq!((r.stored, r.no_space), (0, 2), "all host slots leased");
    assert_eq!(
        m.drop_blocks(1, &[1, 9]),
        DropReport {
            dropped: 0,
            busy: 1,
            missing: 1
        }
    );
    assert_eq!(m.release_session(42), 4);
    let r = save(&m, 1, &chain(10, 2), false);
    assert_eq!(r.stored, 2);
    let mut t = [None; 4];
    assert_eq!(
        m.lookup(1, &[1, 2, 3, 4], &mut t),
        2,
        "leaf-first eviction kept the prefix 1, 2"
    );
    m.check_invariants().unwrap();
}

#[test]
fn drop_and_clear_erase_nvme_copies_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), 8, 16, EngineKind::Sync);
    {
        let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
        save(&m, 1, &chain(1, 3), true);
        save(&m, 2, &chain(1, 3), true);
        assert_eq!(m.drop_blocks(1, &[3]).dropped, 1);
        assert_eq!(m.clear_namespace(2).dropped, 3);
        m.check_invariants().unwrap();
    }
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    let mut tiers = [None; 3];
    assert_eq!(m.lookup(1, &[1, 2, 3], &mut tiers), 2);
    assert_eq!(m.lookup(2, &[1, 2, 3], &mut tiers), 0);
}

#[test]
fn events_and_g1_promotion() {
    let (b, t) = config(None, 8, 0, EngineKind::Sync);
    let (tx, rx) = crossbeam::channel::bounded(64);
    let m = local(
        BlockManager::new(
            &b,
            &t,
            ManagerOptions {
                events: Some(tx),
                ..ManagerOptions::default()
            },
        )
        .unwrap(),
    );
    save(&m, 5, &chain(1, 3), false);
    let stored: Vec<_> = rx.try_iter().collect();
    assert_eq!(stored.len(), 3);
    assert!(matches!(
        stored[1],
        BlockEvent::Stored {
            namespace: 5,
            hash: 2,
            parent: Some(1),
            tier: Tier::Host
        }
    ));
    assert_eq!(
        m.promote(5, &[1, 2, 3]),
        2,
        "G1 holds 2 blocks: the chain's first two (one batch; its own reservations are \
         not evicted for the third)"
    );
    let mut tiers = [None; 3];
    assert_eq!(m.lookup(5, &[1, 2, 3], &mut tiers), 3);
    assert_eq!(tiers.iter().filter(|&&t| t == Some(Tier::Hbm)).count(), 2);
    let r = load(&m, 5, &[1, 2, 3]);
    assert_eq!(r.loaded, 3);
    assert_eq!(r.tiers.iter().filter(|&&t| t == Tier::Hbm).count(), 2);
    m.drop_blocks(5, &[3]);
    let removed: Vec<_> = rx
        .try_iter()
        .filter(|e| matches!(e, BlockEvent::Removed { .. }))
        .collect();
    assert!(removed.iter().any(|e| matches!(
        e,
        BlockEvent::Removed {
            hash: 3,
            tier: Tier::Host,
            reason: RemoveReason::Dropped,
            ..
        }
    )));
    m.check_invariants().unwrap();
}

#[test]
fn concurrent_sessions_keep_data_and_invariants() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, t) = config(Some(dir.path()), 16, 64, EngineKind::IoUring);
    b.nvme_admit_min_hits = 0;
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    std::thread::scope(|s| {
        for th in 0..3u64 {
            let m = &m;
            s.spawn(move || {
                for round in 0..60u64 {
                    let base = (round % 7) * 100 + th * 10_000;
                    let c = chain(base, 4);
                    save(m, 1, &c, round % 5 == 0);
                    let hashes: Vec<u64> = c.iter().map(|b| b.0).collect();
                    load(m, 1, &hashes);
                    if round % 3 == 0 {
                        m.pin(th, 1, &hashes[..2]);
                    }
                    if round % 4 == 0 {
                        m.release_session(th);
                    }
                }
                m.release_session(th);
            });
        }
    });
    m.check_invariants().unwrap();
}

/// Deterministic simulation: seeded random workloads through the whole manager (host pool,
/// G1 stand-in, NVMe on a temp dir) with restarts; after every step the registry invariants
/// hold, pinned blocks are still stored, and every byte served equals what was saved.
fn simulate(seed: u64, steps: usize, engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), 6, 12, engine);
    // Namespace 1 is limited in every tier; namespace 0 is not.
    let options = || ManagerOptions {
        quotas: vec![quota(1, PerTier([Some(1), Some(3), Some(5)]))],
        ..ManagerOptions::default()
    };
    let mut m = local(BlockManager::new(&b, &t, options()).unwrap());
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        kvplane_kernels::checksum::mix64(rng) % n
    };
    let mut pins: HashMap<(u64, u32, u64), u32> = HashMap::new();
    let (mut served_from, mut restarts, mut demoted) = (PerTier::<usize>::default(), 0, 0u64);
    for step in 0..steps {
        let c = next(8);
        let ns = (c % 2) as u32;
        let blocks = chain(c * 100, 1 + next(6) as usize);
        let hashes: Vec<u64> = blocks.iter().map(|b| b.0).collect();
        let op = next(100);
        match op {
            0..=29 => {
                let wt = next(5) == 0;
                let prio = next(3) as u8;
                let r = m
                    .save_with(ns, &blocks, prio, wt, |i, buf: &mut [u8]| {
                        pattern(ns, blocks[i].0, buf);
                        Ok::<(), std::io::Error>(())
                    })
                    .unwrap();
                assert_eq!(
                    r.stored + r.already_present + r.no_space,
                    blocks.len(),
                    "step {step}"
                );
                assert!(r.nvme_error.is_none(), "step {step}: {:?}", r.nvme_error);
            }
            30..=44 => {
                let mut tiers = vec![None; hashes.len()];
                let n = m.lookup(ns, &hashes, &mut tiers);
                assert!(
                    tiers[..n].iter().all(|t| t.is_some())
                        && tiers[n..].iter().all(|t| t.is_none())
                );
            }
            45..=64 => {
                let mut tiers = vec![None; hashes.len()];
                let n = m.lookup(ns, &hashes, &mut tiers);
                let r = load(&m, ns, &hashes);
                assert!(r.loaded >= n.min(1) || r.failure.is_some(), "step {step}");
                for t in &r.tiers {
                    served_from[*t] += 1;
                }
                if let Some((_, f)) = &r.failure {
                    assert!(
                        matches!(f, LoadFailure::Missing | LoadFailure::NoSpace),
                        "step {step}: {f}"
                    );
                }
            }
            65..=72 => {
                let session = next(3);
                let n = m.pin(session, ns, &hashes).leased;
                for &h in &hashes[..n] {
                    *pins.entry((session, ns, h)).or_default() += 1;
                }
            }
            73..=79 => {
                let session = next(3);
                m.unpin(session, ns, &hashes);
                for &h in &hashes {
                    if let Some(c) = pins.get_mut(&(session, ns, h)) {
                        *c -= 1;
                        if *c == 0 {
                            pins.remove(&(session, ns, h));
                        }
                    }
                }
            }
            80..=83 => {
                let session = next(3);
                m.release_session(session);
                pins.retain(|k, _| k.0 != session);
            }
            84..=87 => {
                let r = m.drop_blocks(ns, &hashes[next(hashes.len() as u64) as usize..]);
                let _ = r;
            }
            88..=89 => {
                m.clear_namespace(ns);
            }
            90..=95 => {
                // Load (staging into the host tier), then promote the hot prefix to G1.
                let r = load(&m, ns, &hashes);
                m.promote(ns, &hashes[..r.loaded]);
            }
            _ => {
                // Restart: what survives is exactly what NVMe holds; sessions are gone.
                demoted += m.stats().tiers[1].removed["demoted"];
                drop(m);
                m = local(BlockManager::new(&b, &t, options()).unwrap());
                pins.clear();
                restarts += 1;
            }
        }
        if let Err(e) = m.check_invariants() {
            panic!("seed {seed} step {step} op {op}: {e}");
        }
        // Between operations no slot is held for a namespace without being reserved.
        assert_eq!(
            m.blocks.claimed_slots(),
            0,
            "seed {seed} step {step} op {op}: claimed slots left behind"
        );
        for q in m.stats().namespaces {
            for t in Tier::ALL {
                let max = q.max_slots[t].unwrap_or(u32::MAX);
                assert!(
                    q.used_slots[t] <= max,
                    "seed {seed} step {step}: namespace {} holds {} slots of tier {t}, quota {max}",
                    q.namespace,
                    q.used_slots[t]
                );
            }
        }
        for &(_, ns, h) in pins.keys() {
            let mut t = [None];
            assert_eq!(
                m.lookup(ns, &[h], &mut t),
                1,
                "seed {seed} step {step}: pinned block {h} gone"
            );
        }
    }
    // The workload must actually reach every path it claims to test.
    demoted += m.stats().tiers[1].removed["demoted"];
    assert!(
        restarts > 0 && demoted > 0,
        "seed {seed}: restarts {restarts}, demoted {demoted}"
    );
    assert!(
        served_from.values().all(|&n| n > 0),
        "seed {seed}: loads served per tier {served_from:?}"
    );
}

/// A quota of `blocks[t]` whole blocks per tier.
fn quota(ns: u32, blocks: PerTier<Option<u64>>) -> NamespaceQuota {
    NamespaceQuota {
        namespace: ns,
        name: format!("ns-{ns}"),
        max_bytes: blocks.map(|b| b.map(|b| b * BLOCK as u64)),
    }
}

/// A manager with `host_slots` host slots, no NVMe, and one namespace quota.
fn manager_with_quota(host_slots: u64, quota: NamespaceQuota) -> LocalBlocks {
    let (b, t) = config(None, host_slots, 0, EngineKind::Sync);
    let options = ManagerOptions {
        quotas: vec![quota],
        ..ManagerOptions::default()
    };
    local(BlockManager::new(&b, &t, options).unwrap())
}

/// One tenant flooding the host tier at its quota evicts only its own blocks: every block
/// of the neighbour stays stored and loads back bit-identical, and the flooder's recent
/// blocks are still served (it keeps a working cache of its quota's size).
#[test]
fn quota_bounds_a_flooding_namespace_to_its_own_blocks() {
    let m = manager_with_quota(16, quota(7, PerTier([Some(0), Some(4), None])));
    let quiet = chain(1_000, 8);
    assert_eq!(save(&m, 3, &quiet, false).stored, 8);
    for round in 0..50u64 {
        let r = save(&m, 7, &chain(10_000 + round * 10, 3), false);
        assert_eq!(r.stored, 3, "round {round}: the flooder still stores");
        let s = m.stats();
        let q = &s.namespaces[0];
        assert_eq!(q.max_slots, PerTier([Some(0), Some(4), None]));
        assert!(
            q.used_slots[Tier::Host] <= 4,
            "round {round}: {:?}",
            q.used_slots
        );
        m.check_invariants().unwrap();
    }
    let hashes: Vec<u64> = quiet.iter().map(|b| b.0).collect();
    let r = load(&m, 3, &hashes);
    assert_eq!(
        r.loaded, 8,
        "the quiet namespace lost blocks: {:?}",
        r.failure
    );
    // The flooder's newest chain is served; its oldest was evicted (by itself).
    assert_eq!(load(&m, 7, &[10_490, 10_491, 10_492]).loaded, 3);
    assert_eq!(load(&m, 7, &[10_000]).loaded, 0);
    // A zero quota keeps the namespace out of G1.
    assert_eq!(m.promote(7, &[10_490]), 0);
    assert_eq!(m.promote(3, &[1_000]), 1);
    // Unlimited namespaces still share what is left: the rest of the tier.
    assert_eq!(save(&m, 3, &chain(2_000, 4), false).stored, 4);
    assert_eq!(m.stats().tiers[1].used_slots, 16);
}

/// Pinned blocks count against the quota but cannot be evicted: a namespace whose quota
/// is all pinned stores nothing more (`no_space`) rather than taking a neighbour's slot.
#[test]
fn quota_full_of_leases_refuses_instead_of_evicting_neighbours() {
    let m = manager_with_quota(8, quota(7, PerTier([None, Some(2), None])));
    assert_eq!(save(&m, 7, &chain(1, 2), false).stored, 2);
    assert_eq!(m.pin(9, 7, &[1, 2]).leased, 2);
    let r = save(&m, 7, &chain(100, 3), false);
    assert_eq!((r.stored, r.no_space), (0, 3));
    assert_eq!(m.stats().tiers[1].used_slots, 2);
    m.release_session(9);
    assert_eq!(save(&m, 7, &chain(100, 2), false).stored, 2);
    m.check_invariants().unwrap();
}

/// Two saves of one namespace in flight at once cannot both take its last room: a save
/// allocates free slots in one registry lock hold and reserves them in a later one, and
/// the slots in between count against the namespace's quota. Before, both plans saw the
/// whole quota free and the namespace ended up holding twice its quota.
#[test]
fn two_concurrent_saves_cannot_overshoot_a_namespace_quota() {
    let m = manager_with_quota(16, quota(7, PerTier([None, Some(4), None])));
    let blocks = &m.blocks;
    // Both saves plan before either reserves (as two data-plane threads can).
    let (first, second) = (chain(100, 4), chain(200, 4));
    let mut plan_a = blocks.begin_save(7, &first, 0);
    let mut plan_b = blocks.begin_save(7, &second, 0);
    let (mut slots_a, mut slots_b) = (Vec::new(), Vec::new());
    let room_a = blocks.plan_room(Tier::Host, 7, plan_a.slots_needed(), &mut slots_a);
    let room_b = blocks.plan_room(Tier::Host, 7, plan_b.slots_needed(), &mut slots_b);
    assert_eq!(slots_a.len(), 4, "the first save gets the quota's room");
    assert_eq!(
        slots_b.len(),
        0,
        "the second save took slots the first one holds for the namespace"
    );
    let mut report = SaveReport::default();
    blocks.commit_room(room_a, Vec::new(), true, &mut slots_a, &mut report);
    blocks.commit_room(room_b, Vec::new(), true, &mut slots_b, &mut report);
    blocks.reserve_save(&mut plan_a, slots_a);
    blocks.reserve_save(&mut plan_b, slots_b);
    assert_eq!((plan_a.stores.len(), plan_b.report.no_space), (4, 4));
    assert_eq!(m.stats().namespaces[0].used_slots[Tier::Host], 4);
    assert!(blocks.abort_save(plan_a).is_empty(), "no NVMe writes");
    assert!(blocks.abort_save(plan_b).is_empty(), "no NVMe writes");
    m.check_invariants().unwrap();
    // The claims ended with the plans: the namespace has its whole quota again.
    assert_eq!(save(&m, 7, &chain(300, 4), false).stored, 4);
    assert_eq!(m.stats().namespaces[0].used_slots[Tier::Host], 4);
    m.check_invariants().unwrap();
}

/// The same when the room comes from demoting other namespaces' blocks: both plans find
/// the tier full and plan demotions (written outside the registry lock), and the slots
/// they free go to a plan only while its namespace's quota has room.
#[test]
fn two_concurrent_saves_making_room_by_demotion_cannot_overshoot_a_quota() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), 8, 32, EngineKind::Sync);
    let options = ManagerOptions {
        quotas: vec![quota(7, PerTier([None, Some(2), None]))],
        ..ManagerOptions::default()
    };
    let m = local(BlockManager::new(&b, &t, options).unwrap());
    // Namespace 3 fills the host tier with blocks NVMe admission takes (seen twice).
    for i in 0..8u64 {
        save(&m, 3, &chain(1_000 + i * 10, 1), false);
        assert_eq!(load(&m, 3, &[1_000 + i * 10]).loaded, 1);
    }
    let blocks = &m.blocks;
    let (first, second) = (chain(100, 2), chain(200, 2));
    let mut plan_a = blocks.begin_save(7, &first, 0);
    let mut plan_b = blocks.begin_save(7, &second, 0);
    let (mut slots_a, mut slots_b) = (Vec::new(), Vec::new());
    let room_a = blocks.plan_room(Tier::Host, 7, 2, &mut slots_a);
    let room_b = blocks.plan_room(Tier::Host, 7, 2, &mut slots_b);
    assert_eq!(
        (room_a.demotions.len(), room_b.demotions.len()),
        (2, 2),
        "both plans make room by demotion"
    );
    let mut report = SaveReport::default();
    let written = m.mover.write_nvme(None, &room_a.demotions);
    blocks.commit_room(room_a, written, true, &mut slots_a, &mut report);
    let written = m.mover.write_nvme(None, &room_b.demotions);
    blocks.commit_room(room_b, written, true, &mut slots_b, &mut report);
    blocks.reserve_save(&mut plan_a, slots_a);
    blocks.reserve_save(&mut plan_b, slots_b);
    let used = m.stats().namespaces[0].used_slots[Tier::Host];
    assert!(used <= 2, "namespace 7 holds {used} host slots, quota 2");
    assert_eq!(plan_a.stores.len() + plan_b.stores.len(), 2);
    assert!(blocks.abort_save(plan_a).is_empty(), "no NVMe writes");
    assert!(blocks.abort_save(plan_b).is_empty(), "no NVMe writes");
    assert_eq!(blocks.claimed_slots(), 0);
    m.check_invariants().unwrap();
}

/// Slots a room plan took but nobody used go back with `free_room`, and with them the
/// namespace's claim on its quota.
#[test]
fn freeing_unused_room_gives_the_quota_back() {
    let m = manager_with_quota(16, quota(7, PerTier([None, Some(3), None])));
    let mut slots = Vec::new();
    let room = m.blocks.plan_room(Tier::Host, 7, 3, &mut slots);
    let mut report = SaveReport::default();
    m.blocks
        .commit_room(room, Vec::new(), true, &mut slots, &mut report);
    assert_eq!(slots.len(), 3);
    let mut more = Vec::new();
    let room = m.blocks.plan_room(Tier::Host, 7, 1, &mut more);
    m.blocks
        .commit_room(room, Vec::new(), true, &mut more, &mut report);
    assert!(more.is_empty(), "the quota's room is claimed");
    m.blocks.free_room(7, Tier::Host, slots);
    assert_eq!(save(&m, 7, &chain(1, 3), false).stored, 3);
    m.check_invariants().unwrap();
}

#[test]
fn simulation_sync_engine_seeds() {
    for seed in 1..=4 {
        simulate(seed, 400, EngineKind::Sync);
    }
}

#[test]
fn simulation_io_uring_engine() {
    simulate(99, 400, EngineKind::IoUring);
}

#[test]
fn config_errors_name_the_key() {
    let (b, mut t) = config(None, 8, 0, EngineKind::Sync);
    t.nvme.queue_depth = 3;
    let e = BlockManager::new(&b, &t, ManagerOptions::default())
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "config: tiers.nvme.queue_depth: must be a power of two in 1..=4096, got 3"
    );
    let bad = BlockConfig {
        block_bytes: 0,
        ..b
    };
    let e = BlockManager::new(&bad, &TiersConfig::default(), ManagerOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("blocks.block_bytes"), "{e}");
}

/// Issue 17, finding 3: an engine user with write access to the tier file rewrites a
/// victim's slot. Neither a rewrite that keeps the block's checksum nor one that
/// recomputes the header's checksums gets the attacker's bytes to the victim, in a running
/// manager or after a restart.
#[test]
fn a_slot_rewritten_without_the_key_never_reaches_the_victim() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), 4, 16, EngineKind::Sync);
    let c = chain(10, 4);
    let hashes: Vec<u64> = c.iter().map(|b| b.0).collect();
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    assert_eq!(save(&m, 3, &c, true).nvme_written, 4);
    save(&m, 9, &chain(100, 4), true); // pushes the victim's blocks out of the host tier
    let mut tiers = [None; 4];
    assert_eq!(m.lookup(3, &hashes, &mut tiers), 4);
    assert_eq!(tiers, [Some(Tier::Nvme); 4]);

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&t.nvme.paths[0])
        .unwrap();
    // The attacker reads the unauthenticated fields to find the victim's slots.
    let slot_of = |hash: u64| slot_on_disk(&f, 3, hash);
    let attacker = vec![0xeeu8; BLOCK];
    let mut forged = attacker.clone();
    let s12 = slot_of(12);
    let mut original = vec![0u8; BLOCK];
    f.read_exact_at(&mut original, s12 * SLOT + 4096).unwrap();
    crate::tier::nvme::tests::keep_checksum(&original, &mut forged);
    f.write_all_at(&forged, s12 * SLOT + 4096).unwrap();

    let victim_load = |m: &LocalBlocks| {
        m.load_with(3, &hashes, |i, bytes: &[u8]| {
            assert_ne!(
                bytes,
                &forged[..],
                "the attacker's block reached the victim"
            );
            assert_eq!(bytes, &expect(3, hashes[i])[..], "block {i}");
            Ok::<(), std::io::Error>(())
        })
        .unwrap()
    };
    let r = victim_load(&m);
    assert_eq!(r.loaded, 2, "blocks 10 and 11 served");
    assert!(
        matches!(&r.failure, Some((2, LoadFailure::Corrupt(e))) if e.to_string().contains("data MAC")),
        "{:?}",
        r.failure
    );
    assert_eq!(
        m.lookup(3, &hashes, &mut tiers),
        2,
        "the rewritten copy is gone"
    );
    m.check_invariants().unwrap();
    drop(m);

    // Offline, the attacker now rewrites block 13 and fixes up every checksum it can.
    let s13 = slot_of(13);
    let mut page = vec![0u8; 4096];
    f.read_exact_at(&mut page, s13 * SLOT).unwrap();
    f.write_all_at(&attacker, s13 * SLOT + 4096).unwrap();
    page[56..64].copy_from_slice(&kvplane_kernels::checksum64(&attacker).to_le_bytes());
    let sum = kvplane_kernels::checksum64(&page[..96]);
    page[96..104].copy_from_slice(&sum.to_le_bytes());
    f.write_all_at(&page, s13 * SLOT).unwrap();
    drop(f);
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    assert_eq!(
        m.stats().nvme_scan_corrupt,
        1,
        "refused by the restart's scan"
    );
    let r = victim_load(&m);
    assert_eq!(r.loaded, 2);
    assert!(
        matches!(r.failure, Some((2, LoadFailure::Missing))),
        "{:?}",
        r.failure
    );
    assert_eq!(
        m.lookup(3, &hashes[3..], &mut tiers[..1]),
        0,
        "13 not indexed"
    );
    m.check_invariants().unwrap();
}

/// An engine's KV pool (2 layers x K,V x 16 tokens x one 64-byte head: `BLOCK` bytes a
/// block, 8 pages) registered with a manager's device, its layout uploaded.
struct TestEngine {
    mem: Vec<u8>,
    layout: kvplane_kernels::PagedLayout,
    target: crate::dataplane::mover::EngineTarget,
    device: Arc<dyn kvplane_cuda::Device>,
}

impl TestEngine {
    fn new(m: &LocalBlocks) -> Box<TestEngine> {
        let raw = kvplane_kernels::layout::planes_per_layer(2, 16, 1, 64, 8);
        let layout = kvplane_kernels::PagedLayout::new(&raw).unwrap();
        assert_eq!(layout.info().block_bytes, BLOCK as u64);
        let mut mem = vec![0u8; raw.buffer_bytes as usize];
        let device = Arc::clone(m.mover.device());
        let base = std::ptr::NonNull::new(mem.as_mut_ptr()).unwrap();
        // SAFETY: `mem` lives in the returned box, is never resized, and is unregistered
        // in Drop before it is freed; it is touched only through the device meanwhile
        // (tests read it after the copies they wait for).
        let buffer = unsafe { device.register_host_memory(base, mem.len()) }.unwrap();
        let target = crate::dataplane::mover::EngineTarget {
            buffer,
            layout: device.upload_layout(&layout).unwrap(),
            stream: device.create_stream().unwrap(),
            event: device.create_event().unwrap(),
        };
        Box::new(TestEngine {
            mem,
            layout,
            target,
            device,
        })
    }

    /// Writes `expect(ns, hash)` into page `page`, as the reference scatter puts it.
    fn write_block(&mut self, ns: u32, hash: u64, page: u32) {
        let base = std::ptr::NonNull::new(self.mem.as_mut_ptr()).unwrap();
        // SAFETY: the pool is live and no device copy runs on it now.
        let kv = unsafe { kvplane_kernels::EngineKv::new(base, self.mem.len()) };
        kvplane_kernels::host::scatter(
            &kv,
            &self.layout,
            &[page],
            &expect(ns, hash),
            kvplane_kernels::HostLaunch::default(),
        )
        .unwrap();
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        self.device.sync_stream(self.target.stream).unwrap();
        self.device.free_layout(self.target.layout).unwrap();
        self.device.destroy_event(self.target.event).unwrap();
        self.device.destroy_stream(self.target.stream).unwrap();
        self.device.free(self.target.buffer).unwrap();
    }
}

/// A load served partly from G1 and partly from the host tier (two device buffers): the
/// mover launches one scatter per buffer, and every block lands in its engine page exactly
/// as the reference kernel puts it there.
#[test]
fn a_load_from_g1_and_host_scatters_each_block_into_its_page() {
    use crate::dataplane::mover::MoveScratch;
    let m = manager(None, 8, 0);
    save(&m, 5, &chain(1, 4), false);
    assert_eq!(m.promote(5, &[1, 2]), 2);
    let mut engine = TestEngine::new(&m);
    let target = engine.target;
    let hashes = [1, 2, 3, 4];
    let pages = [6u32, 0, 3, 5];
    let mut scratch = MoveScratch::default();
    let r = super::load(&m.blocks, &m.mover, 5, &hashes, None, |mv, items| {
        mv.launch_scatter(target, &pages[..items.len()], items, &mut scratch)?;
        mv.wait(target)
    })
    .unwrap();
    assert_eq!(r.loaded, 4);
    assert_eq!(r.tiers, [Tier::Hbm, Tier::Hbm, Tier::Host, Tier::Host]);
    let got = std::mem::take(&mut engine.mem);
    engine.mem = vec![0u8; got.len()];
    for (h, page) in hashes.iter().zip(pages) {
        engine.write_block(5, *h, page);
    }
    assert!(
        got == engine.mem,
        "engine pages differ from the reference scatter"
    );
    engine.mem = got; // unregistered (Drop) before it goes
}

/// A SAVE that keeps its blocks on the GPU (`KVP_SQE_F_KEEP_ON_GPU`) gathers each into a
/// host slot and a G1 slot (one launch per buffer); once committed, lookups find them in
/// G1 and a load is served from G1, byte for byte. With G1 full (2 slots here), a further
/// save evicts G1's least valuable block, whose host copy stays, and a save without the
/// flag never touches G1.
#[test]
fn a_save_kept_on_the_gpu_lands_in_g1_and_the_host_tier() {
    use crate::dataplane::mover::MoveScratch;
    let m = manager(None, 8, 0);
    let mut engine = TestEngine::new(&m);
    let target = engine.target;
    let mut scratch = MoveScratch::default();
    let mut pages = Vec::new();
    let mut save_from_pages = |blocks: &[(u64, Option<u64>)], first_page: u32, keep: bool| {
        let options = SaveOptions {
            keep_on_gpu: keep.then_some(target.stream),
            ..SaveOptions::default()
        };
        let started = begin_save(
            &m.blocks,
            &m.mover,
            5,
            blocks,
            options,
            |mv, stores, hbm| {
                pages.clear();
                pages.extend(stores.iter().map(|s| first_page + s.index as u32));
                pages.extend(
                    hbm.iter()
                        .map(|c| first_page + stores[c.store].index as u32),
                );
                mv.launch_gather(target, &pages, stores, hbm, &mut scratch)?;
                mv.wait(target)
            },
        )
        .unwrap();
        finish_save(&m.blocks, &m.mover, started, Ok(())).unwrap()
    };
    for (i, h) in [11u64, 12, 13, 14].iter().enumerate() {
        engine.write_block(5, *h, i as u32);
    }
    let r = save_from_pages(&chain(11, 2), 0, true);
    assert_eq!((r.stored, r.hbm_stored), (2, 2));
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(5, &[11, 12], &mut tiers), 2);
    assert_eq!(tiers, [Some(Tier::Hbm); 2], "found in G1 first");
    let l = load(&m, 5, &[11, 12]);
    assert_eq!(
        l.tiers,
        [Tier::Hbm, Tier::Hbm],
        "served from G1, bytes checked"
    );

    // A save without the flag stays out of G1.
    let r = save_from_pages(&[(13, None)], 2, false);
    assert_eq!((r.stored, r.hbm_stored), (1, 0));
    let mut t = [None; 1];
    m.lookup(5, &[13], &mut t);
    assert_eq!(t, [Some(Tier::Host)]);

    // G1 is full: keeping block 14 evicts a G1 block, whose host copy stays loadable.
    let r = save_from_pages(&[(14, None)], 3, true);
    assert_eq!((r.stored, r.hbm_stored), (1, 1));
    m.lookup(5, &[14], &mut t);
    assert_eq!(t, [Some(Tier::Hbm)]);
    let l = load(&m, 5, &[11, 12]);
    assert_eq!(
        l.loaded, 2,
        "the evicted G1 block is still in the host tier"
    );
    assert!(
        l.tiers.contains(&Tier::Host),
        "one of 11, 12 left G1: {:?}",
        l.tiers
    );
    m.check_invariants().unwrap();
}

/// G1 victims whose only copy is in G1 are not lost when G1 needs room: they are copied
/// down to the host tier (one batched copy, taking the slots of the host tier's least
/// valuable blocks) and load from there byte for byte.
#[test]
fn g1_victims_with_no_other_copy_are_copied_down_to_the_host_tier() {
    let m = manager(None, 4, 0);
    save(&m, 5, &chain(1, 2), false);
    assert_eq!(m.promote(5, &[1, 2]), 2);
    // Four newer blocks push 1 and 2 out of the host tier: G1 holds their only copy.
    save(&m, 5, &chain(100, 4), false);
    let mut t = [None; 2];
    assert_eq!(m.lookup(5, &[1, 2], &mut t), 2);
    assert_eq!(t, [Some(Tier::Hbm); 2]);
    assert_eq!(m.stats().tiers[1].removed["evicted"], 2);

    // Promoting two more blocks takes both G1 slots: 2 (the leaf), then 1, go down.
    save(&m, 5, &chain(200, 2), false);
    assert_eq!(m.promote(5, &[200, 201]), 2);
    assert_eq!(m.lookup(5, &[1, 2], &mut t), 2, "copied down, not lost");
    assert_eq!(t, [Some(Tier::Host); 2]);
    assert_eq!(load(&m, 5, &[1, 2]).tiers, [Tier::Host, Tier::Host]);
    assert_eq!(m.lookup(5, &[200, 201], &mut t), 2);
    assert_eq!(t, [Some(Tier::Hbm); 2]);
    let s = m.stats();
    assert_eq!(s.tiers[0].removed["demoted"], 2);
    assert_eq!(s.tiers[0].removed["evicted"], 0);
    m.check_invariants().unwrap();
}

/// A chain whose only copy is in G1 comes down to the host tier whole in one round when
/// G1 needs all its slots: each block copied down frees its parent as a candidate in the
/// same plan. Before, a held child kept its parent from being a G1 leaf, so one block
/// came down per round and after eight rounds the promotion settled for eight slots.
#[test]
fn a_g1_only_chain_comes_down_in_one_round() {
    const G1_BLOCKS: usize = 12;
    let (b, mut t) = config(None, 2 * G1_BLOCKS as u64, 0, EngineKind::Sync);
    t.hbm.capacity_bytes = (G1_BLOCKS * BLOCK) as u64;
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    let old: Vec<u64> = (1..=G1_BLOCKS as u64).collect();
    save(&m, 5, &chain(1, G1_BLOCKS), false);
    assert_eq!(m.promote(5, &old), G1_BLOCKS);
    // Two newer chains fill the host tier: G1 now holds the old chain's only copy.
    save(&m, 5, &chain(100, G1_BLOCKS), false);
    save(&m, 5, &chain(200, G1_BLOCKS), false);
    let mut t = vec![None; G1_BLOCKS];
    assert_eq!(m.lookup(5, &old, &mut t), G1_BLOCKS);
    assert!(t.iter().all(|&t| t == Some(Tier::Hbm)), "only in G1: {t:?}");

    // Promoting the newest chain needs every G1 slot.
    let new: Vec<u64> = (200..200 + G1_BLOCKS as u64).collect();
    assert_eq!(
        m.promote(5, &new),
        G1_BLOCKS,
        "the promotion got fewer G1 slots than the old chain held"
    );
    assert_eq!(
        m.lookup(5, &old, &mut t),
        G1_BLOCKS,
        "copied down, not lost"
    );
    assert!(t.iter().all(|&t| t == Some(Tier::Host)), "{t:?}");
    assert_eq!(load(&m, 5, &old).loaded, G1_BLOCKS);
    let s = m.stats();
    assert_eq!(s.tiers[0].removed["demoted"], G1_BLOCKS as u64);
    assert_eq!(s.tiers[0].removed["evicted"], 0);
    m.check_invariants().unwrap();
}

/// With every host slot held by a lease, a G1 victim has nowhere to go down to: it is
/// dropped from G1 (counted as evicted) and the promotion still gets its slot.
#[test]
fn a_g1_victim_with_no_host_room_is_dropped() {
    let m = manager(None, 2, 0);
    save(&m, 5, &chain(1, 2), false);
    assert_eq!(m.promote(5, &[1, 2]), 2);
    save(&m, 5, &chain(100, 2), false);
    let mut t = [None; 2];
    assert_eq!(m.lookup(5, &[1, 2], &mut t), 2);
    assert_eq!(t, [Some(Tier::Hbm); 2], "only in G1");
    assert_eq!(m.pin(9, 5, &[100, 101]).leased, 2);
    // 100 and 101 are leased: promoting 100 needs a G1 slot, the host tier has no room.
    assert_eq!(m.promote(5, &[100]), 1);
    assert_eq!(m.lookup(5, &[1, 2], &mut t), 1, "the leaf 2 left G1");
    let s = m.stats();
    assert_eq!(s.tiers[0].removed["evicted"], 1);
    assert_eq!(s.tiers[0].removed["demoted"], 0);
    m.unpin(9, 5, &[100, 101]);
    m.check_invariants().unwrap();
}

/// A manager whose LOADs read NVMe blocks straight into G1 (`direct_to_g1 = "on"`: on
/// the host backend G1 is host memory, read with pread, checked by the MAC kernels'
/// CPU build), with `g1_slots` G1 slots, 2 host slots and 16 NVMe slots, every demoted
/// block admitted to NVMe.
fn direct_manager(dir: &Path, g1_slots: u64, faults: Option<Arc<FaultPlan>>) -> LocalBlocks {
    direct_manager_on(dir, g1_slots, faults, None)
}

/// [`direct_manager`] on `device` (a test device) when given.
fn direct_manager_on(
    dir: &Path,
    g1_slots: u64,
    faults: Option<Arc<FaultPlan>>,
    device: Option<Arc<dyn kvplane_cuda::Device>>,
) -> LocalBlocks {
    direct_manager_admitting(dir, g1_slots, 0, faults, device)
}

/// [`direct_manager_on`] admitting to NVMe only blocks seen `admit_min_hits` times.
fn direct_manager_admitting(
    dir: &Path,
    g1_slots: u64,
    admit_min_hits: u32,
    faults: Option<Arc<FaultPlan>>,
    device: Option<Arc<dyn kvplane_cuda::Device>>,
) -> LocalBlocks {
    let (mut b, mut t) = config(Some(dir), 2, 16, EngineKind::Sync);
    b.nvme_admit_min_hits = admit_min_hits;
    t.hbm.capacity_bytes = g1_slots * BLOCK as u64;
    t.nvme.direct_to_g1 = crate::tier::nvme::DirectToG1::On;
    let options = ManagerOptions {
        faults,
        device,
        ..ManagerOptions::default()
    };
    local(BlockManager::new(&b, &t, options).unwrap())
}

/// Chain (1, 2) only on NVMe, chain (50, 51) in the two host slots.
fn demote_first_chain(m: &LocalBlocks) {
    save(m, 1, &chain(1, 2), false);
    save(m, 1, &chain(50, 2), false);
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(1, &[1, 2], &mut tiers), 2);
    assert_eq!(tiers, [Some(Tier::Nvme); 2]);
}

#[test]
fn loads_read_nvme_blocks_straight_into_g1_and_check_them_there() {
    let dir = tempfile::tempdir().unwrap();
    let m = direct_manager(dir.path(), 4, None);
    let path = &m.stores().nvme_g1;
    assert!(path.direct, "{path:?}");
    assert!(
        path.describe.contains("straight into G1"),
        "{}",
        path.describe
    );
    demote_first_chain(&m);
    // Byte for byte what was saved (the `load` helper checks every block).
    let r = load(&m, 1, &[1, 2]);
    assert_eq!(
        (r.loaded, r.tiers.clone()),
        (2, vec![Tier::Nvme; 2]),
        "{r:?}"
    );
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(1, &[1, 2], &mut tiers), 2);
    assert_eq!(
        tiers,
        [Some(Tier::Hbm); 2],
        "staged into G1, not the host tier"
    );
    assert_eq!(m.lookup(1, &[50, 51], &mut tiers), 2);
    assert_eq!(
        tiers,
        [Some(Tier::Host); 2],
        "the host tier kept its blocks"
    );
    assert_eq!(used_slots(&m, Tier::Hbm), 2);
    // Served again from G1.
    let r = load(&m, 1, &[1, 2]);
    assert_eq!(r.tiers, vec![Tier::Hbm; 2]);
    m.check_invariants().unwrap();
}

#[test]
fn what_g1_cannot_take_is_staged_through_the_host_tier() {
    let dir = tempfile::tempdir().unwrap();
    let m = direct_manager(dir.path(), 1, None);
    demote_first_chain(&m);
    let r = load(&m, 1, &[1, 2]);
    assert_eq!(r.loaded, 2, "{r:?}");
    // Block 2's host slot came from demoting one of 50, 51: the load reports that room.
    assert_eq!(
        (r.room.nvme_written, r.room.g1_written_to_nvme),
        (1, 0),
        "{r:?}"
    );
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(1, &[1, 2], &mut tiers), 2);
    assert_eq!(tiers, [Some(Tier::Hbm), Some(Tier::Host)]);
    m.check_invariants().unwrap();
}

#[test]
fn a_block_tampered_on_disk_is_caught_where_it_landed_in_g1() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let m = direct_manager(dir.path(), 4, None);
    demote_first_chain(&m);
    let path = dir.path().join("g3.kvp");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let slot_of = |hash: u64| slot_on_disk(&f, 1, hash);
    // Block 2 rewritten with its checksum kept (only the MAC can tell), block 1 with one
    // bit flipped (the checksum tells).
    let (s1, s2) = (slot_of(1), slot_of(2));
    let mut original = vec![0u8; BLOCK];
    f.read_exact_at(&mut original, s2 * SLOT + 4096).unwrap();
    let mut forged = vec![0xeeu8; BLOCK];
    crate::tier::nvme::tests::keep_checksum(&original, &mut forged);
    f.write_all_at(&forged, s2 * SLOT + 4096).unwrap();
    let r = m
        .load_with(1, &[1, 2], |i, bytes: &[u8]| {
            assert_ne!(bytes, &forged[..], "the forged block was served");
            assert_eq!(bytes, &expect(1, [1, 2][i])[..], "block {i}");
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
    assert_eq!(r.loaded, 1, "{r:?}");
    assert!(
        matches!(&r.failure, Some((1, LoadFailure::Corrupt(e))) if e.to_string().contains("data MAC")),
        "{:?}",
        r.failure
    );
    let mut tiers = [None; 2];
    assert_eq!(
        m.lookup(1, &[1, 2], &mut tiers),
        1,
        "the forged copy is gone"
    );
    m.drop_blocks(1, &[1]);
    save(&m, 1, &chain(1, 1), true);
    save(&m, 1, &chain(60, 2), false); // block 1 back on NVMe only
    let mut word = [0u8; 1];
    let s1 = [s1, slot_of(1)][1];
    f.read_exact_at(&mut word, s1 * SLOT + 4096 + 100).unwrap();
    f.write_all_at(&[word[0] ^ 4], s1 * SLOT + 4096 + 100)
        .unwrap();
    let r = m
        .load_with(1, &[1], |_, _: &[u8]| Ok::<(), std::io::Error>(()))
        .unwrap();
    assert_eq!(r.loaded, 0);
    assert!(
        matches!(&r.failure, Some((0, LoadFailure::Corrupt(e))) if e.to_string().contains("checksum")),
        "{:?}",
        r.failure
    );
    assert_eq!(
        used_slots(&m, Tier::Hbm),
        0,
        "no G1 slot kept for a refused block"
    );
    m.check_invariants().unwrap();
}

#[test]
fn a_failed_header_read_fails_the_load_at_that_block_and_frees_its_g1_slot() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Arc::new(FaultPlan::default());
    let m = direct_manager(dir.path(), 4, Some(plan.clone()));
    demote_first_chain(&m);
    plan.add(FaultRule {
        kind: Some(IoKind::Read),
        skip: 0,
        count: 1,
        effect: FaultEffect::Errno(libc::EIO),
    });
    let r = m
        .load_with(1, &[1, 2], |_, _: &[u8]| Ok::<(), std::io::Error>(()))
        .unwrap();
    assert_eq!(plan.fired(), 1);
    assert_eq!(r.loaded, 0, "{r:?}");
    assert!(
        matches!(r.failure, Some((0, LoadFailure::Io(_)))),
        "{:?}",
        r.failure
    );
    assert_eq!(
        used_slots(&m, Tier::Hbm),
        1,
        "block 2 (read fine) stays staged in G1"
    );
    let r = load(&m, 1, &[1, 2]);
    assert_eq!(r.loaded, 2, "{r:?}");
    m.check_invariants().unwrap();
}

/// A tier file cut short inside a block's data: that block's read into G1 fails as a
/// disk error of its slot (as a read into the host tier would), and the direct path
/// stays on (a file someone can damage must not switch it off).
#[test]
fn a_file_cut_short_fails_that_block_as_a_disk_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = direct_manager(dir.path(), 4, None);
    demote_first_chain(&m); // (1, 2) on NVMe, (50, 51) in the host tier
    save(&m, 1, &chain(60, 2), false); // (50, 51) to NVMe after (1, 2)
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(1, &[50, 51], &mut tiers), 2);
    assert_eq!(tiers, [Some(Tier::Nvme); 2]);
    // The file ends inside the data of whichever of 50, 51 lies last (its header page
    // still there).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("g3.kvp"))
        .unwrap();
    let slot_of = |hash: u64| slot_on_disk(&f, 1, hash);
    let slots = [slot_of(50), slot_of(51)];
    let last = usize::from(slots[1] > slots[0]);
    f.set_len(slots[last] * SLOT + 4096 + 100).unwrap();
    let r = m
        .load_with(1, &[50, 51], |_, _: &[u8]| Ok::<(), std::io::Error>(()))
        .unwrap();
    assert_eq!(r.loaded, last, "{r:?}");
    assert!(
        matches!(&r.failure, Some((k, LoadFailure::Io(NvmeError::Io { op: "read into G1", .. }))) if *k == last),
        "{:?}",
        r.failure
    );
    assert!(
        m.stores().direct_on(crate::tier::G1Direction::NvmeToG1),
        "a disk error leaves the path on"
    );
    m.check_invariants().unwrap();
}

/// A direct manager on a test device whose `read_file` fails, chain (1, 2) only on
/// NVMe, and a load of it that read nothing (its first block failed on the device).
fn a_load_failing_on_the_device(
    dir: &Path,
) -> (LocalBlocks, Arc<kvplane_cuda::host::HostDevice>, LoadReport) {
    let device = Arc::new(kvplane_cuda::host::HostDevice::with_failing_ops_for_tests(
        &["read_file"],
    ));
    let m = direct_manager_on(dir, 4, None, Some(device.clone()));
    demote_first_chain(&m);
    let r = m
        .load_with(1, &[1, 2], |_, _: &[u8]| Ok::<(), std::io::Error>(()))
        .unwrap();
    assert_eq!(r.loaded, 0, "{r:?}");
    (m, device, r)
}

/// A read into G1 that fails on the device (the driver, cuFile) fails that load's block
/// and turns later loads to the host tier.
#[test]
fn a_device_read_failure_turns_loads_to_the_host_tier() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _, r) = a_load_failing_on_the_device(dir.path());
    assert!(
        matches!(
            &r.failure,
            Some((0, LoadFailure::Io(NvmeError::Device { .. })))
        ),
        "{:?}",
        r.failure
    );
    assert!(
        !m.stores().direct_on(crate::tier::G1Direction::NvmeToG1),
        "the direct path is off from now on"
    );
    assert!(
        m.stores().nvme_g1_now().contains("failed on the device"),
        "/status says so"
    );
    assert_eq!(
        used_slots(&m, Tier::Hbm),
        0,
        "no G1 slot kept for a failed read"
    );
    // The next load stages through the host tier, byte for byte.
    let r = load(&m, 1, &[1, 2]);
    assert_eq!(r.loaded, 2, "{r:?}");
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(1, &[1, 2], &mut tiers), 2);
    assert_eq!(tiers, [Some(Tier::Host); 2]);
    m.check_invariants().unwrap();
}

/// A load takes G1 slots, then host room for the rest, whose demotion write panics: the
/// G1 slots (and their quota claims) go back too. (Found by a review.)
#[test]
fn a_panic_while_making_host_room_gives_back_the_g1_slots_a_load_took() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, mut t) = config(Some(dir.path()), 2, 16, EngineKind::Sync);
    b.nvme_admit_min_hits = 0;
    t.hbm.capacity_bytes = BLOCK as u64;
    t.nvme.direct_to_g1 = crate::tier::nvme::DirectToG1::On;
    let (m, plan) = with_faults(&b, &t, vec![quota(1, PerTier([Some(4), Some(4), None]))]);
    demote_first_chain(&m); // (1, 2) on NVMe, (50, 51) fill the host tier
    // Load (1, 2): the one G1 slot, then a host slot whose making demotes 50 or 51.
    plan.add(panic_rule(IoKind::Write));
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(&m, 1, &[1, 2])));
    assert!(panicked.is_err(), "the injected fault panicked the load");
    assert_eq!(plan.fired(), 1);
    assert_eq!(m.blocks.claimed_slots(), 0, "quota claims given back");
    assert_eq!(used_slots(&m, Tier::Hbm), 0, "the G1 slot given back");
    m.check_invariants().unwrap();
}

/// A block another load is staging into G1 right now is busy for a load that would
/// stage it into the host tier (one read of it at a time, as before G1 staging).
#[test]
fn a_block_being_staged_into_g1_is_busy_for_another_load() {
    let dir = tempfile::tempdir().unwrap();
    let m = direct_manager(dir.path(), 4, None);
    demote_first_chain(&m);
    m.drop_blocks(1, &[50, 51]); // host room for the second load
    let b = &m.blocks;
    let mut first = b.plan_load(1, &[1]);
    let mut g1 = Vec::new();
    let _settled = b.plan_room(Tier::Hbm, 1, 1, &mut g1);
    b.plan_staging(&mut first, g1, Vec::new());
    assert_eq!(
        first.reads.len(),
        1,
        "block 1 reserved in G1 for the first load"
    );
    let mut second = b.plan_load(1, &[1]);
    let mut host = Vec::new();
    let _settled = b.plan_room(Tier::Host, 1, 1, &mut host);
    b.plan_staging(&mut second, Vec::new(), host);
    assert!(second.reads.is_empty(), "not read a second time");
    let r = b.commit_load(second, 0);
    assert!(
        matches!(r.failure, Some((0, LoadFailure::Busy))),
        "{:?}",
        r.failure
    );
    b.abort_load(first);
    assert_eq!(b.claimed_slots(), 0);
    m.check_invariants().unwrap();
    assert_eq!(load(&m, 1, &[1, 2]).loaded, 2);
}

/// Two loads of a block found only on NVMe: the second stages it first and finds the copy
/// corrupt, which drops it; the first, planned before that, is then told the block is
/// missing. It used to panic planning its read (under the registry lock), leaking its
/// slots and leaving the block pending for good. (Found by a review.)
#[test]
fn a_load_planned_before_another_dropped_the_corrupt_copy_finds_the_block_missing() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(Some(dir.path()), 4, 16);
    save(&m, 1, &chain(1, 2), false);
    let mut t = [None; 2];
    assert_eq!(m.lookup(1, &[1, 2], &mut t), 2); // seen twice: admitted to NVMe
    save(&m, 1, &chain(200, 4), false);
    assert_eq!(m.lookup(1, &[1], &mut t[..1]), 1);
    assert_eq!(t[0], Some(Tier::Nvme));
    let b = &m.blocks;
    let mut first = b.plan_load(1, &[1]);
    let mut second = b.plan_load(1, &[1]);
    let mut host = Vec::new();
    let _settled = b.plan_room(Tier::Host, 1, 1, &mut host);
    b.plan_staging(&mut second, Vec::new(), host);
    assert_eq!(second.reads.len(), 1, "the second load reads block 1");
    let corrupt = NvmeError::Corrupt {
        slot: second.reads[0].nvme_slot,
        reason: "torn (test)".into(),
    };
    let erase = b.commit_staging(&mut second, vec![Err(corrupt)]);
    assert_eq!(erase.len(), 1, "the corrupt copy is dropped");
    b.commit_erase(&erase);
    let r = b.commit_load(second, 0);
    assert!(
        matches!(r.failure, Some((0, LoadFailure::Corrupt(_)))),
        "{:?}",
        r.failure
    );
    let mut host = Vec::new();
    let _settled = b.plan_room(Tier::Host, 1, 1, &mut host);
    b.plan_staging(&mut first, Vec::new(), host);
    assert!(first.reads.is_empty() && first.items.is_empty());
    let r = b.commit_load(first, 0);
    assert!(
        matches!(r.failure, Some((0, LoadFailure::Missing))),
        "{:?}",
        r.failure
    );
    assert_eq!(b.claimed_slots(), 0, "no slot kept for either load");
    m.check_invariants().unwrap();
    assert_eq!(m.lookup(1, &[1], &mut t[..1]), 0, "block 1 is gone");
    // Nothing stays pending: the block can be saved and loaded again.
    assert_eq!(save(&m, 1, &chain(1, 1), false).stored, 1);
    assert_eq!(load(&m, 1, &[1]).loaded, 1);
    m.check_invariants().unwrap();
}

/// Making room for a large SAVE in a host tier full of admitted blocks holds the registry
/// lock for time linear in the blocks it moves: 30,000 demotions planned in well under a
/// second. A recount of the plan's own demotions each round made it quadratic (about
/// 4.5 x 10^8 steps here; a 65,536-block SAVE stalled every session for seconds). (Found
/// by a review.)
#[test]
fn room_for_a_large_save_is_planned_in_linear_time() {
    let dir = tempfile::tempdir().unwrap();
    let n = 30_000usize;
    let (mut b, t) = config(Some(dir.path()), n as u64, n as u64, EngineKind::Sync);
    b.nvme_admit_min_hits = 0;
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    let roots: Vec<(u64, Option<u64>)> = (1..=n as u64).map(|h| (h, None)).collect();
    assert_eq!(save(&m, 1, &roots, false).stored, n);
    let mut out = Vec::new();
    let t0 = std::time::Instant::now();
    let room = m.blocks.plan_room(Tier::Host, 1, n, &mut out);
    let took = t0.elapsed();
    assert_eq!((out.len(), room.demotions.len()), (0, n));
    assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    let erase = m.blocks.abort_room(room);
    assert_eq!(erase.len(), n, "each demotion's NVMe slot set aside");
    m.blocks.commit_erase(&erase);
    m.check_invariants().unwrap();
}

/// A manager that moves blocks straight between NVMe and G1 (2 G1 slots) admitting to
/// NVMe only blocks seen 3 times: host victims seen less are evicted, so G1 can hold a
/// block's only copy beside an NVMe tier.
fn direct_manager_admitting_at_3(
    dir: &Path,
    device: Option<Arc<dyn kvplane_cuda::Device>>,
    faults: Option<Arc<FaultPlan>>,
) -> LocalBlocks {
    direct_manager_admitting(dir, 2, 3, faults, device)
}

/// Makes room for `want` G1 slots of namespace 5 on the manager's stream, as a save kept
/// on the GPU does, and gives the slots back: how many it got and what the room moved.
fn g1_room(m: &LocalBlocks, want: usize) -> (usize, SaveReport) {
    let mut room = SaveReport::default();
    let got = acquire(
        &m.blocks,
        &m.mover,
        Tier::Hbm,
        5,
        want,
        &mut room,
        Some(m.stream),
    );
    let n = got.len();
    m.blocks.free_room(5, Tier::Hbm, got);
    (n, room)
}

/// Chain (1, 2) only in G1 and seen often enough for NVMe; chain (100, 101) in the two
/// host slots, leased by session 9: the host tier has no room G1 victims may take.
fn g1_only_chain_beside_a_leased_host_tier(m: &LocalBlocks) {
    save(m, 5, &chain(1, 2), false);
    assert_eq!(m.promote(5, &[1, 2]), 2);
    save(m, 5, &chain(100, 2), false);
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(5, &[1, 2], &mut tiers), 2);
    assert_eq!(tiers, [Some(Tier::Hbm); 2], "only in G1");
    assert_eq!(used_slots(m, Tier::Nvme), 0, "not admitted to NVMe yet");
    for _ in 0..3 {
        m.lookup(5, &[1, 2], &mut tiers);
    }
    assert_eq!(m.pin(9, 5, &[100, 101]).leased, 2);
}

/// Where blocks move straight between NVMe and G1, a G1 victim the host tier has no room
/// for is written from G1 to NVMe (checksum and MAC computed where it is, by the MAC
/// kernels' CPU build on the host backend; the data with `Device::write_file`, the
/// header sealed on the CPU) instead of being dropped: it loads back byte for byte, and
/// a restart finds it on disk under its key. Compare
/// `a_g1_victim_with_no_host_room_is_dropped`.
#[test]
fn a_g1_victim_with_no_host_room_is_written_from_g1_to_nvme() {
    let dir = tempfile::tempdir().unwrap();
    let m = direct_manager_admitting_at_3(dir.path(), None, None);
    g1_only_chain_beside_a_leased_host_tier(&m);
    // Promoting 100 needs a G1 slot: the leaf 2 goes, straight to NVMe.
    let (got, room) = g1_room(&m, 1);
    assert_eq!(got, 1);
    assert_eq!(
        (
            room.nvme_written,
            room.g1_written_to_nvme,
            room.g1_copied_down
        ),
        (1, 1, 0),
        "{room:?}"
    );
    assert!(room.nvme_error.is_none(), "{room:?}");
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(5, &[1, 2], &mut tiers), 2, "written, not lost");
    assert_eq!(tiers, [Some(Tier::Hbm), Some(Tier::Nvme)]);
    let s = m.stats();
    assert_eq!(s.tiers[0].removed["demoted"], 1);
    assert_eq!(s.tiers[0].removed["evicted"], 0);
    m.unpin(9, 5, &[100, 101]);
    // Byte for byte (the `load` helper checks), 2 read back from the slot G1 wrote.
    assert_eq!(load(&m, 5, &[1, 2]).tiers, [Tier::Hbm, Tier::Nvme]);
    m.check_invariants().unwrap();
    drop(m);

    // The slot's header was sealed under the daemon's key: a restart indexes it.
    let m = direct_manager_admitting_at_3(dir.path(), None, None);
    let mut tiers = [None; 1];
    assert_eq!(
        m.lookup(5, &[2], &mut tiers),
        1,
        "found on disk after a restart"
    );
    assert_eq!(tiers, [Some(Tier::Nvme)]);
    assert_eq!(load(&m, 5, &[2]).loaded, 1);
    m.check_invariants().unwrap();
}

/// A G1 victim whose write from G1 fails on the device (cuFile or the MAC kernels refused)
/// is dropped as before, its NVMe slot given back with no header left on disk, and the
/// direct path turns off: later G1 victims go down through the host tier.
#[test]
fn a_device_write_failure_turns_g1_victims_to_the_host_tier() {
    const FAILING: [&[&str]; 2] = [&["write_file"], &["mac"]];
    for (failing, ops) in ["write_file", "mac"].into_iter().zip(FAILING) {
        let dir = tempfile::tempdir().unwrap();
        let device = Arc::new(kvplane_cuda::host::HostDevice::with_failing_ops_for_tests(
            ops,
        ));
        let m = direct_manager_admitting_at_3(dir.path(), Some(device), None);
        g1_only_chain_beside_a_leased_host_tier(&m);
        let (got, room) = g1_room(&m, 1);
        assert_eq!(got, 1, "{failing}: G1 still makes its room");
        assert!(
            matches!(room.nvme_error, Some(NvmeError::Device { .. })),
            "{failing}: {room:?}"
        );
        assert_eq!(room.nvme_written, 0, "{failing}");
        assert!(
            !m.stores().direct_on(crate::tier::G1Direction::G1ToNvme),
            "{failing}: the path is off"
        );
        assert!(m.stores().nvme_g1_now().contains("failed on the device"));
        assert_eq!(used_slots(&m, Tier::Nvme), 0, "{failing}: slot given back");
        let mut tiers = [None; 2];
        assert_eq!(m.lookup(5, &[1, 2], &mut tiers), 1, "{failing}: 2 dropped");
        let s = m.stats();
        assert_eq!(
            s.tiers[0].removed["io_error"], 1,
            "{failing}: {:?}",
            s.tiers[0]
        );
        m.unpin(9, 5, &[100, 101]);
        // The next G1 victim (1, its only copy in G1) goes down to the host tier.
        let (got, room) = g1_room(&m, 2);
        assert_eq!(got, 2, "{failing}");
        assert_eq!(
            (room.g1_copied_down, room.g1_written_to_nvme),
            (1, 0),
            "{failing}: {room:?}"
        );
        assert_eq!(m.lookup(5, &[1], &mut tiers[..1]), 1);
        assert_eq!(tiers[0], Some(Tier::Host), "{failing}");
        m.check_invariants().unwrap();
        drop(m);
        let m = direct_manager_admitting_at_3(dir.path(), None, None);
        assert_eq!(
            m.lookup(5, &[2], &mut tiers[..1]),
            0,
            "{failing}: nothing of 2 on disk after a restart"
        );
    }
}

/// Chain (1, 2) only in G1 beside a leased host tier, the NVMe engine failing its
/// `skip`-th write from now with `effect` while G1 room is made (writing block 2 from
/// G1): the manager and what the room moved.
fn g1_room_with_a_write_fault(
    dir: &Path,
    skip: u64,
    effect: FaultEffect,
) -> (LocalBlocks, SaveReport) {
    let plan = Arc::new(FaultPlan::default());
    let m = direct_manager_admitting_at_3(dir, None, Some(plan.clone()));
    g1_only_chain_beside_a_leased_host_tier(&m);
    plan.add(FaultRule {
        kind: Some(IoKind::Write),
        skip,
        count: 1,
        effect,
    });
    let (got, room) = g1_room(&m, 1);
    assert_eq!(got, 1);
    assert_eq!(plan.fired(), 1);
    (m, room)
}

/// After a write from G1 that failed on the disk: the path is still on, the NVMe slot
/// was given back, and with the host leases of [`g1_only_chain_beside_a_leased_host_tier`]
/// released the registry is consistent.
fn a_disk_error_left_the_path_on(m: &LocalBlocks) {
    assert!(
        m.stores().direct_on(crate::tier::G1Direction::G1ToNvme),
        "a disk error leaves the path on"
    );
    assert_eq!(used_slots(m, Tier::Nvme), 0);
    m.unpin(9, 5, &[100, 101]);
    m.check_invariants().unwrap();
}

/// The header write after a G1 block's data fails on the disk (after its page landed):
/// the block is not published, its slot's header is erased (a restart finds nothing),
/// and the path stays on (a disk error is not the device's).
#[test]
fn a_failed_header_write_after_a_write_from_g1_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The header erasure before the data, then the header write: the second puts the
    // whole header page on disk, then fails (EIO), so only erasing it again after the
    // failure keeps a restart from indexing the block.
    let (m, room) =
        g1_room_with_a_write_fault(dir.path(), 1, FaultEffect::TornWrite { bytes: 4096 });
    assert!(
        matches!(room.nvme_error, Some(NvmeError::Io { .. })),
        "{room:?}"
    );
    a_disk_error_left_the_path_on(&m);
    drop(m);
    let m = direct_manager_admitting_at_3(dir.path(), None, None);
    let mut tiers = [None; 1];
    assert_eq!(m.lookup(5, &[2], &mut tiers), 0, "no header of 2 on disk");
}

/// The disk fails the data write from G1 (EIO from cuFile or pwrite): that slot's I/O
/// error, the block dropped as a failed host demotion's is, and the path stays on.
#[test]
fn a_disk_error_writing_from_g1_fails_that_block_and_leaves_the_path_on() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(kvplane_cuda::host::HostDevice::with_failing_ops_for_tests(
        &["write_file: EIO"],
    ));
    let m = direct_manager_admitting_at_3(dir.path(), Some(device), None);
    g1_only_chain_beside_a_leased_host_tier(&m);
    let (got, room) = g1_room(&m, 1);
    assert_eq!(got, 1);
    assert!(
        matches!(&room.nvme_error, Some(NvmeError::Io { source, .. }) if source.raw_os_error() == Some(libc::EIO)),
        "{room:?}"
    );
    a_disk_error_left_the_path_on(&m);
}

/// A write-through save that needs room demotes a host block first; that demotion's
/// write fails, the save's own succeeds: the report keeps them apart (the save's
/// completion is judged by its own, `dataplane::save_outcome`).
#[test]
fn a_failed_demotion_is_not_the_write_through_saves_own_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), 2, 16, EngineKind::Sync);
    let (m, plan) = with_faults(&b, &t, Vec::new());
    save(&m, 1, &chain(1, 2), false);
    let mut tiers = [None; 2];
    m.lookup(1, &[1, 2], &mut tiers);
    plan.add(FaultRule {
        kind: Some(IoKind::Write),
        skip: 0,
        count: 1,
        effect: FaultEffect::Errno(libc::EIO),
    });
    let r = save(&m, 1, &[(10, None)], true);
    assert_eq!(plan.fired(), 1, "the demotion's write failed");
    assert!(r.nvme_error.is_some(), "{r:?}");
    assert_eq!(
        (r.stored, r.written_through, r.write_through_failed),
        (1, 1, 0),
        "{r:?}"
    );
    assert_eq!(load(&m, 1, &[10]).loaded, 1);
    m.check_invariants().unwrap();
}

/// A device failure turns the direct path off for a while, not for good: once the wait
/// has passed (and the device works again) the next load reads NVMe straight into G1,
/// and the back-off is over.
#[test]
fn the_direct_path_is_tried_again_after_its_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let (m, device, _) = a_load_failing_on_the_device(dir.path());
    let backoff = m.stores().backoff(crate::tier::G1Direction::NvmeToG1);
    assert!(
        !m.stores().direct_on(crate::tier::G1Direction::NvmeToG1),
        "off for now"
    );
    assert!(
        m.stores()
            .nvme_g1_now()
            .contains("reading NVMe blocks straight into G1 failed on the device 1 time(s)"),
        "{}",
        m.stores().nvme_g1_now()
    );
    device.pause_failures_for_tests(true);
    backoff.expire_for_tests();
    assert!(
        m.stores().direct_on(crate::tier::G1Direction::NvmeToG1),
        "on again after the wait"
    );
    let r = load(&m, 1, &[1, 2]);
    assert_eq!(r.loaded, 2, "{r:?}");
    let mut tiers = [None; 2];
    assert_eq!(m.lookup(1, &[1, 2], &mut tiers), 2);
    assert_eq!(tiers, [Some(Tier::Hbm); 2], "read straight into G1 again");
    assert_eq!(backoff.failures(), 0, "the back-off is over");
    m.check_invariants().unwrap();
}

/// A write-through save that finds no NVMe slot (every block there leased) stores its
/// block on the host tier and says how many it could not write through: its completion
/// is then `NoSpace`, not an `Ok` that promises an NVMe copy (`save_outcome`).
#[test]
fn a_write_through_save_that_finds_no_nvme_slot_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(Some(dir.path()), 8, 2);
    let r = save(&m, 1, &chain(1, 2), true);
    assert_eq!((r.stored, r.written_through), (2, 2), "{r:?}");
    assert_eq!(m.pin(9, 1, &[1, 2]).leased, 2);
    let r = save(&m, 1, &[(10, None)], true);
    assert_eq!(
        (r.stored, r.written_through, r.write_through_no_slot),
        (1, 0, 1),
        "{r:?}"
    );
    m.unpin(9, 1, &[1, 2]);
    m.check_invariants().unwrap();
}

/// Zeroing a slot's old header fails on the disk: its data is never written (a slot
/// must not hold new bytes under a header that may still name another block).
#[test]
fn a_slot_whose_old_header_cannot_be_erased_is_not_written_from_g1() {
    let dir = tempfile::tempdir().unwrap();
    // The first write through the NVMe engine is the header erasure.
    let (m, room) = g1_room_with_a_write_fault(dir.path(), 0, FaultEffect::Errno(libc::EIO));
    assert!(
        matches!(room.nvme_error, Some(NvmeError::Io { .. })),
        "{room:?}"
    );
    assert_eq!(room.nvme_written, 0);
    // Nothing was written to the tier file: no data, no header.
    let file = std::fs::read(dir.path().join("g3.kvp")).unwrap();
    assert!(file.iter().all(|&b| b == 0), "bytes reached the tier file");
    m.unpin(9, 5, &[100, 101]);
    m.check_invariants().unwrap();
}

/// A CLEAR larger than one chunk of the registry lock drops every block of its namespace
/// but the leased ones, across chunks, and nothing of another namespace; the NVMe slots
/// it erases (freed chunk by chunk) are free again and stay cleared across a restart.
#[test]
fn clear_of_a_namespace_larger_than_a_chunk_keeps_only_leased_blocks() {
    let n = crate::block::manager::DROP_CHUNK_BLOCKS as u64 + 100;
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = config(Some(dir.path()), n + 8, n + 8, EngineKind::Sync);
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    for start in (0..n).step_by(512) {
        let len = 512.min(n - start) as usize;
        assert_eq!(save(&m, 1, &chain(start, len), true).stored, len);
    }
    save(&m, 2, &chain(1, 3), true);
    assert_eq!(used_slots(&m, Tier::Nvme), n as u32 + 3, "written through");
    let leased: Vec<u64> = (0..n).step_by(500).collect();
    assert_eq!(m.pin(7, 1, &leased).leased, leased.len());
    let r = m.clear_namespace(1);
    assert_eq!(
        (r.dropped, r.busy),
        (n as usize - leased.len(), leased.len()),
        "{r:?}"
    );
    let mut t3 = [None; 3];
    assert_eq!(
        m.lookup(2, &[1, 2, 3], &mut t3),
        3,
        "another namespace is untouched"
    );
    for &h in &leased {
        assert_eq!(m.lookup(1, &[h], &mut t3[..1]), 1, "leased block {h} kept");
    }
    assert_eq!(m.lookup(1, &[1], &mut t3[..1]), 0);
    assert_eq!(used_slots(&m, Tier::Nvme), (leased.len() + 3) as u32);
    m.check_invariants().unwrap();
    assert_eq!(m.release_session(7), leased.len() as u64);
    let r = m.clear_namespace(1);
    assert_eq!((r.dropped, r.busy), (leased.len(), 0), "{r:?}");
    m.check_invariants().unwrap();
    drop(m);
    let m = local(BlockManager::new(&b, &t, ManagerOptions::default()).unwrap());
    assert_eq!(used_slots(&m, Tier::Nvme), 3, "only namespace 2 comes back");
    assert_eq!(m.lookup(1, &[0, 500], &mut t3[..2]), 0);
    assert_eq!(m.lookup(2, &[1, 2, 3], &mut t3), 3);
}
