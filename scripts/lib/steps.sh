# Steps of the GPU scripts (scripts/gpu/device-run.sh, scripts/gpu-e2e.sh): each under its
# own timeout, its output appended to $OUT/steps.log, its exit code and seconds kept in
# `status` for the JSON summary. Source it after setting OUT.
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
    return $rc
}

# The steps as JSON object members (no braces), for a summary file.
steps_json() {
    echo "  \"date\": \"$(date -u +%FT%TZ)\","
    echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)\","
    echo "  \"steps\": {"
    local first=1 k rc secs
    for k in "${!status[@]}"; do
        read -r rc secs <<<"${status[$k]}"
        [ $first = 1 ] || echo ","
        first=0
        printf '    "%s": {"rc": %s, "seconds": %s}' "$k" "$rc" "$secs"
    done
    echo
    echo "  }"
}

# Exit code for the whole run: 0 when every step's was.
steps_rc() {
    local k rc
    for k in "${!status[@]}"; do
        read -r rc _ <<<"${status[$k]}"
        [ "$rc" = 0 ] || return 1
    done
    return 0
}
