"""Kill sweep: the multi-process start-up scenario with one process SIGKILLed at each
named fault point (compiled in with the `fault-injection` feature), checking that every
survivor completes, nobody waits more than 100 ms on the dead, counters stay consistent,
memory accounting returns to 0 and the region still validates.

Usage: python3 tests/kill_sweep.py [--runs R] [--n N] [--mode parallel|serial] [--markdown]
Needs the workspace built with --features vigil-interposer/fault-injection (the
scenario builds it unless VIGIL_SKIP_BUILD=1). Exits non-zero if any run fails.

--mode sets VIGIL_DETECT_MODE for the runs (default: the environment's, else
parallel). How many force-posts each point means depends on it (LOCK_FAULTS_BY_MODE in
tests/comprehensive.py): serial holds the detection lock through detection, parallel
has none.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import BIN  # noqa: E402

BOTH = ("parallel", "serial")


def fault_points():
    """Every fault point, from the region crate's one list (vigil-region fault-points):
    (name, what dying there means, the detection modes that reach it)."""
    out = subprocess.run([str(BIN / "vigil-region"), "fault-points", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return [(p["name"], p["means"], tuple(p["modes"])) for p in json.loads(out)]


def run(point, n, limit, mode):
    env = dict(os.environ, VIGIL_SCENARIO_FAULT=point, VIGIL_SCENARIO_LIMIT=limit, VIGIL_DETECT_MODE=mode)
    r = harness.run_scenario(n, env, timeout=600)
    if r["timed_out"]:
        return False, {}, ["the scenario did not finish within 600 s"], r["out"]
    return r["rc"] == 0, r["summary"] or {}, r["fails"], r["out"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per fault point (default 3)")
    ap.add_argument("--n", type=int, default=8, help="processes per run (default 8)")
    ap.add_argument("--limit", default="16g", help="CUDA_DEVICE_MEMORY_LIMIT for the runs (default 16g)")
    ap.add_argument("--mode", choices=BOTH, default=os.environ.get("VIGIL_DETECT_MODE") or "parallel",
                    help="VIGIL_DETECT_MODE for the runs (default: $VIGIL_DETECT_MODE, else parallel)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    a = ap.parse_args()
    if a.runs < 1 or a.n < 2:
        sys.exit("--runs must be >= 1 and --n >= 2")
    harness.build()
    harness.exit_on_sigterm()
    os.environ["VIGIL_SKIP_BUILD"] = "1"
    rows, failed = [], 0
    points = [p for p, _, modes in fault_points() if a.mode in modes]
    for point in points:
        ok_runs, waits, forces, mem_zero, reclaimed = 0, [], [], 0, []
        for r in range(a.runs):
            ok, s, fails, out = run(point, a.n, a.limit, a.mode)
            ok_runs += ok
            waits.append(s.get("extra_wait_ms", float("inf")))
            forces.append(s.get("force_posts", -1))
            mem_zero += s.get("mem_used_after") == 0
            reclaimed.append(s.get("slots_reclaimed", -1))
            if not ok:
                failed += 1
                print(f"FAIL {point} run {r + 1}:", *fails, sep="\n  ", file=sys.stderr)
        rows.append((point, a.runs, ok_runs, max(waits), sorted(set(forces)), mem_zero, sorted(set(reclaimed))))
    head = ("fault point", "runs", "survivors ok", "max extra wait", "force-posts", "accounting at 0", "slots reclaimed")
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
        for p, runs, ok, w, f, z, rc in rows:
            print(f"| `{p}` | {runs} | {ok}/{runs} | {w:.1f} ms | {'/'.join(map(str, f))} | {z}/{runs} | {'/'.join(map(str, rc))} |")
    else:
        print(f"{head[0]:<20} {head[1]:>4} {head[2]:>12} {head[3]:>14} {head[4]:>11} {head[5]:>15} {head[6]:>15}")
        for p, runs, ok, w, f, z, rc in rows:
            print(f"{p:<20} {runs:>4} {ok:>10}/{runs} {w:>11.1f} ms {'/'.join(map(str, f)):>11} {z:>13}/{runs} {'/'.join(map(str, rc)):>15}")
    print(f"kill sweep ({a.mode} mode): {len(points) * a.runs - failed} of {len(points) * a.runs} runs passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
