//! The offload path, measured where it matters: an engine's paged KV in device memory
//! (vLLM's per-layer `[2, pages, tokens, kv_heads, head_dim]` tensors, Llama-3.1-8B and
//! -70B geometry, 16- and 64-token pages) to pinned host memory and back, and to a
//! device arena (the G1 tier) and back, for batches of whole blocks scattered over the
//! engine's pool. Every path is verified byte for byte, and each is timed next to the
//! references measured in the same run:
//!
//! - (a) the ceiling: one bulk copy of the same bytes between device and pinned host
//!   memory (device to device for G1);
//! - (b) what vLLM's `swap_blocks` does: one `cuMemcpyAsync` per page, layer and plane;
//! - the daemon's ways: one gather (save) or scatter (load) launch reading or writing
//!   mapped pinned memory directly ("direct"), or through device staging plus one bulk
//!   copy ("staged").
//!
//! A PyTorch per-layer `index_select` + copy, reference (c), is measured by
//! `scripts/gpu/torch_offload.py` on the same geometry (Rust cannot call PyTorch).
//!
//! This is the kernels and the copy paths alone, on one stream: the daemon's sessions
//! and rings are not in it (a real session needs device regions in the ABI). The same
//! code runs on the host backend, where the numbers are memcpy figures and say so.

use crate::device::{Device, DeviceBuffer, DeviceError, DeviceRange, StreamId};
use crate::gpu_check::{fill_random, gbps, size_label, timed};
use kvplane_ffi::kvp_kv_layout;
use kvplane_kernels::{LayoutError, PagedLayout};
use serde::Serialize;
use std::ptr::NonNull;
use std::time::Instant;

/// A model's KV geometry (per token, all layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Geometry {
    pub name: &'static str,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype_bytes: u32,
}

impl Geometry {
    pub const LLAMA_3_1_8B: Geometry = Geometry {
        name: "llama-3.1-8b",
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
        dtype_bytes: 2,
    };
    pub const LLAMA_3_1_70B: Geometry = Geometry {
        name: "llama-3.1-70b",
        layers: 80,
        kv_heads: 8,
        head_dim: 128,
        dtype_bytes: 2,
    };

    /// Bytes of one page of one layer's K (or V): what one `swap_blocks` copy moves.
    pub fn page_plane_bytes(&self, page_tokens: u32) -> usize {
        (page_tokens * self.kv_heads * self.head_dim * self.dtype_bytes) as usize
    }
    pub fn block_bytes(&self, page_tokens: u32) -> usize {
        self.page_plane_bytes(page_tokens) * self.layers as usize * 2
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OffloadConfig {
    pub models: Vec<Geometry>,
    pub page_tokens: Vec<u32>,
    pub batches: Vec<usize>,
    /// A case moving more than this per direction is skipped (and listed).
    pub max_case_bytes: usize,
    pub iters: u32,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        Self {
            models: vec![Geometry::LLAMA_3_1_8B, Geometry::LLAMA_3_1_70B],
            page_tokens: vec![16, 64],
            batches: vec![1, 4, 16, 64, 512],
            max_case_bytes: 4 << 30,
            iters: 5,
        }
    }
}

/// GB/s of each way for one direction of one case.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ways {
    /// One kernel launch on mapped pinned memory.
    pub direct_gbps: f64,
    /// One kernel launch into/from device staging plus one bulk copy.
    pub staged_gbps: f64,
    /// (b) one cuMemcpyAsync per page, layer and plane.
    pub per_page_gbps: f64,
    /// (a) one bulk copy of the same bytes.
    pub bulk_gbps: f64,
}

