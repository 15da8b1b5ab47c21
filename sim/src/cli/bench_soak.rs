//! `kvplane bench soak`: a real `kvplane serve` (host + NVMe tiers) under many engine
//! sessions issuing a seeded save/load/lookup/drop mix for minutes; every loaded byte is
//! checked. Exits non-zero on any corrupted or lost block or unexpected error.

use std::path::PathBuf;

use super::CliResult;
use crate::bench::soak::{self, SoakOptions, SoakReport};

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Engine sessions attached to the daemon.
    #[arg(long, default_value_t = 64)]
    pub sessions: u32,
    /// Queue pairs per session cycle through 1..=N (session i has 1 + i % N).
    #[arg(long, default_value_t = 3)]
    pub max_queue_pairs: u32,
    /// Seconds of the mixed workload (the whole command takes about 10 s more).
    #[arg(long, default_value_t = 150.0)]
    pub seconds: f64,
    /// Seconds of the NOP ceiling measured first on the same sessions.
    #[arg(long, default_value_t = 3.0)]
    pub ceiling_seconds: f64,
    /// Seed of the op mix, block hashes and patterns (each queue pair's op sequence
    /// replays; the interleaving across threads and the daemon does not).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Namespaces (tenants) in the daemon config; each session binds two.
    #[arg(long, default_value_t = 4)]
    pub namespaces: u32,
    /// Driver threads in this process; each owns sessions/threads sessions.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// Block size in KiB (4 layers x K,V x 16 tokens x 4 heads).
    #[arg(long, default_value_t = 64)]
    pub block_kib: usize,
    /// Block chains (prompts) per namespace.
    #[arg(long, default_value_t = 256)]
    pub sequences: u32,
    /// Blocks per chain.
    #[arg(long, default_value_t = 8)]
    pub chain_blocks: u32,
    /// Share of the working set the host tier holds; the NVMe tier holds all of it.
    #[arg(long, default_value_t = 0.25)]
    pub host_share: f64,
    /// Directory for the daemon's socket, config, log and NVMe file (a fresh
    /// subdirectory, removed afterwards). Default: the system temp directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// An op without a completion for this many milliseconds fails the run.
    #[arg(long, default_value_t = 60_000)]
    pub op_timeout_ms: u64,
    /// Size the host and NVMe tiers together at half the working set, so the daemon must
    /// evict; misses of settled blocks beyond its evictions count as lost.
    #[arg(long)]
    pub capacity_pressure: bool,
    /// Most SAVEs and LOADs excused as NO_SPACE or BUSY, as a fraction of all SAVEs and
    /// LOADs; more fails the run.
    #[arg(long, default_value_t = 0.02)]
    pub max_excused_fraction: f64,
}

pub fn run(args: SoakArgs) -> CliResult {
    let opts = SoakOptions {
        exe: std::env::current_exe()?,
        sessions: args.sessions,
        max_queue_pairs: args.max_queue_pairs,
        seconds: args.seconds,
        ceiling_seconds: args.ceiling_seconds,
        seed: args.seed,
        namespaces: args.namespaces,
        threads: args.threads,
        block_bytes: args.block_kib.saturating_mul(1024),
        sequences: args.sequences,
        chain_blocks: args.chain_blocks,
        host_share: args.host_share,
        dir: args.dir.unwrap_or_else(std::env::temp_dir),
        op_timeout: std::time::Duration::from_millis(args.op_timeout_ms.max(1)),
        progress: !args.json,
        capacity_pressure: args.capacity_pressure,
        max_excused_fraction: args.max_excused_fraction,
    };
    let r = soak::run(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", render(&r));
    }
    if r.passed {
        Ok(())
    } else {
        Err(format!("soak failed: {}", r.failures.join("; ")).into())
    }
}

