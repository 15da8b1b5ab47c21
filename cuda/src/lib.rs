//! kvplane device layer.
//!
//! - [`nvrtc`]: compiling the kernels for a GPU with NVRTC, the on-disk PTX cache, and
//!   the ptxas resource check.

pub mod nvrtc;
