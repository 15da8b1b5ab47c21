//! `kvplane bench gather`: the paged gather and scatter kernels on the host backend (the
//! CPU build of `kernels/cuda/paged.cu`), against memcpy of the same bytes measured in
//! the same run.
//!
//! Geometry: a 70B-class model (80 layers, 8 KV heads, head_dim 128, bf16) in vLLM's
//! per-layer `[2, pages, tokens, heads, dim]` layout (or TensorRT-LLM's head-major pool
//! with `--layout trtllm`), for 16- and 64-token pages. Each
//! iteration gathers a batch of scattered engine pages into contiguous daemon blocks
//! (one launch), scatters them back (one launch), and memcpys the same number of bytes
//! between the same two buffers; the figure reported is the median iteration.

use super::CliResult;
use kvplane_ffi::kvp_kv_layout;
use kvplane_kernels::{EngineKv, HostLaunch, PagedLayout, gather, scatter};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct GatherArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Tokens per page; one case per value.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub page_tokens: Vec<u32>,
    /// Bytes moved per launch (rounded down to whole blocks, at least one), in MiB.
    #[arg(long, default_value_t = 128)]
    pub batch_mib: u64,
    /// Measured iterations per case (after one warm-up).
    #[arg(long, default_value_t = 9)]
    pub iters: u32,
    /// Host threads per launch. 1 compares with single-threaded memcpy.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Model layers.
    #[arg(long, default_value_t = 80)]
    pub layers: u32,
    /// KV heads per layer.
    #[arg(long, default_value_t = 8)]
    pub kv_heads: u32,
    /// Head dimension (elements).
    #[arg(long, default_value_t = 128)]
    pub head_dim: u32,
    /// Bytes per element (2 = bf16).
    #[arg(long, default_value_t = 2)]
    pub dtype_bytes: u32,
    /// Engine layout: `vllm` (per layer [2, pages, tokens, heads, dim]: one 32 KiB run
    /// per layer and plane of a 16-token page) or `trtllm` (pool [pages, layers, 2,
    /// heads, tokens, dim]: head-major, so every head_dim run moves on its own).
    #[arg(long, value_enum, default_value_t = EngineLayout::Vllm)]
    pub layout: EngineLayout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineLayout {
    Vllm,
    Trtllm,
}

impl EngineLayout {
    fn describe(self) -> &'static str {
        match self {
            EngineLayout::Vllm => "vllm per-layer [2, pages, tokens, heads, dim]",
            EngineLayout::Trtllm => "trtllm pool [pages, layers, 2, heads, tokens, dim]",
        }
    }
}

/// Errors of this bench, with the case they happened in.
#[derive(Debug, thiserror::Error)]
pub enum BenchGatherError {
    #[error("bench gather: invalid geometry (page_tokens {page_tokens})")]
    Layout {
        page_tokens: u32,
        source: kvplane_kernels::LayoutError,
    },
    #[error("bench gather: launch failed (page_tokens {page_tokens})")]
    Launch {
        page_tokens: u32,
        source: kvplane_kernels::KernelError,
    },
    #[error("bench gather: engine pool of {bytes} bytes does not fit this address space")]
    TooLarge { bytes: u64 },
    #[error(
        "bench gather: gathered data differs from the engine buffer (page_tokens {page_tokens}, block {block})"
    )]
    Verify { page_tokens: u32, block: usize },
    #[error("bench gather: {what} must be at least 1")]
    Zero { what: &'static str },
}

#[derive(Debug, Clone, serde::Serialize)]
struct CaseResult {
    page_tokens: u32,
    block_bytes: u64,
    run_bytes: u64,
    batch_pages: usize,
    pool_pages: u64,
    batch_bytes: u64,
    gather_gbps: f64,
    scatter_gbps: f64,
    memcpy_gbps: f64,
    gather_ratio: f64,
    scatter_ratio: f64,
}

