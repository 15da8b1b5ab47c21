#!/usr/bin/env bash
# The GPU data path end to end, on a GPU machine, over prebuilt binaries (no Rust
# toolchain there; a CUDA 12 or 13 driver and NVRTC, as on the GPU test machine in
# ../shared/GPU-NOTES.md). Build on any Linux x86-64 machine with
# `scripts/gpu/build-bin.sh` (into gpu-bin/: kvplane, gpu_check, the kvplane-cuda tests),
# copy the repository with gpu-bin/ to the GPU machine, then:
#
#   OUT=/tmp/gpu-e2e scripts/gpu-e2e.sh
#
# Steps, each under its own timeout (about 6 minutes in all, the offload benches 1-2 minutes each); output in $OUT/steps.log,
# each engine's JSON report in $OUT/engines.jsonl, one summary in $OUT/summary.json:
#   1. `kvplane serve` on the cuda backend (refuses to start without one), a pinned host
#      tier, a G1 arena in HBM and an NVMe tier file;
#   2. two engine processes with their KV pools in HBM, one saving a chain of 2 MiB blocks
#      (Llama-3.1-8B geometry, 16-token pages) from per-layer cudaMalloc tensors registered
#      by CUDA IPC handle, the other, a different process with one allocation, loading it
#      into its own pool and comparing every byte; the same with VMM allocations exported
#      as file descriptors, and with a pool of 2 MiB VMM chunks mapped back to back as
#      PyTorch's expandable segments map theirs (a region per chunk, KVP_REGION_F_CONTINUES);
#   3. a chain kept on the GPU (KVP_SQE_F_KEEP_ON_GPU: into G1, device to device) and
#      loaded by the other process from G1 (its report's tier must be 1, HBM);
#   4. a chain saved and loaded with the engines' IPC events (KVP_OP_REGISTER_EVENTS): the
#      SAVE's copy waits for the saver's event on the GPU, the LOAD completes when queued
#      and the loader waits on its event before comparing; then the same through the vLLM
#      connector's in-place code (kvplane.pages.DirectPages, python3 with torch: per-layer
#      bf16 tensors in vLLM's FlashAttention layout), JSON in $OUT/direct-pages.json,
#      then again under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
#      ($OUT/direct-pages-expandable.json);
#   5. the same chain saved with write-through, the daemon restarted, and loaded from NVMe
#      (straight into G1 with cuFile where libcufile opens, each block's checksum and MAC
#      checked by the kernels in G1; the daemon's "NVMe <-> G1" log line, copied to
#      steps.log, says which path ran);
#   6. compute-sanitizer (memcheck) over a daemon serving one small save/load round;
#   7. `kvplane bench offload` through a cuda `kvplane serve` and a session with its pool in
#      HBM (Llama-3.1-8B in 16- and 64-token pages, -70B in 16-token pages, with G1; 1 to
#      512 blocks), each path next to a bulk copy and per-page copies of the same bytes
#      measured in the same run; JSON in $OUT/offload-*.json.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-gpu-bin}
OUT=${OUT:-/tmp/kvplane-gpu-e2e}
WORK=${WORK:-$OUT/work}
mkdir -p "$OUT" "$WORK"
: >"$OUT/steps.log"
: >"$OUT/engines.jsonl"
export KVPLANE_CUDA_TOOLS=${KVPLANE_CUDA_TOOLS:-/nonexistent}   # the machine's CUDA
export PATH="$PATH:/usr/local/cuda/bin"
KV="$BIN/kvplane"
SOCK="$WORK/kvplane.sock"
DAEMON_PID=

source scripts/lib/steps.sh

config() { # path [extra TOML lines]
    cat >"$1" <<EOF
[serve]
socket_path = "$SOCK"
drop_privileges = false
[device]
backend = "cuda"
[blocks]
block_bytes = 2097152
[tiers.hbm]
capacity_bytes = 1073741824
[tiers.host]
capacity_bytes = 4294967296
hugepages = "never"
[tiers.nvme]
paths = ["$WORK/nvme.kvp"]
capacity_bytes = 4294967296
direct = false
[control]
metrics_addr = ""
EOF
}

start_daemon() { # [wrapper...]
    rm -f "$SOCK"
    "$@" "$KV" serve --config "$WORK/kvplane.toml" >>"$OUT/daemon.log" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 1 300); do
        [ -S "$SOCK" ] && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || { echo "daemon exited; see daemon.log"; return 1; }
        sleep 0.1
    done
    echo "daemon did not listen within 30 s"
    return 1
}

started() { # name: records start_daemon's outcome as a step
    local start=$SECONDS
    shift_args=("${@:2}")
    start_daemon "${shift_args[@]}"
    local rc=$?
    status[$1]="$rc $((SECONDS - start))"
    echo "step $1: rc=$rc"
    return $rc
}

stop_daemon() {
    [ -n "$DAEMON_PID" ] || return 0
    # Under compute-sanitizer the daemon is the wrapper's child: stop it, not only them.
    pkill -TERM -P "$DAEMON_PID" 2>/dev/null
    kill -TERM "$DAEMON_PID" 2>/dev/null
    timeout 30 tail --pid="$DAEMON_PID" -f /dev/null 2>/dev/null
    kill -KILL "$DAEMON_PID" 2>/dev/null
    DAEMON_PID=
}
trap stop_daemon EXIT

