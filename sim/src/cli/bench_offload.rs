//! `kvplane bench offload`: the offload path through a real `kvplane serve` child and a
//! real engine session. The engine's KV pool is laid out like vLLM's per-layer tensors
//! (Llama-3.1-8B or -70B geometry, 16- or 64-token pages): on a GPU (`--memory ipc|vmm`)
//! one allocation per layer registered with the session as device regions, the daemon on
//! the cuda backend; otherwise a memfd and the host backend, and the labels say so. For
//! each batch size it times, from submission to completion as the engine sees them:
//!
//! - SAVE: engine pages -> the daemon's pinned host tier (one gather launch);
//! - LOAD: host tier -> other engine pages (one scatter launch), checked byte for byte in
//!   the first measured round;
//! - with `--g1`, SAVE with `KVP_SQE_F_KEEP_ON_GPU` (host tier and G1) and a LOAD served
//!   from G1;
//!
//! next to references measured in the same run, alternating with them, on the same
//! memory: (a) one bulk copy of the same bytes between device and pinned host memory (the
//! PCIe ceiling; device to device for G1; memcpy on the host backend) and (b) one copy per
//! page, layer and plane (`cuMemcpyAsync` each, what vLLM's `swap_blocks` does; memcpy
//! each on the host). Reference (c), PyTorch's per-layer `index_select` + copy, is
//! `scripts/gpu/torch_offload.py` on the same geometry.

use std::time::Instant;

use kvplane_cuda::engine::{EngineAlloc, HostCopy, PinnedHost};
use kvplane_daemon::config::BackendSetting;
use kvplane_ffi::{Opcode, SQE_F_KEEP_ON_GPU, Status, Tier};

use super::CliResult;
use crate::bench::served::{
    CeilingBuffer, EngineGeometry, EnginePool, EngineSession, PoolMemory, ServedDaemon,
    ServedOptions, chain_ops, memcpy_seconds,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Memory {
    /// A memfd in host memory (host backend; no GPU figure).
    Host,
    /// cudaMalloc-style allocations registered by CUDA IPC handle.
    Ipc,
    /// VMM allocations registered by file descriptor.
    Vmm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128, bf16.
    Llama8b,
    /// Llama-3.1-70B: 80 layers, 8 KV heads, head_dim 128, bf16.
    Llama70b,
}

#[derive(Debug, clap::Args)]
pub struct OffloadArgs {
    #[arg(long, value_enum, default_value = "host")]
    pub memory: Memory,
    /// CUDA device of the engine's pool (and the daemon's).
    #[arg(long, default_value_t = 0)]
    pub gpu: u32,
    #[arg(long, value_enum, default_value = "llama8b")]
    pub model: Model,
    /// Tokens per engine page (vLLM: 16).
    #[arg(long, default_value_t = 16)]
    pub page_tokens: u32,
    /// Blocks per SAVE / LOAD, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 4, 16, 64, 512])]
    pub batches: Vec<u32>,
    /// Measured rounds per batch size (median reported), after one warm-up round.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Also the G1 path (KVP_SQE_F_KEEP_ON_GPU, and loads from G1).
    #[arg(long)]
    pub g1: bool,
    /// Do not mlock the daemon's host pool (unprivileged runs).
    #[arg(long)]
    pub no_lock: bool,
    /// Directory for the daemon's socket, config and log (default: the temp directory).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The references' memory, sized for the largest batch.
enum Ceilings {
    Host {
        src: CeilingBuffer,
        dst: CeilingBuffer,
    },
    Gpu {
        device: EngineAlloc,
        device2: EngineAlloc,
        pinned: PinnedHost,
    },
}

impl Ceilings {
    fn new(
        pool: &EnginePool,
        bytes: usize,
    ) -> Result<Ceilings, Box<dyn std::error::Error + Send + Sync>> {
        Ok(match pool {
            EnginePool::Memfd(_) => Ceilings::Host {
                src: CeilingBuffer::new(bytes, 1),
                dst: CeilingBuffer::new(bytes, 2),
            },
            EnginePool::Gpu { gpu, .. } => Ceilings::Gpu {
                device: gpu.alloc(bytes)?,
                device2: gpu.alloc(bytes)?,
                pinned: gpu.pinned(bytes)?,
            },
        })
    }

    /// (a): seconds of one bulk copy of `bytes` (`way`; `None`: device to device).
    fn bulk(
        &mut self,
        pool: &EnginePool,
        way: Option<HostCopy>,
        bytes: usize,
        block_bytes: usize,
    ) -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
        match (self, pool) {
            (Ceilings::Host { src, dst }, _) => Ok(memcpy_seconds(src, dst, bytes, block_bytes)),
            (
                Ceilings::Gpu {
                    device,
                    device2,
                    pinned,
                },
                EnginePool::Gpu { gpu, .. },
            ) => {
                let t0 = Instant::now();
                match way {
                    Some(w) => device.copy_host_async(w, 0, pinned, 0, bytes)?,
                    None => device.copy_device_async(0, device2, 0, bytes)?,
                }
                gpu.synchronize()?;
                Ok(t0.elapsed().as_secs_f64())
            }
            _ => Err("bench offload: GPU references need a GPU pool".into()),
        }
    }

    /// (b): seconds of one copy per page, layer and plane of pages `first..first + n`
    /// between the engine's pool and pinned host memory (`way`).
    fn per_page(
        &mut self,
        e: &EngineSession,
        way: HostCopy,
        first: u32,
        n: u32,
    ) -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
        let g = e.geometry();
        let run = g.run_bytes() as usize;
        let t0 = Instant::now();
        match (self, e.pool()) {
            (Ceilings::Host { dst, .. }, EnginePool::Memfd(kv)) => {
                let buf = dst.bytes_mut();
                let mut k = 0;
                for page in first..first + n {
                    for layer in 0..g.layers {
                        for plane in 0..2 {
                            let (_, off) = e.run_at(layer, plane, page);
                            let part = &mut buf[k * run..(k + 1) * run];
                            match way {
                                HostCopy::ToHost => kv.read_bytes(off, part)?,
                                HostCopy::FromHost => kv.write_bytes(off, part)?,
                            }
                            k += 1;
                        }
                    }
                }
                std::hint::black_box(&buf[..]);
            }
            (Ceilings::Gpu { pinned, .. }, EnginePool::Gpu { allocs, gpu }) => {
                let mut k = 0;
                for page in first..first + n {
                    for layer in 0..g.layers {
                        for plane in 0..2 {
                            let (alloc, off) = e.run_at(layer, plane, page);
                            allocs[alloc].copy_host_async(
                                way,
                                off as usize,
                                pinned,
                                k * run,
                                run,
                            )?;
                            k += 1;
                        }
                    }
                }
                gpu.synchronize()?;
            }
            _ => return Err("bench offload: references and pool disagree".into()),
        }
        Ok(t0.elapsed().as_secs_f64())
    }
}

