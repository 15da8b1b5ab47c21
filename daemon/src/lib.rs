//! kvplane daemon library: only what runs inside `kvplane serve` (config, tiers, block
//! registry, data plane, sessions, control plane). The `kvplane` binary (`kvplane/`) is a
//! thin main over this, the router and `kvplane-sim` (the tools that measure a daemon).
//!
//! Modules depend one way: `tier` < `block` < `config`; `block` < `metrics` (the data
//! plane's sink) < `dataplane` < `session` < `control` (reads metrics, sessions and the
//! data plane; writes nothing they own) < `serve` (start-up, privilege drop, shutdown).
pub mod block;
pub mod config;
pub mod control;
pub mod dataplane;
/// The device `[device]` chose, opened at start-up (below dataplane/ and control/).
pub mod device;
/// Properties checked by the fuzz targets in `fuzz/` and by `tests/fuzz_regressions.rs`.
pub mod fuzz_props;
/// The data plane's metrics sink (below dataplane/ and control/).
pub mod metrics;
pub mod privileges;
pub mod secure_open;
pub mod serve;
pub mod session;
pub mod tier;
