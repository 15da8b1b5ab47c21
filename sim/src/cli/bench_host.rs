//! `kvplane bench host`: SAVE (engine pages -> host tier) and LOAD (host tier -> engine
//! pages) through a real `kvplane serve` child and an engine session attached to it over
//! the rings, against single-threaded memcpy of the same bytes, measured in the same run.
//!
//! The engine's KV pool is a sealed memfd registered with its session, laid out like
//! vLLM's per-layer tensors (default: a 70B-class model in 16-token pages, 80 layers x K,V
//! = 160 runs of 32 KiB per 5 MiB block). Each round SAVEs a new chain of `--batch-blocks`
//! pages, LOADs it into other (poisoned) pages, checks every byte, then DROPs it; SAVE and
//! LOAD are timed from submission to completion as the engine sees them (arena, rings,
//! validation, registry, the paged gather or scatter, completion). memcpy rounds of the
//! same number of bytes alternate with them (before the op in even rounds, after it in odd
//! ones), so host noise falls on both. The daemon's own time for the op (the completion's
//! `detail`) is reported next to it.

use kvplane_ffi::Opcode;

use super::CliResult;
use crate::bench::served::{
    CeilingBuffer, EngineGeometry, ServedDaemon, ServedOptions, chain_ops, memcpy_seconds,
};

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Model layers (default: a 70B-class model).
    #[arg(long, default_value_t = 80)]
    pub layers: u32,
    /// Tokens per engine page (vLLM's default block size is 16).
    #[arg(long, default_value_t = 16)]
    pub page_tokens: u32,
    /// KV heads per layer.
    #[arg(long, default_value_t = 8)]
    pub kv_heads: u32,
    /// Head dimension (bf16 elements).
    #[arg(long, default_value_t = 128)]
    pub head_dim: u32,
    /// Blocks (engine pages) per SAVE and per LOAD.
    #[arg(long, default_value_t = 16)]
    pub batch_blocks: u32,
    /// Measured rounds (median reported) after one warm-up round.
    #[arg(long, default_value_t = 9)]
    pub iters: usize,
    /// Do not mlock the daemon's host pool (for unprivileged runs).
    #[arg(long)]
    pub no_lock: bool,
    /// Directory for the daemon's socket, config and log (default: the temp directory).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn block_hash(round: usize, i: u32) -> u64 {
    kvplane_kernels::checksum::mix64(((round as u64) << 32) | u64::from(i)) | 1
}

fn page_seed(i: u32) -> u64 {
    0x5eed_0000 + u64::from(i)
}

