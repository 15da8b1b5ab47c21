//! kvplane kernels: the CUDA sources under `kernels/cuda/` (paged gather/scatter over the
//! strided engine layout, batched block copy, block checksum, slot MAC), the host shim that
//! compiles the same sources for the CPU (`kernels/shim/`), and the safe, validating
//! launch wrappers the host backend uses.
//!
//! - [`layout`]: validation of the engine's `kvp_kv_layout` ([`validate_layout`]).
//! - [`host`]: launches of the CPU build ([`gather`], [`scatter`], [`copy_batch`],
//!   [`checksum_batch`], [`mac_batch`]).
//! - [`geometry`]: the GPU launch shapes (also run on the CPU by the tests).
//! - [`sources`]: the kernel sources as text, for NVRTC (the cuda backend and the
//!   compile check).

pub mod checksum;
pub mod geometry;
pub mod host;
pub mod layout;
pub mod sources;

pub use checksum::{Checksum64, checksum64};
pub use host::{
    EngineKv, HostLaunch, KernelError, check_paged_batch, checksum_batch, checksum_batch_raw,
    checksum_block, copy_batch, copy_batch_raw, copy_within, gather, gather_raw, gather_slots,
    gather_slots_raw, install_fault_guard, mac_batch, mac_batch_raw, mac_key_words, mac_table,
    scatter, scatter_raw, scatter_slots, scatter_slots_raw,
};
pub use layout::{LayoutError, LayoutInfo, PagedLayout, validate_layout};