impl Ways {
    pub fn best_kernel_gbps(&self) -> f64 {
        self.direct_gbps.max(self.staged_gbps)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffloadRow {
    pub model: &'static str,
    pub page_tokens: u32,
    pub blocks: usize,
    pub block_bytes: usize,
    pub page_plane_bytes: usize,
    pub save: Ways,
    pub load: Ways,
    /// Gather into a device arena, scatter back from it, and one bulk device copy.
    pub g1_save_gbps: f64,
    pub g1_load_gbps: f64,
    pub g1_bulk_gbps: f64,
    /// Median time from submitting one SAVE launch (direct) to its completion, for the
    /// first batch size of the run (one block by default).
    pub save_submit_to_done_us: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffloadReport {
    pub backend: &'static str,
    pub device: String,
    pub rows: Vec<OffloadRow>,
    /// (model, page_tokens, blocks) cases over the budget.
    pub skipped: Vec<(&'static str, u32, usize)>,
}

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("layout for {model} with {page_tokens}-token pages: {source}")]
    Layout {
        model: &'static str,
        page_tokens: u32,
        source: LayoutError,
    },
    #[error(
        "{what} for {model}, {page_tokens}-token pages, {blocks} blocks: first difference at byte {offset}"
    )]
    Mismatch {
        what: &'static str,
        model: &'static str,
        page_tokens: u32,
        blocks: usize,
        offset: usize,
    },
}

/// vLLM's layout: one `[2, pages, tokens, heads, dim]` tensor per layer, the layers one
/// after another in one allocation.
pub fn vllm_layout(g: &Geometry, page_tokens: u32, num_pages: u64) -> kvp_kv_layout {
    // SAFETY: plain old data; all-zero is valid.
    let mut l: kvp_kv_layout = unsafe { std::mem::zeroed() };
    let head_bytes = g.head_dim * g.dtype_bytes;
    (
        l.num_layers,
        l.kv_planes,
        l.page_tokens,
        l.kv_heads,
        l.head_bytes,
        l.dtype_bytes,
    ) = (
        g.layers,
        2,
        page_tokens,
        g.kv_heads,
        head_bytes,
        g.dtype_bytes,
    );
    l.num_pages = num_pages;
    l.head_stride_bytes = u64::from(head_bytes);
    l.token_stride_bytes = u64::from(g.kv_heads * head_bytes);
    l.page_stride_bytes = u64::from(page_tokens) * l.token_stride_bytes;
    let plane = num_pages * l.page_stride_bytes;
    for layer in 0..g.layers as usize {
        l.plane_offset[0][layer] = 2 * layer as u64 * plane;
        l.plane_offset[1][layer] = (2 * layer as u64 + 1) * plane;
    }
    l.buffer_bytes = 2 * u64::from(g.layers) * plane;
    l
}

/// `n` distinct pages of `0..pool`, scattered (a seeded shuffle), and `n` more disjoint
/// from them for the loads.
fn pick_pages(pool: u32, n: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut all: Vec<u32> = (0..pool).collect();
    let mut x = seed | 1;
    for i in (1..all.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        all.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let load = all[n..2 * n].to_vec();
    all.truncate(n);
    (all, load)
}

/// The (source, destination) ranges of every per-page copy of a batch: page `pages[i]`,
/// layer `l`, plane `k` of the engine pool <-> its place in block `i` (the daemon's
/// block layout `[layers][k|v][tokens][heads][dim]`).
fn page_copies(raw: &kvp_kv_layout, pages: &[u32], page_plane_bytes: usize) -> Vec<(usize, usize)> {
    let planes = raw.kv_planes as usize;
    let block_bytes = page_plane_bytes * raw.num_layers as usize * planes;
    let mut out = Vec::with_capacity(pages.len() * raw.num_layers as usize * planes);
    for (i, &p) in pages.iter().enumerate() {
        for layer in 0..raw.num_layers as usize {
            for k in 0..planes {
                let engine = raw.plane_offset[k][layer] as usize
                    + p as usize * raw.page_stride_bytes as usize;
                let block = i * block_bytes + (layer * planes + k) * page_plane_bytes;
                out.push((engine, block));
            }
        }
    }
    out
}

/// Host memory registered with the device (pinned and mapped on CUDA), owned here.
struct Pinned {
    mem: Vec<u8>,
    buf: DeviceBuffer,
}

impl Pinned {
    fn new(dev: &dyn Device, bytes: usize) -> Result<Self, DeviceError> {
        let mut mem = vec![0u8; bytes];
        // SAFETY: `mem` is owned by the returned value, never reallocated, and outlives
        // the registration (`release` frees the registration before dropping it).
        let buf = unsafe {
            dev.register_host_memory(NonNull::new(mem.as_mut_ptr()).expect("non-null"), bytes)
        }?;
        Ok(Self { mem, buf })
    }
    fn release(self, dev: &dyn Device) -> Result<(), DeviceError> {
        dev.free(self.buf)
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len()))
}

