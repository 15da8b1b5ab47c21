#!/usr/bin/env bash
# The vLLM connector's tests with real vLLM (CPU build, no GPU, nothing downloaded):
# installs vLLM into a venv if missing (scripts/install-vllm.sh), builds the daemon and
# libkvplane, then runs ffi/python/tests (hashing against Dynamo's vectors) and
# tests/vllm (five vLLM engine processes against a real `kvplane serve`). Bounded by
# KVPLANE_VLLM_TEST_TIMEOUT_S (default 2400 s) on top of the install's own bound.
# Figures: target/vllm-test/figures.json.
set -euo pipefail
cd "$(dirname "$0")/.."

python=$(scripts/install-vllm.sh)
# --workspace: the same features as scripts/test.sh's build, so after it this builds nothing.
cargo build --locked --workspace
timeout "${KVPLANE_VLLM_TEST_TIMEOUT_S:-2400}" "$python" -m pytest -q -s -p no:cacheprovider \
    ffi/python/tests tests/vllm
