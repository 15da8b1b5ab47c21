//! `KVP_SQE_F_KEEP_ON_GPU` through a real session: engine A saves with the flag, the
//! completion says the blocks went to G1, and engine B (another session, its own pool)
//! finds them in G1 and loads them from there into its own pages, byte for byte. On this
//! machine G1 is host memory standing in for HBM; on a GPU it is the daemon's device
//! arena and the copies are device-to-device (`scripts/gpu-e2e.sh`).

use std::time::Duration;

use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::Pod;
use kvplane_ffi::{Opcode, SQE_F_KEEP_ON_GPU, Status, Tier, kvp_block_op, kvp_cqe};
use kvplane_shm::QueuePair;

mod common;
use common::{BLOCK_BYTES, PAGE_BYTES};

const NAMESPACE: &str = "g1";

fn block_op(
    qp: &mut QueuePair,
    op: Opcode,
    flags: u16,
    hashes: &[u64],
    first_page: u32,
) -> (kvp_cqe, Vec<kvp_block_op>) {
    let mut s = common::chain_sqe(qp, op, 9, hashes, first_page);
    s.flags = flags;
    let c = qp.call(s, Duration::from_secs(10)).expect("block op");
    let mut back = vec![kvp_block_op::zeroed(); hashes.len()];
    qp.read_arena(0, kvplane_ffi::slice_as_bytes_mut(&mut back))
        .unwrap();
    (c, back)
}

/// Offset of `page`'s part in (layer, plane) `plane` of an engine's KV buffer.
fn page_at(plane: u64, page: u64) -> u64 {
    plane * common::PAGES * PAGE_BYTES + page * PAGE_BYTES
}

const PLANES: u64 = common::LAYERS as u64 * 2;

/// The byte every part of `page` holds in these tests.
fn page_byte(page: u64, plane: u64) -> u8 {
    (0x30 + page * 8 + plane) as u8
}

fn fill_pages(kv: &kvplane_shm::Segment, pages: std::ops::Range<u64>) {
    for page in pages {
        for plane in 0..PLANES {
            let fill = vec![page_byte(page, plane); PAGE_BYTES as usize];
            kv.write_bytes(page_at(plane, page), &fill).unwrap();
        }
    }
}

/// Checks `kv`'s pages from `first` hold the bytes of `from_pages` of the saving engine.
fn check_pages(kv: &kvplane_shm::Segment, first: u64, from_pages: std::ops::Range<u64>) {
    for (k, page) in from_pages.enumerate() {
        for plane in 0..PLANES {
            let mut got = vec![0u8; PAGE_BYTES as usize];
            kv.read_bytes(page_at(plane, first + k as u64), &mut got)
                .unwrap();
            assert!(
                got.iter().all(|b| *b == page_byte(page, plane)),
                "saved page {page}, layer/plane {plane}: loaded bytes differ"
            );
        }
    }
}

