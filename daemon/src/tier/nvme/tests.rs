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
        data_mac: [0; 32],
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

// Finding 2, 3 and 4 of issue 17: tier files are the tenants' secret, slots are
// authenticated, and no path another user controls is followed.

use crate::secure_open::PathError;
use crate::secure_open::tests::{
    OTHER_UID, chmod, chown, other_user_open_errno, other_user_symlink, require_root, sticky_dir,
};
use kvplane_kernels::checksum::{GOLDEN, mix64};
use std::os::unix::fs::{FileExt, MetadataExt};

fn mode_of(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn tier_files_and_the_key_are_created_0600() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), EngineKind::Sync);
    NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    let key = dir.path().join("a.kvp.key");
    assert_eq!(key_path(&cfg).unwrap(), key);
    for p in [&cfg.paths[0], &cfg.paths[1], &key] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600, "{}", p.display());
        assert!(m.is_file());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(m.uid(), unsafe { libc::geteuid() });
    }
    assert_eq!(std::fs::metadata(&key).unwrap().len(), 32);
    // A restart loads the same key: the slots it wrote are still valid (see
    // restart_rebuilds_index_sync_and_uring); a second key file is not made.
    let before = std::fs::read(&key).unwrap();
    NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn user_65534_cannot_read_the_tier_files_or_the_key() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755); // only the files' own modes stand in the way
    let cfg = config(dir.path(), EngineKind::Sync);
    NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    for p in [&cfg.paths[0], &cfg.paths[1], &dir.path().join("a.kvp.key")] {
        assert_eq!(
            other_user_open_errno(p),
            libc::EACCES,
            "uid {OTHER_UID} opened {}",
            p.display()
        );
    }
    // Control: the same user reads a 0644 file in the same directory.
    let ctl = dir.path().join("public");
    std::fs::write(&ctl, b"x").unwrap();
    chmod(&ctl, 0o644);
    assert_eq!(other_user_open_errno(&ctl), 0);
}

