//! Cross-process ping-pong: NOP round trip engine <-> daemon with p50/p99/p99.9, next to
//! a bare shared-memory ping-pong (the floor) and a Unix socket, all in one run. The same
//! measurement as `kvplane bench ring`; this binary re-executes itself for the children.
//!
//!   cargo run --release -p kvplane-benches --bin ping-pong -- [--json]

use clap::Parser;
use kvplane_sim::bench::ring::ChildCommand;
use kvplane_sim::cli::bench_ring::{RingArgs, run_with};

#[derive(Debug, Parser)]
#[command(
    name = "ping-pong",
    about = "kvplane ring round trip vs shared-memory floor vs Unix socket"
)]
struct Cli {
    #[command(flatten)]
    args: RingArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ping-pong: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run_with(
        cli.args,
        ChildCommand {
            exe,
            prefix: Vec::new(),
        },
    ) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ping-pong: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
