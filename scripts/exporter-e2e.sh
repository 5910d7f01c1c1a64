#!/usr/bin/env bash
# End to end: vigil-exporter scraped every 1 s by a real Prometheus on loopback (with
# Vigil's alert rules loaded) while tests/run_comprehensive_tests.sh runs N workloads
# (default 8) under LD_PRELOAD, once plain and once with a SIGKILLed detection-lock
# holder. Then the Prometheus HTTP API must report exactly the scenario's own JSON
# figures, and `promtool check metrics` must find no problems on /metrics.
# HAMi-core regions (tests/fixtures/hami: written by HAMi-core's own libvgpu.so) sit in
# the same directory from the start: one whose `sem` is held by a SIGKILLed owner (the
# VigilHamiLockOwnerDead alert must fire), one whose processes all have host PID 0, one
# with memory in dead slots, and one of the older 1.1 layout; and NVML comes from a
# simulator, so the NVML and drift series have data.
# A third phase adds the remaining signals (a memory denial, a container near its
# limit, host-PID detection failures, a corrupt region file) and sends every PromQL
# expression of the dashboards and alert rules to Prometheus (tests/promql_exprs.py):
# each must parse and evaluate, and each must return data unless listed, with the
# reason, in tests/e2e-no-data.txt. Exits non-zero on any failure.
#
# Usage: scripts/exporter-e2e.sh [N]
#   VIGIL_SKIP_BUILD=1   use the binaries already in target/debug
#   VIGIL_E2E_KEEP=1     keep the work directory (logs, TSDB) for inspection (VIGIL_KEEP=1 too)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-8}"

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    echo "e2e: installing Debian's prometheus package (prometheus + promtool)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    # The package starts a system service; we run our own instance on other ports.
    (systemctl stop prometheus || service prometheus stop) >/dev/null 2>&1 || true
fi
if [ "${VIGIL_SKIP_BUILD:-}" != 1 ]; then
    cargo build --quiet --workspace --features vigil-interposer/fault-injection
fi

work="$(mktemp -d /tmp/vigil-e2e.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ "${VIGIL_E2E_KEEP:-}" = 1 ] || [ "${VIGIL_KEEP:-}" = 1 ]; then echo "e2e: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

exp_port="$(python3 tests/harness.py free-port)"
prom_port="$(python3 tests/harness.py free-port)"
mkdir -p "$work/regions/plain" "$work/regions/kill" "$work/regions/signals"

# HAMi-core's own region files, in HAMi's layout <pod-uid>_<container>/.
hami_place() {
    mkdir -p "$work/regions/$1_main"
    gzip -dc "tests/fixtures/hami/$2" >"$work/regions/$1_main/vgpu.cache"
}
hami_place hami-deadowner sem-dead-owner.cache.gz
hami_place hami-zero hostpid0.cache.gz
hami_place hami-dead dead-slots.cache.gz
hami_place hami-old v1_1-live.cache.gz
hami_start=$(date +%s)

# The simulator for phase 3's workloads, started now so that the exporter's NVML
# (nvml-wrapper on the stand-in libnvidia-ml.so.1) works from its start.
lib="$work/lib"
target/debug/vigil-gpusim install-libs "$lib" >/dev/null
sim() {
    target/debug/vigil-gpusim --socket "$work/$1.sock" --ctx-create-time 20ms --nvml-lag 40ms \
        --ctx-memory 2MiB "${@:2}" >"$work/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do [ -S "$work/$1.sock" ] && return 0; sleep 0.05; done
    echo "e2e: simulator $1 did not start" >&2; exit 1
}
sim ok

VIGIL_GPUSIM_SOCKET="$work/ok.sock" target/debug/vigil-exporter --regions-dir "$work/regions" \
    --regions-dir.scan-interval 200ms --proc.scan-interval 1s \
    --nvml.library "$lib/libnvidia-ml.so.1" --nvml.interval 1s \
    --web.listen-address "127.0.0.1:$exp_port" >"$work/exporter.log" 2>&1 &
pids+=($!)

