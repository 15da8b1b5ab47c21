//! `kvplane bench <what>`: each prints a table for people, or one JSON object with `--json`.

use clap::Subcommand;

use super::{
    CliResult, bench_gather, bench_host, bench_lookup, bench_nvme, bench_offload, bench_ring,
    bench_soak, bench_transfer,
};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Engine<->daemon ring: NOP round trip across processes and batched throughput,
    /// against a bare shared-memory ping-pong and a Unix-socket round trip.
    Ring(bench_ring::RingArgs),
    /// NVMe tier write/read throughput against fio on the same file system.
    Nvme(bench_nvme::NvmeArgs),
    /// Host tier save/load throughput against memcpy.
    Host(bench_host::HostArgs),
    /// The offload path through a real serve and session: engine pages (HBM with
    /// --memory ipc|vmm) -> pinned host tier and back (and G1), per batch size, against a
    /// bulk copy and per-page copies of the same bytes measured in the same run.
    Offload(bench_offload::OffloadArgs),
    /// Registry prefix lookups per second.
    Lookup(bench_lookup::LookupArgs),
    /// Paged gather/scatter kernels against memcpy.
    Gather(bench_gather::GatherArgs),
    /// Transfer sweep over tiers, block size, batch, queue depth and threads, against
    /// memcpy and raw O_DIRECT io_uring measured in the same run (nixlbench's role).
    Transfer(bench_transfer::TransferArgs),
    /// Soak: a real daemon (host + NVMe tiers) under many sessions and queue pairs with a
    /// seeded save/load/lookup/drop mix for minutes; every loaded byte checked, RSS sampled.
    Soak(bench_soak::SoakArgs),
}

pub fn run(cmd: BenchCommand) -> CliResult {
    match cmd {
        BenchCommand::Ring(args) => bench_ring::run(args),
        BenchCommand::Nvme(args) => bench_nvme::run(args),
        BenchCommand::Host(args) => bench_host::run(args),
        BenchCommand::Offload(args) => bench_offload::run(args),
        BenchCommand::Lookup(args) => bench_lookup::run(args),
        BenchCommand::Gather(args) => bench_gather::run(args),
        BenchCommand::Transfer(args) => bench_transfer::run(args),
        BenchCommand::Soak(args) => bench_soak::run(args),
    }
}
