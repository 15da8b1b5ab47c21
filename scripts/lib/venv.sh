# Sourced by the install scripts: one way to make a venv on a bare Debian machine.
#
#   ensure_venv VENV [PYTHON]   creates VENV unless it has a python; a bare Debian image
#                               lacks ensurepip, so as root it installs python3-venv and
#                               retries.
ensure_venv() {
    local venv=$1 python=${2:-python3}
    [[ -x "$venv/bin/python" ]] && return 0
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" >&2 && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        rm -rf "$venv"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
        python3 -m venv "$venv" >&2
    else
        echo "error: '$python -m venv' failed; install python3-venv" >&2
        exit 1
    fi
}
