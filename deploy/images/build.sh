#!/bin/sh
# Builds one image's files and installs them under ROOTFS, laid out as in the image.
# The Dockerfiles' build stage runs this (then copies ROOTFS/ into the final image), and
# deploy/images/check.sh runs the same into a staging directory and checks the result.
#
# Usage: deploy/images/build.sh exporter|libvigil ROOTFS
#   exporter   ROOTFS/usr/local/bin/vigil-exporter
#   libvigil   ROOTFS/opt/vigil/lib/libvigil.so, ROOTFS/opt/vigil/bin/vigil-install
# Builds with `cargo build --release --locked` (CARGO_TARGET_DIR is honoured); debug
# information is stripped from the installed copies (symbols stay).
# libvigil.so is preloaded into workloads of any image, so it is linked against glibc
# 2.17 (CentOS 7, Ubuntu 18.04 and every later one) with zig, through cargo-zigbuild
# (deploy/images/build-requirements.txt; both on PATH). Linked against the build
# host's glibc it would refuse to load into workloads older than that glibc.
set -eu
usage() { echo "usage: $0 exporter|libvigil ROOTFS" >&2; exit 2; }
[ $# -eq 2 ] || usage
what=$1
root=$2
# The oldest glibc libvigil.so loads with (deploy/images/check.sh checks the result).
GLIBC_FLOOR=2.17
case $root in /*) ;; *) root=$PWD/$root ;; esac
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$PWD/$target ;; esac

strip_debug() {
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug "$1"
    else
        echo "build.sh: strip not found; $1 keeps its debug information" >&2
    fi
}

case $what in
exporter)
    cargo build --release --locked -p vigil-exporter
    install -D -m 0755 "$target/release/vigil-exporter" "$root/usr/local/bin/vigil-exporter"
    strip_debug "$root/usr/local/bin/vigil-exporter"
    ;;
libvigil)
    if ! command -v cargo-zigbuild >/dev/null 2>&1 || ! cargo-zigbuild --version >/dev/null 2>&1; then
        echo "build.sh: libvigil.so is linked for glibc $GLIBC_FLOOR with cargo-zigbuild, which is not on PATH;" >&2
        echo "  install it and zig: pip install --require-hashes -r deploy/images/build-requirements.txt" >&2
        echo "  (scripts/install-deps.sh images puts them in target/pyenv/bin)" >&2
        exit 1
    fi
    triple=$(uname -m)-unknown-linux-gnu
    cargo zigbuild --release --locked -p vigil-interposer --target "$triple.$GLIBC_FLOOR"
    install -D -m 0644 "$target/$triple/release/libvigil.so" "$root/opt/vigil/lib/libvigil.so"
    strip_debug "$root/opt/vigil/lib/libvigil.so"
    install -D -m 0755 deploy/images/vigil-install "$root/opt/vigil/bin/vigil-install"
    ;;
*) usage ;;
esac
echo "build.sh: $what installed under $root"
