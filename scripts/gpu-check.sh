#!/usr/bin/env bash
# GPU check for engineers with an NVIDIA GPU and a Rust toolchain: installs NVRTC/ptxas
# (PyPI wheels) if needed, builds, then checks the kernels against the CPU build, prints
# the device-to-device table (batched-copy kernel vs per-block copies vs one bulk copy)
# and the offload table (engine pages <-> pinned host and G1 against a bulk copy and a
# per-page copy loop, measured in the same run). Without Rust on the GPU machine, use
# scripts/gpu/build-bin.sh and scripts/gpu/device-run.sh (docs/kernels.md).
#
#   scripts/gpu-check.sh                  # device 0
#   scripts/gpu-check.sh --device 1 --max-batch-mib 4096 --iters 20 --json
#   scripts/gpu-check.sh --backend host   # the same check on the CPU (no GPU numbers)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-tools.sh >/dev/null
exec cargo run --release -p kvplane-cuda --example gpu_check -- "$@"