/// Everything allocated for one (model, page size): the engine pool on the device, the
/// staging/arena buffer, and two pinned host buffers (reused across configurations).
struct Setup<'a> {
    dev: &'a dyn Device,
    stream: StreamId,
    iters: u32,
    g: Geometry,
    page_tokens: u32,
    raw: kvp_kv_layout,
    layout: crate::device::LayoutId,
    engine: DeviceBuffer,
    staging: DeviceBuffer,
}

impl Setup<'_> {
    fn mismatch(&self, what: &'static str, blocks: usize, offset: usize) -> OffloadError {
        OffloadError::Mismatch {
            what,
            model: self.g.name,
            page_tokens: self.page_tokens,
            blocks,
            offset,
        }
    }

    fn check(
        &self,
        what: &'static str,
        blocks: usize,
        got: &[u8],
        want: &[u8],
    ) -> Result<(), OffloadError> {
        match first_difference(got, want) {
            None => Ok(()),
            Some(offset) => Err(self.mismatch(what, blocks, offset)),
        }
    }

    /// Overwrites `pages` in the engine pool with a pattern, so a load that does
    /// nothing cannot pass the check that follows it.
    fn scrub(&self, pages: &[u32], scratch: &mut Pinned, bytes: usize) -> Result<(), OffloadError> {
        scratch.mem[..bytes].fill(0x5a);
        self.dev.scatter(
            self.stream,
            self.engine,
            self.layout,
            pages,
            scratch.buf.range(0, bytes),
        )?;
        self.dev.sync_stream(self.stream)?;
        Ok(())
    }

    /// Gathers `pages` into `out` (synchronously) for a check.
    fn read_back(&self, pages: &[u32], out: &mut Pinned, bytes: usize) -> Result<(), OffloadError> {
        out.mem[..bytes].fill(0);
        self.dev.gather(
            self.stream,
            self.engine,
            self.layout,
            pages,
            out.buf.range(0, bytes),
        )?;
        self.dev.sync_stream(self.stream)?;
        Ok(())
    }

    fn per_page(
        &self,
        copies: &[(usize, usize)],
        host: DeviceBuffer,
        chunk: usize,
        to_host: bool,
    ) -> Result<(), DeviceError> {
        for &(engine, block) in copies {
            let e = self.engine.range(engine, chunk);
            let h = host.range(block, chunk);
            if to_host {
                self.dev.copy_device(self.stream, e, h)?;
            } else {
                self.dev.copy_device(self.stream, h, e)?;
            }
        }
        Ok(())
    }

    fn case(
        &self,
        blocks: usize,
        a: &mut Pinned,
        b: &mut Pinned,
        latency: bool,
    ) -> Result<OffloadRow, OffloadError> {
        let (dev, s, iters) = (self.dev, self.stream, self.iters);
        let chunk = self.g.page_plane_bytes(self.page_tokens);
        let block_bytes = self.g.block_bytes(self.page_tokens);
        let bytes = blocks * block_bytes;
        let pool = self.raw.num_pages as u32;
        let (save_pages, load_pages) = pick_pages(pool, blocks, bytes as u64 ^ u64::from(pool));
        let save_copies = page_copies(&self.raw, &save_pages, chunk);
        let load_copies = page_copies(&self.raw, &load_pages, chunk);
        let (ab, bb) = (a.buf.range(0, bytes), b.buf.range(0, bytes));
        let staging = self.staging.range(0, bytes);

        // SAVE. (b) per page into B: the reference every other way must equal.
        b.mem[..bytes].fill(0);
        let save_per_page = timed(dev, s, iters, || {
            self.per_page(&save_copies, b.buf, chunk, true)
        })?;
        let gather = |dst: DeviceRange| dev.gather(s, self.engine, self.layout, &save_pages, dst);
        a.mem[..bytes].fill(0);
        let save_direct = timed(dev, s, iters, || gather(ab))?;
        self.check(
            "save: gather into mapped pinned memory",
            blocks,
            &a.mem[..bytes],
            &b.mem[..bytes],
        )?;
        a.mem[..bytes].fill(0);
        let save_staged = timed(dev, s, iters, || {
            gather(staging)?;
            dev.copy_device(s, staging, ab)
        })?;
        self.check(
            "save: gather into staging + copy",
            blocks,
            &a.mem[..bytes],
            &b.mem[..bytes],
        )?;
        let save_bulk = timed(dev, s, iters, || {
            dev.copy_device(s, self.engine.range(0, bytes), ab)
        })?;
        let save_submit_to_done_us = if latency {
            let mut samples = Vec::with_capacity(iters as usize);
            for _ in 0..iters.max(5) {
                let t = Instant::now();
                gather(ab)?;
                dev.sync_stream(s)?;
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
            samples.sort_by(f64::total_cmp);
            Some(samples[samples.len() / 2])
        } else {
            None
        };

        // LOAD the saved blocks (in B) into other pages; each way is checked by reading
        // those pages back with the (already checked) gather.
        let scatter = |src: DeviceRange| dev.scatter(s, self.engine, self.layout, &load_pages, src);
        let mut load_way = |what: &'static str,
                            f: &mut dyn FnMut() -> Result<(), DeviceError>|
         -> Result<f64, OffloadError> {
            self.scrub(&load_pages, a, bytes)?;
            let secs = timed(dev, s, iters, &mut *f)?;
            self.read_back(&load_pages, a, bytes)?;
            self.check(what, blocks, &a.mem[..bytes], &b.mem[..bytes])?;
            Ok(secs)
        };
        let load_per_page = load_way("load: one copy per page", &mut || {
            self.per_page(&load_copies, b.buf, chunk, false)
        })?;
        let load_direct = load_way("load: scatter from mapped pinned memory", &mut || {
            scatter(bb)
        })?;
        let load_staged = load_way("load: copy to staging + scatter", &mut || {
            dev.copy_device(s, bb, staging)?;
            scatter(staging)
        })?;
        // Into the staging buffer: writing the engine pool would clobber saved pages.
        let load_bulk = timed(dev, s, iters, || dev.copy_device(s, bb, staging))?;

        // G1: the staging buffer stands in for the device arena's slots.
        let g1_save = timed(dev, s, iters, || gather(staging))?;
        dev.copy_device(s, staging, ab)?;
        dev.sync_stream(s)?;
        self.check(
            "G1 save: gather into the arena",
            blocks,
            &a.mem[..bytes],
            &b.mem[..bytes],
        )?;
        self.scrub(&load_pages, a, bytes)?;
        dev.copy_device(s, bb, staging)?;
        let g1_load = timed(dev, s, iters, || scatter(staging))?;
        self.read_back(&load_pages, a, bytes)?;
        self.check(
            "G1 load: scatter from the arena",
            blocks,
            &a.mem[..bytes],
            &b.mem[..bytes],
        )?;
        let g1_bulk = timed(dev, s, iters, || {
            dev.copy_device(s, self.engine.range(0, bytes), staging)
        })?;

        let ways = |direct, staged, per_page, bulk| Ways {
            direct_gbps: gbps(bytes, iters, direct),
            staged_gbps: gbps(bytes, iters, staged),
            per_page_gbps: gbps(bytes, iters, per_page),
            bulk_gbps: gbps(bytes, iters, bulk),
        };
        Ok(OffloadRow {
            model: self.g.name,
            page_tokens: self.page_tokens,
            blocks,
            block_bytes,
            page_plane_bytes: chunk,
            save: ways(save_direct, save_staged, save_per_page, save_bulk),
            load: ways(load_direct, load_staged, load_per_page, load_bulk),
            g1_save_gbps: gbps(bytes, iters, g1_save),
            g1_load_gbps: gbps(bytes, iters, g1_load),
            g1_bulk_gbps: gbps(bytes, iters, g1_bulk),
            save_submit_to_done_us,
        })
    }
}

