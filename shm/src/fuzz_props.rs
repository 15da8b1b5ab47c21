//! Properties the fuzz targets in `fuzz/` check, in one place: each `check_*` takes the
//! fuzzer's bytes, drives the real code, and panics if a property fails. The same
//! functions replay the checked-in corpus and every past crash in `cargo test`
//! (`tests/fuzz_regressions.rs`), and `seeds_*` generate that corpus with the real
//! encoders so it can be regenerated rather than hand-edited.
//!
//! Targets here: `validate_sqe` (one submission against a geometry), `server_rings` (the
//! daemon's queue pair over a segment whose header and ring bytes the fuzzer writes) and
//! `attach_request` (the attach handshake parser over a real socket pair).

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use kvplane_ffi::{
    self as ffi, Opcode, Pod, RegionKind, Status, kvp_attach_request, kvp_block_op, kvp_cqe,
    kvp_kv_layout, kvp_kv_region, kvp_sqe, kvp_stats,
};

use crate::error::ShmError;
use crate::handshake::{
    MAX_ATTACH_BYTES, REGION_BYTES, REQUEST_BYTES, build_request, read_request,
    valid_namespace_name,
};
use crate::ring::entry_seq;
use crate::ring::ring_offsets::{BELL_WORD, HEAD, TAIL};
use crate::segment::{Geometry, QpGeometry, Segment};
use crate::server::{ServerQueuePair, completion, validate_sqe};
use crate::sys;

/// A named seed input.
pub type Seed = (String, Vec<u8>);

/// Little-endian reader over fuzzer bytes: missing bytes read as zero, so every input is
/// some valid script.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

// ---------------------------------------------------------------------------------------
// validate_sqe
// ---------------------------------------------------------------------------------------

/// Bytes of the `validate_sqe` input before the 64-byte submission.
const SQE_PREFIX_BYTES: usize = 10;

/// The property of one validation: an accepted submission names a range inside its own
/// queue pair's arena slice (no overflow, no escape into a neighbour's slice, the rings or
/// past the segment), and every field the daemon acts on obeys its documented rule.
pub fn assert_accepted_sqe_is_sound(
    sqe: &kvp_sqe,
    qp: &QpGeometry,
    num_namespaces: u32,
    segment_bytes: u64,
) -> bool {
    let Ok(r) = validate_sqe(sqe, qp, num_namespaces) else {
        return false;
    };
    let end = r
        .arg_offset
        .checked_add(r.arg_len as u64)
        .expect("accepted range overflows u64");
    assert!(
        r.arg_offset >= qp.arena_offset && end <= qp.arena_offset + qp.arena_bytes,
        "accepted [{}, {end}) escapes the slice [{}, +{})",
        r.arg_offset,
        qp.arena_offset,
        qp.arena_bytes
    );
    assert!(end <= segment_bytes, "accepted range past the segment");
    assert_eq!(r.arg_offset - qp.arena_offset, sqe.arg_offset);
    assert_eq!(
        (r.user_data, r.opcode.raw(), r.flags, r.namespace_id),
        (sqe.user_data, sqe.opcode, sqe.flags, sqe.namespace_id),
        "fields copied unchanged"
    );
    assert_eq!(
        (r.count, r.param0, r.param1),
        (sqe.count, sqe.param0, sqe.param1)
    );
    assert_eq!(sqe.reserved, [0; 14], "reserved bytes must be zero");
    assert_eq!(sqe.flags & !ffi::SQE_F_ALL, 0, "unknown flag accepted");
    match r.opcode {
        Opcode::Nop | Opcode::Stats | Opcode::AttachLayout | Opcode::RegisterEvents => {}
        _ => assert!(r.namespace_id < num_namespaces, "namespace not bound"),
    }
    match r.opcode {
        Opcode::Stats => assert!(r.arg_len as usize >= std::mem::size_of::<kvp_stats>()),
        Opcode::AttachLayout => {
            assert_eq!(r.arg_len as usize, std::mem::size_of::<kvp_kv_layout>())
        }
        Opcode::Nop | Opcode::ClearNamespace => {}
        Opcode::RegisterEvents => {
            assert!(r.count as usize <= ffi::MAX_IPC_EVENTS);
            assert_eq!(
                r.arg_len as usize,
                r.count as usize * std::mem::size_of::<ffi::kvp_ipc_event>()
            );
        }
        Opcode::Lookup
        | Opcode::Save
        | Opcode::Load
        | Opcode::Pin
        | Opcode::Unpin
        | Opcode::Drop => {
            assert!((1..=ffi::MAX_BLOCKS_PER_OP).contains(&r.count));
            assert_eq!(
                r.arg_len as usize,
                r.count as usize * std::mem::size_of::<kvp_block_op>()
            );
            assert_eq!(r.arg_offset % 8, 0, "block ops must be 8-byte aligned");
            if matches!(r.opcode, Opcode::Save | Opcode::Load) {
                assert!(r.param0 <= ffi::MAX_IPC_EVENTS as u64, "event index range");
            }
        }
    }
    if r.opcode != Opcode::Load {
        assert_eq!(
            r.flags & ffi::SQE_F_PREFIX_ONLY,
            0,
            "PREFIX_ONLY outside load"
        );
    }
    true
}

