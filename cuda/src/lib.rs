//! kvplane device layer: the [`Device`] trait and its two backends.
//!
//! - [`host`]: host memory and the CPU build of the kernels (runs everywhere).
//! - [`cuda`]: an NVIDIA GPU through cudarc (dynamic loading; a clear
//!   [`DeviceError::NoDriver`] where there is no driver), with CUDA IPC import, pinned
//!   registration, NVML topology.
//! - [`gds`]: GPUDirect Storage through cuFile (dynamically loaded), with the per-transfer
//!   choice between it and staging through the pinned pool.
//! - [`nvrtc`]: compiling the kernels for a GPU with NVRTC, the on-disk PTX cache, and
//!   the ptxas resource check.
//! - [`gpu_check`]: the bandwidth/correctness check run by `scripts/gpu-check.sh`.
//! - [`offload`]: the offload path (engine pages <-> pinned host and G1), verified and
//!   timed against a bulk copy and a per-page copy loop in the same run.
//! - [`slots`]: the tier seam ([`SlotStore`]) and G1's [`SlotArena`], a device allocation
//!   carved into fixed-size block slots at start-up.

pub mod cuda;
pub mod device;
pub mod gds;
pub mod gpu_check;
pub mod host;
pub mod nvrtc;
pub mod offload;
pub mod slots;

pub use device::{
    BackendChoice, BackendKind, Device, DeviceBuffer, DeviceError, DeviceRange, EngineImport,
    EngineWindow, EventId, LayoutId, Opened, StreamId, open,
};
pub use slots::{SlotArena, SlotStore};
