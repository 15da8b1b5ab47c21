use super::engine::{FaultEffect, FaultRule};
use super::*;
use crate::tier::host::{HostConfig, HostPool};

const BLOCK: usize = 8192;

fn pool(slots: u64) -> HostPool {
    let cfg = HostConfig {
        capacity_bytes: slots * slot_bytes(BLOCK) as u64,
        lock: false,
        touch_threads: 1,
        ..HostConfig::default()
    };
    HostPool::new(&cfg, slot_bytes(BLOCK)).unwrap()
}

fn config(dir: &std::path::Path, engine: EngineKind) -> NvmeConfig {
    NvmeConfig {
        paths: vec![dir.join("a.kvp"), dir.join("b.kvp")],
        capacity_bytes: 8 * slot_bytes(BLOCK) as u64,
        engine,
        queue_depth: 8,
        batch_size: 4,
        ..NvmeConfig::default()
    }
}

fn fill(pool: &HostPool, slot: u32, seed: u64) {
    // SAFETY: test is the only user of the pool.
    let d = unsafe { pool.data_mut(slot) };
    for (i, b) in d.iter_mut().enumerate() {
        *b = (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) >> 3) as u8;
    }
}

fn header(ns: u32, hash: u64, generation: u64) -> SlotHeader {
    SlotHeader {
        namespace: ns,
        hash,
        parent: Some(hash ^ 1),
        length: 0,
        generation,
        data_checksum: 0,
    }
}

/// Writes `n` blocks to slots 0..n (spanning both files), returns their generations.
fn write_blocks(store: &NvmeStore, pool: &HostPool, n: u32) -> Vec<u64> {
    let mut gens = vec![];
    let mut items = vec![];
    for s in 0..n {
        fill(pool, s, s as u64 + 100);
        let g = store.next_generation();
        // SAFETY: test owns the pool.
        store.encode_header(
            unsafe { pool.header_mut(s) },
            unsafe { pool.data(s) },
            header(3, 1000 + s as u64, g),
        );
        gens.push(g);
        items.push((s, pool.slot_ptr(s)));
    }
    let mut results = vec![];
    // SAFETY: pool slots valid, unused elsewhere.
    unsafe { store.write_slots(&items, &mut results) };
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    gens
}

fn reopen_and_check(dir: &std::path::Path, engine: EngineKind, n: u32, gens: &[u64]) {
    let pool2 = pool(16);
    let (store, report) =
        NvmeStore::open(&config(dir, engine), BLOCK, pool2.regions(1 << 30), None).unwrap();
    assert_eq!(report.valid.len(), n as usize);
    assert_eq!(report.corrupt, 0);
    let reference = pool(16);
    for v in &report.valid {
        let s = v.slot;
        let mut results = vec![];
        // SAFETY: test owns pool2.
        unsafe { store.read_slots(&[(s, pool2.slot_ptr(s))], &mut results) };
        results[0].as_ref().unwrap();
        // SAFETY: as above.
        let buf = unsafe { pool2.full_mut(s) };
        let h = store
            .verify(s, buf, 3, 1000 + s as u64, gens[s as usize])
            .unwrap();
        assert_eq!(h.parent, Some((1000 + s as u64) ^ 1));
        fill(&reference, s, s as u64 + 100);
        // SAFETY: test owns both pools; nothing writes them here.
        let (got, want) = unsafe { (pool2.data(s), reference.data(s)) };
        assert_eq!(got, want, "slot {s} not bit-identical");
    }
}

#[test]
fn restart_rebuilds_index_sync_and_uring() {
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(16);
        let (store, report) =
            NvmeStore::open(&config(dir.path(), engine), BLOCK, p.regions(1 << 30), None).unwrap();
        assert_eq!(store.slot_count(), 16);
        assert_eq!(report.empty, 16);
        let gens = write_blocks(&store, &p, 12);
        // "kill": drop without any shutdown step.
        drop(store);
        reopen_and_check(dir.path(), engine, 12, &gens);
    }
}