/// Input: queue pairs (1 byte), which queue pair (1), arena bytes (u32), namespaces bound
/// (u32), then one `kvp_sqe` (missing bytes are zero).
/// Returns whether the submission was accepted.
pub fn check_validate_sqe(data: &[u8]) -> bool {
    let mut b = Bytes(data);
    let num_qps = 1 + u32::from(b.u8()) % ffi::MAX_QUEUE_PAIRS as u32;
    let which = b.u8() as usize % num_qps as usize;
    let arena_bytes = u64::from(b.u32());
    let num_namespaces = b.u32();
    let mut raw = [0u8; std::mem::size_of::<kvp_sqe>()];
    let rest = b.take(raw.len());
    raw[..rest.len()].copy_from_slice(rest);
    let sqe: kvp_sqe = ffi::read_pod(&raw).expect("exactly one sqe");
    let Ok(geometry) = Geometry::new(num_qps, 64, 64, arena_bytes) else {
        return false;
    };
    assert_accepted_sqe_is_sound(
        &sqe,
        &geometry.queue_pairs[which],
        num_namespaces,
        geometry.segment_bytes,
    )
}

fn sqe_input(num_qps: u8, which: u8, arena_bytes: u32, namespaces: u32, sqe: &kvp_sqe) -> Vec<u8> {
    let mut v = vec![num_qps.wrapping_sub(1), which];
    v.extend_from_slice(&arena_bytes.to_le_bytes());
    v.extend_from_slice(&namespaces.to_le_bytes());
    debug_assert_eq!(v.len(), SQE_PREFIX_BYTES);
    v.extend_from_slice(ffi::as_bytes(sqe));
    v
}

/// One valid submission of each opcode, plus the edges the validator must reject.
pub fn seeds_validate_sqe() -> Vec<Seed> {
    let op_bytes = std::mem::size_of::<kvp_block_op>() as u32;
    let mut seeds = Vec::new();
    for &op in Opcode::ALL {
        let mut s = crate::client::sqe(op, 0x1000 + op.raw() as u64);
        match op {
            Opcode::Stats => s.arg_len = std::mem::size_of::<kvp_stats>() as u32,
            Opcode::AttachLayout => s.arg_len = std::mem::size_of::<kvp_kv_layout>() as u32,
            Opcode::Nop | Opcode::ClearNamespace => {}
            _ => {
                s.count = 4;
                s.arg_len = 4 * op_bytes;
                s.arg_offset = 64;
            }
        }
        if op == Opcode::Load {
            s.flags = ffi::SQE_F_PREFIX_ONLY;
        }
        seeds.push((
            format!("seed-{op:?}").to_lowercase(),
            sqe_input(2, 1, 1 << 16, 2, &s),
        ));
    }
    // A block op ending exactly at the end of a 4-way slice; and one byte over.
    let mut edge = crate::client::sqe(Opcode::Save, 7);
    edge.count = 2;
    edge.arg_len = 2 * op_bytes;
    edge.arg_offset = 16384 - 2 * op_bytes as u64;
    seeds.push((
        "seed-save-at-slice-end".into(),
        sqe_input(4, 3, 1 << 16, 1, &edge),
    ));
    edge.arg_offset += 8;
    seeds.push((
        "seed-save-past-slice-end".into(),
        sqe_input(4, 3, 1 << 16, 1, &edge),
    ));
    edge.arg_offset = u64::MAX - 8;
    seeds.push((
        "seed-save-offset-overflow".into(),
        sqe_input(4, 3, 1 << 16, 1, &edge),
    ));
    seeds
}

