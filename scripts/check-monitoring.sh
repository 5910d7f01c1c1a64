#!/usr/bin/env bash
# Checks the monitoring assets: alert rules (promtool check + unit tests + conventions),
# the Helm chart deploy/helm/vigil (its rule template generated from alerts/ and up to
# date; helm lint --strict; helm template for every deploy/helm/tests/*.values.yaml, each
# rendering validated, its rules through promtool, and checked against what the values
# ask for; bad values rejected by values.schema.json; the raw manifests under deploy/
# rendered from it and up to date), every Kubernetes manifest under deploy/
# (kubernetes-validate against a pinned Kubernetes version; the monitoring.coreos.com
# CRDs against deploy/schemas/), the Grafana dashboards (lint), and every dashboard/alert
# PromQL expression against a live Prometheus fed synthetic data.
#
# Self-contained and idempotent: installs what it needs (Debian's `prometheus` package for
# promtool and prometheus, if promtool is missing; a Python venv in target/pyenv, reused
# when it exists, with kubernetes-validate and PyYAML; helm into target/tools/helm with
# scripts/install-helm.sh). Runs every check, then exits non-zero if any failed, naming
# them.
#
# Usage: scripts/check-monitoring.sh
#   K8S_VERSIONS="1.30.0 1.33.0"  Kubernetes versions to validate against (default 1.30.0)
#   VIGIL_CHECK_LIVE=0             skip the live-Prometheus expression check
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS=${K8S_VERSIONS:-1.30.0}
export PYTHONDONTWRITEBYTECODE=1
KUBERNETES_VALIDATE_VERSION=1.37.0
PYYAML_VERSION=6.0.2

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- tools -----------------------------------------------------------------------------
need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    echo "==> installing ${need_apt[*]} (apt-get)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

venv=target/pyenv
py=$venv/bin/python
if ! "$py" -c 'import sys' 2>/dev/null; then
    echo "==> creating $venv"
    python3 -m venv "$venv"
fi
if ! "$py" - <<PY 2>/dev/null
import importlib.metadata as m, yaml, kubernetes_validate
assert m.version("kubernetes-validate") == "$KUBERNETES_VALIDATE_VERSION"
PY
then
    echo "==> installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION and PyYAML into $venv"
    "$py" -m pip install -q --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "PyYAML>=$PYYAML_VERSION"
fi

# Pinned and sha256-checked; nothing is fetched when target/tools/helm is already right.
export HELM
HELM=$(scripts/install-helm.sh)

# --- checks ----------------------------------------------------------------------------
failed=()
check() {
    local name=$1
    shift
    echo
    echo "==> $name"
    if "$@"; then
        echo "--- ok: $name"
    else
        echo "--- FAILED: $name"
        failed+=("$name")
    fi
}

shopt -s nullglob
rules=(alerts/*.yml alerts/*.yaml)
tests=(alerts/tests/*.yml)
k8s_args=()
for v in $K8S_VERSIONS; do k8s_args+=(-k "$v"); done

check "promtool check rules" promtool check rules "${rules[@]}"
check "promtool test rules" promtool test rules "${tests[@]}"
check "alert conventions, runbooks, a firing and a quiet test per alert" "$py" alerts/lint.py
check "chart: PrometheusRule template, per-alert values and schema generated from alerts/ are up to date" \
    "$py" deploy/gen-prometheusrule.py --check
check "chart: gen-prometheusrule.py on synthetic rules (recording rules, ==, bool, {{ }}): renders them exactly, applies overrides" \
    "$py" deploy/helm/test-chart.py generator
check "chart: helm lint --strict (defaults and every deploy/helm/tests/*.values.yaml)" \
    "$py" deploy/helm/test-chart.py lint
for case in deploy/helm/tests/*.values.yaml; do
    check "chart: helm template with $case: validated, rules pass promtool, renders what the values ask" \
        "$py" deploy/helm/test-chart.py case "$case" "${k8s_args[@]}"
done
check "chart: bad values (deploy/helm/tests/bad/) rejected by values.schema.json with a clear message" \
    "$py" deploy/helm/test-chart.py bad
check "raw manifests under deploy/ rendered from the chart are up to date (deploy/helm/render.sh --check)" \
    deploy/helm/render.sh --check
check "Kubernetes manifests (Kubernetes $K8S_VERSIONS, monitoring.coreos.com/v1)" \
    "$py" deploy/validate-manifests.py "${k8s_args[@]}"
check "Grafana dashboards" "$py" dashboards/lint.py
if [ "${VIGIL_CHECK_LIVE:-1}" != 0 ]; then
    if command -v prometheus >/dev/null 2>&1; then
        report=$(mktemp)
        check "every dashboard and alert expression in a live Prometheus (synthetic data)" \
            "$py" tests/promql_exprs.py --self-test --output "$report"
        rm -f "$report"
    else
        echo
        echo "==> live expression check skipped: no prometheus binary"
    fi
fi

echo
if ((${#failed[@]})); then
    echo "check-monitoring: ${#failed[@]} check(s) FAILED:"
    printf '  - %s\n' "${failed[@]}"
    exit 1
fi
echo "check-monitoring: all checks passed"
