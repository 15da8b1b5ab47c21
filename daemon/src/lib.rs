//! kvplane daemon library. `main.rs` is a thin CLI over this.
pub mod cli;
