//! The host backend's kernel launches: the `.cu` kernels compiled for the CPU by build.rs
//! (through `shim/host_launch.cpp`), behind safe, validating wrappers.
//!
//! Every wrapper checks page ids, sizes and ranges before the launch, so nothing a caller
//! passes (an engine's page ids, a corrupt copy table) can make a kernel touch memory
//! outside the buffers it was given. One call is one launch over the whole batch.

use crate::layout::PagedLayout;
use kvplane_ffi::{kvp_copy_desc, kvp_kv_layout};
use std::ptr::NonNull;

/// Mirrors `struct kvp_host_grid` in `shim/host_launch.cpp`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct HostGrid {
    grid_x: u32,
    grid_y: u32,
    block_x: u32,
    block_y: u32,
    block_begin: u64,
    block_end: u64,
}

unsafe extern "C" {
    fn kvp_host_paged_gather(
        g: *const HostGrid,
        engine: *const u8,
        blocks: *mut u8,
        layout: *const kvp_kv_layout,
        pages: *const u32,
        block_offsets: *const u64,
        num_batch_pages: u32,
    );
    fn kvp_host_fault_guard_install() -> i32;
    fn kvp_host_paged_gather_guarded(
        g: *const HostGrid,
        engine: *const u8,
        engine_bytes: u64,
        blocks: *mut u8,
        layout: *const kvp_kv_layout,
        pages: *const u32,
        block_offsets: *const u64,
        num_batch_pages: u32,
        fault_addr: *mut usize,
    ) -> i32;
    fn kvp_host_paged_scatter_guarded(
        g: *const HostGrid,
        engine: *mut u8,
        engine_bytes: u64,
        blocks: *const u8,
        layout: *const kvp_kv_layout,
        pages: *const u32,
        block_offsets: *const u64,
        num_batch_pages: u32,
        fault_addr: *mut usize,
    ) -> i32;
    fn kvp_host_copy_batch(
        g: *const HostGrid,
        src: *const u8,
        dst: *mut u8,
        descs: *const kvp_copy_desc,
        num_descs: u32,
    );
    fn kvp_host_checksum_partial(
        g: *const HostGrid,
        base: *const u8,
        descs: *const kvp_copy_desc,
        num_descs: u32,
        sums: *mut u64,
    );
    fn kvp_host_checksum_finalize(
        g: *const HostGrid,
        descs: *const kvp_copy_desc,
        num_descs: u32,
        sums: *mut u64,
    );
    fn kvp_host_mac_chunks(
        g: *const HostGrid,
        base: *const u8,
        descs: *const kvp_copy_desc,
        num_descs: u32,
        key: *const u32,
        cvs: *mut u8,
        roots: *mut u8,
    );
    fn kvp_host_mac_parents(
        g: *const HostGrid,
        descs: *const kvp_copy_desc,
        num_descs: u32,
        key: *const u32,
        cvs: *mut u8,
        roots: *mut u8,
        level: u32,
    );
}

/// Errors of a launch; nothing was copied when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error(
        "{op}: page id {page} at index {index} is outside the engine pool of {num_pages} pages"
    )]
    PageOutOfRange {
        op: &'static str,
        index: usize,
        page: u32,
        num_pages: u64,
    },
    #[error("scatter: page id {page} appears twice in one batch (indices {first} and {second})")]
    DuplicatePage {
        page: u32,
        first: usize,
        second: usize,
    },
    #[error("{op}: batch of {count} exceeds the limit of {max}")]
    BatchTooLarge {
        op: &'static str,
        count: usize,
        max: usize,
    },
    #[error(
        "{op}: engine buffer of {len_bytes} bytes is smaller than the layout's buffer_bytes {buffer_bytes}"
    )]
    EngineBufferTooSmall {
        op: &'static str,
        len_bytes: usize,
        buffer_bytes: u64,
    },
    #[error("{op}: block buffer is {got_bytes} bytes, the batch needs exactly {want_bytes}")]
    BlockBufferSize {
        op: &'static str,
        got_bytes: usize,
        want_bytes: u64,
    },
    #[error("{op}: {offsets} block offsets for {pages} pages")]
    OffsetsLength {
        op: &'static str,
        offsets: usize,
        pages: usize,
    },
    #[error(
        "{op}: block {index} at offset {offset_bytes} (+{block_bytes}) lies outside the block buffer of {len_bytes} bytes"
    )]
    SlotOutOfRange {
        op: &'static str,
        index: usize,
        offset_bytes: u64,
        block_bytes: u64,
        len_bytes: usize,
    },
    #[error(
        "{op}: blocks {first} and {second} overlap in the block buffer (offsets {first_offset} and {second_offset}, {block_bytes} bytes each)"
    )]
    SlotOverlap {
        op: &'static str,
        first: usize,
        second: usize,
        first_offset: u64,
        second_offset: u64,
        block_bytes: u64,
    },
    #[error(
        "{op}: descriptor {index}: {side} range [{offset}, +{bytes}) exceeds {len_bytes} bytes"
    )]
    DescOutOfRange {
        op: &'static str,
        index: usize,
        side: &'static str,
        offset: u64,
        bytes: u64,
        len_bytes: usize,
    },
    #[error("copy: descriptor {index}: source and destination ranges overlap")]
    DescOverlap { index: usize },
    #[error("{op}: {descs} descriptors but {sums} result slots")]
    SumsLength {
        op: &'static str,
        descs: usize,
        sums: usize,
    },
    /// The engine's memory faulted under the copy (its backing vanished: a punched-out
    /// hugetlb page, a poisoned page). Part of the batch may have been copied.
    #[error(
        "{op}: the engine's KV buffer faulted (signal {signal}) at byte {offset_bytes} of its {len_bytes}: its memory is gone"
    )]
    EngineFault {
        op: &'static str,
        signal: i32,
        offset_bytes: u64,
        len_bytes: usize,
    },
    #[error("installing the SIGBUS/SIGSEGV guard for engine memory failed: errno {errno}")]
    FaultGuard { errno: i32 },
}

