#!/usr/bin/env bash
# The test suite, in stages that can also run alone. Installs what the stages need
# (scripts/install-deps.sh), runs every check of each stage, records each as passed or
# failed, and ends with the counts: a last line `N passed, N failed`. Exits non-zero if
# any check failed.
# Usage: scripts/test.sh [--fail-fast] [STAGE...]     (from anywhere inside the repository)
#        scripts/test.sh --help
set -uo pipefail
cd "$(dirname "$0")/.."

STAGES=(lint unit scenarios e2e monitoring images reliability fuzz)

usage() {
    cat <<'EOF'
Usage: scripts/test.sh [--fail-fast] [STAGE...]

Runs the given stages (in the order below, whatever order they are named in), or every
stage when none is named: that is the whole suite, what CI (.ci/run) runs. Each check
is recorded as passed or failed and the run goes on; the end prints the counts per
stage, the failed checks, and a last line `N passed, N failed`. The exit status is
non-zero if any check failed.

Stages:
  lint         the scripts parse (bash -n, Python); cargo fmt --check; cargo clippy
               -D warnings (with the fault-injection feature); the benchmarks compile
  unit         cargo build and cargo test --workspace (with the test-only fault points,
               --features vigil-interposer/fault-injection); a release libvigil.so
               carries no fault-injection code
  scenarios    the start-up scenarios of tests/run_comprehensive_tests.sh (14 runs)
  e2e          scripts/exporter-e2e.sh 8: a real Prometheus scraping the exporter
  monitoring   scripts/check-monitoring.sh: alert rules, the Helm chart (lint, several
               value sets rendered and validated, bad values refused), the rendered
               manifests, dashboards, every expression in a live Prometheus
  images       deploy/images/check.sh: the image build steps (release builds;
               libvigil.so linked for glibc 2.17 with zig) into staging trees, the
               staged exporter and libvigil.so (also under Debian 11's glibc 2.31),
               vigil-install (both routes), a buildah build of both images
  reliability  tests/kill_sweep.py (both detection modes), tests/random_kills.py
               (10 rounds, 3 more in serial mode), tests/soak.py (30 s)
  fuzz         scripts/fuzz.sh 20: saved reproducers, then each fuzz target for 20 s

Stages from scenarios on run the debug binaries: they build the workspace first
(once) unless the unit stage already did in this run.

Options:
  --fail-fast  stop at the first failed check (the counts are still printed)
  -h, --help   this text

Examples:
  scripts/test.sh                    everything (about 20 minutes on 2 cores, from a clean clone)
  scripts/test.sh lint               formatting and lints only
  scripts/test.sh scenarios e2e      the start-up scenarios and the exporter end to end
EOF
}

fail_fast=0
wanted=()
for arg in "$@"; do
    case $arg in
    -h | --help) usage; exit 0 ;;
    --fail-fast) fail_fast=1 ;;
    -*) echo "test.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *)
        ok=0
        for s in "${STAGES[@]}"; do [ "$s" = "$arg" ] && ok=1; done
        if [ "$ok" = 0 ]; then
            echo "test.sh: no stage '$arg' (stages: ${STAGES[*]})" >&2
            exit 2
        fi
        wanted+=("$arg")
        ;;
    esac
