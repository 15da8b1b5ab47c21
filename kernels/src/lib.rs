//! kvplane kernels: CUDA sources under `kernels/` and the host shim that runs them on the CPU.

pub mod checksum;
pub use checksum::checksum64;
