//! Validation of an engine's `kvp_kv_layout`, which arrives from another process and is
//! hostile until checked. A [`PagedLayout`] exists only for a layout that passed, so the
//! kernels that take one never recheck geometry (page ids they still check per batch).

use kvplane_ffi::bindings::KVP_MAX_LAYERS;
use kvplane_ffi::kvp_kv_layout;

/// Why a layout was refused. Field names are the C struct's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("num_layers {got} outside 1..={max}")]
    Layers { got: u32, max: u32 },
    #[error("kv_planes {got}: must be 1 (MLA) or 2 (K and V)")]
    Planes { got: u32 },
    #[error("{field} is zero")]
    Zero { field: &'static str },
    #[error("dtype_bytes {got}: must be 1, 2 or 4")]
    DtypeBytes { got: u32 },
    #[error("head_bytes {head_bytes} is not a multiple of dtype_bytes {dtype_bytes}")]
    HeadBytes { head_bytes: u32, dtype_bytes: u32 },
    #[error("layout arithmetic overflows computing {what}")]
    Overflow { what: &'static str },
    #[error("num_pages {num_pages}: page ids are 32-bit, so at most {max} pages can be named")]
    TooManyPages { num_pages: u64, max: u64 },
    #[error(
        "page_stride_bytes {page_stride_bytes} is less than the {page_extent_bytes} bytes one page spans: pages would overlap"
    )]
    PagesOverlap {
        page_stride_bytes: u64,
        page_extent_bytes: u64,
    },
    #[error(
        "num_pages {num_pages} x block_bytes {block_bytes} = {total_bytes} bytes of KV, more than buffer_bytes {buffer_bytes}"
    )]
    PagesExceedBuffer {
        num_pages: u64,
        block_bytes: u64,
        total_bytes: u64,
        buffer_bytes: u64,
    },
    #[error(
        "layer {layer} plane {plane}: the last page ends at byte {end_bytes}, past buffer_bytes {buffer_bytes}"
    )]
    OutOfBounds {
        layer: u32,
        plane: u32,
        end_bytes: u64,
        buffer_bytes: u64,
    },
    #[error(
        "layer {layer} plane {plane}: plane_region {region}, but the session has {regions} KV regions"
    )]
    RegionIndex {
        layer: u32,
        plane: u32,
        region: u16,
        regions: usize,
    },
    #[error(
        "layer {layer} plane {plane}: the last page ends at byte {end_bytes} of KV region {region}, past its {region_bytes} bytes"
    )]
    OutOfRegion {
        layer: u32,
        plane: u32,
        region: u16,
        end_bytes: u64,
        region_bytes: u64,
    },
}

/// What the kernels and the data plane need to know about a valid layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutInfo {
    /// Bytes of one daemon block: layers * planes * page_tokens * kv_heads * head_bytes.
    pub block_bytes: u64,
    /// Bytes of one (layer, plane) slice of a block: page_tokens * kv_heads * head_bytes.
    pub layer_plane_bytes: u64,
    /// Longest contiguous run the kernels copy at once (head, token or whole plane page).
    pub run_bytes: u64,
    /// Contiguous runs per block (copy loop iterations per page).
    pub runs_per_block: u64,
    /// One past the highest engine-buffer byte any page in [0, num_pages) touches.
    pub span_bytes: u64,
    /// Bytes from a (layer, plane)'s base to the end of its last page.
    pub plane_span_bytes: u64,
}

/// Pages an engine pool may have: block ops name a page with a `u32`.
pub const MAX_PAGES: u64 = 1 << 32;

fn overflow(what: &'static str) -> LayoutError {
    LayoutError::Overflow { what }
}

