"""Multi-process start-up scenario for libvigil.so (driven by run_comprehensive_tests.sh).

Defaults are the design document's measured figures: 200 ms context creation and an
80 ms NVML lag *after* creation. The simulator counts its lag from the start of
creation (that is what a real H100 does, see gpusim/README.md), so the lag given here
is added to the creation time before it is passed on.

Environment:
  VIGIL_SCENARIO_CTX        context creation time (default 200ms)
  VIGIL_SCENARIO_LAG        NVML lag after creation: DURATION or uniform:MIN..MAX (default 80ms)
  VIGIL_SCENARIO_PID_MODE   host (default), namespace (driver reports each process's own
                            namespace PID) or caller (PIDs translated into the caller's
                            namespace, as the 580 driver does)
  VIGIL_SCENARIO_KILL_HOLDER_MS   if set: the first workload holds the detection lock this
                            long (test hold point) and is SIGKILLed half-way through
  VIGIL_SCENARIO_FOREIGN    if 1: a process outside the region creates a context mid-run
  VIGIL_SCENARIO_NS         auto (default), 1 or 0: one PID namespace per workload
  VIGIL_SCENARIO_REGION     region file to use (default: a fresh one in a temp dir); an
                            exporter watching its directory sees the run
  VIGIL_SCENARIO_LIMIT      if set: CUDA_DEVICE_MEMORY_LIMIT for every workload (e.g. 4g)
  VIGIL_SCENARIO_FAULT      if set: the first workload runs with VIGIL_FAULT=<point> and is
                            SIGKILLed there (see tests/kill_sweep.py for the points); the
                            run then checks recovery, counters and accounting
  VIGIL_SKIP_BUILD          if 1: use the binaries already in target/debug
"""
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "debug"


def ms(text, name):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(ms|s|us)\s*", text)
    if not m:
        sys.exit(f"{name}={text!r} is not a duration (e.g. 80ms, 1.5s)")
    v, unit = float(m.group(1)), m.group(2)
    return v * {"ms": 1, "s": 1000, "us": 0.001}[unit]


def lag_after(text, ctx_ms):
    """Returns (simulator lag spec counted from creation start, mean lag after creation)."""
    text = text.strip()
    if text.startswith("uniform:"):
        lo, _, hi = text[len("uniform:"):].partition("..")
        a, b = ms(lo, "VIGIL_SCENARIO_LAG"), ms(hi, "VIGIL_SCENARIO_LAG")
        if a > b:
            sys.exit(f"VIGIL_SCENARIO_LAG={text!r}: MIN > MAX")
        return f"uniform:{ctx_ms + a}ms..{ctx_ms + b}ms", (a + b) / 2
    v = ms(text.removeprefix("fixed:"), "VIGIL_SCENARIO_LAG")
    return f"{ctx_ms + v}ms", v


