#!/usr/bin/env bash
# Builds Vigil's fuzz targets (fuzz/) with libFuzzer on the stable toolchain and runs
# each one for SECONDS (default 20). Exits non-zero if any target crashed, hung or
# failed a check, and prints the reproducer's path.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      targets: the [[bin]]s of fuzz/Cargo.toml
#
# Environment:
#   VIGIL_FUZZ_ALLOW=check[,check]  silence named checks (open findings; docs/fuzzing.md)
#   FUZZ_TIMEOUT=10                 seconds one input may take before it counts as a hang
#   FUZZ_JOBS=1                     targets run at once (each uses one core)
#   FUZZ_FLAGS="..."                extra libFuzzer flags for every target
#   FUZZ_SANITIZER=address          build with AddressSanitizer too (about 5x slower;
#                                   needs -Zsanitizer, so it sets RUSTC_BOOTSTRAP=1 on
#                                   the stable toolchain; own target dir fuzz/target/asan)
#
# Per target T: checked-in seeds in fuzz/corpus/T (read-only here), regressions in
# fuzz/regressions/T (replayed first, must pass), libFuzzer flags in fuzz/options/T,
# new inputs in fuzz/target/corpus/T (kept between runs), crashes in fuzz/artifacts/T.
# A target whose binary honours VIGIL_FUZZ_WRITE_SEEDS=DIR (region_raw) also gets
# generated seeds in fuzz/target/seeds/T. Adding a target: a file in fuzz_targets/, a
# [[bin]] in fuzz/Cargo.toml, and a seed folder fuzz/corpus/T; nothing here changes.
#
# No nightly and no cargo-fuzz are needed: the build passes the same flags as
# `cargo fuzz build --sanitizer none` (which also works, for interactive use).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz="$root/fuzz"
secs=20
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    secs=$1
    shift
fi
timeout_s=${FUZZ_TIMEOUT:-10}
jobs=${FUZZ_JOBS:-1}

all_targets=$(sed -n '/^\[\[bin\]\]/,/^name/ s/^name *= *"\(.*\)"/\1/p' "$fuzz/Cargo.toml")
if [[ $# -gt 0 ]]; then
    targets="$*"
    for t in $targets; do
        grep -qx "$t" <<<"$all_targets" || { echo "fuzz.sh: no target $t (have: $(echo $all_targets))" >&2; exit 2; }
    done
else
    targets=$all_targets
fi

command -v cargo >/dev/null || { echo "fuzz.sh: cargo not found" >&2; exit 2; }
# libfuzzer-sys compiles libFuzzer (C++) with the system compiler.
if ! command -v c++ >/dev/null; then
    echo "fuzz.sh: installing a C++ compiler for libFuzzer" >&2
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq g++ >/dev/null
    else
        echo "fuzz.sh: need g++ (or clang++)" >&2
        exit 2
    fi
fi

host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$fuzz/target"
# The flags of `cargo fuzz build --sanitizer none` (cargo-fuzz 0.13): SanitizerCoverage
# for libFuzzer, with assertions and overflow checks on. --target keeps them off build
# scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions -Ccodegen-units=1"
case ${FUZZ_SANITIZER:-none} in
none) ;;
address)
    export RUSTC_BOOTSTRAP=1 ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
    RUSTFLAGS="$RUSTFLAGS -Zsanitizer=address"
    CARGO_TARGET_DIR="$fuzz/target/asan"
    ;;
*) echo "fuzz.sh: FUZZ_SANITIZER is none or address" >&2; exit 2 ;;
esac
bins=()
for t in $targets; do bins+=(--bin "$t"); done
echo "== building fuzz targets: $(echo $targets)"
start=$(date +%s)
cargo build --manifest-path "$fuzz/Cargo.toml" --release --target "$host" \
    --config 'profile.release.debug="line-tables-only"' "${bins[@]}"
echo "== built in $(($(date +%s) - start)) s"
bindir="$CARGO_TARGET_DIR/$host/release"

