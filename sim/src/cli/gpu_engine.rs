//! `kvplane gpu-engine`: one engine process with its KV pool in GPU memory (or a host
//! memfd), registered with a running daemon as KV regions: `--role save` fills a chain
//! of blocks with a pattern and saves it; `--role load`, run in another process, loads the
//! chain into its own pool and compares every byte. What `scripts/gpu-e2e.sh` runs across
//! processes on a GPU machine; `--memory host` runs the same steps anywhere (a test does).
//!
//! The pool is vLLM's: per layer a [2, pages, tokens, heads, head_bytes] tensor, each its
//! own allocation with `--per-layer` (as vLLM allocates them), else one allocation for all
//! layers. Saves use pages 0..blocks, loads pages blocks..2*blocks, so a load that ignored
//! the page ids would not find its bytes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvplane_cuda::engine::{EngineAlloc, EngineGpu};
use kvplane_ffi::{Opcode, Status, kvp_block_op, kvp_kv_layout};
use kvplane_shm::handshake::EngineRegion;
use kvplane_shm::{AttachOptions, Segment, Session, client, sys};

use super::CliResult;
use crate::bench::served::EngineGeometry;
use crate::engine_sim::pages::fill_block;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Save,
    Load,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Memory {
    /// cudaMalloc-style memory, registered by its CUDA IPC handle.
    Ipc,
    /// A VMM allocation exported as a file descriptor.
    Vmm,
    /// VMM allocations of `--chunk-bytes` each mapped back to back, as PyTorch's
    /// expandable segments map theirs: a region per chunk, each continuing the one
    /// before.
    VmmChunks,
    /// A sealed host memfd (no GPU needed).
    Host,
}

#[derive(Debug, clap::Args)]
pub struct GpuEngineArgs {
    /// The daemon's engine socket.
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long, value_enum)]
    pub role: Role,
    #[arg(long, value_enum, default_value = "ipc")]
    pub memory: Memory,
    /// One allocation per layer (vLLM) instead of one for the whole pool.
    #[arg(long)]
    pub per_layer: bool,
    /// Bytes of each chunk with `--memory vmm-chunks` (rounded up to the granularity).
    #[arg(long, default_value_t = 2 << 20)]
    pub chunk_bytes: usize,
    /// CUDA device ordinal of the engine's memory.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    #[arg(long, default_value = "gpu-e2e")]
    pub namespace: String,
    /// Blocks in the chain.
    #[arg(long, default_value_t = 16)]
    pub blocks: u32,
    /// Hash of the chain's first block (the rest follow it).
    #[arg(long, default_value_t = 0x6b76_0001)]
    pub first_hash: u64,
    #[arg(long, default_value_t = 4)]
    pub layers: u32,
    #[arg(long, default_value_t = 16)]
    pub page_tokens: u32,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: u32,
    /// Bytes of one head of one token (head_dim x dtype bytes).
    #[arg(long, default_value_t = 256)]
    pub head_bytes: u32,
    /// SAVE with KVP_SQE_F_WRITE_THROUGH (lands on NVMe now).
    #[arg(long)]
    pub write_through: bool,
    /// SAVE with KVP_SQE_F_KEEP_ON_GPU (also lands in G1, the daemon's HBM arena).
    #[arg(long)]
    pub keep_on_gpu: bool,
    /// Register an interprocess CUDA event (KVP_OP_REGISTER_EVENTS) and name it: the
    /// SAVE's copy waits for it on the GPU (recorded after the pages are written), the
    /// LOAD completes when its copy is queued and the tool waits on the event before it
    /// reads the pages. GPU memory only.
    #[arg(long)]
    pub ipc_event: bool,
    /// Fail unless the completion names this tier (a LOAD's slowest source, a SAVE's
    /// destination): `hbm`, `host` or `nvme`.
    #[arg(long)]
    pub expect_tier: Option<ExpectTier>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExpectTier {
    Hbm,
    Host,
    Nvme,
}

