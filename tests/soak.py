"""Soak: workloads start and die continuously (normal exits, SIGKILLs, refused
allocations) against the simulator under LD_PRELOAD, while the exporter is scraped
every second. Checks that nothing leaks: the exporter's and the simulator's RSS stay
flat, their file descriptors too, no slot stays claimed, and memory accounting returns
to 0 once the last process is gone.

Usage: python3 tests/soak.py [--seconds S] [--concurrency C] [--json FILE]
       (CI runs 45 s; the report in docs/reliability.md is from --seconds 600)
Exits non-zero if a check fails.
"""
import argparse
import json
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
from harness import BIN  # noqa: E402

LIMIT = 2 << 30


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric_sum(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r'^(\w+)(?:\{(.*)\})? (\S+)$', line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=45)
    ap.add_argument("--concurrency", type=int, default=6, help="workloads alive at once (default 6)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    if a.seconds < 10:
        sys.exit("--seconds must be >= 10")
    harness.build()
    harness.exit_on_sigterm()
    seed = a.seed if a.seed is not None else random.randrange(1 << 31)
    with harness.TempDir("vigil-soak-") as work:
        ok = soak(a, seed, work.path)
        work.failed = not ok
        if not ok and not work.keep():
            print(f"logs removed with {work.path} ({harness.KEEP_ENV}=failed keeps them)")
    sys.exit(0 if ok else 1)


def soak(a, seed, tmp):
    """The soak in TMP; prints the checks and the figures; True if every check passed."""
    rng = random.Random(seed)
    regions = tmp / "regions" / "soak-pod_main"
    regions.mkdir(parents=True)
    region = regions / "vigil.cache"
    sim_args = ["--ctx-create-time", "10ms", "--nvml-lag", "25ms", "--ctx-memory", "64MiB", "--seed", str(seed)]
    with harness.Simulator(tmp, sim_args) as sim, \
            harness.Exporter(tmp / "regions", tmp, ["--log.level", "warn"]) as exporter:
        live = []
        try:
            final, samples, counts, stats = run(a, seed, rng, sim, exporter, region, live)
        finally:
            harness.reap(live)
    state, _ = harness.inspect(region)
    dev = harness.device(state)
    # Flat: compare the last sample with the one a fifth of the way in (after warm-up).
    base = samples[max(1, len(samples) // 5)]
    last = samples[-1]
    figures = {
        "seconds": a.seconds, "seed": seed, **counts,
        "exporter_rss_kib": [base["exporter_rss_kib"], last["exporter_rss_kib"]],
        "sim_rss_kib": [base["sim_rss_kib"], last["sim_rss_kib"]],
        "exporter_fds": [base["exporter_fds"], last["exporter_fds"]],
        "sim_fds": [base["sim_fds"], last["sim_fds"]],
        "slots_active_after": harness.active_slots(state) if state else None,
        "region_used_after": dev["used_bytes"] if dev else None,
        "sim_used_after": stats.get("used", -1),
        "exported_processes_after": metric_sum(final, "vigil_processes"),
        "exported_used_after": metric_sum(final, "vigil_device_memory_used_bytes"),
        "exported_inits": metric_sum(final, "vigil_process_inits_total"),
    }
    checks = [
        ("workloads ran", counts["started"] >= a.seconds, f"{counts['started']} started"),
        ("no workload failed (only the 3 GiB asks were refused)", counts["failed"] == 0,
         f"{counts['failed']} failed, {counts['refused']} refused as expected"),
        ("every scrape answered", counts["scrape_errors"] == 0, f"{counts['scrape_errors']} errors"),
        ("exporter RSS flat (< +4 MiB after warm-up)", last["exporter_rss_kib"] - base["exporter_rss_kib"] < 4096,
         f"{base['exporter_rss_kib']} -> {last['exporter_rss_kib']} KiB"),
        ("simulator RSS flat (< +4 MiB after warm-up)", last["sim_rss_kib"] - base["sim_rss_kib"] < 4096,
         f"{base['sim_rss_kib']} -> {last['sim_rss_kib']} KiB"),
        ("exporter fds flat", last["exporter_fds"] <= base["exporter_fds"] + 2,
         f"{base['exporter_fds']} -> {last['exporter_fds']}"),
        ("simulator fds back to its idle count", last["sim_fds"] <= base["sim_fds"] + 2,
         f"{base['sim_fds']} -> {last['sim_fds']}"),
        ("no slot left claimed", figures["slots_active_after"] == 0, f"{figures['slots_active_after']}"),
        ("region accounting back to 0", figures["region_used_after"] == 0, f"{figures['region_used_after']}"),
        ("simulator memory back to 0", figures["sim_used_after"] == 0, f"{figures['sim_used_after']}"),
        ("exporter agrees: 0 processes, 0 bytes",
         figures["exported_processes_after"] == 0 and figures["exported_used_after"] == 0,
         f"{figures['exported_processes_after']}, {figures['exported_used_after']}"),
        ("every process start counted", figures["exported_inits"] == counts["started"] + 1,
         f"{figures['exported_inits']:.0f} vs {counts['started']} + 1"),
    ]
    ok = harness.print_checks(checks)
    print(json.dumps(figures))
    if a.json:
        Path(a.json).write_text(json.dumps({"figures": figures, "samples": samples}, indent=1))
    return ok


def run(a, seed, rng, sim, exporter, region, live):
    """Starts and kills workloads for a.seconds while scraping the exporter; `live`
    holds the workloads still running. Returns (the last /metrics page, the RSS and fd
    samples, the counts, the simulator's stats)."""
    env = dict(os.environ, **sim.env(), LIBCUDA_LOG_LEVEL="1",
               CUDA_DEVICE_MEMORY_SHARED_CACHE=str(region), CUDA_DEVICE_MEMORY_LIMIT=str(LIMIT),
               LD_PRELOAD=str(BIN / "libvigil.so"))
    counts = {"started": 0, "killed": 0, "exited": 0, "refused": 0, "failed": 0, "scrapes": 0,
              "scrape_errors": 0}

    def finished(p):
        if p.returncode == 0:
            counts["exited"] += 1
        elif p.returncode == -signal.SIGKILL:
            counts["killed"] += 1
        elif p.returncode == 3 and p.refusal_expected:
            counts["refused"] += 1
        else:
            counts["failed"] += 1

    def sample(t):
        return {"t": round(t, 1), "exporter_rss_kib": rss_kib(exporter.proc.pid),
                "sim_rss_kib": rss_kib(sim.proc.pid), "exporter_fds": fds(exporter.proc.pid),
                "sim_fds": fds(sim.proc.pid)}
    samples = []
    start = time.monotonic()
    next_scrape = next_sample = start
    print(f"soak: {a.seconds} s, {a.concurrency} workloads at a time, seed {seed}")
    while time.monotonic() - start < a.seconds:
        now = time.monotonic()
        # Reap finished workloads; kill some of the living at random.
        for p in list(live):
            if p.poll() is not None:
                live.remove(p)
                finished(p)
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            victim.kill()
        while len(live) < a.concurrency:
            # Live holders never pass the 2 GiB limit (6 x (64 MiB context + 256 MiB)),
            # so only the 3 GiB asks may be refused; anything else is a false OOM.
            size = rng.choice(["16MiB", "64MiB", "128MiB", "256MiB", "3GiB"])
            hold = f"{rng.randint(20, 400)}ms"
            p = subprocess.Popen([str(BIN / "vigil-workload"), "--alloc", size, "--hold", hold], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # A refused allocation exits 3 by design: count it apart.
            p.refusal_expected = size == "3GiB"
            live.append(p)
            counts["started"] += 1
        if now >= next_scrape:
            next_scrape += 1
            try:
                exporter.scrape()
                counts["scrapes"] += 1
            except OSError:
                counts["scrape_errors"] += 1
        if now >= next_sample:
            next_sample += max(1.0, a.seconds / 60)
            samples.append(sample(now - start))
        time.sleep(0.02)
    for p in list(live):
        p.wait(timeout=60)
        finished(p)
        live.remove(p)
    # One last process reaps the killed ones (as any later start would); then give
    # the simulator its teardown time and the exporter a scrape.
    subprocess.run([str(BIN / "vigil-workload"), "--alloc", "1MiB"], env=env, capture_output=True)
    time.sleep(1.5)
    final = exporter.scrape()
    samples.append(sample(time.monotonic() - start))
    return final, samples, counts, sim.stats()


if __name__ == "__main__":
    main()