/// How the host runs a launch. One thread by default, so throughput compares with a
/// single-threaded memcpy; more threads split the grid's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLaunch {
    pub threads: u32,
}

impl Default for HostLaunch {
    fn default() -> Self {
        Self { threads: 1 }
    }
}

/// Largest batch one launch takes (u32 counts in the kernels).
pub const MAX_BATCH: usize = u32::MAX as usize;

/// An engine's registered KV buffer: memory shared with another process, read (gather)
/// and written (scatter) through raw pointers only, never as a Rust slice, because the
/// engine may write it at any time. Every launch over it is fault-guarded: if its backing
/// vanishes under the copy (SIGBUS/SIGSEGV at an address inside it), the launch returns
/// [`KernelError::EngineFault`] instead of the process dying.
#[derive(Debug)]
pub struct EngineKv {
    base: NonNull<u8>,
    len_bytes: usize,
}

// SAFETY: EngineKv is an address range; the contract of `new` makes it valid to access
// from any thread for as long as the value lives.
unsafe impl Send for EngineKv {}
// SAFETY: as above; concurrent launches only read it (gather) or write it (scatter) with
// the same last-writer-wins semantics the engine itself sees on the GPU.
unsafe impl Sync for EngineKv {}

impl EngineKv {
    /// # Safety
    /// `base` must be valid for reads and writes of `len_bytes` bytes for the whole
    /// lifetime of the returned value (e.g. a mapping the daemon keeps until it drops
    /// this). The memory may be changed concurrently by another process; gathered data is
    /// then whatever the engine had written, which is the engine's own affair.
    pub unsafe fn new(base: NonNull<u8>, len_bytes: usize) -> Self {
        Self { base, len_bytes }
    }

    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    pub fn base(&self) -> NonNull<u8> {
        self.base
    }
}

/// The checks every paged launch makes before it runs, shared by the host wrappers and the
/// cuda backend (against the device buffers' lengths), so both refuse the same batches.
///
/// - `engine_len_bytes` covers the layout's `buffer_bytes`; every page id is `< num_pages`;
/// - contiguous blocks (`block_offsets` None): the block buffer is exactly
///   `pages.len() * block_bytes`;
/// - slots (`block_offsets` Some): one offset per page, each block `[offset, offset +
///   block_bytes)` inside the block buffer (no overflow), and for a gather the destinations
///   pairwise disjoint (two writers of one byte would race on a GPU);
/// - scatter: each page at most once per batch (the same race, on the engine side).
pub fn check_paged_batch(
    op: &'static str,
    layout: &PagedLayout,
    engine_len_bytes: usize,
    pages: &[u32],
    blocks_len: usize,
    block_offsets: Option<&[u64]>,
    scatter: bool,
) -> Result<(), KernelError> {
    if pages.len() > MAX_BATCH {
        return Err(KernelError::BatchTooLarge {
            op,
            count: pages.len(),
            max: MAX_BATCH,
        });
    }
    let buffer_bytes = layout.raw().buffer_bytes;
    if (engine_len_bytes as u64) < buffer_bytes {
        return Err(KernelError::EngineBufferTooSmall {
            op,
            len_bytes: engine_len_bytes,
            buffer_bytes,
        });
    }
    let block_bytes = layout.info().block_bytes;
    match block_offsets {
        None => {
            let want_bytes = (pages.len() as u64).checked_mul(block_bytes);
            if want_bytes != Some(blocks_len as u64) {
                return Err(KernelError::BlockBufferSize {
                    op,
                    got_bytes: blocks_len,
                    want_bytes: want_bytes.unwrap_or(u64::MAX),
                });
            }
        }
        Some(offsets) => {
            if offsets.len() != pages.len() {
                return Err(KernelError::OffsetsLength {
                    op,
                    offsets: offsets.len(),
                    pages: pages.len(),
                });
            }
            if let Some((index, &offset_bytes)) = offsets.iter().enumerate().find(|(_, o)| {
                o.checked_add(block_bytes)
                    .is_none_or(|end| end > blocks_len as u64)
            }) {
                return Err(KernelError::SlotOutOfRange {
                    op,
                    index,
                    offset_bytes,
                    block_bytes,
                    len_bytes: blocks_len,
                });
            }
            if !scatter && let Some((first, second)) = first_clash(offsets, block_bytes) {
                return Err(KernelError::SlotOverlap {
                    op,
                    first,
                    second,
                    first_offset: offsets[first],
                    second_offset: offsets[second],
                    block_bytes,
                });
            }
        }
    }
    let num_pages = layout.num_pages();
    if let Some((index, &page)) = pages
        .iter()
        .enumerate()
        .find(|(_, p)| u64::from(**p) >= num_pages)
    {
        return Err(KernelError::PageOutOfRange {
            op,
            index,
            page,
            num_pages,
        });
    }
    if scatter && let Some((first, second)) = first_clash(pages, 1) {
        return Err(KernelError::DuplicatePage {
            page: pages[first],
            first,
            second,
        });
    }
    Ok(())
}

