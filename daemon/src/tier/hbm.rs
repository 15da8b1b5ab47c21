//! G1: the device (HBM) arena, carved into block slots at start-up: a
//! [`kvplane_cuda::SlotArena`] on the daemon's device (device memory on the cuda backend;
//! host memory standing in for HBM on the host backend, and its description says so).

use serde::Deserialize;

use super::{ConfigError, invalid};

/// `[tiers.hbm]`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HbmConfig {
    /// Bytes of the G1 arena (0 disables G1).
    pub capacity_bytes: u64,
}

impl HbmConfig {
    pub fn validate(&self, key: &str, block_bytes: usize) -> Result<(), ConfigError> {
        if self.capacity_bytes != 0 && self.capacity_bytes < block_bytes as u64 {
            return Err(invalid(
                &format!("{key}.capacity_bytes"),
                format!(
                    "must be 0 (disabled) or hold at least one block of {block_bytes} bytes, got {}",
                    self.capacity_bytes
                ),
            ));
        }
        Ok(())
    }
}
