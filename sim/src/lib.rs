//! kvplane-sim: clients of a running daemon used to measure it: the engine simulator
//! (`kvplane engine-sim`), the trace replay driver (`kvplane replay`), the benchmarks
//! (`kvplane bench ...`) and the small tools (`status`, `ping`, `demo`). Never linked into
//! the daemon library; the `kvplane` binary (`kvplane/`) dispatches to [`cli`].
pub mod bench;
pub mod cli;
pub mod engine_sim;