done
run=()
for s in "${STAGES[@]}"; do
    if [ ${#wanted[@]} = 0 ] || [[ " ${wanted[*]} " == *" $s "* ]]; then run+=("$s"); fi
done

# --- the tally ------------------------------------------------------------------------
stage=setup
passed=0
failed=()
declare -A stage_passed=() stage_failed=()

finish() {
    echo
    echo "==> summary"
    local s
    for s in setup "${run[@]}"; do
        [ -n "${stage_passed[$s]:-}${stage_failed[$s]:-}" ] || continue
        echo "  $s: ${stage_passed[$s]:-0} passed, ${stage_failed[$s]:-0} failed"
    done
    if ((${#failed[@]})); then
        echo "failed:"
        printf '  - %s\n' "${failed[@]}"
    fi
    echo "$passed passed, ${#failed[@]} failed"
    if ((${#failed[@]})); then exit 1; fi
    exit 0
}

# check NAME COMMAND...: runs one check and records it.
check() {
    local name=$1
    shift
    echo "==> $name"
    if "$@"; then
        passed=$((passed + 1))
        stage_passed[$stage]=$((${stage_passed[$stage]:-0} + 1))
        return 0
    fi
    echo "--- FAILED: $name" >&2
    failed+=("$stage: $name")
    stage_failed[$stage]=$((${stage_failed[$stage]:-0} + 1))
    [ "$fail_fast" = 1 ] && finish
    return 1
}

# --- setup ----------------------------------------------------------------------------
check "install what the stages need (scripts/install-deps.sh ${run[*]})" scripts/install-deps.sh "${run[@]}" ||
    finish
export VIGIL_PYTHON=$PWD/target/pyenv/bin/python
features=(--features vigil-interposer/fault-injection)

# The tests run the built binaries, the driver library and libvigil.so with its
# test-only hold/panic points, so build and test with the same features. Built once a
# run; nothing after it can run without it.
built=0
build() {
    [ "$built" = 1 ] && return 0
    check "cargo build (the tests run the binaries and the libraries)" \
        cargo build --workspace --quiet "${features[@]}" || finish
    built=1
    export VIGIL_SKIP_BUILD=1
}

# --- the stages -----------------------------------------------------------------------
scripts_parse() {
    local f rc=0
    for f in scripts/*.sh tests/*.sh deploy/helm/*.sh .ci/run; do bash -n "$f" || rc=1; done
    python3 - scripts/*.py tests/*.py deploy/*.py deploy/helm/*.py <<'PY' || rc=1
import ast, sys
for f in sys.argv[1:]:
    ast.parse(open(f).read(), f)
PY
    return $rc
}

stage_lint() {
    check "scripts parse (bash -n, Python syntax)" scripts_parse
    check "cargo fmt --check" cargo fmt --all -- --check
    check "cargo clippy" cargo clippy --workspace --all-targets --quiet "${features[@]}" -- -D warnings
    check "benchmarks compile" cargo bench --workspace --no-run --quiet
}

release_clean() {
    cargo build --quiet --release -p vigil-interposer || return 1
    if grep -qa -e VIGIL_FAULT -e VIGIL_TEST_HOLD target/release/libvigil.so; then
        echo "target/release/libvigil.so contains fault-injection code: a dev-dependency leaked the feature" >&2
        return 1
    fi
}

stage_unit() {
    build
    check "cargo test" cargo test --workspace "${features[@]}"
    check "a release libvigil.so carries no test-only fault points" release_clean
}

# Every scenario runs; each is one check.
scenario() {
    check "scenario: $*" env "$@"
}

stage_scenarios() {
    build
    echo "==> start-up scenarios (tests/run_comprehensive_tests.sh)"
    # Host-PID detection in the default mode (VIGIL_DETECT_MODE=parallel).
    scenario tests/run_comprehensive_tests.sh 8
    scenario VIGIL_SCENARIO_LAG=uniform:20ms..200ms tests/run_comprehensive_tests.sh 32
    scenario VIGIL_SCENARIO_KILL_HOLDER_MS=400 tests/run_comprehensive_tests.sh 8
    scenario VIGIL_SCENARIO_FOREIGN=1 tests/run_comprehensive_tests.sh 8
    scenario VIGIL_SCENARIO_PID_MODE=namespace tests/run_comprehensive_tests.sh 8
    scenario VIGIL_SCENARIO_PID_MODE=caller tests/run_comprehensive_tests.sh 8
    scenario VIGIL_SCENARIO_LIMIT=8g tests/run_comprehensive_tests.sh 8
    # K containers (region files that cannot see each other), everyone released at once.
    scenario VIGIL_SCENARIO_CONTAINERS=1 tests/run_comprehensive_tests.sh 8
    scenario VIGIL_SCENARIO_CONTAINERS=2 tests/run_comprehensive_tests.sh 8
    scenario VIGIL_SCENARIO_CONTAINERS=4 tests/run_comprehensive_tests.sh 8
    scenario VIGIL_SCENARIO_CONTAINERS=4 VIGIL_SCENARIO_SIM_LAG=default tests/run_comprehensive_tests.sh 16
    # The seed's serialized detection (VIGIL_DETECT_MODE=serial) keeps working.
    scenario VIGIL_DETECT_MODE=serial tests/run_comprehensive_tests.sh 8
    scenario VIGIL_DETECT_MODE=serial VIGIL_SCENARIO_KILL_HOLDER_MS=400 tests/run_comprehensive_tests.sh 8
    # 4 x 1 GiB racing for a 2 GiB limit: refusals are expected; the simulator's true
    # device peak must stay within the limit.
    scenario VIGIL_SCENARIO_LIMIT=2g VIGIL_SCENARIO_ALLOC=1GiB VIGIL_SCENARIO_EXPECT_REFUSALS=1 \
        tests/run_comprehensive_tests.sh 4
}

stage_e2e() {
    build
    check "exporter end to end with a real Prometheus (scripts/exporter-e2e.sh)" scripts/exporter-e2e.sh 8
}

stage_monitoring() {
    check "dashboards, alerts and manifests (scripts/check-monitoring.sh)" scripts/check-monitoring.sh
}

stage_images() {
    build
    check "images: build steps, staged images, vigil-install (deploy/images/check.sh)" deploy/images/check.sh
}

stage_reliability() {
    build
    # One SIGKILL at every fault point, in both detection modes.
    check "kill sweep (tests/kill_sweep.py, parallel mode)" python3 tests/kill_sweep.py --runs 1
    check "kill sweep (tests/kill_sweep.py, serial mode)" python3 tests/kill_sweep.py --runs 1 --mode serial
    # 10 rounds of 64 processes, 3 more in serial mode (--long for 200).
    check "random kills (tests/random_kills.py --rounds 10)" python3 tests/random_kills.py --rounds 10
    check "random kills, serial mode (tests/random_kills.py --rounds 3)" \
        env VIGIL_DETECT_MODE=serial python3 tests/random_kills.py --rounds 3
    # 30 s of workloads starting and dying, scraped every second.
    check "soak (tests/soak.py --seconds 30)" python3 tests/soak.py --seconds 30
}

stage_fuzz() {
    # Saved reproducers, then each target for 20 s.
    check "fuzzing (scripts/fuzz.sh 20)" scripts/fuzz.sh 20
}

for stage in "${run[@]}"; do
    echo
    echo "=== stage $stage"
    "stage_$stage"
done
finish