# A second exporter behind TLS and basic authentication (--web.config.file), over an
# empty directory of its own (its series must not double the regions' figures), that
# Prometheus scrapes with scheme https, the CA and the password.
tls_port="$(python3 tests/harness.py free-port)"
mkdir -p "$work/tls/regions"
(
    cd "$work/tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=vigil-e2e-ca \
        -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key \
        -out server.csr 2>/dev/null
    echo "subjectAltName=IP:127.0.0.1,DNS:localhost" >ext.cnf
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile ext.cnf -out server.crt 2>/dev/null
)
tls_hash="$(echo e2e-secret | target/debug/vigil-exporter hash-password --cost 4)"
cat >"$work/tls/web.yml" <<EOF
tls_server_config:
  cert_file: server.crt
  key_file: server.key
basic_auth_users:
  prometheus: '$tls_hash'
EOF
target/debug/vigil-exporter --regions-dir "$work/tls/regions" --nvml off \
    --web.config.file "$work/tls/web.yml" \
    --web.listen-address "127.0.0.1:$tls_port" >"$work/exporter-tls.log" 2>&1 &
pids+=($!)

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  # Rules every second too, so that an alert with for: 1m fires about a minute after
  # its condition holds (the default 1-minute evaluation can take two).
  evaluation_interval: 1s
  scrape_timeout: 1s
rule_files: ["$PWD/alerts/vigil-alerts.yml"]
scrape_configs:
  - job_name: vigil-exporter
    static_configs:
      - targets: ["127.0.0.1:$exp_port"]
  - job_name: vigil-exporter-tls
    scheme: https
    tls_config:
      ca_file: $work/tls/ca.crt
    basic_auth:
      username: prometheus
      password: e2e-secret
    static_configs:
      - targets: ["127.0.0.1:$tls_port"]
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
pids+=($!)

