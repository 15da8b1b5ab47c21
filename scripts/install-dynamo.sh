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
. "$(dirname "$0")/lib/venv.sh"

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
    ensure_venv "$venv" "$python"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "ai-dynamo==$version" "ai-dynamo-runtime==$version" >&2
fi
# The replay module must import (it is what `kvplane replay --with-dynamo` runs).
"$venv/bin/python" -c 'import dynamo.replay' >&2
echo "KVPLANE_DYNAMO_PYTHON=$venv/bin/python"
