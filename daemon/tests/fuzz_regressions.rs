//! The fuzz targets' properties in the normal test suite: the seed corpus matches its
//! generators, and the corpus plus every saved crash (`fuzz/regressions/<target>/`)
//! passes the same check the fuzzer runs.

use kvplane_daemon::fuzz_props;

include!("../../fuzz/replay.rs");

#[test]
fn config_corpus_and_regressions() {
    run_replay(&[ReplayTarget {
        name: "config",
        check: fuzz_props::check_config,
        seeds: fuzz_props::seeds_config,
    }]);
}

#[test]
fn slot_header_corpus_and_regressions() {
    run_replay(&[ReplayTarget {
        name: "slot_header",
        check: fuzz_props::check_slot_header,
        seeds: fuzz_props::seeds_slot_header,
    }]);
}