/// Checks a layout against the rules in `kvplane.h` and returns its derived sizes.
pub fn validate_layout(layout: &kvp_kv_layout) -> Result<LayoutInfo, LayoutError> {
    let l = layout;
    if l.num_layers == 0 || l.num_layers > KVP_MAX_LAYERS {
        return Err(LayoutError::Layers {
            got: l.num_layers,
            max: KVP_MAX_LAYERS,
        });
    }
    if l.kv_planes != 1 && l.kv_planes != 2 {
        return Err(LayoutError::Planes { got: l.kv_planes });
    }
    for (field, value) in [
        ("page_tokens", u64::from(l.page_tokens)),
        ("kv_heads", u64::from(l.kv_heads)),
        ("head_bytes", u64::from(l.head_bytes)),
        ("num_pages", l.num_pages),
        ("buffer_bytes", l.buffer_bytes),
    ] {
        if value == 0 {
            return Err(LayoutError::Zero { field });
        }
    }
    if !matches!(l.dtype_bytes, 1 | 2 | 4) {
        return Err(LayoutError::DtypeBytes { got: l.dtype_bytes });
    }
    if l.head_bytes % l.dtype_bytes != 0 {
        return Err(LayoutError::HeadBytes {
            head_bytes: l.head_bytes,
            dtype_bytes: l.dtype_bytes,
        });
    }
    // The kernels index runs within a (layer, plane) with u32.
    let rows = l
        .page_tokens
        .checked_mul(l.kv_heads)
        .ok_or(overflow("page_tokens * kv_heads"))?;
    let layer_plane_bytes = u64::from(rows)
        .checked_mul(u64::from(l.head_bytes))
        .ok_or(overflow("layer-plane bytes"))?;
    let block_bytes = layer_plane_bytes
        .checked_mul(u64::from(l.num_layers) * u64::from(l.kv_planes))
        .ok_or(overflow("block_bytes"))?;
    // Offset of the last byte of a page relative to its plane base, for the last page.
    let page_extent = (u64::from(l.page_tokens) - 1)
        .checked_mul(l.token_stride_bytes)
        .and_then(|t| {
            (u64::from(l.kv_heads) - 1)
                .checked_mul(l.head_stride_bytes)
                .and_then(|h| t.checked_add(h))
        })
        .and_then(|x| x.checked_add(u64::from(l.head_bytes)))
        .ok_or(overflow("page extent"))?;
    // Every size is checked against the region it describes, not only the last page's
    // end: a stride of 0 would let any num_pages (2^64 - 1 included) alias one page.
    if l.num_pages > MAX_PAGES {
        return Err(LayoutError::TooManyPages {
            num_pages: l.num_pages,
            max: MAX_PAGES,
        });
    }
    if l.num_pages > 1 && l.page_stride_bytes < page_extent {
        return Err(LayoutError::PagesOverlap {
            page_stride_bytes: l.page_stride_bytes,
            page_extent_bytes: page_extent,
        });
    }
    let last_page = (l.num_pages - 1)
        .checked_mul(l.page_stride_bytes)
        .and_then(|x| x.checked_add(page_extent))
        .ok_or(overflow("last page extent"))?;
    let mut span_bytes = 0u64;
    for plane in 0..l.kv_planes {
        for layer in 0..l.num_layers {
            let base = l.plane_offset[plane as usize][layer as usize];
            let end_bytes = base
                .checked_add(last_page)
                .ok_or(overflow("plane_offset + last page"))?;
            if end_bytes > l.buffer_bytes {
                return Err(LayoutError::OutOfBounds {
                    layer,
                    plane,
                    end_bytes,
                    buffer_bytes: l.buffer_bytes,
                });
            }
            span_bytes = span_bytes.max(end_bytes);
        }
    }
    // Each (layer, plane) fits; together they must not describe more KV than the region
    // holds (layers or planes laid over one another).
    let total_bytes = l
        .num_pages
        .checked_mul(block_bytes)
        .ok_or(overflow("num_pages * block_bytes"))?;
    if total_bytes > l.buffer_bytes {
        return Err(LayoutError::PagesExceedBuffer {
            num_pages: l.num_pages,
            block_bytes,
            total_bytes,
            buffer_bytes: l.buffer_bytes,
        });
    }
    let (run_bytes, runs_per_lp) = runs(l);
    Ok(LayoutInfo {
        block_bytes,
        layer_plane_bytes,
        run_bytes,
        runs_per_block: runs_per_lp * u64::from(l.num_layers) * u64::from(l.kv_planes),
        span_bytes,
        plane_span_bytes: last_page,
    })
}

