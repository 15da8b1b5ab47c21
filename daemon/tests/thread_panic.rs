//! A panic in a data-plane thread outside the guard around each operation (a bug in the
//! threads' own loop, injected here with `DataPlane::inject_thread_panic_for_tests`) ends
//! the sessions of that thread only: each sees its session dead and its connection
//! closed, sessions on the other threads go on, and the thread serves new sessions.
//! A session whose operation was out with an I/O executor at the panic is released when
//! the operation comes back, then its connection closed. Before, the panic ended the
//! thread: its sessions were dropped where they stood, and the sessions assigned to it
//! afterwards attached and were never served.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::{Opcode, Status};
use kvplane_shm::{QueuePair, Session, ShmError, client};

mod common;
use common::PAGE_BYTES;

/// Whether a NOP on `qp` is answered (false: the session is dead).
fn answers(qp: &mut QueuePair) -> bool {
    match qp.call(client::sqe(Opcode::Nop, 1), Duration::from_secs(5)) {
        Ok(c) => {
            assert_eq!(c.status, Status::Ok.raw(), "NOP: {c:?}");
            true
        }
        Err(ShmError::SessionDead { .. }) => false,
        Err(e) => panic!("NOP neither answered nor refused as dead: {e}"),
    }
}

/// Waits until the daemon closes `session`'s connection (within `within`).
fn wait_done(session: &Session, within: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    while !session.daemon_done() {
        assert!(t0.elapsed() < within, "{what}: connection still open");
        std::thread::sleep(Duration::from_millis(5));
    }
    t0.elapsed()
}

#[test]
fn a_panicking_data_plane_thread_ends_its_own_sessions_and_serves_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.serve.dataplane_threads = 2;
    let (daemon, blocks) = common::start(config, None);
    let socket = daemon.socket_path().to_path_buf();
    // The least-loaded thread takes each: one session per thread.
    let (a, mut qa) = common::attach_plain(&socket, "panic");
    let (b, mut qb) = common::attach_plain(&socket, "panic");
    assert!(answers(&mut qa) && answers(&mut qb));

    let dp = &daemon.shared().dataplane;
    dp.inject_thread_panic_for_tests();
    let t0 = Instant::now();
    while dp.counters.dataplane_thread_panics.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no thread panicked");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Exactly one thread took the panic: its session is dead and closed, the other's
    // goes on.
    let (dead, mut live_qp, live) = match (answers(&mut qa), answers(&mut qb)) {
        (false, true) => (a, qb, b),
        (true, false) => (b, qa, a),
        other => panic!("one session dead, the other served; got {other:?}"),
    };
    wait_done(
        &dead,
        Duration::from_secs(5),
        "the panicked thread's session",
    );
    assert!(!live.daemon_done(), "the other thread's session was ended");
    assert!(answers(&mut live_qp));
    // The panicked thread gave its session's place back.
    let loads = daemon.dataplane_loads();
    assert_eq!(loads.iter().sum::<usize>(), 1, "one place held: {loads:?}");

    // The panicked thread serves again: a new session goes to it (the least loaded)
    // and is answered.
    let (c, mut qc) = common::attach_plain(&socket, "panic");
    for _ in 0..100 {
        assert!(answers(&mut qc), "a session attached after the panic");
    }
    assert_eq!(
        daemon.dataplane_loads(),
        vec![1, 1],
        "one session on each thread"
    );
    assert_eq!(
        daemon.sessions().len(),
        2,
        "the live session and the new one"
    );
    assert_eq!(dp.counters.sessions_panicked.load(Ordering::SeqCst), 1);
    assert_eq!(
        dp.counters.dataplane_thread_panics.load(Ordering::SeqCst),
        1
    );
    blocks.check_invariants().unwrap();
    drop((qc, c, live_qp, live, dead));
    daemon.shutdown();
}

/// The session whose SAVE is with an I/O executor (its data, with the SAVE's plan, too)
/// when its thread panics: its memory and plans are released, and its connection
/// closed, once the SAVE comes back, not before (the write may still read the engine's
/// memory), and nothing it held stays held.
#[test]
fn a_session_with_an_operation_out_at_a_thread_panic_is_released_when_it_comes_back() {
    const STALL_MS: u32 = 1500;
    let dir = tempfile::tempdir().unwrap();
    let plan = common::stalled_writes(STALL_MS);
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.serve.dataplane_threads = 1;
    config.serve.io_threads = 2;
    let (daemon, blocks) = common::start(config, Some(plan.clone()));
    let socket = daemon.socket_path().to_path_buf();
    let (a, mut qa, kv) = common::attach_with_kv(&socket, "panic");
    let (b, mut qb) = common::attach_plain(&socket, "panic");
    let dp = &daemon.shared().dataplane;
    assert!(dp.mapped.total_bytes() > 0, "A's KV buffer is mapped");

    let submitted_at = Instant::now();
    common::submit_stalled_save(&plan, &mut qa, &kv, (7, 0x5EED_0001, 1));
    let stalled_at = Instant::now();
    dp.inject_thread_panic_for_tests();
    wait_done(&b, Duration::from_secs(5), "B, idle at the panic");
    assert!(!answers(&mut qb), "B's session is dead");
    assert!(
        stalled_at.elapsed() < Duration::from_millis(u64::from(STALL_MS)),
        "B ended only after the write: the test did not catch A's SAVE out"
    );
    assert!(
        !a.daemon_done(),
        "A closed while its SAVE may read its memory"
    );
    wait_done(&a, Duration::from_secs(10), "A, its SAVE back");
    assert!(
        submitted_at.elapsed() >= Duration::from_millis(u64::from(STALL_MS)),
        "A closed {:?} after submitting a SAVE whose write takes {STALL_MS} ms",
        submitted_at.elapsed()
    );
    // Everything A held is released: its session, its memory, its plans.
    assert!(daemon.sessions().is_empty(), "{:?}", daemon.sessions());
    assert_eq!(dp.mapped.total_bytes(), 0, "A's KV buffer is unmapped");
    assert_eq!(dp.counters.sessions_active.load(Ordering::SeqCst), 0);
    assert_eq!(dp.counters.leases_held.load(Ordering::SeqCst), 0);
    assert_eq!(daemon.dataplane_loads(), vec![0], "both places given back");
    assert_eq!(dp.counters.sessions_panicked.load(Ordering::SeqCst), 2);
    blocks.check_invariants().unwrap();
    // The thread serves again, and the SAVE's block, committed by its executor, loads.
    let (_c, mut qc, kv_c) = common::attach_with_kv(&socket, "panic");
    let load = common::chain_sqe(&mut qc, Opcode::Load, 9, &[0x5EED_0001], 0);
    let c = qc.call(load, Duration::from_secs(10)).expect("LOAD");
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 1), "LOAD: {c:?}");
    let mut page = vec![0u8; PAGE_BYTES as usize];
    kv_c.read_bytes(0, &mut page).unwrap();
    assert!(page.iter().all(|&x| x == 1), "the saved block loads");
    drop((qa, a, qb, b, qc));
    daemon.shutdown();
}
