#![no_main]
//! Property: `kvplane_router::fuzz_props::check_router_frames` (documented there).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvplane_router::fuzz_props::check_router_frames(data);
});
