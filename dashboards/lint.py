#!/usr/bin/env python3
"""Lint the Grafana dashboards in dashboards/*.json (run by scripts/check-monitoring.sh).

Checks: current schema (schemaVersion >= 39); panel types only timeseries, stat,
heatmap, table (and row): no legacy graph/singlestat/table-old; every panel has a
non-empty description and a unit (fieldConfig.defaults.unit; heatmaps also
options.yAxis.unit), the ${datasource} data source, at least one target with an expr,
and a gridPos that overlaps no other panel; unique panel ids; template variables
`datasource` (type datasource, prometheus) and `node`, `namespace`, `pod`, `pod_uid`,
`region`, `device` (label_values queries); every range selector in a panel is
[$__rate_interval] or [$__range]; every per-region metric is filtered by $node,
$namespace, $pod, $pod_uid and $region, and every per-device one also by $device; every vigil_* name is a
metric of the exporter's contract (docs/metrics.md); the rows the issue asks for exist;
every panel is described in dashboards/README.md.
Exit 1 with every problem listed.
"""
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = {"timeseries", "stat", "heatmap", "table", "row"}
ROWS = ["Start-up", "Host-PID detection", "Locks", "Memory", "Pipeline health", "HAMi-core and NVML"]
COUNTERS = ["vigil_region_recoveries_total", "vigil_process_inits_total",
            "vigil_process_slots_reclaimed_total", "vigil_host_pid_detection_polls_total", "vigil_lock_acquisitions_total", "vigil_lock_retries_total",
            "vigil_lock_force_posts_total", "vigil_lock_fenced_releases_total", "vigil_host_pid_detections_total",
            "vigil_host_pid_checks_total",
            "vigil_device_memory_allocation_denials_total", "vigil_ring_events_total",
            "vigil_ring_events_lost_total", "vigil_exporter_region_errors_total", "vigil_exporter_nvml_errors_total"]
GAUGES = ["vigil_processes", "vigil_device_memory_limit_bytes", "vigil_device_memory_used_bytes",
          "vigil_device_memory_dead_bytes", "vigil_device_memory_peak_bytes", "vigil_exporter_regions", "vigil_exporter_build_info",
          "vigil_unenforced_settings", "vigil_nvml_process_memory_bytes", "vigil_device_memory_accounting_drift_bytes",
          "vigil_hami_region_info", "vigil_hami_device_info", "vigil_hami_device_sm_limit_ratio", "vigil_hami_process_slots",
          "vigil_hami_host_pid_zero_slots", "vigil_hami_host_pid_wrong_slots", "vigil_hami_lock_held",
          "vigil_hami_lock_owner_dead", "vigil_hami_lock_waiters", "vigil_exporter_hami_regions", "vigil_device_info",
          "vigil_nvml_device_memory_total_bytes", "vigil_nvml_device_memory_used_bytes", "vigil_exporter_nvml_up",
          "vigil_exporter_nvml_refresh_seconds"]
HISTOGRAMS = ["vigil_lock_wait_seconds", "vigil_host_pid_detection_seconds",
              "vigil_init_duration_seconds", "vigil_exporter_scrape_duration_seconds"]
# Per-region series with a `device` label (the region's CUDA ordinal): filtered by $device.
DEVICE_METRICS = {"vigil_device_memory_limit_bytes", "vigil_device_memory_used_bytes",
                  "vigil_device_memory_dead_bytes", "vigil_device_memory_peak_bytes",
                  "vigil_device_memory_allocation_denials_total", "vigil_nvml_process_memory_bytes",
                  "vigil_device_memory_accounting_drift_bytes", "vigil_hami_device_sm_limit_ratio",
                  "vigil_hami_device_info"}