thread_local! {
    /// (key, index) pairs sorted by [`first_clash`]; kept per thread so the data path's
    /// checks do not allocate once it has seen its largest batch.
    static CLASH_SCRATCH: std::cell::RefCell<Vec<(u64, usize)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Indices `(i, j)`, `i < j`, of two keys less than `min_gap` apart (`min_gap` 1: equal
/// keys; `block_bytes`: overlapping blocks at those offsets), or None. Keys already in
/// increasing order with room between them (the common batch) are checked in one pass;
/// others are sorted in a per-thread scratch.
fn first_clash<K: Copy + Into<u64>>(keys: &[K], min_gap: u64) -> Option<(usize, usize)> {
    if min_gap == 0 || keys.len() < 2 {
        return None;
    }
    let spaced = |a: u64, b: u64| b.checked_sub(a).is_some_and(|d| d >= min_gap);
    if keys.windows(2).all(|w| spaced(w[0].into(), w[1].into())) {
        return None;
    }
    let find = |sorted: &mut Vec<(u64, usize)>| {
        sorted.clear();
        sorted.extend(keys.iter().map(|k| (*k).into()).zip(0..));
        sorted.sort_unstable();
        sorted
            .windows(2)
            .find(|w| !spaced(w[0].0, w[1].0))
            .map(|w| (w[0].1.min(w[1].1), w[0].1.max(w[1].1)))
    };
    CLASH_SCRATCH
        .try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut v) => find(&mut v),
            Err(_) => find(&mut Vec::new()),
        })
        .unwrap_or_else(|_| find(&mut Vec::new()))
}

/// Installs the process-wide handler that turns a fault inside a guarded engine-buffer
/// launch into [`KernelError::EngineFault`] (once; later calls are free).
pub fn install_fault_guard() -> Result<(), KernelError> {
    // SAFETY: idempotent (pthread_once) and has no preconditions; it only calls sigaction.
    match unsafe { kvp_host_fault_guard_install() } {
        0 => Ok(()),
        errno => Err(KernelError::FaultGuard { errno }),
    }
}

/// The first fault any thread of a launch reported: (signal, address).
#[derive(Default)]
struct FaultSlot(std::sync::Mutex<Option<(i32, usize)>>);

impl FaultSlot {
    fn record(&self, signal: i32, addr: usize) {
        if signal != 0 {
            let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
            f.get_or_insert((signal, addr));
        }
    }

    fn result(self, op: &'static str, engine: &EngineKv) -> Result<(), KernelError> {
        match self.0.into_inner().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some((signal, addr)) => Err(KernelError::EngineFault {
                op,
                signal,
                offset_bytes: addr.wrapping_sub(engine.base.as_ptr() as usize) as u64,
                len_bytes: engine.len_bytes,
            }),
        }
    }
}

fn run_split(threads: u32, units: u64, f: impl Fn(HostGrid) + Sync, x_split: bool) {
    let threads = u64::from(threads.max(1)).min(units.max(1)) as u32;
    let grid = |i: u32| HostGrid {
        grid_x: if x_split { threads } else { 1 },
        grid_y: if x_split { 1 } else { threads },
        block_x: 1,
        block_y: 1,
        block_begin: u64::from(i),
        block_end: u64::from(i) + 1,
    };
    if threads == 1 {
        f(grid(0));
        return;
    }
    std::thread::scope(|s| {
        for i in 1..threads {
            let f = &f;
            s.spawn(move || f(grid(i)));
        }
        f(grid(0));
    });
}

/// Gathers engine pages `pages[i]` into `blocks[i * block_bytes ..]`, packed
/// `[layers][planes][tokens][heads][head_bytes]`. One launch for the batch.
pub fn gather(
    engine: &EngineKv,
    layout: &PagedLayout,
    pages: &[u32],
    blocks: &mut [u8],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: a live, exclusively borrowed slice is valid for writes of its length and
    // cannot overlap the engine buffer (EngineKv's contract: memory not otherwise
    // borrowed by Rust code).
    unsafe {
        gather_raw(
            engine,
            layout,
            pages,
            blocks.as_mut_ptr(),
            blocks.len(),
            launch,
        )
    }
}