engine() { # name args... (JSON report appended to engines.jsonl)
    local name=$1; shift
    echo "=== engine $name: $*" >>"$OUT/steps.log"
    local start=$SECONDS
    timeout 60 "$KV" gpu-engine --socket "$SOCK" --json "$@" >"$WORK/engine.json" 2>>"$OUT/steps.log"
    local rc=$?
    [ -s "$WORK/engine.json" ] && sed "s/^{/{\"step\":\"$name\",\"rc\":$rc,/" "$WORK/engine.json" >>"$OUT/engines.jsonl"
    status[$name]="$rc $((SECONDS - start))"
    echo "engine $name: rc=$rc"
    return $rc
}

step nvidia-smi 20 nvidia-smi
config "$WORK/kvplane.toml"
rm -f "$WORK/nvme.kvp"
if started serve-cuda; then
    BLOCKS=(--blocks 64 --layers 32 --page-tokens 16 --kv-heads 8 --head-bytes 256)
    engine save-ipc --role save --memory ipc --per-layer --first-hash 1000 "${BLOCKS[@]}"
    engine load-ipc --role load --memory ipc --first-hash 1000 "${BLOCKS[@]}"
    engine save-vmm --role save --memory vmm --per-layer --first-hash 2000 "${BLOCKS[@]}"
    engine load-vmm --role load --memory vmm --first-hash 2000 "${BLOCKS[@]}"
    engine save-chunks --role save --memory vmm-chunks --first-hash 2500 "${BLOCKS[@]}"
    engine load-chunks --role load --memory vmm-chunks --per-layer --first-hash 2500 "${BLOCKS[@]}"
    # One block: the engine-visible cost of a SAVE and a LOAD.
    engine save-one --role save --memory ipc --first-hash 3000 "${BLOCKS[@]}" --blocks 1
    engine load-one --role load --memory ipc --first-hash 3000 "${BLOCKS[@]}" --blocks 1
    engine save-g1 --role save --memory ipc --per-layer --keep-on-gpu --expect-tier hbm --first-hash 3500 "${BLOCKS[@]}"
    engine load-g1 --role load --memory vmm --expect-tier hbm --first-hash 3500 "${BLOCKS[@]}"
    engine save-event --role save --memory ipc --per-layer --ipc-event --first-hash 3700 "${BLOCKS[@]}"
    engine load-event --role load --memory vmm --ipc-event --first-hash 3700 "${BLOCKS[@]}"
    # The vLLM connector's in-place path (kvplane.pages.DirectPages) with torch tensors in
    # vLLM's layout, saver and loader in separate processes; needs python3 with torch.
    if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        step direct-pages 120 env KVPLANE_LIB="$BIN/libkvplane.so" \
            python3 ffi/python/examples/direct_pages_gpu.py --socket "$SOCK"
        grep '"save":' "$OUT/steps.log" | tail -1 >"$OUT/direct-pages.json"
        step direct-pages-expandable 120 env KVPLANE_LIB="$BIN/libkvplane.so" \
            PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
            python3 ffi/python/examples/direct_pages_gpu.py --socket "$SOCK" \
            --namespace direct-pages-expandable --seed 11
        grep '"save":' "$OUT/steps.log" | tail -1 >"$OUT/direct-pages-expandable.json"
    else
        echo "step direct-pages: did not run: no python3 with CUDA torch"
        status[direct-pages]="127 0"
        status[direct-pages-expandable]="127 0"
    fi
    engine save-nvme --role save --memory ipc --per-layer --write-through --first-hash 4000 "${BLOCKS[@]}"
    stop_daemon
    if started restart-cuda; then
        engine load-nvme --role load --memory ipc --expect-tier nvme --first-hash 4000 "${BLOCKS[@]}"
        grep "NVMe <-> G1" "$OUT/daemon.log" | tail -1 >>"$OUT/steps.log"
    fi
    stop_daemon
fi
if command -v compute-sanitizer >/dev/null; then
    rm -f "$WORK/nvme.kvp"
    if started serve-sanitizer compute-sanitizer --tool memcheck \
        --error-exitcode 9 --target-processes all; then
        SMALL=(--blocks 4 --layers 32 --page-tokens 16 --kv-heads 8 --head-bytes 256)
        engine sanitizer-save --role save --memory ipc --per-layer --first-hash 5000 "${SMALL[@]}"
        engine sanitizer-load --role load --memory vmm --first-hash 5000 "${SMALL[@]}"
        pid=$DAEMON_PID
        stop_daemon
        wait "$pid" 2>/dev/null
        status[sanitizer-exit]="$? 0"
        grep -E "ERROR SUMMARY" "$OUT/daemon.log" | tail -1
    fi
else
    status[compute-sanitizer]="127 0"
fi
offload() { # name args...
    local name=$1; shift
    step "offload-$name" 150 "$KV" --log warn bench offload --memory ipc --g1 --json \
        --iters 2 --dir "$WORK" "$@"
    # The JSON is the step's last line of output.
    grep '"bench":"offload"' "$OUT/steps.log" | tail -1 >"$OUT/offload-$name.json"
}
offload 8b-16 --model llama8b --page-tokens 16
offload 8b-64 --model llama8b --page-tokens 64 --batches 1,4,16,64,256
offload 70b-16 --model llama70b --page-tokens 16
{
    echo "{"
    steps_json
    echo "  ,\"engines\": ["
    sed '$!s/$/,/' "$OUT/engines.jsonl" | sed 's/^/    /'
    echo "  ]"
    echo "}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
steps_rc
