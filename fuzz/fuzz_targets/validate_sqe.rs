#![no_main]
//! Property: `kvplane_shm::fuzz_props::check_validate_sqe` (documented there).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvplane_shm::fuzz_props::check_validate_sqe(data);
});