wait_http() {
    for _ in $(seq 1 150); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "e2e: $1 never answered" >&2
    cat "$work"/*.log >&2
    exit 1
}
wait_http "http://127.0.0.1:$exp_port/healthz"
wait_http "http://127.0.0.1:$prom_port/-/ready"

# Runs one scenario into its own region directory; prints its JSON summary line.
run_scenario() {
    local name="$1"
    shift
    local rc=0
    env "$@" VIGIL_SKIP_BUILD=1 VIGIL_SCENARIO_REGION="$work/regions/$name/region.cache" \
        tests/run_comprehensive_tests.sh "$N" >"$work/$name.out" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        echo "e2e: note: scenario '$name' exited $rc (its own checks; figures are still compared):" >&2
        grep -E "FAIL" "$work/$name.out" >&2 || true
    fi
    local json
    json="$(grep -E '^\{' "$work/$name.out" | tail -1)"
    if [ -z "$json" ]; then
        echo "e2e: scenario '$name' printed no JSON summary:" >&2
        cat "$work/$name.out" >&2
        exit 1
    fi
    echo "$json"
}

echo "e2e: scenario 'plain' (N=$N)"
plain_json="$(run_scenario plain)"
echo "e2e:   $plain_json"
echo "e2e: scenario 'kill' (N=$N, VIGIL_SCENARIO_KILL_HOLDER_MS=300)"
kill_json="$(run_scenario kill VIGIL_SCENARIO_KILL_HOLDER_MS=300)"
echo "e2e:   $kill_json"

# Compares Prometheus's answers with the scenario figures, retrying while the last
# scrapes come in (at most 20 s), then reports every comparison.
python3 - "$prom_port" "$plain_json" "$kill_json" <<'PY'
import json, sys, time, urllib.parse, urllib.request
port, runs = sys.argv[1], {"plain": json.loads(sys.argv[2]), "kill": json.loads(sys.argv[3])}

def query(q):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        res = json.load(r)["data"]["result"]
    return float(res[0]["value"][1]) if res else None

checks = []
for name, fig in runs.items():
    sel = f'region="{name}/region.cache"'
    checks += [
        (name, f"sum(vigil_process_inits_total{{{sel}}})", fig["inits"], "inits"),
        (name, f'sum(vigil_host_pid_detections_total{{{sel},outcome="found"}})', fig["host_pid_found"], "host_pid_found"),
        (name, f"sum(vigil_lock_force_posts_total{{{sel}}})", fig["force_posts"], "force_posts"),
        (name, f"sum(vigil_host_pid_detection_seconds_count{{{sel}}})", fig["detections"], "detections"),
    ]
deadline = time.time() + 20
while True:
    got = [query(q) for _, q, _, _ in checks]
    ok = all(g is not None and g == float(w) for g, (_, _, w, _) in zip(got, checks))
    if ok or time.time() > deadline:
        break
    time.sleep(0.5)
for g, (name, q, want, field) in zip(got, checks):
    mark = "PASS" if g is not None and g == float(want) else "FAIL"
    print(f"e2e: {mark}: [{name}] {q} = {g}  (scenario {field} = {want})")
if runs["kill"]["force_posts"] != 1:
    print(f"e2e: FAIL: the kill scenario should force-post exactly once, JSON says {runs['kill']['force_posts']}")
    ok = False
sys.exit(0 if ok else 1)
PY

echo "e2e: promtool check metrics on /metrics"
curl -sf "http://127.0.0.1:$exp_port/metrics" >"$work/metrics.txt"
if ! promtool check metrics <"$work/metrics.txt" >"$work/promtool.out" 2>&1 || [ -s "$work/promtool.out" ]; then
    echo "e2e: FAIL: promtool check metrics reported problems:" >&2
    cat "$work/promtool.out" >&2
    exit 1
fi
echo "e2e: PASS: promtool check metrics: no problems"
echo "e2e: phase 3: every dashboard and alert expression against the live data"
# A simulator whose NVML fails every call: detection outcomes nvml_error.
sim broken --nvml-error-rate 1
# A subshell that execs the workload: in the background, $! is the workload itself.
workload() (
    sock="$1"
    shift
    export VIGIL_GPUSIM_SOCKET="$work/$sock.sock" LD_LIBRARY_PATH="$lib" \
        LD_PRELOAD="$PWD/target/debug/libvigil.so" LIBCUDA_LOG_LEVEL=1 \
        CUDA_DEVICE_MEMORY_SHARED_CACHE="$work/regions/signals/region.cache" CUDA_DEVICE_MEMORY_LIMIT=1g
    exec target/debug/vigil-workload "$@"
)
# A holder near the limit (stays up during the checks), then a workload refused.
workload ok --alloc 950MiB --exit wait >"$work/holder.out" 2>&1 &
holder=$!
pids+=($holder)
for _ in $(seq 1 100); do grep -qs '^ready' "$work/holder.out" && break; sleep 0.05; done
grep -q '^ready' "$work/holder.out" || { echo "e2e: holder did not start" >&2; cat "$work/holder.out" >&2; exit 1; }
# The workload's own PID (the background job may be a subshell around it).
pids+=("$(sed -n 's/^ready pid=\([0-9]*\).*/\1/p' "$work/holder.out")")
if workload ok --alloc 200MiB >"$work/denied.out" 2>&1; then
    echo "e2e: FAIL: an allocation past the limit was granted" >&2; exit 1
fi
grep -q 'call=cuMemAlloc code=2' "$work/denied.out" || { echo "e2e: FAIL: no OOM" >&2; cat "$work/denied.out" >&2; exit 1; }
for _ in 1 2 3; do workload broken --alloc 1MiB >/dev/null 2>&1 || true; done
# A file in the regions directory that is not a region.
head -c 4096 /dev/urandom >"$work/regions/not-a-region.cache"
# Let a few scrapes and rule evaluations see it all.
sleep 4
py="${VIGIL_PYTHON:-target/pyenv/bin/python}"
if [ ! -x "$py" ]; then
    python3 -m venv target/pyenv
    py=target/pyenv/bin/python
fi
"$py" -c 'import yaml' 2>/dev/null || "$py" -m pip install -q --disable-pip-version-check pyyaml
# --all: the dashboard's default state (every variable at All, `.*`). Discovering values
# would pick the HAMi-core regions' pod UIDs, which the Vigil regions here (no pod
# label) do not match.
"$py" tests/promql_exprs.py --url "http://127.0.0.1:$prom_port" --rate-interval 1m --all \
    --require-data-all-except tests/e2e-no-data.txt -o "$work/promql.json" >"$work/promql.out" 2>&1 || {
    echo "e2e: FAIL: dashboard/alert expressions (report: $work/promql.json):" >&2
    cat "$work/promql.out" >&2
    VIGIL_E2E_KEEP=1
    exit 1
}
tail -3 "$work/promql.out"
echo "e2e: PASS: every dashboard and alert expression parsed, evaluated, and returned data where the run produced the signal"

echo "e2e: HAMi-core regions and NVML, as Prometheus sees them"
# VigilHamiLockOwnerDead has `for: 1m`: wait until it fires (at most 2 minutes after
# the fixtures were placed), then compare the series with the fixtures' manifest.
python3 - "$prom_port" "$hami_start" <<'PY'
import json, sys, time, urllib.parse, urllib.request
port, start = sys.argv[1], float(sys.argv[2])
man = json.load(open("tests/fixtures/hami/manifest.json"))["fixtures"]

def api(path, **q):
    url = f"http://127.0.0.1:{port}{path}?" + urllib.parse.urlencode(q)
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]

