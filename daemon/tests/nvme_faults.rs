//! NVMe faults injected at the I/O engine (the `IoEngine` trait, through
//! `FaultInjector`) under a real daemon in this process, driven by an engine over the
//! shared-memory rings: what a session sees (completion statuses), what the daemon counts,
//! and that no slot is leaked and no wrong byte is ever served.
//!
//! - ENOSPC / EIO on writes: the write-through save completes with `Io`, the blocks stay
//!   on the host tier only, the NVMe slots go back to the free list, the error names its
//!   cause in the log, and writes succeed again once the fault clears;
//! - a torn write: same, and a restart finds nothing in that slot;
//! - EIO on a read: the load stops at that block with `Io` (nothing past it is written
//!   into the engine's pages), the copy stays on NVMe and loads once the fault clears;
//! - a read returning flipped bits: the load stops with `Corrupt`, the copy is dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvplane_daemon::block::{BlockManager, Tier};
use kvplane_daemon::session::Daemon;
use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_daemon::tier::nvme::engine::{FaultEffect, FaultPlan, FaultRule, IoKind};
use kvplane_ffi::{Opcode, Pod, SQE_F_WRITE_THROUGH, Status, kvp_block_op, kvp_cqe};
use kvplane_shm::{QueuePair, Segment, Session};

mod common;
use common::{BLOCK_BYTES, LAYERS, PAGE_BYTES, PAGES};

/// Log lines of the daemon in this process (one subscriber for the whole test binary).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let make = move || LogWriter(sink.clone());
        tracing_subscriber::fmt()
            .with_writer(make)
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);
impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).to_string()
}

/// A daemon in this process whose NVMe engines are wrapped by `plan`'s injector.
fn start(dir: &Path, plan: Option<Arc<FaultPlan>>) -> (Daemon, Arc<BlockManager>, PathBuf) {
    logs();
    let config = common::config(dir, EngineKind::IoUring);
    let socket = config.serve.socket_path.clone();
    let (daemon, blocks) = common::start(config, plan);
    (daemon, blocks, socket)
}

/// An engine: a session with a paged KV pool (a sealed memfd) and its layout attached.
struct Engine {
    _session: Session,
    qp: QueuePair,
    kv: Segment,
    user_data: u64,
}

impl Engine {
    fn attach(socket: &Path) -> Engine {
        let (session, qp, kv) = common::attach_with_kv(socket, "faults");
        Engine {
            _session: session,
            qp,
            kv,
            user_data: 1,
        }
    }

    fn submit(&mut self, op: Opcode, flags: u16, arg: Vec<u8>, count: u32) -> kvp_cqe {
        self.qp.write_arena(0, &arg).unwrap();
        let mut s = kvplane_shm::client::sqe(op, self.user_data);
        self.user_data += 1;
        s.flags = flags;
        s.arg_len = arg.len() as u32;
        s.count = count;
        self.qp
            .call(s, Duration::from_secs(10))
            .expect("completion")
    }

    /// One op over a chain of `hashes` stored from/into pages `first_page..`; returns the
    /// completion and the per-block results the daemon wrote back.
    fn blocks(
        &mut self,
        op: Opcode,
        flags: u16,
        hashes: &[u64],
        first_page: u32,
    ) -> (kvp_cqe, Vec<kvp_block_op>) {
        let mut arg = Vec::new();
        for (i, &h) in hashes.iter().enumerate() {
            let parent = if i == 0 { 0 } else { hashes[i - 1] };
            let o = kvp_block_op::new(h, parent, first_page + i as u32);
            arg.extend_from_slice(kvplane_ffi::as_bytes(&o));
        }
        let c = self.submit(op, flags, arg, hashes.len() as u32);
        let mut out = vec![kvp_block_op::zeroed(); hashes.len()];
        self.qp.read_block_ops(0, &mut out).unwrap();
        (c, out)
    }

    fn regions(page: u32) -> Vec<u64> {
        (0..LAYERS * 2)
            .map(|lp| lp as u64 * PAGES * PAGE_BYTES + page as u64 * PAGE_BYTES)
            .collect()
    }

