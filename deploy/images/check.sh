#!/usr/bin/env bash
# Checks the images without a container builder: runs the Dockerfiles' build step
# (deploy/images/build.sh) into staging root directories, lays each over a stand-in
# for its base image (busybox from Debian's busybox-static for libvigil; the host's
# glibc and libgcc_s, what distroless "cc" carries, for the exporter), and checks:
#   - the Dockerfiles stay in step with the scripts and the staged trees (COPY sources,
#     .dockerignore, build.sh calls, ENTRYPOINT, USER, EXPOSE, labels, versions);
#   - the exporter: links only what its base has, runs --help and serves /metrics from
#     the staged path as a non-root UID (under chroot);
#   - libvigil.so: loads as a preload library, has no test-only fault points, needs no
#     glibc newer than build.sh's floor (2.17), and enforces a memory limit under the
#     simulator (the debug simulator and workload: cargo build --workspace), on this
#     machine's glibc and on Debian 11's 2.31 (scripts/install-old-glibc.sh), where a
#     library linked against this machine's glibc is refused (control);
#   - vigil-install (under the image's busybox, in chroot): both routes (an emptyDir
#     for an init container; HAMi's host directory with its ld.so.preload), fresh
#     install, unchanged, updated, a process holding the old library keeps it, the
#     preload file edited idempotently, refusals with a clear message and status 1 and
#     no temporary file left (a full disk is a small tmpfs in a private mount namespace).
# Every check prints "ok" or "FAIL"; the last line is "N passed, N failed"; the exit
# status is non-zero if any failed. Needs root (chroot, unshare, mount); installs
# busybox-static with apt-get when busybox is missing.
# Usage: deploy/images/check.sh        (VIGIL_KEEP=1 keeps the work directory)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
repo=$PWD

if [ "$(id -u)" != 0 ]; then
    echo "check.sh: needs root (chroot, unshare --mount, mount -t tmpfs)" >&2
    exit 1
fi
if ! command -v busybox >/dev/null; then
    echo "check.sh: installing busybox-static (the libvigil image's shell)"
    timeout 300 apt-get install -y -qq busybox-static >/dev/null ||
        { timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq busybox-static >/dev/null; } ||
        { echo "check.sh: cannot install busybox-static" >&2; exit 1; }
fi

work=$(mktemp -d /tmp/vigil-images.XXXXXX)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    if [ "${VIGIL_KEEP:-}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

passed=0
failed=()
# t NAME COMMAND...: one check.
t() {
    local name=$1
    shift
    if "$@" >"$work/out" 2>&1; then
        echo "ok   - $name"
        passed=$((passed + 1))
    else
        echo "FAIL - $name"
        sed 's/^/       /' "$work/out"
        failed+=("$name")
    fi
}
# expect_out FILE REGEX: FILE has a line matching REGEX (extended), else say so.
expect_out() {
    grep -qE -- "$2" "$1" && return 0
    echo "expected a line matching /$2/ in:"
    cat "$1"
    return 1
}

t "vigil-install parses as POSIX sh (dash -n, busybox sh -n)" \
    sh -c 'dash -n deploy/images/vigil-install && busybox sh -n deploy/images/vigil-install'

# --- the build step, into staging trees ---------------------------------------------------
ex_stage=$work/stage/exporter
lib_stage=$work/stage/libvigil
# build.sh links libvigil.so with zig through cargo-zigbuild, which scripts/install-deps.sh
# (stage images) puts in target/pyenv/bin.
export PATH=$repo/target/pyenv/bin:$PATH
echo "==> deploy/images/build.sh exporter|libvigil (cargo build --release --locked; cargo zigbuild)"
t "build.sh exporter stages usr/local/bin/vigil-exporter" \
    bash -c "deploy/images/build.sh exporter '$ex_stage' && test -x '$ex_stage/usr/local/bin/vigil-exporter'"
t "build.sh libvigil stages opt/vigil/lib/libvigil.so and opt/vigil/bin/vigil-install" \
    bash -c "deploy/images/build.sh libvigil '$lib_stage' && test -f '$lib_stage/opt/vigil/lib/libvigil.so' && test -x '$lib_stage/opt/vigil/bin/vigil-install'"

# --- the Dockerfiles against the scripts and the staged trees ------------------------------
dockerfile_sync() {
    # $1: the directory of the Dockerfiles (default deploy/images)
    python3 - "$repo" "$ex_stage" "$lib_stage" "${1:-$repo/deploy/images}" <<'PY'
import fnmatch, json, os, re, sys

repo, ex_stage, lib_stage, dfdir = sys.argv[1:5]
errors = []
def err(msg): errors.append(msg)

def parse(path):
    """Instructions (KEYWORD, rest) with continuations joined and comments dropped."""
    out, cur = [], ""
    for raw in open(path):
        line = raw.rstrip("\n")
        if not cur and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            kw, _, rest = cur.strip().partition(" ")
            out.append((kw.upper(), rest.strip()))
        cur = ""
    return out

ignore = []
for line in open(os.path.join(repo, ".dockerignore")):
    line = line.strip()
    if line and not line.startswith("#"):
        ignore.append(line.rstrip("/"))
def ignored(rel):
    parts = rel.split("/")
    for pat in ignore:
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pat[3:])):
                return True
    return False

cargo = open(os.path.join(repo, "Cargo.toml")).read()
ws_version = re.search(r'^\[workspace\.package\][^\[]*?^version = "([^"]+)"', cargo, re.M | re.S).group(1)
ws_license = re.search(r'^\[workspace\.package\][^\[]*?^license = "([^"]+)"', cargo, re.M | re.S).group(1)
lib_rs = open(os.path.join(repo, "exporter/src/lib.rs")).read()
default_port = re.search(r'DEFAULT_LISTEN: &str = ":(\d+)"', lib_rs).group(1)

