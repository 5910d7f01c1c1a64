#!/usr/bin/env bash
# Renders the raw manifests under deploy/ from the chart deploy/helm/vigil with
# deploy/helm/raw.values.yaml (`helm template`, release "vigil", namespace
# vigil-system), one file per template, so that they cannot drift from the chart:
#
#   deploy/helm/render.sh           write them
#   deploy/helm/render.sh --check   exit 1, with a diff, if any is stale or missing
#
# Uses $HELM, else target/tools/helm (installed by scripts/install-helm.sh if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."

check=0
case ${1:-} in
--check) check=1 ;;
"") ;;
*) echo "usage: deploy/helm/render.sh [--check]" >&2; exit 2 ;;
esac

helm=${HELM:-target/tools/helm}
[ -x "$helm" ] || helm=$(scripts/install-helm.sh)

# template in the chart -> raw manifest
outputs=(
    namespace.yaml:deploy/daemonset/namespace.yaml
    exporter.yaml:deploy/daemonset/exporter.yaml
    networkpolicy.yaml:deploy/daemonset/networkpolicy.yaml
    servicemonitor.yaml:deploy/monitoring/servicemonitor.yaml
    podmonitor.yaml:deploy/monitoring/podmonitor.yaml
    prometheusrule.yaml:deploy/monitoring/prometheusrule.yaml
    installer.yaml:deploy/installer/installer.yaml
    sidecar-example.yaml:deploy/sidecar/workload.yaml
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stale=0
for pair in "${outputs[@]}"; do
    tpl=${pair%%:*}
    out=${pair#*:}
    {
        echo "# RENDERED from the Helm chart deploy/helm/vigil (templates/$tpl) with"
        echo "# deploy/helm/raw.values.yaml by deploy/helm/render.sh. Do not edit: change the"
        echo "# chart (or its values), then run deploy/helm/render.sh."
        timeout 120 "$helm" template vigil deploy/helm/vigil --namespace vigil-system \
            --values deploy/helm/raw.values.yaml --show-only "templates/$tpl"
    } >"$tmp/out"
    if [ "$check" = 1 ]; then
        if [ ! -f "$out" ]; then
            echo "$out does not exist: run deploy/helm/render.sh" >&2
            stale=1
        elif ! diff -u --label "$out (on disk)" --label "$out (rendered from the chart)" "$out" "$tmp/out" >&2; then
            echo "$out is stale: run deploy/helm/render.sh" >&2
            stale=1
        else
            echo "$out is up to date with the chart"
        fi
    else
        mkdir -p "$(dirname "$out")"
        if cmp -s "$tmp/out" "$out"; then
            echo "$out unchanged"
        else
            cp "$tmp/out" "$out"
            echo "wrote $out"
        fi
    fi
done
exit $stale
