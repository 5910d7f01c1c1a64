#!/usr/bin/env bash
# Unpacks Debian 11's glibc 2.31 (packages libc6 and libc-bin; the glibc of Ubuntu 20.04,
# whose CUDA images are still common) into target/tools/glibc-2.31, so that
# deploy/images/check.sh can run a workload preloaded with libvigil.so under an older
# glibc than this machine's. Nothing is installed on the system: the tree is only used
# through its own loader (lib/<triple>/ld-2.31.so --library-path ...).
#
# Verified end to end: the suite's InRelease against Debian's archive keyring (gpgv),
# Packages.xz against the sha256 in InRelease, each .deb against the sha256 in Packages.
# Idempotent: a tree already unpacked (its .done marker) is kept.
#
# Usage: scripts/install-old-glibc.sh        prints the tree's root last
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bullseye
MIRROR=${VIGIL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
DEST=target/tools/glibc-2.31

case $(uname -m) in
x86_64) arch=amd64 ;;
aarch64) arch=arm64 ;;
*) echo "install-old-glibc.sh: no Debian $SUITE packages for $(uname -m)" >&2; exit 1 ;;
esac

if [ -f "$DEST/.done" ]; then
    echo "$DEST"
    exit 0
fi
for tool in curl gpgv xz dpkg-deb sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || { echo "install-old-glibc.sh: needs $tool" >&2; exit 1; }
done
[ -f "$KEYRING" ] || { echo "install-old-glibc.sh: $KEYRING missing (package debian-archive-keyring)" >&2; exit 1; }

tmp=$(mktemp -d /tmp/vigil-glibc.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
fetch() { curl -sSf --retry 3 --max-time 300 -o "$2" "$MIRROR/$1" || { echo "install-old-glibc.sh: cannot fetch $MIRROR/$1" >&2; exit 1; }; }

echo "==> Debian $SUITE's libc6 and libc-bin (glibc 2.31) into $DEST" >&2
fetch "dists/$SUITE/InRelease" "$tmp/InRelease"
gpgv --keyring "$KEYRING" --output "$tmp/Release" "$tmp/InRelease" 2>"$tmp/gpgv.log" ||
    { cat "$tmp/gpgv.log" >&2; echo "install-old-glibc.sh: $SUITE's InRelease is not signed by a Debian archive key" >&2; exit 1; }
index="main/binary-$arch/Packages.xz"
want=$(awk -v f="$index" '/^SHA256:/ {on=1; next} /^[A-Za-z]/ {on=0} on && $3 == f {print $1}' "$tmp/Release")
[ -n "$want" ] || { echo "install-old-glibc.sh: $index is not listed in $SUITE's Release" >&2; exit 1; }
fetch "dists/$SUITE/$index" "$tmp/Packages.xz"
[ "$(sha256sum "$tmp/Packages.xz" | cut -d' ' -f1)" = "$want" ] ||
    { echo "install-old-glibc.sh: $index does not match its sha256 in the signed Release" >&2; exit 1; }
xz -dc "$tmp/Packages.xz" >"$tmp/Packages"

rm -rf "$DEST"
mkdir -p "$DEST"
for pkg in libc6 libc-bin; do
    # The stanza of the package: its file and sha256.
    read -r file sum < <(awk -v p="$pkg" -v RS= '$0 ~ "^Package: " p "\n" {
        for (i = 1; i <= NF; i++) { if ($i == "Filename:") f = $(i + 1); if ($i == "SHA256:") s = $(i + 1) }
        print f, s; exit }' "$tmp/Packages")
    [ -n "${file:-}" ] && [ -n "${sum:-}" ] || { echo "install-old-glibc.sh: $pkg not found in $SUITE" >&2; exit 1; }
    fetch "$file" "$tmp/$pkg.deb"
    [ "$(sha256sum "$tmp/$pkg.deb" | cut -d' ' -f1)" = "$sum" ] ||
        { echo "install-old-glibc.sh: $file does not match its sha256 in $SUITE's Packages" >&2; exit 1; }
    dpkg-deb -x "$tmp/$pkg.deb" "$DEST"
    echo "    $file" >&2
done
touch "$DEST/.done"
echo "$DEST"