// ---------------------------------------------------------------------------------------
// server_rings
// ---------------------------------------------------------------------------------------

/// The session the ring target serves: two queue pairs of 8 entries (queue pair 1 is a
/// neighbour the server of queue pair 0 must never touch). Made once per thread; each
/// input starts from a fresh image of it.
struct RingFixture {
    seg: Segment,
    geometry: Geometry,
    /// The segment as the daemon created it (header, ring headers), arena excluded.
    pristine: Vec<u8>,
}

const RING_ENTRIES: u32 = 8;
const ARENA_CANARY: u8 = 0xa5;
/// Actions of one ring script that are run (the rest of a longer input is ignored).
const MAX_RING_ACTIONS: usize = 256;

thread_local! {
    static RING_FIXTURE: RefCell<Option<RingFixture>> = const { RefCell::new(None) };
}

fn ring_fixture() -> RingFixture {
    let geometry = Geometry::new(2, RING_ENTRIES, RING_ENTRIES, 8192).expect("fixed geometry");
    let seg = Segment::create(&geometry, 1, sys::getpid(), 1).expect("memfd segment");
    let mut pristine = vec![0u8; geometry.arena_offset as usize];
    seg.read_bytes(0, &mut pristine).expect("read back");
    RingFixture {
        seg,
        geometry,
        pristine,
    }
}

/// Byte ranges `[start, end)` of the pre-arena region a server action may write.
type Allowed = [(u64, u64)];

/// Snapshot the pre-arena region, run `f`, and check that only `allowed` bytes changed.
fn writes_only<R>(
    seg: &Segment,
    pre_arena: u64,
    allowed: &Allowed,
    what: &str,
    f: impl FnOnce() -> R,
) -> R {
    let mut before = vec![0u8; pre_arena as usize];
    seg.read_bytes(0, &mut before).expect("in bounds");
    let r = f();
    let mut after = vec![0u8; pre_arena as usize];
    seg.read_bytes(0, &mut after).expect("in bounds");
    if before == after {
        return r;
    }
    for (i, (x, y)) in before.iter().zip(&after).enumerate() {
        if x != y {
            let i = i as u64;
            assert!(
                allowed.iter().any(|&(s, e)| (s..e).contains(&i)),
                "{what} wrote byte {i} of the segment, outside what it owns"
            );
        }
    }
    r
}

/// Input: a script of engine actions (scribbling over any header or ring byte, including
/// the published indices) and daemon actions (attach a server queue pair, serve a round
/// the way the session loop does: take, validate, complete). Properties:
/// - corrupt indices are `RingCorrupt` errors, never a panic or an out-of-range access,
///   and a forged or stale entry `seq` makes that entry (and what follows) read as not
///   yet written: every entry taken carries the `seq` of the index it was taken at;
/// - a serve round takes no more than asked and posts exactly as many completions as it
///   took (the room `take` reserved is there, with no engine write in between);
/// - the server writes only its submission ring's head, its completion ring's tail,
///   entries and doorbell word: never the header, the other queue pair, or the arena;
/// - every accepted submission's range lies in queue pair 0's arena slice.
///
/// Returns whether any submission was served.
pub fn check_server_rings(data: &[u8]) -> bool {
    RING_FIXTURE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let fx = cell.get_or_insert_with(ring_fixture);
        run_ring_script(fx, data)
    })
}