#[test]
fn a_link_planted_at_the_tier_or_key_path_is_refused_and_its_target_untouched() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"a root-owned file").unwrap();
    chmod(&victim, 0o600);
    let shared = sticky_dir(dir.path(), "shared");
    let link = shared.join("g3.kvp");
    other_user_symlink(&victim, &link);
    let cfg = NvmeConfig {
        paths: vec![link.clone()],
        key_path: Some(dir.path().join("slot.key")),
        ..config(dir.path(), EngineKind::Sync)
    };
    let e = NvmeStore::open(&cfg, BLOCK, vec![], None).err().unwrap();
    assert!(
        matches!(
            &e,
            NvmeError::Path(PathError::UntrustedSymlink { uid: OTHER_UID, .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("g3.kvp"), "names the path: {e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"a root-owned file");
    assert_eq!(mode_of(&victim), 0o600);

    // The key path: any link there is refused, even before a tier file is written.
    let key_link = shared.join("slot.key");
    other_user_symlink(&victim, &key_link);
    let cfg = NvmeConfig {
        paths: vec![dir.path().join("g3.kvp")],
        key_path: Some(key_link),
        ..cfg
    };
    let e = NvmeStore::open(&cfg, BLOCK, vec![], None).err().unwrap();
    assert!(
        matches!(
            &e,
            NvmeError::Key(KeyError::Path(PathError::Symlink { .. }))
        ),
        "{e}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"a root-owned file");
}

#[test]
fn existing_files_others_can_read_or_that_others_own_are_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = NvmeConfig {
        paths: vec![dir.path().join("g3.kvp")],
        ..config(dir.path(), EngineKind::Sync)
    };
    let tier = &cfg.paths[0];
    // What the daemon used to create: 0644.
    std::fs::write(tier, b"").unwrap();
    chmod(tier, 0o644);
    let e = NvmeStore::open(&cfg, BLOCK, vec![], None).err().unwrap();
    assert!(
        matches!(&e, NvmeError::Path(PathError::Mode { mode: 0o644, .. })),
        "{e}"
    );
    assert!(e.to_string().contains("g3.kvp"), "{e}");
    assert_eq!(
        std::fs::metadata(tier).unwrap().len(),
        0,
        "not preallocated"
    );
    chmod(tier, 0o600);
    chown(tier, OTHER_UID);
    let e = NvmeStore::open(&cfg, BLOCK, vec![], None).err().unwrap();
    assert!(
        matches!(&e, NvmeError::Path(PathError::Owner { uid: OTHER_UID, .. })),
        "{e}"
    );
    chown(tier, 0);
    NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();

    // The key file: group-readable, another user's, or not 32 bytes.
    let key = key_path(&cfg).unwrap();
    chmod(&key, 0o640);
    let e = NvmeStore::open(&cfg, BLOCK, vec![], None).err().unwrap();
    assert!(
        matches!(
            &e,
            NvmeError::Key(KeyError::Path(PathError::Mode { mode: 0o640, .. }))
        ),
        "{e}"
    );
    chmod(&key, 0o600);
    chown(&key, OTHER_UID);
    let e = NvmeStore::open(&cfg, BLOCK, vec![], None).err().unwrap();
    assert!(
        matches!(&e, NvmeError::Key(KeyError::Path(PathError::Owner { .. }))),
        "{e}"
    );
    chown(&key, 0);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&key)
        .unwrap()
        .write_all_at(b"!", 32)
        .unwrap();
    let e = NvmeStore::open(&cfg, BLOCK, vec![], None).err().unwrap();
    assert!(
        matches!(&e, NvmeError::Key(KeyError::Size { size: 33, .. })),
        "{e}"
    );
}

/// splitmix64's finaliser undone (each step is a bijection): what lets anyone who can
/// write a slot give any block the checksum of another.
fn unmix64(mut x: u64) -> u64 {
    fn inverse(a: u64) -> u64 {
        // Newton's iteration for the inverse of an odd number modulo 2^64.
        let mut inv = a;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(inv)));
        }
        inv
    }
    fn unshift(y: u64, s: u32) -> u64 {
        let mut x = y;
        for _ in 0..64 / s + 1 {
            x = y ^ (x >> s);
        }
        x
    }
    x = unshift(x, 31);
    x = x.wrapping_mul(inverse(0x94D0_49BB_1331_11EB));
    x = unshift(x, 27);
    x = x.wrapping_mul(inverse(0xBF58_476D_1CE4_E5B9));
    unshift(x, 30)
}

/// Rewrites the last 8-byte word of `forged` so that its kvp checksum equals `original`'s
/// (both a multiple of 8 bytes long, same length).
pub(crate) fn keep_checksum(original: &[u8], forged: &mut [u8]) {
    assert_eq!(original.len(), forged.len());
    assert_eq!(forged.len() % 8, 0);
    let words = forged.len() / 8;
    let term = |w: u64, i: usize| mix64(w ^ (i as u64).wrapping_mul(GOLDEN));
    let sum_of = |d: &[u8], n: usize| {
        (0..n).fold(0u64, |s, i| {
            let w = u64::from_le_bytes(d[i * 8..i * 8 + 8].try_into().unwrap());
            s.wrapping_add(term(w, i))
        })
    };
    let want = sum_of(original, words);
    let have = sum_of(forged, words - 1);
    let last = unmix64(want.wrapping_sub(have)) ^ ((words - 1) as u64).wrapping_mul(GOLDEN);
    forged[(words - 1) * 8..].copy_from_slice(&last.to_le_bytes());
    assert_eq!(
        kvplane_kernels::checksum64(forged),
        kvplane_kernels::checksum64(original),
        "forged block keeps the checksum"
    );
}

#[test]
fn unmix64_inverts_mix64() {
    for x in [0u64, 1, 42, u64::MAX, GOLDEN, 0x0123_4567_89ab_cdef] {
        assert_eq!(unmix64(mix64(x)), x);
        assert_eq!(mix64(unmix64(x)), x);
    }
}

