#!/usr/bin/env bash
# The whole test suite. Installs what the tests need, then runs lint and tests.
# Usage: scripts/test.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
# interposer/tests/escape.rs builds its C fixtures with cc.
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    echo "==> installing ${need_apt[*]}"
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt || true

# nvidia-ml-py, the unmodified NVML client the simulator is tested against.
venv=target/pyenv
# PyYAML: tests/promql_exprs.py reads the alert rules.
if ! "$venv/bin/python" -c 'import pynvml, yaml' 2>/dev/null; then
    echo "==> installing nvidia-ml-py and PyYAML into $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check nvidia-ml-py pyyaml
fi
export VIGIL_PYTHON=$PWD/$venv/bin/python

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet --features vigil-interposer/fault-injection -- -D warnings
echo "==> benchmarks compile"
cargo bench --workspace --no-run --quiet
# The tests run the built binaries, the driver library and libvigil.so with its
# test-only hold/panic points, so build and test with the same features.
features=(--features vigil-interposer/fault-injection)
echo "==> cargo build (the tests run the binaries and the libraries)"
cargo build --workspace --quiet "${features[@]}"
echo "==> cargo test"
cargo test --workspace "${features[@]}"

echo "==> a release libvigil.so carries no test-only fault points"
cargo build --quiet --release -p vigil-interposer
if grep -qa -e VIGIL_FAULT -e VIGIL_TEST_HOLD target/release/libvigil.so; then
    echo "target/release/libvigil.so contains fault-injection code: a dev-dependency leaked the feature" >&2
    exit 1
fi

echo "==> start-up scenarios (tests/run_comprehensive_tests.sh)"
export VIGIL_SKIP_BUILD=1
# Every scenario runs; the section fails at its end if any did.
scenarios_passed=0
scenarios_failed=()
scenario() {
    echo "--- $*"
    if env "$@"; then
        scenarios_passed=$((scenarios_passed + 1))
    else
        scenarios_failed+=("$*")
    fi
}
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
# 4 x 1 GiB racing for a 2 GiB limit: refusals are expected; the simulator's true device
# peak must stay within the limit.
scenario VIGIL_SCENARIO_LIMIT=2g VIGIL_SCENARIO_ALLOC=1GiB VIGIL_SCENARIO_EXPECT_REFUSALS=1 \
    tests/run_comprehensive_tests.sh 4
echo "scenarios: $scenarios_passed passed, ${#scenarios_failed[@]} failed"
if ((${#scenarios_failed[@]})); then
    printf '  failed: %s\n' "${scenarios_failed[@]}" >&2
    exit 1
fi

echo "==> exporter end to end with a real Prometheus (scripts/exporter-e2e.sh)"
scripts/exporter-e2e.sh 8

echo "==> dashboards, alerts and manifests (scripts/check-monitoring.sh)"
scripts/check-monitoring.sh

echo "==> kill sweep (tests/kill_sweep.py: one SIGKILL at every fault point, both detection modes)"
python3 tests/kill_sweep.py --runs 1
python3 tests/kill_sweep.py --runs 1 --mode serial

echo "==> random kills (tests/random_kills.py: 10 rounds of 64 processes, 3 more in serial mode; --long for 200)"
python3 tests/random_kills.py --rounds 10
VIGIL_DETECT_MODE=serial python3 tests/random_kills.py --rounds 3

echo "==> fuzzing (scripts/fuzz.sh: saved reproducers, then each target for 20 s)"
scripts/fuzz.sh 20

echo "==> soak (tests/soak.py: 30 s of workloads starting and dying, scraped every second)"
python3 tests/soak.py --seconds 30
