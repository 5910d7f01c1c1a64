"""Multi-process start-up scenario for libvigil.so (driven by run_comprehensive_tests.sh).

Every workload is spawned first, each in its own PID namespace when unshare works
(`unshare --pid --fork --kill-child --mount-proc`), and waits at a barrier
(`vigil-workload --wait-for FILE`); the harness learns each one's true host PID from
/proc, then creates FILE and releases them all at once. Workloads are split
round-robin across K "containers" (K region files that cannot see each other).

Defaults are the design document's measured figures: 200 ms context creation and an
80 ms NVML lag *after* creation. The simulator counts its lag from the start of
creation (that is what a real H100 does, see gpusim/README.md), so the lag given in
VIGIL_SCENARIO_LAG is added to the creation time before it is passed on;
VIGIL_SCENARIO_SIM_LAG passes the simulator's own spec unchanged instead.

Environment:
  VIGIL_DETECT_MODE         parallel (default) or serial: the interposer's host-PID
                            detection scheme; passed to every workload, and it decides which
                            checks apply (serial: detection is serialized per region, so the
                            run is timed against N x (ctx + lag); parallel: only that nobody
                            stalled) and how many force-posts each fault point means
  VIGIL_SCENARIO_CTX        context creation time (default 200ms)
  VIGIL_SCENARIO_LAG        NVML lag after creation: DURATION or uniform:MIN..MAX (default 80ms)
  VIGIL_SCENARIO_SIM_LAG    instead of VIGIL_SCENARIO_LAG: the simulator's --nvml-lag spec,
                            unchanged (counted from creation start), e.g. uniform:22ms..50ms
                            (an H100's, with VIGIL_SCENARIO_CTX=130ms); or `default`: pass
                            neither --nvml-lag nor --ctx-create-time (the simulator's
                            defaults: 130 ms creation, uniform:20ms..200ms)
  VIGIL_SCENARIO_MEM_LAG    if set: passed to the simulator as --nvml-mem-lag
  VIGIL_SCENARIO_SEED       if set: the simulator's --seed (its lag draws)
  VIGIL_SCENARIO_CONTAINERS K region files ("containers", default 1); workload i joins
                            container i mod K
  VIGIL_SCENARIO_PID_MODE   host (default), namespace (driver reports each process's own
                            namespace PID) or caller (PIDs translated into the caller's
                            namespace, as the 580 driver does)
  VIGIL_SCENARIO_MIN_FOUND  fraction of the surviving workloads that must find their own
                            host PID (default 1.0; 0 with VIGIL_SCENARIO_EXPECT_REFUSALS=1,
                            where a workload may find no room under the limit for a detection
                            marker); a wrong PID fails the run regardless
  VIGIL_SCENARIO_KILL_HOLDER_MS   if set: the first workload holds the detection lock
                            (serial) or the region lock (parallel) this long at the test hold
                            point and is SIGKILLed half-way through
  VIGIL_SCENARIO_FOREIGN    if 1: a process outside every region creates a context mid-run
                            (serial: part-way through; parallel: released with the others)
  VIGIL_SCENARIO_NS         auto (default), 1 or 0: one PID namespace per workload
  VIGIL_SCENARIO_REGION     region file to use (default: a fresh one in a temp dir); an
                            exporter watching its directory sees the run. With K > 1,
                            container k > 0 uses <dir>-c<k>/<name> beside it
  VIGIL_SCENARIO_ALLOC      each workload's allocation (default 64MiB)
  VIGIL_SCENARIO_HOLD       how long each workload holds it before freeing (default 0; with
                            VIGIL_SCENARIO_EXPECT_REFUSALS=1, long enough for every
                            workload's start-up to overlap: the serial floor + 0.5 s)
  VIGIL_SCENARIO_LIMIT      if set: CUDA_DEVICE_MEMORY_LIMIT for every workload (e.g. 4g)
  VIGIL_SCENARIO_EXPECT_REFUSALS  if 1: allocations may be refused (the limit is meant to
                            be too small); every refusal must then be a clean
                            CUDA_ERROR_OUT_OF_MEMORY and the simulator's true device peak
                            must stay within the limit(s). The region's own peak, which
                            counts context charges that cannot be refused, is then printed
                            as INFO instead of checked
  VIGIL_SCENARIO_FAULT      if set: the first workload runs with VIGIL_FAULT=<point> and is
                            SIGKILLed there (see tests/kill_sweep.py for the points); the
                            run then checks recovery, counters and accounting
  VIGIL_SKIP_BUILD          if 1: use the binaries already in target/debug
  VIGIL_KEEP                1: keep the temp dir (logs, regions, workloads.json); failed:
                            keep it only when the run fails (see tests/harness.py)

Prints one PASS/FAIL line per check and, last, a JSON summary; exits non-zero on any
FAIL. The temp dir (logs) is removed at the end unless VIGIL_KEEP asks to keep it.
"""
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import BIN, UNSHARE, can_unshare, children, events, reap  # noqa: E402

