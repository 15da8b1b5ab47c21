//! A session holds at most `blocks.max_pinned_blocks_per_session` distinct blocks pinned:
//! a PIN past the cap completes NO_SPACE naming the cap, with the blocks leased before it
//! (which stay leased). Without the cap an engine could pin every block it can name,
//! growing the daemon's lease records and freezing the tiers against eviction.

use std::sync::atomic::Ordering;
use std::time::Duration;

use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::{Opcode, Status};

mod common;

#[test]
fn a_pin_past_the_sessions_cap_is_refused_naming_it_and_keeps_the_leases_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.blocks.max_pinned_blocks_per_session = 2;
    let (daemon, blocks) = common::start(config, None);
    let socket = daemon.socket_path().to_path_buf();
    let (session, mut qp, _kv) = common::attach_with_kv(&socket, "pins");
    let chain = [0x9111_0001u64, 0x9111_0002, 0x9111_0003];
    let call = |qp: &mut kvplane_shm::QueuePair, op, hashes: &[u64]| {
        let s = common::chain_sqe(qp, op, 1, hashes, 0);
        qp.call(s, Duration::from_secs(10)).expect("completion")
    };
    let c = call(&mut qp, Opcode::Save, &chain);
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 3), "SAVE: {c:?}");

    let c = call(&mut qp, Opcode::Pin, &chain);
    assert_eq!(
        (c.status, c.blocks, c.detail),
        (Status::NoSpace.raw(), 2, 2),
        "PIN of three with a cap of two: {c:?}"
    );
    let leases = &daemon.shared().dataplane.counters.leases_held;
    assert_eq!(leases.load(Ordering::SeqCst), 2, "the two before the cap");
    // Blocks it holds pin again; a new one only after an unpin.
    let c = call(&mut qp, Opcode::Pin, &chain[..2]);
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 2), "{c:?}");
    let c = call(&mut qp, Opcode::Unpin, &chain[1..2]);
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 1), "{c:?}");
    let c = call(&mut qp, Opcode::Pin, &chain[1..2]);
    assert_eq!(
        (c.status, c.blocks),
        (Status::Ok.raw(), 1),
        "still held: {c:?}"
    );
    let c = call(&mut qp, Opcode::Unpin, &chain[1..2]);
    assert_eq!(c.blocks, 1);
    let c = call(&mut qp, Opcode::Unpin, &chain[1..2]);
    assert_eq!(c.blocks, 1, "the second block is now unpinned");
    let c = call(&mut qp, Opcode::Pin, &chain[2..]);
    assert_eq!(
        (c.status, c.blocks),
        (Status::Ok.raw(), 1),
        "room again: {c:?}"
    );

    drop(qp);
    session.begin_detach().unwrap();
    let t0 = std::time::Instant::now();
    while !session.daemon_done() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never released");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        leases.load(Ordering::SeqCst),
        0,
        "released with the session"
    );
    blocks.check_invariants().unwrap();
    daemon.shutdown();
}
