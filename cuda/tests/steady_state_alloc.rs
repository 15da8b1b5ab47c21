//! The data path's slot copies allocate nothing once warm: `gather_to_slots` and
//! `scatter_from_slots` on the host backend (handle lookups, the batch checks including
//! the overlap and duplicate-page sorts, the guarded launch) make no heap allocation on
//! the calling thread after the first call of the largest batch. Its own test binary,
//! because it installs a counting global allocator.

use kvplane_cuda::host::HostDevice;
use kvplane_cuda::{Device, SlotArena, SlotStore};
use kvplane_ffi::kvp_kv_layout;
use kvplane_kernels::PagedLayout;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts calls per thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn slot_gather_and_scatter_do_not_allocate_once_warm() {
    // SAFETY: plain old data; all-zero is valid.
    let mut l: kvp_kv_layout = unsafe { std::mem::zeroed() };
    (l.num_layers, l.kv_planes, l.page_tokens, l.kv_heads) = (4, 2, 16, 2);
    (l.head_bytes, l.dtype_bytes, l.num_pages) = (128, 2, 32);
    l.head_stride_bytes = 128;
    l.token_stride_bytes = 256;
    l.page_stride_bytes = 16 * 256;
    let plane = 32 * l.page_stride_bytes;
    for layer in 0..4 {
        l.plane_offset[0][layer] = 2 * layer as u64 * plane;
        l.plane_offset[1][layer] = (2 * layer as u64 + 1) * plane;
    }
    l.buffer_bytes = 8 * plane;
    let layout = PagedLayout::new(&l).expect("valid");
    let bb = layout.info().block_bytes as usize;

    let dev = Arc::new(HostDevice::new());
    let s = dev.create_stream().expect("stream");
    let lid = dev.upload_layout(&layout).expect("layout");
    let engine = dev.alloc(l.buffer_bytes as usize).expect("alloc");
    let arena = SlotArena::new(dev.clone(), 64 * bb as u64, bb).expect("arena");
    // Out-of-order pages and slots, so both sorts (overlap, duplicate pages) run.
    let pages: Vec<u32> = (0..24u32).map(|i| (i * 7) % 32).collect();
    let offsets: Vec<u64> = (0..24u32)
        .map(|i| arena.slot_at((i * 5 + 3) % 64).expect("slot").1)
        .collect();
    let (small_p, small_o) = (&pages[..3], &offsets[..3]);

    // Warm: the first call of the largest batch sizes the per-thread scratch.
    dev.gather_to_slots(s, engine, lid, &pages, arena.buffer(), &offsets)
        .expect("gather");
    dev.scatter_from_slots(s, engine, lid, &pages, arena.buffer(), &offsets)
        .expect("scatter");

    let before = allocs();
    for _ in 0..10 {
        dev.gather_to_slots(s, engine, lid, &pages, arena.buffer(), &offsets)
            .expect("gather");
        dev.scatter_from_slots(s, engine, lid, &pages, arena.buffer(), &offsets)
            .expect("scatter");
        dev.gather_to_slots(s, engine, lid, small_p, arena.buffer(), small_o)
            .expect("small gather");
    }
    let during = allocs() - before;
    assert_eq!(during, 0, "heap allocations in 30 warm slot copies");

    // The counter does count this thread's allocations (the check above is not vacuous).
    let v: Vec<u8> = Vec::with_capacity(std::hint::black_box(64));
    drop(v);
    assert!(allocs() > before);
}
