//! KV memory regions (ABI 2): an engine that keeps each layer's K and V in tensors of
//! their own registers them as regions and a layout naming (region, offset) per layer and
//! plane; the daemon gathers and scatters them in place. Blocks saved from such an engine
//! load byte for byte into an engine with one buffer and the other way round; GPU regions
//! on the host backend refuse that attach only; layouts that leave their regions are
//! refused and leave the attached one in place.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{BLOCK_BYTES, LAYERS, PAGE_BYTES, PAGES};
use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::{Opcode, Status, kvp_block_op, kvp_cqe, kvp_kv_layout, kvp_kv_region};
use kvplane_shm::handshake::EngineRegion;
use kvplane_shm::{AttachOptions, QueuePair, Segment, Session, ShmError, client, sys};

/// Bytes of one (layer, plane) of the whole pool.
const PLANE_BYTES: u64 = PAGES * PAGE_BYTES;
/// Where the first region's tensor starts inside its memfd (a region need not be a whole
/// allocation).
const REGION0_OFFSET: u64 = 8192;
/// Bytes of one memfd of `Engine::chunked`'s pool: 10 engine pages (20 KiB), so planes
/// (16 pages) run across chunk boundaries, rounded up to whole memory pages (a continued
/// memfd must be whole pages).
fn chunk_bytes() -> u64 {
    (10 * PAGE_BYTES).next_multiple_of(sys::page_bytes() as u64)
}

/// An engine and where each (layer, plane) of its pool lives: `planes[k]` is (segment,
/// offset of page 0) for k = 2 * layer + plane, the block's packing order.
struct Engine {
    _session: Session,
    qp: QueuePair,
    segs: Vec<Segment>,
    planes: Vec<(usize, u64)>,
    /// The pool is `segs` back to back, `chunk_bytes` each (`Engine::chunked`): a plane's
    /// offset is then into the whole run.
    chunk_bytes: Option<u64>,
    user_data: u64,
}

fn pattern(hash: u64) -> Vec<u8> {
    (0..BLOCK_BYTES)
        .map(|i| (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 53)) as u8 ^ (i as u8))
        .collect()
}

fn attach_layout(qp: &mut QueuePair, l: &kvp_kv_layout) -> kvp_cqe {
    qp.write_arena(0, kvplane_ffi::as_bytes(l)).unwrap();
    let mut s = client::sqe(Opcode::AttachLayout, u64::MAX - 1);
    s.arg_len = std::mem::size_of::<kvp_kv_layout>() as u32;
    qp.call(s, Duration::from_secs(10)).expect("layout")
}

/// The standard geometry with each (layer, plane) in region `3 - k` at offset 0: the
/// regions come in the reverse order of the planes, so a mix-up of index and plane shows.
fn per_tensor_layout() -> kvp_kv_layout {
    let mut l = kvplane_kernels::layout::planes_per_layer(LAYERS as u32, 16, 1, 128, PAGES);
    for layer in 0..LAYERS {
        for p in 0..2 {
            let k = 2 * layer + p;
            l.plane_region[p][layer] = (2 * LAYERS - 1 - k) as u16;
            l.plane_offset[p][layer] = 0;
        }
    }
    l.buffer_bytes = 0; // ignored: the daemon knows each region's length
    l
}

impl Engine {
    /// One memfd, one region, the layout of `common` (every plane in region 0).
    fn single(socket: &Path) -> Engine {
        let (session, qp, kv) = common::attach_with_kv(socket, "regions");
        Engine {
            _session: session,
            qp,
            segs: vec![kv],
            planes: (0..2 * LAYERS as u64)
                .map(|k| (0, k * PLANE_BYTES))
                .collect(),
            chunk_bytes: None,
            user_data: 1,
        }
    }