/// [`gather`] into a raw destination (device memory of the host backend).
///
/// # Safety
/// `blocks` must be valid for writes of `blocks_len` bytes, not overlap the engine
/// buffer, and not be accessed by anything else during the call.
pub unsafe fn gather_raw(
    engine: &EngineKv,
    layout: &PagedLayout,
    pages: &[u32],
    blocks: *mut u8,
    blocks_len: usize,
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: the caller's contract.
    unsafe {
        paged_raw(
            "gather", engine, layout, pages, blocks, blocks_len, None, launch,
        )
    }
}

/// Gathers engine pages `pages[i]` into the block at `blocks + block_offsets[i]` (a
/// tier's slots): each block inside `[blocks, blocks + blocks_len)`, destinations
/// pairwise disjoint, one launch for the batch.
///
/// # Safety
/// As [`gather_raw`]: `blocks` valid for writes of `blocks_len` bytes, not overlapping
/// the engine buffer, the written blocks accessed by nothing else during the call.
pub unsafe fn gather_slots_raw(
    engine: &EngineKv,
    layout: &PagedLayout,
    pages: &[u32],
    blocks: *mut u8,
    blocks_len: usize,
    block_offsets: &[u64],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: the caller's contract.
    unsafe {
        paged_raw(
            "gather",
            engine,
            layout,
            pages,
            blocks,
            blocks_len,
            Some(block_offsets),
            launch,
        )
    }
}

/// [`gather_slots_raw`] into a slice.
pub fn gather_slots(
    engine: &EngineKv,
    layout: &PagedLayout,
    pages: &[u32],
    blocks: &mut [u8],
    block_offsets: &[u64],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: as in `gather`.
    unsafe {
        gather_slots_raw(
            engine,
            layout,
            pages,
            blocks.as_mut_ptr(),
            blocks.len(),
            block_offsets,
            launch,
        )
    }
}

/// Scatters `blocks[i * block_bytes ..]` into engine page `pages[i]`: the reverse of
/// [`gather`]. A page may appear only once per batch (two writers would race on a GPU).
pub fn scatter(
    engine: &EngineKv,
    layout: &PagedLayout,
    pages: &[u32],
    blocks: &[u8],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: a live shared slice is valid for reads of its length and, being borrowed
    // by Rust, is not the engine buffer (EngineKv's contract).
    unsafe { scatter_raw(engine, layout, pages, blocks.as_ptr(), blocks.len(), launch) }
}

/// [`scatter`] from a raw source (device memory of the host backend).
///
/// # Safety
/// `blocks` must be valid for reads of `blocks_len` bytes, not overlap the engine buffer,
/// and not be written by anything else during the call.
pub unsafe fn scatter_raw(
    engine: &EngineKv,
    layout: &PagedLayout,
    pages: &[u32],
    blocks: *const u8,
    blocks_len: usize,
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: the caller's contract; a scatter only reads `blocks`.
    unsafe {
        paged_raw(
            "scatter",
            engine,
            layout,
            pages,
            blocks as *mut u8,
            blocks_len,
            None,
            launch,
        )
    }
}

/// The reverse of [`gather_slots_raw`]: the block at `blocks + block_offsets[i]` into
/// engine page `pages[i]`, each page at most once per batch (sources may repeat).
///
/// # Safety
/// As [`scatter_raw`]: `blocks` valid for reads of `blocks_len` bytes, not overlapping
/// the engine buffer, the read blocks written by nothing else during the call.
pub unsafe fn scatter_slots_raw(
    engine: &EngineKv,
    layout: &PagedLayout,
    pages: &[u32],
    blocks: *const u8,
    blocks_len: usize,
    block_offsets: &[u64],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: the caller's contract; a scatter only reads `blocks`.
    unsafe {
        paged_raw(
            "scatter",
            engine,
            layout,
            pages,
            blocks as *mut u8,
            blocks_len,
            Some(block_offsets),
            launch,
        )
    }
}

/// [`scatter_slots_raw`] from a slice.
pub fn scatter_slots(
    engine: &EngineKv,
    layout: &PagedLayout,
    pages: &[u32],
    blocks: &[u8],
    block_offsets: &[u64],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: as in `scatter`.
    unsafe {
        scatter_slots_raw(
            engine,
            layout,
            pages,
            blocks.as_ptr(),
            blocks.len(),
            block_offsets,
            launch,
        )
    }
}