pub fn run(args: HostArgs) -> CliResult {
    if args.batch_blocks == 0 || args.iters == 0 {
        return Err("bench host: --batch-blocks and --iters must be at least 1".into());
    }
    let g = EngineGeometry {
        layers: args.layers,
        page_tokens: args.page_tokens,
        kv_heads: args.kv_heads,
        head_bytes: args.head_dim.saturating_mul(2),
    };
    g.validate()?;
    let n = args.batch_blocks;
    let bb = g.block_bytes();
    let bytes = u64::from(n) * bb;
    let daemon = ServedDaemon::start(&ServedOptions {
        exe: std::env::current_exe()?,
        dir: args.dir.clone().unwrap_or_else(std::env::temp_dir),
        block_bytes: bb,
        // Each round's blocks are dropped after it: twice the batch never evicts.
        host_blocks: 2 * u64::from(n) + 1,
        lock: !args.no_lock,
        sessions: 1,
        backend: kvplane_daemon::config::BackendSetting::Host,
        gpu_ordinal: 0,
        hbm_blocks: 0,
    })?;
    // Pages [0, n) are the engine's computed pages; [n, 2n) receive the loads.
    let mut e = daemon.attach(g, 2 * n)?;
    if e.max_ops() < n as usize {
        return Err(format!(
            "bench host: --batch-blocks {n} exceeds the {} block ops the session's arena holds",
            e.max_ops()
        )
        .into());
    }
    for i in 0..n {
        e.fill_page(i, page_seed(i))?;
    }
    let mut src = CeilingBuffer::new(bytes as usize, 1);
    let mut dst = CeilingBuffer::new(bytes as usize, 2);
    // Touch both once more so neither round pays first-use faults.
    memcpy_seconds(&src, &mut dst, bytes as usize, bb as usize);
    memcpy_seconds(&dst, &mut src, bytes as usize, bb as usize);

    let (mut memcpy_s, mut save_s, mut load_s) = (Vec::new(), Vec::new(), Vec::new());
    let (mut save_daemon_s, mut load_daemon_s) = (Vec::new(), Vec::new());
    let mut verified = 0u64;
    for round in 0..=args.iters {
        let measured = round > 0;
        let memcpy_first = round % 2 == 0;
        let hashes: Vec<u64> = (0..n).map(|i| block_hash(round, i)).collect();
        let mut ceiling = |samples: &mut Vec<f64>| {
            let s = memcpy_seconds(&src, &mut dst, bytes as usize, bb as usize);
            if measured {
                samples.push(s);
            }
        };

        if memcpy_first {
            ceiling(&mut memcpy_s);
        }
        let save = e.op_all("SAVE", Opcode::Save, &chain_ops(&hashes, 0, 0))?;
        if !memcpy_first {
            ceiling(&mut memcpy_s);
        }

        for i in 0..n {
            e.poison_page(n + i)?;
        }
        if memcpy_first {
            ceiling(&mut memcpy_s);
        }
        let load = e.op_all("LOAD", Opcode::Load, &chain_ops(&hashes, 0, n))?;
        if !memcpy_first {
            ceiling(&mut memcpy_s);
        }
        for i in 0..n {
            e.check_page(n + i, page_seed(i))?;
            verified += 1;
        }
        let dropped = e.op(Opcode::Drop, 0, &chain_ops(&hashes, 0, 0))?;
        if dropped.cqe.blocks != n {
            return Err(format!(
                "bench host: DROP freed {} of {n} blocks",
                dropped.cqe.blocks
            )
            .into());
        }
        if measured {
            save_s.push(save.seconds);
            load_s.push(load.seconds);
            save_daemon_s.push(f64::from(save.cqe.detail) / 1e6);
            load_daemon_s.push(f64::from(load.cqe.detail) / 1e6);
        }
    }
    let gbps = |s: &[f64]| bytes as f64 / median(s) / 1e9;
    let memcpy_gbps = gbps(&memcpy_s);
    let save_gbps = gbps(&save_s);
    let load_gbps = gbps(&load_s);
    let pool = daemon.host_pool_log();
    let pool_field = |k: &str| {
        pool.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let daemon_pid = daemon.pid();
    drop(e);
    drop(daemon);
    let backend = "host backend: the engine's KV pool is a memfd in host memory; no GPU figure";
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "host",
                "backend": backend,
                "path": "engine session -> rings -> kvplane serve (validation, registry, paged gather/scatter) -> host tier, timed submit to completion",
                "engine_layout": g.describe(),
                "geometry": g,
                "block_bytes": bb,
                "batch_blocks": n,
                "bytes_per_op": bytes,
                "iters": args.iters,
                "save_gbps": save_gbps,
                "load_gbps": load_gbps,
                "memcpy_gbps": memcpy_gbps,
                "save_ratio": save_gbps / memcpy_gbps,
                "load_ratio": load_gbps / memcpy_gbps,
                "save_p50_ms": median(&save_s) * 1e3,
                "load_p50_ms": median(&load_s) * 1e3,
                "save_daemon_gbps": gbps(&save_daemon_s),
                "load_daemon_gbps": gbps(&load_daemon_s),
                "blocks_verified": verified,
                "daemon_pid": daemon_pid,
                "pool_pages": pool_field("pages"),
                "pool_locked": pool_field("locked"),
                "pool_startup_seconds_per_gib": pool_field("touch_s_per_gib").parse::<f64>().ok(),
            })
        );
    } else {
        println!("kvplane bench host ({backend})");
        println!("engine layout: {}", g.describe());
        println!(
            "{n} blocks ({} MiB) per SAVE / LOAD through a kvplane serve child, median of {} rounds; memcpy single-threaded",
            bytes >> 20,
            args.iters
        );
        println!(
            "  {:<36} {:>8.2} GB/s",
            "memcpy, same bytes (ceiling)", memcpy_gbps
        );
        println!(
            "  {:<36} {:>8.2} GB/s  ratio {:.2}  (daemon's own time: {:.2} GB/s)",
            "SAVE engine pages -> host tier",
            save_gbps,
            save_gbps / memcpy_gbps,
            gbps(&save_daemon_s)
        );
        println!(
            "  {:<36} {:>8.2} GB/s  ratio {:.2}  (daemon's own time: {:.2} GB/s)",
            "LOAD host tier -> engine pages",
            load_gbps,
            load_gbps / memcpy_gbps,
            gbps(&load_daemon_s)
        );
        println!(
            "  {verified} loaded blocks checked byte for byte; daemon host pool: {} pages, locked {}, start-up {} s/GiB",
            pool_field("pages"),
            pool_field("locked"),
            pool_field("touch_s_per_gib")
        );
    }
    Ok(())
}