/// Runs every case of `cfg` on `dev`.
pub fn run(dev: &dyn Device, cfg: &OffloadConfig) -> Result<OffloadReport, OffloadError> {
    let stream = dev.create_stream()?;
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let mut plans = Vec::new();
    for g in &cfg.models {
        for &pt in &cfg.page_tokens {
            let block_bytes = g.block_bytes(pt);
            let (fit, over): (Vec<usize>, Vec<usize>) = cfg
                .batches
                .iter()
                .partition(|&&n| n > 0 && n.saturating_mul(block_bytes) <= cfg.max_case_bytes);
            skipped.extend(over.into_iter().map(|n| (g.name, pt, n)));
            if let Some(&max) = fit.iter().max() {
                plans.push((*g, pt, fit.clone(), max));
            }
        }
    }
    let host_bytes = plans
        .iter()
        .map(|(g, pt, _, max)| g.block_bytes(*pt) * max)
        .max()
        .unwrap_or(0);
    if host_bytes == 0 {
        return Ok(OffloadReport {
            backend: dev.backend().as_str(),
            device: dev.describe(),
            rows,
            skipped,
        });
    }
    let mut a = Pinned::new(dev, host_bytes)?;
    let mut b = Pinned::new(dev, host_bytes)?;
    let outcome = (|| {
        for (g, pt, batches, max) in plans {
            // Twice the largest batch: the saves' pages and the loads' pages are disjoint
            // and scattered over the whole pool.
            let raw = vllm_layout(&g, pt, 2 * max as u64);
            let layout = PagedLayout::new(&raw).map_err(|source| OffloadError::Layout {
                model: g.name,
                page_tokens: pt,
                source,
            })?;
            let engine = dev.alloc(raw.buffer_bytes as usize)?;
            let staging = dev.alloc(g.block_bytes(pt) * max)?;
            let lid = dev.upload_layout(&layout)?;
            let setup = Setup {
                dev,
                stream,
                iters: cfg.iters,
                g,
                page_tokens: pt,
                raw,
                layout: lid,
                engine,
                staging,
            };
            let result = (|| {
                fill_pool(dev, stream, engine, &mut a.mem)?;
                for (i, &n) in batches.iter().enumerate() {
                    rows.push(setup.case(n, &mut a, &mut b, i == 0)?);
                }
                Ok::<(), OffloadError>(())
            })();
            dev.free(engine)?;
            dev.free(staging)?;
            dev.free_layout(lid)?;
            result?;
        }
        Ok::<(), OffloadError>(())
    })();
    a.release(dev)?;
    b.release(dev)?;
    outcome?;
    Ok(OffloadReport {
        backend: dev.backend().as_str(),
        device: dev.describe(),
        rows,
        skipped,
    })
}