/// One guarded launch of the paged kernels; `op` is "gather" (engine -> blocks) or
/// "scatter" (blocks -> engine, `blocks` only read).
///
/// # Safety
/// `blocks` must be valid for reads (scatter) or writes (gather) of `blocks_len` bytes,
/// not overlap the engine buffer, and not be accessed by anything else in the ranges
/// this launch writes during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn paged_raw(
    op: &'static str,
    engine: &EngineKv,
    layout: &PagedLayout,
    pages: &[u32],
    blocks: *mut u8,
    blocks_len: usize,
    block_offsets: Option<&[u64]>,
    launch: HostLaunch,
) -> Result<(), KernelError> {
    let to_blocks = op == "gather";
    check_paged_batch(
        op,
        layout,
        engine.len_bytes,
        pages,
        blocks_len,
        block_offsets,
        !to_blocks,
    )?;
    if pages.is_empty() {
        return Ok(());
    }
    install_fault_guard()?;
    let units = pages.len() as u64 * u64::from(layout.raw().num_layers);
    let blocks_ptr = SendPtr(blocks);
    // An address, so the closure stays Sync; NULL selects contiguous blocks.
    let offsets_addr = block_offsets.map_or(0, |o| o.as_ptr() as usize);
    let fault = FaultSlot::default();
    run_split(
        launch.threads,
        units,
        |g| {
            let blocks_ptr = &blocks_ptr;
            let offsets_ptr = offsets_addr as *const u64;
            let mut addr = 0usize;
            // SAFETY: `engine` covers buffer_bytes (checked above) and the validated layout
            // keeps every page < num_pages inside buffer_bytes; every page id was checked;
            // every block (contiguous: exactly pages.len() * block_bytes; slots: each offset
            // + block_bytes) lies inside `blocks_len` (checked), which the caller made valid.
            // Threads work on disjoint (page, layer, plane) triples: a gather's destinations
            // are disjoint blocks (checked for slots), a scatter's distinct pages (checked).
            // A fault in the engine's range returns here as a signal number (guard
            // installed above).
            let signal = unsafe {
                if to_blocks {
                    kvp_host_paged_gather_guarded(
                        &g,
                        engine.base.as_ptr(),
                        engine.len_bytes as u64,
                        blocks_ptr.0,
                        layout.raw(),
                        pages.as_ptr(),
                        offsets_ptr,
                        pages.len() as u32,
                        &mut addr,
                    )
                } else {
                    kvp_host_paged_scatter_guarded(
                        &g,
                        engine.base.as_ptr(),
                        engine.len_bytes as u64,
                        blocks_ptr.0,
                        layout.raw(),
                        pages.as_ptr(),
                        offsets_ptr,
                        pages.len() as u32,
                        &mut addr,
                    )
                }
            };
            fault.record(signal, addr);
        },
        false,
    );
    fault.result(op, engine)
}

fn check_descs(
    op: &'static str,
    descs: &[kvp_copy_desc],
    src_len: usize,
    dst_len: Option<usize>,
) -> Result<(), KernelError> {
    if descs.len() > MAX_BATCH {
        return Err(KernelError::BatchTooLarge {
            op,
            count: descs.len(),
            max: MAX_BATCH,
        });
    }
    let fits = |offset: u64, bytes: u64, len: usize| {
        offset
            .checked_add(bytes)
            .is_some_and(|end| end <= len as u64)
    };
    for (index, d) in descs.iter().enumerate() {
        if !fits(d.src_offset, d.bytes, src_len) {
            return Err(KernelError::DescOutOfRange {
                op,
                index,
                side: "source",
                offset: d.src_offset,
                bytes: d.bytes,
                len_bytes: src_len,
            });
        }
        if let Some(dst_len) = dst_len
            && !fits(d.dst_offset, d.bytes, dst_len)
        {
            return Err(KernelError::DescOutOfRange {
                op,
                index,
                side: "destination",
                offset: d.dst_offset,
                bytes: d.bytes,
                len_bytes: dst_len,
            });
        }
    }
    Ok(())
}

/// Copies every `descs[i]` (src_offset, dst_offset, bytes) from `src` to `dst` in one
/// launch.
pub fn copy_batch(
    src: &[u8],
    dst: &mut [u8],
    descs: &[kvp_copy_desc],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    check_descs("copy", descs, src.len(), Some(dst.len()))?;
    // SAFETY: ranges checked against both slices; `src` and `dst` are distinct borrows,
    // so they cannot overlap.
    unsafe { launch_copy(src.as_ptr(), dst.as_mut_ptr(), descs, launch) };
    Ok(())
}

/// [`copy_batch`] between raw buffers (device memory of the host backend). When `src`
/// and `dst` are the same buffer, descriptors whose ranges overlap are refused.
///
/// # Safety
/// `src` must be valid for reads of `src_len` bytes and `dst` for writes of `dst_len`
/// bytes during the call, with nothing else accessing them; if the two buffers are
/// distinct they must not overlap.
pub unsafe fn copy_batch_raw(
    src: *const u8,
    src_len: usize,
    dst: *mut u8,
    dst_len: usize,
    descs: &[kvp_copy_desc],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    check_descs("copy", descs, src_len, Some(dst_len))?;
    if std::ptr::eq(src, dst) {
        check_no_overlap(descs)?;
    }
    // SAFETY: ranges checked; the caller's contract covers validity and aliasing.
    unsafe { launch_copy(src, dst, descs, launch) };
    Ok(())
}

fn check_no_overlap(descs: &[kvp_copy_desc]) -> Result<(), KernelError> {
    for (index, d) in descs.iter().enumerate() {
        // Ranges were checked not to overflow.
        if d.bytes > 0
            && d.src_offset < d.dst_offset + d.bytes
            && d.dst_offset < d.src_offset + d.bytes
        {
            return Err(KernelError::DescOverlap { index });
        }
    }
    Ok(())
}