/// The engine layout `args.layout` for `pool_pages` pages.
fn engine_layout(args: &GatherArgs, page_tokens: u32, pool_pages: u64) -> kvp_kv_layout {
    match args.layout {
        EngineLayout::Vllm => vllm_layout(args, page_tokens, pool_pages),
        EngineLayout::Trtllm => trtllm_layout(args, page_tokens, pool_pages),
    }
}

/// TensorRT-LLM's pool: [pages, layers, 2, heads, tokens, dim] in one buffer.
fn trtllm_layout(args: &GatherArgs, page_tokens: u32, pool_pages: u64) -> kvp_kv_layout {
    let mut l = vllm_layout(args, page_tokens, pool_pages);
    let head_bytes = u64::from(l.head_bytes);
    l.token_stride_bytes = head_bytes;
    l.head_stride_bytes = u64::from(page_tokens) * head_bytes;
    let plane_bytes = u64::from(args.kv_heads) * l.head_stride_bytes;
    l.page_stride_bytes = u64::from(args.layers) * 2 * plane_bytes;
    for layer in 0..(args.layers as usize).min(l.plane_offset[0].len()) {
        l.plane_offset[0][layer] = 2 * layer as u64 * plane_bytes;
        l.plane_offset[1][layer] = (2 * layer as u64 + 1) * plane_bytes;
    }
    l.buffer_bytes = pool_pages * l.page_stride_bytes;
    l
}

/// vLLM flash-attention layout: per layer one tensor [2, pages, tokens, heads, dim],
/// the layers' tensors back to back in one buffer.
fn vllm_layout(args: &GatherArgs, page_tokens: u32, pool_pages: u64) -> kvp_kv_layout {
    // SAFETY: kvp_kv_layout is plain old data; all-zero is a valid value.
    let mut l: kvp_kv_layout = unsafe { std::mem::zeroed() };
    let head_bytes = u64::from(args.head_dim) * u64::from(args.dtype_bytes);
    l.num_layers = args.layers;
    l.kv_planes = 2;
    l.page_tokens = page_tokens;
    l.kv_heads = args.kv_heads;
    l.head_bytes = u32::try_from(head_bytes).unwrap_or(u32::MAX);
    l.dtype_bytes = args.dtype_bytes;
    l.num_pages = pool_pages;
    l.head_stride_bytes = head_bytes;
    l.token_stride_bytes = u64::from(args.kv_heads) * head_bytes;
    l.page_stride_bytes = u64::from(page_tokens) * l.token_stride_bytes;
    let plane_bytes = pool_pages * l.page_stride_bytes;
    for layer in 0..(args.layers as usize).min(l.plane_offset[0].len()) {
        l.plane_offset[0][layer] = 2 * layer as u64 * plane_bytes;
        l.plane_offset[1][layer] = (2 * layer as u64 + 1) * plane_bytes;
    }
    l.buffer_bytes = 2 * u64::from(args.layers) * plane_bytes;
    l
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-9) / 1e9
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Fills with a cheap non-constant pattern, touching every page up front.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

