//! A block arena: one device allocation carved at start-up into `slots` fixed-size block
//! slots (the HBM tier's G1 storage), so the data path never allocates.

use crate::device::{Device, DeviceBuffer, DeviceError, DeviceRange};
use std::sync::Mutex;

#[derive(Debug)]
pub struct BlockArena {
    buffer: DeviceBuffer,
    slot_bytes: usize,
    slots: u32,
    free: Mutex<Vec<u32>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error("arena: {slots} slots of {slot_bytes} bytes overflow usize")]
    Size { slots: u32, slot_bytes: usize },
    #[error("arena: slot {slot} is out of range (arena has {slots})")]
    BadSlot { slot: u32, slots: u32 },
    #[error("arena: slot {slot} freed twice")]
    DoubleFree { slot: u32 },
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl BlockArena {
    /// Allocates `slots * slot_bytes` on `device`; slot size rounded up to 256 bytes so
    /// every slot starts aligned for the kernels' 16-byte path (and cudaMalloc's 256).
    pub fn new(device: &dyn Device, slots: u32, slot_bytes: usize) -> Result<Self, ArenaError> {
        let slot_bytes = slot_bytes.div_ceil(256) * 256;
        let total = (slots as usize)
            .checked_mul(slot_bytes)
            .ok_or(ArenaError::Size { slots, slot_bytes })?;
        let buffer = device.alloc(total)?;
        Ok(Self {
            buffer,
            slot_bytes,
            slots,
            free: Mutex::new((0..slots).rev().collect()),
        })
    }

    pub fn buffer(&self) -> DeviceBuffer {
        self.buffer
    }
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
    pub fn slots(&self) -> u32 {
        self.slots
    }
    pub fn free_slots(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A free slot, lowest first; None when full.
    pub fn take(&self) -> Option<u32> {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    pub fn give_back(&self, slot: u32) -> Result<(), ArenaError> {
        if slot >= self.slots {
            return Err(ArenaError::BadSlot {
                slot,
                slots: self.slots,
            });
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.contains(&slot) {
            return Err(ArenaError::DoubleFree { slot });
        }
        free.push(slot);
        Ok(())
    }

    /// The byte range of `slot` (the first `len_bytes` of it).
    pub fn range(&self, slot: u32, len_bytes: usize) -> Result<DeviceRange, ArenaError> {
        if slot >= self.slots {
            return Err(ArenaError::BadSlot {
                slot,
                slots: self.slots,
            });
        }
        Ok(self.buffer.range(
            slot as usize * self.slot_bytes,
            len_bytes.min(self.slot_bytes),
        ))
    }

    /// Byte offset of `slot` in the arena buffer (for copy descriptors).
    pub fn offset(&self, slot: u32) -> u64 {
        u64::from(slot) * self.slot_bytes as u64
    }

    /// Frees the allocation.
    pub fn release(self, device: &dyn Device) -> Result<(), ArenaError> {
        device.free(self.buffer)?;
        Ok(())
    }
}