fn run_ring_script(fx: &RingFixture, data: &[u8]) -> bool {
    let seg = &fx.seg;
    let g = &fx.geometry;
    let q = g.queue_pairs[0];
    let pre_arena = g.arena_offset;
    seg.write_bytes(0, &fx.pristine)
        .expect("reset header and rings");
    seg.write_bytes(
        pre_arena,
        &vec![ARENA_CANARY; (g.segment_bytes - pre_arena) as usize],
    )
    .expect("fill arena");
    let cqe_bytes = std::mem::size_of::<kvp_cqe>() as u64;
    let take_allowed = [(q.sq_offset + HEAD, q.sq_offset + HEAD + 4)];
    let cq_entries = q.cq_offset + ffi::RING_HEADER_BYTES as u64;
    let complete_allowed = [
        (q.cq_offset + TAIL, q.cq_offset + TAIL + 4),
        (q.cq_offset + BELL_WORD, q.cq_offset + BELL_WORD + 4),
        (cq_entries, cq_entries + u64::from(q.cq_entries) * cqe_bytes),
    ];
    let mut server: Option<ServerQueuePair<'_>> = None;
    // The server's submission head as it must be: what it read at attach plus what it took.
    let mut sq_head = 0u32;
    let sq_head_word = seg.atomic_u32(q.sq_offset + HEAD).expect("in bounds");
    let log2_entries = q.sq_entries.trailing_zeros();
    let mut sqes = [kvp_sqe::zeroed(); 2 * RING_ENTRIES as usize];
    let mut served = 0usize;
    let mut b = Bytes(data);
    let mut actions = 0;
    // Long scripts add little over short ones and cost a segment diff per action.
    while !b.is_empty() && actions < MAX_RING_ACTIONS {
        actions += 1;
        match b.u8() % 4 {
            0 => {
                // Engine: scribble over the header and rings (not the arena).
                let offset = u64::from(b.u16()) % pre_arena;
                let len = usize::from(b.u8() % 65).min((pre_arena - offset) as usize);
                let bytes = b.take(len).to_vec();
                seg.write_bytes(offset, &bytes).expect("in bounds");
            }
            1 => {
                // Daemon: (re)attach, reading whatever indices are published now.
                server = match writes_only(seg, pre_arena, &[], "attach", || {
                    ServerQueuePair::new(seg, q, 0)
                }) {
                    Ok(s) => {
                        sq_head = sq_head_word.load(std::sync::atomic::Ordering::Relaxed);
                        Some(s)
                    }
                    Err(ShmError::RingCorrupt { .. }) => None,
                    Err(e) => panic!("attach failed other than RingCorrupt: {e}"),
                };
            }
            2 => {
                let want = usize::from(b.u8()) % (sqes.len() + 1);
                let Some(s) = server.as_mut() else { continue };
                let taken = writes_only(seg, pre_arena, &take_allowed, "take", || {
                    s.take(&mut sqes[..want])
                });
                let n = match taken {
                    Ok(n) => n,
                    Err(ShmError::RingCorrupt { .. }) => {
                        server = None; // the daemon ends such a session
                        continue;
                    }
                    Err(e) => panic!("take failed other than RingCorrupt: {e}"),
                };
                assert!(
                    n <= want && n <= RING_ENTRIES as usize,
                    "took {n} of {want}"
                );
                served += n;
                for (i, sqe) in sqes[..n].iter().enumerate() {
                    let index = sq_head.wrapping_add(i as u32);
                    assert_eq!(
                        sqe.seq,
                        entry_seq(index, log2_entries),
                        "took an entry not published for index {index}"
                    );
                }
                sq_head = sq_head.wrapping_add(n as u32);
                let cqes: Vec<kvp_cqe> = sqes[..n]
                    .iter()
                    .map(|sqe| {
                        assert_accepted_sqe_is_sound(sqe, &q, 1, g.segment_bytes);
                        let status =
                            validate_sqe(sqe, &q, 1).map_or_else(|r| r.status, |_| Status::Ok);
                        completion(sqe.user_data, status)
                    })
                    .collect();
                let posted = writes_only(seg, pre_arena, &complete_allowed, "complete", || {
                    s.complete(&cqes)
                });
                match posted {
                    Ok(k) => assert_eq!(k, n, "room reserved by take was not there"),
                    Err(e) => panic!("complete failed right after take: {e}"),
                }
            }
            _ => {
                if let Some(s) = server.as_ref() {
                    writes_only(seg, pre_arena, &[], "has_submissions", || {
                        s.has_submissions()
                    });
                }
            }
        }
    }
    let mut arena = vec![0u8; (g.segment_bytes - pre_arena) as usize];
    seg.read_bytes(pre_arena, &mut arena).expect("in bounds");
    assert!(
        arena.iter().all(|&x| x == ARENA_CANARY),
        "the server wrote into the arena"
    );
    served > 0
}

