//! The fuzz targets' properties in the normal test suite: the seed corpus matches its
//! generators, and the corpus plus every saved crash (`fuzz/regressions/<target>/`)
//! passes the same check the fuzzer runs.

use kvplane_shm::fuzz_props;

include!("../../fuzz/replay.rs");

#[test]
fn validate_sqe_corpus_and_regressions() {
    run_replay(&[ReplayTarget {
        name: "validate_sqe",
        check: fuzz_props::check_validate_sqe,
        seeds: fuzz_props::seeds_validate_sqe,
    }]);
}

#[test]
fn server_rings_corpus_and_regressions() {
    run_replay(&[ReplayTarget {
        name: "server_rings",
        check: fuzz_props::check_server_rings,
        seeds: fuzz_props::seeds_server_rings,
    }]);
}

#[test]
fn attach_request_corpus_and_regressions() {
    run_replay(&[ReplayTarget {
        name: "attach_request",
        check: fuzz_props::check_attach_request,
        seeds: fuzz_props::seeds_attach_request,
    }]);
}
