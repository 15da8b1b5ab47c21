//! Device completions, polled: a SAVE or LOAD served on a data-plane thread launches its
//! copy and is then in flight until the device's event says it landed. The device here
//! is the host backend with a completion delay (`[device] host_completion_delay_us`),
//! which reports each copy done only `DELAY` after launch, as a GPU's queued copies
//! complete later. These tests fail if the thread waits on the device (another session's
//! NOPs on the same thread would stall for `DELAY`), if a completion is posted or a block
//! published before its copy has landed, if a session's later submissions overtake its
//! copy in flight, or if a session that ends with a copy in flight leaks what it held.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvplane_daemon::block::BlockManager;
use kvplane_daemon::session::Daemon;
use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::{Opcode, Pod, Status, kvp_cqe};
use kvplane_shm::{AttachOptions, QueuePair, Session, client};

mod common;
use common::PAGE_BYTES;

/// How long after launch each copy reports done.
const DELAY: Duration = Duration::from_millis(300);
/// The bound on another session's NOP round trip while a copy is in flight.
const NOP_P99_BOUND: Duration = Duration::from_millis(50);
const NAMESPACE: &str = "inflight";

/// The daemon on one data-plane thread, no NVMe tier (so SAVE and LOAD are served on the
/// data-plane thread, not the I/O executors), its device the host backend with `DELAY`.
fn start(dir: &Path) -> (Daemon, Arc<BlockManager>) {
    start_with(dir, |_| {})
}

/// [`start`] with the test's changes to the config.
fn start_with(
    dir: &Path,
    change: impl FnOnce(&mut kvplane_daemon::config::Config),
) -> (Daemon, Arc<BlockManager>) {
    let mut config = common::config(dir, EngineKind::Sync);
    change(&mut config);
    config.tiers.nvme.paths.clear();
    config.tiers.nvme.capacity_bytes = 0;
    config.serve.dataplane_threads = 1;
    config.device.host_completion_delay_us = DELAY.as_micros() as u64;
    let (daemon, blocks) = common::start(config, None);
    let described = blocks.device().describe();
    assert!(
        described.contains("after launch"),
        "the delay reached the device: {described}"
    );
    (daemon, blocks)
}

/// A plain session in the test's namespace (NOPs and LOOKUPs).
fn attach_plain(socket: &Path) -> (Session, QueuePair) {
    let mut o = AttachOptions::new(socket);
    o.namespaces = vec![NAMESPACE.into()];
    let mut s = Session::attach(o).expect("attach");
    let qp = s.take_queue_pairs().unwrap().remove(0);
    (s, qp)
}

/// How many of `hashes` a LOOKUP through `qp` finds (its arena at 0 is overwritten).
fn lookup_hits(qp: &mut QueuePair, hashes: &[u64]) -> u32 {
    let s = common::chain_sqe(qp, Opcode::Lookup, 0x100C, hashes, 0);
    let c = qp.call(s, Duration::from_secs(10)).expect("lookup");
    assert_eq!(c.status, Status::Ok.raw(), "lookup: {c:?}");
    c.blocks
}

/// Waits for `want` completions on `qp`, while `during` runs between polls; returns them
/// with when each arrived.
fn collect(qp: &mut QueuePair, want: usize, mut during: impl FnMut()) -> Vec<(kvp_cqe, Instant)> {
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut cqe = [Pod::zeroed(); 4];
    while got.len() < want {
        let n = qp.poll(&mut cqe).unwrap();
        got.extend(cqe[..n].iter().map(|c| (*c, Instant::now())));
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "completions never came"
        );
        if n == 0 {
            during();
        }
    }
    got
}

