#!/usr/bin/env python3
"""Send every PromQL expression of the dashboards and alert rules to a Prometheus server.

The expressions are extracted from the files every time, never kept in a list here:
  * dashboards/*.json: every panel target `expr` (rows and nested panels included) and
    every query template variable (Grafana's `label_values(sel, label)` is sent as
    `count by (label) (sel)`, `label_values(label)` as `count by (label) ({label!=""})`,
    `query_result(q)` as `q`);
  * alerts/*.yml (and *.yaml): every `alert` and `record` rule's `expr` (plain rule
    files, or PrometheusRule objects with spec.groups).

Template variables are substituted before sending: `$__rate_interval`, `$__interval`,
`$__range` (and their _s/_ms forms) from the options; `$namespace`, `${pod}`,
`[[region]]`, `${region:regex}` ... from `--var NAME=VALUE` (repeatable; several values
for one name make a multi-value regex like Grafana's), otherwise discovered by running the
variable's own query against the server, in dashboard order (so `$pod` sees the
discovered `$namespace`). A variable with no discovered value falls back to its
`allValue` (`.*`). `--all` uses allValue for every variable that has one.

Each expression goes to `<url>/api/v1/query`. The report (JSON, stdout or --output) has
one entry per expression: source file, kind (panel|variable|alert|record), name, ref,
expr, the query sent, parsed (false for a parse error, or for an unresolved template
variable: not sent), ok, series, error.

Exit status: 1 if any expression fails to parse or fails to evaluate (e.g. many-to-many
matching); 2 if a required expression returned no series; 0 otherwise.
  --require-data NAME ...          these panels/alerts/rules/variables must return >= 1
                                   series (NAME matches a panel title, alert or record
                                   name, or variable name; NAME#REF one panel target)
  --require-data-all-except FILE   every name NOT listed in FILE (one per line, '#'
                                   comments) must return >= 1 series
A name that matches nothing is an error (a typo must not pass silently).

--self-test starts a synthetic exporter (this file serves a static-shaped metrics page
with every Vigil metric, counters growing with time) and a real `prometheus` on loopback
with the alert rules loaded, waits for a few scrapes, runs the check with data required
for everything except VigilExporterAbsent (which cannot fire while an exporter is up),
then checks through /api/v1/rules that every rule evaluates without error in a live
Prometheus. It leaves no process or file behind.

Examples:
  tests/promql_exprs.py --url http://127.0.0.1:9090 --rate-interval 5m \\
      --require-data-all-except tests/no-data-expected.txt > report.json
  tests/promql_exprs.py --self-test
"""

import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- extraction


def walk_panels(panels):
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


def grafana_query_to_promql(q):
    """Translate a Grafana Prometheus variable query into PromQL (None if it has none)."""
    q = q.strip()
    m = re.fullmatch(r"label_values\(\s*(.+)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", q, re.S)
    if m:
        return f"count by ({m.group(2)}) ({m.group(1).strip()})", m.group(2)
    m = re.fullmatch(r"label_values\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", q)
    if m:
        return f'count by ({m.group(1)}) ({{{m.group(1)}!=""}})', m.group(1)
    m = re.fullmatch(r"query_result\((.+)\)", q, re.S)
    if m:
        return m.group(1).strip(), None
    m = re.fullmatch(r"metrics\((.*)\)", q, re.S)
    if m:
        return f'count by (__name__) ({{__name__=~"{m.group(1).strip() or ".+"}"}})', "__name__"
    if q.startswith("label_names("):
        return None, None
    return q, None


