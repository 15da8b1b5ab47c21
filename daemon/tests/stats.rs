//! An engine's STATS reports each tier's capacity and use in blocks, indexed by the tier's
//! ABI code (`KVP_TIER_HBM` 1, `KVP_TIER_HOST` 2, `KVP_TIER_NVME` 3), and the lookup
//! counters, as the registry has them after a SAVE and a LOOKUP.

use std::time::Duration;

use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::{Opcode, Status, kvp_stats};

mod common;

#[test]
fn stats_report_tier_use_and_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _blocks) = common::start(common::config(dir.path(), EngineKind::Sync), None);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, kv) = common::attach_with_kv(&socket, "stats");
    let hashes = [0x57A7_0001u64, 0x57A7_0002, 0x57A7_0003];
    for i in 0..hashes.len() {
        kv.write_bytes(i as u64 * common::PAGE_BYTES, &[i as u8 + 1; 64])
            .unwrap();
    }
    let save = common::chain_sqe(&mut qa, Opcode::Save, 1, &hashes, 0);
    let c = qa.call(save, Duration::from_secs(10)).unwrap();
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 3), "{c:?}");
    // Two found; the prefix ends at the third, and both blocks from there count as misses.
    let lookup = common::chain_sqe(
        &mut qa,
        Opcode::Lookup,
        2,
        &[hashes[0], hashes[1], 9, 10],
        0,
    );
    let c = qa.call(lookup, Duration::from_secs(10)).unwrap();
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 2), "{c:?}");

    let mut s = kvplane_shm::client::sqe(Opcode::Stats, 3);
    s.arg_len = std::mem::size_of::<kvp_stats>() as u32;
    let c = qa.call(s, Duration::from_secs(10)).unwrap();
    assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
    let mut raw = [0u8; std::mem::size_of::<kvp_stats>()];
    qa.read_arena(0, &mut raw).unwrap();
    let st = kvplane_ffi::read_pod::<kvp_stats>(&raw).unwrap();
    let slots = common::SLOTS;
    assert_eq!(
        st.tier_capacity_blocks,
        [0, 0, slots, slots],
        "no G1; the host tier and the NVMe file of the test config"
    );
    assert_eq!(
        st.tier_used_blocks,
        [0, 0, 3, 0],
        "the three saved blocks, on the host tier"
    );
    assert_eq!((st.lookup_hits, st.lookup_misses), (2, 2));
    daemon.shutdown();
}
