#!/usr/bin/env bash
# The Vigil demo, on a laptop with no GPU (or on a GPU node: the real driver is used
# when one is present). It builds everything, starts the GPU simulator, the exporter
# and (if installed) Prometheus with Vigil's alert rules, then runs a burst of workloads
# under LD_PRELOAD=libvigil.so in two "containers" (two regions):
#   - trainer: 8 workloads starting at once, each in its own PID namespace, with a
#     16 GiB limit; they detect their host PIDs at the same time (memory signatures);
#     the first is SIGKILLed while it holds the lock under which a new region's first
#     context is created (the others take it over within milliseconds);
#   - small: a 1 GiB limit and a workload that asks for 2 GiB (refused).
# It prints a summary read from /metrics, where everything is served, and the alerts
# Prometheus raised. It leaves no processes behind.
#
# Usage: scripts/demo.sh            VIGIL_DEMO_KEEP=1 keeps running until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building (release; the first build takes a few minutes)"
cargo build --quiet --release --workspace
bin=$PWD/target/release
dir=$(mktemp -d /tmp/vigil-demo.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1",int(sys.argv[1]))); print(s.getsockname()[1])' "$1" 2>/dev/null ||
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The real driver if this machine has one, else the simulator (calibrated on an H100).
if ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 ' && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "==> real NVIDIA driver found: $(nvidia-smi -L | head -1)"
    real=1
else
    real=0
    "$bin/vigil-gpusim" install-libs "$dir/lib" >/dev/null
    export VIGIL_GPUSIM_SOCKET=$dir/gpu.sock LD_LIBRARY_PATH=$dir/lib
    echo "==> no GPU here: GPU simulator (200 ms context creation, NVML sees the process 80 ms after it)"
    "$bin/vigil-gpusim" --devices 1 --memory 80GiB --ctx-create-time 200ms --nvml-lag 280ms >"$dir/gpusim.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$dir/gpu.sock" ] && break; sleep 0.05; done
fi

# HAMi's layout: one directory per container, <pod-uid>_<container>.
mkdir -p "$dir/containers/demo-pod_trainer" "$dir/containers/demo-pod_small"
exp_port=$(free_port 9477)
"$bin/vigil-exporter" --regions-dir "$dir/containers" --regions-dir.scan-interval 200ms \
    --web.listen-address "127.0.0.1:$exp_port" >"$dir/exporter.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$exp_port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
echo "==> vigil-exporter serving http://127.0.0.1:$exp_port/metrics"

prom_port=""
if command -v prometheus >/dev/null; then
    prom_port=$(free_port 9090)
    cat >"$dir/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ["$PWD/alerts/vigil-alerts.yml"]
scrape_configs:
  - job_name: vigil-exporter
    static_configs: [{targets: ["127.0.0.1:$exp_port"]}]
EOF
    prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
        --web.listen-address="127.0.0.1:$prom_port" >"$dir/prometheus.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 150); do curl -sf "http://127.0.0.1:$prom_port/-/ready" >/dev/null 2>&1 && break; sleep 0.2; done
    echo "==> Prometheus with Vigil's alert rules: http://127.0.0.1:$prom_port"
else
    echo "==> (prometheus is not installed: no alerts shown; apt-get install prometheus to see them)"
fi

ns=()
if unshare --pid --fork --mount-proc true 2>/dev/null; then
    ns=(unshare --pid --fork --kill-child --mount-proc)
fi
run() { # run CONTAINER LIMIT LOG ARGS...: one workload in the container, preloaded
    local c=$1 limit=$2 log=$3
    shift 3
    "${ns[@]}" env LD_PRELOAD="$bin/libvigil.so" LIBCUDA_LOG_LEVEL=3 \
        CUDA_DEVICE_MEMORY_SHARED_CACHE="$dir/containers/demo-pod_$c/vigil.cache" CUDA_DEVICE_MEMORY_LIMIT="$limit" \
        POD_NAMESPACE=demo POD_NAME=demo-pod CONTAINER_NAME="$c" \
        "$bin/vigil-workload" "$@" >"$log" 2>&1
}

echo "==> container 'trainer': 8 workloads at once; the first is SIGKILLed holding the first-context lock"
# In a subshell of its own, so the shell's "Killed" notice goes nowhere.
(run trainer 16g "$dir/victim.log" --alloc 256MiB --hold 5s) 2>/dev/null &
victim=$!
sleep 0.06
work=()
for i in $(seq 2 8); do
    run trainer 16g "$dir/w$i.log" --alloc 256MiB --hold 200ms &
    work+=($!)
done
sleep 0.05
# The victim's process (unshare --kill-child takes the workload with it).
pkill -KILL -P "$victim" 2>/dev/null || true
wait "$victim" 2>/dev/null || true
echo "==> container 'small': a 1 GiB limit, and a workload asking for 2 GiB"
run small 1g "$dir/small.log" --alloc 2GiB || true
wait "${work[@]}" 2>/dev/null || true
sleep 2.5 # a few scrapes

