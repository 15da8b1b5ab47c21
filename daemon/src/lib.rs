//! kvplane daemon library. `main.rs` is a thin CLI over this.
pub mod bench;
pub mod block;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod session;
pub mod sim;
pub mod tier;
