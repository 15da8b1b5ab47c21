//! The shimmed kernels against a plain Rust reference, for every engine layout kvplane
//! describes, every dtype width, odd sizes and unaligned offsets, on random data with
//! poisoned outputs (so a byte the kernel fails to write shows up).

use kvplane_ffi::{kvp_copy_desc, kvp_kv_layout};
use kvplane_kernels::{
    EngineKv, HostLaunch, KernelError, PagedLayout, checksum_batch, checksum_block, checksum64,
    copy_batch, copy_within, gather, gather_slots, scatter, scatter_slots,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::ptr::NonNull;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// vLLM flash-attn: per layer [2, pages, tokens, heads, dim].
    VllmKvFirst,
    /// vLLM flashinfer: per layer [pages, 2, tokens, heads, dim].
    VllmPagesFirst,
    /// SGLang MHA pool: per layer separate K and V tensors [pages * tokens, heads, dim].
    SglangTokenMajor,
    /// TRT-LLM pool: [pages, layers, 2, heads, tokens, dim] (head-major within a page).
    TrtllmHeadMajor,
    /// MLA (DeepSeek): per layer [pages, tokens, latent], one plane, one "head".
    Mla,
}

const KINDS: [Kind; 5] = [
    Kind::VllmKvFirst,
    Kind::VllmPagesFirst,
    Kind::SglangTokenMajor,
    Kind::TrtllmHeadMajor,
    Kind::Mla,
];

#[derive(Debug, Clone, Copy)]
struct Geometry {
    layers: u32,
    pages: u64,
    tokens: u32,
    heads: u32,
    head_dim: u32,
    dtype_bytes: u32,
    /// Added to every tensor's start (unaligned when odd).
    skew_bytes: u64,
    /// Padding after every tensor and inside page strides (odd = unaligned strides).
    pad_bytes: u64,
}

