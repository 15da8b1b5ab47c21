//! Block registry, leases and eviction (issue 3).

pub mod registry;

pub use crate::tier::Tier;
pub use registry::{BlockEvent, BlockKey, Registry, RemoveReason, SessionId};