    /// The one-buffer layout over a pool in memfds of `CHUNK_BYTES` each, as an allocator
    /// that maps its memory in chunks hands it out (PyTorch's expandable segments on a
    /// GPU): each chunk a region continuing the one before, so planes run across chunks.
    fn chunked(socket: &Path) -> Engine {
        let pool = 2 * LAYERS as u64 * PLANE_BYTES;
        let chunk = chunk_bytes();
        let chunks = pool.div_ceil(chunk);
        let mut o = AttachOptions::new(socket);
        o.namespaces = vec!["regions".into()];
        let mut segs = Vec::new();
        for c in 0..chunks {
            let fd = sys::memfd_create_sealed("kv-chunk", chunk).unwrap();
            segs.push(Segment::map_fd(fd.try_clone().unwrap(), chunk).unwrap());
            let mut desc = kvp_kv_region::host_memfd(chunk);
            if c > 0 {
                desc.flags = kvplane_ffi::REGION_F_CONTINUES;
            }
            o.kv_regions.push(EngineRegion { desc, fd: Some(fd) });
        }
        let mut session = Session::attach(o).expect("attach");
        let mut qp = session.take_queue_pairs().unwrap().remove(0);
        let mut l = kvplane_kernels::layout::planes_per_layer(LAYERS as u32, 16, 1, 128, PAGES);
        l.buffer_bytes = 0;
        let c = attach_layout(&mut qp, &l);
        assert_eq!(c.status, Status::Ok.raw(), "layout: {c:?}");
        Engine {
            _session: session,
            qp,
            segs,
            planes: (0..2 * LAYERS as u64)
                .map(|k| (0, k * PLANE_BYTES))
                .collect(),
            chunk_bytes: Some(chunk),
            user_data: 1,
        }
    }

    /// A memfd per (layer, plane), as per-layer K and V tensors; region 0 starts
    /// REGION0_OFFSET bytes into its memfd.
    fn per_tensor(socket: &Path) -> Engine {
        let regions = 2 * LAYERS;
        let mut o = AttachOptions::new(socket);
        o.namespaces = vec!["regions".into()];
        let mut segs = Vec::new();
        for r in 0..regions {
            let offset = if r == 0 { REGION0_OFFSET } else { 0 };
            let alloc = offset + PLANE_BYTES;
            let fd = sys::memfd_create_sealed("kv-tensor", alloc).unwrap();
            segs.push(Segment::map_fd(fd.try_clone().unwrap(), alloc).unwrap());
            let mut desc = kvp_kv_region::host_memfd(alloc);
            desc.offset_bytes = offset;
            desc.len_bytes = PLANE_BYTES;
            o.kv_regions.push(EngineRegion { desc, fd: Some(fd) });
        }
        let mut session = Session::attach(o).expect("attach");
        let mut qp = session.take_queue_pairs().unwrap().remove(0);
        let c = attach_layout(&mut qp, &per_tensor_layout());
        assert_eq!(c.status, Status::Ok.raw(), "layout: {c:?}");
        let planes = (0..regions)
            .map(|k| {
                let r = regions - 1 - k;
                (r, if r == 0 { REGION0_OFFSET } else { 0 })
            })
            .collect();
        Engine {
            _session: session,
            qp,
            segs,
            planes,
            chunk_bytes: None,
            user_data: 1,
        }
    }

    fn at(&self, k: usize, page: u32) -> (&Segment, u64) {
        let (seg, base) = self.planes[k];
        let at = base + u64::from(page) * PAGE_BYTES;
        match self.chunk_bytes {
            // A page never straddles chunks: they are whole pages of the pool.
            Some(c) => (&self.segs[(at / c) as usize], at % c),
            None => (&self.segs[seg], at),
        }
    }

    fn fill(&self, page: u32, bytes: &[u8]) {
        for k in 0..2 * LAYERS {
            let (seg, off) = self.at(k, page);
            let part = &bytes[k * PAGE_BYTES as usize..(k + 1) * PAGE_BYTES as usize];
            seg.write_bytes(off, part).unwrap();
        }
    }

    fn read(&self, page: u32) -> Vec<u8> {
        let mut out = vec![0u8; BLOCK_BYTES as usize];
        for k in 0..2 * LAYERS {
            let (seg, off) = self.at(k, page);
            let part = &mut out[k * PAGE_BYTES as usize..(k + 1) * PAGE_BYTES as usize];
            seg.read_bytes(off, part).unwrap();
        }
        out
    }