/// [`copy_batch`] within one buffer (e.g. moving blocks between slots of one arena).
/// Descriptors whose source and destination ranges overlap are refused.
pub fn copy_within(
    buf: &mut [u8],
    descs: &[kvp_copy_desc],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    check_descs("copy", descs, buf.len(), Some(buf.len()))?;
    for (index, d) in descs.iter().enumerate() {
        if d.bytes > 0
            && d.src_offset < d.dst_offset + d.bytes
            && d.dst_offset < d.src_offset + d.bytes
        {
            return Err(KernelError::DescOverlap { index });
        }
    }
    let ptr = buf.as_mut_ptr();
    // SAFETY: ranges checked against `buf`, and no descriptor's ranges overlap.
    unsafe { launch_copy(ptr, ptr, descs, launch) };
    Ok(())
}

/// # Safety
/// Every descriptor's source range must be readable from `src` and its destination
/// range writable at `dst`, with no descriptor's destination overlapping any source
/// being read concurrently.
unsafe fn launch_copy(src: *const u8, dst: *mut u8, descs: &[kvp_copy_desc], launch: HostLaunch) {
    if descs.is_empty() {
        return;
    }
    let total: u64 = descs.iter().map(|d| d.bytes >> 20).sum::<u64>() + 1;
    let (src, dst) = (SendPtr(src as *mut u8), SendPtr(dst));
    // Few descriptors: split each across threads (x); many: spread descriptors (y).
    let x_split = (descs.len() as u32) < launch.threads;
    run_split(
        launch.threads,
        total.max(descs.len() as u64),
        |g| {
            let (src, dst) = (&src, &dst);
            // SAFETY: the caller's contract; threads copy disjoint chunks or descriptors.
            unsafe { kvp_host_copy_batch(&g, src.0, dst.0, descs.as_ptr(), descs.len() as u32) }
        },
        x_split,
    );
}

/// Checksums ("kvp checksum v1", equal to [`crate::checksum64`]) of the ranges
/// `base[src_offset .. src_offset + bytes]` of every descriptor, in one launch.
pub fn checksum_batch(
    base: &[u8],
    descs: &[kvp_copy_desc],
    sums: &mut [u64],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: a live shared slice is valid for reads of its length.
    unsafe { checksum_batch_raw(base.as_ptr(), base.len(), descs, sums, launch) }
}

/// [`checksum_batch`] over a raw buffer (device memory of the host backend).
///
/// # Safety
/// `base` must be valid for reads of `base_len` bytes and not written during the call.
pub unsafe fn checksum_batch_raw(
    base: *const u8,
    base_len: usize,
    descs: &[kvp_copy_desc],
    sums: &mut [u64],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    check_reduction("checksum", descs, base_len, sums.len())?;
    if descs.is_empty() {
        return Ok(());
    }
    sums.fill(0);
    let words: u64 = descs.iter().map(|d| d.bytes >> 16).sum::<u64>() + 1;
    let sums_ptr = SendPtr(sums.as_mut_ptr() as *mut u8);
    let base_ptr = SendPtr(base as *mut u8);
    run_split(
        launch.threads,
        words,
        |g| {
            let (sums_ptr, base_ptr) = (&sums_ptr, &base_ptr);
            // SAFETY: ranges checked against `base_len` (caller: readable); `sums` has one
            // slot per descriptor and the kernel adds to it atomically.
            unsafe {
                kvp_host_checksum_partial(
                    &g,
                    base_ptr.0,
                    descs.as_ptr(),
                    descs.len() as u32,
                    sums_ptr.0 as *mut u64,
                )
            }
        },
        true,
    );
    let one = HostGrid {
        grid_x: 1,
        grid_y: 1,
        block_x: 1,
        block_y: 1,
        block_begin: 0,
        block_end: 1,
    };
    // SAFETY: one slot per descriptor; the partial launch has finished (scope joined).
    unsafe {
        kvp_host_checksum_finalize(&one, descs.as_ptr(), descs.len() as u32, sums.as_mut_ptr())
    };
    Ok(())
}

/// The checks of a launch that reduces each descriptor's source range to one result
/// (checksum, MAC): ranges inside the `base_len` buffer, one result slot per descriptor.
fn check_reduction(
    op: &'static str,
    descs: &[kvp_copy_desc],
    base_len: usize,
    results: usize,
) -> Result<(), KernelError> {
    check_descs(op, descs, base_len, None)?;
    if results != descs.len() {
        return Err(KernelError::SumsLength {
            op,
            descs: descs.len(),
            sums: results,
        });
    }
    Ok(())
}

/// Bytes of a slot MAC (keyed BLAKE3's default output).
pub const MAC_BYTES: usize = 32;

/// The MAC kernels' table for `descs` (see `mac.cu`): each descriptor's `dst_offset` set
/// to its place in the chaining-value scratch, the scratch's length in 32-byte entries
/// and the levels of parent merges the largest descriptor needs. Shared by the host
/// wrappers and the cuda backend.
pub fn mac_table(descs: &[kvp_copy_desc]) -> (Vec<kvp_copy_desc>, u64, u32) {
    let mut entries = 0u64;
    let mut max_chunks = 1u64;
    let table = descs
        .iter()
        .map(|d| {
            let chunks = mac_chunks(d.bytes);
            let at = entries;
            entries += chunks;
            max_chunks = max_chunks.max(chunks);
            kvp_copy_desc {
                src_offset: d.src_offset,
                dst_offset: at * MAC_BYTES as u64,
                bytes: d.bytes,
            }
        })
        .collect();
    // Levels until one node is left: ceil(log2(max_chunks)).
    let levels = u64::BITS - (max_chunks - 1).leading_zeros();
    (table, entries, levels)
}