#[test]
fn rewritten_slots_are_refused_as_corrupt_at_load_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(16);
    let cfg = config(dir.path(), EngineKind::Sync);
    let (store, _) = NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    let gens = write_blocks(&store, &p, 4); // namespace 3, hashes 1000..=1003, slots 0..=3
    let sb = slot_bytes(BLOCK) as u64;
    // The attacker can read and write the file (as the daemon's group could before), knows
    // the format and the checksum, but not the key.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cfg.paths[0])
        .unwrap();
    let attacker: Vec<u8> = (0..BLOCK).map(|i| (i as u8) ^ 0xa5).collect();
    let read = |off: u64, len: usize| {
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, off).unwrap();
        v
    };
    // (a) Slot 0: the attacker's block, data checksum and header checksum recomputed, the
    // MACs left as they were.
    let mut page = read(0, 4096);
    f.write_all_at(&attacker, 4096).unwrap();
    page[56..64].copy_from_slice(&kvplane_kernels::checksum64(&attacker).to_le_bytes());
    let sum = kvplane_kernels::checksum64(&page[..96]);
    page[96..104].copy_from_slice(&sum.to_le_bytes());
    f.write_all_at(&page, 0).unwrap();
    // (b) Slot 1: the attacker's block made to keep the old data checksum; header untouched.
    let mut forged_b = attacker.clone();
    keep_checksum(&read(sb + 4096, BLOCK), &mut forged_b);
    f.write_all_at(&forged_b, sb + 4096).unwrap();
    // (c) Slot 5 (empty): a complete slot for namespace 3 with a newer generation, sealed
    // with a key of the attacker's choosing.
    let guess = SlotKey::from_material(&[0; 32]);
    let mut page = vec![0u8; 4096];
    SlotHeader {
        namespace: 3,
        hash: 1002,
        parent: Some(1002 ^ 1),
        length: BLOCK as u64,
        generation: 1 << 40,
        data_checksum: kvplane_kernels::checksum64(&attacker),
        data_mac: guess.data_mac(&attacker),
    }
    .encode(&mut page, &guess);
    f.write_all_at(&page, 5 * sb).unwrap();
    f.write_all_at(&attacker, 5 * sb + 4096).unwrap();
    drop(f);

    // At load, in the running store: refused as Corrupt, whatever the registry expects.
    let load = |store: &NvmeStore, slot: u32, hash: u64, generation: u64| {
        let mut results = vec![];
        // SAFETY: the test owns the pool.
        unsafe { store.read_slots(&[(slot, p.slot_ptr(slot))], &mut results) };
        results[0].as_ref().unwrap();
        // SAFETY: as above; the read completed.
        store.verify(slot, unsafe { p.full_mut(slot) }, 3, hash, generation)
    };
    let reason = |r: Result<SlotHeader, NvmeError>| match r {
        Err(NvmeError::Corrupt { reason, .. }) => reason,
        other => panic!("expected Corrupt, got {other:?}"),
    };
    assert!(reason(load(&store, 0, 1000, gens[0])).contains("header MAC"));
    assert!(reason(load(&store, 1, 1001, gens[1])).contains("data MAC"));
    assert!(reason(load(&store, 5, 1002, 1 << 40)).contains("header MAC"));
    load(&store, 2, 1002, gens[2]).unwrap();
    drop(store);

    // After a restart: the header scan refuses (a) and (c); (b)'s header is genuine, so it
    // is indexed, and its load is refused.
    let (store, report) = NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    let slots: Vec<u32> = report.valid.iter().map(|v| v.slot).collect();
    assert_eq!(slots, vec![1, 2, 3], "{report:?}");
    assert_eq!(report.corrupt, 2);
    let g2 = report.valid.iter().find(|v| v.slot == 2).unwrap();
    assert_eq!(g2.header.generation, gens[2], "the forged newer copy lost");
    assert!(reason(load(&store, 1, 1001, gens[1])).contains("data MAC"));
    drop(store);
    // With verify_on_scan the rewritten block is refused at start-up too.
    let cfg = NvmeConfig {
        verify_on_scan: true,
        ..cfg
    };
    let (_store, report) = NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    let slots: Vec<u32> = report.valid.iter().map(|v| v.slot).collect();
    assert_eq!(slots, vec![2, 3]);
    assert_eq!(report.corrupt, 1);
}