#[test]
fn a_copy_in_flight_completes_when_its_event_does_and_other_sessions_are_served_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, blocks) = start(dir.path());
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, kv) = common::attach_with_kv(&socket, NAMESPACE);
    let (_b, mut qb) = attach_plain(&socket);
    assert_eq!(
        daemon.sessions().len(),
        2,
        "both on the one data-plane thread"
    );

    // A: SAVE pages 0 and 1, then a NOP on the same queue pair.
    let hashes = [0xF1A6_0001u64, 0xF1A6_0002];
    for (i, _) in hashes.iter().enumerate() {
        kv.write_bytes(
            i as u64 * PAGE_BYTES,
            &vec![0xA0 + i as u8; PAGE_BYTES as usize],
        )
        .unwrap();
    }
    let save = common::chain_sqe(&mut qa, Opcode::Save, 1, &hashes, 0);
    let t0 = Instant::now();
    assert_eq!(qa.submit(&[save, client::sqe(Opcode::Nop, 2)]).unwrap(), 2);

    // B, meanwhile: NOP round trips, and LOOKUPs that must not see the blocks before A's
    // SAVE completes.
    let mut rtts: Vec<Duration> = Vec::new();
    let mut early_hits = 0;
    let mut lookups = 0;
    let got = collect(&mut qa, 2, || {
        rtts.push(common::timed_nop(&mut qb));
        if rtts.len() % 16 == 0 && t0.elapsed() + Duration::from_millis(30) < DELAY {
            lookups += 1;
            early_hits += lookup_hits(&mut qb, &hashes);
        }
    });
    let (save_cqe, save_at) = got[0];
    let (nop_cqe, _) = got[1];
    assert_eq!(
        (save_cqe.user_data, nop_cqe.user_data),
        (1, 2),
        "the NOP submitted after the SAVE completes after it"
    );
    assert_eq!(save_cqe.status, Status::Ok.raw(), "SAVE: {save_cqe:?}");
    assert_eq!(save_cqe.blocks, 2);
    let save_took = save_at - t0;
    assert!(
        save_took >= DELAY,
        "the SAVE completed after {save_took:?}, before its copy reported done ({DELAY:?})"
    );
    assert!(lookups > 0, "B looked up while the SAVE was in flight");
    assert_eq!(
        early_hits, 0,
        "blocks were published before their copy landed"
    );
    assert_eq!(lookup_hits(&mut qb, &hashes), 2, "published once it landed");
    common::assert_nops_kept_flowing(
        &mut rtts,
        &format!("a SAVE was in flight on the device for {save_took:?}"),
        NOP_P99_BOUND,
        None,
    );

    // A: LOAD both blocks into pages 5 and 6; the bytes are there when it completes, and
    // not before DELAY.
    let load = common::chain_sqe(&mut qa, Opcode::Load, 3, &hashes, 5);
    let t1 = Instant::now();
    assert_eq!(qa.submit(&[load]).unwrap(), 1);
    let got = collect(&mut qa, 1, std::thread::yield_now);
    let (load_cqe, load_at) = got[0];
    assert_eq!(load_cqe.status, Status::Ok.raw(), "LOAD: {load_cqe:?}");
    assert_eq!(load_cqe.blocks, 2);
    assert!(
        load_at - t1 >= DELAY,
        "the LOAD completed after {:?}, before its copy reported done",
        load_at - t1
    );
    for i in 0..hashes.len() as u64 {
        for layer_plane in 0..(common::LAYERS as u64 * 2) {
            let at = layer_plane * common::PAGES * PAGE_BYTES + (5 + i) * PAGE_BYTES;
            let mut page = vec![0u8; PAGE_BYTES as usize];
            kv.read_bytes(at, &mut page).unwrap();
            if layer_plane == 0 {
                assert!(
                    page.iter().all(|b| *b == 0xA0 + i as u8),
                    "block {i} landed in page {}",
                    5 + i
                );
            }
        }
    }
    let dp = &daemon.shared().dataplane;
    assert_eq!(
        dp.counters
            .metrics
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no operation counted in flight once all completed"
    );
    blocks.check_invariants().unwrap();
    drop((qa, qb));
    daemon.shutdown();
}