    /// The bytes block `hash` is saved with.
    fn pattern(hash: u64) -> Vec<u8> {
        (0..BLOCK_BYTES)
            .map(|i| (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 57)) as u8 ^ (i as u8))
            .collect()
    }

    fn fill(&self, page: u32, hash: u64) {
        let p = Self::pattern(hash);
        for (k, off) in Self::regions(page).into_iter().enumerate() {
            let part = &p[k * PAGE_BYTES as usize..(k + 1) * PAGE_BYTES as usize];
            self.kv.write_bytes(off, part).unwrap();
        }
    }

    fn poison(&self, page: u32) {
        for off in Self::regions(page) {
            self.kv
                .write_bytes(off, &vec![0xEE; PAGE_BYTES as usize])
                .unwrap();
        }
    }

    fn read(&self, page: u32) -> Vec<u8> {
        let mut out = vec![0u8; BLOCK_BYTES as usize];
        for (k, off) in Self::regions(page).into_iter().enumerate() {
            self.kv
                .read_bytes(
                    off,
                    &mut out[k * PAGE_BYTES as usize..(k + 1) * PAGE_BYTES as usize],
                )
                .unwrap();
        }
        out
    }

    /// Saves `hashes` (pages 0..) with write-through; returns the completion.
    fn save_through(&mut self, hashes: &[u64]) -> kvp_cqe {
        for (i, &h) in hashes.iter().enumerate() {
            self.fill(i as u32, h);
        }
        self.blocks(Opcode::Save, SQE_F_WRITE_THROUGH, hashes, 0).0
    }

    /// Loads `hashes` into poisoned pages 8..; returns the completion and how many pages
    /// hold exactly their block's bytes (the rest must still be poison).
    fn load_check(&mut self, hashes: &[u64]) -> (kvp_cqe, usize) {
        for i in 0..hashes.len() as u32 {
            self.poison(8 + i);
        }
        let (c, _) = self.blocks(Opcode::Load, 0, hashes, 8);
        let poison = vec![0xEE; BLOCK_BYTES as usize];
        let mut intact = 0;
        for (i, &h) in hashes.iter().enumerate() {
            let got = self.read(8 + i as u32);
            if got == Self::pattern(h) {
                intact += 1;
            } else {
                assert_eq!(
                    got, poison,
                    "block {i} of a load holds neither its bytes nor poison"
                );
            }
        }
        (c, intact)
    }
}

fn nvme_used(b: &BlockManager) -> u32 {
    b.stats()
        .tiers
        .iter()
        .find(|t| t.tier == Tier::Nvme)
        .unwrap()
        .used_slots
}

fn rule(kind: IoKind, skip: u64, count: u64, effect: FaultEffect) -> FaultRule {
    FaultRule {
        kind: Some(kind),
        skip,
        count,
        effect,
    }
}

#[test]
fn enospc_eio_and_torn_writes_fail_the_save_free_the_slot_and_clear_with_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Arc::new(FaultPlan::default());
    let (daemon, blocks, socket) = start(dir.path(), Some(plan.clone()));
    assert!(blocks.stats().nvme_engine.starts_with("fault-injector("));
    let mut e = Engine::attach(&socket);
    let abi_host = kvplane_ffi::Tier::Host.raw();
    let abi_nvme = kvplane_ffi::Tier::Nvme.raw();

    // ENOSPC on both block writes of a save.
    plan.add(rule(IoKind::Write, 0, 2, FaultEffect::Errno(libc::ENOSPC)));
    let c = e.save_through(&[101, 102]);
    assert_eq!(
        (c.status, c.blocks, u32::from(c.tier)),
        (Status::Io.raw(), 2, abi_host),
        "failed write-through: Io, blocks kept on the host tier: {c:?}"
    );
    assert_eq!(
        nvme_used(&blocks),
        0,
        "the NVMe slots went back to the free list"
    );
    let (c, ops) = e.blocks(Opcode::Lookup, 0, &[101, 102], 0);
    assert_eq!(c.blocks, 2);
    assert!(
        ops.iter().all(|o| o.tier == abi_host as u8),
        "not indexed on NVMe: {ops:?}"
    );
    assert_eq!(
        e.load_check(&[101, 102]).1,
        2,
        "host copies load bit-identical"
    );
    assert_eq!(blocks.stats().nvme_write_errors, 2);
    let log = log_text();
    assert!(
        log.contains("NVMe write failed") && log.contains("No space left on device"),
        "the error names the cause and the slot: {log}"
    );

    // EIO on the second write of a 3-block save: one block reaches NVMe, the save fails.
    plan.add(rule(IoKind::Write, 1, 1, FaultEffect::Errno(libc::EIO)));
    let c = e.save_through(&[201, 202, 203]);
    assert_eq!((c.status, c.blocks), (Status::Io.raw(), 3), "{c:?}");
    assert_eq!(
        nvme_used(&blocks),
        2,
        "two written, the failed one's slot freed"
    );
    assert_eq!(e.load_check(&[201, 202, 203]).1, 3);
    assert!(log_text().contains("Input/output error"));

    // The faults are spent: write-through works again.
    let c = e.save_through(&[401, 402]);
    assert_eq!(
        (c.status, c.blocks, u32::from(c.tier)),
        (Status::Ok.raw(), 2, abi_nvme),
        "{c:?}"
    );
    assert_eq!(nvme_used(&blocks), 4);

    // A torn write (the header page lands, the block does not), the last write before
    // the restart below so that no later save reuses its slot.
    plan.add(rule(
        IoKind::Write,
        0,
        1,
        FaultEffect::TornWrite { bytes: 4096 },
    ));
    let c = e.save_through(&[301]);
    assert_eq!((c.status, c.blocks), (Status::Io.raw(), 1), "{c:?}");
    assert_eq!(nvme_used(&blocks), 4);
    assert_eq!(plan.fired(), 4);
    assert_eq!(blocks.stats().nvme_write_errors, 4);
    blocks.check_invariants().unwrap();
    drop(e);
    daemon.shutdown();
    drop(blocks);

    // After a restart exactly the 4 blocks whose writes succeeded are on NVMe: the torn
    // slot's header was erased when its write failed, so the scan finds nothing there.
    let (daemon, blocks, socket) = start(dir.path(), None);
    let s = blocks.stats();
    assert_eq!((s.nvme_scan_valid, s.nvme_scan_corrupt), (4, 0), "{s:?}");
    let mut e = Engine::attach(&socket);
    for h in [101, 102, 202, 301] {
        let (c, _) = e.blocks(Opcode::Lookup, 0, &[h], 0);
        assert_eq!(
            c.blocks, 0,
            "block {h} never reached NVMe and is not restored"
        );
    }
    for pair in [[201, 203], [401, 402]] {
        let (c, ok) = e.load_check(&pair);
        assert_eq!((c.status, ok), (Status::Ok.raw(), 2), "{pair:?}: {c:?}");
    }
    drop(e);
    daemon.shutdown();
    eprintln!(
        "fault-summary nvme_write_faults injected=4 (enospc=2 eio=1 torn=1) failed_saves=3 \
         slots_leaked=0 blocks_verified=11 blocks_lost=0"
    );
}

