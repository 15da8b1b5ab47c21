//! A stalled NVMe device (every write takes 2 s, injected at the I/O engine through
//! `FaultPlan`) must not delay another session's NOPs, even when both sessions share the
//! one data-plane thread (`serve.dataplane_threads = 1`): the write-through SAVE runs on
//! an I/O executor while the data-plane thread keeps serving. With the SAVE run on the
//! thread that polls the rings (as every session's own thread did before the thread
//! pool), the NOPs of a session sharing that thread would wait the full 2 s.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvplane_daemon::session::Daemon;
use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_daemon::tier::nvme::engine::FaultPlan;
use kvplane_ffi::{Opcode, Pod, SQE_F_WRITE_THROUGH, Status};
use kvplane_shm::{AttachOptions, QueuePair, Segment, Session, client};

mod common;
use common::PAGE_BYTES;

/// How long every NVMe write takes.
const STALL_MS: u32 = 2000;
/// The bound on a NOP round trip of another session while the stalled write is in flight.
const NOP_P99_BOUND: Duration = Duration::from_millis(50);
/// The slowest NOP allowed (scheduling hiccups of a loaded 2-core VM; far below the stall).
const NOP_MAX_BOUND: Duration = Duration::from_millis(250);

/// The daemon on one data-plane thread and two I/O threads, its NVMe writes wrapped by
/// `plan`'s injector.
fn start(dir: &Path, plan: Arc<FaultPlan>) -> Daemon {
    let mut config = common::config(dir, EngineKind::Sync);
    config.serve.dataplane_threads = 1;
    config.serve.io_threads = 2;
    common::start(config, Some(plan)).0
}

/// An engine with a paged KV pool (a sealed memfd) and its layout attached.
fn attach_with_kv(socket: &Path) -> (Session, QueuePair, Segment) {
    common::attach_with_kv(socket, "stall")
}

#[test]
fn a_stalled_nvme_write_does_not_delay_another_sessions_nops_on_the_same_thread() {
    let dir = tempfile::tempdir().unwrap();
    let plan = common::stalled_writes(STALL_MS);
    let daemon = start(dir.path(), plan.clone());
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, kv) = attach_with_kv(&socket);
    let (b, mut qb) = common::attach_plain(&socket, "stall");
    assert_eq!(
        daemon.sessions().len(),
        2,
        "both sessions on the daemon's one data-plane thread"
    );
    nops_flow_during_a_stalled_save(&plan, &mut qa, &kv, &mut qb, "another session's");
    drop((qa, qb, b));
    daemon.shutdown();
}

/// The session whose SAVE is out with an I/O executor (its data with it) still answers
/// NOPs on its other queue pairs: only the queue pair of the operation out waits for it.
/// Before, a session with an operation out took nothing from any of its queue pairs, so a
/// stalled disk (or another tenant's jobs ahead of its own in the I/O queue) stopped its
/// liveness pings too.
#[test]
fn a_stalled_nvme_write_does_not_delay_nops_on_the_sessions_other_queue_pair() {
    let dir = tempfile::tempdir().unwrap();
    let plan = common::stalled_writes(STALL_MS);
    let daemon = start(dir.path(), plan.clone());
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qps, kv) = common::attach_with_kv_qps(&socket, "stall", 2);
    // The SAVE on the second queue pair, the NOPs on the first (the daemon must skip the
    // queue pair of the operation out, not always the first).
    let (mut q0, mut q1) = (qps.remove(0), qps.remove(0));
    nops_flow_during_a_stalled_save(&plan, &mut q1, &kv, &mut q0, "the same session's");
    // The queue pair that went on with NOPs meanwhile serves a LOAD once the data is
    // home: the saved block lands in its page again.
    kv.write_bytes(0, &vec![0; PAGE_BYTES as usize]).unwrap();
    let load = common::chain_sqe(&mut q0, Opcode::Load, 9, &[0x5EED_0001], 0);
    let c = q0
        .call(load, Duration::from_secs(10))
        .expect("LOAD on the first queue pair");
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 1), "LOAD: {c:?}");
    let mut page = vec![0u8; PAGE_BYTES as usize];
    kv.read_bytes(0, &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 1),
        "the loaded page holds the saved block"
    );
    drop((q0, q1));
    daemon.shutdown();
}

/// With the session's data out, a queue pair whose completion ring is full has a NOP it
/// cannot take yet; once the engine drains that ring (which rings no doorbell), the
/// daemon takes and answers it within a few milliseconds. The thread used to sleep until
/// its next liveness check (up to 100 ms), as if the session waited only for the data.
#[test]
fn a_drained_completion_ring_is_served_soon_while_the_data_is_out() {
    let dir = tempfile::tempdir().unwrap();
    let plan = common::stalled_writes(STALL_MS);
    let daemon = start(dir.path(), plan.clone());
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qps, kv) = common::attach_with_kv_qps(&socket, "stall", 2);
    let (mut q0, mut q1) = (qps.remove(0), qps.remove(0));
    let t0 = Instant::now();
    common::submit_stalled_save(&plan, &mut q0, &kv, (7, 0x5EED_0009, 1));
    let cq_entries = AttachOptions::new(&socket).cq_entries as usize;
    let nop = client::sqe(Opcode::Nop, 1);
    let mut cqes = vec![Pod::zeroed(); cq_entries + 1];
    let mut waits = Vec::new();
    for _ in 0..10 {
        // A full completion ring, then one more NOP, which waits in the submission ring.
        for _ in 0..cq_entries {
            assert_eq!(q1.submit(&[nop]).unwrap(), 1);
        }
        std::thread::sleep(Duration::from_millis(30)); // all answered
        assert_eq!(q1.submit(&[nop]).unwrap(), 1);
        std::thread::sleep(Duration::from_millis(20)); // the thread goes back to sleep
        assert_eq!(
            q1.poll(&mut cqes).unwrap(),
            cq_entries,
            "the ring was full, and the last NOP not taken"
        );
        let drained = Instant::now();
        while q1.poll(&mut cqes[..1]).unwrap() == 0 {
            assert!(
                drained.elapsed() < Duration::from_secs(5),
                "the NOP was never taken"
            );
            std::hint::spin_loop();
        }
        waits.push(drained.elapsed());
    }
    assert!(
        plan.fired() == 1 && t0.elapsed() < Duration::from_millis(u64::from(STALL_MS)),
        "the SAVE was out throughout"
    );
    let slowest = waits.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_millis(30),
        "a NOP waited {slowest:?} after its ring was drained: {waits:?}"
    );
    drop((q0, q1));
    daemon.shutdown();
}