echo
echo "==> what the workloads logged (LIBCUDA_LOG_LEVEL=3), trimmed"
grep -h '\[vigil' "$dir"/w2.log "$dir"/small.log | sed 's/^/    /' | head -20

echo
echo "==> summary, read from http://127.0.0.1:$exp_port/metrics"
curl -sf "http://127.0.0.1:$exp_port/metrics" >"$dir/metrics.txt"
python3 - "$dir/metrics.txt" <<'PY'
import re, sys
series = []
for line in open(sys.argv[1]):
    m = re.match(r'^([a-z_:]+)(?:\{(.*)\})? (\S+)$', line.strip())
    if m:
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        series.append((m.group(1), labels, float(m.group(3))))

def total(name, **want):
    return sum(v for n, l, v in series if n == name and all(l.get(k) == w for k, w in want.items()))

def quantile(q, name):
    b = sorted(((float("inf") if l["le"] == "+Inf" else float(l["le"])), v)
               for n, l, v in series if n == name + "_bucket")
    agg = {}
    for le, v in b:
        agg[le] = agg.get(le, 0) + v
    pts = sorted(agg.items())
    if not pts or pts[-1][1] == 0:
        return None
    rank, prev_le, prev_c = q * pts[-1][1], 0.0, 0.0
    for le, c in pts:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c

# A region is told apart by pod_uid and region together (under HAMi's layout `region`
# is the file name, the same in every pod's directory).
def where(l):
    return f"{l['pod_uid']}/{l['region']}" if "pod_uid" in l else l["region"]
regions = sorted({where(l) for n, l, v in series if "region" in l})
print(f"    regions watched:        {len(regions)} ({', '.join(regions)})")
print(f"    process inits:          {total('vigil_process_inits_total'):.0f} "
      f"(initializer {total('vigil_process_inits_total', path='initializer'):.0f}, "
      f"fast path {total('vigil_process_inits_total', path='fast_path'):.0f})")
agg = {}
for n, l, v in series:
    if n == "vigil_host_pid_detections_total" and v:
        agg[l["outcome"]] = agg.get(l["outcome"], 0) + v
print(f"    host-PID detections:    " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(agg.items())))
p50, p99 = quantile(0.5, "vigil_host_pid_detection_seconds"), quantile(0.99, "vigil_host_pid_detection_seconds")
if p50 is not None:
    print(f"    detection latency:      p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms (from the start of context creation; log2 buckets)")
fp = [(l["lock"], l["reason"], v) for n, l, v in series if n == "vigil_lock_force_posts_total" and v]
print(f"    lock force-posts:       {sum(v for *_, v in fp):.0f} " + " ".join(f"({lk} lock, {r})" for lk, r, _ in fp))
print(f"    allocation denials:     {total('vigil_device_memory_allocation_denials_total'):.0f}")
for n, l, v in series:
    if n == "vigil_device_memory_peak_bytes":
        lim = sum(v2 for n2, l2, v2 in series if n2 == "vigil_device_memory_limit_bytes"
                  and where(l2) == where(l) and l2.get("device") == l["device"])
        print(f"    memory peak [{l.get('container', l['region'])}, device {l['device']}]: "
              f"{v / 2**20:.0f} MiB of a {lim / 2**30:.0f} GiB limit")
PY

echo
echo "==> where to look"
echo "    metrics:     curl http://127.0.0.1:$exp_port/metrics     (landing page: http://127.0.0.1:$exp_port/)"
echo "    inspect:     $bin/vigil-exporter inspect $dir/containers/demo-pod_trainer/vigil.cache   (while VIGIL_DEMO_KEEP=1 keeps it)"
echo "    Prometheus:  scrape_configs: [{job_name: vigil-exporter, static_configs: [{targets: ['<node>:9477']}]}]"
echo "                 rule_files: [$PWD/alerts/vigil-alerts.yml]   (Kubernetes: deploy/)"
echo "    Grafana:     Dashboards > New > Import > upload dashboards/vigil.json, pick your Prometheus data source"
if [ -n "$prom_port" ]; then
    echo
    echo "==> alerts in Prometheus (http://127.0.0.1:$prom_port/alerts)"
    sleep 2
    curl -sf "http://127.0.0.1:$prom_port/api/v1/alerts" >"$dir/alerts.json"
    python3 - "$dir/alerts.json" <<'PY'
import json, sys
alerts = json.load(open(sys.argv[1]))["data"]["alerts"]
for a in sorted(alerts, key=lambda a: a["labels"]["alertname"]):
    l = a["labels"]
    where = l.get("container") or l.get("region") or l.get("reason") or ""
    print(f"    {a['state']:<8} {l['alertname']:<36} {l.get('severity', ''):<9} {where}")
if not alerts:
    print("    (none yet)")
print("    (pending = the condition holds and the rule's `for:` has not elapsed yet)")
PY
fi
if [ "${VIGIL_DEMO_KEEP:-}" = 1 ]; then
    echo
    echo "==> running until Ctrl-C"
    while true; do sleep 3600; done
fi
echo
echo "==> stopping everything"
