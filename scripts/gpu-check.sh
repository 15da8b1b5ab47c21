#!/usr/bin/env bash
# GPU check for engineers with an NVIDIA GPU: installs NVRTC/ptxas (PyPI wheels) if
# needed, builds, then runs the kernels against the copy-engine path and cudaMemcpy
# references on random data and prints a bandwidth table (GB/s, % of device-to-device
# and of pinned host-to-device copies measured in the same run).
#
#   scripts/gpu-check.sh                  # device 0
#   scripts/gpu-check.sh --device 1 --max-batch-mib 4096 --iters 20
#   scripts/gpu-check.sh --backend host   # the same check on the CPU (no GPU numbers)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-tools.sh >/dev/null
exec cargo run --release -p kvplane-cuda --example gpu_check -- "$@"
