#!/usr/bin/env bash
# vigil-exporter benchmarks (issue 6 targets): /metrics p99 latency with 64 regions of
# 32 live slots (target <= 10 ms), exporter RSS (<= 30 MiB), drain throughput
# (>= 5M events/s on one core).
#
# Usage: scripts/bench-exporter.sh [REGIONS] [SLOTS] [SCRAPES]   (defaults 64 32 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
REGIONS="${1:-64}"
SLOTS="${2:-32}"
SCRAPES="${3:-2000}"

cargo build --quiet --release -p vigil-exporter --bins --examples
work="$(mktemp -d /tmp/vigil-bench.XXXXXX)"
pids=()
cleanup() {
    exec 3>&- 2>/dev/null || true
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# The fixture holds every slot, like live processes would, until its stdin closes.
mkfifo "$work/hold"
target/release/examples/fixture "$work/regions" "$REGIONS" "$SLOTS" <"$work/hold" >"$work/fixture.out" &
pids+=($!)
exec 3>"$work/hold"
for _ in $(seq 1 600); do grep -q ready "$work/fixture.out" 2>/dev/null && break; sleep 0.1; done
grep -q ready "$work/fixture.out" || { echo "bench: fixture did not start" >&2; exit 1; }

# Two mapping policies: the default (keep mappings between scrapes) and
# --regions.map-per-read (map each region only while reading it).
for mode in default --regions.map-per-read; do
    flag=""
    [ "$mode" = default ] || flag="$mode"
    port="$(python3 tests/harness.py free-port)"
    target/release/vigil-exporter --regions-dir "$work/regions" --web.listen-address "127.0.0.1:$port" \
        --log.level warn $flag >"$work/exporter.log" 2>&1 &
    exporter=$!
    pids+=("$exporter")
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
    regions_seen="$(curl -sf "http://127.0.0.1:$port/metrics" | awk '/^vigil_exporter_regions /{print $2}')"
    live="$(curl -sf "http://127.0.0.1:$port/metrics" | awk '/^vigil_processes\{/{s+=$2} END{print s}')"
    echo "bench: [$mode] exporter sees $regions_seen regions, $live live processes"
    target/release/examples/scrape_bench "127.0.0.1:$port" 100 >/dev/null # warm-up
    echo "bench: [$mode] /metrics latency, $SCRAPES sequential scrapes (fresh connection each):"
    target/release/examples/scrape_bench "127.0.0.1:$port" "$SCRAPES"
    grep -E 'VmRSS|VmHWM|RssAnon|RssFile' "/proc/$exporter/status" | tr -s ' \t' ' ' | sed "s/^/bench: [$mode] exporter /"
    kill "$exporter"
    wait "$exporter" 2>/dev/null || true
done
echo "bench: drain throughput:"
cargo bench --quiet -p vigil-exporter --bench drain 2>/dev/null | grep drain

# HAMi-core regions and NVML (issue 14): the same Vigil regions plus as many HAMi-core
# regions (copies of tests/fixtures/hami/live.cache.gz, written by HAMi-core's own
# libvgpu.so; 3 slots each), first without NVML, then with NVML from the simulator's
# stand-in libnvidia-ml.so.1 (refreshed in the background every second; the scrape
# pays for encoding the NVML and drift series, not for NVML calls).
HAMI="${VIGIL_BENCH_HAMI:-$REGIONS}"
for i in $(seq 1 "$HAMI"); do
    mkdir -p "$work/hami/pod$i""_main"
    gzip -dc tests/fixtures/hami/live.cache.gz >"$work/hami/pod$i""_main/vgpu.cache"
done
# The HAMi-core directories go next to the Vigil ones, under the same --regions-dir.
mv "$work"/hami/* "$work/regions/"
target/release/vigil-gpusim install-libs "$work/lib" >/dev/null
target/release/vigil-gpusim --socket "$work/sim.sock" >"$work/sim.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -S "$work/sim.sock" ] && break; sleep 0.05; done
for mode in hami hami+nvml; do
    flag="--nvml=off"
    [ "$mode" = hami ] || flag="--nvml.library=$work/lib/libnvidia-ml.so.1 --nvml.interval=1s"
    port="$(python3 tests/harness.py free-port)"
    # shellcheck disable=SC2086
    VIGIL_GPUSIM_SOCKET="$work/sim.sock" target/release/vigil-exporter --regions-dir "$work/regions" \
        --web.listen-address "127.0.0.1:$port" --log.level warn $flag >"$work/exporter.log" 2>&1 &
    exporter=$!
    pids+=("$exporter")
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
    sleep 2 # the first background NVML refresh and /proc scan
    body="$(curl -sf "http://127.0.0.1:$port/metrics")"
    echo "bench: [$mode] exporter sees $(echo "$body" | awk '/^vigil_exporter_regions /{print $2}') Vigil and $(echo "$body" | awk '/^vigil_exporter_hami_regions /{print $2}') HAMi-core regions; body $(echo "$body" | wc -c) bytes"
    echo "$body" | grep -E '^vigil_exporter_nvml_(up|refresh_seconds) ' | sed "s/^/bench: [$mode] /" || true
    target/release/examples/scrape_bench "127.0.0.1:$port" 100 >/dev/null # warm-up
    echo "bench: [$mode] /metrics latency, $SCRAPES sequential scrapes (fresh connection each):"
    target/release/examples/scrape_bench "127.0.0.1:$port" "$SCRAPES"
    kill "$exporter"
    wait "$exporter" 2>/dev/null || true
done