/// Scripts an honest engine would produce (submit some entries by writing them with their
/// `seq` and publishing the tail, then let the daemon serve), a hostile one (tail far
/// ahead, completion head garbage), and one forging `seq`s (stale and future laps around
/// a correctly published entry).
pub fn seeds_server_rings() -> Vec<Seed> {
    let g = Geometry::new(2, RING_ENTRIES, RING_ENTRIES, 8192).expect("fixed geometry");
    let q = g.queue_pairs[0];
    let log2_entries = RING_ENTRIES.trailing_zeros();
    let scribble = |out: &mut Vec<u8>, offset: u64, bytes: &[u8]| {
        out.push(0);
        out.extend_from_slice(&(offset as u16).to_le_bytes());
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    };
    let sqe_bytes = std::mem::size_of::<kvp_sqe>() as u64;
    let entry = |i: u64| q.sq_offset + ffi::RING_HEADER_BYTES as u64 + (i % 8) * sqe_bytes;
    let lookup = |user_data: u64, seq: u16| {
        let mut s = crate::client::sqe(Opcode::Lookup, user_data);
        s.count = 1;
        s.arg_len = std::mem::size_of::<kvp_block_op>() as u32;
        s.arg_offset = 64 * (user_data % 8);
        s.seq = seq;
        s
    };
    let mut honest = vec![1u8];
    let mut tail = 0u32;
    for round in 0..3u64 {
        for i in 0..5u64 {
            let s = lookup(round * 10 + i, entry_seq(tail, log2_entries));
            scribble(&mut honest, entry(u64::from(tail)), ffi::as_bytes(&s));
            tail += 1;
        }
        scribble(&mut honest, q.sq_offset + TAIL, &tail.to_le_bytes());
        honest.extend_from_slice(&[3, 2, 16]);
        // The engine drains the completions: head = tail of the completion ring.
        scribble(&mut honest, q.cq_offset + HEAD, &tail.to_le_bytes());
    }
    let mut hostile = vec![1u8];
    scribble(&mut hostile, q.sq_offset + TAIL, &1000u32.to_le_bytes());
    hostile.extend_from_slice(&[2, 8, 1]);
    scribble(&mut hostile, q.cq_offset + HEAD, &u32::MAX.to_le_bytes());
    hostile.extend_from_slice(&[1, 2, 8]);
    // Slot 0 published for lap 1 (taken), slot 1 claiming lap 0xffff (stale: the take
    // stops there), then slot 1 republished correctly and slot 2 from a future lap.
    let mut forged = vec![1u8];
    scribble(&mut forged, entry(0), ffi::as_bytes(&lookup(1, 1)));
    scribble(&mut forged, entry(1), ffi::as_bytes(&lookup(2, 0xffff)));
    forged.extend_from_slice(&[2, 16, 3]);
    scribble(&mut forged, entry(1), ffi::as_bytes(&lookup(2, 1)));
    scribble(&mut forged, entry(2), ffi::as_bytes(&lookup(3, 5)));
    forged.extend_from_slice(&[3, 2, 16]);
    vec![
        ("seed-honest-engine".into(), honest),
        ("seed-hostile-indices".into(), hostile),
        ("seed-forged-seq".into(), forged),
    ]
}

// ---------------------------------------------------------------------------------------
// attach_request
// ---------------------------------------------------------------------------------------

