//! Engines' CUDA IPC events (KVP_OP_REGISTER_EVENTS, SAVE/LOAD `param0`). On the plain
//! host backend registering them is refused as unsupported and naming an unregistered
//! one is a clear BAD_ARG. The data plane's handling of them runs here on a host device
//! that opens any handle as an event of its own (`with_ipc_events_for_tests`) and reports
//! copies done `DELAY` after launch: a LOAD that signals an engine event completes as soon
//! as its copy is queued, while its blocks stay held (a DROP finds them busy) and its
//! session takes nothing new until the copy has landed; a SAVE waiting on an engine event
//! completes as before. Opening real IPC events needs a GPU (`scripts/gpu-e2e.sh`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvplane_cuda::host::{HostDevice, TEST_GPU_UUID};
use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::{Opcode, Pod, Status, kvp_cqe, kvp_ipc_event};
use kvplane_shm::{QueuePair, client};

mod common;
use common::PAGE_BYTES;

const DELAY: Duration = Duration::from_millis(300);
const NAMESPACE: &str = "events";

fn config(dir: &Path) -> kvplane_daemon::config::Config {
    let mut config = common::config(dir, EngineKind::Sync);
    config.tiers.nvme.paths.clear();
    config.tiers.nvme.capacity_bytes = 0;
    config.serve.dataplane_threads = 1;
    config
}

/// An event description; on the test device it completes `ms` after registration
/// (handle bytes 8..16; u64::MAX: never).
fn event(gpu_uuid: [u8; 16], tag: u8, ms: u64) -> kvp_ipc_event {
    let mut e = kvp_ipc_event::zeroed();
    e.gpu_uuid = gpu_uuid;
    e.handle = [tag; 64];
    e.handle[8..16].copy_from_slice(&ms.to_le_bytes());
    e
}

fn register(qp: &mut QueuePair, events: &[kvp_ipc_event]) -> kvp_cqe {
    qp.write_arena(0, kvplane_ffi::slice_as_bytes(events))
        .unwrap();
    let mut s = client::sqe(Opcode::RegisterEvents, 0xE7);
    s.count = events.len() as u32;
    s.arg_len = std::mem::size_of_val(events) as u32;
    qp.call(s, Duration::from_secs(10))
        .expect("register events")
}

/// A SAVE/LOAD/DROP of `hashes` (pages from `first_page`) naming event `param0`.
fn block_sqe(
    qp: &mut QueuePair,
    op: Opcode,
    ud: u64,
    hashes: &[u64],
    first_page: u32,
    param0: u64,
) -> kvplane_ffi::kvp_sqe {
    let mut s = common::chain_sqe(qp, op, ud, hashes, first_page);
    s.param0 = param0;
    s
}

/// A daemon with an NVMe tier (its SAVEs run on the I/O executors), one data-plane
/// thread and one executor, on a host device that opens test events, engine events given
/// up after `timeout_ms`; `change` edits the config, `plan` injects NVMe faults.
fn nvme_daemon_with_events(
    dir: &Path,
    timeout_ms: u64,
    change: impl FnOnce(&mut kvplane_daemon::config::Config),
    plan: Option<Arc<kvplane_daemon::tier::nvme::engine::FaultPlan>>,
) -> (
    kvplane_daemon::session::Daemon,
    Arc<kvplane_daemon::block::BlockManager>,
) {
    let device = Arc::new(
        HostDevice::with_launch(kvplane_kernels::HostLaunch::default()).with_ipc_events_for_tests(),
    );
    let mut cfg = common::config(dir, EngineKind::Sync);
    cfg.serve.dataplane_threads = 1;
    cfg.serve.io_threads = 1;
    cfg.serve.engine_event_timeout_ms = timeout_ms;
    change(&mut cfg);
    common::start_on(cfg, plan, device)
}