#[test]
fn old_format_slots_are_not_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(16);
    let cfg = config(dir.path(), EngineKind::Sync);
    let (store, _) = NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    write_blocks(&store, &p, 2);
    drop(store);
    // Slot 1 as the version 1 format wrote it (checksum at 64, no MAC).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.paths[0])
        .unwrap();
    let mut page = vec![0u8; 4096];
    page[0..8].copy_from_slice(&header::MAGIC.to_le_bytes());
    page[8..12].copy_from_slice(&1u32.to_le_bytes());
    page[16..20].copy_from_slice(&3u32.to_le_bytes());
    page[24..32].copy_from_slice(&1001u64.to_le_bytes());
    page[40..48].copy_from_slice(&(BLOCK as u64).to_le_bytes());
    let sum = kvplane_kernels::checksum64(&page[..64]);
    page[64..72].copy_from_slice(&sum.to_le_bytes());
    f.write_all_at(&page, slot_bytes(BLOCK) as u64).unwrap();
    drop(f);
    let (_store, report) = NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    assert_eq!(report.valid.len(), 1);
    assert_eq!((report.old_format, report.corrupt), (1, 0));
    drop(_store);
    let (_store, report) = NvmeStore::open(&cfg, BLOCK, vec![], None).unwrap();
    assert_eq!(report.old_format, 0, "erased at the first scan");
    assert_eq!(report.empty, 15);
}

/// The two steps of a write whose data goes apart from its header (from G1): headers
/// cleared first leave the slots empty for a restart's scan (a previous block's header is
/// not left over new data), and headers written with sums computed elsewhere verify as a
/// whole slot written from the host tier does.
#[test]
fn cleared_headers_are_not_indexed_and_headers_written_apart_verify() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(16);
    let open = || {
        NvmeStore::open(
            &config(dir.path(), EngineKind::Sync),
            BLOCK,
            p.regions(1 << 30),
            None,
        )
    };
    let (store, _) = open().unwrap();
    write_blocks(&store, &p, 4);
    let cleared = store.clear_headers(&[1, 2]);
    assert!(cleared.iter().all(|r| r.is_ok()), "{cleared:?}");
    drop(store);
    let (store, report) = open().unwrap();
    let mut valid: Vec<u32> = report.valid.iter().map(|v| v.slot).collect();
    valid.sort_unstable();
    assert_eq!(valid, [0, 3], "the cleared slots are empty");

    // Slot 1's data as it is on disk, its header written apart with its sums.
    fill(&p, 1, 101);
    // SAFETY: the test owns the pool.
    let data = unsafe { p.data(1) }[..BLOCK].to_vec();
    let g = store.next_generation();
    let h = SlotHeader {
        length: BLOCK as u64,
        data_checksum: kvplane_kernels::checksum64(&data),
        data_mac: store.key.data_mac(&data),
        ..header(3, 1001, g)
    };
    let written = store.write_headers(&[(1, h)]);
    assert!(written.iter().all(|r| r.is_ok()), "{written:?}");
    let mut results = vec![];
    let p2 = pool(16);
    // SAFETY: p2's slot 0 is used by nothing else.
    unsafe { store.read_slots(&[(1, p2.slot_ptr(0))], &mut results) };
    assert!(results[0].is_ok());
    // SAFETY: read above.
    let slot = unsafe { std::slice::from_raw_parts(p2.slot_ptr(0), store.slot_bytes()) };
    store.verify(1, slot, 3, 1001, g).unwrap();
    drop(store);
    let (_, report) = open().unwrap();
    assert!(
        report.valid.iter().any(|v| v.slot == 1),
        "indexed after a restart"
    );
}

