//! `kvplane`: the node daemon, the cluster router, benchmarks and tools. A thin shell
//! over `kvplane_daemon`, so tests and benches drive the same code.
fn main() -> std::process::ExitCode {
    kvplane_daemon::cli::main()
}