fn next(qp: &mut QueuePair) -> (kvp_cqe, Instant) {
    let t0 = Instant::now();
    let mut c = [Pod::zeroed(); 1];
    loop {
        if qp.poll(&mut c).unwrap() == 1 {
            return (c[0], Instant::now());
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no completion");
        std::thread::yield_now();
    }
}

#[test]
fn events_are_refused_on_the_host_backend_and_unknown_ones_are_bad_args() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _) = common::start(config(dir.path()), None);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, _kv) = common::attach_with_kv(&socket, NAMESPACE);
    let c = register(&mut qa, &[event([7; 16], 1, 0)]);
    assert_eq!(
        (c.status, c.detail),
        (Status::Unsupported.raw(), 0),
        "no GPU events on the host backend: {c:?}"
    );
    let c = register(&mut qa, &[]);
    assert_eq!(c.status, Status::Ok.raw(), "count 0 releases (none here)");
    for op in [Opcode::Save, Opcode::Load] {
        let s = block_sqe(&mut qa, op, 1, &[0x1], 0, 1);
        let c = qa.call(s, Duration::from_secs(10)).unwrap();
        assert_eq!(
            (c.status, c.detail),
            (Status::BadArg.raw(), kvplane_ffi::DETAIL_BAD_EVENT),
            "{op:?} naming event 0, never registered"
        );
    }
    // Without the event, the SAVE goes through.
    let s = block_sqe(&mut qa, Opcode::Save, 2, &[0x1], 0, 0);
    assert_eq!(
        qa.call(s, Duration::from_secs(10)).unwrap().status,
        Status::Ok.raw()
    );
    // A session without KV memory has nothing to copy with events.
    let (_b, mut qb) = common::attach_plain(&socket, NAMESPACE);
    let c = register(&mut qb, &[]);
    assert_eq!((c.status, c.detail), (Status::BadArg.raw(), 1));
    drop((qa, qb));
    daemon.shutdown();
}

/// Each open is driver work: an engine that re-registers its events in a loop gets BUSY,
/// with how many milliseconds until the call would be admitted, once past its burst;
/// another engine's registration is not affected.
#[test]
fn registering_events_in_a_loop_is_refused_past_the_rate() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(HostDevice::new().with_ipc_events_for_tests());
    let (daemon, _) = common::start_on(config(dir.path()), None, device);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, _kva) = common::attach_with_kv(&socket, NAMESPACE);
    let (_b, mut qb, _kvb) = common::attach_with_kv(&socket, NAMESPACE);
    let full: Vec<kvp_ipc_event> = (0..kvplane_ffi::MAX_IPC_EVENTS as u8)
        .map(|i| event(TEST_GPU_UUID, i, 0))
        .collect();
    let burst = kvplane_daemon::dataplane::EVENT_OPEN_BURST as usize / full.len();
    let t0 = Instant::now();
    for call in 0..burst {
        let c = register(&mut qa, &full);
        assert_eq!(
            c.status,
            Status::Ok.raw(),
            "call {call} of the burst: {c:?}"
        );
    }
    let c = register(&mut qa, &full);
    let within = t0.elapsed();
    assert_eq!(
        c.status,
        Status::Busy.raw(),
        "past the burst after {within:?}: {c:?}"
    );
    assert!(
        (1..=1000).contains(&c.detail),
        "detail: ms until admitted (a second's worth of opens), got {}",
        c.detail
    );
    // The events registered before stay usable: a SAVE naming one goes through.
    let s = block_sqe(&mut qa, Opcode::Save, 7, &[0x7], 0, 1);
    assert_eq!(
        qa.call(s, Duration::from_secs(10)).unwrap().status,
        Status::Ok.raw()
    );
    // Another session has its own budget.
    assert_eq!(register(&mut qb, &full).status, Status::Ok.raw());
    // Once the wait has passed, the call is admitted.
    std::thread::sleep(Duration::from_millis(u64::from(c.detail) + 20));
    assert_eq!(register(&mut qa, &full).status, Status::Ok.raw());
    drop((qa, qb));
    daemon.shutdown();
}

