#![no_main]
//! Property: `kvplane_router::fuzz_props::check_vllm_batch` (documented there).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvplane_router::fuzz_props::check_vllm_batch(data);
});