    /// One op over a chain of `hashes` in pages `first_page..`.
    fn blocks(&mut self, op: Opcode, hashes: &[u64], first_page: u32) -> kvp_cqe {
        let mut arg = Vec::new();
        for (i, &h) in hashes.iter().enumerate() {
            let parent = if i == 0 { 0 } else { hashes[i - 1] };
            let o = kvp_block_op::new(h, parent, first_page + i as u32);
            arg.extend_from_slice(kvplane_ffi::as_bytes(&o));
        }
        self.qp.write_arena(0, &arg).unwrap();
        let mut s = client::sqe(op, self.user_data);
        self.user_data += 1;
        s.arg_len = arg.len() as u32;
        s.count = hashes.len() as u32;
        self.qp
            .call(s, Duration::from_secs(10))
            .expect("completion")
    }

    /// Saves `hashes` from pages 0.. filled with their patterns.
    fn save(&mut self, hashes: &[u64]) {
        for (i, &h) in hashes.iter().enumerate() {
            self.fill(i as u32, &pattern(h));
        }
        let c = self.blocks(Opcode::Save, hashes, 0);
        assert_eq!(
            (c.status, c.blocks as usize),
            (Status::Ok.raw(), hashes.len()),
            "save: {c:?}"
        );
    }

    /// Loads `hashes` into poisoned pages `first_page..` and checks every byte.
    fn load_and_check(&mut self, hashes: &[u64], first_page: u32) {
        for i in 0..hashes.len() as u32 {
            self.fill(first_page + i, &vec![0xEE; BLOCK_BYTES as usize]);
        }
        let c = self.blocks(Opcode::Load, hashes, first_page);
        assert_eq!(
            (c.status, c.blocks as usize),
            (Status::Ok.raw(), hashes.len()),
            "load: {c:?}"
        );
        for (i, &h) in hashes.iter().enumerate() {
            assert!(
                self.read(first_page + i as u32) == pattern(h),
                "block {i} loaded into page {} differs",
                first_page + i as u32
            );
        }
    }
}

fn daemon(dir: &Path) -> kvplane_daemon::session::Daemon {
    let (daemon, _blocks) = common::start(common::config(dir, EngineKind::Sync), None);
    daemon
}

#[test]
fn per_tensor_regions_and_one_buffer_exchange_blocks_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let socket = dir.path().join("kvplane.sock");
    let mut tensors = Engine::per_tensor(&socket);
    let mut single = Engine::single(&socket);

    let a: Vec<u64> = (1..=4).map(|i| 0xA000 + i).collect();
    tensors.save(&a);
    single.load_and_check(&a, 8);

    let b: Vec<u64> = (1..=4).map(|i| 0xB000 + i).collect();
    single.save(&b);
    tensors.load_and_check(&b, 10);

    // Region 0 starts REGION0_OFFSET bytes into its memfd: nothing before it was touched.
    let mut head = vec![0xFFu8; REGION0_OFFSET as usize];
    tensors.segs[0].read_bytes(0, &mut head).unwrap();
    assert!(
        head.iter().all(|&b| b == 0),
        "bytes before region 0 written"
    );
    drop(daemon);
}