# How long the workloads may take, from their release to their exit, before the run is
# declared hung and everything is killed.
RUN_LIMIT_S = 180.0


def detect_mode():
    mode = os.environ.get("VIGIL_DETECT_MODE", "parallel") or "parallel"
    if mode not in ("parallel", "serial"):
        sys.exit(f"VIGIL_DETECT_MODE={mode!r}: expected parallel or serial")
    return mode


def ms(text, name):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(ms|s|us|ns)\s*", text)
    if not m:
        sys.exit(f"{name}={text!r} is not a duration (e.g. 80ms, 1.5s)")
    v, unit = float(m.group(1)), m.group(2)
    return v * {"ms": 1, "s": 1000, "us": 0.001, "ns": 1e-6}[unit]


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


def lag_sampler(spec, name):
    """A function drawing one lag (ms, from creation start) from a simulator lag spec."""
    t = spec.strip()
    kind, _, rest = t.partition(":") if ":" in t else ("fixed", "", t)
    if kind == "fixed":
        v = ms(rest, name)
        return lambda r: v
    if kind == "uniform":
        lo, _, hi = rest.partition("..")
        a, b = ms(lo, name), ms(hi, name)
        if a > b:
            sys.exit(f"{name}={spec!r}: MIN > MAX")
        return lambda r: r.uniform(a, b)
    if kind == "exp":
        mean = ms(rest, name)
        return lambda r: r.expovariate(1 / mean) if mean > 0 else 0.0
    if kind == "lognormal":
        med, _, sg = rest.partition(",")
        m, sigma = ms(med, name), float(sg)
        return lambda r: m * math.exp(sigma * r.gauss(0, 1))
    sys.exit(f"{name}={spec!r}: expected DURATION, fixed:D, uniform:MIN..MAX, exp:MEAN or lognormal:MEDIAN,SIGMA")


def lag_model(ctx_ms, sim_spec, name):
    """(expected time a detection takes, E[max(ctx, lag)], and a high bound, ~p99.9 of
    max(ctx, lag)), both in ms, for a lag counted from creation start."""
    draw = lag_sampler(sim_spec, name)
    r = random.Random(1)
    xs = sorted(max(ctx_ms, draw(r)) for _ in range(20000))
    return statistics.fmean(xs), xs[int(len(xs) * 0.999)]


# Fault points whose victim dies holding locks: each must be force-posted exactly this
# many times. Serial: region_lock.held is first reached charging the context footprint,
# inside detection, so the victim dies holding both locks. Parallel: there is no
# detection lock, except that under a limit a region's first processes create their
# contexts one at a time under it until one is measured; the victim (the region's first
# process) then dies holding it at detect.before_ctx, and with the region lock at
# region_lock.held (its first charge). detect.after_ctx comes after that lock is
# released; detect.marker_held dies with a charged detection marker and no lock (the
# reaper must return the marker).
LOCK_FAULTS_BY_MODE = {
    "serial": {"detect.before_ctx": 1, "detect.after_ctx": 1, "region_lock.held": 2, "mem.reserve.mid": 1},
    "parallel": {"detect.before_ctx": 0, "detect.after_ctx": 0, "detect.marker_held": 0, "region_lock.held": 1,
                 "mem.reserve.mid": 1},
    "parallel-limited": {"detect.before_ctx": 1, "detect.after_ctx": 0, "detect.marker_held": 0,
                         "region_lock.held": 2, "mem.reserve.mid": 1},
}
LOCK_FAULTS = LOCK_FAULTS_BY_MODE[
    "parallel-limited" if detect_mode() == "parallel" and os.environ.get("VIGIL_SCENARIO_LIMIT") else detect_mode()]

# What each workload's own log says detection did (LIBCUDA_LOG_LEVEL=3).
RE_FOUND = re.compile(r"host PID (\d+) found")
RE_SAME_NS = re.compile(r"the driver reports namespace PIDs: our PID (\d+)")
RE_AMBIGUOUS = re.compile(r"host PID ambiguous")
RE_CTX = re.compile(r"^ctx pid=\d+ .*?ts_ns=(\d+)", re.M)
RE_ALLOC_ERR = re.compile(r"^error call=(cuMemAlloc\S*|cuMemCreate) code=(\d+)", re.M)
CUDA_ERROR_OUT_OF_MEMORY = 2


