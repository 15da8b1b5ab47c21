//! What the in-process daemon tests share: the engine geometry, a daemon on a host tier
//! and an NVMe file whose I/O engines a `FaultPlan` can wrap, and an engine session with
//! a paged KV pool (a sealed memfd) and its layout attached.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kvplane_daemon::block::{BlockManager, ManagerOptions};
use kvplane_daemon::config::Config;
use kvplane_daemon::dataplane::DataPlane;
use kvplane_daemon::session::Daemon;
use kvplane_daemon::tier::host::HugepageMode;
use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_daemon::tier::nvme::engine::FaultPlan;
use kvplane_ffi::{Opcode, Status, kvp_block_op, kvp_kv_layout, kvp_sqe};
use kvplane_shm::{AttachOptions, QueuePair, Segment, Session, client};

/// Engine geometry: 2 layers x 2 planes x 16 tokens x 1 head x 128 bytes = 8 KiB blocks.
pub const LAYERS: usize = 2;
pub const PAGES: u64 = 16;
pub const PAGE_BYTES: u64 = 16 * 128;
pub const BLOCK_BYTES: u64 = LAYERS as u64 * 2 * PAGE_BYTES;
/// Slots of the host tier and of the NVMe file.
pub const SLOTS: u64 = 32;
pub const SLOT_BYTES: u64 = 4096 + BLOCK_BYTES;

/// The daemon config of these tests: engine socket in `dir`, `SLOTS` host slots, an NVMe
/// file of `SLOTS` slots on `engine`, no control listeners.
pub fn config(dir: &Path, engine: EngineKind) -> Config {
    let mut config = Config::default();
    config.serve.socket_path = dir.join("kvplane.sock");
    config.blocks.block_bytes = BLOCK_BYTES as usize;
    config.tiers.host.capacity_bytes = SLOTS * SLOT_BYTES;
    config.tiers.host.lock = false;
    config.tiers.host.hugepages = HugepageMode::Never;
    config.tiers.host.touch_threads = 1;
    config.tiers.nvme.paths = vec![dir.join("nvme.kvp")];
    config.tiers.nvme.capacity_bytes = SLOTS * SLOT_BYTES;
    config.tiers.nvme.engine = engine;
    config.control.metrics_addr = String::new();
    // The host backend even on a GPU machine: these tests check the data plane's logic.
    config.device.backend = kvplane_daemon::config::BackendSetting::Host;
    config
}

/// A daemon in this process serving `config` on the device its `[device]` opens, its
/// NVMe engines wrapped by `plan`'s injector when given.
#[allow(dead_code)]
pub fn start(config: Config, plan: Option<Arc<FaultPlan>>) -> (Daemon, Arc<BlockManager>) {
    config.validate().expect("config");
    let device = kvplane_daemon::device::DaemonDevice::open(&config.device).expect("device");
    start_on(config, plan, device.device)
}

/// A daemon in this process serving `config` on `device` (a test device).
pub fn start_on(
    config: Config,
    plan: Option<Arc<FaultPlan>>,
    device: Arc<dyn kvplane_cuda::Device>,
) -> (Daemon, Arc<BlockManager>) {
    config.validate().expect("config");
    let blocks = Arc::new(
        BlockManager::new(
            &config.blocks,
            &config.tiers,
            ManagerOptions {
                faults: plan,
                device: Some(device),
                ..ManagerOptions::default()
            },
        )
        .expect("tiers"),
    );
    let dataplane = Arc::new(DataPlane::with_blocks(blocks.clone()));
    let daemon = Daemon::start(config, dataplane).expect("daemon");
    (daemon, blocks)
}

/// An engine session in `namespace` with a paged KV pool of `PAGES` pages per layer and
/// plane (a sealed memfd, also mapped here as the returned segment) and its layout
/// attached.
pub fn attach_with_kv(socket: &Path, namespace: &str) -> (Session, QueuePair, Segment) {
    let (session, mut qps, kv) = attach_with_kv_qps(socket, namespace, 1);
    (session, qps.remove(0), kv)
}

/// An engine with no KV buffer and one queue pair on `namespace` (NOPs, LOOKUPs).
#[allow(dead_code)]
pub fn attach_plain(socket: &Path, namespace: &str) -> (Session, QueuePair) {
    let mut o = AttachOptions::new(socket);
    o.namespaces = vec![namespace.into()];
    let mut session = Session::attach(o).expect("attach");
    let qp = session.take_queue_pairs().unwrap().remove(0);
    (session, qp)
}

