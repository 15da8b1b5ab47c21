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
pub mod vllm;

use serde::{Deserialize, Serialize};

/// A routable worker (one engine or GPU behind a daemon), unique across the cluster.
pub type WorkerId = u64;

/// Where a worker holds a block. Lower is faster: HBM gets more overlap credit than host,
/// host more than NVMe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Hbm = 0,
    Host = 1,
    Nvme = 2,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Hbm, Tier::Host, Tier::Nvme];

    /// Bit of this tier in a holder's tier mask.
    pub const fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Tier::Hbm => "hbm",
            Tier::Host => "host",
            Tier::Nvme => "nvme",
        }
    }
}
