//! kvplane shared memory: session segments (memfd + memmap2), SPSC rings with futex
//! doorbells, the attach handshake, liveness, and the Rust client engines use.
//!
//! Unsafe code is confined to `sys` (system calls), `segment` (raw access to a mapping,
//! bounds-checked), `ring` (volatile entry copies within a checked array) and `window`
//! (fixed mappings inside its own reservation).

pub mod error;
pub mod ring;
pub mod segment;
pub mod sys;
pub mod window;

pub use error::{Result, ShmError};
pub use ring::{Consumer, Doorbell, Producer, RingEntry, RingKind, WaitPolicy};
pub use segment::{Geometry, QpGeometry, Segment};
pub mod client;
pub mod handshake;
pub mod server;

pub use client::{AttachOptions, QueuePair, Session};
/// Properties checked by the fuzz targets in `fuzz/` and by `tests/fuzz_regressions.rs`.
pub mod fuzz_props;
