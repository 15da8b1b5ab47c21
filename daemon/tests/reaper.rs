//! A session's release (its leases and plans, its admission slot, its engine memory
//! unregistered and unmapped, then its connection) runs on the reaper thread, not on the
//! data-plane thread that served it. Here freeing an engine's registered KV buffer takes
//! 2 s (the host device stands in for a GPU's `cuMemHostUnregister` of a large pinned
//! window, or the unmapping of a large engine buffer whose pages the daemon touched), and
//! another session's NOPs on the same thread go on meanwhile. Released on the data-plane
//! thread, they waited the full 2 s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvplane_cuda::host::HostDevice;
use kvplane_daemon::tier::nvme::EngineKind;

mod common;

/// How long freeing the engine's registered KV buffer takes.
const UNREGISTER_MS: u64 = 2000;
/// The bound on another session's NOP round trip meanwhile.
const NOP_P99_BOUND: Duration = Duration::from_millis(50);
/// The slowest NOP allowed (scheduling hiccups of a loaded 2-core VM; far below the delay).
const NOP_MAX_BOUND: Duration = Duration::from_millis(250);

#[test]
fn a_slow_release_of_an_ended_session_does_not_delay_another_sessions_nops() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(
        HostDevice::new().with_slow_unregister_for_tests(Duration::from_millis(UNREGISTER_MS)),
    );
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.serve.dataplane_threads = 1;
    let (daemon, blocks) = common::start_on(config, None, device);
    let socket = daemon.socket_path().to_path_buf();
    let (a, qa, _kv) = common::attach_with_kv(&socket, "reap");
    let (b, mut qb) = common::attach_plain(&socket, "reap");
    assert_eq!(
        daemon.sessions().len(),
        2,
        "both sessions on the daemon's one data-plane thread"
    );

    // A detaches; the daemon closes A's connection only once A's memory is released.
    drop(qa);
    a.begin_detach().unwrap();
    let t0 = Instant::now();
    let mut rtts = Vec::new();
    while !a.daemon_done() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the daemon never closed the detached session's connection"
        );
        rtts.push(common::timed_nop(&mut qb));
    }
    let released = t0.elapsed();
    assert!(
        released >= Duration::from_millis(UNREGISTER_MS),
        "A was done after {released:?}: its memory's release did not take the injected time"
    );
    common::assert_nops_kept_flowing(
        &mut rtts,
        &format!("a detached session's engine memory took {released:?} to release"),
        NOP_P99_BOUND,
        Some(NOP_MAX_BOUND),
    );
    assert_eq!(daemon.sessions().len(), 1, "only B is left");
    assert_eq!(
        daemon.shared().dataplane.mapped.total_bytes(),
        0,
        "A's mapping is released (B registered none)"
    );
    blocks.check_invariants().unwrap();
    drop((qb, b, a));
    daemon.shutdown();
}
