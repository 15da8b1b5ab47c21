//! The device layer on this machine: the cuda backend reports the missing driver
//! clearly (and the fallback picks the host), and the host backend runs the whole Device
//! surface on random data against plain Rust references.

use kvplane_cuda::cuda::{CudaDevice, driver_present, topology};
use kvplane_cuda::host::HostDevice;
use kvplane_cuda::{BackendChoice, BackendKind, Device, DeviceError, SlotArena, SlotStore, open};
use kvplane_ffi::{kvp_copy_desc, kvp_kv_layout};
use kvplane_kernels::{KernelError, PagedLayout, checksum64};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::ptr::NonNull;
use std::sync::Arc;

#[test]
fn cuda_backend_reports_no_driver_and_falls_back_to_host() {
    if driver_present() {
        // A machine with a driver: opening must work or fail with a driver error, and
        // the check example covers the rest.
        match CudaDevice::open(0) {
            Ok(dev) => assert_eq!(dev.backend(), BackendKind::Cuda),
            Err(e) => assert!(!matches!(e, DeviceError::NoDriver), "{e}"),
        }
        return;
    }
    let err = CudaDevice::open(0).expect_err("no driver here");
    assert!(matches!(err, DeviceError::NoDriver));
    let msg = err.to_string();
    assert!(msg.contains("no NVIDIA driver"), "{msg}");
    assert!(
        msg.contains("host backend"),
        "the message says what to do: {msg}"
    );
    assert!(matches!(
        open(BackendChoice::Cuda { ordinal: 0 }),
        Err(DeviceError::NoDriver)
    ));
    let opened = open(BackendChoice::CudaOrHost { ordinal: 0 }).expect("fallback");
    assert_eq!(opened.device.backend(), BackendKind::Host);
    assert!(
        opened
            .fallback_reason
            .as_deref()
            .is_some_and(|r| r.contains("no NVIDIA driver"))
    );
    assert!(opened.device.describe().contains("host backend"));
    // NVML without a driver: an error, not a panic.
    assert!(topology().is_err());
}

