#!/usr/bin/env bash
# Every test: the workspace's unit and integration tests (they start real processes,
# so the binaries and libkvplane are built first), then the loom model of the ring
# protocol (a separate build with --cfg loom).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --workspace --locked
cargo test --workspace --locked
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test --locked --release -p kvplane-shm --test loom_doorbell
# The vLLM KV connector against real vLLM (installs vLLM's CPU build on first use).
scripts/test-vllm.sh