fn run_case(args: &GatherArgs, page_tokens: u32) -> Result<CaseResult, BenchGatherError> {
    let launch = HostLaunch {
        threads: args.threads,
    };
    // Size the batch first from one page's block bytes.
    let probe = engine_layout(args, page_tokens, 1);
    let block_bytes = PagedLayout::new(&probe)
        .map_err(|source| BenchGatherError::Layout {
            page_tokens,
            source,
        })?
        .info()
        .block_bytes;
    let batch_pages = ((args.batch_mib << 20) / block_bytes).max(1) as usize;
    // Twice the batch in the pool, batch pages picked spread out and out of order.
    let pool_pages = 2 * batch_pages as u64;
    let raw = engine_layout(args, page_tokens, pool_pages);
    let layout = PagedLayout::new(&raw).map_err(|source| BenchGatherError::Layout {
        page_tokens,
        source,
    })?;
    let pool_bytes = usize::try_from(raw.buffer_bytes).map_err(|_| BenchGatherError::TooLarge {
        bytes: raw.buffer_bytes,
    })?;
    let batch_bytes = batch_pages as u64 * block_bytes;
    let mut pool = vec![0u8; pool_bytes];
    fill(&mut pool, 0x6b76_706c_616e_6531);
    let mut blocks = vec![0u8; batch_bytes as usize];
    fill(&mut blocks, 7);
    let pages: Vec<u32> = (0..batch_pages as u32)
        .map(|i| 2 * i + (i % 2)) // distinct, every other page, < pool_pages
        .rev()
        .collect();
    let engine = {
        let ptr = NonNull::new(pool.as_mut_ptr()).expect("Vec pointer is non-null");
        // SAFETY: `pool` lives until the end of this function and is only accessed
        // through `engine` (and the memcpy below, never concurrently with a launch).
        unsafe { EngineKv::new(ptr, pool.len()) }
    };
    let launch_err = |source| BenchGatherError::Launch {
        page_tokens,
        source,
    };

    // Check once that gather moves the right bytes (first run of the first block).
    gather(&engine, &layout, &pages, &mut blocks, launch).map_err(launch_err)?;
    let run = layout.info().run_bytes as usize;
    let at = raw.plane_offset[0][0] as usize + pages[0] as usize * raw.page_stride_bytes as usize;
    // SAFETY: [at, at + run) is inside the pool (validated layout, checked page id) and no
    // launch is running.
    let engine_run = unsafe { std::slice::from_raw_parts(engine.base().as_ptr().add(at), run) };
    if blocks[..run] != *engine_run {
        return Err(BenchGatherError::Verify {
            page_tokens,
            block: 0,
        });
    }

    let (mut t_gather, mut t_scatter, mut t_memcpy) = (Vec::new(), Vec::new(), Vec::new());
    for iter in 0..=args.iters {
        let t0 = Instant::now();
        gather(&engine, &layout, &pages, &mut blocks, launch).map_err(launch_err)?;
        let t1 = Instant::now();
        scatter(&engine, &layout, &pages, &blocks, launch).map_err(launch_err)?;
        let t2 = Instant::now();
        {
            // SAFETY: no launch is running; the pool is at least batch_bytes long (it
            // holds twice the batch's pages).
            let src =
                unsafe { std::slice::from_raw_parts(engine.base().as_ptr(), batch_bytes as usize) };
            blocks.copy_from_slice(std::hint::black_box(src));
        }
        let t3 = Instant::now();
        std::hint::black_box(&blocks);
        if iter > 0 {
            t_gather.push(t1 - t0);
            t_scatter.push(t2 - t1);
            t_memcpy.push(t3 - t2);
        }
    }
    let (g, s, m) = (
        gbps(batch_bytes, median(t_gather)),
        gbps(batch_bytes, median(t_scatter)),
        gbps(batch_bytes, median(t_memcpy)),
    );
    Ok(CaseResult {
        page_tokens,
        block_bytes,
        run_bytes: layout.info().run_bytes,
        batch_pages,
        pool_pages,
        batch_bytes,
        gather_gbps: g,
        scatter_gbps: s,
        memcpy_gbps: m,
        gather_ratio: g / m,
        scatter_ratio: s / m,
    })
}