def outcome_of(log, truth, pid_mode):
    """(outcome, recorded PID or None) for one workload, from its own log. outcome is
    correct, wrong, ambiguous or not_found."""
    m = RE_FOUND.search(log)
    if m:
        pid = int(m.group(1))
        return ("correct" if truth is not None and pid == truth else "wrong"), pid
    m = RE_SAME_NS.search(log)
    if m:
        pid = int(m.group(1))
        if pid_mode in ("namespace", "caller"):
            return "correct", pid
        # Host mode: NVML showed the PID we see ourselves; right only outside a namespace.
        return ("correct" if truth is not None and pid == truth else "wrong"), pid
    if RE_AMBIGUOUS.search(log):
        return "ambiguous", None
    return "not_found", None


def parse_size(text, name):
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b?)\s*", text, re.I)
    if not m:
        sys.exit(f"{name}={text!r} is not a size (e.g. 64MiB, 1g)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else 0.0


def main():
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        sys.exit("usage: tests/run_comprehensive_tests.sh N   (N >= 1 workloads)")
    n = int(sys.argv[1])
    mode = detect_mode()
    env = os.environ.get
    ctx_ms = ms(env("VIGIL_SCENARIO_CTX", "200ms"), "VIGIL_SCENARIO_CTX")
    sim_lag = env("VIGIL_SCENARIO_SIM_LAG")
    if sim_lag and env("VIGIL_SCENARIO_LAG"):
        sys.exit("set VIGIL_SCENARIO_LAG or VIGIL_SCENARIO_SIM_LAG, not both")
    if sim_lag == "default":
        if env("VIGIL_SCENARIO_CTX"):
            sys.exit("VIGIL_SCENARIO_SIM_LAG=default uses the simulator's creation time: unset VIGIL_SCENARIO_CTX")
        ctx_ms, lag_spec = 130.0, "uniform:20ms..200ms"  # the simulator's defaults
        sim_args = []
        lag_desc = "simulator default"
    elif sim_lag:
        lag_spec = sim_lag
        sim_args = ["--ctx-create-time", f"{ctx_ms}ms", "--nvml-lag", lag_spec]
        lag_desc = f"{lag_spec} from creation start"
    else:
        lag_spec, _ = lag_after(env("VIGIL_SCENARIO_LAG", "80ms"), ctx_ms)
        sim_args = ["--ctx-create-time", f"{ctx_ms}ms", "--nvml-lag", lag_spec]
        lag_desc = f"{env('VIGIL_SCENARIO_LAG', '80ms')} after creation"
    per_ms, per_max_ms = lag_model(ctx_ms, lag_spec, "VIGIL_SCENARIO_SIM_LAG" if sim_lag else "VIGIL_SCENARIO_LAG")
    if env("VIGIL_SCENARIO_MEM_LAG"):
        sim_args += ["--nvml-mem-lag", env("VIGIL_SCENARIO_MEM_LAG")]
    if env("VIGIL_SCENARIO_SEED"):
        sim_args += ["--seed", env("VIGIL_SCENARIO_SEED")]
    k_text = env("VIGIL_SCENARIO_CONTAINERS", "1") or "1"
    k = int(k_text) if k_text.isdigit() else 0
    if not 1 <= k <= n:
        sys.exit(f"VIGIL_SCENARIO_CONTAINERS={k_text!r}: expected a number of containers from 1 to N={n}")
    pid_mode = env("VIGIL_SCENARIO_PID_MODE", "host")
    kill_hold = env("VIGIL_SCENARIO_KILL_HOLDER_MS")
    foreign = env("VIGIL_SCENARIO_FOREIGN") == "1"
    ns_opt = env("VIGIL_SCENARIO_NS", "auto")
    use_ns = can_unshare() if ns_opt == "auto" else ns_opt == "1"
    alloc = env("VIGIL_SCENARIO_ALLOC", "64MiB") or "64MiB"
    parse_size(alloc, "VIGIL_SCENARIO_ALLOC")
    limit = env("VIGIL_SCENARIO_LIMIT")
    expect_refusals = env("VIGIL_SCENARIO_EXPECT_REFUSALS") == "1"
    try:
        min_found = float(env("VIGIL_SCENARIO_MIN_FOUND") or ("0" if expect_refusals else "1.0"))
    except ValueError:
        sys.exit(f"VIGIL_SCENARIO_MIN_FOUND={env('VIGIL_SCENARIO_MIN_FOUND')!r}: expected a fraction, e.g. 0.99")
    if env("VIGIL_SCENARIO_HOLD"):
        hold_ms = ms(env("VIGIL_SCENARIO_HOLD"), "VIGIL_SCENARIO_HOLD")
    elif expect_refusals:
        # Everyone holds until the last one (even one serialized behind all the others)
        # has started, so the allocations really race for the limit.
        hold_ms = round(-(-n // k) * per_ms + 500)
    else:
        hold_ms = 0.0
    fault = env("VIGIL_SCENARIO_FAULT")
    if fault and kill_hold:
        sys.exit("VIGIL_SCENARIO_FAULT and VIGIL_SCENARIO_KILL_HOLDER_MS do not combine")

    harness.build()
    harness.exit_on_sigterm()

    ok = False
    with harness.TempDir("vigil-scenario-") as work:
        tmp = work.path
        # Every Popen we started (workloads, victim, foreign, reaper), and the simulator.
        state = {"procs": [], "sim": None}
        try:
            ok = scenario(n, mode, k, ctx_ms, lag_spec, lag_desc, per_ms, per_max_ms, sim_args, pid_mode, kill_hold,
                          foreign, use_ns, min_found, alloc, hold_ms, limit, expect_refusals, fault, tmp, state)
        finally:
            reap(state["procs"])
            if state["sim"] is not None:
                state["sim"].stop()
            work.failed = not ok
            if not ok and not work.keep():
                print(f"logs removed with {tmp} ({harness.KEEP_ENV}=failed keeps them)", file=sys.stderr)
    sys.exit(0 if ok else 1)


def scenario(n, mode, k, ctx_ms, lag_spec, lag_desc, per_ms, per_max_ms, sim_args, pid_mode, kill_hold, foreign,
             use_ns, min_found, alloc, hold_ms, limit, expect_refusals, fault, tmp, state):
    procs = state["procs"]
    sim = harness.Simulator(tmp, ["--devices", "1", "--memory", "80GiB", "--pid-mode", pid_mode, *sim_args])
    state["sim"] = sim
    base = os.environ.get("VIGIL_SCENARIO_REGION")
    if base:
        base = Path(base)
        regions = [base] + [base.parent.with_name(f"{base.parent.name}-c{c}") / base.name for c in range(1, k)]
    else:
        regions = [tmp / "region.cache"] if k == 1 else [tmp / f"c{c}" / "region.cache" for c in range(k)]
    for r in regions:
        r.parent.mkdir(parents=True, exist_ok=True)
    step = "install-libs failed"
    try:
        sim.install_libs()
        step = "the simulator did not start"
        sim.start()
    except harness.HarnessError as e:
        print(f"✗ FAIL: {e}" if sim.proc else f"✗ FAIL: install the simulator's libraries ({e})")
        print(json.dumps({"procs": n, "error": step}))
        return False
    base_env = dict(os.environ, **sim.env(), LIBCUDA_LOG_LEVEL="3", VIGIL_DETECT_MODE=mode)
    if limit:
        base_env["CUDA_DEVICE_MEMORY_LIMIT"] = limit
    print(f"scenario: N={n} containers={k} detect_mode={mode} ctx={ctx_ms}ms lag={lag_desc} "
          f"(simulator lag {lag_spec}) pid_mode={pid_mode} pid_namespaces={use_ns} alloc={alloc} hold={hold_ms:g}ms "
          f"limit={limit or 'none'} kill_holder={kill_hold or 'no'} foreign={foreign} fault={fault or 'none'}")
    barrier = tmp / "go"
    container = [i % k for i in range(n)]

    def spawn(i, extra_env=None, preload=True, args=(), own_ns=True, wait=barrier, region=None):
        e = dict(base_env, **(extra_env or {}))
        e["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = str(region or regions[container[i] if isinstance(i, int) else 0])
        if preload:
            e["LD_PRELOAD"] = str(BIN / "libvigil.so")
        cmd = [str(BIN / "vigil-workload"), "--alloc", alloc, "--exit", "normal",
               *(("--hold", f"{hold_ms}ms") if hold_ms and not args else ()), *args]
        if wait:
            cmd += ["--wait-for", str(wait)]
        if use_ns and own_ns:
            cmd = [*UNSHARE, *cmd]
        log = open(tmp / f"w{i}.log", "w")
        p = subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(p)
        truth = children(p.pid) if use_ns and own_ns else p.pid
        p.vigil_child = truth if use_ns and own_ns else None
        return p, truth

    t_spawn = time.monotonic()
    workers = [None] * n  # Popen per workload index
    truths = [None] * n
    killed = set()
    first = 1 if (fault or kill_hold) else 0
    for i in range(first, n):
        workers[i], truths[i] = spawn(i)
    fp, foreign_pid = None, None
    if foreign:
        # Parallel: released with everyone (the hardest case). Serial: part-way
        # through the queue, as before the barrier existed.
        fp, foreign_pid = spawn("foreign", preload=False, args=("--hold", "400ms"),
                                wait=barrier if mode == "parallel" else tmp / "go-foreign")
    spawn_s = time.monotonic() - t_spawn
    death = {}
    hold_seen = None
    if fault:
        # Not in a namespace of its own: the harness must see the death itself, not an
        # unshare parent's exit some time later. Released at once; the others 30 ms later.
        # Except at detect.marker_held: markers are only taken where NVML shows another
        # PID than our own, i.e. in a namespace (unshare exits as its child dies).
        workers[0], truths[0] = spawn(0, {"VIGIL_FAULT": fault}, own_ns=fault == "detect.marker_held", wait=None)
        killed.add(0)
        victim = workers[0]

        def watch():
            victim.wait()
            death["ns"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        threading.Thread(target=watch, daemon=True).start()
        time.sleep(0.03)
    t_kill_ns = None
    if kill_hold:
        workers[0], truths[0] = spawn(0, {"VIGIL_TEST_HOLD_DETECT_MS": kill_hold}, wait=None)
        # Wait until the victim holds the lock its mode holds at the test hold point:
        # the detection lock (serial) or the region lock (parallel), as the region's
        # state (vigil-exporter inspect --json) names its owner slot.
        lock_name = "detect" if mode == "serial" else "region"
        end = time.monotonic() + 10
        t0 = time.monotonic()
        hold_seen = False
        while time.monotonic() < end and workers[0].poll() is None:
            held = harness.lock_owner(harness.inspect(regions[0])[0], lock_name) is not None
            said = "test hold point" in (tmp / "w0.log").read_text(errors="replace")
            # The log line confirms it is the hold and not a short bookkeeping hold;
            # if its wording changes, the lock alone is accepted after a second.
            if held and (said or time.monotonic() - t0 > 1.0):
                hold_seen = True
                break
            time.sleep(0.002)
    release_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    barrier.touch()
    release = time.monotonic()
    if foreign and mode == "serial":
        time.sleep(per_ms * min(n, 3) / 1000 / 2)
        (tmp / "go-foreign").touch()
    if kill_hold:
        time.sleep(float(kill_hold) / 2000)
        t_kill_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        workers[0].send_signal(signal.SIGKILL)
        killed.add(0)
    hung = []
    deadline = release + RUN_LIMIT_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(p.pid)
    if hung:
        reap(procs)
    total = time.monotonic() - release
    if fault:
        # One more process, after everyone: its start reaps the victim's slot (as any
        # later process would) and its exit leaves accounting where the live hold it.
        reaper, _ = spawn("reaper", wait=None, region=regions[0])
        try:
            reaper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            hung.append(reaper.pid)
            reap(procs)
    device_peak = sim.stats().get("peak")
    sim.stop()

    return report(locals())


def report(v):
    """Evaluates a finished run (the locals of `scenario`); prints checks and JSON."""
    n, k, mode, tmp, regions, container = v["n"], v["k"], v["mode"], v["tmp"], v["regions"], v["container"]
    truths, killed, fault, kill_hold = v["truths"], v["killed"], v["fault"], v["kill_hold"]
    pid_mode, foreign, expect_refusals = v["pid_mode"], v["foreign"], v["expect_refusals"]
    namespace_pids = pid_mode in ("namespace", "caller")
    logs = [(tmp / f"w{i}.log").read_text(errors="replace") for i in range(n)]

    # Per workload: outcome from its own log against its own truth.
    outcomes, recorded_by = [], {}
    ready_ms = []
    for i, lg in enumerate(logs):
        if i in killed:
            outcomes.append(None)
            continue
        out, pid = outcome_of(lg, truths[i], pid_mode)
        outcomes.append(out)
        if pid is not None:
            recorded_by[i] = pid
        m = RE_CTX.search(lg)
        if m:
            ready_ms.append((int(m.group(1)) - v["release_ns"]) / 1e6)
    survivors = n - len(killed)
    not_ready = survivors - len(ready_ms)
    tally = {o: sum(1 for x in outcomes if x == o) for o in ("correct", "wrong", "ambiguous", "not_found")}
    owner = {t: i for i, t in enumerate(truths) if t}
    # Kept with the logs: who was who.
    with open(tmp / "workloads.json", "w") as f:
        json.dump([{"index": i, "container": container[i], "region": str(regions[container[i]]), "truth": truths[i],
                    "outcome": outcomes[i], "recorded": recorded_by.get(i), "killed": i in killed,
                    "recorded_is_truth_of": owner.get(recorded_by.get(i))} for i in range(n)], f, indent=1)

    refusals = [(i, m.group(1), int(m.group(2))) for i, lg in enumerate(logs) for m in RE_ALLOC_ERR.finditer(lg)]
    alloc_failures = sum(1 for lg in logs if "call=cuMemAlloc" in lg)
    clean_refused = {i for i, _, code in refusals if code == CUDA_ERROR_OUT_OF_MEMORY}
    completed = sum(1 for i, lg in enumerate(logs) if i not in killed and "freed" in lg)
    if expect_refusals:
        completed += sum(1 for i in clean_refused if i not in killed and "freed" not in logs[i])

    # Per container: the event ring.
    per, all_inits, all_dets, all_force, all_lost = [], [], [], [], {}
    checks = []
    for c, region in enumerate(regions):
        lost, st = {}, {}
        evs = events(region, lost, st)
        for kk, vv in lost.items():
            all_lost[kk] = all_lost.get(kk, 0) + vv
        inits = [e for e in evs if e.get("kind") == "init"]
        dets = [e for e in evs if e.get("kind") == "detection"]
        force = [e for e in evs if e.get("kind") == "force_post"]
        if fault and c == 0:
            inits = inits[:-1]  # the reaper's
            dets = dets[:-1]
        members = [i for i in range(n) if container[i] == c]
        n_c = len(members)
        initializers = sum(1 for e in inits if e.get("path") in ("initializer", "recovered"))
        fast_path = sum(1 for e in inits if e.get("path") == "fast_path")
        fast_expected = n_c - 1
        if fault and c == 0:
            # A victim killed in the middle of initializing emits no init event.
            if fault == "region.init.mid":
                fast_expected = n_c - 2
            if fault == "ring.mid_write":
                initializers += 1  # its init event is the one it died writing (counted lost)
        truth_set = {truths[i] for i in members if truths[i]}
        # Belt and braces: a PID in the ring that belongs to nobody of this container.
        ring_wrong = [int(e["host_pid"]) for e in dets if int(e.get("host_pid", 0)) != 0
                      and not namespace_pids and int(e["host_pid"]) not in truth_set]
        row = {"region": str(region), "procs": n_c,
               **{o: sum(1 for i in members if outcomes[i] == o) for o in ("correct", "wrong", "ambiguous", "not_found")},
               "initializers": initializers, "fast_path": fast_path, "detections": len(dets),
               "force_posts": len(force), "ring_foreign_pids": ring_wrong}
        per.append(row)
        all_inits += inits
        all_dets += dets
        all_force += force
        tag = f"[{c}] " if k > 1 else ""
        checks.append((f"{tag}the region's event ring reads", st["rc"] == 0, st["err"] or "ok"))
        if not (fault and c == 0):  # there: the counter check below
            checks.append((f"{tag}exactly one initializer", initializers == 1, f"{initializers}"))
        checks.append((f"{tag}fast path for the other {fast_expected}", fast_path == fast_expected, f"{fast_path}"))
        alive_c = sum(1 for i in members if i not in killed)
        # A victim may have recorded its detection before it died.
        dead_c = sum(1 for i in members if i in killed)
        checks.append((f"{tag}one detection event per surviving process", alive_c <= len(dets) <= alive_c + dead_c,
                       f"{len(dets)} for {alive_c} survivors" + (f" + {dead_c} killed" if dead_c else "")))
        if not namespace_pids:
            checks.append((f"{tag}every PID in the ring is one of this container's", not ring_wrong,
                           f"foreign={ring_wrong}"))

    # Timing.
    lat = sorted(int(e["latency_ns"]) / 1e6 for e in all_dets)
    p50 = statistics.median(lat) if lat else 0.0
    p99 = percentile(lat, 0.99)
    ready_s = max(ready_ms) / 1000 if ready_ms else float("inf")
    det_ts = [int(e["ts_ns"]) for e in all_dets]
    detected_s = (max(det_ts) - v["release_ns"]) / 1e9 if det_ts else float("inf")
    total = v["total"]
    biggest = max(sum(1 for i in range(n) if container[i] == c) for c in range(k))
    floor = biggest * v["per_ms"] / 1000
    if v["hung"]:
        checks.append((f"every process exited within {RUN_LIMIT_S:.0f} s of the release", False,
                       f"killed hung pids {v['hung']}"))
    if mode == "serial":
        held = v["hold_ms"] / 1000
        checks.append(("total time within 1.15 x floor + 0.5 s", total - held <= 1.15 * floor + 0.5,
                       f"{total:.2f} s" + (f" - {held:g} s held" if held else "")
                       + f" vs floor {floor:.2f} s (serialized per region)"))
    else:
        bound = v["per_max_ms"] / 1000 + 2.0
        if kill_hold:
            bound += float(kill_hold) / 2000
        checks.append(("nobody stalled: all running within max(ctx, lag) + 2 s", ready_s <= bound,
                       f"{ready_s:.2f} s vs bound {bound:.2f} s"))
    checks.append((f"all {survivors} survivors running (ctx line)", not_ready == 0 or expect_refusals,
                   f"{len(ready_ms)} of {survivors}"))
    if expect_refusals:
        unclean = [(i, call, code) for i, call, code in refusals if code != CUDA_ERROR_OUT_OF_MEMORY]
        checks.append(("refusals are clean out-of-memory errors", not unclean,
                       f"{len(refusals)} refused, unclean={unclean}"))
    else:
        checks.append(("no allocation failures", alloc_failures == 0, f"{alloc_failures}"))
    checks.append((f"all {survivors} completed", completed == survivors, f"{completed}"))

    # Host PIDs.
    unknown = [i for i in range(n) if truths[i] is None]
    checks.append(("every workload's true host PID read from /proc", not unknown, f"unknown for {unknown}"
                   if unknown else f"{n}"))
    correct = tally["correct"]
    wrong_detail = [f"w{i} (container {container[i]}) recorded {recorded_by[i]}, its own is {truths[i]}"
                    + (f", {recorded_by[i]} is w{owner[recorded_by[i]]} (container {container[owner[recorded_by[i]]]})"
                       if recorded_by[i] in owner else "")
                    for i in range(n) if outcomes[i] == "wrong"]
    checks.append(("no workload recorded a PID that is not its own", tally["wrong"] == 0,
                   f"wrong={tally['wrong']}" + (": " + "; ".join(wrong_detail) if wrong_detail else "")))
    found_events = [e for e in all_dets if e["outcome"] in ("found", "same_namespace")]
    detail = (f"correct={correct} ambiguous={tally['ambiguous']} not_found={tally['not_found']} "
              f"wrong={tally['wrong']}")
    if namespace_pids:
        checks.append((f"all {survivors} report same_namespace", correct == survivors, detail))
    elif foreign:
        fpid = v["foreign_pid"]
        rec = {int(e["host_pid"]) for e in all_dets}
        checks.append(("nobody recorded the foreign PID", fpid not in rec and fpid not in recorded_by.values(),
                       f"foreign={fpid}"))
        checks.append(("each found its own PID or reported ambiguous",
                       tally["not_found"] == 0 and tally["wrong"] == 0, detail))
    elif v["min_found"] < 1.0:
        frac = correct / survivors if survivors else 1.0
        checks.append((f"at least {v['min_found']:.0%} of {survivors} found their own host PID", frac >= v["min_found"],
                       f"{frac:.1%}: {detail}"))
    else:
        checks.append((f"all {survivors} found their own host PID", correct == survivors, detail))

    # Memory.
    mems, infos = [], []
    if v["limit"]:
        for c, region in enumerate(regions):
            dev = harness.device(harness.inspect(region)[0])
            mem = {kk: dev[f] for kk, f in (("limit", "limit_bytes"), ("used", "used_bytes"), ("peak", "peak_bytes"),
                                             ("denials", "allocation_denials"))} if dev else None
            mems.append(mem)
            tag = f"[{c}] " if k > 1 else ""
            checks.append((f"{tag}memory limit recorded", mem is not None and mem["limit"] > 0, f"{mem}"))
            if mem:
                checks.append((f"{tag}device memory back to 0 after the run", mem["used"] == 0, f"used={mem['used']}"))
                if expect_refusals:
                    over = mem["peak"] - mem["limit"]
                    infos.append(f"{tag}region's own peak {mem['peak']} vs limit {mem['limit']}"
                                 + (f" (over by {over} bytes; it includes context charges)" if over > 0 else ""))
                else:
                    checks.append((f"{tag}peak within the limit (region's own figure)", mem["peak"] <= mem["limit"],
                                   f"peak={mem['peak']} limit={mem['limit']}"))
    device_peak = v["device_peak"]
    if expect_refusals:
        limits = [m["limit"] for m in mems if m]
        bound = sum(limits) if len(limits) == k else None
        checks.append(("true device peak (simulator) within the limit", device_peak is not None and bound is not None
                       and device_peak <= bound,
                       f"device_peak={device_peak} limit={bound}"
                       + (f" (over by {device_peak - bound} bytes)" if device_peak and bound and device_peak > bound
                          else "")))

    force_delay_ms = None
    if kill_hold:
        lock_name = "detect" if mode == "serial" else "region"
        checks.append((f"the victim was seen holding the {lock_name} lock", bool(v["hold_seen"]), f"{v['hold_seen']}"))
        force0 = [e for e in events(regions[0]) if e.get("kind") == "force_post"]
        force_delay_ms = (int(force0[0]["ts_ns"]) - v["t_kill_ns"]) / 1e6 if force0 else None
        checks.append(("one force-post", len(all_force) == 1, f"{len(all_force)}"))
        checks.append(("taken over within 100 ms of the kill", force_delay_ms is not None and force_delay_ms <= 100,
                       f"{force_delay_ms} ms"))
    fault_report = None
    if fault:
        snap, snap_err = harness.inspect(regions[0])
        valid = snap is not None
        counters = harness.counters(snap)
        dev0 = harness.device(snap)
        used = dev0["used_bytes"] if dev0 else None
        want_force = LOCK_FAULTS.get(fault, 0)
        force = [e for e in events(regions[0]) if e.get("kind") == "force_post"]
        inits0 = [e for e in events(regions[0]) if e.get("kind") == "init"][:-1]
        death = v["death"]
        extra_ms = 0.0
        if fault in LOCK_FAULTS and force and "ns" in death:
            # How long each taker waited because of the dead owner: from the death (if
            # it was already waiting) or from when it started waiting, whichever is later.
            extra_ms = max(max(0.0, min(int(e["ts_ns"]) - death["ns"], int(e["held_ns"])) / 1e6) for e in force)
        elif fault == "region.init.mid":
            rec = [int(e["duration_ns"]) / 1e6 for e in inits0 if e.get("path") == "recovered"]
            extra_ms = max(rec) if rec else float("inf")
        inits_counted = int(counters.get("ProcessInitsInitializer", 0)) + int(counters.get("ProcessInitsFastPath", 0))
        reclaimed = int(counters.get("SlotsReclaimedDead", 0))
        init_ctr = int(counters.get("ProcessInitsInitializer", 0))
        lost0 = {}
        events(regions[0], lost0)
        victim = v["workers"][0]
        checks += [
            ("exactly one initializer (counter)", init_ctr == 1, f"{init_ctr}"),
            ("the victim died at the fault point", victim.returncode != 0 and "freed" not in logs[0],
             f"rc={victim.returncode}"),
            ("the region still validates", valid, snap_err),
            (f"{want_force} force-post(s) ({mode} mode)", len(force) == want_force, f"{len(force)}"),
            ("no survivor waited more than 100 ms after the death", extra_ms <= 100, f"{extra_ms:.1f} ms"),
            ("init counters match init events (+ reaper, + events lost)",
             inits_counted == len(inits0) + 1 + sum(lost0.values()),
             f"{inits_counted} vs {len(inits0)} + 1 + {sum(lost0.values())}"),
            ("at most the victim's slot reclaimed", reclaimed <= 1, f"{reclaimed}"),
            ("memory accounting back to 0", used == 0, f"used={used}"),
        ]
        fault_report = {"fault_point": fault, "extra_wait_ms": round(extra_ms, 2), "slots_reclaimed": reclaimed,
                        "mem_used_after": used, "lost_events": lost0}

    ok = harness.print_checks(checks)
    for line in infos:
        print(f"· INFO: {line}")
    initializers = sum(r["initializers"] for r in per)
    fast_path = sum(r["fast_path"] for r in per)
    summary = {"procs": n, "detect_mode": mode, "containers_n": k, "inits": len(all_inits), "detections": len(all_dets),
               "initializers": initializers, "fast_path": fast_path, "completed": completed,
               "host_pid_found": len(found_events), "host_pid_correct": correct,
               "correct": correct, "wrong": tally["wrong"], "ambiguous": tally["ambiguous"],
               "not_found": tally["not_found"], "survivors": survivors,
               "alloc_failures": alloc_failures, "refusals": len(refusals),
               "force_posts": len(all_force),
               "ready_seconds": round(ready_s, 3) if math.isfinite(ready_s) else None,
               "detected_seconds": round(detected_s, 3) if math.isfinite(detected_s) else None,
               "ready_ms_p50": round(statistics.median(ready_ms), 1) if ready_ms else None,
               "ready_ms_p99": round(percentile(ready_ms, 0.99), 1) if ready_ms else None,
               "total_seconds": round(total, 3), "spawn_seconds": round(v["spawn_s"], 3),
               "hold_seconds": round(v["hold_ms"] / 1000, 3),
               "floor_seconds": round(floor, 3),
               "detect_ms_p50": round(p50, 1), "detect_ms_p99": round(p99, 1),
               "device_peak_bytes": device_peak,
               "containers": [{kk: r[kk] for kk in ("region", "procs", "correct", "wrong", "ambiguous", "not_found",
                                                    "initializers", "detections", "force_posts")} for r in per]}
    if force_delay_ms is not None:
        summary["force_post_delay_ms"] = round(force_delay_ms, 2)
    if fault_report:
        summary.update(fault_report)
    if mems and mems[0]:
        summary["mem_limit_bytes"] = mems[0]["limit"]
        summary["mem_peak_bytes"] = max(m["peak"] for m in mems if m)
        summary["mem_denials"] = sum(m["denials"] for m in mems if m)
    print(json.dumps(summary))
    return ok


if __name__ == "__main__":
    main()