fn vllm_layout(layers: u32, pages: u64, tokens: u32, heads: u32, head_bytes: u32) -> kvp_kv_layout {
    // SAFETY: plain old data; all-zero is valid.
    let mut l: kvp_kv_layout = unsafe { std::mem::zeroed() };
    l.num_layers = layers;
    l.kv_planes = 2;
    l.page_tokens = tokens;
    l.kv_heads = heads;
    l.head_bytes = head_bytes;
    l.dtype_bytes = 2;
    l.num_pages = pages;
    l.head_stride_bytes = u64::from(head_bytes);
    l.token_stride_bytes = u64::from(heads * head_bytes);
    l.page_stride_bytes = u64::from(tokens) * l.token_stride_bytes;
    let plane = pages * l.page_stride_bytes;
    for layer in 0..layers as usize {
        l.plane_offset[0][layer] = 2 * layer as u64 * plane;
        l.plane_offset[1][layer] = (2 * layer as u64 + 1) * plane;
    }
    l.buffer_bytes = 2 * u64::from(layers) * plane;
    l
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

#[test]
fn host_backend_save_and_load_through_a_slot_arena() {
    let dev = Arc::new(HostDevice::new());
    let stream = dev.create_stream().expect("stream");
    let raw = vllm_layout(4, 12, 16, 2, 128);
    let layout = PagedLayout::new(&raw).expect("valid");
    let block_bytes = layout.info().block_bytes as usize;
    let mut engine_mem = random(raw.buffer_bytes as usize, 1);
    let original = engine_mem.clone();
    // SAFETY: engine_mem outlives the registration (freed below before it drops) and is
    // not touched by this test while registered except through the device.
    let engine = unsafe {
        dev.register_host_memory(
            NonNull::new(engine_mem.as_mut_ptr()).unwrap(),
            engine_mem.len(),
        )
    }
    .expect("register");
    let lid = dev.upload_layout(&layout).expect("layout");
    let arena = SlotArena::new(dev.clone(), 8 * block_bytes as u64, block_bytes).expect("arena");
    assert_eq!(arena.slot_count(), 8);
    // Slots are padded to 256 bytes; with block_bytes a multiple of 256 they are packed.
    assert_eq!(arena.slot_stride_bytes(), block_bytes as u64);

    // Save pages 5, 2, 11 into slots 6, 0, 3 (one launch), checksum them there.
    let pages = [5u32, 2, 11];
    let slot_offsets: Vec<u64> = [6, 0, 3]
        .iter()
        .map(|s| arena.slot_at(*s).expect("slot").1)
        .collect();
    dev.gather_to_slots(stream, engine, lid, &pages, arena.buffer(), &slot_offsets)
        .expect("gather");
    let descs: Vec<kvp_copy_desc> = slot_offsets
        .iter()
        .map(|o| kvp_copy_desc {
            src_offset: *o,
            dst_offset: 0,
            bytes: block_bytes as u64,
        })
        .collect();
    let sums = dev
        .checksum(stream, arena.buffer(), &descs)
        .expect("checksum");
    let key = [0x5Au8; 32];
    let macs = dev.mac(stream, arena.buffer(), &descs, &key).expect("mac");
    for (i, o) in slot_offsets.iter().enumerate() {
        let mut block = vec![0u8; block_bytes];
        dev.copy_to_host(
            stream,
            arena.buffer().range(*o as usize, block_bytes),
            &mut block,
        )
        .expect("to host");
        assert_eq!(sums[i], checksum64(&block));
        assert_eq!(
            macs[i],
            *blake3::keyed_hash(&key, &block).as_bytes(),
            "the device MAC of slot block {i} is the NVMe tier's"
        );
        // Each block starts with its page's layer-0 K run.
        let at =
            raw.plane_offset[0][0] as usize + pages[i] as usize * raw.page_stride_bytes as usize;
        assert_eq!(block[..64], original[at..at + 64]);
    }

    // Move the blocks to slots 1, 2, 4 with one batched copy, then load them into other
    // engine pages: pages 0, 1, 3 now hold what 5, 2, 11 held.
    let moved: Vec<u64> = [1, 2, 4]
        .iter()
        .map(|s| arena.slot_at(*s).expect("slot").1)
        .collect();
    let copy_descs: Vec<kvp_copy_desc> = slot_offsets
        .iter()
        .zip(&moved)
        .map(|(src, dst)| kvp_copy_desc {
            src_offset: *src,
            dst_offset: *dst,
            bytes: block_bytes as u64,
        })
        .collect();
    dev.copy_batch(stream, arena.buffer(), arena.buffer(), &copy_descs)
        .expect("copy");
    dev.scatter_from_slots(stream, engine, lid, &[0, 1, 3], arena.buffer(), &moved)
        .expect("scatter");
    let ev = dev.record_event(stream).expect("event");
    dev.stream_wait_event(stream, ev).expect("wait");
    dev.sync_event(ev).expect("sync");
    dev.destroy_event(ev).expect("destroy");
    dev.sync_stream(stream).expect("sync");
    dev.free(engine).expect("unregister");
    let page_run = |mem: &[u8], page: usize| {
        let mut v = Vec::new();
        for layer in 0..4 {
            for plane in 0..2 {
                let at =
                    raw.plane_offset[plane][layer] as usize + page * raw.page_stride_bytes as usize;
                v.extend_from_slice(&mem[at..at + raw.page_stride_bytes as usize]);
            }
        }
        v
    };
    for (dst, src) in [(0, 5), (1, 2), (3, 11)] {
        assert!(
            page_run(&engine_mem, dst) == page_run(&original, src),
            "page {dst}"
        );
    }
    for untouched in [2, 4, 5, 6, 7, 8, 9, 10, 11] {
        assert!(page_run(&engine_mem, untouched) == page_run(&original, untouched));
    }
    // Dropping the arena frees its allocation.
    let buf = arena.buffer();
    drop(arena);
    assert!(matches!(
        dev.copy_to_host(stream, buf.range(0, 1), &mut [0u8]),
        Err(DeviceError::UnknownHandle { what: "buffer", .. })
    ));
}

#[test]
fn host_backend_rejects_bad_handles_and_ranges() {
    let dev = HostDevice::new();
    let s = dev.create_stream().expect("stream");
    let a = dev.alloc(1000).expect("alloc");
    let b = dev.alloc(1000).expect("alloc");
    let data = random(100, 3);
    assert!(matches!(
        dev.copy_to_device(s, &data, a.range(950, 100)),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        dev.copy_to_device(s, &data, a.range(usize::MAX - 10, 100)),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        dev.copy_to_device(s, &data, a.range(0, 99)),
        Err(DeviceError::LengthMismatch { .. })
    ));
    dev.copy_to_device(s, &data, a.range(900, 100))
        .expect("in range");
    assert!(matches!(
        dev.sync_stream(kvplane_cuda::StreamId::from_raw_for_tests(7)),
        Err(DeviceError::UnknownHandle { what: "stream", .. })
    ));
    let d = kvp_copy_desc {
        src_offset: 900,
        dst_offset: 0,
        bytes: 101,
    };
    assert!(matches!(
        dev.copy_batch(s, a, b, &[d]),
        Err(DeviceError::Kernel {
            source: KernelError::DescOutOfRange { .. },
            ..
        })
    ));
    let d = kvp_copy_desc {
        src_offset: 900,
        dst_offset: 0,
        bytes: 100,
    };
    dev.copy_batch(s, a, b, &[d]).expect("copy");
    let mut back = vec![0u8; 100];
    dev.copy_to_host(s, b.range(0, 100), &mut back)
        .expect("back");
    assert_eq!(back, data);
    dev.copy_device(s, b.range(0, 100), a.range(0, 100))
        .expect("d2d");
    dev.copy_to_host(s, a.range(0, 100), &mut back)
        .expect("back");
    assert_eq!(back, data);
    // Same buffer, overlapping ranges: refused.
    let d = kvp_copy_desc {
        src_offset: 0,
        dst_offset: 50,
        bytes: 100,
    };
    assert!(matches!(
        dev.copy_batch(s, a, a, &[d]),
        Err(DeviceError::Kernel {
            source: KernelError::DescOverlap { .. },
            ..
        })
    ));
    // Layout and page checks.
    let raw = vllm_layout(1, 2, 2, 1, 16);
    let layout = PagedLayout::new(&raw).expect("valid");
    let lid = dev.upload_layout(&layout).expect("upload");
    let engine = dev.alloc(raw.buffer_bytes as usize).expect("alloc");
    let bb = layout.info().block_bytes as usize;
    assert!(matches!(
        dev.gather(s, engine, lid, &[2], b.range(0, bb)),
        Err(DeviceError::Kernel {
            source: KernelError::PageOutOfRange { page: 2, .. },
            ..
        })
    ));
    assert!(matches!(
        dev.gather(s, engine, lid, &[0], engine.range(0, bb)),
        Err(DeviceError::SameBuffer { .. })
    ));
    dev.free_layout(lid).expect("free layout");
    assert!(matches!(
        dev.gather(s, engine, lid, &[0], b.range(0, bb)),
        Err(DeviceError::UnknownHandle { what: "layout", .. })
    ));
    dev.free(a).expect("free");
    assert!(matches!(
        dev.free(a),
        Err(DeviceError::UnknownHandle { what: "buffer", .. })
    ));
    assert!(matches!(
        dev.copy_to_device(s, &data, a.range(0, 100)),
        Err(DeviceError::UnknownHandle { .. })
    ));
    assert!(matches!(
        dev.sync_event(kvplane_cuda::EventId::from_raw_for_tests(999)),
        Err(DeviceError::UnknownHandle { what: "event", .. })
    ));
}

#[test]
fn slot_arena_bounds_and_describe() {
    let dev: Arc<dyn Device> = Arc::new(HostDevice::new());
    // 1000-byte blocks take 1024-byte slots: 3 fit in 3.5 KiB, the rest is not allocated.
    let arena = SlotArena::new(dev.clone(), 3 * 1024 + 512, 1000).expect("arena");
    assert_eq!(arena.slot_count(), 3);
    assert_eq!(arena.block_bytes(), 1000);
    assert_eq!(arena.slot_stride_bytes(), 1024);
    assert_eq!(arena.buffer().len_bytes(), 3 * 1024);
    assert!(Arc::ptr_eq(arena.device(), &dev));
    assert_eq!(arena.slot_at(0), Some((arena.buffer(), 0)));
    assert_eq!(arena.slot_at(2), Some((arena.buffer(), 2048)));
    assert_eq!(arena.slot_at(3), None);
    assert_eq!(arena.slot_at(u32::MAX), None);
    // Every slot's block lies inside the buffer.
    for s in 0..arena.slot_count() {
        let (_, off) = arena.slot_at(s).expect("slot");
        assert!(off + 1000 <= arena.buffer().len_bytes() as u64);
    }
    // The host backend says what it is, and that it is not a GPU.
    assert!(!arena.is_device_memory());
    let d = arena.describe();
    assert!(
        d.contains("host memory standing in for HBM (host backend)"),
        "{d}"
    );
    assert!(d.contains("3 slots of 1000 bytes"), "{d}");
    assert!(!d.contains("device memory"), "{d}");
    // Through the trait object, as the daemon holds it.
    let store: Box<dyn SlotStore> = Box::new(arena);
    assert_eq!(store.slot_count(), 3);
    for (cap, block, why) in [
        (4096, 0, "at least one byte"),
        (255, 1, "not even one slot"),
        (u64::MAX, usize::MAX, "overflows"),
    ] {
        match SlotArena::new(dev.clone(), cap, block) {
            Err(e @ DeviceError::SlotArena { .. }) => {
                assert!(e.to_string().contains(why), "{e}")
            }
            other => panic!("{cap} / {block}: {other:?}"),
        }
    }
}

/// A host device with a registered-free engine buffer of random pages, a layout and a
/// stream, for the slot tests.
struct SlotRig {
    dev: Arc<HostDevice>,
    stream: kvplane_cuda::StreamId,
    raw: kvp_kv_layout,
    lid: kvplane_cuda::LayoutId,
    engine: kvplane_cuda::DeviceBuffer,
    block_bytes: usize,
}

impl SlotRig {
    fn new(dev: Arc<HostDevice>, seed: u64) -> Self {
        let stream = dev.create_stream().expect("stream");
        // Odd head bytes: blocks are not multiples of 16, so slots at odd offsets test
        // every copy width.
        let raw = vllm_layout(3, 10, 4, 3, 40 + 2 * (seed as u32 % 3));
        let layout = PagedLayout::new(&raw).expect("valid");
        let lid = dev.upload_layout(&layout).expect("layout");
        let engine = dev.alloc(raw.buffer_bytes as usize).expect("alloc");
        dev.copy_to_device(
            stream,
            &random(raw.buffer_bytes as usize, seed),
            engine.whole(),
        )
        .expect("fill");
        SlotRig {
            block_bytes: layout.info().block_bytes as usize,
            dev,
            stream,
            raw,
            lid,
            engine,
        }
    }

    fn read(&self, buf: kvplane_cuda::DeviceBuffer) -> Vec<u8> {
        let mut v = vec![0u8; buf.len_bytes()];
        self.dev
            .copy_to_host(self.stream, buf.whole(), &mut v)
            .expect("read");
        v
    }

    /// Per-page contiguous gathers of `pages` into a buffer of `len` poisoned bytes, each
    /// block at its offset: what one slot gather must produce.
    fn per_page_gather(&self, pages: &[u32], offsets: &[u64], len: usize) -> Vec<u8> {
        let out = self.dev.alloc(len).expect("alloc");
        self.dev
            .copy_to_device(self.stream, &vec![0xA5; len], out.whole())
            .expect("poison");
        for (p, o) in pages.iter().zip(offsets) {
            self.dev
                .gather(
                    self.stream,
                    self.engine,
                    self.lid,
                    &[*p],
                    out.range(*o as usize, self.block_bytes),
                )
                .expect("per-page gather");
        }
        let v = self.read(out);
        self.dev.free(out).expect("free");
        v
    }
}

/// Non-contiguous, out-of-order, unaligned slot offsets for `n` blocks, and the buffer
/// length they need.
fn scattered_offsets(n: usize, block_bytes: usize, seed: u64) -> (Vec<u64>, usize) {
    use rand::Rng;
    let stride = (block_bytes + 13) as u64;
    let slots = 2 * n as u64 + 1;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<u64> = (0..slots).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let offsets = order[..n].iter().map(|s| 7 + s * stride).collect();
    (offsets, (7 + slots * stride) as usize)
}

#[test]
fn slot_gather_and_scatter_round_trip_equals_per_page_copies() {
    let rig = SlotRig::new(Arc::new(HostDevice::new()), 11);
    let (dev, s) = (&rig.dev, rig.stream);
    let pages = [7u32, 0, 9, 3, 4, 1];
    let (offsets, len) = scattered_offsets(pages.len(), rig.block_bytes, 5);
    assert!(offsets.windows(2).any(|w| w[0] > w[1]), "out of order");
    let want = rig.per_page_gather(&pages, &offsets, len);
    let slots = dev.alloc(len).expect("alloc");
    dev.copy_to_device(s, &vec![0xA5; len], slots.whole())
        .expect("poison");
    dev.gather_to_slots(s, rig.engine, rig.lid, &pages, slots, &offsets)
        .expect("gather to slots");
    assert!(rig.read(slots) == want, "slot gather == per-page gathers");

    // Load the saved blocks back into other pages; compare with per-page scatters.
    let engine_before = rig.read(rig.engine);
    let targets = [2u32, 5, 6, 8, 0, 3];
    dev.scatter_from_slots(s, rig.engine, rig.lid, &targets, slots, &offsets)
        .expect("scatter from slots");
    let got_engine = rig.read(rig.engine);
    dev.copy_to_device(s, &engine_before, rig.engine.whole())
        .expect("restore");
    for (p, o) in targets.iter().zip(&offsets) {
        dev.scatter(
            s,
            rig.engine,
            rig.lid,
            &[*p],
            slots.range(*o as usize, rig.block_bytes),
        )
        .expect("per-page scatter");
    }
    assert!(
        got_engine == rig.read(rig.engine),
        "slot scatter == per-page scatters"
    );
    // And the round trip is exact: target page i holds what pages[i] held.
    let page_bytes = |mem: &[u8], page: u32| -> Vec<u8> {
        let mut v = Vec::new();
        for layer in 0..3 {
            for plane in 0..2 {
                let at = rig.raw.plane_offset[plane][layer] as usize
                    + page as usize * rig.raw.page_stride_bytes as usize;
                v.extend_from_slice(&mem[at..at + rig.raw.page_stride_bytes as usize]);
            }
        }
        v
    };
    for (t, p) in targets.iter().zip(&pages) {
        assert!(page_bytes(&got_engine, *t) == page_bytes(&engine_before, *p));
    }
}

#[test]
fn slot_batches_are_refused_before_any_copy() {
    let rig = SlotRig::new(Arc::new(HostDevice::new()), 12);
    let (dev, s, bb) = (&rig.dev, rig.stream, rig.block_bytes as u64);
    let slots = dev.alloc(4 * bb as usize).expect("alloc");
    dev.copy_to_device(s, &vec![0x11; 4 * bb as usize], slots.whole())
        .expect("fill");
    let engine_before = rig.read(rig.engine);
    let kernel_err = |r: Result<(), DeviceError>| match r {
        Err(DeviceError::Kernel { source, .. }) => source,
        other => panic!("expected a kernel check error, got {other:?}"),
    };
    let g = |pages: &[u32], offsets: &[u64]| {
        dev.gather_to_slots(s, rig.engine, rig.lid, pages, slots, offsets)
    };
    // Overlapping destinations (in and out of order, and one slot twice).
    for offsets in [[0, bb - 1, 2 * bb], [3 * bb, bb, 2 * bb - 5], [bb, 0, bb]] {
        assert!(
            matches!(
                kernel_err(g(&[1, 2, 3], &offsets)),
                KernelError::SlotOverlap { .. }
            ),
            "{offsets:?}"
        );
    }
    // A block past the buffer's end, by a byte and by overflow.
    for bad in [3 * bb + 1, u64::MAX - 3] {
        assert!(matches!(
            kernel_err(g(&[1, 2], &[0, bad])),
            KernelError::SlotOutOfRange { index: 1, .. }
        ));
    }
    // One offset per page.
    assert!(matches!(
        kernel_err(g(&[1, 2, 3], &[0, bb])),
        KernelError::OffsetsLength {
            offsets: 2,
            pages: 3,
            ..
        }
    ));
    assert_eq!(
        rig.read(slots),
        vec![0x11; 4 * bb as usize],
        "nothing gathered"
    );
    // Scatter: a page twice in one batch.
    assert!(matches!(
        kernel_err(dev.scatter_from_slots(s, rig.engine, rig.lid, &[4, 4], slots, &[0, bb])),
        KernelError::DuplicatePage { page: 4, .. }
    ));
    assert!(matches!(
        kernel_err(dev.scatter_from_slots(s, rig.engine, rig.lid, &[4], slots, &[4 * bb])),
        KernelError::SlotOutOfRange { .. }
    ));
    assert!(rig.read(rig.engine) == engine_before, "nothing scattered");
    // The engine buffer as its own slot store.
    assert!(matches!(
        dev.gather_to_slots(s, rig.engine, rig.lid, &[1], rig.engine, &[0]),
        Err(DeviceError::SameBuffer { .. })
    ));
    assert!(matches!(
        dev.scatter_from_slots(s, rig.engine, rig.lid, &[1], rig.engine, &[0]),
        Err(DeviceError::SameBuffer { .. })
    ));
    // Stale handles.
    let gone = dev.alloc(bb as usize).expect("alloc");
    dev.free(gone).expect("free");
    assert!(matches!(
        dev.gather_to_slots(s, rig.engine, rig.lid, &[1], gone, &[0]),
        Err(DeviceError::UnknownHandle { what: "buffer", .. })
    ));
    // Disjoint, out of order, touching: accepted.
    g(&[1, 2, 3], &[2 * bb, 0, bb]).expect("disjoint slots");
}

/// A shared mapping of `mapped` bytes over a memfd of only `backed` bytes: an access past
/// `backed` raises SIGBUS, as when an engine's memory vanishes (kernels/tests/fault_guard.rs).
struct HalfBacked {
    base: NonNull<u8>,
    mapped: usize,
    _fd: std::os::fd::OwnedFd,
}

impl HalfBacked {
    fn new(backed: usize, mapped: usize) -> Self {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: a valid NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"slot-guard".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), backed as i64) }, 0);
        // SAFETY: a new shared mapping of our fd; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        HalfBacked {
            base: NonNull::new(p.cast()).expect("mmap never returns null"),
            mapped,
            _fd: fd,
        }
    }
}

