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
set -eu
usage() { echo "usage: $0 exporter|libvigil ROOTFS" >&2; exit 2; }
[ $# -eq 2 ] || usage
what=$1
root=$2
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
    cargo build --release --locked -p vigil-interposer
    install -D -m 0644 "$target/release/libvigil.so" "$root/opt/vigil/lib/libvigil.so"
    strip_debug "$root/opt/vigil/lib/libvigil.so"
    install -D -m 0755 deploy/images/vigil-install "$root/opt/vigil/bin/vigil-install"
    ;;
*) usage ;;
esac
echo "build.sh: $what installed under $root"
