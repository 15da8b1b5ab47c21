//! Command-line entry points of the tools. Each subcommand's arguments and `run` live in
//! its own file; the `kvplane` binary parses them and calls `run`.

pub mod bench;
pub mod bench_gather;
pub mod bench_host;
pub mod bench_lookup;
pub mod bench_nvme;
pub mod bench_offload;
pub mod bench_ring;
pub mod bench_soak;
pub mod bench_transfer;
pub mod demo;
pub mod engine_sim;
pub mod gpu_engine;
pub mod ping;
pub mod replay;
pub mod replay_dynamo;
pub mod replay_engines;
pub mod replay_nats;
pub mod status;

/// Errors at the command-line boundary: any library error, printed with its context.
pub type CliResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