def extract_dashboard(path):
    with open(path) as f:
        dash = json.load(f)
    rel = os.path.relpath(path, ROOT)
    out, variables = [], []
    for v in (dash.get("templating") or {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query", "")
        promql, label = grafana_query_to_promql(q or v.get("definition", ""))
        variables.append({"name": v["name"], "query": promql, "label": label,
                          "allValue": v.get("allValue") if v.get("includeAll") else None,
                          "multi": bool(v.get("multi") or v.get("includeAll"))})
        if promql is not None:
            out.append({"source": rel, "kind": "variable", "name": v["name"], "ref": None,
                        "expr": promql, "grafana_query": q})
    for p in walk_panels(dash.get("panels")):
        for t in p.get("targets") or []:
            if t.get("expr"):
                out.append({"source": rel, "kind": "panel", "name": p.get("title", f"panel {p.get('id')}"),
                            "ref": t.get("refId"), "expr": t["expr"]})
    return out, variables


def extract_rules(path):
    import yaml
    rel = os.path.relpath(path, ROOT)
    out = []
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        groups = doc.get("groups") or (doc.get("spec") or {}).get("groups") or []
        for g in groups:
            for r in g.get("rules") or []:
                kind = "alert" if "alert" in r else "record"
                out.append({"source": rel, "kind": kind, "name": r.get(kind), "group": g.get("name"),
                            "ref": None, "expr": str(r["expr"])})
    return out


# ----------------------------------------------------------------------------- variables

DURATION_RE = re.compile(r"^(\d+)(ms|s|m|h|d|w|y)$")
UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def seconds(d):
    m = DURATION_RE.match(d)
    if not m:
        raise SystemExit(f"not a duration: {d!r} (use e.g. 30s, 1m, 1h)")
    return int(m.group(1)) * UNIT_S[m.group(2)]


def builtins(args):
    return {
        "__rate_interval": args.rate_interval,
        "__interval": args.interval,
        "__range": args.range,
        "__range_s": str(int(seconds(args.range))),
        "__range_ms": str(int(seconds(args.range) * 1000)),
        "__interval_ms": str(int(seconds(args.interval) * 1000)),
        "__rate_interval_ms": str(int(seconds(args.rate_interval) * 1000)),
    }


VAR_RE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]|\$(\w+)")


def regex_escape(v):
    # Grafana's prometheusSpecialRegexEscape, as written into a PromQL string literal.
    v = v.replace("\\", "\\\\\\\\")
    return re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", v)


def format_value(values, multi):
    if len(values) == 1 and not multi:
        return values[0].replace("\\", "\\\\").replace("'", "\\\\'")
    return "(" + "|".join(regex_escape(v) for v in values) + ")"


def substitute(expr, values):
    """values: name -> already formatted string. Returns (query, [unknown names])."""
    unknown = []

    def repl(m):
        name = m.group(1) or m.group(3) or m.group(5)
        if name in values:
            return values[name]
        unknown.append(name)
        return m.group(0)

    return VAR_RE.sub(repl, expr), unknown


# ----------------------------------------------------------------------------- Prometheus API


def api(url, path, params=None, timeout=30):
    data = urllib.parse.urlencode(params or {}).encode() if params is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "errorType": f"http_{e.code}", "error": body.decode(errors="replace")[:500]}


def run_query(url, query, at):
    params = {"query": query}
    if at is not None:
        params["time"] = at
    try:
        r = api(url, "/api/v1/query", params)
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"cannot reach Prometheus at {url}: {e}")
    if r.get("status") == "success":
        data = r["data"]
        rt = data["resultType"]
        n = len(data["result"]) if rt in ("vector", "matrix") else 1
        return {"parsed": True, "ok": True, "series": n, "result_type": rt, "error": None,
                "warnings": r.get("warnings") or []}
    et, err = r.get("errorType", "error"), r.get("error", "")
    parse_error = et == "bad_data" and "parse error" in err
    return {"parsed": not parse_error, "ok": False, "series": 0, "result_type": None,
            "error": f"{et}: {err}"}


