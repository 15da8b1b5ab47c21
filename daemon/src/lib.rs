//! kvplane daemon library. `main.rs` is a thin CLI over this.
pub mod bench;
pub mod block;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
/// Properties checked by the fuzz targets in `fuzz/` and by `tests/fuzz_regressions.rs`.
pub mod fuzz_props;
pub mod privileges;
pub mod secure_open;
pub mod session;
pub mod sim;
pub mod tier;