#[test]
fn a_load_signalling_an_engine_event_completes_when_queued_and_holds_its_blocks_until_it_lands() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(
        HostDevice::with_completion_delay(kvplane_kernels::HostLaunch::default(), DELAY)
            .with_ipc_events_for_tests(),
    );
    let (daemon, blocks) = common::start_on(config(dir.path()), None, device);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, kv) = common::attach_with_kv(&socket, NAMESPACE);
    let (_b, mut qb) = common::attach_plain(&socket, NAMESPACE);

    // Registration is checked field by field; a refused set keeps the one before.
    let mut bad = event(TEST_GPU_UUID, 2, 0);
    bad.reserved[3] = 1;
    let c = register(&mut qa, &[event(TEST_GPU_UUID, 1, 0), bad]);
    assert_eq!((c.status, c.detail), (Status::BadArg.raw(), 1), "reserved");
    let c = register(&mut qa, &[event([9; 16], 1, 0)]);
    assert_eq!(
        (c.status, c.detail),
        (Status::BadArg.raw(), 0),
        "another GPU's"
    );
    let c = register(
        &mut qa,
        &[event(TEST_GPU_UUID, 1, 0), event(TEST_GPU_UUID, 2, 0)],
    );
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 2), "{c:?}");
    let s = block_sqe(&mut qa, Opcode::Save, 3, &[0x1], 0, 3);
    let c = qa.call(s, Duration::from_secs(10)).unwrap();
    assert_eq!(c.detail, kvplane_ffi::DETAIL_BAD_EVENT, "only 2 registered");

    // SAVE pages 0, 1 waiting on event 1: completes once its copy lands.
    let hashes = [0xEE_0001u64, 0xEE_0002];
    for i in 0..2u64 {
        kv.write_bytes(i * PAGE_BYTES, &vec![0x50 + i as u8; PAGE_BYTES as usize])
            .unwrap();
    }
    let t0 = Instant::now();
    let s = block_sqe(&mut qa, Opcode::Save, 4, &hashes, 0, 1);
    assert_eq!(qa.submit(&[s]).unwrap(), 1);
    let (c, at) = next(&mut qa);
    assert_eq!(
        (c.user_data, c.status, c.blocks),
        (4, Status::Ok.raw(), 2),
        "{c:?}"
    );
    assert!(
        at - t0 >= DELAY,
        "the SAVE completed before its copy landed"
    );

    // LOAD into pages 8, 9 signalling event 2, then a NOP on the same queue pair.
    let t1 = Instant::now();
    let load = block_sqe(&mut qa, Opcode::Load, 5, &hashes, 8, 2);
    assert_eq!(qa.submit(&[load, client::sqe(Opcode::Nop, 6)]).unwrap(), 2);
    let (c, load_at) = next(&mut qa);
    assert_eq!(
        (c.user_data, c.status, c.blocks),
        (5, Status::Ok.raw(), 2),
        "{c:?}"
    );
    assert!(
        load_at - t1 < DELAY / 2,
        "the LOAD completed after {:?}: not when its copy was queued",
        load_at - t1
    );
    // While the copy is on the device its blocks are held: another session's DROP finds
    // both busy.
    let drop_sqe = block_sqe(&mut qb, Opcode::Drop, 7, &hashes, 0, 0);
    let d = qb.call(drop_sqe, Duration::from_secs(10)).unwrap();
    if Instant::now() - t1 < DELAY {
        assert_eq!((d.blocks, d.detail), (0, 2), "held while in flight: {d:?}");
    }
    let (nop, nop_at) = next(&mut qa);
    assert_eq!(nop.user_data, 6);
    assert!(
        nop_at - t1 >= DELAY,
        "the session took a new submission before the LOAD's copy landed"
    );
    let mut page = vec![0u8; PAGE_BYTES as usize];
    kv.read_bytes(8 * PAGE_BYTES, &mut page).unwrap();
    assert!(page.iter().all(|b| *b == 0x50), "block 0 in page 8");
    // Landed: the holds are gone.
    let drop_sqe = block_sqe(&mut qb, Opcode::Drop, 8, &hashes, 0, 0);
    let d = qb.call(drop_sqe, Duration::from_secs(10)).unwrap();
    assert_eq!((d.blocks, d.detail), (2, 0), "released once landed: {d:?}");
    assert_eq!(
        daemon
            .shared()
            .dataplane
            .counters
            .metrics
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    blocks.check_invariants().unwrap();
    // Count 0 releases the events: naming one is refused again.
    assert_eq!(register(&mut qa, &[]).status, Status::Ok.raw());
    let s = block_sqe(&mut qa, Opcode::Load, 9, &hashes, 8, 1);
    assert_eq!(
        qa.call(s, Duration::from_secs(10)).unwrap().detail,
        kvplane_ffi::DETAIL_BAD_EVENT
    );
    drop((qa, qb));
    daemon.shutdown();
}

