//! kvplane cluster router: Dynamo-compatible chained block hashes, the KV event stream
//! daemons publish, a compressed radix index of every worker's blocks, KV-aware routing,
//! the router service and a router-only trace replay.

pub mod dynamo;
pub mod events;
/// Properties checked by the fuzz targets in `fuzz/` and by `tests/fuzz_regressions.rs`.
pub mod fuzz_props;
pub mod hash;
pub mod http;
pub mod index;
pub mod nats;
pub mod replay;
pub mod route;
pub mod service;
pub mod tls;
pub mod vllm;

/// A routable worker (one engine or GPU behind a daemon), unique across the cluster.
pub type WorkerId = u64;

/// Where a worker holds a block: the one tier type of the ABI, the daemon and the router.
/// Lower is faster: HBM gets more overlap credit than host, host more than NVMe.
pub use kvplane_ffi::Tier;