fn zeroed_layout() -> kvp_kv_layout {
    // SAFETY: kvp_kv_layout is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Builds the layout an engine of `kind` would register, and its buffer size.
fn build(kind: Kind, g: Geometry) -> kvp_kv_layout {
    let mut l = zeroed_layout();
    let planes: u32 = if kind == Kind::Mla { 1 } else { 2 };
    let heads = if kind == Kind::Mla { 1 } else { g.heads };
    let head_bytes = u64::from(g.head_dim * g.dtype_bytes);
    let (t, h, p) = (u64::from(g.tokens), u64::from(heads), g.pages);
    l.num_layers = g.layers;
    l.kv_planes = planes;
    l.page_tokens = g.tokens;
    l.kv_heads = heads;
    l.head_bytes = head_bytes as u32;
    l.dtype_bytes = g.dtype_bytes;
    l.num_pages = p;
    let mut cursor = g.skew_bytes;
    let mut tensor = |bytes: u64| {
        let at = cursor;
        cursor += bytes + g.pad_bytes;
        at
    };
    match kind {
        Kind::VllmKvFirst => {
            l.head_stride_bytes = head_bytes;
            l.token_stride_bytes = h * head_bytes;
            l.page_stride_bytes = t * h * head_bytes + g.pad_bytes;
            for layer in 0..g.layers as usize {
                let base = tensor(2 * p * l.page_stride_bytes);
                l.plane_offset[0][layer] = base;
                l.plane_offset[1][layer] = base + p * l.page_stride_bytes;
            }
        }
        Kind::VllmPagesFirst => {
            let plane = t * h * head_bytes;
            l.head_stride_bytes = head_bytes;
            l.token_stride_bytes = h * head_bytes;
            l.page_stride_bytes = 2 * plane + g.pad_bytes;
            for layer in 0..g.layers as usize {
                let base = tensor(p * l.page_stride_bytes);
                l.plane_offset[0][layer] = base;
                l.plane_offset[1][layer] = base + plane;
            }
        }
        Kind::SglangTokenMajor => {
            // Token rows padded (odd pad: unaligned rows), pages are runs of tokens.
            l.head_stride_bytes = head_bytes;
            l.token_stride_bytes = h * head_bytes + g.pad_bytes;
            l.page_stride_bytes = t * l.token_stride_bytes;
            for layer in 0..g.layers as usize {
                l.plane_offset[0][layer] = tensor(p * l.page_stride_bytes);
                l.plane_offset[1][layer] = tensor(p * l.page_stride_bytes);
            }
        }
        Kind::TrtllmHeadMajor => {
            l.token_stride_bytes = head_bytes;
            l.head_stride_bytes = t * head_bytes + g.pad_bytes;
            let plane = h * l.head_stride_bytes;
            l.page_stride_bytes = u64::from(g.layers) * 2 * plane;
            let base = tensor(p * l.page_stride_bytes);
            for layer in 0..g.layers as usize {
                l.plane_offset[0][layer] = base + (2 * layer as u64) * plane;
                l.plane_offset[1][layer] = base + (2 * layer as u64 + 1) * plane;
            }
        }
        Kind::Mla => {
            l.head_stride_bytes = head_bytes;
            l.token_stride_bytes = head_bytes;
            l.page_stride_bytes = t * head_bytes + g.pad_bytes;
            for layer in 0..g.layers as usize {
                l.plane_offset[0][layer] = tensor(p * l.page_stride_bytes);
            }
        }
    }
    l.buffer_bytes = cursor;
    l
}

fn engine_addr(l: &kvp_kv_layout, layer: u32, plane: u32, page: u64, t: u32, h: u32) -> usize {
    (l.plane_offset[plane as usize][layer as usize]
        + page * l.page_stride_bytes
        + u64::from(t) * l.token_stride_bytes
        + u64::from(h) * l.head_stride_bytes) as usize
}

/// The definition of gather: block i = [layers][planes][tokens][heads][head_bytes] of
/// page pages[i]. Asserts it writes every destination byte exactly once.
fn reference_gather(l: &kvp_kv_layout, engine: &[u8], pages: &[u32]) -> Vec<u8> {
    let hb = l.head_bytes as usize;
    let block = (l.num_layers * l.kv_planes * l.page_tokens * l.kv_heads) as usize * hb;
    let mut out = vec![0u8; pages.len() * block];
    let mut written = vec![0u8; out.len()];
    let mut at = 0usize;
    for &page in pages {
        for layer in 0..l.num_layers {
            for plane in 0..l.kv_planes {
                for t in 0..l.page_tokens {
                    for h in 0..l.kv_heads {
                        let src = engine_addr(l, layer, plane, u64::from(page), t, h);
                        out[at..at + hb].copy_from_slice(&engine[src..src + hb]);
                        written[at..at + hb].iter_mut().for_each(|w| *w += 1);
                        at += hb;
                    }
                }
            }
        }
    }
    assert!(
        written.iter().all(|&w| w == 1),
        "reference covers each byte once"
    );
    out
}

fn reference_scatter(l: &kvp_kv_layout, engine: &mut [u8], pages: &[u32], blocks: &[u8]) {
    let hb = l.head_bytes as usize;
    let mut at = 0usize;
    for &page in pages {
        for layer in 0..l.num_layers {
            for plane in 0..l.kv_planes {
                for t in 0..l.page_tokens {
                    for h in 0..l.kv_heads {
                        let dst = engine_addr(l, layer, plane, u64::from(page), t, h);
                        engine[dst..dst + hb].copy_from_slice(&blocks[at..at + hb]);
                        at += hb;
                    }
                }
            }
        }
    }
}

/// One past the highest byte any (layer, plane, page, token, head) touches.
fn brute_force_span(l: &kvp_kv_layout) -> u64 {
    let mut span = 0;
    for layer in 0..l.num_layers {
        for plane in 0..l.kv_planes {
            for page in 0..l.num_pages {
                for t in 0..l.page_tokens {
                    for h in 0..l.kv_heads {
                        let end = engine_addr(l, layer, plane, page, t, h) + l.head_bytes as usize;
                        span = span.max(end as u64);
                    }
                }
            }
        }
    }
    span
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Engine buffer with an extra `shift` bytes in front, so the buffer itself starts at an
/// arbitrary alignment.
struct Engine {
    storage: Vec<u8>,
    shift: usize,
}

impl Engine {
    fn kv(&mut self) -> EngineKv {
        let len = self.storage.len() - self.shift;
        let ptr = NonNull::new(self.storage[self.shift..].as_mut_ptr()).expect("non-null");
        // SAFETY: the Vec outlives every use of the returned EngineKv in these tests and
        // is not otherwise accessed while a launch runs.
        unsafe { EngineKv::new(ptr, len) }
    }
    fn bytes(&self) -> &[u8] {
        &self.storage[self.shift..]
    }
}

fn geometries() -> Vec<Geometry> {
    let mut out = Vec::new();
    for dtype_bytes in [1u32, 2, 4] {
        // Realistic-shaped, aligned.
        out.push(Geometry {
            layers: 3,
            pages: 7,
            tokens: 16,
            heads: 4,
            head_dim: 64,
            dtype_bytes,
            skew_bytes: 0,
            pad_bytes: 0,
        });
        // Odd sizes, unaligned starts and strides.
        out.push(Geometry {
            layers: 2,
            pages: 5,
            tokens: 3,
            heads: 3,
            head_dim: 5,
            dtype_bytes,
            skew_bytes: 3,
            pad_bytes: 5,
        });
        // One token, one head, alignment 8 but not 16.
        out.push(Geometry {
            layers: 1,
            pages: 4,
            tokens: 1,
            heads: 1,
            head_dim: 12,
            dtype_bytes,
            skew_bytes: 8,
            pad_bytes: 8,
        });
    }
    out
}

#[test]
fn gather_and_scatter_equal_reference_for_every_layout() {
    let mut rng = StdRng::seed_from_u64(0x6b76_706c_616e_6501);
    let mut cases = 0;
    for kind in KINDS {
        for g in geometries() {
            for shift in [0usize, 1, 6] {
                let raw = build(kind, g);
                let layout = PagedLayout::new(&raw)
                    .unwrap_or_else(|e| panic!("{kind:?} {g:?}: layout refused: {e}"));
                assert_eq!(
                    layout.info().span_bytes,
                    brute_force_span(&raw),
                    "{kind:?} {g:?}"
                );
                let mut engine = Engine {
                    storage: random_bytes(&mut rng, shift + raw.buffer_bytes as usize),
                    shift,
                };
                // Repeats and any order; every page of the pool once more at the end.
                let mut pages: Vec<u32> = (0..9)
                    .map(|_| rng.random_range(0..g.pages as u32))
                    .collect();
                pages.extend(0..g.pages as u32);
                let want = reference_gather(&raw, engine.bytes(), &pages);
                for (poison, threads) in [(0xA5u8, 1u32), (0x5A, 3)] {
                    let mut got = vec![poison; want.len()];
                    gather(
                        &engine.kv(),
                        &layout,
                        &pages,
                        &mut got,
                        HostLaunch { threads },
                    )
                    .expect("gather");
                    assert!(
                        got == want,
                        "{kind:?} {g:?} shift {shift} threads {threads}: gather differs"
                    );
                }

                // Scatter distinct pages (a random permutation of a subset).
                let mut distinct: Vec<u32> = (0..g.pages as u32).collect();
                for i in (1..distinct.len()).rev() {
                    distinct.swap(i, rng.random_range(0..=i));
                }
                distinct.truncate(distinct.len() - 1);
                let block_bytes = layout.info().block_bytes as usize;
                let blocks = random_bytes(&mut rng, distinct.len() * block_bytes);
                let mut want_engine = engine.bytes().to_vec();
                reference_scatter(&raw, &mut want_engine, &distinct, &blocks);
                scatter(
                    &engine.kv(),
                    &layout,
                    &distinct,
                    &blocks,
                    HostLaunch { threads: 2 },
                )
                .expect("scatter");
                assert!(
                    engine.bytes() == want_engine.as_slice(),
                    "{kind:?} {g:?} shift {shift}: scatter differs (or wrote outside its pages)"
                );
                // And back: gathering what was scattered returns the blocks.
                let mut back = vec![0xEEu8; blocks.len()];
                gather(
                    &engine.kv(),
                    &layout,
                    &distinct,
                    &mut back,
                    HostLaunch::default(),
                )
                .expect("gather back");
                assert!(back == blocks, "{kind:?} {g:?}: round trip differs");
                cases += 1;
            }
        }
    }
    assert_eq!(cases, KINDS.len() * 9 * 3);
}

#[test]
fn run_split_matches_layout_kind() {
    let g = geometries()[0];
    let hb = u64::from(g.head_dim * g.dtype_bytes);
    let info = |k| {
        PagedLayout::new(&build(k, g))
            .expect("valid")
            .info()
            .run_bytes
    };
    // vLLM and SGLang (unpadded) pages are contiguous per (layer, plane): one long run.
    assert_eq!(info(Kind::VllmKvFirst), u64::from(g.tokens * g.heads) * hb);
    assert_eq!(
        info(Kind::SglangTokenMajor),
        u64::from(g.tokens * g.heads) * hb
    );
    // TRT-LLM's head-major page moves head by head.
    assert_eq!(info(Kind::TrtllmHeadMajor), hb);
    assert_eq!(info(Kind::Mla), u64::from(g.tokens) * hb);
}

#[test]
fn bad_batches_are_refused_before_any_copy() {
    let g = geometries()[0];
    let raw = build(Kind::VllmKvFirst, g);
    let layout = PagedLayout::new(&raw).expect("valid");
    let block_bytes = layout.info().block_bytes as usize;
    let mut rng = StdRng::seed_from_u64(7);
    let mut engine = Engine {
        storage: random_bytes(&mut rng, raw.buffer_bytes as usize),
        shift: 0,
    };
    let mut dst = vec![0x11u8; 2 * block_bytes];
    let err = gather(
        &engine.kv(),
        &layout,
        &[1, 7],
        &mut dst,
        HostLaunch::default(),
    );
    assert_eq!(
        err,
        Err(KernelError::PageOutOfRange {
            op: "gather",
            index: 1,
            page: 7,
            num_pages: 7
        })
    );
    assert!(dst.iter().all(|&b| b == 0x11), "nothing copied on error");
    let err = gather(
        &engine.kv(),
        &layout,
        &[u32::MAX, 0],
        &mut dst,
        HostLaunch::default(),
    );
    assert!(matches!(
        err,
        Err(KernelError::PageOutOfRange { index: 0, .. })
    ));
    let err = gather(&engine.kv(), &layout, &[1], &mut dst, HostLaunch::default());
    assert!(matches!(err, Err(KernelError::BlockBufferSize { .. })));
    let before = engine.bytes().to_vec();
    let err = scatter(
        &engine.kv(),
        &layout,
        &[3, 2, 3],
        &vec![0u8; 3 * block_bytes],
        HostLaunch::default(),
    );
    assert_eq!(
        err,
        Err(KernelError::DuplicatePage {
            page: 3,
            first: 0,
            second: 2
        })
    );
    assert!(engine.bytes() == before.as_slice());
    // An engine mapping shorter than the layout claims.
    let short = {
        let ptr = NonNull::new(engine.storage.as_mut_ptr()).expect("non-null");
        // SAFETY: a prefix of a live Vec.
        unsafe { EngineKv::new(ptr, raw.buffer_bytes as usize - 1) }
    };
    let err = gather(
        &short,
        &layout,
        &[0],
        &mut dst[..block_bytes],
        HostLaunch::default(),
    );
    assert!(matches!(err, Err(KernelError::EngineBufferTooSmall { .. })));
    // Empty batches are fine.
    gather(&engine.kv(), &layout, &[], &mut [], HostLaunch::default()).expect("empty");
}

fn desc(src_offset: u64, dst_offset: u64, bytes: u64) -> kvp_copy_desc {
    kvp_copy_desc {
        src_offset,
        dst_offset,
        bytes,
    }
}

#[test]
fn copy_batch_equals_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    let src = random_bytes(&mut rng, 1 << 20);
    for threads in [1u32, 2, 5] {
        // Disjoint destination slots of random odd sizes at random (unaligned) offsets.
        let mut descs = Vec::new();
        let mut dst_cursor = 0u64;
        for i in 0..64u64 {
            let bytes = match i % 4 {
                0 => rng.random_range(0..40),
                1 => rng.random_range(1..4096),
                2 => 16 * rng.random_range(1..2048),
                _ => rng.random_range(65536..200_000),
            };
            let src_offset = rng.random_range(0..(src.len() as u64 - bytes));
            dst_cursor += rng.random_range(0..17);
            descs.push(desc(src_offset, dst_cursor, bytes));
            dst_cursor += bytes;
        }
        let mut want = random_bytes(&mut rng, dst_cursor as usize + 33);
        let mut got = want.clone();
        for d in &descs {
            let (s, t, n) = (
                d.src_offset as usize,
                d.dst_offset as usize,
                d.bytes as usize,
            );
            want[t..t + n].copy_from_slice(&src[s..s + n]);
        }
        copy_batch(&src, &mut got, &descs, HostLaunch { threads }).expect("copy");
        assert!(got == want, "threads {threads}");
        // One big descriptor split across threads.
        let mut big = vec![0u8; src.len()];
        copy_batch(
            &src,
            &mut big,
            &[desc(0, 0, src.len() as u64)],
            HostLaunch { threads },
        )
        .expect("copy one");
        assert!(big == src);
    }
}

#[test]
fn copy_refuses_bad_descriptors() {
    let src = vec![1u8; 100];
    let mut dst = vec![0u8; 50];
    let err = copy_batch(
        &src,
        &mut dst,
        &[desc(0, 0, 10), desc(95, 0, 6)],
        HostLaunch::default(),
    );
    assert!(matches!(
        err,
        Err(KernelError::DescOutOfRange {
            index: 1,
            side: "source",
            ..
        })
    ));
    let err = copy_batch(&src, &mut dst, &[desc(0, 45, 6)], HostLaunch::default());
    assert!(matches!(
        err,
        Err(KernelError::DescOutOfRange {
            side: "destination",
            ..
        })
    ));
    let err = copy_batch(
        &src,
        &mut dst,
        &[desc(u64::MAX, 0, 2)],
        HostLaunch::default(),
    );
    assert!(matches!(err, Err(KernelError::DescOutOfRange { .. })));
    assert!(dst.iter().all(|&b| b == 0), "nothing copied on error");
    let mut buf: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
    let err = copy_within(
        &mut buf,
        &[desc(0, 100, 50), desc(10, 20, 20)],
        HostLaunch::default(),
    );
    assert_eq!(err, Err(KernelError::DescOverlap { index: 1 }));
    copy_within(
        &mut buf,
        &[desc(0, 100, 50), desc(150, 60, 30)],
        HostLaunch::default(),
    )
    .expect("disjoint");
    assert_eq!(buf[100..150], (0..50u8).collect::<Vec<_>>()[..]);
    assert_eq!(buf[60..90], (150..180u8).collect::<Vec<_>>()[..]);
}

#[test]
fn checksum_kernel_equals_checksum64() {
    let mut rng = StdRng::seed_from_u64(0xC5);
    let data = random_bytes(&mut rng, 3 << 20);
    for len in (0..80).chain([4095, 4096, 4097, 65_536 + 3]) {
        for start in 0..9 {
            let slice = &data[start..start + len];
            assert_eq!(
                checksum_block(slice),
                checksum64(slice),
                "len {len} start {start}"
            );
        }
    }
    let descs: Vec<kvp_copy_desc> = (0..40u64)
        .map(|_| {
            let bytes = rng.random_range(0..70_000);
            desc(rng.random_range(0..(data.len() as u64 - bytes)), 0, bytes)
        })
        .chain([desc(1, 0, (data.len() - 1) as u64)])
        .collect();
    for threads in [1u32, 4] {
        let mut sums = vec![0xDEAD_BEEFu64; descs.len()];
        checksum_batch(&data, &descs, &mut sums, HostLaunch { threads }).expect("checksum");
        for (d, s) in descs.iter().zip(&sums) {
            let r = d.src_offset as usize..(d.src_offset + d.bytes) as usize;
            assert_eq!(*s, checksum64(&data[r]), "threads {threads}");
        }
    }
    let mut short = vec![0u64; 1];
    assert!(matches!(
        checksum_batch(&data, &descs, &mut short, HostLaunch::default()),
        Err(KernelError::SumsLength { .. })
    ));
}

/// The kernels under the exact grid/block shapes the cuda backend launches with (every
/// CUDA thread run in turn on the CPU): same bytes as the reference.
#[test]
fn gpu_launch_shapes_give_reference_results() {
    use kvplane_kernels::geometry;
    use kvplane_kernels::host::emulate;
    let mut rng = StdRng::seed_from_u64(0x6e70);
    for kind in KINDS {
        for g in [geometries()[0], geometries()[4]] {
            let raw = build(kind, g);
            let layout = PagedLayout::new(&raw).expect("valid");
            let mut engine = Engine {
                storage: random_bytes(&mut rng, 1 + raw.buffer_bytes as usize),
                shift: 1,
            };
            let pages: Vec<u32> = (0..g.pages as u32).rev().collect();
            let want = reference_gather(&raw, engine.bytes(), &pages);
            let mut got = vec![0xA5u8; want.len()];
            let shape = geometry::paged(
                layout.info(),
                raw.num_layers * raw.kv_planes,
                pages.len() as u32,
            );
            emulate::gather(&engine.kv(), &layout, &pages, &mut got, shape).expect("gather");
            assert!(got == want, "{kind:?} {g:?} shape {shape:?}");
            // A deliberately odd shape too: kernels must not depend on the shape.
            let odd = geometry::GpuLaunch {
                grid: (3, 2, 1),
                block: (5, 3, 1),
            };
            let mut got = vec![0x5Au8; want.len()];
            emulate::gather(&engine.kv(), &layout, &pages, &mut got, odd).expect("gather");
            assert!(got == want, "{kind:?} {g:?} odd shape");
        }
    }
    let src = random_bytes(&mut rng, 600_000);
    let descs: Vec<kvp_copy_desc> = [
        (3u64, 0u64, 200_001u64),
        (0, 200_016, 16),
        (100, 200_100, 300_000),
        (7, 500_200, 0),
    ]
    .iter()
    .map(|&(s, d, n)| desc(s, d, n))
    .collect();
    let mut want = vec![0u8; 600_000];
    for d in &descs {
        let (s, t, n) = (
            d.src_offset as usize,
            d.dst_offset as usize,
            d.bytes as usize,
        );
        want[t..t + n].copy_from_slice(&src[s..s + n]);
    }
    let mut got = vec![0u8; 600_000];
    emulate::copy_batch(&src, &mut got, &descs, geometry::copy(&descs)).expect("copy");
    assert!(got == want);
    let mut sums = vec![0u64; descs.len()];
    emulate::checksum_batch(
        &src,
        &descs,
        &mut sums,
        geometry::checksum(&descs),
        geometry::checksum_finalize(descs.len()),
    )
    .expect("checksum");
    for (d, s) in descs.iter().zip(&sums) {
        assert_eq!(
            *s,
            checksum64(&src[d.src_offset as usize..(d.src_offset + d.bytes) as usize])
        );
    }
}

/// Slot offsets for `n` blocks of `block_bytes` in a buffer: a shuffled order of slots
/// `stride` apart (stride > block_bytes, odd, so blocks start unaligned and have gaps
/// between them), from `base`. Returns (offsets, buffer length).
fn shuffled_slots(rng: &mut StdRng, n: usize, block_bytes: usize, base: u64) -> (Vec<u64>, usize) {
    let stride = (block_bytes + 3) as u64 | 1;
    let slots = n + 2;
    let mut order: Vec<u64> = (0..slots as u64).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let offsets = order[..n].iter().map(|s| base + s * stride).collect();
    (offsets, (base + slots as u64 * stride) as usize)
}

/// Slot-addressed gather/scatter equal one contiguous launch per page into the same
/// offsets, for every layout kind, on 1 and 3 launch threads; bytes between and around
/// the slots are never written.
#[test]
fn slot_gather_and_scatter_equal_per_page_launches() {
    let mut rng = StdRng::seed_from_u64(0x510f);
    for kind in KINDS {
        for g in [geometries()[0], geometries()[4], geometries()[8]] {
            let raw = build(kind, g);
            let layout = PagedLayout::new(&raw).expect("valid");
            let bb = layout.info().block_bytes as usize;
            let mut engine = Engine {
                storage: random_bytes(&mut rng, 1 + raw.buffer_bytes as usize),
                shift: 1,
            };
            let mut pages: Vec<u32> = (0..g.pages as u32).rev().collect();
            pages.push(0); // a gather may read one page into two slots
            let (offsets, len) = shuffled_slots(&mut rng, pages.len(), bb, 5);
            // Reference: one contiguous launch per page, copied into its slot.
            let mut want = vec![0xA5u8; len];
            for (p, o) in pages.iter().zip(&offsets) {
                let mut one = vec![0u8; bb];
                gather(
                    &engine.kv(),
                    &layout,
                    &[*p],
                    &mut one,
                    HostLaunch::default(),
                )
                .expect("per-page gather");
                want[*o as usize..*o as usize + bb].copy_from_slice(&one);
            }
            for threads in [1u32, 3] {
                let mut got = vec![0xA5u8; len];
                gather_slots(
                    &engine.kv(),
                    &layout,
                    &pages,
                    &mut got,
                    &offsets,
                    HostLaunch { threads },
                )
                .expect("slot gather");
                assert!(got == want, "{kind:?} {g:?} threads {threads}");
            }
            // Scatter (distinct pages) from the slots == per-page scatters.
            pages.pop();
            let offsets = &offsets[..pages.len()];
            let blocks = random_bytes(&mut rng, len);
            let mut want_engine = engine.storage.clone();
            let mut reference = Engine {
                storage: want_engine.clone(),
                shift: 1,
            };
            for (p, o) in pages.iter().zip(offsets) {
                scatter(
                    &reference.kv(),
                    &layout,
                    &[*p],
                    &blocks[*o as usize..*o as usize + bb],
                    HostLaunch::default(),
                )
                .expect("per-page scatter");
            }
            want_engine.copy_from_slice(&reference.storage);
            for threads in [1u32, 3] {
                let mut e = Engine {
                    storage: engine.storage.clone(),
                    shift: 1,
                };
                scatter_slots(
                    &e.kv(),
                    &layout,
                    &pages,
                    &blocks,
                    offsets,
                    HostLaunch { threads },
                )
                .expect("slot scatter");
                assert!(e.storage == want_engine, "{kind:?} {g:?} threads {threads}");
            }
            // The GPU launch shape, run on the CPU, agrees too.
            let shape = kvplane_kernels::geometry::paged(
                layout.info(),
                raw.num_layers * raw.kv_planes,
                pages.len() as u32,
            );
            let mut got = vec![0xA5u8; len];
            kvplane_kernels::host::emulate::gather_slots(
                &engine.kv(),
                &layout,
                &pages,
                &mut got,
                offsets,
                shape,
            )
            .expect("emulated slot gather");
            let mut want = vec![0xA5u8; len];
            for (p, o) in pages.iter().zip(offsets) {
                let at = *o as usize;
                gather(
                    &engine.kv(),
                    &layout,
                    &[*p],
                    &mut want[at..at + bb],
                    HostLaunch::default(),
                )
                .expect("per-page gather");
            }
            assert!(got == want, "{kind:?} {g:?} GPU shape");
        }
    }
}

#[test]
fn bad_slot_batches_are_refused_before_any_copy() {
    let g = geometries()[0];
    let raw = build(Kind::VllmKvFirst, g);
    let layout = PagedLayout::new(&raw).expect("valid");
    let bb = layout.info().block_bytes;
    let mut engine = Engine {
        storage: random_bytes(&mut StdRng::seed_from_u64(3), raw.buffer_bytes as usize),
        shift: 0,
    };
    let launch = HostLaunch::default();
    let mut buf = vec![0x11u8; 4 * bb as usize];
    let len = buf.len();
    let untouched = |b: &[u8]| b.iter().all(|&x| x == 0x11);
    // One offset per page.
    assert_eq!(
        gather_slots(&engine.kv(), &layout, &[1, 2], &mut buf, &[0], launch),
        Err(KernelError::OffsetsLength {
            op: "gather",
            offsets: 1,
            pages: 2
        })
    );
    // A block reaching past the buffer, by one byte and by overflow.
    for bad in [3 * bb + 1, u64::MAX - 2] {
        assert_eq!(
            gather_slots(&engine.kv(), &layout, &[1, 2], &mut buf, &[0, bad], launch),
            Err(KernelError::SlotOutOfRange {
                op: "gather",
                index: 1,
                offset_bytes: bad,
                block_bytes: bb,
                len_bytes: len
            })
        );
    }
    gather_slots(
        &engine.kv(),
        &layout,
        &[1],
        &mut buf[..len - 1],
        &[0],
        launch,
    )
    .expect("a block that just fits");
    buf.fill(0x11);
    // Overlapping destinations, in and out of order; the same slot twice.
    for offsets in [[0, 2 * bb, bb + 7], [2 * bb, 0, 3 * bb - 1], [bb, 0, bb]] {
        let err = gather_slots(
            &engine.kv(),
            &layout,
            &[1, 2, 3],
            &mut buf,
            &offsets,
            launch,
        );
        assert!(
            matches!(err, Err(KernelError::SlotOverlap { op: "gather", .. })),
            "{offsets:?}: {err:?}"
        );
        assert!(untouched(&buf), "nothing copied on error");
    }
    match gather_slots(
        &engine.kv(),
        &layout,
        &[1, 2, 3],
        &mut buf,
        &[bb, 3 * bb, 0],
        launch,
    ) {
        Ok(()) => {}
        other => panic!("disjoint, out of order: {other:?}"),
    }
    buf.fill(0x11);
    // Scatter: sources may repeat, pages may not.
    let before = engine.bytes().to_vec();
    assert_eq!(
        scatter_slots(
            &engine.kv(),
            &layout,
            &[3, 2, 3],
            &buf,
            &[0, bb, 2 * bb],
            launch
        ),
        Err(KernelError::DuplicatePage {
            page: 3,
            first: 0,
            second: 2
        })
    );
    assert!(matches!(
        scatter_slots(&engine.kv(), &layout, &[3, 2], &buf, &[0, 4 * bb], launch),
        Err(KernelError::SlotOutOfRange { op: "scatter", .. })
    ));
    assert!(
        engine.bytes() == before.as_slice(),
        "nothing scattered on error"
    );
    scatter_slots(&engine.kv(), &layout, &[3, 2], &buf, &[bb, bb], launch)
        .expect("one source block into two pages");
    assert!(matches!(
        gather_slots(&engine.kv(), &layout, &[7], &mut buf, &[0], launch),
        Err(KernelError::PageOutOfRange { page: 7, .. })
    ));
}
