#!/usr/bin/env bash
# The Vigil demo: the GPU simulator, libvigil.so preloaded into 8 workloads that start
# at the same instant (each in its own PID namespace when unshare works), the start-up
# story each one logs, and what the shared region recorded. The exporter, its metrics
# and dashboards are not yet available; `vigil-region inspect` shows what they will read.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building (release)"
cargo build --quiet --release -p vigil-gpusim -p vigil-gpusim-driver -p vigil-interposer -p vigil-region
bin=$PWD/target/release
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
"$bin/vigil-gpusim" install-libs "$dir/lib" >/dev/null
export VIGIL_GPUSIM_SOCKET=$dir/gpu.sock LD_LIBRARY_PATH=$dir/lib
export CUDA_DEVICE_MEMORY_SHARED_CACHE=$dir/region.cache LIBCUDA_LOG_LEVEL=3

echo "==> simulator: 200 ms context creation; the process shows up in NVML 80 ms after it"
"$bin/vigil-gpusim" --devices 1 --memory 80GiB --ctx-create-time 200ms --nvml-lag 280ms >/dev/null &
sleep 0.3

ns=()
if unshare --pid --fork --mount-proc true 2>/dev/null; then
    ns=(unshare --pid --fork --kill-child --mount-proc)
    echo "==> 8 workloads, each in its own PID namespace (each sees itself as PID 1)"
else
    echo "==> 8 workloads (unshare --pid is not permitted here: no PID namespaces)"
fi
start=$(date +%s.%N)
for i in $(seq 8); do
    "${ns[@]}" env LD_PRELOAD="$bin/libvigil.so" "$bin/vigil-workload" --alloc 256MiB > "$dir/w$i.log" 2>&1 &
done
wait $(jobs -p | tail -n 8) 2>/dev/null || true
end=$(date +%s.%N)
echo
echo "==> what they logged (LIBCUDA_LOG_LEVEL=3)"
cat "$dir"/w*.log | grep '\[vigil' | sed 's/^/    /'
awk -v s="$start" -v e="$end" 'BEGIN { printf "\n==> all 8 started in %.2f s (fully serialized detection needs at least 8 x 280 ms = 2.24 s)\n", e - s }'
echo
echo "==> the region, read-only (what the exporter will read)"
"$bin/vigil-region" inspect "$CUDA_DEVICE_MEMORY_SHARED_CACHE" | grep -v '=0$' | sed 's/^/    /'
echo
echo "==> its event ring"
"$bin/vigil-region" events "$CUDA_DEVICE_MEMORY_SHARED_CACHE" | grep -v lock_wait | sed 's/^/    /'