def discover_variables(url, variables, fixed, args, at):
    values, notes = dict(builtins(args)), {}
    for v in variables:
        name = v["name"]
        if name in fixed:
            values[name] = format_value(fixed[name], v["multi"])
            notes[name] = {"from": "command line", "values": fixed[name]}
            continue
        if args.all and v["allValue"] is not None:
            values[name] = v["allValue"]
            notes[name] = {"from": "allValue (--all)", "values": [v["allValue"]]}
            continue
        found = []
        if v["query"] is not None and v["label"] is not None:
            q, unknown = substitute(v["query"], values)
            if not unknown:
                r = api(url, "/api/v1/query", {"query": q, **({"time": at} if at else {})})
                if r.get("status") == "success" and r["data"]["resultType"] == "vector":
                    seen = {s["metric"].get(v["label"], "") for s in r["data"]["result"]}
                    found = sorted(seen - {""})
                    # Series without the label (a sidecar's have no pod_uid, a
                    # DaemonSet's no pod): the dashboard's default, All (`.*`), matches
                    # them too, so every discovered value plus the empty one does.
                    if found and "" in seen and v["multi"]:
                        found.append("")
        if found:
            values[name] = format_value(found, v["multi"])
            notes[name] = {"from": "discovered", "values": found}
        elif v["allValue"] is not None:
            values[name] = v["allValue"]
            notes[name] = {"from": "allValue (nothing discovered)", "values": [v["allValue"]]}
        else:
            notes[name] = {"from": "unresolved", "values": []}
    return values, notes


# ----------------------------------------------------------------------------- the check


def read_names(path):
    names = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                names.append(line)
    return names


