//! `kvplane bench host`: host-tier (G2) save and load throughput through `BlockManager`,
//! against single-thread memcpy of the same bytes between the same kind of buffers,
//! measured in the same run. Also reports the pinned pool's start-up (first touch) time.
//!
//! Save: a chain of `--batch-blocks` new blocks per iteration, each filled by copying from
//! a source buffer standing in for the engine's pages (so eviction churn is included once
//! the pool is full). Load: the last saved chain, each block copied out to a destination
//! buffer. memcpy: the same number of block-sized copies from source to destination.

use std::time::Instant;

use super::CliResult;
use crate::block::{BlockConfig, BlockManager, ManagerOptions};
use crate::tier::TiersConfig;
use crate::tier::host::HostConfig;

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Bytes per block.
    #[arg(long, default_value_t = 2 << 20)]
    pub block_bytes: usize,
    /// Host pool size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub pool_mib: u64,
    /// Blocks per save/load call.
    #[arg(long, default_value_t = 64)]
    pub batch_blocks: usize,
    /// Measured iterations (median reported) after one warm-up.
    #[arg(long, default_value_t = 9)]
    pub iters: usize,
    /// Do not mlock the pool (for unprivileged runs).
    #[arg(long)]
    pub no_lock: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(args: HostArgs) -> CliResult {
    if args.batch_blocks == 0 || args.iters == 0 {
        return Err("bench host: --batch-blocks and --iters must be at least 1".into());
    }
    let block = BlockConfig {
        block_bytes: args.block_bytes,
        nvme_admit_min_hits: 1,
        write_through: false,
    };
    let tiers = TiersConfig {
        host: HostConfig {
            capacity_bytes: args.pool_mib << 20,
            lock: !args.no_lock,
            ..HostConfig::default()
        },
        ..TiersConfig::default()
    };
    let m = BlockManager::new(&block, &tiers, ManagerOptions::default())?;
    let pool_slots = m.host_pool().slot_count() as usize;
    if pool_slots < args.batch_blocks {
        return Err(format!(
            "bench host: the {} MiB pool holds {pool_slots} blocks, fewer than --batch-blocks {}",
            args.pool_mib, args.batch_blocks
        )
        .into());
    }
    let bb = args.block_bytes;
    let n = args.batch_blocks;
    let bytes = (n * bb) as f64;
    let src: Vec<u8> = (0..n * bb)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut dst = vec![1u8; n * bb];

    let mut memcpy_t = Vec::new();
    let mut save_t = Vec::new();
    let mut load_t = Vec::new();
    let mut next_hash = 1u64;
    for iter in 0..=args.iters {
        // memcpy ceiling: the same block-sized copies.
        let t = Instant::now();
        for i in 0..n {
            dst[i * bb..(i + 1) * bb].copy_from_slice(&src[i * bb..(i + 1) * bb]);
        }
        std::hint::black_box(&dst);
        let memcpy = t.elapsed().as_secs_f64();

        let blocks: Vec<(u64, Option<u64>)> = (0..n as u64)
            .map(|i| (next_hash + i, (i > 0).then(|| next_hash + i - 1)))
            .collect();
        next_hash += n as u64;
        let t = Instant::now();
        let r = m.save(1, 1, &blocks, 0, false, |i, buf: &mut [u8]| {
            buf.copy_from_slice(&src[i * bb..(i + 1) * bb]);
            Ok::<(), std::io::Error>(())
        })?;
        let save = t.elapsed().as_secs_f64();
        if r.stored != n {
            return Err(format!("bench host: saved {} of {n} blocks", r.stored).into());
        }

        let hashes: Vec<u64> = blocks.iter().map(|b| b.0).collect();
        let t = Instant::now();
        let r = m.load(1, 1, &hashes, |i, bytes: &[u8]| {
            dst[i * bb..(i + 1) * bb].copy_from_slice(bytes);
            Ok::<(), std::io::Error>(())
        })?;
        let load = t.elapsed().as_secs_f64();
        if r.loaded != n || dst != src {
            return Err(format!(
                "bench host: loaded {} of {n} blocks, or bytes differ",
                r.loaded
            )
            .into());
        }
        if iter > 0 {
            memcpy_t.push(memcpy);
            save_t.push(save);
            load_t.push(load);
        }
    }
    let memcpy_gbps = bytes / median(memcpy_t) / 1e9;
    let save_gbps = bytes / median(save_t) / 1e9;
    let load_gbps = bytes / median(load_t) / 1e9;
    let pool = m.stats().host_pool;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "save_gbps": save_gbps,
                "load_gbps": load_gbps,
                "memcpy_gbps": memcpy_gbps,
                "save_ratio": save_gbps / memcpy_gbps,
                "load_ratio": load_gbps / memcpy_gbps,
                "block_bytes": bb,
                "batch_blocks": n,
                "iters": args.iters,
                "pool_bytes": pool.bytes,
                "pool_pages": pool.pages,
                "pool_locked": pool.locked,
                "pool_numa": pool.numa,
                "pool_touch_threads": pool.touch_threads,
                "pool_touch_seconds": pool.touch_seconds,
                "pool_startup_seconds_per_gib": pool.touch_seconds_per_gib,
            })
        );
    } else {
        println!(
            "host tier, {} blocks of {} bytes per call, median of {} (single thread)",
            n, bb, args.iters
        );
        println!("  {:<28} {:>8.2} GB/s", "memcpy (ceiling)", memcpy_gbps);
        println!(
            "  {:<28} {:>8.2} GB/s  ratio {:.2}",
            "save (engine -> host)",
            save_gbps,
            save_gbps / memcpy_gbps
        );
        println!(
            "  {:<28} {:>8.2} GB/s  ratio {:.2}",
            "load (host -> engine)",
            load_gbps,
            load_gbps / memcpy_gbps
        );
        println!(
            "  pool: {} bytes, {}, locked {}, {}; first touch {:.3} s with {} threads = {:.3} s/GiB",
            pool.bytes,
            pool.pages,
            pool.locked,
            pool.numa,
            pool.touch_seconds,
            pool.touch_threads,
            pool.touch_seconds_per_gib
        );
    }
    Ok(())
}
