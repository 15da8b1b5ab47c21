//! The kvplane engine ABI.
//!
//! `include/kvplane.h` is the single definition; [`bindings`] is generated from it by
//! bindgen and checked in (`tests/bindings_drift.rs` regenerates it and fails on any
//! difference; run it with `KVPLANE_BLESS=1` to rewrite). This crate adds only what C
//! cannot say: compile-time layout asserts and typed views of the C enums.

#![no_std]

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    clippy::all
)]
pub mod bindings;

pub use bindings::{
    kvp_attach_reply, kvp_attach_request, kvp_block_op, kvp_copy_desc, kvp_cqe, kvp_index_line,
    kvp_ipc_event, kvp_kv_layout, kvp_kv_region, kvp_queue_pair_desc, kvp_ring_header,
    kvp_segment_header, kvp_sqe, kvp_stats,
};

mod types;
pub use types::*;

mod tier;
pub use tier::{PerTier, Tier};

#[cfg(test)]
extern crate std;

// Layout pins: the same numbers as the header's _Static_asserts, so a change to either
// side fails to compile.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<kvp_sqe>() == 64);
    assert!(size_of::<kvp_cqe>() == 32);
    assert!(size_of::<kvp_index_line>() == 64);
    assert!(size_of::<kvp_ring_header>() == 256);
    assert!(offset_of!(kvp_ring_header, head) == 64);
    assert!(offset_of!(kvp_ring_header, doorbell) == 128);
    assert!(size_of::<kvp_queue_pair_desc>() == 64);
    assert!(offset_of!(kvp_segment_header, daemon_heartbeat) == 64);
    assert!(offset_of!(kvp_segment_header, engine_heartbeat) == 128);
    assert!(offset_of!(kvp_segment_header, sq_doorbell) == 192);
    assert!(offset_of!(kvp_segment_header, queue_pairs) == 256);
    assert!(size_of::<kvp_segment_header>() <= HEADER_BYTES);
    assert!(size_of::<kvp_block_op>() == 24);
    assert!(size_of::<kvp_copy_desc>() == 24);
    assert!(size_of::<kvp_kv_layout>() == 64 + 2 * 10 * MAX_LAYERS);
    assert!(size_of::<kvp_kv_region>() == 128);
    assert!(size_of::<kvp_ipc_event>() == 96);
    assert!(core::mem::align_of::<kvp_segment_header>() == 8);
};