/// One operation in flight per queue pair, not per session: while a SAVE's copy is on
/// the device on one queue pair, the session's other queue pair is served (a LOOKUP at
/// once, a LOAD side by side with the SAVE), and each queue pair's completion carries
/// its own ops back even though the other queue pair's submissions came in between.
#[test]
fn a_second_queue_pair_is_served_while_the_first_has_a_copy_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, blocks) = start(dir.path());
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qps, kv) = common::attach_with_kv_qps(&socket, NAMESPACE, 2);
    let mut q1 = qps.pop().unwrap();
    let mut q0 = qps.pop().unwrap();
    let stored = [0x5EC0_0001u64, 0x5EC0_0002];
    let fresh = [0x5EC0_0011u64, 0x5EC0_0012];
    for i in 0..4u64 {
        kv.write_bytes(i * PAGE_BYTES, &vec![0xB0 + i as u8; PAGE_BYTES as usize])
            .unwrap();
    }
    let save = common::chain_sqe(&mut q0, Opcode::Save, 1, &stored, 0);
    let c = q0.call(save, Duration::from_secs(10)).expect("first save");
    assert_eq!(c.status, Status::Ok.raw(), "{c:?}");

    // Queue pair 1: LOAD the stored blocks into pages 5 and 6, in flight for DELAY.
    let load = common::chain_sqe(&mut q1, Opcode::Load, 3, &stored, 5);
    let t1 = Instant::now();
    assert_eq!(q1.submit(&[load]).unwrap(), 1);
    // Queue pair 0, meanwhile: a LOOKUP of three other blocks is answered at once, not
    // after the LOAD's copy (and the session's scratch copy of its ops now holds these).
    assert_eq!(lookup_hits(&mut q0, &[0x1, 0x2, 0x3]), 0);
    let lookup_took = t1.elapsed();
    assert!(
        lookup_took < DELAY / 2,
        "the LOOKUP on queue pair 0 waited {lookup_took:?} for queue pair 1's copy"
    );
    // What a copy in flight uses is not replaced under it: ATTACH_LAYOUT and
    // REGISTER_EVENTS answer BUSY while another queue pair has one.
    let mut s = client::sqe(Opcode::RegisterEvents, 40);
    s.count = 0;
    let c = q0.call(s, Duration::from_secs(10)).unwrap();
    assert_eq!((c.user_data, c.status), (40, Status::Busy.raw()), "{c:?}");
    let mut s = client::sqe(Opcode::AttachLayout, 41);
    s.arg_len = std::mem::size_of::<kvplane_ffi::kvp_kv_layout>() as u32;
    let c = q0.call(s, Duration::from_secs(10)).unwrap();
    assert_eq!((c.user_data, c.status), (41, Status::Busy.raw()), "{c:?}");
    // ... and a SAVE of two more blocks (pages 2 and 3) runs beside the LOAD.
    let save = common::chain_sqe(&mut q0, Opcode::Save, 2, &fresh, 2);
    let t0 = Instant::now();
    assert_eq!(q0.submit(&[save]).unwrap(), 1);
    let loaded = collect(&mut q1, 1, std::thread::yield_now);
    let (load_cqe, load_at) = loaded[0];
    assert_eq!(
        (load_cqe.user_data, load_cqe.status),
        (3, Status::Ok.raw()),
        "LOAD: {load_cqe:?}"
    );
    assert!(
        load_at - t1 >= DELAY,
        "the LOAD completed before its copy landed"
    );
    let saved = collect(&mut q0, 1, std::thread::yield_now);
    let (save_cqe, save_at) = saved[0];
    assert_eq!(
        (save_cqe.user_data, save_cqe.status),
        (2, Status::Ok.raw()),
        "SAVE: {save_cqe:?}"
    );
    assert!(
        save_at - t0 >= DELAY,
        "the SAVE completed before its copy landed"
    );
    assert!(
        save_at - t1 < DELAY * 2 - DELAY / 4,
        "the SAVE waited for the LOAD: both done {:?} after the LOAD was submitted",
        save_at - t1
    );
    // The LOAD's ops came back with their own hashes and tiers.
    let mut ops = [kvplane_ffi::kvp_block_op::zeroed(); 2];
    q1.read_block_ops(0, &mut ops).unwrap();
    for (op, &h) in ops.iter().zip(&stored) {
        assert_eq!(op.hash, h, "queue pair 1's ops were overwritten: {ops:?}");
        assert_eq!(op.tier, kvplane_ffi::Tier::Host.raw() as u8, "{ops:?}");
    }
    for i in 0..2u64 {
        let mut page = vec![0u8; PAGE_BYTES as usize];
        kv.read_bytes((5 + i) * PAGE_BYTES, &mut page).unwrap();
        assert!(page.iter().all(|b| *b == 0xB0 + i as u8), "page {}", 5 + i);
    }
    assert_eq!(lookup_hits(&mut q1, &fresh), 2, "the SAVE was published");
    blocks.check_invariants().unwrap();
    drop((q0, q1));
    daemon.shutdown();
}

