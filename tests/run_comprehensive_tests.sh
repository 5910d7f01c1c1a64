#!/usr/bin/env bash
# The design document's scenario: N workloads start at once under LD_PRELOAD=libvigil.so
# against the GPU simulator, each in its own PID namespace when unshare works. All are
# spawned first and released together through a barrier file (vigil-workload
# --wait-for); VIGIL_SCENARIO_CONTAINERS=K splits them across K region files.
# Usage: tests/run_comprehensive_tests.sh N     (see tests/comprehensive.py for
# VIGIL_DETECT_MODE and the VIGIL_SCENARIO_* variables). Prints PASS/FAIL lines and a
# final JSON line; exits non-zero on any FAIL.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 tests/comprehensive.py "$@"