def value(q):
    res = api("/api/v1/query", query=q)["result"]
    return float(res[0]["value"][1]) if res else None

def firing():
    return [a["labels"] for a in api("/api/v1/alerts")["alerts"]
            if a["labels"].get("alertname") == "VigilHamiLockOwnerDead" and a["state"] == "firing"]

while not firing() and time.time() < start + 120:
    time.sleep(1)
ok = True
def check(what, got, want):
    global ok
    good = got == want
    ok &= good
    print(f"e2e: {'PASS' if good else 'FAIL'}: {what} = {got} (want {want})")

f = firing()
check("VigilHamiLockOwnerDead firing for the dead-owner fixture",
      sorted((a.get("pod_uid"), a.get("region"), a.get("lock"), a.get("severity")) for a in f),
      [("hami-deadowner", "vgpu.cache", "sem", "critical")])
check("vigil_hami_lock_owner_dead (sem) of the dead-owner fixture",
      value('vigil_hami_lock_owner_dead{pod_uid="hami-deadowner",region="vgpu.cache",lock="sem"}'), 1.0)
zero = sum(1 for s in man["hostpid0.cache.gz"]["region"]["slots"] if s["hostpid"] == 0)
check("vigil_hami_host_pid_zero_slots of the host-PID-0 fixture",
      value('vigil_hami_host_pid_zero_slots{pod_uid="hami-zero",region="vgpu.cache"}'), float(zero))
dead = sum(d.get("total", 0) for s in man["dead-slots.cache.gz"]["region"]["slots"] for d in s["used"].values())
check("vigil_device_memory_dead_bytes of the dead-slots fixture (every slot's process is gone)",
      value('sum(vigil_device_memory_dead_bytes{pod_uid="hami-dead",region="vgpu.cache",interposer="hami-core"})'), float(dead))
check("vigil_hami_region_info of the 1.1 fixture",
      value('vigil_hami_region_info{pod_uid="hami-old",region="vgpu.cache",version="1.1"}'), 1.0)
check("pod_uid label from HAMi's directory name (and no pod name)",
      value('count(vigil_hami_region_info{pod_uid="hami-dead",pod="",container="main"})'), 1.0)
check("vigil_exporter_nvml_up", value("vigil_exporter_nvml_up"), 1.0)
check("vigil_device_info series (one per simulated device)", value("count(vigil_device_info)"), 2.0)
check("Prometheus scrapes the TLS exporter with basic authentication (up)",
      value('up{job="vigil-exporter-tls"}'), 1.0)
check("the TLS exporter's build info reached Prometheus",
      value('count(vigil_exporter_build_info{job="vigil-exporter-tls"})'), 1.0)
check("drift series for the live Vigil region",
      value('count(vigil_device_memory_accounting_drift_bytes{region="signals/region.cache"}) > 0'), 2.0)
sys.exit(0 if ok else 1)
PY
echo "e2e: all checks passed"