/// Submits a write-through SAVE of two blocks on `qa` (each NVMe write stalls for
/// `STALL_MS`) and sends NOP round trips on `qb` (`whose` queue pair) until it completes;
/// asserts that the SAVE was held by the stall and that the NOPs kept flowing.
fn nops_flow_during_a_stalled_save(
    plan: &FaultPlan,
    qa: &mut QueuePair,
    kv: &Segment,
    qb: &mut QueuePair,
    whose: &str,
) {
    let hashes = [0x5EED_0001u64, 0x5EED_0002];
    for i in 0..hashes.len() {
        kv.write_bytes(
            i as u64 * PAGE_BYTES,
            &vec![i as u8 + 1; PAGE_BYTES as usize],
        )
        .unwrap();
    }
    let mut s = common::chain_sqe(qa, Opcode::Save, 7, &hashes, 0);
    s.flags = SQE_F_WRITE_THROUGH;
    let t0 = Instant::now();
    assert_eq!(qa.submit(&[s]).unwrap(), 1);

    let mut rtts: Vec<Duration> = Vec::new();
    let mut cqe = [Pod::zeroed(); 1];
    let save = loop {
        let n = qa.poll(&mut cqe).unwrap();
        if n == 1 {
            break cqe[0];
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the SAVE never completed"
        );
        rtts.push(common::timed_nop(qb));
    };
    let save_took = t0.elapsed();
    assert_eq!(save.status, Status::Ok.raw(), "SAVE: {save:?}");
    assert_eq!(save.blocks, 2);
    assert!(
        plan.fired() >= 2,
        "the stall was injected ({} writes)",
        plan.fired()
    );
    assert!(
        save_took >= Duration::from_millis(u64::from(STALL_MS)),
        "the write-through SAVE took {save_took:?}: the stall did not hold it"
    );
    common::assert_nops_kept_flowing(
        &mut rtts,
        &format!(
            "a write-through SAVE stalled on NVMe for {save_took:?}, NOPs on {whose} queue pair"
        ),
        NOP_P99_BOUND,
        Some(NOP_MAX_BOUND),
    );
}

/// An engine that gave up on an operation the daemon never answered may reuse the pages
/// it names only once the daemon is done with them: after `begin_detach` the daemon ends
/// the session once its copies have landed, and only then closes its end of the
/// connection (`daemon_done`). Here the write-through SAVE is out on an I/O executor for
/// at least `STALL_MS` when the engine begins to detach.
#[test]
fn a_detaching_session_is_done_only_once_its_operation_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let plan = common::stalled_writes(STALL_MS);
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.serve.dataplane_threads = 1;
    let (daemon, blocks) = common::start(config, Some(plan.clone()));
    let socket = daemon.socket_path().to_path_buf();
    let (a, mut qa, kv) = attach_with_kv(&socket);
    let h = 0xDE7A_C401u64;
    kv.write_bytes(0, &vec![9u8; PAGE_BYTES as usize]).unwrap();
    let mut s = common::chain_sqe(&mut qa, Opcode::Save, 1, &[h], 0);
    s.flags = SQE_F_WRITE_THROUGH;
    let t0 = Instant::now();
    assert_eq!(qa.submit(&[s]).unwrap(), 1);
    // The SAVE reaches its I/O executor and its stalled write.
    while plan.fired() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the write never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    a.begin_detach().expect("begin to detach");
    let detach_at = Instant::now();
    assert!(!a.daemon_done(), "done at once, with the SAVE still out");
    while !a.daemon_done() {
        assert!(
            detach_at.elapsed() < Duration::from_secs(30),
            "the daemon never closed its end"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let done_after = t0.elapsed();
    eprintln!(
        "SAVE submitted, detach begun {:?} later, daemon done {done_after:?} after the SAVE",
        detach_at - t0
    );
    assert!(
        done_after >= Duration::from_millis(u64::from(STALL_MS)),
        "the daemon was done after {done_after:?}, before its {STALL_MS} ms write landed"
    );
    assert!(daemon.sessions().is_empty(), "the session ended");
    let mut tiers = [None; 1];
    assert_eq!(
        blocks.lookup(
            kvplane_daemon::dataplane::namespace_id("stall"),
            &[h],
            &mut tiers
        ),
        1,
        "the SAVE out when the engine left completed"
    );
    drop((qa, a));
    daemon.shutdown();
}
