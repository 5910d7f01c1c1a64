"""Random kills: rounds of a 64-process start-up under LD_PRELOAD against the simulator,
with random processes SIGKILLed at random times, checking DESIGN.md's invariants 1-7
after every round:

 1. exactly one initializer per region (re-initializations only as counted recoveries);
 2. mutual exclusion: no two detections' lock-held windows overlap (serial mode; in the
    default parallel mode processes detect at the same time by design, and invariant 4
    is what guards them);
 3. a dead lock owner is taken over within 100 ms of its kill;
 4. every survivor finds its host PID; no PID recorded twice or by the wrong process;
 5. memory accounting returns to 0 once the dead are reaped; the peak stays in the limit;
 6. counters are exact: every counter equals its events plus events counted as lost;
 7. every survivor completes (exit 0).

Usage: [VIGIL_DETECT_MODE=serial] python3 tests/random_kills.py [--rounds R] [--n N] [--seed S]
       (CI runs 10 rounds; --long runs 200). Exits non-zero on the first failed round.
"""
import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import BIN, UNSHARE, can_unshare, children, events  # noqa: E402

CTX_MS, LAG_MS = 20, 40
LIMIT = 4 << 30


def inspect(region):
    """(valid, error, counters, (limit, used, peak) of device 0 or None)."""
    state, err = harness.inspect(region)
    dev = harness.device(state)
    return (state is not None, err, harness.counters(state),
            dev and (dev["limit_bytes"], dev["used_bytes"], dev["peak_bytes"]))


def lock_holder(region, tmp, running):
    """The running workload that holds the detection (else the region) lock, found by
    the slot and generation its debug log names."""
    state, _ = harness.inspect(region)
    for lock in ("detect", "region"):
        owner = harness.lock_owner(state, lock)
        if owner is None:
            continue
        best = None
        for i in running:
            try:
                log = open(tmp / f"w{i}.log").read()
            except OSError:
                continue
            for g in re.findall(rf"slot {owner} generation (\d+)", log):
                if best is None or int(g) > best[0]:
                    best = (int(g), i)
        if best:
            return best[1]
    return None


def one_round(rnd, n, rng, use_ns):
    with harness.TempDir(f"vigil-rk{rnd}-") as work:
        ok, summary, fails = check_round(rnd, n, rng, use_ns, work.path)
        work.failed = not ok
        if ok:
            print(f"round {rnd}: ok {summary}")
        else:
            print(f"round {rnd}: FAIL {summary}" + (f"; logs in {work.path}" if work.keep() else
                                                     f" ({harness.KEEP_ENV}=failed keeps the logs)"))
            for f in fails:
                print(f"  ✗ {f}")
    return ok


