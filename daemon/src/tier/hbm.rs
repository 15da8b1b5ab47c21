//! G1: the device (HBM) arena, carved into block slots at start-up.
//!
//! The registry only needs slot numbers; how the bytes are reached is behind
//! [`DeviceArena`], so the cuda backend can back it with a device allocation later. On this
//! machine (no GPU) the only implementation is [`HostStandInArena`]: ordinary host memory
//! *standing in for HBM*, and `stats()` says so.

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

/// A G1 arena: `slot_count` slots of `slot_bytes`.
pub trait DeviceArena: Send + Sync {
    fn slot_count(&self) -> u32;
    fn slot_bytes(&self) -> usize;
    /// What backs the arena, for stats (e.g. "host memory standing in for HBM").
    fn kind(&self) -> &'static str;
    /// True only for real device memory.
    fn is_device_memory(&self) -> bool;
    /// Host address of a slot when the arena is host-addressable (host backend); `None`
    /// for device memory, which is reached through the device's copy engines instead.
    fn host_ptr(&self, slot: u32) -> Option<*mut u8>;
}

/// G1 on the host backend: an anonymous mapping standing in for HBM.
pub struct HostStandInArena {
    map: memmap2::MmapMut,
    slot_bytes: usize,
    slot_count: u32,
}

impl HostStandInArena {
    pub fn new(capacity_bytes: u64, slot_bytes: usize) -> std::io::Result<Self> {
        let slot_count = (capacity_bytes / slot_bytes as u64) as u32;
        let len = (slot_count as usize * slot_bytes).max(1);
        let map = memmap2::MmapMut::map_anon(len)?;
        Ok(HostStandInArena {
            map,
            slot_bytes,
            slot_count,
        })
    }
}

impl DeviceArena for HostStandInArena {
    fn slot_count(&self) -> u32 {
        self.slot_count
    }
    fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
    fn kind(&self) -> &'static str {
        "host memory standing in for HBM (no GPU backend)"
    }
    fn is_device_memory(&self) -> bool {
        false
    }
    fn host_ptr(&self, slot: u32) -> Option<*mut u8> {
        if slot >= self.slot_count {
            return None;
        }
        // The map is never moved or shrunk, so a pointer into it stays valid for self's life;
        // exclusive use of a slot's bytes is the registry's job (one owner per slot).
        Some(
            self.map
                .as_ptr()
                .wrapping_add(slot as usize * self.slot_bytes) as *mut u8,
        )
    }
}