/// Fills the engine pool with distinct bytes everywhere: one random host chunk, copied
/// at a different rotation for each piece of the pool.
fn fill_pool(
    dev: &dyn Device,
    stream: StreamId,
    engine: DeviceBuffer,
    host: &mut [u8],
) -> Result<(), DeviceError> {
    let chunk = host.len().min(256 << 20);
    fill_random(&mut host[..chunk], 0x006b_7670_6c61_6e65);
    let mut piece = vec![0u8; chunk];
    let total = engine.len_bytes();
    let mut offset = 0;
    let mut index = 0usize;
    while offset < total {
        let len = chunk.min(total - offset);
        let rot = (index * 4099 + 1) % chunk;
        piece[..chunk - rot].copy_from_slice(&host[rot..chunk]);
        piece[chunk - rot..].copy_from_slice(&host[..rot]);
        dev.copy_to_device(stream, &piece[..len], engine.range(offset, len))?;
        offset += len;
        index += 1;
    }
    Ok(())
}

/// The goals of the GPU data-path issue for one row: kernel >= 0.9 of the bulk copy,
/// >= 4x the per-page loop (both directions), G1 >= 0.8 of a bulk device copy.
pub fn goals(row: &OffloadRow) -> [(&'static str, f64, f64); 5] {
    let ratio = |x: f64, of: f64| if of > 0.0 { x / of } else { 0.0 };
    [
        (
            "save vs bulk",
            ratio(row.save.best_kernel_gbps(), row.save.bulk_gbps),
            0.9,
        ),
        (
            "load vs bulk",
            ratio(row.load.best_kernel_gbps(), row.load.bulk_gbps),
            0.9,
        ),
        (
            "save vs per-page",
            ratio(row.save.best_kernel_gbps(), row.save.per_page_gbps),
            4.0,
        ),
        (
            "load vs per-page",
            ratio(row.load.best_kernel_gbps(), row.load.per_page_gbps),
            4.0,
        ),
        (
            "G1 vs bulk d2d",
            ratio(row.g1_save_gbps.min(row.g1_load_gbps), row.g1_bulk_gbps),
            0.8,
        ),
    ]
}

/// The report as Markdown tables: one per direction, then G1, then the goals.
pub fn format_report(r: &OffloadReport) -> String {
    let mut s = format!(
        "offload path: engine pages (vLLM layout) <-> pinned host / G1, backend {} ({})\n\
         every way verified byte for byte against one cuMemcpyAsync per page\n",
        r.backend, r.device
    );
    for (dir, pick) in [
        (
            "SAVE (engine -> pinned host)",
            (|row: &OffloadRow| row.save) as fn(&OffloadRow) -> Ways,
        ),
        ("LOAD (pinned host -> engine)", |row: &OffloadRow| row.load),
    ] {
        s.push_str(&format!(
            "\n{dir}\n\n| model | page | block | blocks | direct GB/s | staged GB/s | (b) per-page GB/s | (a) bulk GB/s | best / (a) | best / (b) |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        ));
        for row in &r.rows {
            let w = pick(row);
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1}x |\n",
                row.model,
                row.page_tokens,
                size_label(row.block_bytes),
                row.blocks,
                w.direct_gbps,
                w.staged_gbps,
                w.per_page_gbps,
                w.bulk_gbps,
                w.best_kernel_gbps() / w.bulk_gbps.max(1e-12),
                w.best_kernel_gbps() / w.per_page_gbps.max(1e-12),
            ));
        }
    }
    s.push_str(
        "\nG1 (engine <-> device arena)\n\n| model | page | blocks | gather GB/s | scatter GB/s | bulk d2d GB/s | min / bulk | SAVE submit->done (1st batch) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {} |\n",
            row.model,
            row.page_tokens,
            row.blocks,
            row.g1_save_gbps,
            row.g1_load_gbps,
            row.g1_bulk_gbps,
            row.g1_save_gbps.min(row.g1_load_gbps) / row.g1_bulk_gbps.max(1e-12),
            row.save_submit_to_done_us
                .map_or(String::new(), |us| format!("{us:.0} us")),
        ));
    }
    let missed: Vec<String> = r
        .rows
        .iter()
        .flat_map(|row| {
            goals(row)
                .into_iter()
                .filter(|(_, got, want)| got < want)
                .map(move |(what, got, want)| {
                    format!(
                        "{} {}-token x{}: {what} {got:.2} < {want}",
                        row.model, row.page_tokens, row.blocks
                    )
                })
        })
        .collect();
    if missed.is_empty() {
        s.push_str("\ngoals (>= 0.9 of bulk, >= 4x per-page, G1 >= 0.8 of d2d): all met\n");
    } else {
        s.push_str(&format!("\ngoals missed ({}):\n", missed.len()));
        for m in missed {
            s.push_str(&format!("- {m}\n"));
        }
    }
    if !r.skipped.is_empty() {
        let list: Vec<String> = r
            .skipped
            .iter()
            .map(|(m, pt, n)| format!("{m} {pt}-token x{n}"))
            .collect();
        s.push_str(&format!(
            "\nskipped (over the per-case budget): {}\n",
            list.join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostDevice;

    const TINY: Geometry = Geometry {
        name: "tiny",
        layers: 3,
        kv_heads: 2,
        head_dim: 16,
        dtype_bytes: 2,
    };

    #[test]
    fn geometry_matches_the_published_models() {
        // 8B: 32 layers x K,V x 8 heads x 128 x bf16 = 128 KiB per token.
        assert_eq!(Geometry::LLAMA_3_1_8B.block_bytes(1), 128 << 10);
        // 70B, 16-token pages: 32 KiB per page and plane, 5 MiB per block (GPU-NOTES).
        assert_eq!(Geometry::LLAMA_3_1_70B.page_plane_bytes(16), 32 << 10);
        assert_eq!(Geometry::LLAMA_3_1_70B.block_bytes(16), 5 << 20);
        let raw = vllm_layout(&Geometry::LLAMA_3_1_70B, 16, 8);
        let layout = PagedLayout::new(&raw).expect("valid");
        assert_eq!(layout.info().block_bytes, 5 << 20);
    }

    #[test]
    fn per_page_copies_land_where_the_gather_puts_them() {
        let raw = vllm_layout(&TINY, 4, 6);
        let chunk = TINY.page_plane_bytes(4);
        let copies = page_copies(&raw, &[5, 0], chunk);
        assert_eq!(copies.len(), 2 * 3 * 2);
        // Block 1 (page 0), layer 2, plane V: the last slice of the second block.
        let block = TINY.block_bytes(4);
        assert_eq!(
            copies[11],
            (raw.plane_offset[1][2] as usize, block + 5 * chunk)
        );
        let (save, load) = pick_pages(10, 4, 7);
        let mut all: Vec<u32> = save.iter().chain(&load).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(
            all.len(),
            8,
            "save and load pages distinct: {save:?} {load:?}"
        );
    }

    #[test]
    fn every_way_runs_and_verifies_on_the_host_backend() {
        let dev = HostDevice::new();
        let cfg = OffloadConfig {
            models: vec![TINY],
            page_tokens: vec![4, 16],
            batches: vec![1, 3, 64],
            max_case_bytes: 40 * TINY.block_bytes(16),
            iters: 2,
        };
        let report = run(&dev, &cfg).expect("offload check");
        assert_eq!(report.backend, "host");
        // 64 blocks of 16-token pages are over the budget; 64 of 4-token pages are not.
        assert_eq!(report.skipped, vec![("tiny", 16, 64)]);
        assert_eq!(report.rows.len(), 5);
        for row in &report.rows {
            for v in [
                row.save.direct_gbps,
                row.save.staged_gbps,
                row.save.per_page_gbps,
                row.save.bulk_gbps,
                row.load.direct_gbps,
                row.load.per_page_gbps,
                row.g1_save_gbps,
                row.g1_bulk_gbps,
            ] {
                assert!(v.is_finite() && v > 0.0, "{row:?}");
            }
        }
        assert!(report.rows[0].save_submit_to_done_us.is_some());
        assert!(report.rows[1].save_submit_to_done_us.is_none());
        let text = format_report(&report);
        assert!(text.contains("backend host"), "{text}");
        assert!(text.contains("| tiny | 16 | 6 KiB | 3 |"), "{text}");
        let json = serde_json::to_value(&report).expect("json");
        assert!(json["rows"][0]["save"]["direct_gbps"].as_f64().is_some());
    }

    #[test]
    fn a_wrong_gather_is_caught() {
        // The check compares bytes, not just lengths: one flipped byte is a mismatch at
        // its offset.
        let a = vec![1u8; 64];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[40] ^= 1;
        assert_eq!(first_difference(&a, &b), Some(40));
    }
}