def can_unshare():
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def children(pid, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        time.sleep(0.001)
    return None


def events(region, lost=None):
    out = subprocess.run([str(BIN / "vigil-region"), "events", str(region)], capture_output=True, text=True).stdout
    evs = []
    for line in out.splitlines():
        if line.startswith("# lost:") and lost is not None:
            lost.update({k: int(v) for k, v in (kv.split("=", 1) for kv in line[len("# lost:"):].split())})
        if line.startswith("#"):
            continue
        evs.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return evs


# Fault points whose victim dies holding locks: each must be force-posted exactly once.
# region_lock.held is first reached charging the context footprint, inside detection,
# so the victim dies holding both locks.
LOCK_FAULTS = {"detect.before_ctx": 1, "detect.after_ctx": 1, "region_lock.held": 2, "mem.reserve.mid": 1}


def main():
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        sys.exit("usage: tests/run_comprehensive_tests.sh N   (N >= 1 workloads)")
    n = int(sys.argv[1])
    ctx_ms = ms(os.environ.get("VIGIL_SCENARIO_CTX", "200ms"), "VIGIL_SCENARIO_CTX")
    lag_spec, lag_mean = lag_after(os.environ.get("VIGIL_SCENARIO_LAG", "80ms"), ctx_ms)
    pid_mode = os.environ.get("VIGIL_SCENARIO_PID_MODE", "host")
    kill_hold = os.environ.get("VIGIL_SCENARIO_KILL_HOLDER_MS")
    foreign = os.environ.get("VIGIL_SCENARIO_FOREIGN") == "1"
    ns_opt = os.environ.get("VIGIL_SCENARIO_NS", "auto")
    use_ns = can_unshare() if ns_opt == "auto" else ns_opt == "1"

    if os.environ.get("VIGIL_SKIP_BUILD") != "1":
        subprocess.run(["cargo", "build", "--quiet", "--workspace", "--features", "vigil-interposer/fault-injection"],
                       cwd=ROOT, check=True)

    tmp = Path(tempfile.mkdtemp(prefix="vigil-scenario-"))
    lib = tmp / "lib"
    subprocess.run([str(BIN / "vigil-gpusim"), "install-libs", str(lib)], check=True, stdout=subprocess.DEVNULL)
    sock = tmp / "gpu.sock"
    region = Path(os.environ.get("VIGIL_SCENARIO_REGION") or tmp / "region.cache")
    daemon = subprocess.Popen([str(BIN / "vigil-gpusim"), "--socket", str(sock), "--devices", "1", "--memory", "80GiB",
                               "--ctx-create-time", f"{ctx_ms}ms", "--nvml-lag", lag_spec, "--pid-mode", pid_mode],
                              stdout=subprocess.PIPE, text=True)
    daemon.stdout.readline()
    base_env = dict(os.environ, VIGIL_GPUSIM_SOCKET=str(sock), LD_LIBRARY_PATH=str(lib), LIBCUDA_LOG_LEVEL="3",
                    CUDA_DEVICE_MEMORY_SHARED_CACHE=str(region))
    if os.environ.get("VIGIL_SCENARIO_LIMIT"):
        base_env["CUDA_DEVICE_MEMORY_LIMIT"] = os.environ["VIGIL_SCENARIO_LIMIT"]
    print(f"scenario: N={n} ctx={ctx_ms}ms lag-after-creation={os.environ.get('VIGIL_SCENARIO_LAG', '80ms')} "
          f"(simulator lag {lag_spec}) pid_mode={pid_mode} pid_namespaces={use_ns} "
          f"kill_holder={kill_hold or 'no'} foreign={foreign}")

    def spawn(i, extra_env=None, preload=True, args=(), own_ns=True):
        env = dict(base_env, **(extra_env or {}))
        if preload:
            env["LD_PRELOAD"] = str(BIN / "libvigil.so")
        cmd = [str(BIN / "vigil-workload"), "--alloc", "64MiB", "--exit", "normal", *args]
        if use_ns and own_ns:
            cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *cmd]
        log = open(tmp / f"w{i}.log", "w")
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        truth = children(p.pid) if use_ns and own_ns else p.pid
        return p, truth

    fault = os.environ.get("VIGIL_SCENARIO_FAULT")
    start = time.monotonic()
    procs, truths, killed = [], [], []
    t_kill_ns = None
    first = 0
    death = {}
    if fault:
        # Not in a namespace of its own: the harness must see the death itself, not an
        # unshare parent's exit some time later.
        victim, vtruth = spawn(0, {"VIGIL_FAULT": fault}, own_ns=False)
        procs.append(victim)
        truths.append(vtruth)
        killed.append(0)
        first = 1

        def watch():
            victim.wait()
            death["ns"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        threading.Thread(target=watch, daemon=True).start()
        # Let the victim get going, so the others arrive while it is (or was) inside.
        time.sleep(0.03)
    if kill_hold:
        victim, vtruth = spawn(0, {"VIGIL_TEST_HOLD_DETECT_MS": kill_hold})
        procs.append(victim)
        truths.append(vtruth)
        first = 1
        # Wait until the victim holds the detection lock.
        end = time.monotonic() + 10
        while time.monotonic() < end:
            out = subprocess.run([str(BIN / "vigil-region"), "inspect", str(region)], capture_output=True, text=True).stdout
            if re.search(r"lock detect: owner=\d+", out):
                break
            time.sleep(0.002)
    for i in range(first, n):
        p, t = spawn(i)
        procs.append(p)
        truths.append(t)
    foreign_pid = None
    if foreign:
        time.sleep((ctx_ms + lag_mean) * min(n, 3) / 1000 / 2)
        fp, foreign_pid = spawn("foreign", preload=False, args=("--hold", "400ms"))
        procs.append(fp)
    if kill_hold:
        time.sleep(float(kill_hold) / 2000)
        t_kill_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        procs[0].send_signal(signal.SIGKILL)
        killed.append(0)
    for p in procs:
        p.wait()
    total = time.monotonic() - start
    if fault:
        # One more process, after everyone: its start reaps the victim's slot (as any
        # later process would) and its exit leaves accounting where the live hold it.
        reaper, _ = spawn("reaper")
        reaper.wait()
    daemon.terminate()
    daemon.wait()

    logs = [open(tmp / f"w{i}.log").read() for i in range(n)]
    completed = sum(1 for i, lg in enumerate(logs) if i not in killed and "freed" in lg)
    alloc_failures = sum(1 for lg in logs if "call=cuMemAlloc" in lg)
    lost = {}
    evs = events(region, lost)
    inits = [e for e in evs if e.get("kind") == "init"]
    dets = [e for e in evs if e.get("kind") == "detection"]
    force = [e for e in evs if e.get("kind") == "force_post"]
    if fault:
        inits = inits[:-1]  # the reaper's
        dets = dets[:-1]
    initializers = sum(1 for e in inits if e.get("path") in ("0", "2"))
    fast_path = sum(1 for e in inits if e.get("path") == "1")
    expected = set(t for i, t in enumerate(truths) if i not in killed and t)
    found = [e for e in dets if e["outcome"] in ("found", "same_namespace")]
    recorded = [int(e["host_pid"]) for e in dets if int(e["host_pid"]) != 0]
    namespace_pids = pid_mode in ("namespace", "caller")
    if namespace_pids:
        correct = sum(1 for e in dets if e["outcome"] == "same_namespace")
    else:
        correct = len(set(recorded) & expected) if len(recorded) == len(set(recorded)) else 0
    lat = sorted(int(e["latency_ns"]) / 1e6 for e in dets)
    p50 = statistics.median(lat) if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
    floor = n * (ctx_ms + lag_mean) / 1000
    survivors = n - len(killed)

    # A victim killed in the middle of initializing emits no init event.
    fast_expected = n - 2 if fault == "region.init.mid" else n - 1
    if fault == "ring.mid_write":
        initializers += 1  # its init event is the one it died writing (counted lost)
    checks = [
        ("exactly one initializer", initializers == 1, f"{initializers}"),
        (f"fast path for the other {fast_expected}", fast_path == fast_expected, f"{fast_path}"),
        ("total time within 1.15 x floor + 0.5 s", total <= 1.15 * floor + 0.5, f"{total:.2f} s vs floor {floor:.2f} s"),
        ("no allocation failures", alloc_failures == 0, f"{alloc_failures}"),
        (f"all {survivors} completed", completed == survivors, f"{completed}"),
    ]
    if namespace_pids:
        checks.append((f"all {survivors} report same_namespace", correct == survivors, f"{correct}"))
    elif foreign:
        bad = [e for e in dets if e["outcome"] not in ("found", "ambiguous", "same_namespace")
               or (int(e["host_pid"]) != 0 and int(e["host_pid"]) not in expected)]
        checks.append(("nobody recorded the foreign PID", foreign_pid not in recorded, f"foreign={foreign_pid}"))
        checks.append(("each found its own PID or reported ambiguous", not bad and len(dets) == survivors,
                       f"found={len(found)} ambiguous={sum(1 for e in dets if e['outcome'] == 'ambiguous')}"))
    elif fault:
        checks.append((f"all {survivors} survivors found their host PID", correct == survivors,
                       f"found={len(found)} correct={correct}"))
    else:
        checks.append((f"all {survivors} found their host PID", correct == survivors and len(found) == survivors,
                       f"found={len(found)} correct={correct}"))
    limit_set = bool(os.environ.get("VIGIL_SCENARIO_LIMIT"))
    mem = None
    if limit_set:
        out = subprocess.run([str(BIN / "vigil-region"), "inspect", str(region)], capture_output=True, text=True).stdout
        m = re.search(r"device 0: limit=(\d+) used=(\d+) peak=(\d+) denials=(\d+)", out)
        mem = {k: int(v) for k, v in zip(("limit", "used", "peak", "denials"), m.groups())} if m else None
        checks.append(("memory limit recorded", mem is not None and mem["limit"] > 0, f"{mem}"))
        if mem:
            checks.append(("device memory back to 0 after the run", mem["used"] == 0, f"used={mem['used']}"))
            checks.append(("peak within the limit", mem["peak"] <= mem["limit"], f"peak={mem['peak']}"))
    force_delay_ms = None
    if kill_hold:
        force_delay_ms = (int(force[0]["ts_ns"]) - t_kill_ns) / 1e6 if force else None
        checks.append(("one force-post", len(force) == 1, f"{len(force)}"))
        checks.append(("taken over within 100 ms of the kill", force_delay_ms is not None and force_delay_ms <= 100,
                       f"{force_delay_ms} ms"))
    fault_report = None
    if fault:
        snap = subprocess.run([str(BIN / "vigil-region"), "inspect", str(region)], capture_output=True, text=True)
        valid = snap.returncode == 0
        counters = dict(re.findall(r"^\s+(\w+)=(\d+)$", snap.stdout, re.M))
        used = re.search(r"device 0: limit=\d+ used=(\d+)", snap.stdout)
        used = int(used.group(1)) if used else None
        want_force = LOCK_FAULTS.get(fault, 0)
        extra_ms = 0.0
        if fault in LOCK_FAULTS and force and "ns" in death:
            # How long each taker waited because of the dead owner: from the death (if
            # it was already waiting) or from when it started waiting, whichever is later.
            extra_ms = max(max(0.0, min(int(e["ts_ns"]) - death["ns"], int(e["held_ns"])) / 1e6) for e in force)
        elif fault == "region.init.mid":
            rec = [int(e["duration_ns"]) / 1e6 for e in inits if e.get("path") == "2"]
            extra_ms = max(rec) if rec else float("inf")
        inits_counted = int(counters.get("ProcessInitsInitializer", 0)) + int(counters.get("ProcessInitsFastPath", 0))
        reclaimed = int(counters.get("SlotsReclaimedDead", 0))
        init_ctr = int(counters.get("ProcessInitsInitializer", 0))
        checks = [c for c in checks if c[0] != "exactly one initializer"]
        checks += [
            ("exactly one initializer (counter)", init_ctr == 1, f"{init_ctr}"),
            ("the victim died at the fault point", procs[0].returncode != 0 and "freed" not in logs[0],
             f"rc={procs[0].returncode}"),
            ("the region still validates", valid, snap.stderr.strip()),
            (f"{want_force} force-post(s)", len(force) == want_force, f"{len(force)}"),
            ("no survivor waited more than 100 ms after the death", extra_ms <= 100, f"{extra_ms:.1f} ms"),
            ("init counters match init events (+ reaper, + events lost)",
             inits_counted == len(inits) + 1 + sum(lost.values()),
             f"{inits_counted} vs {len(inits)} + 1 + {sum(lost.values())}"),
            ("at most the victim's slot reclaimed", reclaimed <= 1, f"{reclaimed}"),
            ("memory accounting back to 0", used == 0, f"used={used}"),
        ]
        fault_report = {"fault_point": fault, "extra_wait_ms": round(extra_ms, 2), "slots_reclaimed": reclaimed,
                        "mem_used_after": used, "lost_events": lost}
    ok = True
    for name, passed, detail in checks:
        ok &= passed
        print(f"{'✓ PASS' if passed else '✗ FAIL'}: {name} ({detail})")
    if not ok:
        print(f"logs kept in {tmp}")
    summary = {"procs": n, "inits": len(inits), "detections": len(dets), "initializers": initializers, "fast_path": fast_path, "completed": completed,
               "host_pid_found": len(found), "host_pid_correct": correct, "alloc_failures": alloc_failures,
               "force_posts": len(force), "total_seconds": round(total, 3), "floor_seconds": round(floor, 3),
               "detect_ms_p50": round(p50, 1), "detect_ms_p99": round(p99, 1)}
    if force_delay_ms is not None:
        summary["force_post_delay_ms"] = round(force_delay_ms, 2)
    if fault_report:
        summary.update(fault_report)
    if mem:
        summary["mem_limit_bytes"] = mem["limit"]
        summary["mem_peak_bytes"] = mem["peak"]
        summary["mem_denials"] = mem["denials"]
    print(json.dumps(summary))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