/// A SAVE naming an engine event that has not completed waits for it, polled, with
/// nothing reserved and the thread serving others meanwhile; one that never completes is
/// refused with BUSY at `serve.engine_event_timeout_ms`, nothing stored. (The daemon
/// never queues its stream behind an engine's event: a tenant could hold it forever.)
#[test]
fn a_save_waits_for_its_engine_event_holding_nothing_and_gives_up_at_the_deadline() {
    const ENGINE_MS: u64 = 300;
    const TIMEOUT_MS: u64 = 700;
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(
        HostDevice::with_launch(kvplane_kernels::HostLaunch::default()).with_ipc_events_for_tests(),
    );
    let mut cfg = config(dir.path());
    cfg.serve.engine_event_timeout_ms = TIMEOUT_MS;
    let (daemon, blocks) = common::start_on(cfg, None, device);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, _kv) = common::attach_with_kv(&socket, NAMESPACE);
    let (_b, mut qb) = common::attach_plain(&socket, NAMESPACE);
    let host_used = || {
        blocks
            .stats()
            .tiers
            .into_iter()
            .find(|t| t.tier == kvplane_daemon::block::Tier::Host)
            .unwrap()
            .used_slots
    };

    let t0 = Instant::now();
    let c = register(
        &mut qa,
        &[
            event(TEST_GPU_UUID, 1, ENGINE_MS),
            event(TEST_GPU_UUID, 2, u64::MAX),
        ],
    );
    assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
    let hashes = [0xAA_0001u64, 0xAA_0002];
    let s = block_sqe(&mut qa, Opcode::Save, 1, &hashes, 0, 1);
    assert_eq!(qa.submit(&[s]).unwrap(), 1);
    let mut rtts = Vec::new();
    let mut reserved_while_waiting = None;
    let mut got = [Pod::zeroed(); 1];
    let save_at = loop {
        if qa.poll(&mut got).unwrap() == 1 {
            break Instant::now();
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no completion");
        rtts.push(common::timed_nop(&mut qb));
        if reserved_while_waiting.is_none() && t0.elapsed() > Duration::from_millis(100) {
            reserved_while_waiting = Some(host_used());
        }
    };
    assert_eq!(
        (got[0].status, got[0].blocks),
        (Status::Ok.raw(), 2),
        "{:?}",
        got[0]
    );
    assert!(
        save_at - t0 >= Duration::from_millis(ENGINE_MS),
        "the SAVE read the pages {:?} after registration, before its event completed",
        save_at - t0
    );
    assert_eq!(
        reserved_while_waiting,
        Some(0),
        "nothing is reserved while the SAVE waits for its engine"
    );
    common::assert_nops_kept_flowing(
        &mut rtts,
        "a SAVE waited for its engine's event",
        Duration::from_millis(50),
        None,
    );

    // An event that never completes: refused at the deadline, nothing stored or held.
    let stuck = [0xBB_0001u64];
    let t1 = Instant::now();
    let s = block_sqe(&mut qa, Opcode::Save, 2, &stuck, 2, 2);
    let c = qa.call(s, Duration::from_secs(30)).unwrap();
    assert_eq!(
        (c.status, c.detail),
        (Status::Busy.raw(), kvplane_ffi::DETAIL_BAD_EVENT),
        "{c:?}"
    );
    assert!(t1.elapsed() >= Duration::from_millis(TIMEOUT_MS));
    assert_eq!(host_used(), 2, "only the first SAVE's blocks");
    let s = block_sqe(&mut qb, Opcode::Lookup, 3, &stuck, 0, 0);
    assert_eq!(qb.call(s, Duration::from_secs(10)).unwrap().blocks, 0);
    blocks.check_invariants().unwrap();
    drop((qa, qb));
    daemon.shutdown();
}