/// The same file and key opened after `block_bytes` changed: every new slot boundary
/// falls on an old slot's header here (20 KiB blocks take two old 8 KiB slots), whose
/// MAC is good but whose length is the old block's. Indexed, a load would check the old
/// 8 KiB and serve 20 KiB: the next old slot's header and data, any namespace's. They are
/// dropped as written under another block size.
#[test]
fn slots_written_under_another_block_size_are_not_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(16);
    let (store, _) = NvmeStore::open(
        &config(dir.path(), EngineKind::Sync),
        BLOCK,
        p.regions(1 << 30),
        None,
    )
    .unwrap();
    write_blocks(&store, &p, 16);
    drop(store);

    const BIGGER: usize = 2 * BLOCK + 4096;
    assert_eq!(slot_bytes(BIGGER), 2 * slot_bytes(BLOCK));
    let cfg = HostConfig {
        capacity_bytes: 4 * slot_bytes(BIGGER) as u64,
        lock: false,
        touch_threads: 1,
        ..HostConfig::default()
    };
    let p2 = HostPool::new(&cfg, slot_bytes(BIGGER)).unwrap();
    let (store, report) = NvmeStore::open(
        &config(dir.path(), EngineKind::Sync),
        BIGGER,
        p2.regions(1 << 30),
        None,
    )
    .unwrap();
    assert_eq!(store.slot_count(), 8);
    assert!(report.valid.is_empty(), "indexed: {:?}", report.valid.len());
    assert_eq!(report.corrupt, 8, "each new slot starts with an old header");
}

/// Two tier paths that name one file (another spelling, or a link root made) would put
/// two slots at each offset: each write would overwrite the other's block, and the scan
/// would erase one of the pair. Refused at open, naming both.
#[test]
fn two_paths_naming_one_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(16);
    let mut cfg = config(dir.path(), EngineKind::Sync);
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    cfg.paths = vec![dir.path().join("a.kvp"), dir.path().join("sub/../a.kvp")];
    let e = NvmeStore::open(&cfg, BLOCK, p.regions(1 << 30), None)
        .err()
        .expect("one file named twice");
    assert!(matches!(e, NvmeError::SameFile { .. }), "{e}");
    assert!(e.to_string().contains("sub/../a.kvp"), "{e}");
    // Two files are fine.
    cfg.paths = vec![dir.path().join("a.kvp"), dir.path().join("b.kvp")];
    NvmeStore::open(&cfg, BLOCK, p.regions(1 << 30), None).unwrap();
}

/// A checksum helper thread whose `prepare` panics fails the write call: the caller used
/// to spin for good waiting for the item that helper held.
#[test]
fn a_panicking_checksum_helper_fails_the_write_instead_of_hanging_it() {
    let (tx, rx) = std::sync::mpsc::channel();
    // The write runs on a thread of its own: before the fix it never returned.
    std::thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap();
        let cfg = NvmeConfig {
            checksum_threads: 2,
            ..config(dir.path(), EngineKind::Sync)
        };
        let pool = pool(16);
        let (store, _) = NvmeStore::open(&cfg, BLOCK, pool.regions(1 << 30), None).unwrap();
        let items: Vec<(u32, *mut u8)> = (0..16u32).map(|s| (s, pool.slot_ptr(s))).collect();
        let caller = std::thread::current().id();
        // The caller is slow to prepare, so the helper claims items; the helper panics on
        // the first it takes.
        let prepare = |_: usize| {
            if std::thread::current().id() == caller {
                std::thread::sleep(std::time::Duration::from_millis(20));
            } else {
                panic!("injected: helper prepare");
            }
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut results = vec![];
            // SAFETY: the pool's slots are valid and used by nothing else.
            unsafe { store.write_slots_with(&items, &prepare, &mut results) };
        }));
        let _ = tx.send(outcome.is_err());
    });
    let failed = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the write call returned instead of spinning");
    assert!(failed, "a helper's panic must fail the call");
}