# What the build context must keep: the workspace's manifests and sources, and the scripts.
for rel in ["Cargo.toml", "Cargo.lock", "deploy/images/build.sh", "deploy/images/vigil-install",
            "exporter/src/main.rs", "interposer/src/lib.rs"]:
    if ignored(rel):
        err(f".dockerignore excludes {rel}, which the image build needs")
members = re.search(r'members = \[([^\]]*)\]', cargo).group(1)
for m in re.findall(r'"([^"]+)"', members):
    if ignored(m + "/Cargo.toml"):
        err(f".dockerignore excludes workspace member {m}")
for rel in ["target/release/libvigil.so", ".git/HEAD"]:
    if not ignored(rel):
        err(f".dockerignore lets {rel} into the build context")

images = {
    "exporter.Dockerfile": dict(what="exporter", stage=ex_stage, entry="/usr/local/bin/vigil-exporter",
                                title="vigil-exporter", expose=default_port),
    "libvigil.Dockerfile": dict(what="libvigil", stage=lib_stage, entry="/opt/vigil/bin/vigil-install",
                                title="libvigil", expose=None,
                                files=["/opt/vigil/lib/libvigil.so", "/opt/vigil/bin/vigil-install"]),
}
for df, want in images.items():
    path = os.path.join(dfdir, df)
    ins = parse(path)
    stages = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    if len(stages) != 2:
        err(f"{df}: expected 2 stages (build, runtime), found {len(stages)}")
        continue
    build, final = ins[stages[0]:stages[1]], ins[stages[1]:]
    if not re.search(r"\bAS build$", ins[stages[0]][1]):
        err(f"{df}: the first stage is not named 'build'")
    # Sources copied from the context exist and are not excluded.
    for k, rest in ins:
        if k in ("COPY", "ADD") and "--from=" not in rest:
            args = [a for a in rest.split() if not a.startswith("--")]
            for src in args[:-1]:
                if src in (".", "./"):
                    continue
                if not os.path.exists(os.path.join(repo, src)):
                    err(f"{df}: {k} source {src} does not exist")
                elif ignored(src.rstrip("/")):
                    err(f"{df}: {k} source {src} is excluded by .dockerignore")
    # The build stage runs build.sh for this image into /rootfs; the runtime copies it.
    runs = " ".join(r for k, r in build if k == "RUN")
    if not re.search(rf"deploy/images/build\.sh {want['what']} /rootfs\b", runs):
        err(f"{df}: the build stage does not run 'deploy/images/build.sh {want['what']} /rootfs'")
    for script in re.findall(r"(deploy/images/[\w.-]+)", runs):
        p = os.path.join(repo, script)
        if not (os.path.isfile(p) and os.access(p, os.X_OK)):
            err(f"{df}: RUN calls {script}, which is missing or not executable")
    if ("COPY", "--from=build /rootfs/ /") not in final:
        err(f"{df}: the runtime stage does not COPY --from=build /rootfs/ /")
    # ENTRYPOINT: exec form, and the staged tree has it, executable.
    entries = [r for k, r in final if k == "ENTRYPOINT"]
    if len(entries) != 1:
        err(f"{df}: expected one ENTRYPOINT, found {len(entries)}")
    else:
        try:
            entry = json.loads(entries[0])
        except ValueError:
            entry = None
        if not isinstance(entry, list) or not entry:
            err(f"{df}: ENTRYPOINT is not in exec (JSON) form: {entries[0]}")
        else:
            if entry[0] != want["entry"]:
                err(f"{df}: ENTRYPOINT runs {entry[0]}, expected {want['entry']}")
            staged = want["stage"] + entry[0]
            if not (os.path.isfile(staged) and os.access(staged, os.X_OK)):
                err(f"{df}: ENTRYPOINT {entry[0]} is not an executable file in the staged tree {want['stage']}")
    for f in want.get("files", []):
        if not os.path.isfile(want["stage"] + f):
            err(f"{df}: the staged tree lacks {f} (the Helm chart and manifests use it)")
    # USER: numeric and not root, so that runAsNonRoot can verify it.
    users = [r for k, r in final if k == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]):
        err(f"{df}: the runtime stage's USER must be a numeric non-root UID:GID, is {users[-1] if users else 'unset'}")
    exposes = [r for k, r in final if k == "EXPOSE"]
    if want["expose"] is not None and exposes != [want["expose"]]:
        err(f"{df}: EXPOSE {exposes} is not the exporter's default port {want['expose']} (exporter/src/lib.rs)")
    # Labels and the default version.
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', " ".join(r for k, r in final if k == "LABEL")))
    for key in ["title", "description", "version", "revision", "licenses", "source"]:
        if f"org.opencontainers.image.{key}" not in labels:
            err(f"{df}: no org.opencontainers.image.{key} label")
    if labels.get("org.opencontainers.image.title") != want["title"]:
        err(f"{df}: title label {labels.get('org.opencontainers.image.title')!r}, expected {want['title']!r}")
    if labels.get("org.opencontainers.image.licenses") != ws_license:
        err(f"{df}: licenses label is not the workspace's {ws_license}")
    versions = [r for k, r in final if k == "ARG" and r.startswith("VERSION=")]
    if versions != [f"VERSION={ws_version}"]:
        err(f"{df}: ARG VERSION default {versions} is not the workspace version {ws_version}")

# The manifests reference both images at the workspace version.
for root, _, files in os.walk(os.path.join(repo, "deploy")):
    if "/helm" in root:
        continue
    for f in files:
        if f.endswith((".yaml", ".yml")):
            p = os.path.join(root, f)
            for img, tag in re.findall(r"ghcr\.io/vigil/(vigil-exporter|libvigil):([\w.-]+)", open(p).read()):
                if tag != ws_version:
                    err(f"{os.path.relpath(p, repo)}: {img}:{tag} is not the workspace version {ws_version}")

for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY
}
echo "==> the Dockerfiles against the scripts and the staged trees"
t "Dockerfiles in step with build.sh, .dockerignore, the staged trees and the manifests" dockerfile_sync