#[test]
fn a_session_that_ends_with_a_copy_in_flight_ends_after_it_lands_holding_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, blocks) = start(dir.path());
    let socket = daemon.socket_path().to_path_buf();
    let (a, mut qa, _kv) = common::attach_with_kv(&socket, NAMESPACE);
    let hashes = [0xDEAD_0001u64, 0xDEAD_0002, 0xDEAD_0003];
    let save = common::chain_sqe(&mut qa, Opcode::Save, 1, &hashes, 0);
    // Pin nothing, save three blocks, and go away at once: the socket closes with the
    // copy on the device.
    let t0 = Instant::now();
    assert_eq!(qa.submit(&[save]).unwrap(), 1);
    std::thread::sleep(Duration::from_millis(20));
    drop((qa, a));
    let ended_after = loop {
        if daemon.sessions().is_empty() {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the session never ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        ended_after >= DELAY,
        "the session ended after {ended_after:?}, with its copy still on the device ({DELAY:?})"
    );
    // Its SAVE landed and was committed (the copy finished); nothing is held or leaked.
    let (_b, mut qb) = attach_plain(&socket);
    assert_eq!(lookup_hits(&mut qb, &hashes), 3);
    let dp = &daemon.shared().dataplane;
    assert_eq!(
        dp.counters
            .leases_held
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        dp.counters
            .metrics
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let host = blocks
        .stats()
        .tiers
        .into_iter()
        .find(|t| t.tier == kvplane_daemon::block::Tier::Host)
        .unwrap();
    assert_eq!(
        host.used_slots, 3,
        "the three saved blocks, no stray reservation"
    );
    blocks.check_invariants().unwrap();
    drop(qb);
    daemon.shutdown();
}

/// A panic inside an operation's launch (a daemon bug) ends only that session, and what
/// its plan held goes with it: the SAVE's reserved slots and the LOAD's held blocks are
/// given back, the daemon keeps serving, the registry's invariants hold.
#[test]
fn a_panic_in_a_launch_ends_the_session_and_gives_its_plan_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.tiers.nvme.paths.clear();
    config.tiers.nvme.capacity_bytes = 0;
    config.serve.dataplane_threads = 1;
    let armed = Arc::new(AtomicBool::new(false));
    let trip = Arc::clone(&armed);
    let hook: kvplane_cuda::host::LaunchHook = Arc::new(move |op| {
        if matches!(op, "gather" | "scatter") && trip.swap(false, Ordering::SeqCst) {
            panic!("injected panic in a {op} launch");
        }
    });
    let device = Arc::new(kvplane_cuda::host::HostDevice::with_launch_hook_for_tests(
        kvplane_kernels::HostLaunch::default(),
        hook,
    ));
    let (daemon, blocks) = common::start_on(config, None, device);
    let socket = daemon.socket_path().to_path_buf();
    let host_used = || {
        blocks
            .stats()
            .tiers
            .into_iter()
            .find(|t| t.tier == kvplane_daemon::block::Tier::Host)
            .unwrap()
            .used_slots
    };
    let kept = [0x9A_0001u64, 0x9A_0002];
    let (_a, mut qa, _kv) = common::attach_with_kv(&socket, NAMESPACE);
    let s = common::chain_sqe(&mut qa, Opcode::Save, 1, &kept, 0);
    assert_eq!(
        qa.call(s, Duration::from_secs(10)).unwrap().status,
        Status::Ok.raw()
    );
    assert_eq!(host_used(), 2);

    // SAVE whose gather panics: INTERNAL, the session ends, no slot stays reserved.
    armed.store(true, Ordering::SeqCst);
    let s = common::chain_sqe(&mut qa, Opcode::Save, 2, &[0x9B_0001, 0x9B_0002], 2);
    let c = qa.call(s, Duration::from_secs(10)).unwrap();
    assert_eq!(c.status, Status::Internal.raw(), "{c:?}");
    let wait_for_sessions = |n: usize| {
        let t0 = Instant::now();
        while daemon.sessions().len() != n {
            assert!(t0.elapsed() < Duration::from_secs(10), "sessions never {n}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for_sessions(0);
    assert_eq!(
        host_used(),
        2,
        "the panicked SAVE's reservations were given back"
    );

    // LOAD whose scatter panics: the blocks it held are released (a DROP frees them).
    let (_b, mut qb, _kvb) = common::attach_with_kv(&socket, NAMESPACE);
    armed.store(true, Ordering::SeqCst);
    let s = common::chain_sqe(&mut qb, Opcode::Load, 3, &kept, 4);
    assert_eq!(
        qb.call(s, Duration::from_secs(10)).unwrap().status,
        Status::Internal.raw()
    );
    wait_for_sessions(0);
    let (_c, mut qc, _kvc) = common::attach_with_kv(&socket, NAMESPACE);
    let s = common::chain_sqe(&mut qc, Opcode::Drop, 4, &kept, 0);
    let d = qc.call(s, Duration::from_secs(10)).unwrap();
    assert_eq!((d.blocks, d.detail), (2, 0), "no hold left behind: {d:?}");
    assert_eq!(host_used(), 0);
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
    drop((qa, qb, qc));
    daemon.shutdown();
}

/// A SAVE kept on the GPU that must copy a G1 victim down to the host tier waits for that
/// copy: it is served on an I/O executor, so the data-plane thread goes on serving
/// another session's NOPs meanwhile (on the data-plane thread the copy-down would stall
/// them for `DELAY`).
#[test]
fn a_save_that_copies_a_g1_victim_down_does_not_hold_up_other_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, blocks) = start_with(dir.path(), |c| {
        c.tiers.host.capacity_bytes = 4 * common::SLOT_BYTES;
        c.tiers.hbm.capacity_bytes = 2 * common::BLOCK_BYTES;
    });
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, _kv) = common::attach_with_kv(&socket, NAMESPACE);
    let (_b, mut qb) = attach_plain(&socket);
    let keep = kvplane_ffi::SQE_F_KEEP_ON_GPU;
    let call = |qa: &mut QueuePair, sqe: kvplane_ffi::kvp_sqe| {
        let c = qa.call(sqe, Duration::from_secs(10)).expect("A's op");
        assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
    };
    // Two blocks kept on the GPU, then four more that push them out of the 4-slot host
    // tier: G1 holds their only copy.
    let kept = [0xD0_0001u64, 0xD0_0002];
    let mut s = common::chain_sqe(&mut qa, Opcode::Save, 1, &kept, 0);
    s.flags = keep;
    call(&mut qa, s);
    let more = [0xD0_0101, 0xD0_0102, 0xD0_0103, 0xD0_0104];
    let s = common::chain_sqe(&mut qa, Opcode::Save, 2, &more, 2);
    call(&mut qa, s);
    assert_eq!(lookup_hits(&mut qb, &kept), 2);

    // One more kept block needs a G1 slot: the leaf of the kept chain goes down first.
    let mut s = common::chain_sqe(&mut qa, Opcode::Save, 3, &[0xD0_0201], 6);
    s.flags = keep;
    let t0 = Instant::now();
    assert_eq!(qa.submit(&[s]).unwrap(), 1);
    let mut rtts: Vec<Duration> = Vec::new();
    let got = collect(&mut qa, 1, || {
        rtts.push(common::timed_nop(&mut qb));
    });
    let (save_cqe, save_at) = got[0];
    assert_eq!(save_cqe.status, Status::Ok.raw(), "SAVE: {save_cqe:?}");
    let save_took = save_at - t0;
    assert!(
        save_took >= 2 * DELAY,
        "the SAVE waited for the copy-down and its gather: {save_took:?}"
    );
    assert_eq!(lookup_hits(&mut qb, &kept), 2, "copied down, not lost");
    let links = &daemon.shared().dataplane.counters.metrics;
    assert_eq!(
        links.link_bytes(kvplane_daemon::metrics::Link::G1ToHost),
        common::BLOCK_BYTES
    );
    common::assert_nops_kept_flowing(
        &mut rtts,
        &format!("a SAVE copied a G1 block down for {save_took:?}"),
        NOP_P99_BOUND,
        Some(DELAY * 2 / 3),
    );
    blocks.check_invariants().unwrap();
    drop((qa, qb));
    daemon.shutdown();
}
