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
# gpu_check (kernels equal to the CPU build, device-to-device table, offload table);
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
declare -A status

step() { # name timeout_s command...
    local name=$1 t=$2; shift 2
    local start=$SECONDS
    echo "=== $name: $*" >>"$OUT/steps.log"
    timeout "$t" "$@" >>"$OUT/steps.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc" >>"$OUT/steps.log"
    status[$name]="$rc $((SECONDS - start))"
    echo "step $name: rc=$rc in $((SECONDS - start)) s"
}

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
        "$BIN/gpu_check" --iters 1 --max-batch-mib 4 --offload-max-case-mib 16
fi

{
    echo "{"
    echo "  \"date\": \"$(date -u +%FT%TZ)\","
    echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)\","
    echo "  \"steps\": {"
    first=1
    for k in "${!status[@]}"; do
        read -r rc secs <<<"${status[$k]}"
        [ $first = 1 ] || echo ","
        first=0
        printf '    "%s": {"rc": %s, "seconds": %s}' "$k" "$rc" "$secs"
    done
    echo
    echo "  }"
    echo "}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
fail=0
for k in "${!status[@]}"; do
    read -r rc _ <<<"${status[$k]}"
    [ "$rc" = 0 ] || fail=1
done
exit $fail