/// [`attach_with_kv`] with `queue_pairs` queue pairs (the layout attached through the
/// first).
pub fn attach_with_kv_qps(
    socket: &Path,
    namespace: &str,
    queue_pairs: u32,
) -> (Session, Vec<QueuePair>, Segment) {
    let bytes = LAYERS as u64 * 2 * PAGES * PAGE_BYTES;
    let fd = kvplane_shm::sys::memfd_create_sealed("kv", bytes).unwrap();
    let kv = Segment::map_fd(fd.try_clone().unwrap(), bytes).unwrap();
    let mut o = AttachOptions::new(socket);
    o.namespaces = vec![namespace.into()];
    o.queue_pairs = queue_pairs;
    o.host_kv_buffer(fd, bytes);
    let mut session = Session::attach(o).expect("attach");
    let mut qps = session.take_queue_pairs().unwrap();
    let qp = &mut qps[0];
    let l = kvplane_kernels::layout::planes_per_layer(LAYERS as u32, 16, 1, 128, PAGES);
    assert_eq!(l.buffer_bytes, bytes);
    qp.write_arena(0, kvplane_ffi::as_bytes(&l)).unwrap();
    let mut s = client::sqe(Opcode::AttachLayout, u64::MAX);
    s.arg_len = std::mem::size_of::<kvp_kv_layout>() as u32;
    let c = qp.call(s, Duration::from_secs(10)).expect("layout");
    assert_eq!(c.status, Status::Ok.raw(), "layout: {c:?}");
    (session, qps, kv)
}

/// One NOP round trip on `qp` (answered OK within 60 s): how long it took.
#[allow(dead_code)]
pub fn timed_nop(qp: &mut QueuePair) -> Duration {
    let t = std::time::Instant::now();
    let c = qp
        .call(client::sqe(Opcode::Nop, 0), Duration::from_secs(60))
        .expect("NOP");
    assert_eq!(c.status, Status::Ok.raw(), "NOP: {c:?}");
    t.elapsed()
}

/// Checks the NOP round trips another session got while one session's operation was held
/// up (`what`): at least 100 of them, p99 under `p99_bound`, and (when given) none over
/// `max_bound`. Prints the distribution.
#[allow(dead_code)]
pub fn assert_nops_kept_flowing(
    rtts: &mut [Duration],
    what: &str,
    p99_bound: Duration,
    max_bound: Option<Duration>,
) {
    assert!(!rtts.is_empty(), "no NOPs completed while {what}");
    rtts.sort_unstable();
    let p99 = rtts[(rtts.len() * 99 / 100).min(rtts.len() - 1)];
    let max = *rtts.last().unwrap();
    eprintln!(
        "{what}; meanwhile {} NOPs on the same data-plane thread: p50 {:?}, p99 {p99:?}, max {max:?}",
        rtts.len(),
        rtts[rtts.len() / 2]
    );
    assert!(
        rtts.len() >= 100,
        "only {} NOPs completed while {what}",
        rtts.len()
    );
    assert!(
        p99 < p99_bound,
        "NOP p99 {p99:?} over {p99_bound:?} while {what}"
    );
    if let Some(bound) = max_bound {
        assert!(
            max < bound,
            "slowest NOP {max:?} over {bound:?} while {what}"
        );
    }
}

/// A submission of `op` over the chain `hashes` (each block's parent the one before it),
/// block `i` in engine page `first_page + i`; its ops are written to the arena at 0.
#[allow(dead_code)]
pub fn chain_sqe(
    qp: &mut QueuePair,
    op: Opcode,
    user_data: u64,
    hashes: &[u64],
    first_page: u32,
) -> kvp_sqe {
    let ops: Vec<kvp_block_op> = hashes
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            let parent = if i == 0 { 0 } else { hashes[i - 1] };
            kvp_block_op::new(h, parent, first_page + i as u32)
        })
        .collect();
    qp.write_arena(0, kvplane_ffi::slice_as_bytes(&ops))
        .unwrap();
    let mut s = client::sqe(op, user_data);
    s.count = ops.len() as u32;
    s.arg_len = std::mem::size_of_val(&ops[..]) as u32;
    s
}

/// A fault plan under which every NVMe write takes `ms` milliseconds (a stalled device).
#[allow(dead_code)]
pub fn stalled_writes(ms: u32) -> Arc<kvplane_daemon::tier::nvme::engine::FaultPlan> {
    use kvplane_daemon::tier::nvme::engine::{FaultEffect, FaultPlan, FaultRule, IoKind};
    let plan = Arc::new(FaultPlan::default());
    plan.add(FaultRule {
        kind: Some(IoKind::Write),
        skip: 0,
        count: u64::MAX,
        effect: FaultEffect::Delay { ms },
    });
    plan
}

/// Submits a write-through SAVE of the one block `hash` from engine page 0 (filled with
/// `fill` first) on `qp`, and waits until its write reached `plan`'s injector (an I/O
/// executor holds the session's data from then on, until the write is back).
#[allow(dead_code)]
pub fn submit_stalled_save(
    plan: &FaultPlan,
    qp: &mut QueuePair,
    kv: &Segment,
    (user_data, hash, fill): (u64, u64, u8),
) {
    kv.write_bytes(0, &vec![fill; PAGE_BYTES as usize]).unwrap();
    let mut s = chain_sqe(qp, Opcode::Save, user_data, &[hash], 0);
    s.flags = kvplane_ffi::SQE_F_WRITE_THROUGH;
    assert_eq!(qp.submit(&[s]).unwrap(), 1);
    let t0 = std::time::Instant::now();
    while plan.fired() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the SAVE's write never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
