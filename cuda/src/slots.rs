//! The tier seam: a tier's fixed block slots as the device sees them ([`SlotStore`]), and
//! G1's implementation, a device allocation carved into slots at start-up
//! ([`SlotArena`]). The mover gathers engine pages straight into slots and scatters from
//! them ([`Device::gather_to_slots`], [`Device::scatter_from_slots`]); which slot holds
//! which block is the registry's business, not the store's.

use crate::device::{BackendKind, Device, DeviceBuffer, DeviceError};
use std::sync::Arc;

/// A tier's fixed block slots as the device sees them.
pub trait SlotStore: Send + Sync {
    fn slot_count(&self) -> u32;
    /// Bytes of the block at each slot (what a gather writes).
    fn block_bytes(&self) -> usize;
    /// The device buffer and offset holding `slot`'s block; None past slot_count.
    fn slot_at(&self, slot: u32) -> Option<(DeviceBuffer, u64)>;
    /// What backs it, for stats and logs: it never claims to be a GPU when it is not.
    fn describe(&self) -> String;
    fn is_device_memory(&self) -> bool;
}

/// Slots start at multiples of this (cudaMalloc's alignment), so every block starts
/// aligned for the kernels' 16-byte path.
pub const SLOT_ALIGN_BYTES: usize = 256;

/// G1: one device allocation carved into `slot_count` slots of `block_bytes` at start-up,
/// so the data path never allocates. Freed when dropped.
#[derive(Debug)]
pub struct SlotArena {
    device: Arc<dyn Device>,
    buffer: DeviceBuffer,
    block_bytes: usize,
    slot_stride_bytes: u64,
    slot_count: u32,
}

impl SlotArena {
    /// Allocates as many slots of `block_bytes` (each starting [`SLOT_ALIGN_BYTES`]-aligned)
    /// as fit in `capacity_bytes`, at most `u32::MAX`; at least one must fit.
    pub fn new(
        device: Arc<dyn Device>,
        capacity_bytes: u64,
        block_bytes: usize,
    ) -> Result<Self, DeviceError> {
        let refuse = |reason| DeviceError::SlotArena {
            capacity_bytes,
            block_bytes,
            reason,
        };
        if block_bytes == 0 {
            return Err(refuse("a block must have at least one byte"));
        }
        let stride = block_bytes
            .checked_next_multiple_of(SLOT_ALIGN_BYTES)
            .ok_or_else(|| refuse("the slot size overflows"))? as u64;
        let slot_count = u32::try_from(capacity_bytes / stride).unwrap_or(u32::MAX);
        if slot_count == 0 {
            return Err(refuse("not even one slot fits"));
        }
        let total = usize::try_from(u64::from(slot_count) * stride)
            .map_err(|_| refuse("the arena does not fit the address space"))?;
        let buffer = device.alloc(total)?;
        Ok(Self {
            device,
            buffer,
            block_bytes,
            slot_stride_bytes: stride,
            slot_count,
        })
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    /// The one allocation every slot lives in.
    pub fn buffer(&self) -> DeviceBuffer {
        self.buffer
    }

    /// Distance between consecutive slots (`block_bytes` rounded up to the alignment).
    pub fn slot_stride_bytes(&self) -> u64 {
        self.slot_stride_bytes
    }
}

impl SlotStore for SlotArena {
    fn slot_count(&self) -> u32 {
        self.slot_count
    }

    fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    fn slot_at(&self, slot: u32) -> Option<(DeviceBuffer, u64)> {
        (slot < self.slot_count).then(|| (self.buffer, u64::from(slot) * self.slot_stride_bytes))
    }

    fn describe(&self) -> String {
        let slots = format!("{} slots of {} bytes", self.slot_count, self.block_bytes);
        match self.device.backend() {
            BackendKind::Host => {
                format!("{slots} in host memory standing in for HBM (host backend)")
            }
            BackendKind::Cuda => format!("{slots} in device memory on {}", self.device.describe()),
        }
    }

    fn is_device_memory(&self) -> bool {
        self.device.backend() == BackendKind::Cuda
    }
}

impl Drop for SlotArena {
    fn drop(&mut self) {
        // Only an unknown handle or a dead context can fail here; neither leaves memory
        // this process could still free.
        let _ = self.device.free(self.buffer);
    }
}