impl Drop for HalfBacked {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`, no longer registered.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped) };
    }
}

#[test]
fn engine_fault_during_a_slot_gather_is_an_error() {
    let dev = HostDevice::new();
    let s = dev.create_stream().expect("stream");
    // 16 pages of 4 KiB (one layer, K and V of 2 KiB each); the first 8 backed.
    let raw = vllm_layout(1, 16, 1, 1, 2048);
    let layout = PagedLayout::new(&raw).expect("valid");
    let bb = layout.info().block_bytes as usize;
    let total = raw.buffer_bytes as usize;
    assert_eq!(total % 4096, 0);
    let mem = HalfBacked::new(total / 2, total);
    // SAFETY: the mapping outlives the registration (freed below, before `mem` drops).
    let engine = unsafe { dev.register_host_memory(mem.base, total) }.expect("register");
    let lid = dev.upload_layout(&layout).expect("layout");
    let slots = dev.alloc(4 * bb).expect("alloc");
    // Plane 1 (V) of every page lies in the unbacked second half.
    for _ in 0..2 {
        match dev.gather_to_slots(s, engine, lid, &[3, 1], slots, &[(2 * bb) as u64, 0]) {
            Err(DeviceError::Kernel {
                source: KernelError::EngineFault { signal, .. },
                ..
            }) => assert_eq!(signal, libc::SIGBUS),
            other => panic!("expected an engine fault, got {other:?}"),
        }
        match dev.scatter_from_slots(s, engine, lid, &[2], slots, &[bb as u64]) {
            Err(DeviceError::Kernel {
                source: KernelError::EngineFault { .. },
                ..
            }) => {}
            other => panic!("expected an engine fault, got {other:?}"),
        }
    }
    // The device still works for everyone else.
    let mut back = vec![0u8; 16];
    dev.copy_to_host(s, slots.range(0, 16), &mut back)
        .expect("device still usable");
    dev.free(engine).expect("unregister");
}

/// Gates a [`HostDevice`] launch hook: threads count themselves in and wait until enough
/// are inside at once, or until the gate is opened.
#[derive(Default)]
struct Gate {
    state: std::sync::Mutex<(u32, bool)>,
    cv: std::sync::Condvar,
}

impl Gate {
    /// Counts the caller in; returns its arrival index (0-based) and whether `want`
    /// threads were inside together (or the gate was opened) within 60 s.
    fn arrive_and_wait(&self, want: u32) -> (u32, bool) {
        let mut st = self.state.lock().unwrap();
        let index = st.0;
        st.0 += 1;
        self.cv.notify_all();
        let (_st, timeout) = self
            .cv
            .wait_timeout_while(st, std::time::Duration::from_secs(60), |s| {
                s.0 < want && !s.1
            })
            .unwrap();
        (index, !timeout.timed_out())
    }

    /// Waits (at most 60 s) until `n` threads have arrived.
    fn wait_for(&self, n: u32) -> bool {
        let st = self.state.lock().unwrap();
        let (_st, timeout) = self
            .cv
            .wait_timeout_while(st, std::time::Duration::from_secs(60), |s| s.0 < n)
            .unwrap();
        !timeout.timed_out()
    }

    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

/// Two threads are inside a slot gather at the same moment: the first waits inside its
/// copy until the second has arrived inside its own. With a device-wide lock held during
/// copies the second could never arrive and the first would give up after 60 s.
#[test]
fn copies_on_different_streams_run_at_the_same_time() {
    let gate = Arc::new(Gate::default());
    let met = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let hook = {
        let (gate, met) = (gate.clone(), met.clone());
        Arc::new(move |op: &'static str| {
            if op == "gather" {
                // The first two gathers meet; later ones (the references) pass through.
                let (index, together) = gate.arrive_and_wait(2);
                if index < 2 && together {
                    met.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
    };
    let dev = Arc::new(HostDevice::with_launch_hook_for_tests(
        kvplane_kernels::HostLaunch::default(),
        hook,
    ));
    let rigs: Vec<SlotRig> = (0..2).map(|i| SlotRig::new(dev.clone(), 20 + i)).collect();
    let pages = [4u32, 8, 2];
    let (offsets, len) = scattered_offsets(3, rigs[0].block_bytes.max(rigs[1].block_bytes), 9);
    let got: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let handles: Vec<_> = rigs
            .iter()
            .map(|rig| {
                let (pages, offsets) = (&pages, &offsets);
                sc.spawn(move || {
                    let slots = rig.dev.alloc(len).expect("alloc");
                    rig.dev
                        .copy_to_device(rig.stream, &vec![0xA5; len], slots.whole())
                        .expect("poison");
                    rig.dev
                        .gather_to_slots(rig.stream, rig.engine, rig.lid, pages, slots, offsets)
                        .expect("gather");
                    rig.read(slots)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(
        met.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "both gathers were inside their copies at once"
    );
    for (rig, got) in rigs.iter().zip(got) {
        assert!(
            got == rig.per_page_gather(&pages, &offsets, len),
            "each thread's slots hold its pages"
        );
    }
}

/// `free` of a buffer while a copy from it is running: the copy finishes with the right
/// bytes (the allocation lives until the copy is done), even when the freed memory's
/// size is allocated again and overwritten meanwhile.
#[test]
fn free_during_a_running_copy_does_not_pull_the_memory_away() {
    let gate = Arc::new(Gate::default());
    let hook = {
        let gate = gate.clone();
        Arc::new(move |op: &'static str| {
            if op == "copy_to_host" {
                // Held inside the copy until the test opens the gate.
                gate.arrive_and_wait(u32::MAX);
            }
        })
    };
    let dev = Arc::new(HostDevice::with_launch_hook_for_tests(
        kvplane_kernels::HostLaunch::default(),
        hook,
    ));
    let s = dev.create_stream().expect("stream");
    let n = 256 << 10;
    let data = random(n, 31);
    let buf = dev.alloc(n).expect("alloc");
    dev.copy_to_device(s, &data, buf.whole()).expect("fill");
    let got = std::thread::scope(|sc| {
        let reader = sc.spawn(|| {
            let mut out = vec![0u8; n];
            dev.copy_to_host(s, buf.whole(), &mut out).map(|()| out)
        });
        assert!(gate.wait_for(1), "the copy started");
        // The copy is stopped inside; free its source and churn same-sized allocations.
        dev.free(buf).expect("free while copying");
        let s2 = dev.create_stream().expect("stream");
        let mut others = Vec::new();
        for _ in 0..4 {
            let b = dev.alloc(n).expect("alloc");
            dev.copy_to_device(s2, &vec![0xFF; n], b.whole())
                .expect("overwrite");
            others.push(b);
        }
        gate.open();
        let got = reader.join().expect("reader");
        for b in others {
            dev.free(b).expect("free");
        }
        got
    });
    assert!(
        got.expect("copy completes") == data,
        "the copy read the live allocation"
    );
    assert!(matches!(
        dev.copy_to_device(s, &data, buf.whole()),
        Err(DeviceError::UnknownHandle { .. })
    ));
}

/// Several threads gather into slots and copy back at once, each on its own stream,
/// while another thread allocates, fills and frees other buffers: every result is exact.
#[test]
fn concurrent_slot_copies_with_churn_stay_exact() {
    let dev = Arc::new(HostDevice::new());
    let rigs: Vec<SlotRig> = (0..4).map(|i| SlotRig::new(dev.clone(), 40 + i)).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        let churn = sc.spawn(|| {
            let s = dev.create_stream().expect("stream");
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds < 10 {
                let b = dev.alloc(64 << 10).expect("alloc");
                dev.copy_to_device(s, &vec![rounds as u8; 64 << 10], b.whole())
                    .expect("fill");
                let mut back = vec![0u8; 64 << 10];
                dev.copy_to_host(s, b.whole(), &mut back).expect("read");
                assert!(back.iter().all(|&x| x == rounds as u8));
                dev.free(b).expect("free");
                rounds += 1;
            }
            rounds
        });
        let workers: Vec<_> = rigs
            .iter()
            .enumerate()
            .map(|(t, rig)| {
                sc.spawn(move || {
                    use rand::Rng;
                    let mut rng = StdRng::seed_from_u64(t as u64);
                    for round in 0..25u64 {
                        let n = rng.random_range(1..=6);
                        let pages: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
                        let (offsets, len) =
                            scattered_offsets(n, rig.block_bytes, round * 7 + t as u64);
                        let slots = rig.dev.alloc(len).expect("alloc");
                        rig.dev
                            .copy_to_device(rig.stream, &vec![0xA5; len], slots.whole())
                            .expect("poison");
                        rig.dev
                            .gather_to_slots(
                                rig.stream, rig.engine, rig.lid, &pages, slots, &offsets,
                            )
                            .expect("gather");
                        let got = rig.read(slots);
                        rig.dev.free(slots).expect("free");
                        assert!(
                            got == rig.per_page_gather(&pages, &offsets, len),
                            "thread {t} round {round}"
                        );
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(churn.join().expect("churn") >= 10);
    });
}

#[test]
fn destroyed_streams_are_refused_and_their_ids_reused() {
    let dev = HostDevice::new();
    let a = dev.create_stream().unwrap();
    let b = dev.create_stream().unwrap();
    dev.destroy_stream(a).unwrap();
    // A destroyed stream is an unknown handle everywhere, not a stream that still works.
    assert!(matches!(
        dev.sync_stream(a),
        Err(DeviceError::UnknownHandle { what: "stream", .. })
    ));
    assert!(matches!(
        dev.destroy_stream(a),
        Err(DeviceError::UnknownHandle { what: "stream", .. })
    ));
    dev.sync_stream(b).unwrap();
    // Sessions come and go: the table stays at the most ever live at once.
    for _ in 0..1000 {
        let s = dev.create_stream().unwrap();
        assert_eq!(s, a, "the one free id");
        dev.sync_stream(s).unwrap();
        dev.destroy_stream(s).unwrap();
    }
    let c = dev.create_stream().unwrap();
    assert_eq!(c, a, "the freed id is issued again");
    let d = dev.create_stream().unwrap();
    assert!(d != a && d != b, "a new id once none is free");
}

/// The completion state machine the data plane polls: with a completion delay the host
/// device reports queued work unfinished until the delay has passed, through every path
/// (query, event sync, stream sync, a stream waiting on an event), and an event that is
/// recorded again tracks the newest work.
#[test]
fn host_completion_delay_drives_event_queries() {
    use std::time::{Duration, Instant};
    let delay = Duration::from_millis(150);
    let dev = HostDevice::with_completion_delay(kvplane_kernels::HostLaunch::default(), delay);
    let stream = dev.create_stream().expect("stream");
    let other = dev.create_stream().expect("stream");
    let src = dev.alloc(4096).expect("alloc");
    let dst = dev.alloc(4096).expect("alloc");
    let ev = dev.create_event().expect("event");
    assert!(
        dev.query_event(ev).expect("query"),
        "an event never recorded is complete"
    );
    dev.record_event_on(stream, ev)
        .expect("record on an idle stream");
    assert!(
        dev.query_event(ev).expect("query"),
        "an idle stream's event is complete at once"
    );

    let t0 = Instant::now();
    dev.copy_device(stream, src.whole(), dst.whole())
        .expect("copy");
    dev.record_event_on(stream, ev)
        .expect("record after the copy");
    assert!(
        !dev.query_event(ev).expect("query"),
        "the copy's completion is still ahead"
    );
    // Another stream waiting on the event waits for the copy's completion.
    dev.stream_wait_event(other, ev).expect("wait");
    assert!(t0.elapsed() >= delay, "stream_wait_event returned early");
    assert!(
        dev.query_event(ev).expect("query"),
        "complete after the delay"
    );

    // Recorded again after new work: incomplete again; the syncs wait it out.
    let t1 = Instant::now();
    dev.copy_device(stream, dst.whole(), src.whole())
        .expect("copy");
    dev.record_event_on(stream, ev).expect("record again");
    assert!(!dev.query_event(ev).expect("query"));
    dev.sync_event(ev).expect("sync");
    assert!(t1.elapsed() >= delay, "sync_event returned early");
    let t2 = Instant::now();
    dev.copy_device(stream, src.whole(), dst.whole())
        .expect("copy");
    dev.sync_stream(stream).expect("sync");
    assert!(t2.elapsed() >= delay, "sync_stream returned early");

    dev.destroy_event(ev).expect("destroy");
    assert!(matches!(
        dev.query_event(ev),
        Err(DeviceError::UnknownHandle { .. })
    ));
    assert!(matches!(
        dev.record_event_on(stream, ev),
        Err(DeviceError::UnknownHandle { .. })
    ));
}

/// `read_file` on the host backend: any offset and length (the O_DIRECT-safe bounce reads
/// whole aligned pages around them), into any range of a buffer, after the stream's
/// work; a read past the end of the file or outside the buffer is an error.
#[test]
fn host_backend_reads_a_file_into_device_memory() {
    use std::io::Write;
    use std::os::fd::AsFd;
    let dev = HostDevice::new();
    let stream = dev.create_stream().unwrap();
    let data = random((3 << 20) + 123, 0xf11e);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&data).unwrap();
    let buf = dev.alloc(4 << 20).unwrap();
    for (file_offset, len, dst_offset) in [
        (0usize, 4096usize, 0usize),
        (4096, 2 << 20, 256),
        (3, 5000, 7),
        (8191, (1 << 20) + 2, 4096),
        (data.len() - 10, 10, 100),
        ((1 << 20) - 1, (2 << 20) + 5, 1),
    ] {
        dev.read_file(
            stream,
            buf.range(dst_offset, len),
            file.as_fd(),
            file_offset as u64,
        )
        .unwrap_or_else(|e| panic!("{len} bytes at {file_offset}: {e}"));
        let mut back = vec![0u8; len];
        dev.copy_to_host(stream, buf.range(dst_offset, len), &mut back)
            .unwrap();
        assert!(
            back == data[file_offset..file_offset + len],
            "{len} bytes at {file_offset} into {dst_offset}"
        );
    }
    let past_end = dev.read_file(
        stream,
        buf.range(0, 100),
        file.as_fd(),
        data.len() as u64 - 50,
    );
    assert!(
        matches!(past_end, Err(DeviceError::FileRead { .. })),
        "{past_end:?}"
    );
    let outside = dev.read_file(stream, buf.range(4 << 20, 1), file.as_fd(), 0);
    assert!(
        matches!(outside, Err(DeviceError::OutOfRange { .. })),
        "{outside:?}"
    );
    dev.free(buf).unwrap();
}

/// `write_file` on the host backend: any offset and length, from any range of a buffer;
/// the file's bytes around what was written stay as they were (partial pages are read,
/// overlaid and written back), a write past the end extends the file, and a descriptor
/// that cannot be written is the file's error. On a buffered descriptor and on an
/// O_DIRECT one (as the NVMe tier opens its files), beside the test binary on the disk.
#[test]
fn host_backend_writes_device_memory_into_a_file() {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let dev = HostDevice::new();
    let stream = dev.create_stream().unwrap();
    let src = random(4 << 20, 0x5eed);
    let buf = dev.alloc(src.len()).unwrap();
    dev.copy_to_device(stream, &src, buf.range(0, src.len()))
        .unwrap();
    let dir = tempfile::tempdir_in(std::env::current_exe().unwrap().parent().unwrap()).unwrap();
    for direct in [false, true] {
        let path = dir.path().join(format!("direct-{direct}"));
        let mut expect = random((3 << 20) + 123, 0xf11e);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&expect)
            .unwrap();
        let flags = if direct { libc::O_DIRECT } else { 0 };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(&path)
            .unwrap();
        // Nothing to write: the file is left as it is (its partial last page too).
        dev.write_file(
            stream,
            buf.range(5, 0),
            file.as_fd(),
            expect.len() as u64 - 3,
        )
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expect, "direct {direct}");
        for (file_offset, len, src_offset) in [
            (0usize, 4096usize, 0usize),
            (4096, 2 << 20, 256),
            (3, 5000, 7),
            (8191, (1 << 20) + 2, 4096),
            (expect.len() - 10, 10, 100),
            ((1 << 20) - 1, (2 << 20) + 5, 1),
            // Inside one page, touching neither of its ends.
            (5 * 4096 + 100, 200, 9),
            // Past the end of the file: it grows.
            (expect.len() + 5000, 7000, 33),
        ] {
            let what = format!("direct {direct}: {len} bytes at {file_offset} from {src_offset}");
            dev.write_file(
                stream,
                buf.range(src_offset, len),
                file.as_fd(),
                file_offset as u64,
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            if expect.len() < file_offset + len {
                expect.resize(file_offset + len, 0);
            }
            expect[file_offset..file_offset + len]
                .copy_from_slice(&src[src_offset..src_offset + len]);
            let back = std::fs::read(&path).unwrap();
            // Whole pages are written: a file that grows ends on a page boundary, zero-filled.
            assert!(
                back.len() == expect.len() || back.len() == expect.len().next_multiple_of(4096),
                "{what}: {} bytes for {}",
                back.len(),
                expect.len()
            );
            assert!(back[expect.len()..].iter().all(|&b| b == 0), "{what}");
            assert!(back[..expect.len()] == expect[..], "{what}");
        }
        let read_only = std::fs::File::open(&path).unwrap();
        let refused = dev.write_file(stream, buf.range(0, 100), read_only.as_fd(), 0);
        assert!(
            matches!(refused, Err(DeviceError::FileWrite { .. })),
            "{refused:?}"
        );
        let outside = dev.write_file(stream, buf.range(4 << 20, 1), file.as_fd(), 0);
        assert!(
            matches!(outside, Err(DeviceError::OutOfRange { .. })),
            "{outside:?}"
        );
    }
    dev.free(buf).unwrap();
}