def check(args, url):
    dash_files = sorted(set(sum((glob.glob(os.path.join(ROOT, g)) for g in args.dashboards), [])))
    rule_files = sorted(set(sum((glob.glob(os.path.join(ROOT, g)) for g in args.alerts), [])))
    if not dash_files and not rule_files:
        raise SystemExit("no dashboard or rule files found")
    fixed = {}
    for kv in args.var:
        if "=" not in kv:
            raise SystemExit(f"--var wants NAME=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        fixed.setdefault(k, []).append(v)
    at = args.time
    entries, var_notes = [], {}
    for path in dash_files:
        exprs, variables = extract_dashboard(path)
        values, notes = discover_variables(url, variables, fixed, args, at)
        var_notes[os.path.relpath(path, ROOT)] = notes
        for e in exprs:
            q, unknown = substitute(e["expr"], values)
            e["query"] = q
            if unknown:
                e.update(parsed=False, ok=False, series=0, result_type=None,
                         error="unresolved template variable(s): " + ", ".join(sorted(set(unknown))))
            else:
                e.update(run_query(url, q, at))
            entries.append(e)
    for path in rule_files:
        for e in extract_rules(path):
            e["query"] = e["expr"]
            e.update(run_query(url, e["expr"], at))
            entries.append(e)

    names = {e["name"] for e in entries} | {f'{e["name"]}#{e["ref"]}' for e in entries if e["ref"]}
    required, problems = [], []
    if args.require_data:
        required = list(args.require_data)
    if args.require_data_all_except:
        exempt = read_names(args.require_data_all_except)
        for n in exempt:
            if n not in names:
                problems.append(f"{args.require_data_all_except}: {n!r} matches no panel, alert, rule or variable")
        exempt_set = set(exempt)
        required += sorted({e["name"] for e in entries if e["name"] not in exempt_set})
    missing = []
    for n in required:
        if n not in names:
            problems.append(f"--require-data: {n!r} matches no panel, alert, rule or variable")
            continue
        sel = [e for e in entries if e["name"] == n or f'{e["name"]}#{e["ref"]}' == n]
        total = sum(e["series"] for e in sel)
        for e in sel:
            e["data_required"] = True
        if total == 0:
            missing.append(n)

    failed = [e for e in entries if not e["ok"]]
    report = {
        "prometheus": url,
        "time": at,
        "rate_interval": args.rate_interval, "interval": args.interval, "range": args.range,
        "variables": var_notes,
        "expressions": entries,
        "summary": {
            "expressions": len(entries),
            "parse_errors": sum(1 for e in entries if not e["parsed"]),
            "evaluation_errors": sum(1 for e in entries if e["parsed"] and not e["ok"]),
            "with_data": sum(1 for e in entries if e["series"] > 0),
            "required_without_data": missing,
            "problems": problems,
        },
    }
    text = json.dumps(report, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)

    err = sys.stderr
    s = report["summary"]
    print(f"promql_exprs: {s['expressions']} expressions from {len(dash_files)} dashboard(s) and "
          f"{len(rule_files)} rule file(s); {s['with_data']} returned data", file=err)
    for e in failed:
        ref = f" [{e['ref']}]" if e["ref"] else ""
        print(f"  FAIL {e['source']}: {e['kind']} {e['name']!r}{ref}: {e['error']}\n       {e['query']}", file=err)
    for n in missing:
        print(f"  NO DATA {n!r}: required to return at least one series", file=err)
    for p in problems:
        print(f"  ERROR {p}", file=err)
    if failed or problems:
        return 1
    if missing:
        return 2
    return 0


# ----------------------------------------------------------------------------- self-test


def le_str(x):
    return "+Inf" if math.isinf(x) else repr(float(x))


class Synthetic:
    """A metrics page with every Vigil metric; counters grow with time since start."""

    SECONDS_BUCKETS = [1e-6 * 2 ** k for k in range(26)] + [math.inf]
    REGIONS = [
        {"namespace": "ml", "pod": "trainer-0", "container": "cuda", "region": "/vigil/region.cache", "node": "gpu-node-2"},
        {"namespace": "ml", "pod": "trainer-1", "container": "cuda", "region": "/vigil/region.cache", "node": "gpu-node-2"},
        {"namespace": "batch", "pod": "infer-7f9c", "container": "server", "region": "/vigil/region.cache"},
        # DaemonSet mode: pod_uid and container from HAMi's directory, no names; `node`
        # as the chart's monitors add it.
        {"region": "vigil.cache", "pod_uid": "0c7e2a", "container": "main", "node": "gpu-node-1"},
    ]

    def __init__(self):
        self.t0 = time.time()

    @staticmethod
    def labels(d):
        return "{" + ",".join(f'{k}="{v}"' for k, v in d.items()) + "}" if d else ""

    def render(self):
        # Offset so that every counter is already non-zero and moving at the first scrape.
        t = time.time() - self.t0 + 30.0
        lines, typed = [], set()

        def emit(name, typ, labels, value):
            family = name
            for suffix in ("_bucket", "_sum", "_count"):
                if typ == "histogram" and name.endswith(suffix):
                    family = name[: -len(suffix)]
            if family not in typed:
                typed.add(family)
                lines.append(f"# TYPE {family} {typ}")
            lines.append(f"{name}{self.labels(labels)} {value:.6g}" if isinstance(value, float) else
                         f"{name}{self.labels(labels)} {value}")

        def hist(name, labels, obs, buckets):
            total = sum(r for _, r in obs) * t
            for le in buckets:
                c = sum(r for v, r in obs if v <= le) * t
                emit(f"{name}_bucket", "histogram", {**labels, "le": le_str(le)}, round(c))
            emit(f"{name}_sum", "histogram", labels, sum(v * r for v, r in obs) * t)
            emit(f"{name}_count", "histogram", labels, round(total))

        for i, r in enumerate(self.REGIONS):
            k = 1 + i
            emit("vigil_region_recoveries_total", "counter", r, 1 if i == 0 else 0)
            emit("vigil_process_inits_total", "counter", {**r, "path": "initializer"}, 1)
            emit("vigil_process_inits_total", "counter", {**r, "path": "fast_path"}, round(0.5 * k * t))
            emit("vigil_process_slots_reclaimed_total", "counter", {**r, "reason": "released"}, round(0.4 * t))
            emit("vigil_process_slots_reclaimed_total", "counter", {**r, "reason": "dead"}, round(0.05 * t))
            for lock, acq, retry in (("region", 10, 2), ("detect", 0.5, 0.5)):
                emit("vigil_lock_acquisitions_total", "counter", {**r, "lock": lock}, round(acq * k * t))
                emit("vigil_lock_retries_total", "counter", {**r, "lock": lock}, round(retry * t))
                emit("vigil_lock_fenced_releases_total", "counter", {**r, "lock": lock}, round(0.2 * t))
                for reason in ("owner_dead", "lease_expired"):
                    emit("vigil_lock_force_posts_total", "counter", {**r, "lock": lock, "reason": reason},
                         round(0.05 * t) + 1)
            for outcome, rate in (("found", 0.5), ("same_namespace", 0.1), ("ambiguous", 0.05),
                                  ("timeout", 0.1), ("nvml_error", 0.02)):
                emit("vigil_host_pid_detections_total", "counter", {**r, "outcome": outcome}, round(rate * t))
            for result, rate in (("match", 0.4), ("mismatch", 0.05), ("unresolvable", 0.05),
                                 ("not_recorded", 0.1)):
                emit("vigil_host_pid_checks_total", "counter", {**r, "result": result}, round(rate * t))
            emit("vigil_ring_events_total", "counter", r, round(20 * t))
            for reason, rate in (("overwritten", 1), ("torn", 0.02), ("abandoned", 0.02)):
                emit("vigil_ring_events_lost_total", "counter", {**r, "reason": reason}, round(rate * t))
            emit("vigil_processes", "gauge", r, 2 + i)
            limit = 8 << 30
            for dev, lim, used in (("0", limit, int(limit * 0.95)), ("1", 0, 3 << 30)):
                d = {**r, "device": dev}
                emit("vigil_device_memory_limit_bytes", "gauge", d, lim)
                emit("vigil_device_memory_used_bytes", "gauge", d, used)
                emit("vigil_device_memory_peak_bytes", "gauge", d, used + (64 << 20))
                emit("vigil_device_memory_allocation_denials_total", "counter", d,
                     round(0.1 * t) if dev == "0" else 0)
            hist("vigil_lock_wait_seconds", {**r, "lock": "region"}, [(0.0005, 5), (1.5, 1)], self.SECONDS_BUCKETS)
            hist("vigil_lock_wait_seconds", {**r, "lock": "detect"}, [(0.3, 0.5), (15, 0.5)], self.SECONDS_BUCKETS)
            hist("vigil_host_pid_detection_seconds", r, [(0.28, 0.5), (0.6, 0.2), (5.0, 0.1)], self.SECONDS_BUCKETS)
            emit("vigil_host_pid_detection_polls_total", "counter", r, round((3 * 0.5 + 12 * 0.2 + 400 * 0.1) * t))
            hist("vigil_init_duration_seconds", r, [(0.002, 0.5), (0.3, 0.3)], self.SECONDS_BUCKETS)
        for i, r in enumerate(self.REGIONS[:2]):
            for u in ("sm_limit", "oversubscribe", "core_utilization_policy", "task_priority", "active_oom_killer"):
                emit("vigil_unenforced_settings", "gauge", {**r, "setting": u}, 1 if u == "sm_limit" else 0)
            d = {**r, "device": "0"}
            emit("vigil_device_memory_dead_bytes", "gauge", d, 0)
            emit("vigil_nvml_process_memory_bytes", "gauge", d, 5 << 30)
            emit("vigil_device_memory_accounting_drift_bytes", "gauge", d, 1 << 30)
        # A HAMi-core region whose sem is held by a dead owner, with host PID 0 slots
        # and memory in dead slots: every vigil-hami alert has data.
        h = {"pod_uid": "0c7e2a", "container": "main", "region": "abc.cache", "node": "gpu-node-1",
             "interposer": "hami-core"}
        emit("vigil_processes", "gauge", h, 1)
        emit("vigil_hami_region_info", "gauge", {**h, "version": "1.2"}, 1)
        for dev in ("0",):
            d = {**h, "device": dev}
            emit("vigil_device_memory_limit_bytes", "gauge", d, 4 << 30)
            emit("vigil_device_memory_used_bytes", "gauge", d, 2 << 30)
            emit("vigil_device_memory_dead_bytes", "gauge", d, 1 << 30)
            emit("vigil_hami_device_info", "gauge", {**d, "uuid": "GPU-0000"}, 1)
            emit("vigil_hami_device_sm_limit_ratio", "gauge", d, 0.5)
        for state, n in (("alive", 1), ("dead", 2), ("unknown", 0)):
            emit("vigil_hami_process_slots", "gauge", {**h, "state": state}, n)
        emit("vigil_hami_host_pid_zero_slots", "gauge", h, 2)
        emit("vigil_hami_host_pid_wrong_slots", "gauge", h, 0)
        for lock, held, dead, waiters in (("sem", 1, 1, 3), ("sem_postinit", 0, 0, 0)):
            emit("vigil_hami_lock_held", "gauge", {**h, "lock": lock}, held)
            emit("vigil_hami_lock_owner_dead", "gauge", {**h, "lock": lock}, dead)
            emit("vigil_hami_lock_waiters", "gauge", {**h, "lock": lock}, waiters)
        # kube-state-metrics' pod info for the vigil-identity recording rules.
        emit("kube_pod_info", "gauge", {"namespace": "ml", "pod": "trainer-2", "uid": "0c7e2a", "node": "gpu-node-1"}, 1)
        emit("vigil_exporter_hami_regions", "gauge", {}, 1)
        emit("vigil_exporter_nvml_up", "gauge", {}, 1)
        emit("vigil_exporter_nvml_errors_total", "counter", {}, 0)
        emit("vigil_exporter_nvml_refresh_seconds", "gauge", {}, 0.0004)
        emit("vigil_device_info", "gauge", {"device": "0", "uuid": "GPU-0000", "model": "Synthetic"}, 1)
        emit("vigil_nvml_device_memory_total_bytes", "gauge", {"device": "0"}, 80 << 30)
        emit("vigil_nvml_device_memory_used_bytes", "gauge", {"device": "0"}, 20 << 30)
        emit("vigil_exporter_regions", "gauge", {}, len(self.REGIONS))
        emit("vigil_exporter_build_info", "gauge", {"version": "0.1.0-selftest"}, 1)
        for reason, rate in (("corrupt", 0.1), ("vanished", 0.05)):
            emit("vigil_exporter_region_errors_total", "counter",
                 {"reason": reason}, round(rate * t))
        hist("vigil_exporter_scrape_duration_seconds", {}, [(0.0008, 1), (0.004, 0.1)], self.SECONDS_BUCKETS)
        return "\n".join(lines) + "\n"


def self_test(args):
    prom = args.prometheus_bin or shutil.which("prometheus")
    if not prom:
        print("self-test: no `prometheus` binary (apt-get install prometheus, or --prometheus-bin)", file=sys.stderr)
        return 3
    synth = Synthetic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = synth.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    tmp = tempfile.mkdtemp(prefix="vigil-promql-")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    exporter = f"127.0.0.1:{server.server_address[1]}"
    down = f"127.0.0.1:{free_port()}"  # nothing listens: up == 0 for VigilExporterDown
    prom_port = free_port()
    url = f"http://127.0.0.1:{prom_port}"
    rule_files = sorted(set(sum((glob.glob(os.path.join(ROOT, g)) for g in args.alerts), [])))
    with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
        json.dump({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": rule_files,
            "scrape_configs": [{"job_name": "vigil-exporter", "honor_labels": True,
                                "static_configs": [{"targets": [exporter, down]}]}],
        }, f)
    log = open(os.path.join(tmp, "prometheus.log"), "w")
    proc = subprocess.Popen([prom, f"--config.file={tmp}/prometheus.yml", f"--storage.tsdb.path={tmp}/data",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rc = 1
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                log.flush()
                print(open(os.path.join(tmp, "prometheus.log")).read()[-3000:], file=sys.stderr)
                raise SystemExit("self-test: prometheus exited")
            try:
                if api(url, "/api/v1/query", {"query": 'count(up{job="vigil-exporter"} == 1)'}, timeout=2) \
                        .get("data", {}).get("result"):
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline:
                raise SystemExit("self-test: prometheus did not scrape the synthetic exporter in 60 s")
            time.sleep(0.5)
        print(f"self-test: prometheus {url} scrapes the synthetic exporter {exporter}; "
              f"waiting {args.self_test_wait}s for samples", file=sys.stderr)
        time.sleep(args.self_test_wait)
        exempt = os.path.join(tmp, "exempt.txt")
        with open(exempt, "w") as f:
            f.write("# cannot return data while an exporter target exists\nVigilExporterAbsent\n")
        args.require_data_all_except = args.require_data_all_except or exempt
        rc = check(args, url)
        # Every rule evaluates without error in a live Prometheus.
        rules = api(url, "/api/v1/rules")["data"]["groups"]
        bad = [(g["name"], r["name"], r.get("lastError")) for g in rules for r in g["rules"]
               if r.get("health") != "ok"]
        n = sum(len(g["rules"]) for g in rules)
        if n == 0:
            print("self-test: prometheus loaded no rules", file=sys.stderr)
            rc = rc or 1
        for g, r, e in bad:
            print(f"self-test: rule {g}/{r} health is not ok: {e}", file=sys.stderr)
            rc = rc or 1
        alerts = api(url, "/api/v1/alerts")["data"]["alerts"]
        states = {}
        for a in alerts:
            states.setdefault(a["labels"]["alertname"], set()).add(a["state"])
        print(f"self-test: {n} rules loaded, {n - len(bad)} healthy; alerts pending/firing: "
              + ", ".join(f"{k}={'/'.join(sorted(v))}" for k, v in sorted(states.items())), file=sys.stderr)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server.shutdown()
        server.server_close()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--dashboards", nargs="+", default=["dashboards/*.json"], help="globs, relative to the repo root")
    ap.add_argument("--alerts", nargs="+", default=["alerts/*.yml", "alerts/*.yaml"], help="globs, relative to the repo root")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="template variable value (repeatable)")
    ap.add_argument("--all", action="store_true", help="use allValue for variables that have one instead of discovering")
    ap.add_argument("--rate-interval", default="1m", help="value of $__rate_interval (default 1m)")
    ap.add_argument("--interval", default="30s", help="value of $__interval (default 30s)")
    ap.add_argument("--range", default="1h", help="value of $__range (default 1h)")
    ap.add_argument("--time", help="evaluation time (RFC 3339 or Unix seconds; default: now)")
    ap.add_argument("--require-data", nargs="+", default=[], metavar="NAME")
    ap.add_argument("--require-data-all-except", metavar="FILE")
    ap.add_argument("--output", "-o", help="write the JSON report here instead of stdout")
    ap.add_argument("--self-test", action="store_true", help="run against a synthetic exporter and a local prometheus")
    ap.add_argument("--self-test-wait", type=float, default=8, help="seconds of scrapes before checking (self-test)")
    ap.add_argument("--prometheus-bin", help="prometheus binary for --self-test (default: from PATH)")
    args = ap.parse_args()
    for d in (args.rate_interval, args.interval, args.range):
        seconds(d)
    if args.self_test:
        return self_test(args)
    if not args.url:
        ap.error("--url is required (or --self-test)")
    return check(args, args.url)


if __name__ == "__main__":
    sys.exit(main())
