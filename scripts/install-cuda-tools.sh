#!/usr/bin/env bash
# Install the CUDA compile tools the kernel check needs, without a CUDA toolkit or a GPU:
# NVRTC (libnvrtc.so.12) and ptxas, both from NVIDIA's PyPI wheels, into a venv.
#
#   scripts/install-cuda-tools.sh            # venv at $HOME/.cache/kvplane/cuda-tools
#   KVPLANE_CUDA_TOOLS=/opt/ct scripts/install-cuda-tools.sh
#
# Idempotent: a second run with the tools present only prints their paths. The kernel
# check (kernels/tests/nvrtc_ptxas.rs) finds the venv through the same variable/default.
# Prints two lines to stdout: `KVPLANE_NVRTC_LIB=<path>` and `KVPLANE_PTXAS=<path>`.
set -euo pipefail
. "$(dirname "$0")/lib/venv.sh"

venv="${KVPLANE_CUDA_TOOLS:-$HOME/.cache/kvplane/cuda-tools}"
python="${PYTHON:-python3}"

find_tools() {
    nvrtc_lib="$(find "$venv" -path '*nvidia/cuda_nvrtc/lib/libnvrtc.so.12' -print -quit 2>/dev/null || true)"
    ptxas_bin="$(find "$venv" -path '*nvidia/cuda_nvcc/bin/ptxas' -print -quit 2>/dev/null || true)"
}

find_tools
if [[ -z "$nvrtc_lib" || -z "$ptxas_bin" ]]; then
    echo "installing nvidia-cuda-nvrtc-cu12 and nvidia-cuda-nvcc-cu12 into $venv" >&2
    ensure_venv "$venv" "$python"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        'nvidia-cuda-nvrtc-cu12>=12.4,<13' 'nvidia-cuda-nvcc-cu12>=12.4,<13' >&2
    find_tools
fi

if [[ -z "$nvrtc_lib" ]]; then
    echo "error: libnvrtc.so.12 not found under $venv after install" >&2
    exit 1
fi
if [[ -z "$ptxas_bin" ]]; then
    echo "error: ptxas not found under $venv after install" >&2
    exit 1
fi
chmod +x "$ptxas_bin" 2>/dev/null || true
"$ptxas_bin" --version >/dev/null || { echo "error: $ptxas_bin does not run" >&2; exit 1; }

echo "KVPLANE_NVRTC_LIB=$nvrtc_lib"
echo "KVPLANE_PTXAS=$ptxas_bin"