/// Input: what to send along (byte 0: no descriptor, a sealed memfd of 4 KiB, /dev/null,
/// an unsealed memfd of 4 KiB, or a sealed hugetlb memfd of 2 MiB), then the request bytes
/// and region bytes, sent over a real Unix socket pair: the request in one message, each
/// 128-byte region in one more, the descriptor with the first region (or with the request
/// when there is none); a short input is a peer hanging up mid-request. Properties of an
/// accepted request: every namespace obeys the name rule and there are at most
/// `MAX_NAMESPACES_PER_SESSION`; as many regions as announced (at most `MAX_KV_REGIONS`),
/// each inside its allocation, not empty, with a descriptor exactly when its kind carries
/// one; a host memfd region's descriptor is a shrink-sealed memfd of exactly its
/// `alloc_bytes`; the numbers are the ones sent. Returns whether the request was accepted.
pub fn check_attach_request(data: &[u8]) -> bool {
    let mut b = Bytes(data);
    let fd_kind = b.u8() % 5;
    let body = b.0;
    let (ours, daemon) = UnixStream::pair().expect("socketpair");
    let fd: Option<OwnedFd> = match fd_kind {
        0 => None,
        1 => Some(sys::memfd_create_sealed("kvplane-fuzz", 4096).expect("memfd")),
        2 => Some(std::fs::File::open("/dev/null").expect("/dev/null").into()),
        3 => Some(fuzz_memfd(libc::MFD_ALLOW_SEALING, 4096)),
        _ => {
            let fd = fuzz_memfd(libc::MFD_HUGETLB | libc::MFD_ALLOW_SEALING, 2 << 20);
            sys::seal_no_shrink(fd.as_raw_fd()).expect("seal hugetlb memfd");
            Some(fd)
        }
    };
    let sent = &body[..body.len().min(MAX_ATTACH_BYTES)];
    let (head, regions) = sent.split_at(sent.len().min(REQUEST_BYTES));
    let mut fd_left = fd.as_ref().map(|f| f.as_raw_fd());
    if !head.is_empty() {
        let with = if regions.is_empty() {
            fd_left.take()
        } else {
            None
        };
        sys::send_with_fd(&ours, head, with).expect("send");
    }
    for chunk in regions.chunks(REGION_BYTES) {
        // A peer may hang up before reading everything: a failed send is fine.
        let _ = sys::send_with_fd(&ours, chunk, fd_left.take());
    }
    drop(ours); // a short request then reads as the peer hanging up
    let Ok(req) = read_request(&daemon) else {
        return false;
    };
    assert!(head.len() == REQUEST_BYTES, "accepted a short request");
    let raw: kvp_attach_request = ffi::read_pod(head).expect("full request");
    assert_eq!(raw.magic, ffi::MAGIC);
    assert_eq!(raw.abi_version, ffi::ABI_VERSION);
    assert!(req.namespaces.len() <= ffi::MAX_NAMESPACES_PER_SESSION);
    assert_eq!(req.namespaces.len(), raw.num_namespaces as usize);
    for n in &req.namespaces {
        assert!(valid_namespace_name(n), "accepted namespace {n:?}");
    }
    assert_eq!(
        (
            req.num_queue_pairs,
            req.sq_entries,
            req.cq_entries,
            req.arena_bytes
        ),
        (
            raw.num_queue_pairs,
            raw.sq_entries,
            raw.cq_entries,
            raw.arena_bytes
        )
    );
    assert_eq!(req.kv_regions.len(), raw.num_kv_regions as usize);
    assert!(req.kv_regions.len() <= ffi::MAX_KV_REGIONS);
    assert!(regions.len() >= req.kv_regions.len() * REGION_BYTES);
    let fds: usize = req.kv_regions.iter().filter(|r| r.fd.is_some()).count();
    assert!(fds <= usize::from(fd_kind != 0), "one descriptor was sent");
    for (i, r) in req.kv_regions.iter().enumerate() {
        let d = &r.desc;
        let sent: kvp_kv_region =
            ffi::read_pod(&regions[i * REGION_BYTES..]).expect("region bytes");
        assert_eq!(
            ffi::as_bytes(d),
            ffi::as_bytes(&sent),
            "region #{i} as sent"
        );
        assert!(d.len_bytes > 0 && d.offset_bytes + d.len_bytes <= d.alloc_bytes);
        assert_eq!(r.fd.is_some(), r.kind.carries_fd(), "region #{i}");
        assert_eq!(d.flags & !ffi::REGION_F_CONTINUES, 0, "region #{i}: flags");
        if d.flags & ffi::REGION_F_CONTINUES != 0 {
            // It continues a region it can be mapped right after.
            assert!(i > 0, "the first region continues nothing");
            let prev = &req.kv_regions[i - 1];
            assert_ne!(r.kind, RegionKind::CudaIpc, "region #{i}");
            assert_eq!(prev.kind, r.kind, "region #{i}");
            assert_eq!(prev.desc.gpu_uuid, d.gpu_uuid, "region #{i}");
            assert_eq!(
                prev.desc.offset_bytes + prev.desc.len_bytes,
                prev.desc.alloc_bytes,
                "region #{i}"
            );
            assert_eq!(d.offset_bytes, 0, "region #{i}");
        }
        if r.kind == RegionKind::HostMemfd {
            let fd = r.fd.as_ref().expect("checked above").as_raw_fd();
            assert!(
                fd_kind == 1 || fd_kind == 4,
                "only the sealed memfds may be accepted (kind {fd_kind})"
            );
            assert_eq!(sys::fd_size(fd).expect("fstat"), d.alloc_bytes);
            let seals = sys::memfd_seals(fd).expect("seals");
            assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
            let want = if fd_kind == 1 {
                sys::Backing::Shmem
            } else {
                sys::Backing::Hugetlb
            };
            assert_eq!(
                r.backing,
                Some(want),
                "the daemon decides on hugetlb by this"
            );
        }
    }
    // The engine's encoder reproduces what was accepted.
    let names: Vec<&str> = req.namespaces.iter().map(String::as_str).collect();
    let again = build_request(
        req.num_queue_pairs,
        req.sq_entries,
        req.cq_entries,
        req.arena_bytes,
        &names,
        req.kv_regions.len(),
    )
    .expect("an accepted request re-encodes");
    for (i, name) in names.iter().enumerate() {
        // Through the terminating NUL; what follows it is ignored by the parser.
        let n = name.len() + 1;
        assert_eq!(
            again.namespaces[i][..n],
            raw.namespaces[i][..n],
            "{name}: bytes differ"
        );
    }
    true
}