/// Where one of a session's KV regions lies in the window the kernels address (one
/// contiguous host mapping, or a device's address space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpan {
    pub window_offset_bytes: u64,
    pub len_bytes: u64,
}

/// Turns an engine's layout, whose (plane_region, plane_offset) name a place in one of its
/// `regions`, into the layout the kernels take: plane_offset relative to a window of
/// `window_bytes` that holds every region, `buffer_bytes` that window's length,
/// `plane_region` zero. Every (layer, plane) must name a region and lie inside it, not just
/// inside the window: regions need not be adjacent, and the bytes between them are not the
/// engine's. Entries past `num_layers`/`kv_planes` are ignored and come out zero.
pub fn resolve_regions(
    engine: &kvp_kv_layout,
    regions: &[RegionSpan],
    window_bytes: u64,
) -> Result<PagedLayout, LayoutError> {
    let mut resolved = *engine;
    resolved.buffer_bytes = window_bytes;
    resolved.plane_offset = [[0; KVP_MAX_LAYERS as usize]; 2];
    resolved.plane_region = [[0; KVP_MAX_LAYERS as usize]; 2];
    let planes = engine.kv_planes.min(2);
    let layers = engine.num_layers.min(KVP_MAX_LAYERS);
    for plane in 0..planes {
        for layer in 0..layers {
            let (p, l) = (plane as usize, layer as usize);
            let region = engine.plane_region[p][l];
            let span = regions
                .get(usize::from(region))
                .ok_or(LayoutError::RegionIndex {
                    layer,
                    plane,
                    region,
                    regions: regions.len(),
                })?;
            resolved.plane_offset[p][l] = span
                .window_offset_bytes
                .checked_add(engine.plane_offset[p][l])
                .ok_or(overflow("region offset + plane_offset"))?;
        }
    }
    // Geometry, strides and the window first (this also yields the plane span).
    let layout = PagedLayout::new(&resolved)?;
    let plane_span = layout.info().plane_span_bytes;
    for plane in 0..planes {
        for layer in 0..layers {
            let (p, l) = (plane as usize, layer as usize);
            let region = engine.plane_region[p][l];
            let region_bytes = regions[usize::from(region)].len_bytes;
            let end_bytes = engine.plane_offset[p][l]
                .checked_add(plane_span)
                .ok_or(overflow("plane_offset + last page"))?;
            if end_bytes > region_bytes {
                return Err(LayoutError::OutOfRegion {
                    layer,
                    plane,
                    region,
                    end_bytes,
                    region_bytes,
                });
            }
        }
    }
    Ok(layout)
}

/// The same run split as `kvp_layout_runs` in `paged.cu` (for reporting and sizing).
fn runs(l: &kvp_kv_layout) -> (u64, u64) {
    let heads_bytes = u64::from(l.kv_heads) * u64::from(l.head_bytes);
    let heads_adjacent = l.kv_heads == 1 || l.head_stride_bytes == u64::from(l.head_bytes);
    let tokens_adjacent =
        heads_adjacent && (l.page_tokens == 1 || l.token_stride_bytes == heads_bytes);
    if tokens_adjacent {
        (heads_bytes * u64::from(l.page_tokens), 1)
    } else if heads_adjacent {
        (heads_bytes, u64::from(l.page_tokens))
    } else {
        (
            u64::from(l.head_bytes),
            u64::from(l.page_tokens) * u64::from(l.kv_heads),
        )
    }
}

/// A layout that passed [`validate_layout`], kept with its derived sizes. Boxed: the C
/// struct is 4 KiB (per-layer plane offsets).
#[derive(Clone)]
pub struct PagedLayout {
    raw: Box<kvp_kv_layout>,
    info: LayoutInfo,
}