# The variables every per-region query is filtered by. `node` is a target label (the
# chart's monitors add it), `pod_uid` comes from HAMi's directories (DaemonSet mode),
# `namespace`/`pod` from the sidecar's downward API: a variable whose label a mode lacks
# matches everything there (its All value is .*, which matches an absent label).
REGION_VARS = ("node", "namespace", "pod", "pod_uid", "region")
METRICS = set(COUNTERS + GAUGES + [h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")])


def walk(panels):
    for p in panels or []:
        yield p
        yield from walk(p.get("panels"))


def lint(path):
    errs = []
    d = json.load(open(path))
    if (d.get("schemaVersion") or 0) < 39:
        errs.append(f"schemaVersion {d.get('schemaVersion')} < 39")
    for k in ("uid", "title"):
        if not d.get(k):
            errs.append(f"dashboard has no {k}")
    vars_ = {v.get("name"): v for v in (d.get("templating") or {}).get("list", [])}
    ds = vars_.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errs.append("template variable `datasource` (type datasource, query prometheus) is missing")
    for name in REGION_VARS + ("device",):
        v = vars_.get(name)
        q = v.get("query") if v else None
        q = q.get("query") if isinstance(q, dict) else q
        if not v or v.get("type") != "query" or not q or not q.startswith("label_values("):
            errs.append(f"template variable `{name}` (a label_values query) is missing")
        elif (v.get("datasource") or {}).get("uid") != "${datasource}":
            errs.append(f"template variable `{name}` does not use ${{datasource}}")
    ids, cells, rows = set(), {}, []
    for p in walk(d.get("panels")):
        title = p.get("title") or f"panel {p.get('id')}"
        t = p.get("type")
        if p.get("id") in ids:
            errs.append(f"{title!r}: duplicate panel id {p.get('id')}")
        ids.add(p.get("id"))
        if t not in ALLOWED:
            errs.append(f"{title!r}: panel type {t!r} is not allowed (only {sorted(ALLOWED)})")
        g = p.get("gridPos") or {}
        if not all(k in g for k in ("h", "w", "x", "y")):
            errs.append(f"{title!r}: no complete gridPos")
        else:
            for yy in range(g["y"], g["y"] + g["h"]):
                for xx in range(g["x"], g["x"] + g["w"]):
                    if (xx, yy) in cells:
                        errs.append(f"{title!r}: overlaps {cells[(xx, yy)]!r}")
                        break
                    cells[(xx, yy)] = title
                else:
                    continue
                break
            if g["x"] + g["w"] > 24:
                errs.append(f"{title!r}: wider than the 24-column grid")
        if t == "row":
            rows.append(title)
            continue
        if not (p.get("description") or "").strip():
            errs.append(f"{title!r}: no description")
        if not ((p.get("fieldConfig") or {}).get("defaults") or {}).get("unit"):
            errs.append(f"{title!r}: no unit (fieldConfig.defaults.unit)")
        if t == "heatmap" and not ((p.get("options") or {}).get("yAxis") or {}).get("unit"):
            errs.append(f"{title!r}: heatmap without options.yAxis.unit")
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            errs.append(f"{title!r}: panel data source is not ${{datasource}}")
        targets = p.get("targets") or []
        if not targets:
            errs.append(f"{title!r}: no targets")
        for tg in targets:
            expr = tg.get("expr") or ""
            ref = tg.get("refId")
            if not expr.strip():
                errs.append(f"{title!r} [{ref}]: empty expr")
                continue
            if (tg.get("datasource") or {}).get("uid") not in (None, "${datasource}"):
                errs.append(f"{title!r} [{ref}]: target data source is not ${{datasource}}")
            for win in re.findall(r"\[([^\]]*)\]", expr):
                if win not in ("$__rate_interval", "$__range"):
                    errs.append(f"{title!r} [{ref}]: range [{win}]: use [$__rate_interval] (or [$__range])")
            names = set(re.findall(r"\bvigil_[a-z0-9_]+", expr))
            for n in sorted(names - METRICS):
                errs.append(f"{title!r} [{ref}]: {n} is not a metric of the exporter's contract")
            per_region = {n for n in names if not n.startswith("vigil_exporter_")}
            if per_region:
                for v in REGION_VARS:
                    if f'{v}=~"${v}"' not in expr:
                        errs.append(f"{title!r} [{ref}]: per-region metric not filtered by {v}=~\"${v}\"")
            for n in sorted(names & DEVICE_METRICS):
                for sel in re.findall(r"\b" + n + r"\{([^}]*)\}", expr) or [""]:
                    if 'device=~"$device"' not in sel:
                        errs.append(f"{title!r} [{ref}]: {n} not filtered by device=~\"$device\"")
    for r in ROWS:
        if r not in rows:
            errs.append(f"row {r!r} is missing")
    readme = os.path.join(os.path.dirname(path), "README.md")
    text = open(readme).read() if os.path.exists(readme) else ""
    for p in walk(d.get("panels")):
        if p.get("type") != "row" and f"**{p.get('title')}**" not in text:
            errs.append(f"{p.get('title')!r}: not described in {os.path.relpath(readme, ROOT)}")
    return errs


def main():
    files = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "dashboards", "*.json")))
    if not files:
        print("no dashboards")
        return 1
    bad = 0
    for f in files:
        rel = os.path.relpath(f, ROOT)
        try:
            errs = lint(f)
        except (ValueError, OSError) as e:
            errs = [f"cannot read: {e}"]
        if errs:
            bad += 1
            print(f"FAIL {rel}")
            for e in errs:
                print(f"     {e}")
        else:
            n = sum(1 for p in walk(json.load(open(f)).get("panels")) if p.get("type") != "row")
            print(f"ok   {rel} ({n} panels)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
