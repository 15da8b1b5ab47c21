//! `kvplane bench ring`: NOP round trip and batched throughput across processes, with
//! the bare shared-memory floor (interleaved with the ring, batch by batch) and a
//! Unix-socket baseline measured in the same run.

use std::path::PathBuf;

use super::CliResult;
use crate::bench::ring::{self, ChildCommand, ChildRole, RingBenchOptions};

#[derive(Debug, clap::Args)]
pub struct RingArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// NOP and floor round trips measured (each, over all rounds).
    #[arg(long, default_value_t = 200_000)]
    pub round_trips: u64,
    /// Pairs of floor and ring batches the round trips are split into, alternating which
    /// runs first.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// Unix-socket round trips measured.
    #[arg(long, default_value_t = 20_000)]
    pub socket_round_trips: u64,
    /// NOPs in flight in the throughput run.
    #[arg(long, default_value_t = 256)]
    pub batch: u32,
    /// Length of the throughput run, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub batched_ms: u64,
    /// Pin the daemon and the engine to different CPUs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub pin: bool,
    /// Internal: run as the child process of a measurement.
    #[arg(long, hide = true, value_enum)]
    pub child: Option<ChildRole>,
    /// Internal: the child's shared file or socket.
    #[arg(long, hide = true)]
    pub target: Option<PathBuf>,
}

pub fn run(args: RingArgs) -> CliResult {
    let exe = std::env::current_exe()?;
    run_with(
        args,
        ChildCommand {
            exe,
            prefix: vec!["bench".into(), "ring".into()],
        },
    )
}

/// Run the ring benchmark with child processes started as `child` says.
pub fn run_with(args: RingArgs, child: ChildCommand) -> CliResult {
    let opts = RingBenchOptions {
        round_trips: args.round_trips.max(100),
        socket_round_trips: args.socket_round_trips.max(100),
        batch: args.batch.clamp(1, 65536),
        batched_ms: args.batched_ms.max(10),
        pin: args.pin,
        rounds: args.rounds.clamp(1, 10_000),
    };
    if let Some(role) = args.child {
        let target = args.target.ok_or("--child needs --target")?;
        ring::run_child(role, &target, &opts)?;
        return Ok(());
    }
    let r = ring::run(&child, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "kvplane bench ring (backend: {}, {} round trips each in {} interleaved floor/entry-floor/ring batch rounds, pinned: {})",
        r.backend, r.round_trips, r.rounds, r.pinned
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "round trip between two processes", "p50 ns", "p99 ns", "p99.9 ns"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "bare shm ping-pong (floor)", r.floor_p50_ns, r.floor_p99_ns, r.floor_p999_ns
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "entry-sized lines 64 B / 32 B",
        r.entry_floor_p50_ns,
        r.entry_floor_p99_ns,
        r.entry_floor_p999_ns
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "kvplane NOP (ring + daemon)", r.p50_ns, r.p99_ns, r.p999_ns
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "Unix socket request/response", r.socket_p50_ns, r.socket_p99_ns, r.socket_p999_ns
    );
    println!(
        "NOP p50 / floor p50, all pairs' samples: {:.2}x (goal <= 1.5)   socket p50 / NOP p50: {:.1}x (goal >= 10)",
        r.p50_over_floor, r.socket_over_p50
    );
    println!(
        "NOP p50 / entry-sized floor p50: {:.2}x   entry-sized floor p50 / floor p50: {:.2}x",
        r.p50_over_entry_floor, r.entry_floor_over_floor
    );
    println!(
        "per pair (ring p50 / floor p50 of the same pair): median {:.2}x, min {:.2}x, max {:.2}x",
        r.pair_ratio_median, r.pair_ratio_min, r.pair_ratio_max
    );
    println!(
        "per pair (ring p50 / entry-sized floor p50): median {:.2}x, min {:.2}x, max {:.2}x",
        r.pair_entry_ratio_median, r.pair_entry_ratio_min, r.pair_entry_ratio_max
    );
    let list: Vec<String> = r
        .pairs
        .iter()
        .map(|p| format!("{}/{}/{}", p.p50_ns, p.entry_floor_p50_ns, p.floor_p50_ns))
        .collect();
    println!("  pairs, ring/entry-floor/floor p50 ns: {}", list.join(" "));
    println!(
        "batched NOPs, {} in flight: {:.2} M ops/s (goal >= 10)",
        r.batch,
        r.batched_ops_per_s / 1e6
    );
    Ok(())
}
