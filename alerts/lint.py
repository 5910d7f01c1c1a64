#!/usr/bin/env python3
"""Lint the alerting rules in alerts/*.yml against Vigil's conventions (run by
scripts/check-monitoring.sh, next to `promtool check rules` and `promtool test rules`).

Checks: alert names are CamelCase `Vigil*` and unique; every alert has a `severity`
label (critical|warning|info) and `summary`, `description` and `runbook_url`
annotations; runbook_url points to docs/runbooks.md#<alert name, lower-cased> and that
section exists; every runbook section names an existing alert; every vigil_* name is
a metric of the exporter's contract (the list in dashboards/lint.py); an alert that
fires on `increase(...) > 0` also catches a series that first appears non-zero
(`unless ... last_over_time(...)`); every alert has, in alerts/tests/*.yml, at least
one `alert_rule_test` where it fires and one where it stays quiet.
"""
import glob
import importlib.util
import os
import re
import sys

import yaml

sys.dont_write_bytecode = True  # importing dashboards/lint.py must not leave __pycache__ in the tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNBOOKS = os.path.join(ROOT, "docs", "runbooks.md")
RUNBOOK_PREFIX = "https://github.com/vigil/vigil/blob/main/docs/runbooks.md#"

spec = importlib.util.spec_from_file_location("dashlint", os.path.join(ROOT, "dashboards", "lint.py"))
dashlint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dashlint)
METRICS = dashlint.METRICS


def anchors(md):
    out = {}
    for line in md.splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"[`*_]", "", m.group(2))
            a = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
            out[a] = m.group(2)
    return out


def main():
    errs = []
    files = sorted(glob.glob(os.path.join(ROOT, "alerts", "*.yml")) + glob.glob(os.path.join(ROOT, "alerts", "*.yaml")))
    alerts = {}
    for f in files:
        rel = os.path.relpath(f, ROOT)
        doc = yaml.safe_load(open(f)) or {}
        for g in doc.get("groups") or []:
            for r in g.get("rules") or []:
                if "record" in r:
                    if not re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", r["record"]):
                        errs.append(f"{rel}: record {r['record']!r} is not level:metric:operations")
                    continue
                a = r.get("alert", "")
                where = f"{rel}: {a}"
                if a in alerts:
                    errs.append(f"{where}: defined twice")
                alerts[a] = r
                if not re.fullmatch(r"Vigil[A-Z][A-Za-z0-9]*", a):
                    errs.append(f"{where}: name is not CamelCase Vigil*")
                sev = (r.get("labels") or {}).get("severity")
                if sev not in ("critical", "warning", "info"):
                    errs.append(f"{where}: severity label {sev!r} is not critical|warning|info")
                ann = r.get("annotations") or {}
                for k in ("summary", "description", "runbook_url"):
                    if not (ann.get(k) or "").strip():
                        errs.append(f"{where}: no {k} annotation")
                if ann.get("runbook_url") and ann["runbook_url"] != RUNBOOK_PREFIX + a.lower():
                    errs.append(f"{where}: runbook_url should be {RUNBOOK_PREFIX + a.lower()}")
                expr = str(r.get("expr", ""))
                for n in sorted(set(re.findall(r"\bvigil_[a-z0-9_]+", expr)) - METRICS):
                    errs.append(f"{where}: {n} is not a metric of the exporter's contract")
                if re.search(r"increase\([^)]*\)\s*>\s*0\b", expr) and not ("unless" in expr and "last_over_time(" in expr):
                    errs.append(f"{where}: increase(...) > 0 misses a counter whose series first appears "
                                "non-zero; add `or (x > 0 unless on(...) last_over_time(x[1h] offset W))`")
    if not alerts:
        errs.append("no alerts found in alerts/")

    md = open(RUNBOOKS).read() if os.path.exists(RUNBOOKS) else ""
    if not md:
        errs.append("docs/runbooks.md is missing")
    heads = anchors(md)
    for a in alerts:
        if a.lower() not in heads:
            errs.append(f"docs/runbooks.md: no section `## {a}` (anchor #{a.lower()})")
    for anchor, text in heads.items():
        if re.fullmatch(r"vigil[a-z0-9]+", anchor) and text.startswith("Vigil") and text not in alerts:
            errs.append(f"docs/runbooks.md: section {text!r} names no alert")

    fires, quiet = {}, {}
    for f in sorted(glob.glob(os.path.join(ROOT, "alerts", "tests", "*.yml"))):
        rel = os.path.relpath(f, ROOT)
        doc = yaml.safe_load(open(f)) or {}
        for rf in doc.get("rule_files") or []:
            if not os.path.exists(os.path.join(os.path.dirname(f), rf)):
                errs.append(f"{rel}: rule file {rf} does not exist")
        for t in doc.get("tests") or []:
            for at in t.get("alert_rule_test") or []:
                n = at.get("alertname")
                (fires if at.get("exp_alerts") else quiet).setdefault(n, []).append(f"{rel}: {t.get('name')}")
    for a in alerts:
        if a not in fires:
            errs.append(f"{a}: no promtool test where it fires (alerts/tests/*.yml)")
        if a not in quiet:
            errs.append(f"{a}: no promtool test where it stays quiet (alerts/tests/*.yml)")
    for n in set(fires) | set(quiet):
        if n not in alerts:
            errs.append(f"alerts/tests: test for unknown alert {n!r}")
    for e in errs:
        print(f"FAIL {e}")
    print(f"{len(alerts)} alerts: {'conventions, runbooks and test coverage ok' if not errs else f'{len(errs)} problem(s)'}")
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