def check_round(rnd, n, rng, use_ns, tmp):
    """One round in TMP; (ok, summary, failed checks)."""
    region = tmp / "region.cache"
    sim_args = ["--memory", "80GiB", "--ctx-create-time", f"{CTX_MS}ms", "--nvml-lag", f"{CTX_MS + LAG_MS}ms",
                "--ctx-memory", "2MiB", "--seed", str(rng.randrange(1 << 30))]
    procs, truths = [], []
    with harness.Simulator(tmp, sim_args) as sim:
        env = dict(os.environ, **sim.env(), LIBCUDA_LOG_LEVEL="4",
                   CUDA_DEVICE_MEMORY_SHARED_CACHE=str(region), CUDA_DEVICE_MEMORY_LIMIT=str(LIMIT),
                   LD_PRELOAD=str(BIN / "libvigil.so"))
        try:
            for i in range(n):
                cmd = [str(BIN / "vigil-workload"), "--alloc", "16MiB", "--alloc", "16MiB", "--hold", "30ms"]
                if use_ns:
                    cmd = [*UNSHARE, *cmd]
                with open(tmp / f"w{i}.log", "w") as log:
                    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                procs.append(p)
                truths.append(children(p.pid) if use_ns else p.pid)
                p.vigil_child = truths[-1] if use_ns else None
            # Kill 2-10 of them, each a random still-running one at a random time within the
            # expected run (whoever holds a lock at that moment is as likely as any other).
            # Serial detection runs one process at a time; parallel, everyone at once (the
            # whole start-up lasts about a context, the lag and a signature).
            if os.environ.get("VIGIL_DETECT_MODE", "parallel") == "serial":
                span = n * (CTX_MS + LAG_MS) / 1000
            else:
                span = (CTX_MS + LAG_MS) / 1000 + 0.4
            plan = sorted(rng.uniform(0, span) for _ in range(rng.randint(2, 10)))
            t0 = time.monotonic()
            kills = {}
            for at in plan:
                time.sleep(max(0.0, at - (time.monotonic() - t0)))
                running = [i for i in range(n) if i not in kills and truths[i] and procs[i].poll() is None]
                if not running:
                    break
                i = rng.choice(running)
                # Half the time, aim at whoever holds a lock right now: that is the case
                # that hangs other interposers for minutes.
                if rng.random() < 0.5:
                    i = lock_holder(region, tmp, running) or i
                try:
                    # Taken before the signal: a waiter may take over before os.kill returns.
                    t_kill = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                    os.kill(truths[i], signal.SIGKILL)
                    kills[i] = t_kill
                except ProcessLookupError:
                    pass
            for p in procs:
                p.wait(timeout=120)
            # A later process reaps the dead, as in production; its exit releases its own slot.
            r = subprocess.run([str(BIN / "vigil-workload"), "--alloc", "1MiB"], env=env, capture_output=True)
            reaper_ok = r.returncode == 0
        finally:
            harness.reap(procs)

    lost = {}
    evs = events(region, lost)
    valid, err, ctr, dev = inspect(region)
    logs = [open(tmp / f"w{i}.log").read() for i in range(n)]
    survivors = [i for i in range(n) if i not in kills]
    fails = []

    def check(name, ok, detail=""):
        if not ok:
            fails.append(f"{name} ({detail})")

    check("region validates", valid, err)
    check("reaper ran", reaper_ok, r.stderr.decode()[-300:])
    # 1
    check("one initializer", ctr.get("RegionInitializations", 0) - ctr.get("RegionRecoveries", 0) == 1, str(ctr))
    # 7
    bad = [i for i in survivors if procs[i].returncode != 0 or "freed" not in logs[i]]
    check("every survivor completed", not bad, f"{bad}: {[logs[i][-200:] for i in bad[:2]]}")
    # 2
    dets = [e for e in evs if e.get("kind") == "detection"]
    if os.environ.get("VIGIL_DETECT_MODE", "parallel") == "serial":
        windows = sorted((int(e["ts_ns"]) - int(e["latency_ns"]), int(e["ts_ns"])) for e in dets)
        overlaps = [(a, b) for a, b in zip(windows, windows[1:]) if b[0] < a[1]]
        check("detection windows never overlap", not overlaps, f"{overlaps[:2]}")
    # 3
    kill_times = sorted(kills.values())
    for e in (e for e in evs if e.get("kind") == "force_post"):
        ts = int(e["ts_ns"])
        before = [k for k in kill_times if k <= ts]
        delay = (ts - before[-1]) / 1e6 if before else None
        check("dead owner taken over within 100 ms of its kill", delay is not None and delay <= 100, f"{delay} ms")
    check("no lease expiry (nobody was merely slow)",
          ctr.get("ForcePostsRegionLeaseExpired", 0) + ctr.get("ForcePostsDetectLeaseExpired", 0) == 0, str(ctr))
    # 4
    recorded = [int(e["host_pid"]) for e in dets if int(e["host_pid"]) != 0]
    check("no host PID recorded twice", len(recorded) == len(set(recorded)), f"{sorted(recorded)}")
    alive_truths = {truths[i] for i in survivors}
    check("survivors (and the reaper) found their own PIDs",
          alive_truths <= set(recorded) and set(recorded) <= set(truths) | {recorded[-1]},
          f"missing {alive_truths - set(recorded)}")
    # 5
    check("memory accounting back to 0", dev is not None and dev[1] == 0, f"{dev}")
    check("peak within the limit", dev is not None and dev[2] <= LIMIT, f"{dev}")
    # 6
    total_lost = sum(lost.values())
    by_kind = {}
    for e in evs:
        by_kind[e.get("kind")] = by_kind.get(e.get("kind"), 0) + 1
    pairs = {
        "init": ctr.get("ProcessInitsInitializer", 0) + ctr.get("ProcessInitsFastPath", 0),
        "detection": sum(ctr.get(k, 0) for k in ("DetectFound", "DetectSameNamespace", "DetectAmbiguous",
                                                 "DetectTimeout", "DetectNvmlError")),
        "force_post": sum(v for k, v in ctr.items() if k.startswith("ForcePosts")),
        "slot_reclaimed": ctr.get("SlotsReclaimedDead", 0),
    }
    gap = 0
    for kind, counted in pairs.items():
        seen = by_kind.get(kind, 0)
        check(f"{kind}: no more events than counted", seen <= counted, f"{seen} > {counted}")
        gap += counted - seen
    check("counters = events + events counted lost", gap <= total_lost, f"gap {gap}, lost {lost}")
    check("every dead slot reclaimed (and only those)", pairs["slot_reclaimed"] <= len(kills),
          f"{pairs['slot_reclaimed']} reclaimed, {len(kills)} killed")
    if fails:
        print("  kill times (ms, monotonic):", [round(k / 1e6, 1) for k in kill_times])
        print("  force-posts (ms):", [round(int(e["ts_ns"]) / 1e6, 1) for e in evs if e.get("kind") == "force_post"])
    summary = {"round": rnd, "killed": len(kills), "force_posts": pairs["force_post"],
               "reclaimed": pairs["slot_reclaimed"], "lost": total_lost}
    return not fails, summary, fails


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--long", action="store_true", help="200 rounds")
    ap.add_argument("--n", type=int, default=64, help="processes per round (default 64)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    a = ap.parse_args()
    rounds = 200 if a.long else a.rounds
    seed = a.seed if a.seed is not None else random.randrange(1 << 31)
    if rounds < 1 or a.n < 2:
        sys.exit("--rounds must be >= 1 and --n >= 2")
    harness.build()
    harness.exit_on_sigterm()
    use_ns = can_unshare()
    print(f"random kills: {rounds} rounds of {a.n} processes, seed {seed}, pid namespaces={use_ns}")
    rng = random.Random(seed)
    t = time.monotonic()
    for rnd in range(1, rounds + 1):
        if not one_round(rnd, a.n, rng, use_ns):
            sys.exit(f"random kills: round {rnd} failed (seed {seed})")
    print(f"random kills: {rounds} rounds passed in {time.monotonic() - t:.0f} s (seed {seed})")


if __name__ == "__main__":
    main()
