//! The device layer on this machine: the cuda backend reports the missing driver
//! clearly (and the fallback picks the host), and the host backend runs the whole Device
//! surface on random data against plain Rust references.

use kvplane_cuda::arena::{ArenaError, BlockArena};
use kvplane_cuda::cuda::{CudaDevice, driver_present, topology};
use kvplane_cuda::host::HostDevice;
use kvplane_cuda::{BackendChoice, BackendKind, Device, DeviceError, open};
use kvplane_ffi::{kvp_copy_desc, kvp_kv_layout};
use kvplane_kernels::{KernelError, PagedLayout, checksum64};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::ptr::NonNull;

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
fn host_backend_save_and_load_through_an_arena() {
    let dev = HostDevice::new();
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
    let arena = BlockArena::new(&dev, 8, block_bytes).expect("arena");
    assert_eq!(arena.free_slots(), 8);

    // Save pages 5, 2, 11 into three consecutive slots (one launch), checksum them.
    let pages = [5u32, 2, 11];
    let first = arena.take().expect("slot");
    for _ in 1..pages.len() {
        arena.take().expect("slot");
    }
    let slot_bytes = arena.slot_bytes();
    assert_eq!(slot_bytes % 256, 0);
    // Slots are padded to 256 bytes; with block_bytes a multiple of 256 they are packed.
    assert_eq!(slot_bytes, block_bytes);
    let staging = arena
        .buffer()
        .range(arena.offset(first) as usize, pages.len() * block_bytes);
    dev.gather(stream, engine, lid, &pages, staging)
        .expect("gather");
    let descs: Vec<kvp_copy_desc> = (0..pages.len())
        .map(|i| kvp_copy_desc {
            src_offset: arena.offset(first) + (i * block_bytes) as u64,
            dst_offset: 0,
            bytes: block_bytes as u64,
        })
        .collect();
    let sums = dev
        .checksum(stream, arena.buffer(), &descs)
        .expect("checksum");
    let mut host_copy = vec![0u8; pages.len() * block_bytes];
    dev.copy_to_host(stream, staging, &mut host_copy)
        .expect("to host");
    for (i, s) in sums.iter().enumerate() {
        assert_eq!(
            *s,
            checksum64(&host_copy[i * block_bytes..(i + 1) * block_bytes])
        );
    }
    // Block 0 starts with page 5's layer-0 K run.
    let at = raw.plane_offset[0][0] as usize + 5 * raw.page_stride_bytes as usize;
    assert_eq!(host_copy[..64], original[at..at + 64]);

    // Move the blocks to other slots with one batched copy, then load them into other
    // engine pages: pages 0, 1, 3 now hold what 5, 2, 11 held.
    let copy_descs: Vec<kvp_copy_desc> = (0..3u64)
        .map(|i| kvp_copy_desc {
            src_offset: arena.offset(first) + i * block_bytes as u64,
            dst_offset: arena.offset(5) + i * block_bytes as u64,
            bytes: block_bytes as u64,
        })
        .collect();
    dev.copy_batch(stream, arena.buffer(), arena.buffer(), &copy_descs)
        .expect("copy");
    let moved = arena
        .buffer()
        .range(arena.offset(5) as usize, 3 * block_bytes);
    dev.scatter(stream, engine, lid, &[0, 1, 3], moved)
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
    arena.release(&dev).expect("release");
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
fn arena_slots() {
    let dev = HostDevice::new();
    let arena = BlockArena::new(&dev, 3, 1000).expect("arena");
    assert_eq!(arena.slot_bytes(), 1024);
    assert_eq!(arena.buffer().len_bytes(), 3 * 1024);
    let (a, b, c) = (
        arena.take().unwrap(),
        arena.take().unwrap(),
        arena.take().unwrap(),
    );
    assert_eq!((a, b, c), (0, 1, 2));
    assert_eq!(arena.take(), None);
    arena.give_back(1).expect("give back");
    assert!(matches!(
        arena.give_back(1),
        Err(ArenaError::DoubleFree { slot: 1 })
    ));
    assert!(matches!(
        arena.give_back(3),
        Err(ArenaError::BadSlot { .. })
    ));
    assert_eq!(arena.take(), Some(1));
    let r = arena.range(2, 5000).expect("range");
    assert_eq!((r.offset_bytes, r.len_bytes), (2048, 1024));
    assert!(matches!(
        BlockArena::new(&dev, u32::MAX, usize::MAX / 2),
        Err(ArenaError::Size { .. })
    ));
}
