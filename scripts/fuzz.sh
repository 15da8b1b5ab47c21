#!/usr/bin/env bash
# Fuzz every cargo-fuzz target in fuzz/ for a bounded time, starting from the checked-in
# seed corpus (what each target asserts: docs/threat-model.md, "Fuzzing").
#
#   FUZZ_SECONDS      seconds per target (default 60)
#   FUZZ_TARGETS      space-separated subset of targets (default: all of `cargo fuzz list`)
#   FUZZ_TARGET_DIR   cargo target directory for the instrumented build (default fuzz/target)
#   FUZZ_JOBS         targets fuzzed at once (default: the CPU count)
#
# The corpus is copied to a temporary directory first, so the inputs libFuzzer adds never
# dirty the checkout. A crash fails the run; libFuzzer leaves the input in
# fuzz/artifacts/<target>/ (ignored by git). Copy it to fuzz/regressions/<target>/ and
# fix the parser: `cargo test` replays that directory from then on.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# cargo-fuzz passes nightly-only flags (-Zsanitizer=address); stable rustc accepts them
# with RUSTC_BOOTSTRAP, so CI needs no second toolchain.
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-60}
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo fuzz list | tr '\n' ' ')}"

work=$(mktemp -d)
# Fuzzers run in the background: stop them with the script, before their corpora go.
trap 'rc=$?; kill $(jobs -p) 2>/dev/null || true; wait || true; rm -rf "$work"; exit $rc' EXIT
trap 'exit 130' INT TERM

build_start=$SECONDS
cargo fuzz build --target-dir "$target_dir" >&2
echo "fuzz: built ${#targets[@]} targets in $((SECONDS - build_start)) s" >&2

# One target: its corpus, its log, its status line in $work/$t.status.
fuzz_one() {
    local t=$1 corpus="$work/$1" log="$work/$1.log" status extra=()
    mkdir -p "$corpus"
    cp -r "fuzz/corpus/$t/." "$corpus/"
    [[ -d fuzz/regressions/$t ]] && extra+=("fuzz/regressions/$t")
    echo "fuzz: $t for ${seconds} s" >&2
    if cargo fuzz run --target-dir "$target_dir" "$t" "$corpus" "${extra[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        tail -n 60 "$log" >&2
    fi
    local execs rate inputs
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    inputs=$(find "$corpus" -type f | wc -l)
    printf '%-16s %-6s %12s execs %9s execs/s %6s corpus inputs\n' \
        "$t" "$status" "${execs:-?}" "${rate:-?}" "$inputs" >"$work/$t.status"
}

# Each libFuzzer process is single-threaded: run one per CPU at a time, so every target
# still gets its full time on a core of its own and the whole run takes a CPU count's
# fraction of the time.
parallel=${FUZZ_JOBS:-$(nproc)}
if [[ ! $parallel =~ ^[1-9][0-9]*$ ]]; then
    echo "fuzz: FUZZ_JOBS must be a whole number from 1, got '$parallel'" >&2
    exit 2
fi
for t in "${targets[@]}"; do
    while (($(jobs -rp | wc -l) >= parallel)); do
        wait -n || true
    done
    fuzz_one "$t" &
done
wait

failed=()
summary=()
for t in "${targets[@]}"; do
    line=$(cat "$work/$t.status" 2>/dev/null || echo "$t (no status: the run did not finish)")
    summary+=("$line")
    [[ $line == *" ok "* ]] || failed+=("$t")
done

printf 'fuzz: %s\n' "${summary[@]}" >&2
if ((${#failed[@]})); then
    echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