#[test]
fn blocks_kept_on_the_gpu_are_loaded_by_another_engine_from_g1() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.tiers.nvme.paths.clear();
    config.tiers.nvme.capacity_bytes = 0;
    config.tiers.hbm.capacity_bytes = 4 * BLOCK_BYTES;
    let (daemon, _blocks) = common::start(config, None);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, kv_a) = common::attach_with_kv(&socket, NAMESPACE);
    let (_b, mut qb, kv_b) = common::attach_with_kv(&socket, NAMESPACE);

    // A fills pages 0..3 (every layer and plane) and saves them, kept on the GPU.
    let hashes = [0x61_0001u64, 0x61_0002, 0x61_0003];
    fill_pages(&kv_a, 0..hashes.len() as u64);
    let (c, _) = block_op(&mut qa, Opcode::Save, SQE_F_KEEP_ON_GPU, &hashes, 0);
    assert_eq!(c.status, Status::Ok.raw(), "SAVE: {c:?}");
    assert_eq!(c.blocks, 3);
    assert_eq!(
        c.tier,
        Tier::Hbm.raw() as u16,
        "the completion says they went to G1"
    );

    // B finds them in G1 and loads them into its pages 7..10.
    let (c, ops) = block_op(&mut qb, Opcode::Lookup, 0, &hashes, 0);
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 3));
    assert!(
        ops.iter().all(|o| o.tier == Tier::Hbm.raw() as u8),
        "found in G1: {:?}",
        ops.iter().map(|o| o.tier).collect::<Vec<_>>()
    );
    let (c, ops) = block_op(&mut qb, Opcode::Load, 0, &hashes, 7);
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 3), "LOAD: {c:?}");
    assert_eq!(c.tier, Tier::Hbm.raw() as u16, "served from G1");
    assert!(ops.iter().all(|o| o.tier == Tier::Hbm.raw() as u8));
    check_pages(&kv_b, 7, 0..hashes.len() as u64);
    // A save without the flag goes to the host tier only; the flag is refused on a LOAD.
    let (c, _) = block_op(&mut qa, Opcode::Save, 0, &[0x61_0009], 5);
    assert_eq!(
        (c.status, c.tier),
        (Status::Ok.raw(), Tier::Host.raw() as u16)
    );
    let (c, _) = block_op(&mut qb, Opcode::Load, SQE_F_KEEP_ON_GPU, &hashes, 7);
    assert_eq!(
        c.status,
        Status::BadFlags.raw(),
        "KEEP_ON_GPU is a SAVE flag"
    );
    let links = &daemon.shared().dataplane.counters.metrics;
    assert_eq!(
        links.link_bytes(kvplane_daemon::metrics::Link::EngineToG1),
        3 * BLOCK_BYTES
    );
    assert_eq!(
        links.link_bytes(kvplane_daemon::metrics::Link::G1ToEngine),
        3 * BLOCK_BYTES
    );
    drop((qa, qb));
    daemon.shutdown();
}

/// G1 is a tier, not a copy: when a save kept on the GPU needs G1's slots and a G1 block
/// has no other copy (the host tier evicted it), the block is copied down to the host tier
/// (the mover's batched copy on the engine's stream) instead of being lost, and another
/// engine loads it from there byte for byte.
#[test]
fn a_g1_block_with_no_other_copy_goes_down_to_the_host_tier_when_g1_needs_room() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.tiers.nvme.paths.clear();
    config.tiers.nvme.capacity_bytes = 0;
    config.tiers.host.capacity_bytes = 4 * common::SLOT_BYTES;
    config.tiers.hbm.capacity_bytes = 2 * BLOCK_BYTES;
    let (daemon, _blocks) = common::start(config, None);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, kv_a) = common::attach_with_kv(&socket, NAMESPACE);
    let (_b, mut qb, kv_b) = common::attach_with_kv(&socket, NAMESPACE);
    fill_pages(&kv_a, 0..7);

    // Pages 0, 1 saved kept on the GPU: in G1 and the host tier.
    let kept = [0x62_0001u64, 0x62_0002];
    let (c, _) = block_op(&mut qa, Opcode::Save, SQE_F_KEEP_ON_GPU, &kept, 0);
    assert_eq!(
        (c.status, c.tier),
        (Status::Ok.raw(), Tier::Hbm.raw() as u16)
    );
    // Four more blocks (pages 2..5) fill the 4-slot host tier: G1 now holds the only
    // copy of the kept two.
    let more = [0x62_0101u64, 0x62_0102, 0x62_0103, 0x62_0104];
    let (c, _) = block_op(&mut qa, Opcode::Save, 0, &more, 2);
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 4));
    let (c, ops) = block_op(&mut qb, Opcode::Lookup, 0, &kept, 0);
    assert_eq!(c.blocks, 2);
    assert!(
        ops.iter().all(|o| o.tier == Tier::Hbm.raw() as u8),
        "only in G1"
    );

    // Page 6 kept on the GPU needs a G1 slot: the leaf of the kept chain goes down.
    let (c, _) = block_op(&mut qa, Opcode::Save, SQE_F_KEEP_ON_GPU, &[0x62_0201], 6);
    assert_eq!(
        (c.status, c.tier),
        (Status::Ok.raw(), Tier::Hbm.raw() as u16)
    );
    let (c, ops) = block_op(&mut qb, Opcode::Lookup, 0, &kept, 0);
    assert_eq!(c.blocks, 2, "the G1 victim was copied down, not lost");
    assert_eq!(
        [ops[0].tier, ops[1].tier],
        [Tier::Hbm.raw() as u8, Tier::Host.raw() as u8]
    );
    let (c, _) = block_op(&mut qb, Opcode::Load, 0, &kept, 9);
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 2), "LOAD: {c:?}");
    check_pages(&kv_b, 9, 0..2);
    let links = &daemon.shared().dataplane.counters.metrics;
    assert_eq!(
        links.link_bytes(kvplane_daemon::metrics::Link::G1ToHost),
        BLOCK_BYTES
    );
    drop((qa, qb));
    daemon.shutdown();
}

