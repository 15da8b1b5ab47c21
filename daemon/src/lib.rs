//! kvplane daemon library: only what runs inside `kvplane serve` (config, tiers, block
//! registry, data plane, sessions, control plane). The `kvplane` binary (`kvplane/`) is a
//! thin main over this, the router and `kvplane-sim` (the tools that measure a daemon).
pub mod block;
pub mod config;
pub mod control;
pub mod dataplane;
/// Properties checked by the fuzz targets in `fuzz/` and by `tests/fuzz_regressions.rs`.
pub mod fuzz_props;
/// The data plane's metrics sink (below dataplane/ and control/).
pub mod metrics;
pub mod privileges;
pub mod secure_open;
pub mod serve;
pub mod session;
pub mod tier;