/// A pool in chunks, each a region continuing the one before (the host stand-in for
/// PyTorch's expandable segments): the daemon maps them back to back, planes run across
/// chunk boundaries, and blocks go both ways with a one-buffer engine byte for byte.
#[test]
fn a_pool_in_continuing_chunks_exchanges_blocks_with_one_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let socket = dir.path().join("kvplane.sock");
    let mut chunked = Engine::chunked(&socket);
    let mut single = Engine::single(&socket);
    assert!(chunked.segs.len() >= 6, "{} chunks", chunked.segs.len());

    let a: Vec<u64> = (1..=PAGES / 2).map(|i| 0xC000 + i).collect();
    chunked.save(&a);
    single.load_and_check(&a, (PAGES / 2) as u32);
    let b: Vec<u64> = (1..=PAGES / 2).map(|i| 0xD000 + i).collect();
    single.save(&b);
    chunked.load_and_check(&b, (PAGES / 2) as u32);

    // A layout may name any region of a run and address on to the run's end, not past it.
    let chunk = chunk_bytes();
    let pool = 2 * LAYERS as u64 * PLANE_BYTES;
    let run = chunked.segs.len() as u64 * chunk;
    let mut l = kvplane_kernels::layout::planes_per_layer(LAYERS as u32, 16, 1, 128, PAGES);
    l.buffer_bytes = 0;
    let last = 2 * LAYERS - 1; // (layer LAYERS - 1, V)
    let (p, layer) = (last % 2, last / 2);
    l.plane_region[p][layer] = 1;
    l.plane_offset[p][layer] = last as u64 * PLANE_BYTES - chunk;
    assert_eq!(
        attach_layout(&mut chunked.qp, &l).status,
        Status::Ok.raw(),
        "from region 1"
    );
    l.plane_offset[p][layer] = run - chunk - PLANE_BYTES + 1;
    assert!(run >= pool);
    let c = attach_layout(&mut chunked.qp, &l);
    assert_eq!(
        c.status,
        Status::BadArg.raw(),
        "one byte past the run: {c:?}"
    );

    // Without the flag, each chunk is a region of its own and planes may not cross.
    let mut o = AttachOptions::new(&socket);
    o.namespaces = vec!["regions".into()];
    for _ in 0..chunked.segs.len() {
        let fd = sys::memfd_create_sealed("kv-chunk", chunk_bytes()).unwrap();
        o.kv_regions
            .push(EngineRegion::host_memfd(fd, chunk_bytes()));
    }
    let mut session = Session::attach(o).expect("attach");
    let mut qp = session.take_queue_pairs().unwrap().remove(0);
    let mut l = kvplane_kernels::layout::planes_per_layer(LAYERS as u32, 16, 1, 128, PAGES);
    l.buffer_bytes = 0;
    let c = attach_layout(&mut qp, &l);
    assert_eq!(
        c.status,
        Status::BadArg.raw(),
        "layout across separate regions: {c:?}"
    );
    drop(daemon);
}

/// A memfd that is not a whole number of pages cannot be continued: the next one would
/// be mapped after a gap.
#[test]
fn a_region_cannot_continue_a_memfd_of_part_pages() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let socket = dir.path().join("kvplane.sock");
    let mut o = AttachOptions::new(&socket);
    o.namespaces = vec!["regions".into()];
    let fd = sys::memfd_create_sealed("kv-odd", 6000).unwrap();
    o.kv_regions.push(EngineRegion::host_memfd(fd, 6000));
    let fd = sys::memfd_create_sealed("kv-next", 8192).unwrap();
    let mut desc = kvp_kv_region::host_memfd(8192);
    desc.flags = kvplane_ffi::REGION_F_CONTINUES;
    o.kv_regions.push(EngineRegion { desc, fd: Some(fd) });
    match Session::attach(o) {
        Err(ShmError::AttachRefused { message, .. }) => assert!(
            message.contains("KV region #1: continues #0 but cannot follow it (not whole pages"),
            "{message}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(daemon);
}

#[test]
fn gpu_regions_on_the_host_backend_refuse_that_attach_only() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let socket = dir.path().join("kvplane.sock");
    let ipc = kvp_kv_region::cuda_ipc([1; 64], [2; 16], 1 << 20, 0, 1 << 20);
    let vmm = kvp_kv_region::cuda_vmm_fd([2; 16], 2 << 20, 0, 2 << 20);
    let attach = |regions: Vec<EngineRegion>| {
        let mut o = AttachOptions::new(&socket);
        o.namespaces = vec!["regions".into()];
        o.kv_regions = regions;
        Session::attach(o)
    };
    let memfd = || sys::memfd_create_sealed("kv", PLANE_BYTES).unwrap();
    let cases: Vec<(Vec<EngineRegion>, &str)> = vec![
        (
            vec![EngineRegion {
                desc: ipc,
                fd: None,
            }],
            "KV region #0: GPU memory",
        ),
        (
            vec![EngineRegion {
                desc: vmm,
                fd: Some(memfd()),
            }],
            "KV region #0: GPU memory",
        ),
        (
            vec![
                EngineRegion::host_memfd(memfd(), PLANE_BYTES),
                EngineRegion {
                    desc: ipc,
                    fd: None,
                },
            ],
            "KV region #1: GPU memory",
        ),
    ];
    for (regions, want) in cases {
        match attach(regions) {
            Err(ShmError::AttachRefused { status, message }) => {
                assert_eq!(status, Status::Unsupported.raw(), "{message}");
                assert!(message.contains(want), "{message:?} lacks {want:?}");
                assert!(message.contains("host backend"), "{message}");
            }
            Err(e) => panic!("expected a refusal naming the region, got {e}"),
            Ok(_) => panic!("a GPU region was accepted by the host backend"),
        }
    }
    // The daemon serves everyone else as before.
    let mut engine = Engine::single(&socket);
    let h = [0xC001, 0xC002];
    engine.save(&h);
    engine.load_and_check(&h, 4);
    drop(daemon);
}