#[test]
fn read_faults_never_serve_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let chain: Vec<u64> = (1..=4).map(|i| 0xB000 + i).collect();
    {
        let (daemon, blocks, socket) = start(dir.path(), None);
        let mut e = Engine::attach(&socket);
        let c = e.save_through(&chain);
        assert_eq!((c.status, c.blocks), (Status::Ok.raw(), 4), "{c:?}");
        drop(e);
        daemon.shutdown();
        drop(blocks);
    }
    // Restarted: the blocks are on NVMe only, so every load reads the disk.
    let plan = Arc::new(FaultPlan::default());
    let (daemon, blocks, socket) = start(dir.path(), Some(plan.clone()));
    let mut e = Engine::attach(&socket);
    let abi_nvme = kvplane_ffi::Tier::Nvme.raw() as u8;
    let (_, ops) = e.blocks(Opcode::Lookup, 0, &chain, 0);
    assert!(ops.iter().all(|o| o.tier == abi_nvme), "{ops:?}");

    // EIO reading block 2: blocks 0 and 1 are served, 2 and 3 are not written at all.
    plan.add(rule(IoKind::Read, 2, 1, FaultEffect::Errno(libc::EIO)));
    let (c, intact) = e.load_check(&chain);
    assert_eq!(
        (c.status, c.blocks, c.detail),
        (Status::Io.raw(), 2, 2),
        "the load stops at the unreadable block: {c:?}"
    );
    assert_eq!(
        intact, 2,
        "the pages past the failure keep their old contents"
    );
    assert_eq!(blocks.stats().nvme_read_errors, 1);
    // The copy is still on NVMe; with the fault gone, the whole chain loads.
    let (c, intact) = e.load_check(&chain);
    assert_eq!(
        (c.status, c.blocks, intact),
        (Status::Ok.raw(), 4, 4),
        "{c:?}"
    );

    // A restart again (staged host copies gone), then a read returning a flipped bit.
    drop(e);
    daemon.shutdown();
    drop(blocks);
    let plan = Arc::new(FaultPlan::default());
    let (daemon, blocks, socket) = start(dir.path(), Some(plan.clone()));
    let mut e = Engine::attach(&socket);
    plan.add(rule(
        IoKind::Read,
        1,
        1,
        FaultEffect::FlipBit { offset: 4096 + 777 },
    ));
    let (c, intact) = e.load_check(&chain);
    assert_eq!(
        (c.status, c.blocks, c.detail),
        (Status::Corrupt.raw(), 1, 1),
        "the checksum catches the flipped bit: {c:?}"
    );
    assert_eq!(
        intact, 1,
        "the corrupt block never reaches the engine's page"
    );
    assert_eq!(blocks.stats().nvme_corrupt_dropped, 1);
    let (c, _) = e.blocks(Opcode::Lookup, 0, &chain[1..2], 0);
    assert_eq!(c.blocks, 0, "the corrupt copy was dropped");
    assert_eq!(nvme_used(&blocks), 3, "its slot was freed");
    assert!(log_text().contains("dropped, not served"));
    blocks.check_invariants().unwrap();
    assert_eq!(plan.fired(), 1);
    drop(e);
    daemon.shutdown();
    eprintln!(
        "fault-summary nvme_read_faults injected=2 (eio=1 bitflip=1) wrong_bytes_served=0 \
         blocks_verified=7 blocks_dropped_as_corrupt=1"
    );
}