pub fn run(args: GatherArgs) -> CliResult {
    for (what, v) in [
        ("--iters", args.iters),
        ("--threads", args.threads),
        ("--layers", args.layers),
        ("--kv-heads", args.kv_heads),
        ("--head-dim", args.head_dim),
    ] {
        if v == 0 {
            return Err(BenchGatherError::Zero { what }.into());
        }
    }
    if args.page_tokens.is_empty() || args.page_tokens.contains(&0) {
        return Err(BenchGatherError::Zero {
            what: "--page-tokens",
        }
        .into());
    }
    let mut cases = Vec::new();
    for &page_tokens in &args.page_tokens {
        cases.push(run_case(&args, page_tokens)?);
    }
    let first = &cases[0];
    let layout_name = args.layout.describe();
    if args.json {
        let out = serde_json::json!({
            "bench": "gather",
            "backend": "host",
            "kernels": "kernels/cuda/paged.cu built for the CPU through the host shim",
            "threads": args.threads,
            "layout": layout_name,
            "geometry": {
                "layers": args.layers,
                "kv_heads": args.kv_heads,
                "head_dim": args.head_dim,
                "dtype_bytes": args.dtype_bytes,
                "page_tokens": first.page_tokens,
            },
            "iters": args.iters,
            // Top level: the first page size (16 by default); every size under "cases".
            "page_tokens": first.page_tokens,
            "block_bytes": first.block_bytes,
            "batch_bytes": first.batch_bytes,
            "gather_gbps": first.gather_gbps,
            "scatter_gbps": first.scatter_gbps,
            "memcpy_gbps": first.memcpy_gbps,
            "gather_ratio": first.gather_ratio,
            "scatter_ratio": first.scatter_ratio,
            "min_ratio": cases.iter().map(|c| c.gather_ratio.min(c.scatter_ratio)).fold(f64::INFINITY, f64::min),
            "cases": cases,
        });
        println!("{out}");
    } else {
        println!(
            "bench gather: backend host (CPU build of paged.cu), {} thread(s), {layout_name}",
            args.threads
        );
        println!(
            "geometry: {} layers, {} KV heads, head_dim {}, {} bytes/element; median of {} iterations",
            args.layers, args.kv_heads, args.head_dim, args.dtype_bytes, args.iters
        );
        println!(
            "{:>6} {:>11} {:>9} {:>6} {:>10} {:>10} {:>10} {:>8} {:>8}",
            "tokens",
            "block_MiB",
            "batch_MiB",
            "pages",
            "gather",
            "scatter",
            "memcpy",
            "g/mcpy",
            "s/mcpy"
        );
        for c in &cases {
            println!(
                "{:>6} {:>11.2} {:>9.1} {:>6} {:>6.2} GB/s {:>5.2} GB/s {:>5.2} GB/s {:>8.2} {:>8.2}",
                c.page_tokens,
                c.block_bytes as f64 / (1 << 20) as f64,
                c.batch_bytes as f64 / (1 << 20) as f64,
                c.batch_pages,
                c.gather_gbps,
                c.scatter_gbps,
                c.memcpy_gbps,
                c.gather_ratio,
                c.scatter_ratio
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: GatherArgs,
    }

    #[test]
    fn small_case_measures_and_verifies() {
        let w = Wrap::parse_from([
            "x",
            "--layers",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "64",
            "--batch-mib",
            "1",
            "--iters",
            "1",
            "--page-tokens",
            "16",
        ]);
        let c = run_case(&w.args, 16).expect("bench case");
        assert_eq!(c.block_bytes, 4 * 2 * 16 * 2 * 64 * 2);
        assert_eq!(c.batch_pages as u64, (1 << 20) / c.block_bytes);
        assert!(c.gather_gbps > 0.0 && c.scatter_gbps > 0.0 && c.memcpy_gbps > 0.0);
        // vLLM pages are contiguous per (layer, plane): one run of tokens*heads*head_bytes.
        assert_eq!(c.run_bytes, 16 * 2 * 128);
    }

    #[test]
    fn trtllm_case_moves_head_runs() {
        let w = Wrap::parse_from([
            "x",
            "--layers",
            "3",
            "--kv-heads",
            "2",
            "--head-dim",
            "64",
            "--batch-mib",
            "1",
            "--iters",
            "1",
            "--layout",
            "trtllm",
        ]);
        let c = run_case(&w.args, 16).expect("bench case");
        assert_eq!(c.run_bytes, 128, "head-major: one head_dim run at a time");
        assert_eq!(c.block_bytes, 3 * 2 * 16 * 2 * 128);
    }

    #[test]
    fn default_geometry_is_70b() {
        let w = Wrap::parse_from(["x"]);
        let raw = vllm_layout(&w.args, 16, 4);
        let info = *PagedLayout::new(&raw).expect("valid").info();
        assert_eq!(info.block_bytes, 80 * 2 * 16 * 8 * 128 * 2);
        assert_eq!(w.args.page_tokens, vec![16, 64]);
    }
}
