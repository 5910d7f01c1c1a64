#!/usr/bin/env bash
# The whole test suite. Installs what the tests need, then runs lint and tests.
# Usage: scripts/test.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    echo "==> installing ${need_apt[*]}"
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt || true

# nvidia-ml-py, the unmodified NVML client the simulator is tested against.
venv=target/pyenv
if ! "$venv/bin/python" -c 'import pynvml' 2>/dev/null; then
    echo "==> installing nvidia-ml-py into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check nvidia-ml-py
fi
export VIGIL_PYTHON=$PWD/$venv/bin/python

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> benchmarks compile"
cargo bench --workspace --no-run --quiet
echo "==> cargo build (the tests run the binaries and the driver library)"
cargo build --workspace --quiet
echo "==> cargo test"
cargo test --workspace