/// A memfd of `bytes` with `flags` (for the descriptors a fuzzed request carries).
fn fuzz_memfd(flags: u32, bytes: u64) -> OwnedFd {
    let file = std::fs::File::from(sys::memfd_create("kvplane-fuzz", flags).expect("memfd_create"));
    file.set_len(bytes).expect("size the memfd");
    file.into()
}

/// Requests the engine's `build_request` makes: with and without KV regions (host memfds
/// and GPU handles), with several namespaces, and with the maximum number.
pub fn seeds_attach_request() -> Vec<Seed> {
    let with = |fd_kind: u8, req: kvp_attach_request, regions: &[kvp_kv_region]| {
        let mut v = vec![fd_kind];
        v.extend_from_slice(ffi::as_bytes(&req));
        for r in regions {
            v.extend_from_slice(ffi::as_bytes(r));
        }
        v
    };
    let many: Vec<String> = (0..ffi::MAX_NAMESPACES_PER_SESSION)
        .map(|i| format!("tenant-{i}/model@lora.{i}:v1"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let req = |names: &[&str], regions: usize| {
        build_request(4, 256, 256, 1 << 20, names, regions).expect("valid")
    };
    let memfd = kvp_kv_region::host_memfd(4096);
    let ipc = kvp_kv_region::cuda_ipc([0xab; 64], [0x5a; 16], 1 << 30, 1 << 20, 1 << 29);
    let vmm = kvp_kv_region::cuda_vmm_fd([0x5a; 16], 2 << 20, 0, 2 << 20);
    vec![
        ("seed-plain".into(), with(0, req(&["default"], 0), &[])),
        (
            "seed-kv-buffer".into(),
            with(1, req(&["tenant-a/llama-70b"], 1), &[memfd]),
        ),
        (
            "seed-unsealed-buffer".into(),
            with(2, req(&["a", "b"], 1), &[memfd]),
        ),
        ("seed-max-namespaces".into(), with(0, req(&many, 0), &[])),
        (
            "seed-shrinkable-memfd".into(),
            with(3, req(&["tenant-a/llama-70b"], 1), &[memfd]),
        ),
        (
            "seed-hugetlb-memfd".into(),
            with(
                4,
                req(&["tenant-a/llama-70b"], 1),
                &[kvp_kv_region::host_memfd(2 << 20)],
            ),
        ),
        (
            "seed-gpu-regions".into(),
            with(1, req(&["tenant-a/llama-70b"], 3), &[ipc, memfd, ipc]),
        ),
        (
            "seed-vmm-region".into(),
            with(2, req(&["tenant-a/llama-70b"], 2), &[vmm, ipc]),
        ),
    ]
}