impl std::fmt::Debug for PagedLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedLayout")
            .field("num_layers", &self.raw.num_layers)
            .field("kv_planes", &self.raw.kv_planes)
            .field("page_tokens", &self.raw.page_tokens)
            .field("kv_heads", &self.raw.kv_heads)
            .field("head_bytes", &self.raw.head_bytes)
            .field("num_pages", &self.raw.num_pages)
            .field("info", &self.info)
            .finish()
    }
}

impl PagedLayout {
    /// Validates and keeps a private copy (the engine may rewrite its own afterwards).
    pub fn new(raw: &kvp_kv_layout) -> Result<Self, LayoutError> {
        let info = validate_layout(raw)?;
        Ok(Self {
            raw: Box::new(*raw),
            info,
        })
    }

    pub fn info(&self) -> &LayoutInfo {
        &self.info
    }

    pub fn raw(&self) -> &kvp_kv_layout {
        &self.raw
    }

    pub fn num_pages(&self) -> u64 {
        self.raw.num_pages
    }
}

/// The common paged pool shape (vLLM's per-layer `[2, pages, tokens, heads, dim]`): every
/// (layer, K|V plane) a contiguous run of `pages` pages, layer after layer, tokens of
/// `kv_heads` adjacent heads of `head_bytes`, 2-byte elements; `buffer_bytes` exactly covers
/// it. Validate with [`PagedLayout::new`] like any other descriptor.
pub fn planes_per_layer(
    layers: u32,
    page_tokens: u32,
    kv_heads: u32,
    head_bytes: u32,
    pages: u64,
) -> kvp_kv_layout {
    // SAFETY: kvp_kv_layout is plain old data; all-zero is a valid value.
    let mut l: kvp_kv_layout = unsafe { std::mem::zeroed() };
    l.num_layers = layers;
    l.kv_planes = 2;
    l.page_tokens = page_tokens;
    l.kv_heads = kv_heads;
    l.head_bytes = head_bytes;
    l.dtype_bytes = 2;
    l.num_pages = pages;
    l.head_stride_bytes = u64::from(head_bytes);
    l.token_stride_bytes = u64::from(kv_heads) * u64::from(head_bytes);
    l.page_stride_bytes = u64::from(page_tokens) * l.token_stride_bytes;
    let plane = l.page_stride_bytes * pages;
    for layer in 0..layers as usize {
        for p in 0..2 {
            l.plane_offset[p][layer] = (2 * layer as u64 + p as u64) * plane;
        }
    }
    l.buffer_bytes = 2 * u64::from(layers) * plane;
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vLLM-style [2, pages, tokens, heads, dim] per layer, laid out layer after layer.
    fn vllm(layers: u32, pages: u64) -> kvp_kv_layout {
        planes_per_layer(layers, 16, 8, 256, pages)
    }

    #[test]
    fn accepts_vllm_and_derives_sizes() {
        let info = validate_layout(&vllm(4, 10)).expect("valid");
        assert_eq!(info.block_bytes, 4 * 2 * 16 * 8 * 256);
        assert_eq!(info.layer_plane_bytes, 16 * 8 * 256);
        assert_eq!(
            info.run_bytes,
            16 * 8 * 256,
            "tokens and heads adjacent: one run"
        );
        assert_eq!(info.runs_per_block, 8);
        assert_eq!(info.span_bytes, vllm(4, 10).buffer_bytes);
    }

    #[test]
    fn rejects_each_bad_field() {
        let good = vllm(2, 4);
        type Mutation = fn(&mut kvp_kv_layout);
        let cases: Vec<(Mutation, LayoutError)> = vec![
            (
                |l| l.num_layers = 0,
                LayoutError::Layers { got: 0, max: 256 },
            ),
            (
                |l| l.num_layers = 257,
                LayoutError::Layers { got: 257, max: 256 },
            ),
            (|l| l.kv_planes = 3, LayoutError::Planes { got: 3 }),
            (|l| l.kv_planes = 0, LayoutError::Planes { got: 0 }),
            (
                |l| l.page_tokens = 0,
                LayoutError::Zero {
                    field: "page_tokens",
                },
            ),
            (|l| l.kv_heads = 0, LayoutError::Zero { field: "kv_heads" }),
            (
                |l| l.head_bytes = 0,
                LayoutError::Zero {
                    field: "head_bytes",
                },
            ),
            (
                |l| l.num_pages = 0,
                LayoutError::Zero { field: "num_pages" },
            ),
            (
                |l| l.buffer_bytes = 0,
                LayoutError::Zero {
                    field: "buffer_bytes",
                },
            ),
            (|l| l.dtype_bytes = 3, LayoutError::DtypeBytes { got: 3 }),
            (|l| l.dtype_bytes = 8, LayoutError::DtypeBytes { got: 8 }),
            (
                |l| {
                    l.dtype_bytes = 4;
                    l.head_bytes = 258;
                },
                LayoutError::HeadBytes {
                    head_bytes: 258,
                    dtype_bytes: 4,
                },
            ),
        ];
        for (mutate, want) in cases {
            let mut l = good;
            mutate(&mut l);
            assert_eq!(validate_layout(&l), Err(want));
        }
    }

    #[test]
    fn rejects_out_of_bounds_and_overflow() {
        let mut l = vllm(2, 4);
        l.buffer_bytes -= 1;
        assert!(matches!(
            validate_layout(&l),
            Err(LayoutError::OutOfBounds {
                layer: 1,
                plane: 1,
                ..
            })
        ));
        let mut l = vllm(2, 4);
        l.plane_offset[0][1] = u64::MAX - 10;
        assert!(matches!(
            validate_layout(&l),
            Err(LayoutError::Overflow { .. })
        ));
        let mut l = vllm(2, 4);
        l.page_stride_bytes = u64::MAX / 2;
        assert!(matches!(
            validate_layout(&l),
            Err(LayoutError::Overflow { .. })
        ));
        let mut l = vllm(2, 4);
        l.page_tokens = u32::MAX;
        l.kv_heads = 2;
        assert!(matches!(
            validate_layout(&l),
            Err(LayoutError::Overflow { .. })
        ));
        // Overflowing with a page stride of 0 (pages aliasing one another) used to pass:
        // the last page then ended where the first did.
        let mut l = vllm(2, 4);
        l.num_pages = u64::MAX;
        l.page_stride_bytes = 0;
        assert_eq!(
            validate_layout(&l),
            Err(LayoutError::TooManyPages {
                num_pages: u64::MAX,
                max: MAX_PAGES
            })
        );
        let msg = validate_layout(&l).unwrap_err().to_string();
        assert!(msg.contains("18446744073709551615"), "{msg}");
        let mut l = vllm(2, 4);
        l.num_pages = MAX_PAGES;
        l.page_stride_bytes = 0;
        assert_eq!(
            validate_layout(&l),
            Err(LayoutError::PagesOverlap {
                page_stride_bytes: 0,
                page_extent_bytes: 16 * 8 * 256,
            })
        );
        let mut l = vllm(2, 4);
        l.page_stride_bytes -= 1;
        assert!(matches!(
            validate_layout(&l),
            Err(LayoutError::PagesOverlap { .. })
        ));
        // Every (layer, plane) inside the buffer, but all four on the same bytes: the pages
        // described hold more KV than the region has.
        let mut l = vllm(2, 4);
        for plane in 0..2 {
            for layer in 0..2 {
                l.plane_offset[plane][layer] = 0;
            }
        }
        l.buffer_bytes = 4 * 16 * 8 * 256;
        assert_eq!(
            validate_layout(&l),
            Err(LayoutError::PagesExceedBuffer {
                num_pages: 4,
                block_bytes: 2 * 2 * 16 * 8 * 256,
                total_bytes: 4 * 2 * 2 * 16 * 8 * 256,
                buffer_bytes: 4 * 16 * 8 * 256,
            })
        );
        // Offsets of layers past num_layers are ignored, whatever they hold.
        let mut l = vllm(2, 4);
        l.plane_offset[0][2] = u64::MAX;
        assert!(validate_layout(&l).is_ok());
    }
}