#[test]
fn layouts_that_leave_their_regions_are_refused_and_the_old_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path());
    let socket = dir.path().join("kvplane.sock");
    let mut engine = Engine::per_tensor(&socket);
    let good = per_tensor_layout();
    let refused = |engine: &mut Engine, l: kvp_kv_layout, detail: u32, what: &str| {
        let c = attach_layout(&mut engine.qp, &l);
        assert_eq!(
            (c.status, c.detail),
            (Status::BadArg.raw(), detail),
            "{what}: {c:?}"
        );
    };
    // A region index past the four registered.
    let mut l = good;
    l.plane_region[1][1] = 4;
    refused(&mut engine, l, 3, "region index 4 of 4");
    // Inside the window (region 1 follows region 0) but past region 0's end.
    let mut l = good;
    let k_in_region0 = (0..2 * LAYERS).find(|&k| engine.planes[k].0 == 0).unwrap();
    l.plane_offset[k_in_region0 % 2][k_in_region0 / 2] = PAGE_BYTES;
    refused(&mut engine, l, 3, "one page past region 0");
    // Geometry: three planes.
    let mut l = good;
    l.kv_planes = 3;
    refused(&mut engine, l, 2, "kv_planes 3");
    // What the engine writes in buffer_bytes is ignored either way.
    let mut l = good;
    l.buffer_bytes = 1;
    assert_eq!(attach_layout(&mut engine.qp, &l).status, Status::Ok.raw());
    // The attached layout still moves the right bytes.
    let h = [0xD001, 0xD002, 0xD003];
    engine.save(&h);
    engine.load_and_check(&h, 12);
    drop(daemon);
}

#[test]
fn sessions_coming_and_going_do_not_grow_the_devices_stream_table() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, blocks) = common::start(common::config(dir.path(), EngineKind::Sync), None);
    let socket = dir.path().join("kvplane.sock");
    let device = std::sync::Arc::clone(&blocks.stores().device);
    // The table's size now: a new stream takes the next slot, and is freed again.
    let first = device.create_stream().unwrap();
    device.destroy_stream(first).unwrap();
    const SESSIONS: u32 = 40;
    for _ in 0..SESSIONS {
        let mut engine = Engine::per_tensor(&socket);
        engine.save(&[0xE001]);
        drop(engine);
    }
    // Each session's stream goes when the daemon reclaims it. Wait for that first: a probe
    // while sessions still hold streams would push the table up itself (and freed ids are
    // reused last-in first-out, so the probe would keep getting its own high ones back).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon.sessions().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} sessions never ended",
            daemon.sessions().len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Without the streams destroyed, the 40 sessions' streams fill 40 slots past `first`
    // and every new stream takes one more; with it, all came back and new streams take
    // the freed ones.
    let held: Vec<_> = (0..SESSIONS)
        .map(|_| device.create_stream().unwrap())
        .collect();
    let highest = held.iter().map(|s| s.raw_for_tests()).max().unwrap();
    for s in held {
        device.destroy_stream(s).unwrap();
    }
    assert!(
        highest < first.raw_for_tests() + SESSIONS,
        "{SESSIONS} new streams reach id {highest} (first {first:?}): ended sessions' streams were not destroyed"
    );
    drop(daemon);
}
