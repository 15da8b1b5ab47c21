#![no_main]
//! Property: `kvplane_daemon::fuzz_props::check_slot_header` (documented there).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvplane_daemon::fuzz_props::check_slot_header(data);
});
