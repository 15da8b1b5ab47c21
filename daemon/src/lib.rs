//! kvplane daemon library. `main.rs` is a thin CLI over this.
pub mod block;
pub mod cli;
pub mod tier;