/// BLAKE3 chunks (1 KiB) of an input of `bytes` (an empty input is one chunk).
fn mac_chunks(bytes: u64) -> u64 {
    bytes.div_ceil(1024).max(1)
}

/// The key as the kernels take it: 8 little-endian words.
pub fn mac_key_words(key: &[u8; 32]) -> [u32; 8] {
    std::array::from_fn(|i| u32::from_le_bytes(key[4 * i..4 * i + 4].try_into().expect("4")))
}

/// Slot MACs (keyed BLAKE3 under `key`, equal to `blake3::keyed_hash`) of the ranges
/// `base[src_offset .. src_offset + bytes]` of every descriptor, by the MAC kernels.
pub fn mac_batch(
    base: &[u8],
    descs: &[kvp_copy_desc],
    key: &[u8; 32],
    macs: &mut [[u8; MAC_BYTES]],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    // SAFETY: a live shared slice is valid for reads of its length.
    unsafe { mac_batch_raw(base.as_ptr(), base.len(), descs, key, macs, launch) }
}

/// [`mac_batch`] over a raw buffer (device memory of the host backend).
///
/// # Safety
/// `base` must be valid for reads of `base_len` bytes and not written during the call.
pub unsafe fn mac_batch_raw(
    base: *const u8,
    base_len: usize,
    descs: &[kvp_copy_desc],
    key: &[u8; 32],
    macs: &mut [[u8; MAC_BYTES]],
    launch: HostLaunch,
) -> Result<(), KernelError> {
    check_reduction("mac", descs, base_len, macs.len())?;
    if descs.is_empty() {
        return Ok(());
    }
    let (table, entries, levels) = mac_table(descs);
    let key = mac_key_words(key);
    // Chaining values and the packed results as u32 words: the kernels store words.
    let mut cvs = vec![0u32; entries as usize * 8];
    let mut roots = vec![0u32; descs.len() * 8];
    let cvs_ptr = SendPtr(cvs.as_mut_ptr() as *mut u8);
    let roots_ptr = SendPtr(roots.as_mut_ptr() as *mut u8);
    let base_ptr = SendPtr(base as *mut u8);
    run_split(
        launch.threads,
        entries,
        |g| {
            let (cvs_ptr, base_ptr, roots_ptr) = (&cvs_ptr, &base_ptr, &roots_ptr);
            // SAFETY: ranges checked against `base_len` (caller: readable); each
            // descriptor's scratch lies inside `cvs` (mac_table) and its result inside
            // `roots` (8 words each); the threads of one launch write disjoint chunks.
            unsafe {
                kvp_host_mac_chunks(
                    &g,
                    base_ptr.0,
                    table.as_ptr(),
                    table.len() as u32,
                    key.as_ptr(),
                    cvs_ptr.0,
                    roots_ptr.0,
                )
            }
        },
        true,
    );
    for level in 0..levels {
        run_split(
            launch.threads,
            entries >> (level + 1),
            |g| {
                let (cvs_ptr, roots_ptr) = (&cvs_ptr, &roots_ptr);
                // SAFETY: as above; pairs of one level touch disjoint entries, and the
                // previous level's launch has finished (scope joined).
                unsafe {
                    kvp_host_mac_parents(
                        &g,
                        table.as_ptr(),
                        table.len() as u32,
                        key.as_ptr(),
                        cvs_ptr.0,
                        roots_ptr.0,
                        level,
                    )
                }
            },
            true,
        );
    }
    mac_results(&roots, macs);
    Ok(())
}