#[cfg(test)]
mod region_tests {
    use super::*;

    /// One region per (layer, plane), as per-layer K and V tensors (SGLang) register.
    fn per_tensor(layers: u32, pages: u64) -> (kvp_kv_layout, u64) {
        let mut l = planes_per_layer(layers, 16, 2, 128, pages);
        let plane = l.page_stride_bytes * pages;
        for layer in 0..layers as usize {
            for p in 0..2 {
                l.plane_region[p][layer] = (2 * layer + p) as u16;
                l.plane_offset[p][layer] = 0;
            }
        }
        l.buffer_bytes = 0; // ignored from engines
        (l, plane)
    }

    #[test]
    fn regions_resolve_into_the_window_and_are_checked_one_by_one() {
        let (l, plane) = per_tensor(3, 10);
        // Regions scattered in the window with gaps between them, in reverse order.
        let regions: Vec<RegionSpan> = (0..6u64)
            .map(|i| RegionSpan {
                window_offset_bytes: (5 - i) * 2 * plane + 4096,
                len_bytes: plane,
            })
            .collect();
        let window = 12 * plane + 4096;
        let r = resolve_regions(&l, &regions, window).unwrap();
        for layer in 0..3 {
            for p in 0..2 {
                let i = 2 * layer + p;
                assert_eq!(
                    r.raw().plane_offset[p][layer],
                    regions[i].window_offset_bytes
                );
                assert_eq!(r.raw().plane_region[p][layer], 0);
            }
        }
        assert_eq!(r.raw().buffer_bytes, window);
        assert_eq!(r.info().plane_span_bytes, plane);
        // Past the number of regions.
        let mut bad = l;
        bad.plane_region[1][2] = 6;
        assert_eq!(
            resolve_regions(&bad, &regions, window).unwrap_err(),
            LayoutError::RegionIndex {
                layer: 2,
                plane: 1,
                region: 6,
                regions: 6
            }
        );
        // Inside the window but out of its own region (into the gap and the next one).
        let mut bad = l;
        bad.plane_offset[0][1] = 4096;
        match resolve_regions(&bad, &regions, window).unwrap_err() {
            LayoutError::OutOfRegion {
                layer: 1,
                plane: 0,
                region: 2,
                end_bytes,
                region_bytes,
            } => assert_eq!((end_bytes, region_bytes), (plane + 4096, plane)),
            e => panic!("{e}"),
        }
        // A region offset near u64::MAX cannot wrap around.
        let mut far = regions.clone();
        far[0].window_offset_bytes = u64::MAX - 10;
        assert!(matches!(
            resolve_regions(&l, &far, window).unwrap_err(),
            LayoutError::Overflow { .. } | LayoutError::OutOfBounds { .. }
        ));
        // Entries past num_layers are ignored, even when they name no region.
        let mut extra = l;
        extra.plane_region[0][200] = 999;
        extra.plane_offset[0][200] = u64::MAX;
        let r = resolve_regions(&extra, &regions, window).unwrap();
        assert_eq!(r.raw().plane_offset[0][200], 0);
    }

    #[test]
    fn one_region_with_every_layer_in_it_is_the_old_single_buffer() {
        let single = planes_per_layer(4, 16, 8, 128, 10);
        let regions = [RegionSpan {
            window_offset_bytes: 0,
            len_bytes: single.buffer_bytes,
        }];
        let r = resolve_regions(&single, &regions, single.buffer_bytes).unwrap();
        assert_eq!(r.raw().plane_offset, single.plane_offset);
        // One byte short of the last page: refused naming region 0.
        let short = [RegionSpan {
            window_offset_bytes: 0,
            len_bytes: single.buffer_bytes - 1,
        }];
        assert!(matches!(
            resolve_regions(&single, &short, single.buffer_bytes).unwrap_err(),
            LayoutError::OutOfRegion { region: 0, .. }
        ));
    }
}
