//! `kvplane bench lookup`: registry prefix lookups per second on one core, through the same
//! mutex-guarded registry the block manager uses, against a bare hash-map probe of the same
//! keys (the ceiling: what one hash lookup per key costs on this machine).
//!
//! The registry holds `--keys` blocks in chains of `--chain` (parent links, as the chained
//! block hashes of real prompts give); each lookup asks for a whole chain, all hits, in a
//! random chain order (so the working set is the whole table, not the cache).

use std::collections::HashMap;
use std::time::Instant;

use super::CliResult;
use kvplane_daemon::block::registry::{BuildKeyHasher, Registry};
use kvplane_daemon::block::{BlockKey, Tier};
use kvplane_daemon::tier::PerTier;

#[derive(Debug, clap::Args)]
pub struct LookupArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Blocks in the registry.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Blocks per chain (one lookup = one chain).
    #[arg(long, default_value_t = 64)]
    pub chain: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// CPU to pin the measuring thread to.
    #[arg(long, default_value_t = 0)]
    pub cpu: usize,
}

fn mix(x: u64) -> u64 {
    kvplane_kernels::checksum::mix64(x)
}

fn pin_to(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

pub fn run(args: LookupArgs) -> CliResult {
    if args.chain == 0 || args.keys < args.chain || args.keys > u32::MAX as u64 / 2 {
        return Err(format!(
            "bench lookup: need 1 <= --chain <= --keys <= 2^31, got chain {} keys {}",
            args.chain, args.keys
        )
        .into());
    }
    let pinned = pin_to(args.cpu);
    let chains = args.keys / args.chain;
    let ns = 1u32;
    // Hash of block j of chain c: a pseudo-random 64-bit value, like an xxh3 chain hash.
    let hashes: Vec<u64> = (0..chains * args.chain)
        .map(|i| mix(i ^ 0xA5A5_0000_0000))
        .collect();

    let build = Instant::now();
    // Blocks live in the NVMe tier here only because it is the tier with room for 1M slots
    // without memory behind them; lookup cost does not depend on the tier.
    let mut reg = Registry::new(PerTier([0, 0, hashes.len() as u32]));
    for c in 0..chains as usize {
        let chain = &hashes[c * args.chain as usize..(c + 1) * args.chain as usize];
        for (j, &h) in chain.iter().enumerate() {
            let slot = reg.alloc_free(Tier::Nvme).ok_or("registry full")?;
            let parent = (j > 0).then(|| chain[j - 1]);
            reg.reserve(BlockKey::new(ns, h), parent, 0, Tier::Nvme, slot)?;
            reg.publish(BlockKey::new(ns, h), Tier::Nvme, 1)?;
        }
    }
    let build_s = build.elapsed().as_secs_f64();
    let reg = std::sync::Mutex::new(reg);

    // Random chain order, fixed in advance.
    let order: Vec<usize> = (0..1 << 16)
        .map(|i| (mix(i as u64) % chains) as usize)
        .collect();
    let mut out = vec![None; args.chain as usize];
    let chain_len = args.chain as usize;

    let measure = |f: &mut dyn FnMut(&[u64]) -> usize| -> (f64, u64) {
        let start = Instant::now();
        let mut keys = 0u64;
        let mut i = 0usize;
        loop {
            for _ in 0..256 {
                let c = order[i & (order.len() - 1)];
                i += 1;
                keys += f(&hashes[c * chain_len..(c + 1) * chain_len]) as u64;
            }
            let el = start.elapsed().as_secs_f64();
            if el >= args.seconds {
                return (keys as f64 / el, keys);
            }
        }
    };

    // Warm-up, then the registry (with its mutex, as the manager calls it).
    measure(&mut |chain| {
        reg.lock()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(ns, chain, &mut out[..chain.len()])
    });
    let (keys_per_s, total) = measure(&mut |chain| {
        let n = reg.lock().unwrap_or_else(|e| e.into_inner()).lookup(
            ns,
            chain,
            &mut out[..chain.len()],
        );
        assert_eq!(n, chain.len(), "every chain is stored");
        n
    });

    // Ceiling: one probe per key in a plain map of the same keys and hasher.
    let mut map: HashMap<BlockKey, u32, BuildKeyHasher> =
        HashMap::with_capacity_and_hasher(hashes.len(), BuildKeyHasher::default());
    for (i, &h) in hashes.iter().enumerate() {
        map.insert(BlockKey::new(ns, h), i as u32);
    }
    let (map_keys_per_s, _) = measure(&mut |chain| {
        let mut n = 0;
        for &h in chain {
            // Read the value, as the registry reads its presence bits.
            let Some(v) = map.get(&BlockKey::new(ns, h)) else {
                break;
            };
            std::hint::black_box(v);
            n += 1;
        }
        std::hint::black_box(n)
    });

    let ratio = keys_per_s / map_keys_per_s;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "keys_per_s": keys_per_s,
                "hashmap_keys_per_s": map_keys_per_s,
                "ratio_to_hashmap": ratio,
                "goal_keys_per_s": 5_000_000,
                "registry_keys": hashes.len(),
                "chain_blocks": args.chain,
                "keys_looked_up": total,
                "pinned_cpu": if pinned { Some(args.cpu) } else { None },
                "build_seconds": build_s,
            })
        );
    } else {
        println!(
            "registry prefix lookup, {} keys in chains of {}, one core{}",
            hashes.len(),
            args.chain,
            if pinned {
                format!(" (cpu {})", args.cpu)
            } else {
                String::new()
            }
        );
        println!(
            "  {:<34} {:>14.0} keys/s",
            "registry.lookup (mutex + chain)", keys_per_s
        );
        println!(
            "  {:<34} {:>14.0} keys/s",
            "bare HashMap probe (ceiling)", map_keys_per_s
        );
        println!("  {:<34} {:>14.2}", "ratio", ratio);
        println!(
            "  goal 5,000,000 keys/s: {}",
            if keys_per_s >= 5e6 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
