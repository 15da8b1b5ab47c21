//! Block registry, leases and eviction (issue 3).

pub mod manager;
pub mod plan;
pub mod registry;

pub use crate::tier::Tier;
pub use manager::{
    BlockConfig, BlockError, BlockManager, BlockStats, BlockUsage, DropReport, LoadFailure,
    LoadReport, ManagerOptions, NamespaceQuota, NamespaceStats, SaveReport,
};
pub use registry::{BlockEvent, BlockKey, Registry, RemoveReason, SessionId};