/// The human table.
pub fn render(r: &SoakReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kvplane bench soak (backend: {}, seed {}): {} sessions, {} queue pairs, {} driver threads, {} namespaces",
        r.backend, r.seed, r.sessions, r.queue_pairs, r.driver_threads, r.namespaces
    );
    let _ = writeln!(
        s,
        "blocks of {} KiB; working set {} blocks; host tier {} blocks, NVMe tier {} blocks",
        r.block_bytes / 1024,
        r.working_set_blocks,
        r.host_capacity_blocks,
        r.nvme_capacity_blocks
    );
    let _ = writeln!(s, "mix: {}", r.mix);
    let _ = writeln!(
        s,
        "\n{:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "op", "ops", "ops/s", "p50 us", "p99 us", "p99.9 us", "max us"
    );
    for (name, k) in &r.by_op {
        let _ = writeln!(
            s,
            "{:<8} {:>10} {:>10.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            name, k.ops, k.ops_per_s, k.p50_us, k.p99_us, k.p999_us, k.max_us
        );
    }
    let _ = writeln!(
        s,
        "all      {:>10} {:>10.0}   over {:.1} s; {:.1} MB/s saved + loaded",
        r.ops,
        r.ops_per_s,
        r.seconds,
        r.data_bytes_per_s / 1e6
    );
    let _ = writeln!(
        s,
        "ceiling: {:.0} NOP round trips/s on the same sessions (p50 {:.1} us, p99 {:.1} us); soak / ceiling = {:.3}",
        r.ceiling.ops_per_s, r.ceiling.p50_us, r.ceiling.p99_us, r.ratio_to_ceiling
    );
    let _ = writeln!(
        s,
        "block work: {:.0} ops/s, {:.1} MB/s, the same mix on the daemon library in this process ({} threads, no sessions); soak / block work = {:.3}",
        r.block_work.ops_per_s,
        r.block_work.data_bytes_per_s / 1e6,
        r.block_work.threads,
        r.ratio_to_block_work
    );
    let n = &r.nop_under_load;
    let _ = writeln!(
        s,
        "NOP under load (a probe session, one at a time): {} round trips, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
        n.ops, n.p50_us, n.p99_us, n.p999_us, n.max_us
    );
    let _ = writeln!(
        s,
        "\nblocks verified {}  corrupted {}  lost {}  (present-checked {}, misses explained by a concurrent DROP {}, LOAD NO_SPACE while another load staged the block {}, busy {}, unexpected errors {})",
        r.blocks_verified,
        r.blocks_corrupted,
        r.blocks_lost,
        r.blocks_checked_present,
        r.misses_excused_by_drop,
        r.load_no_space_transient,
        r.busy,
        r.unexpected_errors
    );
    let _ = writeln!(
        s,
        "excused (LOAD NO_SPACE {} + SAVE NO_SPACE {} + BUSY {}) / (SAVEs + LOADs) = {:.3} % (stated maximum {:.2} %)",
        r.load_no_space_transient,
        r.save_no_space,
        r.busy,
        r.excused_fraction * 100.0,
        r.max_excused_fraction * 100.0
    );
    if r.capacity_pressure {
        let _ = writeln!(
            s,
            "capacity pressure: {} settled blocks reported missing; the daemon evicted {} without a lower copy",
            r.settled_misses,
            r.daemon_removed_without_copy
                .map_or_else(|| "an unknown number".into(), |n| n.to_string())
        );
    }
    let _ = writeln!(s, "lost = {}", r.lost_definition);
    let mib = |k: u64| k as f64 / 1024.0;
    for (name, rss) in [("RSS", &r.daemon_rss), ("RssAnon", &r.daemon_rss_anon)] {
        let _ = writeln!(
            s,
            "\ndaemon {name} (MiB): first {:.1}  at 25% {:.1}  last {:.1}  max {:.1}  growth after 25%: {:+.1} MiB ({:+.1}%)",
            mib(rss.first_kib),
            mib(rss.at_25pct_kib),
            mib(rss.last_kib),
            mib(rss.max_kib),
            rss.growth_after_25pct_kib as f64 / 1024.0,
            rss.growth_after_25pct_pct
        );
        let series: Vec<String> = rss
            .samples_kib
            .iter()
            .map(|k| format!("{:.0}", mib(*k)))
            .collect();
        let _ = writeln!(s, "{name} every second (MiB): {}", series.join(" "));
    }
    let _ = writeln!(
        s,
        "daemon fds: {} -> {} (max {}); removed without a lower copy: {}; clean exit on SIGTERM: {}",
        r.daemon_fds_first,
        r.daemon_fds_last,
        r.daemon_fds_max,
        r.daemon_removed_without_copy
            .map_or_else(|| "unknown (no /status)".into(), |n| n.to_string()),
        r.daemon_exit_clean
    );
    if let Some(st) = &r.daemon_status {
        for t in &st.tiers {
            let removed: Vec<String> = t.removed.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                s,
                "  tier {:<5} {:>6}/{:<6} blocks used; removed: {}",
                t.tier,
                t.used_blocks,
                t.capacity_blocks,
                if removed.is_empty() {
                    "none".into()
                } else {
                    removed.join(", ")
                }
            );
        }
    }
    for e in &r.examples {
        let _ = writeln!(s, "  ! {e}");
    }
    let _ = writeln!(
        s,
        "{}",
        if r.passed {
            "PASSED".to_string()
        } else {
            format!("FAILED: {}", r.failures.join("; "))
        }
    );
    s
}