/// A session that goes away while its SAVE waits for an engine event that never comes
/// ends at once: the waiting SAVE holds nothing, so nothing waits for its deadline.
#[test]
fn a_session_waiting_for_its_engine_event_ends_without_waiting_for_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(
        HostDevice::with_launch(kvplane_kernels::HostLaunch::default()).with_ipc_events_for_tests(),
    );
    let mut cfg = config(dir.path());
    cfg.serve.engine_event_timeout_ms = 60_000;
    let (daemon, blocks) = common::start_on(cfg, None, device);
    let socket = daemon.socket_path().to_path_buf();
    let (a, mut qa, _kv) = common::attach_with_kv(&socket, NAMESPACE);
    let c = register(&mut qa, &[event(TEST_GPU_UUID, 1, u64::MAX)]);
    assert_eq!(c.status, Status::Ok.raw());
    let s = block_sqe(&mut qa, Opcode::Save, 1, &[0xCC_0001], 0, 1);
    assert_eq!(qa.submit(&[s]).unwrap(), 1);
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    drop((qa, a));
    while !daemon.sessions().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the session waited for its engine's event after it went away"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        daemon
            .shared()
            .dataplane
            .counters
            .metrics
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    blocks.check_invariants().unwrap();
    daemon.shutdown();
}

/// On a daemon whose SAVEs go to the I/O executors (it has an NVMe tier), a SAVE waiting
/// for its engine's event waits on the data-plane thread, holding nothing, and reaches an
/// executor only once the event has completed: an engine whose event never completes
/// ties up no executor, so another engine's SAVEs (served there) go on meanwhile.
#[test]
fn a_save_waiting_for_its_engine_event_ties_up_no_io_executor() {
    const ENGINE_MS: u64 = 200;
    const TIMEOUT_MS: u64 = 3000;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, blocks) = nvme_daemon_with_events(dir.path(), TIMEOUT_MS, |_| {}, None);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, _kv_a) = common::attach_with_kv(&socket, NAMESPACE);
    let (_b, mut qb, _kv_b) = common::attach_with_kv(&socket, NAMESPACE);
    // The test events count from their registration.
    let t0 = Instant::now();
    let c = register(
        &mut qa,
        &[
            event(TEST_GPU_UUID, 1, ENGINE_MS),
            event(TEST_GPU_UUID, 2, u64::MAX),
        ],
    );
    assert_eq!(c.status, Status::Ok.raw(), "{c:?}");

    // Event 1 completes after ENGINE_MS: the SAVE is handed to the executor then.
    let s = block_sqe(&mut qa, Opcode::Save, 1, &[0xCC_0001], 0, 1);
    let c = qa.call(s, Duration::from_secs(10)).unwrap();
    assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 1), "{c:?}");
    assert!(t0.elapsed() >= Duration::from_millis(ENGINE_MS));

    // Event 2 never completes: while A's SAVE waits for it, B's SAVEs (on the one
    // executor) complete at their usual pace.
    let t1 = Instant::now();
    let s = block_sqe(&mut qa, Opcode::Save, 2, &[0xCC_0002], 1, 2);
    assert_eq!(qa.submit(&[s]).unwrap(), 1);
    for k in 0..5u64 {
        let t = Instant::now();
        let s = block_sqe(&mut qb, Opcode::Save, 10 + k, &[0xDD_0000 + k], k as u32, 0);
        let c = qb.call(s, Duration::from_secs(30)).unwrap();
        assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "B's SAVE took {:?} while A's SAVE waited for its engine's event",
            t.elapsed()
        );
    }
    assert!(
        t1.elapsed() < Duration::from_millis(TIMEOUT_MS),
        "A is still waiting"
    );
    let (c, _) = next(&mut qa);
    assert_eq!(
        (c.status, c.detail),
        (Status::Busy.raw(), kvplane_ffi::DETAIL_BAD_EVENT),
        "{c:?}"
    );
    assert!(t1.elapsed() >= Duration::from_millis(TIMEOUT_MS));
    blocks.check_invariants().unwrap();
    drop((qa, qb));
    daemon.shutdown();
}