/// `tiers.nvme.direct_to_g1 = "on"` through real sessions: engine A's blocks are
/// demoted to NVMe; engine B's LOAD reads them from the NVMe file straight into G1
/// slots (checksum and MAC computed there by the kernels; on this machine G1 is host
/// memory and the read a pread, on a GPU cuFile), then scatters them into its pages from
/// G1, byte for byte; the host tier's blocks stay where they were, and the link counters
/// say NVMe -> G1 -> engine.
#[test]
fn a_load_reads_nvme_blocks_straight_into_g1() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.tiers.host.capacity_bytes = 3 * common::SLOT_BYTES;
    config.tiers.hbm.capacity_bytes = 4 * BLOCK_BYTES;
    config.blocks.nvme_admit_min_hits = 0;
    config.tiers.nvme.direct_to_g1 = kvplane_daemon::tier::nvme::DirectToG1::On;
    let (daemon, blocks) = common::start(config, None);
    assert!(blocks.stores().nvme_g1.direct);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, kv_a) = common::attach_with_kv(&socket, NAMESPACE);
    let (_b, mut qb, kv_b) = common::attach_with_kv(&socket, NAMESPACE);
    fill_pages(&kv_a, 0..6);
    // Pages 0..3 saved, then pages 3..6 push them out of the 3-slot host tier to NVMe.
    let cold = [0x63_0001u64, 0x63_0002, 0x63_0003];
    let hot = [0x63_0101u64, 0x63_0102, 0x63_0103];
    for (hashes, first) in [(&cold, 0), (&hot, 3)] {
        let (c, _) = block_op(&mut qa, Opcode::Save, 0, hashes, first);
        assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 3), "SAVE: {c:?}");
    }
    let (c, ops) = block_op(&mut qb, Opcode::Lookup, 0, &cold, 0);
    assert_eq!(c.blocks, 3);
    assert!(
        ops.iter().all(|o| o.tier == Tier::Nvme.raw() as u8),
        "on NVMe only"
    );

    let (c, ops) = block_op(&mut qb, Opcode::Load, 0, &cold, 8);
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 3), "LOAD: {c:?}");
    assert!(
        ops.iter().all(|o| o.tier == Tier::Nvme.raw() as u8),
        "found on NVMe"
    );
    check_pages(&kv_b, 8, 0..3);
    let (_, ops) = block_op(&mut qb, Opcode::Lookup, 0, &cold, 0);
    assert!(
        ops.iter().all(|o| o.tier == Tier::Hbm.raw() as u8),
        "staged into G1: {:?}",
        ops.iter().map(|o| o.tier).collect::<Vec<_>>()
    );
    let (_, ops) = block_op(&mut qb, Opcode::Lookup, 0, &hot, 0);
    assert!(
        ops.iter().all(|o| o.tier == Tier::Host.raw() as u8),
        "host tier untouched"
    );
    let links = &daemon.shared().dataplane.counters.metrics;
    use kvplane_daemon::metrics::Link;
    assert_eq!(links.link_bytes(Link::NvmeToG1), 3 * BLOCK_BYTES);
    assert_eq!(links.link_bytes(Link::G1ToEngine), 3 * BLOCK_BYTES);
    assert_eq!(links.link_bytes(Link::NvmeToHost), 0);
    blocks.check_invariants().unwrap();
    drop((qa, qb));
    daemon.shutdown();
}
