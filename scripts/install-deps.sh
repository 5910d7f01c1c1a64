#!/usr/bin/env bash
# Installs what the test stages need, and only what is missing (idempotent: a second run
# installs nothing). scripts/test.sh calls it with the stages it is about to run.
#
# Usage: scripts/install-deps.sh [STAGE...]     (no STAGE: what every stage needs)
#   every stage  util-linux (unshare), gcc (interposer/tests/escape.rs builds C fixtures),
#                python3-venv; clippy and rustfmt; target/pyenv with nvidia-ml-py (the
#                unmodified NVML client the simulator is tested against) and PyYAML
#                (tests/promql_exprs.py reads the alert rules)
#   e2e, monitoring   Debian's prometheus package (prometheus + promtool); its system
#                service is stopped: the tests run their own instances on other ports
#   monitoring   helm (pinned, sha256-checked, into target/tools/helm) for the chart
#                checks: scripts/install-helm.sh says where it comes from
#   images       zig and cargo-zigbuild into target/pyenv (pinned with hashes in
#                deploy/images/build-requirements.txt): libvigil.so is linked for glibc 2.17;
#                Debian 11's glibc 2.31 unpacked into target/tools/glibc-2.31
#                (scripts/install-old-glibc.sh) to run it under an older glibc
#   fuzz         g++ (libfuzzer-sys compiles libFuzzer)
# scripts/check-monitoring.sh adds its pinned kubernetes-validate to target/pyenv itself.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
want() { # want STAGE: whether STAGE is among the arguments (or there are none)
    [ ${#stages[@]} = 0 ] && return 0
    local s
    for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}
stages=("$@")

need_apt=()
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
# The exporter's TLS test makes certificates with openssl and talks to it with curl.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
prometheus_new=0
if want e2e || want monitoring; then
    if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
        need_apt+=(prometheus)
        prometheus_new=1
    fi
fi
if want fuzz; then
    command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
fi
if ((${#need_apt[@]})); then
    echo "==> installing ${need_apt[*]} (apt-get)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ "$prometheus_new" = 1 ]; then
    # The package starts a system service; the tests run their own instances.
    (as_root systemctl stop prometheus || as_root service prometheus stop) >/dev/null 2>&1 || true
fi

if want monitoring; then
    scripts/install-helm.sh >/dev/null
fi

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt || true

venv=target/pyenv
if ! "$venv/bin/python" -c 'import pynvml, yaml' 2>/dev/null; then
    echo "==> installing nvidia-ml-py and PyYAML into $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check nvidia-ml-py pyyaml
fi

if want images; then
    # Debian 11's glibc 2.31, for running a preloaded workload under an older glibc.
    scripts/install-old-glibc.sh >/dev/null
    # zig and cargo-zigbuild, pinned with hashes: deploy/images/build.sh links
    # libvigil.so for glibc 2.17 with them.
    req=deploy/images/build-requirements.txt
    pins=$(sed -nE 's/^([a-z-]+)==([0-9.]+).*/\1 \2/p' "$req")
    if ! "$venv/bin/python" - "$pins" <<'PY' 2>/dev/null; then
import importlib.metadata as m, sys
pairs = sys.argv[1].split()
assert all(m.version(n) == v for n, v in zip(pairs[::2], pairs[1::2]))
PY
        echo "==> installing zig and cargo-zigbuild into $venv ($req)"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r "$req"
    fi
fi
