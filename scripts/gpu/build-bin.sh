#!/usr/bin/env bash
# Builds what scripts/gpu/device-run.sh and scripts/gpu-e2e.sh run, into gpu-bin/
# (stripped, release): the kvplane binary, libkvplane.so (for the Python package), the
# gpu_check example and the kvplane-cuda test binaries. No CUDA toolkit needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p kvplane-cuda --example gpu_check
cargo build --release --locked -p kvplane -p kvplane-capi
mkdir -p gpu-bin/tests
cp target/release/examples/gpu_check target/release/kvplane target/release/libkvplane.so gpu-bin/
strip gpu-bin/gpu_check gpu-bin/kvplane gpu-bin/libkvplane.so
rm -f gpu-bin/tests/*
cargo test --release --locked -p kvplane-cuda --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' |
    while read -r exe; do
        name=$(basename "$exe" | sed "s/-[0-9a-f]*$//")
        cp "$exe" "gpu-bin/tests/$name"
        strip "gpu-bin/tests/$name"
    done
ls -la gpu-bin gpu-bin/tests
