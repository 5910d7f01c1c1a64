"""Host-PID detection benchmark: the start-up scenarios of tests/comprehensive.py under
both detection modes (VIGIL_DETECT_MODE=parallel and serial), side by side.

Scenarios (every workload in its own PID namespace, all released at once):
  a  N=8, 1 container, 200 ms creation + 80 ms lag: time until all are running, correct
  b  N=64, 1 container: the same
  c  4 containers x 8 at once
  d  4 containers x 4 at the simulator's default lag (130 ms creation, 20-200 ms from
     creation start), R rounds (a fresh simulator seed each): found %, wrong, p99 time
  e  4 containers x 4 at the H100's lag (130 ms creation, uniform:22ms..50ms), R rounds
  f  the true device peak (the simulator's) under a 2 GiB limit, 4 workloads x 1 GiB racing

Usage: python3 tests/bench_detect.py [--mode parallel|serial|both] [--rounds R] [--quick]
                                     [--only a,b,...] [--json FILE]
Prints a Markdown table (one column per mode); --json FILE gets one JSON line per run
(scenario, mode, round, environment, exit status, FAIL lines, the scenario's summary).
A run's own checks may fail (that is what is being measured: e.g. ambiguous stalls);
the benchmark reports them and exits 0 unless a run produced no summary or recorded a
wrong PID.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import ROOT  # noqa: E402
MODES = ("parallel", "serial")
RUN_TIMEOUT_S = 900

HARNESS_LAG = {"VIGIL_SCENARIO_CTX": "200ms", "VIGIL_SCENARIO_LAG": "80ms"}
SCENARIOS = {
    "a": ("N=8, 1 container, 200 ms ctx + 80 ms lag", 8, dict(HARNESS_LAG), False),
    "b": ("N=64, 1 container, 200 ms ctx + 80 ms lag", 64, dict(HARNESS_LAG), False),
    "c": ("4 containers x 8, 200 ms ctx + 80 ms lag", 32, dict(HARNESS_LAG, VIGIL_SCENARIO_CONTAINERS="4"), False),
    "d": ("4 containers x 4, simulator default lag", 16,
          {"VIGIL_SCENARIO_CONTAINERS": "4", "VIGIL_SCENARIO_SIM_LAG": "default", "VIGIL_SCENARIO_MIN_FOUND": "0.99"},
          True),
    "e": ("4 containers x 4, H100 lag (130 ms ctx, 22-50 ms)", 16,
          {"VIGIL_SCENARIO_CONTAINERS": "4", "VIGIL_SCENARIO_CTX": "130ms",
           "VIGIL_SCENARIO_SIM_LAG": "uniform:22ms..50ms", "VIGIL_SCENARIO_MIN_FOUND": "0.99"}, True),
    "f": ("2 GiB limit, 4 x 1 GiB racing", 4,
          {"VIGIL_SCENARIO_LIMIT": "2g", "VIGIL_SCENARIO_ALLOC": "1GiB", "VIGIL_SCENARIO_EXPECT_REFUSALS": "1"}, False),
}
# Variables of the scenario harness that would change what a scenario means.
SCRUB = [k for k in os.environ if k.startswith("VIGIL_SCENARIO_")] + ["VIGIL_DETECT_MODE"]


def code_version():
    """The commit the binaries were built from, as far as the checkout says."""
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=30)
        if rev.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return rev.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_one(name, mode, rnd, n, extra):
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(extra, VIGIL_DETECT_MODE=mode, VIGIL_SKIP_BUILD="1")
    if name in ("d", "e"):
        env["VIGIL_SCENARIO_SEED"] = str(1000 + rnd)
    t = time.monotonic()
    r = harness.run_scenario(n, env, timeout=RUN_TIMEOUT_S)
    rc, err, summary, fails = r["rc"], r["err"], r["summary"], r["fails"]
    return {"scenario": name, "mode": mode, "round": rnd, "procs": n,
            "env": {k: v for k, v in env.items() if k.startswith("VIGIL_SCENARIO_") or k == "VIGIL_DETECT_MODE"},
            "rc": rc, "wall_seconds": round(time.monotonic() - t, 2), "fails": fails,
            "stderr_tail": err.strip().splitlines()[-3:], "summary": summary}


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else float("nan")


def fmt_s(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f} s"


def cells(name, runs):
    """Metric name -> cell text for one scenario and mode."""
    ss = [r["summary"] for r in runs if r["summary"]]
    passed = sum(1 for r in runs if r["rc"] == 0)
    if not ss:
        return {"result": f"no summary ({runs[0]['rc'] if runs else '-'})"}
    surv = sum(s["survivors"] for s in ss)
    correct = sum(s["correct"] for s in ss)
    wrong = sum(s["wrong"] for s in ss)
    amb = sum(s["ambiguous"] for s in ss)
    nf = sum(s["not_found"] for s in ss)
    ready = [s["ready_seconds"] for s in ss if s.get("ready_seconds") is not None]
    c = {}
    if name in ("a", "b", "c"):
        c["time until all running"] = fmt_s(max(ready) if ready else None)
        c["total wall time (release to last exit)"] = fmt_s(max(s["total_seconds"] for s in ss))
        c["correct"] = f"{correct}/{surv}"
        c["ambiguous / not found / wrong"] = f"{amb} / {nf} / {wrong}"
        c["detection p50 / p99"] = f"{ss[0]['detect_ms_p50']:.0f} / {ss[0]['detect_ms_p99']:.0f} ms"
    elif name in ("d", "e"):
        per_proc = []
        for s in ss:
            if s.get("ready_ms_p99") is not None:
                per_proc.append(s["ready_ms_p99"] / 1000)
        c["rounds"] = f"{len(ss)}"
        c["found (own host PID)"] = f"{100 * correct / surv:.1f} % ({correct}/{surv})" if surv else "-"
        c["ambiguous / not found"] = f"{amb} / {nf}"
        c["wrong total"] = f"{wrong}"
        c["time until all running: p50 / p99 over rounds"] = (
            f"{statistics.median(ready):.2f} / {p99(ready):.2f} s" if ready else "-")
        c["detection latency p99 (worst round)"] = f"{max(s['detect_ms_p99'] for s in ss):.0f} ms"
    else:
        peaks = [s["device_peak_bytes"] for s in ss if s.get("device_peak_bytes") is not None]
        lim = ss[0].get("mem_limit_bytes")
        c["true device peak (max over runs)"] = (f"{max(peaks) / 2**20:.0f} MiB" if peaks else "-") + (
            f" (limit {lim / 2**20:.0f} MiB)" if lim else "")
        c["over the limit by"] = (f"{(max(peaks) - lim) / 2**20:.0f} MiB" if peaks and lim and max(peaks) > lim
                                  else "0")
        c["refusals (clean OOM)"] = "/".join(str(s["refusals"]) for s in ss)
        c["region peak"] = "/".join(f"{s.get('mem_peak_bytes', 0) / 2**20:.0f} MiB" for s in ss)
    c["runs passing their checks"] = f"{passed}/{len(runs)}"
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=(*MODES, "both"), default="both")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of scenarios d and e (default 20)")
    ap.add_argument("--quick", action="store_true", help="3 rounds of d and e, 1 of f")
    ap.add_argument("--only", default="abcdef", help="scenarios to run, e.g. ade (default all)")
    ap.add_argument("--json", type=Path, help="write one JSON line per run here")
    a = ap.parse_args()
    rounds = 3 if a.quick else a.rounds
    if rounds < 1:
        sys.exit("--rounds must be >= 1")
    modes = MODES if a.mode == "both" else (a.mode,)
    only = [s for s in SCENARIOS if s in a.only.replace(",", "")]
    harness.build()
    harness.exit_on_sigterm()
    code = code_version()
    out = open(a.json, "w") if a.json else None
    results = {}
    bad = 0
    for name in only:
        desc, n, extra, repeated = SCENARIOS[name]
        reps = rounds if repeated else (1 if a.quick or name != "f" else 3)
        for mode in modes:
            runs = []
            for r in range(reps):
                res = run_one(name, mode, r, n, extra)
                res["code"] = code
                runs.append(res)
                s = res["summary"]
                print(f"({name}) {mode} round {r + 1}/{reps}: rc={res['rc']} "
                      + (f"ready={s['ready_seconds']} s correct={s['correct']}/{s['survivors']} "
                         f"ambiguous={s['ambiguous']} not_found={s['not_found']} wrong={s['wrong']} "
                         f"device_peak={s['device_peak_bytes']}" if s else f"no summary {res['stderr_tail']}"),
                      file=sys.stderr, flush=True)
                for f in res["fails"]:
                    print(f"    {f}", file=sys.stderr)
                if s is None or s["wrong"]:
                    bad += 1
                if out:
                    out.write(json.dumps(res) + "\n")
                    out.flush()
            results[(name, mode)] = cells(name, runs)
    if out:
        out.close()
    print(f"code: {code}; rounds of d and e: {rounds}\n")
    print(f"| scenario | metric | {' | '.join(modes)} |")
    print("| --- | --- |" + " --- |" * len(modes))
    for name in only:
        desc = SCENARIOS[name][0]
        metrics = []
        for mode in modes:
            for m in results[(name, mode)]:
                if m not in metrics:
                    metrics.append(m)
        for j, m in enumerate(metrics):
            row = [f"({name}) {desc}" if j == 0 else "", m]
            row += [results[(name, mode)].get(m, "-") for mode in modes]
            print("| " + " | ".join(row) + " |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