fn block_hash(batch: u32, round: usize, i: u32, salt: u64) -> u64 {
    kvplane_kernels::checksum::mix64(
        (u64::from(batch) << 48) ^ ((round as u64) << 32) ^ u64::from(i) ^ salt,
    ) | 1
}

#[derive(Debug, Default, serde::Serialize)]
struct Row {
    batch_blocks: u32,
    bytes: u64,
    save_gbps: f64,
    load_gbps: f64,
    bulk_d2h_gbps: f64,
    bulk_h2d_gbps: f64,
    per_page_d2h_gbps: f64,
    per_page_h2d_gbps: f64,
    save_vs_bulk: f64,
    load_vs_bulk: f64,
    save_vs_per_page: f64,
    load_vs_per_page: f64,
    save_p50_us: f64,
    load_p50_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    g1: Option<G1Row>,
}

#[derive(Debug, Default, serde::Serialize)]
struct G1Row {
    save_keep_gbps: f64,
    load_gbps: f64,
    bulk_d2d_gbps: f64,
    load_vs_bulk_d2d: f64,
}

pub fn run(args: OffloadArgs) -> CliResult {
    let (layers, name) = match args.model {
        Model::Llama8b => (32, "llama-3.1-8b"),
        Model::Llama70b => (80, "llama-3.1-70b"),
    };
    let g = EngineGeometry {
        layers,
        page_tokens: args.page_tokens,
        kv_heads: 8,
        head_bytes: 256,
    };
    g.validate()?;
    let max_n = args.batches.iter().copied().max().unwrap_or(0);
    if max_n == 0 || args.iters == 0 || args.batches.contains(&0) {
        return Err("bench offload: --batches must be at least 1 each, --iters at least 1".into());
    }
    let bb = g.block_bytes();
    let ordinal = args.gpu as usize;
    let (memory, backend) = match args.memory {
        Memory::Host => (PoolMemory::Host, BackendSetting::Host),
        Memory::Ipc => (PoolMemory::GpuIpc { ordinal }, BackendSetting::Cuda),
        Memory::Vmm => (PoolMemory::GpuVmm { ordinal }, BackendSetting::Cuda),
    };
    let options = ServedOptions {
        exe: std::env::current_exe()?,
        dir: args.dir.clone().unwrap_or_else(std::env::temp_dir),
        block_bytes: bb,
        // Each round's blocks are dropped after it: twice the largest batch never evicts.
        host_blocks: 2 * u64::from(max_n) + 1,
        lock: !args.no_lock,
        sessions: 1,
        backend,
        gpu_ordinal: args.gpu,
        hbm_blocks: if args.g1 { u64::from(max_n) + 1 } else { 0 },
    };
    let daemon = ServedDaemon::start(&options)?;
    // Pages [0, max) are the engine's computed pages; [max, max + n) receive the loads.
    let mut e = daemon.attach_pool(g, 2 * max_n, memory)?;
    if e.max_ops() < max_n as usize {
        return Err(format!(
            "bench offload: a batch of {max_n} exceeds the {} block ops the session's arena holds",
            e.max_ops()
        )
        .into());
    }
    for i in 0..max_n {
        e.fill_page(i, 0x5eed_0000 + u64::from(i))?;
    }
    let mut ceilings = Ceilings::new(e.pool(), (u64::from(max_n) * bb) as usize)?;
    let mut rows = Vec::new();
    let mut verified = 0u64;
    for &n in &args.batches {
        let bytes = u64::from(n) * bb;
        let mut s = Samples::default();
        for round in 0..=args.iters {
            let measured = round > 0;
            let refs_first = round % 2 == 0;
            let hashes: Vec<u64> = (0..n).map(|i| block_hash(n, round, i, 0)).collect();
            let mut refs = |s: &mut Samples, e: &EngineSession| -> CliResult {
                let d2h = ceilings.bulk(
                    e.pool(),
                    Some(HostCopy::ToHost),
                    bytes as usize,
                    bb as usize,
                )?;
                let h2d = ceilings.bulk(
                    e.pool(),
                    Some(HostCopy::FromHost),
                    bytes as usize,
                    bb as usize,
                )?;
                let pp_d2h = ceilings.per_page(e, HostCopy::ToHost, 0, n)?;
                let pp_h2d = ceilings.per_page(e, HostCopy::FromHost, max_n, n)?;
                let d2d = if args.g1 {
                    ceilings.bulk(e.pool(), None, bytes as usize, bb as usize)?
                } else {
                    0.0
                };
                if measured {
                    s.bulk_d2h.push(d2h);
                    s.bulk_h2d.push(h2d);
                    s.pp_d2h.push(pp_d2h);
                    s.pp_h2d.push(pp_h2d);
                    s.d2d.push(d2d);
                }
                Ok(())
            };
            if refs_first {
                refs(&mut s, &e)?;
            }
            let verify = round == 1;
            let save = e.op_all("SAVE", Opcode::Save, &chain_ops(&hashes, 0, 0))?;
            if verify {
                for i in 0..n {
                    e.poison_page(max_n + i)?;
                }
            }
            let load = e.op_all("LOAD", Opcode::Load, &chain_ops(&hashes, 0, max_n))?;
            if verify {
                for i in 0..n {
                    e.check_page(max_n + i, 0x5eed_0000 + u64::from(i))?;
                    verified += 1;
                }
            }
            let dropped = e.op(Opcode::Drop, 0, &chain_ops(&hashes, 0, 0))?;
            if dropped.cqe.blocks != n {
                return Err(format!(
                    "bench offload: DROP freed {} of {n} blocks",
                    dropped.cqe.blocks
                )
                .into());
            }
            if args.g1 {
                let hashes: Vec<u64> = (0..n).map(|i| block_hash(n, round, i, 0x61)).collect();
                let keep = e.op(Opcode::Save, SQE_F_KEEP_ON_GPU, &chain_ops(&hashes, 0, 0))?;
                if verify {
                    for i in 0..n {
                        e.poison_page(max_n + i)?;
                    }
                }
                let load_g1 = e.op_all("LOAD (G1)", Opcode::Load, &chain_ops(&hashes, 0, max_n))?;
                if verify {
                    for i in 0..n {
                        e.check_page(max_n + i, 0x5eed_0000 + u64::from(i))?;
                        verified += 1;
                    }
                }
                if keep.cqe.status != Status::Ok.raw()
                    || u32::from(load_g1.cqe.tier) != Tier::Hbm.raw()
                {
                    return Err(format!(
                        "bench offload: the G1 path was not taken (save status {}, tier {}; load tier {})",
                        keep.cqe.status, keep.cqe.tier, load_g1.cqe.tier
                    )
                    .into());
                }
                let dropped = e.op(Opcode::Drop, 0, &chain_ops(&hashes, 0, 0))?;
                if dropped.cqe.blocks != n {
                    return Err(format!(
                        "bench offload: DROP after the G1 round freed {} of {n} blocks",
                        dropped.cqe.blocks
                    )
                    .into());
                }
                if measured {
                    s.save_keep.push(keep.seconds);
                    s.load_g1.push(load_g1.seconds);
                }
            }
            if !refs_first {
                refs(&mut s, &e)?;
            }
            if measured {
                s.save.push(save.seconds);
                s.load.push(load.seconds);
            }
        }
        let gbps = |v: &[f64]| bytes as f64 / median(v) / 1e9;
        let mut row = Row {
            batch_blocks: n,
            bytes,
            save_gbps: gbps(&s.save),
            load_gbps: gbps(&s.load),
            bulk_d2h_gbps: gbps(&s.bulk_d2h),
            bulk_h2d_gbps: gbps(&s.bulk_h2d),
            per_page_d2h_gbps: gbps(&s.pp_d2h),
            per_page_h2d_gbps: gbps(&s.pp_h2d),
            save_p50_us: median(&s.save) * 1e6,
            load_p50_us: median(&s.load) * 1e6,
            ..Row::default()
        };
        row.save_vs_bulk = row.save_gbps / row.bulk_d2h_gbps;
        row.load_vs_bulk = row.load_gbps / row.bulk_h2d_gbps;
        row.save_vs_per_page = row.save_gbps / row.per_page_d2h_gbps;
        row.load_vs_per_page = row.load_gbps / row.per_page_h2d_gbps;
        if args.g1 {
            let load_gbps = gbps(&s.load_g1);
            let d2d = gbps(&s.d2d);
            row.g1 = Some(G1Row {
                save_keep_gbps: gbps(&s.save_keep),
                load_gbps,
                bulk_d2d_gbps: d2d,
                load_vs_bulk_d2d: load_gbps / d2d,
            });
        }
        rows.push(row);
    }
    drop(e);
    drop(daemon);
    let where_ = match args.memory {
        Memory::Host => {
            "host backend: the engine's pool is a memfd in host memory and the references are memcpy; no GPU figure"
        }
        _ => {
            "cuda backend: the engine's pool is in HBM (one allocation per layer); references are cuMemcpy between it and pinned host memory"
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "offload",
                "backend": where_,
                "path": "engine session -> rings -> kvplane serve -> one gather/scatter launch per batch -> pinned host tier (and G1), timed submit to completion",
                "model": name,
                "engine_layout": g.describe(),
                "block_bytes": bb,
                "memory": format!("{:?}", args.memory).to_lowercase(),
                "iters": args.iters,
                "rows": rows,
                "blocks_verified": verified,
                "goals": "save/load >= 0.9 of the bulk copy and >= 4x the per-page copies at every batch; G1 load >= 0.8 of a bulk device-to-device copy",
            })
        );
    } else {
        println!("kvplane bench offload ({where_})");
        println!("model {name}: {}", g.describe());
        println!(
            "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>9}",
            "blocks",
            "save",
            "load",
            "bulk d2h",
            "bulk h2d",
            "page d2h",
            "page h2d",
            "s/bulk",
            "l/bulk",
            "s/page",
            "l/page",
            "save us"
        );
        for r in &rows {
            println!(
                "{:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>9.1}",
                r.batch_blocks,
                r.save_gbps,
                r.load_gbps,
                r.bulk_d2h_gbps,
                r.bulk_h2d_gbps,
                r.per_page_d2h_gbps,
                r.per_page_h2d_gbps,
                r.save_vs_bulk,
                r.load_vs_bulk,
                r.save_vs_per_page,
                r.load_vs_per_page,
                r.save_p50_us
            );
            if let Some(g1) = &r.g1 {
                println!(
                    "       G1: save+keep {:.2} GB/s, load from G1 {:.2} GB/s, bulk d2d {:.2} GB/s, ratio {:.2}",
                    g1.save_keep_gbps, g1.load_gbps, g1.bulk_d2d_gbps, g1.load_vs_bulk_d2d
                );
            }
        }
        println!("GB/s; {verified} loaded blocks checked byte for byte");
    }
    Ok(())
}

#[derive(Default)]
struct Samples {
    save: Vec<f64>,
    load: Vec<f64>,
    bulk_d2h: Vec<f64>,
    bulk_h2d: Vec<f64>,
    pp_d2h: Vec<f64>,
    pp_h2d: Vec<f64>,
    d2d: Vec<f64>,
    save_keep: Vec<f64>,
    load_g1: Vec<f64>,
}