/// A SAVE whose engine event has completed goes to the I/O executors; when their queue
/// is full it is parked, and the job carries the session's data. The session's other
/// queue pair meanwhile has a SAVE in flight waiting for its own event: it is polled
/// only once the data is home again, and answered at its deadline. Before, the
/// data-plane thread polled it with the data away and its thread died (every session on
/// it stopped being served).
#[test]
fn an_operation_in_flight_beside_a_parked_io_job_waits_for_the_data_to_come_home() {
    const STALL_MS: u32 = 600;
    const ENGINE_MS: u64 = 100;
    const TIMEOUT_MS: u64 = 3000;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, blocks) = nvme_daemon_with_events(
        dir.path(),
        TIMEOUT_MS,
        |c| c.serve.io_queue = 1,
        Some(common::stalled_writes(STALL_MS)),
    );
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qps, _kv_a) = common::attach_with_kv_qps(&socket, NAMESPACE, 2);
    let mut qa1 = qps.pop().unwrap();
    let mut qa0 = qps.pop().unwrap();
    let (_b, mut qb, _kv_b) = common::attach_with_kv(&socket, NAMESPACE);
    let (_c, mut qc, _kv_c) = common::attach_with_kv(&socket, NAMESPACE);

    // B's write-through SAVE stalls the one executor; C's fills its queue of one.
    for (q, ud, h) in [(&mut qb, 20u64, 0xB0_0001u64), (&mut qc, 30, 0xC0_0001)] {
        let mut s = block_sqe(q, Opcode::Save, ud, &[h], 0, 0);
        s.flags = kvplane_ffi::SQE_F_WRITE_THROUGH;
        assert_eq!(q.submit(&[s]).unwrap(), 1);
    }
    std::thread::sleep(Duration::from_millis(50));
    // A: event 1 completes ENGINE_MS after registration, event 2 never.
    let c = register(
        &mut qa0,
        &[
            event(TEST_GPU_UUID, 1, ENGINE_MS),
            event(TEST_GPU_UUID, 2, u64::MAX),
        ],
    );
    assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
    let t0 = Instant::now();
    // Queue pair 1 waits for event 2 (in flight, holding nothing); queue pair 0's SAVE
    // waits for event 1, then goes to the executors, whose queue is full: parked.
    let s = block_sqe(&mut qa1, Opcode::Save, 2, &[0xA1_0001], 1, 2);
    assert_eq!(qa1.submit(&[s]).unwrap(), 1);
    let s = block_sqe(&mut qa0, Opcode::Save, 1, &[0xA0_0001], 0, 1);
    assert_eq!(qa0.submit(&[s]).unwrap(), 1);

    for (q, ud) in [(&mut qb, 20u64), (&mut qc, 30)] {
        let (c, _) = next(q);
        assert_eq!((c.user_data, c.status), (ud, Status::Ok.raw()), "{c:?}");
    }
    let (c, _) = next(&mut qa0);
    assert_eq!(
        (c.user_data, c.status, c.blocks),
        (1, Status::Ok.raw(), 1),
        "{c:?}"
    );
    let (c, at) = next(&mut qa1);
    assert_eq!(
        (c.user_data, c.status, c.detail),
        (2, Status::Busy.raw(), kvplane_ffi::DETAIL_BAD_EVENT),
        "{c:?}"
    );
    assert!(
        at - t0 >= Duration::from_millis(TIMEOUT_MS),
        "answered at its deadline"
    );
    // The data-plane thread still serves everyone.
    let c = qb
        .call(client::sqe(Opcode::Nop, 99), Duration::from_secs(5))
        .expect("a NOP after it all");
    assert_eq!(c.status, Status::Ok.raw());
    blocks.check_invariants().unwrap();
    drop((qa0, qa1, qb, qc));
    daemon.shutdown();
}
