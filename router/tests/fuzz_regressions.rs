//! The fuzz targets' properties in the normal test suite: the seed corpus matches its
//! generators, and the corpus plus every saved crash (`fuzz/regressions/<target>/`)
//! passes the same check the fuzzer runs.

use kvplane_router::fuzz_props;

include!("../../fuzz/replay.rs");

#[test]
fn router_frames_corpus_and_regressions() {
    run_replay(&[ReplayTarget {
        name: "router_frames",
        check: fuzz_props::check_router_frames,
        seeds: fuzz_props::seeds_router_frames,
    }]);
}

#[test]
fn vllm_batch_corpus_and_regressions() {
    run_replay(&[ReplayTarget {
        name: "vllm_batch",
        check: fuzz_props::check_vllm_batch,
        seeds: fuzz_props::seeds_vllm_batch,
    }]);
}