/// Each descriptor's MAC from the kernels' packed results (8 words each).
pub fn mac_results(roots: &[u32], macs: &mut [[u8; MAC_BYTES]]) {
    for (mac, root) in macs.iter_mut().zip(roots.chunks_exact(8)) {
        for (i, w) in root.iter().enumerate() {
            mac[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// The checksum kernel over one buffer.
pub fn checksum_block(data: &[u8]) -> u64 {
    let desc = kvp_copy_desc {
        src_offset: 0,
        dst_offset: 0,
        bytes: data.len() as u64,
    };
    let mut sum = [0u64];
    checksum_batch(data, &[desc], &mut sum, HostLaunch::default())
        .expect("one descriptor covering the buffer is in range");
    sum[0]
}

/// A raw pointer handed to the scoped launch threads.
struct SendPtr(*mut u8);
// SAFETY: only used inside `std::thread::scope` launches whose work split keeps the
// threads' accesses disjoint (see each call site).
unsafe impl Sync for SendPtr {}
// SAFETY: as above.
unsafe impl Send for SendPtr {}

/// Runs the host build of a kernel with a GPU launch shape, thread by thread, on one OS
/// thread. Slow; for tests that check the kernels' work split under the exact grid and
/// block dimensions the cuda backend uses.
pub mod emulate {
    use super::*;
    use crate::geometry::GpuLaunch;

    fn grid(l: GpuLaunch) -> HostGrid {
        HostGrid {
            grid_x: l.grid.0,
            grid_y: l.grid.1,
            block_x: l.block.0,
            block_y: l.block.1,
            block_begin: 0,
            block_end: u64::from(l.grid.0) * u64::from(l.grid.1),
        }
    }

    /// [`gather`] with launch shape `l`.
    pub fn gather(
        engine: &EngineKv,
        layout: &PagedLayout,
        pages: &[u32],
        blocks: &mut [u8],
        l: GpuLaunch,
    ) -> Result<(), KernelError> {
        gather_at(engine, layout, pages, blocks, None, l)
    }

    /// [`gather_slots`] with launch shape `l`.
    pub fn gather_slots(
        engine: &EngineKv,
        layout: &PagedLayout,
        pages: &[u32],
        blocks: &mut [u8],
        block_offsets: &[u64],
        l: GpuLaunch,
    ) -> Result<(), KernelError> {
        gather_at(engine, layout, pages, blocks, Some(block_offsets), l)
    }

    fn gather_at(
        engine: &EngineKv,
        layout: &PagedLayout,
        pages: &[u32],
        blocks: &mut [u8],
        block_offsets: Option<&[u64]>,
        l: GpuLaunch,
    ) -> Result<(), KernelError> {
        check_paged_batch(
            "gather",
            layout,
            engine.len_bytes,
            pages,
            blocks.len(),
            block_offsets,
            false,
        )?;
        let g = grid(l);
        // SAFETY: as in `paged_raw` (all checks done above), on one thread.
        unsafe {
            kvp_host_paged_gather(
                &g,
                engine.base.as_ptr(),
                blocks.as_mut_ptr(),
                layout.raw(),
                pages.as_ptr(),
                block_offsets.map_or(std::ptr::null(), <[u64]>::as_ptr),
                pages.len() as u32,
            )
        };
        Ok(())
    }

    /// [`copy_batch`] with launch shape `l`.
    pub fn copy_batch(
        src: &[u8],
        dst: &mut [u8],
        descs: &[kvp_copy_desc],
        l: GpuLaunch,
    ) -> Result<(), KernelError> {
        check_descs("copy", descs, src.len(), Some(dst.len()))?;
        let g = grid(l);
        // SAFETY: ranges checked; distinct borrows.
        unsafe {
            kvp_host_copy_batch(
                &g,
                src.as_ptr(),
                dst.as_mut_ptr(),
                descs.as_ptr(),
                descs.len() as u32,
            )
        };
        Ok(())
    }

    /// [`mac_batch`] with the cuda backend's launch shapes (`geometry::mac_chunks`,
    /// `geometry::mac_parents`).
    pub fn mac_batch(
        base: &[u8],
        descs: &[kvp_copy_desc],
        key: &[u8; 32],
        macs: &mut [[u8; MAC_BYTES]],
    ) -> Result<(), KernelError> {
        check_reduction("mac", descs, base.len(), macs.len())?;
        let (table, entries, levels) = mac_table(descs);
        let key = mac_key_words(key);
        let mut cvs = vec![0u32; entries as usize * 8];
        let mut roots = vec![0u32; descs.len() * 8];
        let g = grid(crate::geometry::mac_chunks(&table));
        // SAFETY: ranges checked; each descriptor's scratch lies inside `cvs`.
        unsafe {
            kvp_host_mac_chunks(
                &g,
                base.as_ptr(),
                table.as_ptr(),
                table.len() as u32,
                key.as_ptr(),
                cvs.as_mut_ptr() as *mut u8,
                roots.as_mut_ptr() as *mut u8,
            );
        }
        for level in 0..levels {
            let g = grid(crate::geometry::mac_parents(&table, level));
            // SAFETY: as above.
            unsafe {
                kvp_host_mac_parents(
                    &g,
                    table.as_ptr(),
                    table.len() as u32,
                    key.as_ptr(),
                    cvs.as_mut_ptr() as *mut u8,
                    roots.as_mut_ptr() as *mut u8,
                    level,
                );
            }
        }
        mac_results(&roots, macs);
        Ok(())
    }

    /// [`checksum_batch`] with launch shapes `partial` and `finalize`.
    pub fn checksum_batch(
        base: &[u8],
        descs: &[kvp_copy_desc],
        sums: &mut [u64],
        partial: GpuLaunch,
        finalize: GpuLaunch,
    ) -> Result<(), KernelError> {
        check_reduction("checksum", descs, base.len(), sums.len())?;
        sums.fill(0);
        let (p, f) = (grid(partial), grid(finalize));
        // SAFETY: ranges checked; one sum slot per descriptor.
        unsafe {
            kvp_host_checksum_partial(
                &p,
                base.as_ptr(),
                descs.as_ptr(),
                descs.len() as u32,
                sums.as_mut_ptr(),
            );
            kvp_host_checksum_finalize(&f, descs.as_ptr(), descs.len() as u32, sums.as_mut_ptr());
        }
        Ok(())
    }
}
