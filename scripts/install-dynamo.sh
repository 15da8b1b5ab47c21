#!/usr/bin/env bash
# Install NVIDIA Dynamo's replay tool (the mock engine and its KV router) into a venv, for
# `kvplane replay --engines --with-dynamo`. CPU only: ai-dynamo 1.4.2 installs and runs
# without a GPU (1.6.x does not install without nvidia-smi).
#
#   scripts/install-dynamo.sh                 # venv at $HOME/.cache/kvplane/dynamo
#   KVPLANE_DYNAMO_VENV=/opt/dyn scripts/install-dynamo.sh
#
# Idempotent. Prints one line to stdout: `KVPLANE_DYNAMO_PYTHON=<path>`; the replay finds
# the venv through the same variable or the default path.
set -euo pipefail

venv="${KVPLANE_DYNAMO_VENV:-$HOME/.cache/kvplane/dynamo}"
python="${PYTHON:-python3}"
version=1.4.2

installed() {
    [[ -x "$venv/bin/python" ]] &&
        "$venv/bin/python" - <<PY 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version("ai-dynamo") == "$version" and m.version("ai-dynamo-runtime") == "$version" else 1)
PY
}

if ! installed; then
    echo "installing ai-dynamo==$version ai-dynamo-runtime==$version into $venv" >&2
    if [[ ! -x "$venv/bin/python" ]]; then
        mkdir -p "$(dirname "$venv")"
        if ! "$python" -m venv "$venv" >&2; then
            if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
                rm -rf "$venv"
                apt-get update -qq >&2
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
                python=python3
                "$python" -m venv "$venv" >&2
            else
                echo "error: '$python -m venv' failed; install python3-venv" >&2
                exit 1
            fi
        fi
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "ai-dynamo==$version" "ai-dynamo-runtime==$version" >&2
fi
# The replay module must import (it is what `kvplane replay --with-dynamo` runs).
"$venv/bin/python" -c 'import dynamo.replay' >&2
echo "KVPLANE_DYNAMO_PYTHON=$venv/bin/python"