#[test]
fn torn_and_flipped_slots_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(16);
    let cfg = config(dir.path(), EngineKind::Sync);
    let (store, _) = NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    let gens = write_blocks(&store, &p, 4);
    drop(store);
    // Torn header in slot 1: only the first 40 bytes of a new header over zeros.
    let sb = slot_bytes(BLOCK) as u64;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("a.kvp"))
        .unwrap();
    let mut page = vec![0u8; 4096];
    f.read_exact_at(&mut page, sb).unwrap();
    page[40..].fill(0);
    f.write_all_at(&page, sb).unwrap();
    // Flipped data byte in slot 2.
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, 2 * sb + 4096 + 77).unwrap();
    byte[0] ^= 0x40;
    f.write_all_at(&byte, 2 * sb + 4096 + 77).unwrap();
    drop(f);

    let (store, report) = NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    assert_eq!(report.corrupt, 1, "torn header found by the header scan");
    assert_eq!(report.valid.len(), 3);
    // The flipped data byte passes the header scan but fails verification on read.
    let mut results = vec![];
    // SAFETY: test owns p.
    unsafe { store.read_slots(&[(2, p.slot_ptr(2))], &mut results) };
    // SAFETY: as above.
    let err = store
        .verify(2, unsafe { p.full_mut(2) }, 3, 1002, gens[2])
        .unwrap_err();
    assert!(err.to_string().contains("data checksum"), "{err}");
    drop(store);
    // With verify_on_scan the flipped slot is found at start-up too; the torn one is gone.
    let cfg2 = NvmeConfig {
        verify_on_scan: true,
        ..cfg
    };
    let (_store, report) = NvmeStore::open(&cfg2, BLOCK, vec![], None).unwrap();
    assert_eq!(report.corrupt, 1);
    assert_eq!(report.valid.len(), 2);
    assert_eq!(report.empty, 13, "the torn slot was tombstoned");
}

#[test]
fn injected_faults_fail_only_their_op() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(16);
    let plan = Arc::new(FaultPlan::default());
    let cfg = config(dir.path(), EngineKind::IoUring);
    let (store, _) = NvmeStore::open(&cfg, BLOCK, p.regions(1 << 30), Some(plan.clone())).unwrap();
    assert!(store.engine_name().starts_with("fault-injector(io_uring"));
    plan.add(FaultRule {
        kind: Some(IoKind::Write),
        skip: 1,
        count: 1,
        effect: FaultEffect::Errno(libc::ENOSPC),
    });
    plan.add(FaultRule {
        kind: Some(IoKind::Write),
        skip: 0,
        count: 1,
        effect: FaultEffect::TornWrite { bytes: 4096 },
    });
    let mut items = vec![];
    for s in 0..4u32 {
        fill(&p, s, s as u64);
        let g = store.next_generation();
        // SAFETY: test owns the pool.
        store.encode_header(
            unsafe { p.header_mut(s) },
            unsafe { p.data(s) },
            header(1, s as u64, g),
        );
        items.push((s, p.slot_ptr(s)));
    }
    let mut results = vec![];
    // SAFETY: as above.
    unsafe { store.write_slots(&items, &mut results) };
    // Write 0 is torn (rule 2, no skip); rule 1 counts write 0 as its skip and fails write 1.
    assert!(
        matches!(&results[0], Err(e) if e.to_string().contains("Input/output error")),
        "{:?}",
        results[0]
    );
    assert!(
        results[1].as_ref().is_err_and(|e| e.is_no_space()),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok());
    assert!(results[3].is_ok());
    assert_eq!(plan.fired(), 2);
    assert_eq!(
        plan.fired(),
        2,
        "the header erasures after the failures are not faulted"
    );
    drop(store);
    // The torn slot had its header page written (valid-looking to a header-only scan, its
    // block missing); the store erased that header when the write failed, so neither a
    // header scan nor a verifying scan finds anything in it.
    for verify_on_scan in [false, true] {
        let cfg2 = NvmeConfig {
            verify_on_scan,
            engine: EngineKind::Sync,
            ..cfg.clone()
        };
        let (_s, report) = NvmeStore::open(&cfg2, BLOCK, vec![], None).unwrap();
        assert_eq!(report.valid.len(), 2);
        assert_eq!(report.corrupt, 0);
        assert_eq!(report.empty, 14);
    }
}

#[test]
fn config_validation_names_keys() {
    let c = NvmeConfig {
        queue_depth: 3,
        ..NvmeConfig::default()
    };
    assert_eq!(
        c.validate("tiers.nvme", 4096).unwrap_err().to_string(),
        "tiers.nvme.queue_depth: must be a power of two in 1..=4096, got 3"
    );
    let c = NvmeConfig {
        batch_size: 100,
        ..NvmeConfig::default()
    };
    assert!(
        c.validate("tiers.nvme", 4096)
            .unwrap_err()
            .key
            .ends_with("batch_size")
    );
    let c: NvmeConfig =
        toml::from_str("queue_depth = 128\nengine = \"sync\"\npaths = [\"/x\"]").unwrap();
    assert_eq!(c.engine, EngineKind::Sync);
    c.validate("tiers.nvme", 4096).unwrap();
    assert!(toml::from_str::<NvmeConfig>("queue_dept = 1").is_err());
}
