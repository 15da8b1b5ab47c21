//! `kvplane`: the node daemon, the cluster router, benchmarks and tools. A thin main over
//! `kvplane_daemon` (`serve`), `kvplane_router` (`router`) and `kvplane_sim` (everything
//! that measures a daemon), so tests and benches drive the same code.

use clap::{Parser, Subcommand};
use kvplane_daemon::serve;
use kvplane_sim::cli::{bench, demo, engine_sim, gpu_engine, ping, replay, status};
use std::process::ExitCode;

mod router;

/// Errors at the command-line boundary: any library error, printed with its context.
pub type CliResult = kvplane_sim::cli::CliResult;

#[derive(Debug, Parser)]
#[command(
    name = "kvplane",
    version,
    about = "KV-cache data plane for LLM inference"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `kvplane_daemon=debug`.
    #[arg(long, global = true, default_value = "info", env = "KVPLANE_LOG")]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon: owns the KV tiers and serves engine sessions.
    Serve(serve::ServeArgs),
    /// Run the cluster router.
    Router(router::RouterArgs),
    /// Benchmarks, each against a ceiling measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Replay a request trace.
    Replay(replay::ReplayArgs),
    /// Show a running daemon's state.
    Status(status::StatusArgs),
    /// Attach to a running daemon as an engine, send NOPs, read STATS.
    Ping(ping::PingArgs),
    /// The main job on built-in defaults, no GPU needed.
    Demo(demo::DemoArgs),
    /// A simulated inference engine attached to a daemon over the rings.
    EngineSim(engine_sim::EngineSimArgs),
    /// An engine with its KV pool in GPU memory (or a host memfd) that saves a chain of
    /// blocks or loads and checks it (scripts/gpu-e2e.sh runs two across processes).
    GpuEngine(gpu_engine::GpuEngineArgs),
}

fn init_logging(filter: &str, json: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // async-nats traces its CONNECT line with the token or password in it: whatever the
    // filter says, that module logs at debug at most.
    if let Ok(cap) = "async_nats::connection=debug".parse() {
        filter = filter.add_directive(cap);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json);
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Router(args) => router::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Replay(args) => replay::run(args),
        Command::Status(args) => status::run(args),
        Command::Ping(args) => ping::run(args),
        Command::Demo(args) => demo::run(args),
        Command::EngineSim(args) => engine_sim::run(args),
        Command::GpuEngine(args) => gpu_engine::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kvplane: error: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