# A Dockerfile mistake must be caught: a broken copy of one fails the check above.
dockerfile_sync_catches() {
    local broken=$work/broken-dockerfiles rc=0
    mkdir -p "$broken" && cp deploy/images/*.Dockerfile "$broken/" || return 1
    sed -i 's|^ENTRYPOINT .*|ENTRYPOINT ["/usr/bin/vigil-exporter"]|; s|^USER .*|USER nobody|' "$broken/exporter.Dockerfile"
    dockerfile_sync "$broken" >"$work/sync.out" 2>&1 && rc=1
    grep -q 'ENTRYPOINT runs /usr/bin/vigil-exporter' "$work/sync.out" || rc=1
    grep -q "USER must be a numeric non-root" "$work/sync.out" || rc=1
    cat "$work/sync.out"
    return $rc
}
t "the Dockerfile check fails on a wrong ENTRYPOINT and a named USER" dockerfile_sync_catches

# --- the exporter image ---------------------------------------------------------------------------
ex_root=$work/root/exporter
exporter_links_base_only() {
    # distroless/cc-debian12 carries glibc and libgcc_s; nothing else may be needed.
    ldd "$ex_stage/usr/local/bin/vigil-exporter" | tee "$work/ldd" || return 1
    local bad
    bad=$(awk '{print $1}' "$work/ldd" | grep -vE '^(linux-vdso\.so\.1|/lib64/ld-linux-x86-64\.so\.2|/lib/ld-linux-aarch64\.so\.1|lib(c|m|dl|rt|pthread|gcc_s)\.so\.[0-9]+)$')
    [ -z "$bad" ] || { echo "needs libraries the runtime image lacks: $bad"; return 1; }
}
make_exporter_root() {
    # The stand-in for the runtime base: the loader and the libraries ldd names, and
    # /etc/passwd with nobody; then the staged tree, as COPY --from=build /rootfs/ / does.
    mkdir -p "$ex_root/etc" "$ex_root/tmp" "$ex_root/regions" "$ex_root/dev" || return 1
    mknod -m 0666 "$ex_root/dev/null" c 1 3 || return 1
    local lib
    for lib in $(ldd "$ex_stage/usr/local/bin/vigil-exporter" | grep -oE '/[^ ]+'); do
        mkdir -p "$ex_root$(dirname "$lib")" && cp -L "$lib" "$ex_root$lib" || return 1
    done
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' >"$ex_root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$ex_root/etc/group"
    cp -a "$ex_stage/." "$ex_root/"
}
image_user() { # the USER of a Dockerfile's last stage
    awk '$1 == "USER" {u = $2} END {print u}' "deploy/images/$1"
}
image_entry() { # the ENTRYPOINT's program
    awk '$1 == "ENTRYPOINT" {e = $2} END {print e}' "deploy/images/$1" | tr -d '[]"'
}
exporter_help() {
    chroot --userspec="$(image_user exporter.Dockerfile)" "$ex_root" "$(image_entry exporter.Dockerfile)" --help >"$work/help" 2>&1
    local rc=$?
    cat "$work/help"
    [ $rc = 0 ] && expect_out "$work/help" 'web\.listen-address'
}
exporter_serves() {
    local port=$((20000 + RANDOM % 20000)) pid
    chroot --userspec="$(image_user exporter.Dockerfile)" "$ex_root" "$(image_entry exporter.Dockerfile)" \
        --regions-dir=/regions --web.listen-address="127.0.0.1:$port" >"$work/exporter.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do
        curl -fsS "http://127.0.0.1:$port/metrics" >"$work/metrics" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    local uid
    uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    cat "$work/exporter.log"
    expect_out "$work/metrics" '^vigil_exporter_build_info\{' || return 1
    expect_out "$work/metrics" '^vigil_exporter_regions' || return 1
    [ "$uid" = 65534 ] || { echo "the exporter ran as UID '$uid', not 65534"; return 1; }
    echo "served /metrics on 127.0.0.1:$port as UID $uid"
}
echo "==> the exporter image (staged tree over a stand-in for distroless/cc)"
t "the exporter links only glibc and libgcc_s (what distroless/cc-debian12 has)" exporter_links_base_only
t "the exporter's runtime root assembles" make_exporter_root
t "the ENTRYPOINT runs --help as the image's USER" exporter_help
t "the ENTRYPOINT serves /metrics as UID 65534" exporter_serves

# --- the libvigil image ------------------------------------------------------------------------------
lib_root=$work/root/libvigil
make_libvigil_root() {
    # The stand-in for busybox: a static busybox with its applets as symlinks.
    mkdir -p "$lib_root/bin" "$lib_root/tmp" "$lib_root/etc" "$lib_root/dev" || return 1
    mknod -m 0666 "$lib_root/dev/null" c 1 3 || return 1   # a container always has it
    chmod 1777 "$lib_root/tmp"
    cp "$(command -v busybox)" "$lib_root/bin/busybox" || return 1
    local a
    for a in $(busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$lib_root/bin/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$lib_root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$lib_root/etc/group"
    cp -a "$lib_stage/." "$lib_root/"
}
lib=$lib_stage/opt/vigil/lib/libvigil.so
libvigil_preloads() {
    LD_PRELOAD=$lib cat /proc/self/maps >"$work/maps" 2>"$work/preload.err"
    cat "$work/preload.err"
    expect_out "$work/maps" 'libvigil\.so$' || return 1
    ! grep -q 'ERROR: ld.so' "$work/preload.err"
}
libvigil_clean() {
    if grep -qa -e VIGIL_FAULT -e VIGIL_TEST_HOLD "$lib"; then
        echo "$lib contains test-only fault points"
        return 1
    fi
}
glibc_floor=$(sed -n 's/^GLIBC_FLOOR=//p' deploy/images/build.sh)
libvigil_glibc_floor() {
    local newest
    newest=$(objdump -T "$lib" | grep -oE 'GLIBC_[0-9]+(\.[0-9]+)*' | sed 's/^GLIBC_//' | sort -uV | tail -1)
    echo "the newest glibc symbol version it needs: $newest (build.sh's floor: $glibc_floor)"
    [ -n "$newest" ] && [ -n "$glibc_floor" ] &&
        [ "$(printf '%s\n%s\n' "$newest" "$glibc_floor" | sort -V | tail -1)" = "$glibc_floor" ]
}
# The zig-linked library does its job: a CUDA workload under the simulator, preloaded
# with it, gets an allocation within its limit and is refused one over it.
libvigil_enforces() {
    local d=$work/sim bin=$repo/target/debug rc
    if [ ! -x "$bin/vigil-gpusim" ] || [ ! -x "$bin/vigil-workload" ]; then
        echo "needs the debug simulator and workload (cargo build --workspace)"
        return 1
    fi
    mkdir -p "$d"
    "$bin/vigil-gpusim" install-libs "$d/lib" >/dev/null || return 1
    "$bin/vigil-gpusim" --socket "$d/gpu.sock" --devices 1 --memory 8GiB >"$d/sim.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do [ -S "$d/gpu.sock" ] && break; sleep 0.05; done
    work_load() { # work_load ALLOC: one workload, preloaded, limited to 2 GiB
        env VIGIL_GPUSIM_SOCKET="$d/gpu.sock" LD_LIBRARY_PATH="$d/lib" LD_PRELOAD="$lib" \
            CUDA_DEVICE_MEMORY_SHARED_CACHE="$d/r.cache" CUDA_DEVICE_MEMORY_LIMIT=2g \
            timeout 60 "$bin/vigil-workload" --alloc "$1" >"$d/w.log" 2>&1
    }
    work_load 256MiB || { echo "256 MiB under a 2 GiB limit failed:"; cat "$d/w.log"; return 1; }
    work_load 4GiB
    rc=$?
    cat "$d/w.log"
    [ "$rc" = 3 ] || { echo "4 GiB under a 2 GiB limit: exit $rc, expected 3 (refused)"; return 1; }
    expect_out "$d/w.log" 'refused: .*CUDA_DEVICE_MEMORY_LIMIT'
}
echo "==> the libvigil image (staged tree over busybox)"
t "the libvigil runtime root assembles (busybox + staged tree)" make_libvigil_root
t "the staged libvigil.so loads as a preload library" libvigil_preloads
t "the staged libvigil.so has no test-only fault points" libvigil_clean
t "the staged libvigil.so loads with glibc $glibc_floor (no newer symbol version)" libvigil_glibc_floor
t "the staged libvigil.so enforces a memory limit (simulator, LD_PRELOAD)" libvigil_enforces

# Under an older glibc than this machine's: Debian 11's 2.31 (Ubuntu 20.04's), unpacked by
# scripts/install-old-glibc.sh and used through its own loader. The workload and the
# simulator's driver are linked for 2.17 too (test fixtures), so that every object in the
# process runs on 2.31.
old_root=
old_glibc_ready() {
    old_root=$(scripts/install-old-glibc.sh | tail -1) || return 1
    old_root=$repo/$old_root
    [ -x "$old_root/lib/$(uname -m)-linux-gnu/ld-2.31.so" ] || { echo "no ld-2.31.so under $old_root"; return 1; }
    cargo zigbuild --quiet --release --locked -p vigil-gpusim-driver -p vigil-gpusim \
        --target "$(uname -m)-unknown-linux-gnu.$glibc_floor"
}
# old_run PRELOAD ARGS...: vigil-workload ARGS under glibc 2.31 with PRELOAD preloaded,
# every symbol bound at load (LD_BIND_NOW), against the simulator of libvigil_enforces.
old_run() {
    local pre=$1 d=$work/sim z=$repo/target/$(uname -m)-unknown-linux-gnu/release
    local libdir=$old_root/lib/$(uname -m)-linux-gnu
    shift
    [ -S "$d/gpu.sock" ] || { echo "no simulator at $d/gpu.sock (libvigil_enforces starts it)"; return 1; }
    mkdir -p "$d/oldlib"
    "$repo/target/debug/vigil-gpusim" install-libs --driver "$z/libvigil_gpusim_driver.so" "$d/oldlib" >/dev/null || return 1
    env VIGIL_GPUSIM_SOCKET="$d/gpu.sock" CUDA_DEVICE_MEMORY_SHARED_CACHE="$d/old.cache" \
        CUDA_DEVICE_MEMORY_LIMIT=2g LD_BIND_NOW=1 \
        timeout 60 "$libdir/ld-2.31.so" --library-path "$libdir:$d/oldlib" --preload "$pre" \
        "$z/vigil-workload" "$@" >"$d/old.log" 2>&1
}
libvigil_on_old_glibc() {
    local rc api
    old_run "$lib" --alloc 256MiB || { echo "256 MiB under a 2 GiB limit failed on glibc 2.31:"; cat "$work/sim/old.log"; return 1; }
    expect_out "$work/sim/old.log" '^ready .*total=2147483648 ' || return 1
    # Both ways the CUDA runtime resolves entry points: cuGetProcAddress, and dlsym
    # (through Vigil's dlsym trampoline, which on 2.31 fronts libdl's).
    for api in procaddress dlsym; do
        old_run "$lib" --api "$api" --alloc 4GiB
        rc=$?
        cat "$work/sim/old.log"
        [ "$rc" = 3 ] || { echo "4 GiB under a 2 GiB limit (--api $api): exit $rc, expected 3 (refused)"; return 1; }
        expect_out "$work/sim/old.log" 'refused: .*CUDA_DEVICE_MEMORY_LIMIT' || return 1
    done
}
# Control: linked against this machine's glibc (as the debug build is), the library
# asks for newer symbol versions than 2.31 has, and the loader refuses it.
host_linked_refused_on_old_glibc() {
    if old_run "$repo/target/debug/libvigil.so" --alloc 256MiB; then
        echo "the host-linked debug libvigil.so loaded under glibc 2.31:"
        cat "$work/sim/old.log"
        return 1
    fi
    cat "$work/sim/old.log"
    expect_out "$work/sim/old.log" "version .GLIBC_2\.3[2-9]. not found"
}
echo "==> libvigil.so under glibc 2.31 (Debian 11, as in Ubuntu 20.04 images)"
t "Debian 11's glibc 2.31 unpacked (signature and hashes checked); workload and driver linked for $glibc_floor" old_glibc_ready
t "the staged libvigil.so enforces the limit under glibc 2.31 (cuGetProcAddress and dlsym)" libvigil_on_old_glibc
t "control: a libvigil.so linked against this machine's glibc is refused by 2.31" host_linked_refused_on_old_glibc

# inst USER ARGS...: runs the image's installer in the image root (chroot) as USER.
inst() {
    local user=$1
    shift
    chroot --userspec="$user" "$lib_root" /opt/vigil/bin/vigil-install "$@"
}
nobody=$(image_user libvigil.Dockerfile)
sha() { sha256sum <"$1" | cut -d' ' -f1; }
no_temp_in() { # DIR: no temporary file of the installer left behind
    local left
    left=$(find "$1" -maxdepth 1 -name '.*.??????' 2>/dev/null)
    [ -z "$left" ] || { echo "temporary files left behind: $left"; return 1; }
}
# run_expect STATUS REGEX COMMAND...: the command exits with STATUS and prints REGEX.
run_expect() {
    local want=$1 re=$2 rc=0
    shift 2
    "$@" >"$work/run.out" 2>&1 || rc=$?
    cat "$work/run.out"
    [ "$rc" = "$want" ] || { echo "exit status $rc, expected $want"; return 1; }
    expect_out "$work/run.out" "$re"
}

# Route (b): an init container copies into an emptyDir (mode 0777, as the kubelet makes
# it) that the workload mounts and preloads.
route_emptydir() {
    local d=$lib_root/vigil/lib
    mkdir -p "$d" && chmod 0777 "$d" || return 1
    run_expect 0 '^vigil-install: installed /vigil/lib/libvigil.so \(sha256 [0-9a-f]{64}\)$' inst "$nobody" /vigil/lib || return 1
    [ "$(sha "$d/libvigil.so")" = "$(sha "$lib")" ] || { echo "the installed copy differs from the image's"; return 1; }
    [ "$(stat -c %a "$d/libvigil.so")" = 644 ] || { echo "mode $(stat -c %a "$d/libvigil.so"), expected 644"; return 1; }
    run_expect 0 '^vigil-install: unchanged /vigil/lib/libvigil.so ' inst "$nobody" /vigil/lib || return 1
    LD_PRELOAD=$d/libvigil.so cat /proc/self/maps | grep -q "$d/libvigil.so" || { echo "the installed copy does not preload"; return 1; }
    no_temp_in "$d"
}
route_emptydir_created() {
    # DEST_DIR is created when missing; --dry-run changes nothing.
    run_expect 0 'dry run, nothing changed; would be: installed /tmp/new/lib/libvigil.so' inst "$nobody" --dry-run /tmp/new/lib || return 1
    [ ! -e "$lib_root/tmp/new" ] || { echo "--dry-run created /tmp/new"; return 1; }
    run_expect 0 '^vigil-install: installed /tmp/new/lib/libvigil.so ' inst "$nobody" /tmp/new/lib
}
# A new image's library: the staged one with one more byte (still a loadable ELF).
cp "$lib" "$work/libvigil-v2.so" && printf '\n' >>"$work/libvigil-v2.so"
mkdir -p "$lib_root/src" && cp "$work/libvigil-v2.so" "$lib_root/src/libvigil-v2.so"
# hold_mapping FILE READY: maps FILE, writes READY, then on SIGUSR1 says whether the
# mapped bytes are still those it mapped (exit 0) or changed (exit 3).
hold_mapping() {
    # exec: the background job's PID is then python's, which gets the signal.
    exec python3 - "$1" "$2" <<'PY'
import hashlib, mmap, os, signal, sys, time
path, ready = sys.argv[1:3]
f = open(path, "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
before = hashlib.sha256(m[:]).hexdigest()
ino = os.fstat(f.fileno()).st_ino
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
open(ready, "w").write(str(ino))
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
try:
    after = hashlib.sha256(m[:]).hexdigest()
except Exception as e:  # SIGBUS on a truncated file kills us before this
    print("mapping unreadable:", e); sys.exit(4)
print(f"inode {ino}: mapped bytes {'unchanged' if after == before else 'CHANGED'}")
sys.exit(0 if after == before else 3)
PY
}
start_holder() { # FILE: starts hold_mapping in the background, waits until it mapped
    rm -f "$work/ready"
    hold_mapping "$1" "$work/ready" >"$work/holder.out" 2>&1 &
    holder=$!
    pids+=("$holder")
    for _ in $(seq 100); do [ -s "$work/ready" ] && return 0; sleep 0.05; done
    echo "the mapping holder did not start"; return 1
}
stop_holder() { # prints the holder's verdict, returns its status
    kill -USR1 "$holder"
    wait "$holder"
    local rc=$?
    cat "$work/holder.out"
    return $rc
}
route_emptydir_update() {
    local d=$lib_root/vigil/lib sleeper
    # A process that preloaded the old library, and one that maps it and compares.
    LD_PRELOAD=$d/libvigil.so sleep 30 &
    sleeper=$!
    pids+=("$sleeper")
    start_holder "$d/libvigil.so" || return 1
    local old_ino
    old_ino=$(stat -c %i "$d/libvigil.so")
    run_expect 0 '^vigil-install: updated /vigil/lib/libvigil.so ' inst "$nobody" --source /src/libvigil-v2.so /vigil/lib || return 1
    [ "$(sha "$d/libvigil.so")" = "$(sha "$work/libvigil-v2.so")" ] || { echo "not the new library"; return 1; }
    [ "$(stat -c %i "$d/libvigil.so")" != "$old_ino" ] || { echo "updated in place (same inode $old_ino): running processes would see it change"; return 1; }
    stop_holder || return 1
    kill -0 "$sleeper" || { echo "the process that preloaded the old library died"; return 1; }
    grep "libvigil.so" "/proc/$sleeper/maps" | head -1
    grep -q "libvigil.so (deleted)" "/proc/$sleeper/maps" || { echo "the old process does not map the old (replaced) inode"; return 1; }
    kill "$sleeper"
    run_expect 0 '^vigil-install: unchanged ' inst "$nobody" --source /src/libvigil-v2.so /vigil/lib || return 1
    no_temp_in "$d"
}
# The same holder sees an in-place overwrite (what `cp` onto the old file does): the
# check above can fail.
holder_catches_in_place_copy() {
    local f=$work/inplace.so
    cp "$lib" "$f"
    start_holder "$f" || return 1
    head -c "$(stat -c %s "$f")" /dev/urandom >"$work/other.so"
    cp "$work/other.so" "$f"
    local rc=0
    stop_holder || rc=$?
    [ "$rc" = 3 ] || { echo "the holder exited $rc, expected 3 (mapped bytes changed)"; return 1; }
    echo "(expected) the holder saw the in-place overwrite"
}
echo "==> vigil-install, route (b): init container into an emptyDir (as UID 65534, under busybox)"
t "fresh install, then unchanged; the copy preloads" route_emptydir
t "DEST_DIR created when missing; --dry-run changes nothing" route_emptydir_created
t "updated by rename: a process holding the old library keeps it" route_emptydir_update
t "the holding check detects an in-place overwrite (control)" holder_catches_in_place_copy

# Route (a): HAMi's host directory (hostPath /usr/local/vgpu), as HAMi's device plugin
# leaves it: libvgpu.so.<version> (the file it mounts at /usr/local/vgpu/libvgpu.so in
# every container) and ld.so.preload naming /usr/local/vgpu/libvgpu.so.
hami=$work/hami-host
in_hami() { # runs the installer as root with $hami bind-mounted at the image's /usr/local/vgpu
    unshare --mount bash -c '
        mkdir -p "$1/usr/local/vgpu" && mount --bind "$2" "$1/usr/local/vgpu" || exit 9
        shift 2
        chroot "$0" /opt/vigil/bin/vigil-install "$@"' "$lib_root" "$lib_root" "$hami" "$@"
}
route_hami() {
    mkdir -p "$hami/containers/uid_ctr" || return 1
    printf 'hami-core stand-in\n' >"$hami/libvgpu.so.v2.6.0"
    printf '/usr/local/vgpu/libvgpu.so\n' >"$hami/ld.so.preload"
    local preload_before
    preload_before=$(sha "$hami/ld.so.preload")
    run_expect 0 '^vigil-install: updated /usr/local/vgpu/libvgpu.so.v2.6.0 \(sha256 [0-9a-f]{64}\); preload /usr/local/vgpu/ld.so.preload: already lists /usr/local/vgpu/libvgpu.so$' \
        in_hami --name libvgpu.so.v2.6.0 --preload /usr/local/vgpu/ld.so.preload --lib-path /usr/local/vgpu/libvgpu.so /usr/local/vgpu || return 1
    [ "$(sha "$hami/libvgpu.so.v2.6.0")" = "$(sha "$lib")" ] || { echo "libvgpu.so.v2.6.0 is not libvigil.so"; return 1; }
    [ "$(sha "$hami/ld.so.preload")" = "$preload_before" ] || { echo "ld.so.preload changed"; return 1; }
    run_expect 0 '^vigil-install: unchanged /usr/local/vgpu/libvgpu.so.v2.6.0 ' \
        in_hami --name libvgpu.so.v2.6.0 --preload /usr/local/vgpu/ld.so.preload --lib-path /usr/local/vgpu/libvgpu.so /usr/local/vgpu || return 1
    [ -d "$hami/containers/uid_ctr" ] || { echo "containers/ was touched"; return 1; }
    # A node where HAMi's copy never ran: the preload file is created.
    rm -f "$hami/ld.so.preload"
    run_expect 0 'preload /usr/local/vgpu/ld.so.preload: added /usr/local/vgpu/libvgpu.so$' \
        in_hami --name libvgpu.so.v2.6.0 --preload /usr/local/vgpu/ld.so.preload --lib-path /usr/local/vgpu/libvgpu.so /usr/local/vgpu || return 1
    [ "$(cat "$hami/ld.so.preload")" = /usr/local/vgpu/libvgpu.so ] || { echo "ld.so.preload: $(cat "$hami/ld.so.preload")"; return 1; }
    no_temp_in "$hami"
}
preload_editing() {
    local p=$lib_root/tmp/pre/ld.so.preload ino
    mkdir -p "$lib_root/tmp/pre"
    printf '/opt/a.so\n/opt/b.so:/opt/c.so\n  /opt/d.so' >"$p"   # no newline at the end
    run_expect 0 'preload /tmp/pre/ld.so.preload: added /vigil/lib/libvigil.so$' \
        inst 0:0 --preload /tmp/pre/ld.so.preload --lib-path /vigil/lib/libvigil.so /tmp/pre/lib || return 1
    printf '/opt/a.so\n/opt/b.so:/opt/c.so\n  /opt/d.so\n/vigil/lib/libvigil.so\n' >"$work/want"
    cmp "$p" "$work/want" || { echo "got:"; cat -A "$p"; return 1; }
    ino=$(stat -c %i "$p")
    run_expect 0 'preload /tmp/pre/ld.so.preload: already lists /vigil/lib/libvigil.so$' \
        inst 0:0 --preload /tmp/pre/ld.so.preload --lib-path /vigil/lib/libvigil.so /tmp/pre/lib || return 1
    cmp "$p" "$work/want" && [ "$(stat -c %i "$p")" = "$ino" ] || { echo "rewritten although it listed the library"; return 1; }
    # Listed inside a ':'-separated line counts as listed.
    printf '/opt/x.so:/vigil/lib/libvigil.so\n' >"$p"
    run_expect 0 'already lists' inst 0:0 --preload /tmp/pre/ld.so.preload --lib-path /vigil/lib/libvigil.so /tmp/pre/lib || return 1
    # A longer path that merely contains it does not.
    printf '/vigil/lib/libvigil.so.old\n' >"$p"
    run_expect 0 'added /vigil/lib/libvigil.so$' inst 0:0 --preload /tmp/pre/ld.so.preload --lib-path /vigil/lib/libvigil.so /tmp/pre/lib || return 1
    no_temp_in "$lib_root/tmp/pre"
}
echo "==> vigil-install, route (a): HAMi's host directory (as root, under busybox)"
t "libvgpu.so.<version> replaced by libvigil.so; HAMi's ld.so.preload kept; unchanged on rerun" route_hami
t "preload file: line appended once, other lines and a missing final newline kept" preload_editing

# --- refusals: status 1, a message naming the path and the problem, nothing left behind ---------
refuse_not_dir() {
    : >"$lib_root/tmp/afile"
    run_expect 1 'error: DEST_DIR /tmp/afile exists and is not a directory' inst "$nobody" /tmp/afile
}
refuse_not_writable() {
    mkdir -p "$lib_root/tmp/rootonly" && chmod 0755 "$lib_root/tmp/rootonly"
    run_expect 1 'error: DEST_DIR /tmp/rootonly is not writable .*uid 65534' inst "$nobody" /tmp/rootonly || return 1
    no_temp_in "$lib_root/tmp/rootonly"
}
refuse_read_only() {
    mkdir -p "$lib_root/tmp/ro"
    run_expect 1 'error: DEST_DIR /tmp/ro is not writable.*[Rr]ead-only file system' unshare --mount bash -c '
        mount -t tmpfs -o ro,size=1m tmpfs "$0/tmp/ro" || exit 9
        chroot "$0" /opt/vigil/bin/vigil-install /tmp/ro' "$lib_root"
}
refuse_no_source() {
    run_expect 1 'error: source library /nonexistent/libvigil.so does not exist' \
        inst "$nobody" --source /nonexistent/libvigil.so /tmp/x || return 1
    [ ! -e "$lib_root/tmp/x" ] || { echo "DEST_DIR created although the source is missing"; return 1; }
}
refuse_disk_full() {
    # A 256 KiB tmpfs holding an old library; the update does not fit.
    mkdir -p "$lib_root/tmp/full"
    head -c 4096 /dev/urandom >"$work/old.so"
    unshare --mount bash -c '
        mount -t tmpfs -o size=256k tmpfs "$0/tmp/full" || exit 9
        cp "$1" "$0/tmp/full/libvigil.so" || exit 9
        rc=0
        chroot "$0" /opt/vigil/bin/vigil-install /tmp/full || rc=$?
        echo "status $rc"
        echo "left: $(ls -A "$0/tmp/full" | tr "\n" " ")"
        echo "sha $(sha256sum <"$0/tmp/full/libvigil.so" | cut -d" " -f1)"' "$lib_root" "$work/old.so" >"$work/full.out" 2>&1
    cat "$work/full.out"
    expect_out "$work/full.out" 'error: cannot write /tmp/full/\.libvigil\.so\.[^ ]+ .*No space left on device; /tmp/full/libvigil.so left as it was' || return 1
    expect_out "$work/full.out" '^status 1$' || return 1
    expect_out "$work/full.out" '^left: libvigil.so $' || return 1
    expect_out "$work/full.out" "^sha $(sha "$work/old.so")$"
}
refuse_symlink() {
    mkdir -p "$lib_root/tmp/sl" && ln -sf /etc/passwd "$lib_root/tmp/sl/libvigil.so"
    run_expect 1 'error: /tmp/sl/libvigil.so is a symbolic link; refusing' inst 0:0 /tmp/sl
}
refuse_usage() {
    run_expect 2 'DEST_DIR is missing' inst "$nobody" || return 1
    run_expect 2 'unknown option --frobnicate' inst "$nobody" --frobnicate /tmp/y || return 1
    run_expect 2 '--name must be a plain file name' inst "$nobody" --name ../x.so /tmp/y || return 1
    run_expect 2 '--lib-path only goes with --preload' inst "$nobody" --lib-path /a.so /tmp/y || return 1
    run_expect 0 '^Usage: vigil-install ' inst "$nobody" --help
}
echo "==> vigil-install refusals"
t "DEST_DIR a file: refused" refuse_not_dir
t "DEST_DIR not writable for the UID: refused" refuse_not_writable
t "DEST_DIR on a read-only file system: refused" refuse_read_only
t "source missing: refused, nothing created" refuse_no_source
t "disk full: refused, no temporary file left, old library intact" refuse_disk_full
t "installed name a symlink: refused" refuse_symlink
t "usage errors: status 2; --help" refuse_usage

# --- a real image build with buildah ------------------------------------------------------------
# Base images cannot be pulled here, and the build stage needs a Rust image, so buildah
# builds each Dockerfile's runtime stage verbatim (ARGs, LABELs, COPY --from=build, USER,
# EXPOSE, ENTRYPOINT) over local stand-in bases made FROM scratch (the roots above), with
# the build stage replaced by the staged tree; then the images' config is checked and
# their ENTRYPOINT run inside them (buildah run, chroot isolation).
bh() { timeout 300 buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver vfs "$@"; }
have_buildah() {
    command -v buildah >/dev/null && return 0
    echo "installing buildah (Debian package)"
    timeout 300 apt-get install -y -qq --no-install-recommends buildah >/dev/null ||
        { timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq --no-install-recommends buildah >/dev/null; }
}
# base_image NAME ROOT: a FROM scratch image of the directory ROOT.
base_image() {
    local ctx=$work/ctx-base-$1
    mkdir -p "$ctx" && cp -a "$2" "$ctx/root" && rm -rf "$ctx/root/dev" || return 1
    printf 'FROM scratch\nCOPY root/ /\n' >"$ctx/Dockerfile"
    bh bud --quiet --isolation chroot -t "localhost/vigil-check/$1:latest" "$ctx"
}
# runtime_stage_image DOCKERFILE STAGED TAG BUILD-ARG...: builds the Dockerfile's runtime
# stage with its build stage replaced by the staged tree.
runtime_stage_image() {
    local df=$1 staged=$2 tag=$3 ctx
    ctx=$work/ctx-$(basename "$1" .Dockerfile)
    shift 3
    mkdir -p "$ctx" && cp -a "$staged" "$ctx/rootfs" || return 1
    awk 'BEGIN {stage = 0}
         /^FROM / {stage++; if (stage == 1) {print "FROM scratch AS build"; print "COPY rootfs/ /rootfs/"; next}}
         stage != 1 {print}' "$df" >"$ctx/Dockerfile" || return 1
    bh bud --quiet --isolation chroot "$@" --build-arg REVISION=check -t "$tag" -f "$ctx/Dockerfile" "$ctx"
}
# image_config TAG FIELD: a field of the image's OCI config (Go template).
image_config() { bh inspect --type image --format "$2" "$1"; }
buildah_exporter() {
    base_image cc "$ex_root" || return 1
    runtime_stage_image deploy/images/exporter.Dockerfile "$ex_stage" localhost/vigil/vigil-exporter:check \
        --build-arg RUNTIME_IMAGE=localhost/vigil-check/cc:latest || return 1
    local img=localhost/vigil/vigil-exporter:check
    [ "$(image_config $img '{{.OCIv1.Config.User}}')" = 65534:65534 ] || { echo "User: $(image_config $img '{{.OCIv1.Config.User}}')"; return 1; }
    [ "$(image_config $img '{{.OCIv1.Config.Entrypoint}}')" = '[/usr/local/bin/vigil-exporter]' ] || { echo "Entrypoint: $(image_config $img '{{.OCIv1.Config.Entrypoint}}')"; return 1; }
    image_config $img '{{.OCIv1.Config.ExposedPorts}}' | grep -q '9477/tcp' || { echo "ExposedPorts: $(image_config $img '{{.OCIv1.Config.ExposedPorts}}')"; return 1; }
    [ "$(image_config $img '{{index .OCIv1.Config.Labels "org.opencontainers.image.version"}}')" = 0.1.0 ] || { echo "labels: $(image_config $img '{{.OCIv1.Config.Labels}}')"; return 1; }
    local ctr
    ctr=$(bh from --quiet --pull-never $img) || return 1
    bh run --isolation chroot --user 65534:65534 "$ctr" -- /usr/local/bin/vigil-exporter --help >"$work/bh-help" 2>&1
    local rc=$?
    bh rm "$ctr" >/dev/null
    cat "$work/bh-help"
    [ $rc = 0 ] && expect_out "$work/bh-help" 'web\.listen-address'
}
buildah_libvigil() {
    base_image busybox "$work/root/busybox" || return 1
    runtime_stage_image deploy/images/libvigil.Dockerfile "$lib_stage" localhost/vigil/libvigil:check \
        --build-arg BASE_IMAGE=localhost/vigil-check/busybox:latest || return 1
    local img=localhost/vigil/libvigil:check
    [ "$(image_config $img '{{.OCIv1.Config.User}}')" = 65534:65534 ] || { echo "User: $(image_config $img '{{.OCIv1.Config.User}}')"; return 1; }
    [ "$(image_config $img '{{.OCIv1.Config.Entrypoint}}')" = '[/opt/vigil/bin/vigil-install]' ] || { echo "Entrypoint: $(image_config $img '{{.OCIv1.Config.Entrypoint}}')"; return 1; }
    local ctr
    ctr=$(bh from --quiet --pull-never $img) || return 1
    bh run --isolation chroot --user 65534:65534 "$ctr" -- /opt/vigil/bin/vigil-install /tmp/lib >"$work/bh-install" 2>&1
    local rc=$?
    bh rm "$ctr" >/dev/null
    cat "$work/bh-install"
    [ $rc = 0 ] && expect_out "$work/bh-install" "^vigil-install: installed /tmp/lib/libvigil.so \(sha256 $(sha "$lib")\)$"
}
echo "==> the images built with buildah (runtime stages over local stand-in bases)"
# The busybox stand-in: the libvigil root without the staged tree.
mkdir -p "$work/root/busybox" && cp -a "$lib_root/bin" "$lib_root/etc" "$work/root/busybox/" && mkdir -p "$work/root/busybox/tmp" && chmod 1777 "$work/root/busybox/tmp"
if t "buildah is installed (Debian package)" have_buildah; then
    t "buildah builds the exporter image; config and ENTRYPOINT --help inside it" buildah_exporter
    t "buildah builds the libvigil image; vigil-install runs inside it as 65534" buildah_libvigil
fi

# The same installer under the host's /bin/sh and coreutils (a node without busybox).
host_sh() {
    local d=$work/hostsh
    run_expect 0 '^vigil-install: installed ' sh deploy/images/vigil-install --source "$lib" "$d" || return 1
    run_expect 0 '^vigil-install: unchanged ' sh deploy/images/vigil-install --source "$lib" "$d" || return 1
    run_expect 0 '^vigil-install: updated ' sh deploy/images/vigil-install --source "$work/libvigil-v2.so" "$d" || return 1
    no_temp_in "$d"
}
t "installed/unchanged/updated under the host's sh ($(readlink -f /bin/sh)) and coreutils" host_sh

echo
if ((${#failed[@]})); then
    echo "failed:"
    printf '  - %s\n' "${failed[@]}"
fi
echo "$passed passed, ${#failed[@]} failed"
((${#failed[@]} == 0))