impl ExpectTier {
    fn tier(self) -> kvplane_ffi::Tier {
        match self {
            ExpectTier::Hbm => kvplane_ffi::Tier::Hbm,
            ExpectTier::Host => kvplane_ffi::Tier::Host,
            ExpectTier::Nvme => kvplane_ffi::Tier::Nvme,
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct GpuEngineReport {
    pub role: &'static str,
    pub memory: Memory,
    pub per_layer: bool,
    pub blocks: u32,
    pub block_bytes: u64,
    pub regions: usize,
    pub status: i32,
    pub blocks_done: u32,
    /// The slowest tier a LOAD was served from / a SAVE stored to (kvp_tier).
    pub tier: u32,
    /// From submission to completion of the SAVE or LOAD.
    pub op_us: f64,
    /// LOAD: blocks whose bytes differ from what was saved (must be 0).
    pub mismatched_blocks: u32,
}

/// The engine's pool: allocations and, per layer, (allocation, offset of its tensor).
enum Pool {
    /// The allocations and their GPU (for the tool's IPC event).
    Gpu(Vec<EngineAlloc>, Arc<EngineGpu>),
    Host(Vec<Segment>),
}

impl Pool {
    fn write(&self, alloc: usize, offset: u64, data: &[u8]) -> CliResult {
        match self {
            Pool::Gpu(a, _) => a[alloc].write(offset as usize, data)?,
            Pool::Host(s) => s[alloc].write_bytes(offset, data)?,
        }
        Ok(())
    }
    fn read(&self, alloc: usize, offset: u64, out: &mut [u8]) -> CliResult {
        match self {
            Pool::Gpu(a, _) => a[alloc].read(offset as usize, out)?,
            Pool::Host(s) => s[alloc].read_bytes(offset, out)?,
        }
        Ok(())
    }
}

/// (allocation, offset) of page `page` of (layer, plane): the pool is `g`'s vLLM layout
/// of `pages` pages, in one allocation or (`per_layer`) one per layer.
fn at(
    g: &EngineGeometry,
    pages: u64,
    per_layer: bool,
    layer: u32,
    plane: u32,
    page: u64,
) -> (usize, u64) {
    let page_at = page * g.run_bytes();
    if per_layer {
        (layer as usize, g.run_offset(pages, 0, plane, 0) + page_at)
    } else {
        (0, g.run_offset(pages, layer, plane, 0) + page_at)
    }
}

/// Calls `f` with each (layer, plane) part of page `page`: its bytes in the packed block
/// ([layer][plane][page bytes]) and where it lives in the pool.
fn for_each_part(
    g: &EngineGeometry,
    pages: u64,
    per_layer: bool,
    page: u64,
    mut f: impl FnMut(std::ops::Range<usize>, usize, u64) -> CliResult,
) -> CliResult {
    let run = g.run_bytes() as usize;
    for layer in 0..g.layers {
        for plane in 0..2 {
            let k = (2 * layer + plane) as usize * run;
            let (alloc, off) = at(g, pages, per_layer, layer, plane, page);
            f(k..k + run, alloc, off)?;
        }
    }
    Ok(())
}

pub fn gpu_engine(
    args: &GpuEngineArgs,
) -> Result<GpuEngineReport, Box<dyn std::error::Error + Send + Sync>> {
    let g = EngineGeometry {
        layers: args.layers,
        page_tokens: args.page_tokens,
        kv_heads: args.kv_heads,
        head_bytes: args.head_bytes,
    };
    g.validate()?;
    let pages = 2 * u64::from(args.blocks);
    let allocs = if args.per_layer {
        args.layers as usize
    } else {
        1
    };
    let alloc_bytes = pages * g.block_bytes() / allocs as u64;
    let mut regions = Vec::with_capacity(allocs);
    // Each allocation's first region: the one the layout names (an allocation in chunks
    // is a run of regions).
    let mut first_region = Vec::with_capacity(allocs);
    let pool = match args.memory {
        Memory::Host => {
            let mut segs = Vec::new();
            for _ in 0..allocs {
                first_region.push(regions.len());
                let fd = sys::memfd_create_sealed("gpu-engine-kv", alloc_bytes)?;
                segs.push(Segment::map_fd(fd.try_clone()?, alloc_bytes)?);
                regions.push(EngineRegion::host_memfd(fd, alloc_bytes));
            }
            Pool::Host(segs)
        }
        Memory::Ipc | Memory::Vmm | Memory::VmmChunks => {
            let gpu: Arc<EngineGpu> = EngineGpu::open(args.gpu)?;
            let mut a = Vec::new();
            for _ in 0..allocs {
                let alloc = match args.memory {
                    Memory::Vmm => gpu.alloc_vmm(alloc_bytes as usize)?,
                    Memory::VmmChunks => {
                        gpu.alloc_vmm_chunked(alloc_bytes as usize, args.chunk_bytes)?
                    }
                    _ => gpu.alloc(alloc_bytes as usize)?,
                };
                first_region.push(regions.len());
                for (desc, fd) in alloc.regions()? {
                    regions.push(EngineRegion { desc, fd });
                }
                a.push(alloc);
            }
            Pool::Gpu(a, gpu)
        }
    };
    let event = match (&pool, args.ipc_event) {
        (Pool::Gpu(_, gpu), true) => Some(gpu.event()?),
        (_, true) => return Err("--ipc-event needs GPU memory (--memory ipc or vmm)".into()),
        _ => None,
    };
    let region_count = regions.len();
    let mut opts = AttachOptions::new(&args.socket);
    opts.namespaces = vec![args.namespace.clone()];
    opts.kv_regions = regions;
    let mut session = Session::attach(opts)?;
    let mut qp = session.take_queue_pairs()?.remove(0);
    let timeout = Duration::from_secs(60);

    // The vLLM layout of one pool, each (layer, plane) then placed in its allocation.
    let mut l: kvp_kv_layout = g.layout(pages);
    for layer in 0..args.layers {
        for plane in 0..2 {
            let (alloc, off) = at(&g, pages, args.per_layer, layer, plane, 0);
            l.plane_region[plane as usize][layer as usize] = first_region[alloc] as u16;
            l.plane_offset[plane as usize][layer as usize] = off;
        }
    }
    qp.write_arena(0, kvplane_ffi::as_bytes(&l))?;
    let mut s = client::sqe(Opcode::AttachLayout, 1);
    s.arg_len = std::mem::size_of::<kvp_kv_layout>() as u32;
    let c = qp.call(s, timeout)?;
    if c.status != Status::Ok.raw() {
        return Err(format!(
            "ATTACH_LAYOUT refused: status {} detail {} (does blocks.block_bytes = {}?)",
            c.status,
            c.detail,
            g.block_bytes()
        )
        .into());
    }

    if let Some(e) = &event {
        let desc = e.describe()?;
        qp.write_arena(0, kvplane_ffi::as_bytes(&desc))?;
        let mut s = client::sqe(Opcode::RegisterEvents, 3);
        s.count = 1;
        s.arg_len = std::mem::size_of_val(&desc) as u32;
        let c = qp.call(s, timeout)?;
        if c.status != Status::Ok.raw() {
            return Err(format!(
                "REGISTER_EVENTS refused: status {} detail {}",
                c.status, c.detail
            )
            .into());
        }
    }

    let block_bytes = g.block_bytes() as usize;
    let first_page = match args.role {
        Role::Save => 0,
        Role::Load => u64::from(args.blocks),
    };
    let hashes: Vec<u64> = (0..u64::from(args.blocks))
        .map(|i| args.first_hash.wrapping_add(i))
        .collect();
    let mut bytes = vec![0u8; block_bytes];
    for (i, &h) in hashes.iter().enumerate() {
        match args.role {
            Role::Save => fill_block(h, &mut bytes),
            Role::Load => bytes.fill(0xEE),
        }
        for_each_part(
            &g,
            pages,
            args.per_layer,
            first_page + i as u64,
            |r, alloc, off| pool.write(alloc, off, &bytes[r]),
        )?;
    }
    let mut arg = Vec::with_capacity(hashes.len() * std::mem::size_of::<kvp_block_op>());
    for (i, &h) in hashes.iter().enumerate() {
        let parent = if i == 0 { 0 } else { hashes[i - 1] };
        let op = kvp_block_op::new(h, parent, (first_page + i as u64) as u32);
        arg.extend_from_slice(kvplane_ffi::as_bytes(&op));
    }
    qp.write_arena(0, &arg)?;
    let mut s = client::sqe(
        match args.role {
            Role::Save => Opcode::Save,
            Role::Load => Opcode::Load,
        },
        2,
    );
    s.arg_len = arg.len() as u32;
    s.count = args.blocks;
    if let Some(e) = &event {
        // SAVE: after the pages were written; LOAD: the daemon records it.
        if args.role == Role::Save {
            e.record()?;
        }
        s.param0 = 1;
    }
    if args.role == Role::Save {
        if args.write_through {
            s.flags |= kvplane_ffi::SQE_F_WRITE_THROUGH;
        }
        if args.keep_on_gpu {
            s.flags |= kvplane_ffi::SQE_F_KEEP_ON_GPU;
        }
    }
    let t0 = Instant::now();
    let c = qp.call(s, timeout)?;
    let op_us = t0.elapsed().as_secs_f64() * 1e6;
    if let (Some(e), Role::Load) = (&event, args.role) {
        // The LOAD completed when its copy was queued: the pages are there once the
        // event the daemon recorded after it has fired.
        e.synchronize()?;
    }
    let mut mismatched = 0u32;
    if args.role == Role::Load && c.status == Status::Ok.raw() {
        let mut got = vec![0u8; block_bytes];
        for (i, &h) in hashes.iter().enumerate() {
            for_each_part(
                &g,
                pages,
                args.per_layer,
                first_page + i as u64,
                |r, alloc, off| pool.read(alloc, off, &mut got[r]),
            )?;
            fill_block(h, &mut bytes);
            if got != bytes {
                mismatched += 1;
            }
        }
    }
    drop(session);
    Ok(GpuEngineReport {
        role: match args.role {
            Role::Save => "save",
            Role::Load => "load",
        },
        memory: args.memory,
        per_layer: args.per_layer,
        blocks: args.blocks,
        block_bytes: g.block_bytes(),
        regions: region_count,
        status: c.status,
        blocks_done: c.blocks,
        tier: u32::from(c.tier),
        op_us: (op_us * 10.0).round() / 10.0,
        mismatched_blocks: mismatched,
    })
}

pub fn run(args: GpuEngineArgs) -> CliResult {
    let r = gpu_engine(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} {} blocks ({} B each, {:?} memory, {} regions): status {} blocks {} tier {} in {:.1} us, {} mismatched",
            r.role,
            r.blocks,
            r.block_bytes,
            r.memory,
            r.regions,
            r.status,
            r.blocks_done,
            r.tier,
            r.op_us,
            r.mismatched_blocks
        );
    }
    if r.status != Status::Ok.raw() || r.blocks_done != r.blocks || r.mismatched_blocks != 0 {
        return Err(format!(
            "{} failed: status {}, {} of {} blocks, {} mismatched",
            r.role, r.status, r.blocks_done, r.blocks, r.mismatched_blocks
        )
        .into());
    }
    if let Some(want) = args.expect_tier
        && r.tier != want.tier().raw()
    {
        return Err(format!(
            "{} completed from/to tier {}, expected {} ({})",
            r.role,
            r.tier,
            want.tier().raw(),
            want.tier().name()
        )
        .into());
    }
    Ok(())
}