scratch=$(mktemp -d "$( [[ -d /dev/shm && -w /dev/shm ]] && echo /dev/shm || echo "${TMPDIR:-/tmp}")/vigil-fuzz.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$scratch"
}
trap cleanup EXIT
export VIGIL_FUZZ_SCRATCH="$scratch"
logdir="$fuzz/target/fuzz-logs"
mkdir -p "$logdir"

run_target() {
    local t=$1 bin="$bindir/$1" log="$logdir/$1.log"
    local work="$fuzz/target/corpus/$t" seeds="$fuzz/corpus/$t" gen="$fuzz/target/seeds/$t"
    local art="$fuzz/artifacts/$t"
    mkdir -p "$work" "$art" "$seeds"
    : >"$log"
    # 1. Regressions: every saved reproducer must pass now.
    local regs=("$fuzz/regressions/$t"/*)
    if [[ -e ${regs[0]} ]]; then
        if ! "$bin" -runs=1 "${regs[@]}" >>"$log" 2>&1; then
            echo "FAIL $t: a saved reproducer in fuzz/regressions/$t still fails (an open finding"
            echo "     not allowed by VIGIL_FUZZ_ALLOW, or a regression); log $log"
            grep -E "^Running: " "$log" | tail -1 | sed 's/^/    /' || true
            grep -m1 -A1 "panicked at" "$log" | tail -1 | sed 's/^/    /' || true
            return 1
        fi
    fi
    # 2. Generated seeds, where the target makes them (whole regions, too big to check in).
    rm -rf "$gen"
    VIGIL_FUZZ_WRITE_SEEDS="$gen" "$bin" -runs=0 >>"$log" 2>&1 || true
    local dirs=("$work" "$seeds")
    [[ -d $gen ]] && dirs+=("$gen")
    # 3. Fuzz.
    local opts=()
    if [[ -f $fuzz/options/$t ]]; then
        while read -r o; do
            [[ -z $o || $o == \#* ]] && continue
            opts+=("${o//fuzz\//$fuzz/}")
        done <"$fuzz/options/$t"
    fi
    # shellcheck disable=SC2086
    if "$bin" -max_total_time="$secs" -timeout="$timeout_s" -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$art/" "${opts[@]}" ${FUZZ_FLAGS:-} "${dirs[@]}" \
        >>"$log" 2>&1; then
        local stats
        stats=$(grep -E "^#[0-9]+.*DONE" "$log" | tail -1 | sed 's/  */ /g')
        echo "ok   $t: ${stats:-done} (log $log)"
        return 0
    fi
    local repro
    repro=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    echo "FAIL $t: $(grep -m1 -E 'panicked at|ERROR: libFuzzer|ALARM' "$log" || echo 'see log')"
    grep -m1 -A1 "panicked at" "$log" | tail -1 | sed 's/^/    /' || true
    echo "    reproducer: ${repro:-none written} (log $log)"
    echo "    replay:     $bin ${repro:-INPUT}"
    return 1
}

echo "== fuzzing each target for $secs s (timeout $timeout_s s per input, $jobs at a time)"
status=0
if [[ $jobs -le 1 ]]; then
    for t in $targets; do
        run_target "$t" || status=1
    done
else
    results="$scratch/results"
    mkdir -p "$results"
    running=0
    for t in $targets; do
        (run_target "$t" >"$results/$t" 2>&1; echo $? >"$results/$t.rc") &
        pids+=($!)
        running=$((running + 1))
        if [[ $running -ge $jobs ]]; then
            wait -n || true
            running=$((running - 1))
        fi
    done
    wait || true
    for t in $targets; do
        cat "$results/$t"
        [[ $(cat "$results/$t.rc" 2>/dev/null || echo 1) == 0 ]] || status=1
    done
fi
echo "== fuzzing $( [[ $status == 0 ]] && echo passed || echo FAILED ) in $(($(date +%s) - start)) s"
exit $status
