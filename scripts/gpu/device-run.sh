#!/usr/bin/env bash
# The GPU checks, on a GPU machine, over prebuilt binaries (no Rust toolchain needed
# there; CUDA 12 or 13 driver and NVRTC, as on the GPU test machine in GPU-NOTES.md).
# Build them on any Linux x86-64 machine with `scripts/gpu/build-bin.sh` (into gpu-bin/),
# copy the repository with gpu-bin/ to the GPU machine, then:
#
#   OUT=/tmp/gpu-out scripts/gpu/device-run.sh
#
# Each step runs under its own timeout; its output goes to $OUT/steps.log, results to
# $OUT/gpu_check.json and $OUT/torch.json, and summary.json says which steps passed. Steps: nvidia-smi; the kvplane-cuda tests with the driver present;
# gpu_check (kernels equal to the CPU build, device memory <-> O_DIRECT file through
# cuFile, device-to-device table, offload table);
# compute-sanitizer memcheck on a short gpu_check; PyTorch reference (c) if torch is
# importable.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-gpu-bin}
OUT=${OUT:-/tmp/kvplane-gpu-out}
mkdir -p "$OUT"
export KVPLANE_CUDA_TOOLS=${KVPLANE_CUDA_TOOLS:-/nonexistent}   # use the machine's CUDA
export PATH="$PATH:/usr/local/cuda/bin"
export KVPLANE_REPO=$PWD   # tests that read kernels/cuda/*.cu
source scripts/lib/steps.sh

step nvidia-smi 20 nvidia-smi
step gpu_check 240 "$BIN/gpu_check" --iters "${ITERS:-5}" --max-batch-mib 512 \
    --json-out "$OUT/gpu_check.json"
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    step torch 150 python3 scripts/gpu/torch_offload.py --iters "${ITERS:-5}" --out "$OUT/torch.json"
fi
for t in "$BIN"/tests/*; do
    step "test-$(basename "$t")" 60 "$t" --test-threads=1 --nocapture
done
if command -v compute-sanitizer >/dev/null; then
    step sanitizer 100 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$BIN/gpu_check" --iters 1 --max-batch-mib 4 --offload-max-case-mib 16 --no-file
fi

{
    echo "{"
    steps_json
    echo "}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
steps_rc
