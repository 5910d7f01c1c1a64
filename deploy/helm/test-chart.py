#!/usr/bin/env python3
"""Checks of the Helm chart deploy/helm/vigil (scripts/check-monitoring.sh runs them).

  deploy/helm/test-chart.py lint
      `helm lint --strict` with the defaults and with every deploy/helm/tests/*.values.yaml
  deploy/helm/test-chart.py case FILE [-k K8S_VERSION ...]
      `helm template` with FILE, then:
      - every object validated by deploy/validate-manifests.py (kubernetes-validate
        strict for core kinds, deploy/schemas/ for monitoring.coreos.com/v1, Vigil's
        security policies);
      - the PrometheusRule's groups checked by `promtool check rules`;
      - what the values ask for is what was rendered: each expectation below is
        derived from the values (the chart's values.yaml merged with FILE), not
        written down per case. For the rules: every alert of alerts/ is rendered
        exactly as alerts/ has it, changed only as the values say (absent when
        disabled, its `for`, severity, threshold, the job selector, the runbook
        URL base, the extra labels), and a group whose alerts are all disabled is
        absent; with the defaults the groups equal alerts/ exactly.
  deploy/helm/test-chart.py generator
      deploy/gen-prometheusrule.py on synthetic rules with what alerts/ does not have
      today (a recording rule, `== N`, `>= bool N`, keep_firing_for, quotes and {{ }} in
      annotations): rendered with the defaults they equal the source; overrides apply;
      promtool is clean; --check notices a changed source
  deploy/helm/test-chart.py bad
      every deploy/helm/tests/bad/*.values.yaml is rejected by `helm template` and
      `helm lint`, with an error that contains each of its `# expect: TEXT` lines
      (`# refused-by: template`: a template's `fail`, which helm lint only logs)

Uses $HELM, else target/tools/helm; promtool from PATH. Exit 1 on any failure.
"""
import argparse
import copy
import glob
import os
import re
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHART = os.path.join(HERE, "vigil")
TESTS = os.path.join(HERE, "tests")
HELM = os.environ.get("HELM") or os.path.join(ROOT, "target", "tools", "helm")
RELEASE, NAMESPACE = "vigil", "vigil-system"
THRESHOLD_RE = re.compile(r'(\s(?:>=|<=|>|<)\s*(?:bool\s+)?)([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(\s*)$')
JOB_RE = re.compile(r'\bjob\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _validator():
    """deploy/validate-manifests.py as a module (its name has a dash)."""
    import importlib.util
    sys.dont_write_bytecode = True  # no __pycache__ in the tree
    spec = importlib.util.spec_from_file_location(
        "validate_manifests", os.path.join(ROOT, "deploy", "validate-manifests.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# One rule for a key twice in a mapping (rendered output is refused like the API
# server would): the validator's loader.
StrictLoader = _validator().StrictLoader


def rel(p):
    return os.path.relpath(p, ROOT)


def helm(*args):
    if not os.access(HELM, os.X_OK):
        sys.exit(f"test-chart.py: no helm at {rel(HELM)} (scripts/install-helm.sh installs it, or set HELM)")
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)


def merge(base, over):
    """Helm's coalescing of a values file over the chart's values (maps merge, null deletes)."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def cmd_lint(_args):
    failures = 0
    for extra in [None] + sorted(glob.glob(os.path.join(TESTS, "*.values.yaml"))):
        args = ["lint", "--strict", CHART] + (["--values", extra] if extra else [])
        r = helm(*args)
        what = rel(extra) if extra else "defaults"
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or "[WARNING]" in out or "[ERROR]" in out:
            failures += 1
            print(f"FAIL helm lint --strict ({what}):\n{out}")
        else:
            print(f"ok   helm lint --strict ({what})")
    return 1 if failures else 0


class Checker:
    def __init__(self, values, docs, chart_meta):
        self.v, self.docs, self.meta = values, docs, chart_meta
        self.errors = []
        self.by = {}
        for d in docs:
            self.by.setdefault(d["kind"], []).append(d)

    def expect(self, cond, msg):
        if not cond:
            self.errors.append(msg)

    def one(self, kind, name=None, present=True):
        objs = [d for d in self.by.get(kind, []) if name is None or d["metadata"]["name"] == name]
        label = f"{kind}/{name or '*'}"
        if present:
            self.expect(len(objs) == 1, f"expected one {label}, found {len(objs)}")
        else:
            self.expect(not objs, f"expected no {label} (disabled by the values), found {len(objs)}")
        return objs[0] if len(objs) == 1 else None

    def image(self, img):
        return f"{img['repository']}:{img['tag'] or self.meta['appVersion']}"

    def pod(self, kind, name, present):
        o = self.one(kind, name, present)
        return o, ((o or {}).get("spec", {}).get("template", {}).get("spec") or {})

    def scheduling(self, ps, what):
        v = self.v
        self.expect((ps.get("nodeSelector") or {}) == (v["nodeSelector"] or {}), f"{what}: nodeSelector is not the values'")
        self.expect((ps.get("tolerations") or []) == (v["tolerations"] or []), f"{what}: tolerations are not the values'")
        self.expect((ps.get("affinity") or {}) == (v["affinity"] or {}), f"{what}: affinity is not the values'")
        self.expect(ps.get("priorityClassName", "") == v["priorityClassName"], f"{what}: priorityClassName is not the values'")
        self.expect((ps.get("imagePullSecrets") or []) == (v["imagePullSecrets"] or []), f"{what}: imagePullSecrets are not the values'")

    def monitor_endpoint(self, ep, what):
        self.expect(ep.get("honorLabels") is False, f"{what}: honorLabels must be false")
        rl = ep.get("relabelings") or []
        self.expect(any(r.get("sourceLabels") == ["__meta_kubernetes_pod_node_name"] and r.get("targetLabel") == "node"
                        and r.get("action", "replace") == "replace" for r in rl),
                    f"{what}: no relabeling sets `node` from __meta_kubernetes_pod_node_name")
        self.expect(any(r.get("targetLabel") == "job" and r.get("replacement") == self.v["monitoring"]["jobLabel"] for r in rl),
                    f"{what}: job is not forced to monitoring.jobLabel {self.v['monitoring']['jobLabel']!r}")

    def run(self, src_groups):
        v = self.v
        e = v["exporter"]
        # namespace
        ns = self.one("Namespace", NAMESPACE, v["namespace"]["create"])
        if ns:
            self.expect(ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == v["namespace"]["podSecurity"]["enforce"],
                        "Namespace: pod-security enforce label is not the values'")
        # exporter
        ds, ps = self.pod("DaemonSet", "vigil-exporter", e["enabled"])
        self.one("ServiceAccount", "vigil-exporter", e["enabled"])
        self.one("Service", "vigil-exporter", e["enabled"])
        self.one("NetworkPolicy", "vigil-exporter", e["enabled"] and v["networkPolicy"]["enabled"])
        if ds:
            c = ps["containers"][0]
            d = v["hami"]["containersDir"]
            self.expect(f"--regions-dir={d}" in c["args"], f"exporter: args {c['args']} lack --regions-dir={d}")
            vols = {x["name"]: x for x in ps.get("volumes") or []}
            hp = [x for x in vols.values() if "hostPath" in x]
            self.expect([x["hostPath"]["path"] for x in hp] == [d], f"exporter: hostPath volumes {hp} are not exactly hami.containersDir {d}")
            self.expect(any(m["mountPath"] == d and m.get("readOnly") and "hostPath" in vols.get(m["name"], {}) for m in c["volumeMounts"]),
                        f"exporter: {d} is not mounted read-only at the same path")
            self.expect(bool(ps.get("hostPID")) == e["hostPID"], f"exporter: hostPID is {bool(ps.get('hostPID'))}, values say {e['hostPID']}")
            self.expect(c["image"] == self.image(e["image"]), f"exporter: image {c['image']} is not {self.image(e['image'])}")
            self.expect(c["imagePullPolicy"] == e["image"]["pullPolicy"], "exporter: imagePullPolicy is not the values'")
            for a in e["extraArgs"]:
                self.expect(a in c["args"], f"exporter: extra arg {a} missing")
            self.expect(f"--web.listen-address=:{e['port']}" in c["args"], "exporter: listen address is not exporter.port")
            self.expect(ps["securityContext"].get("runAsUser") == e["runAsUser"], "exporter: runAsUser is not the values'")
            wc = e["webConfig"]
            has_arg = any(a.startswith("--web.config.file=") for a in c["args"])
            self.expect(has_arg == bool(wc["secretName"]), "exporter: --web.config.file present iff webConfig.secretName")
            if wc["secretName"]:
                self.expect(f"--web.config.file=/etc/vigil/web/{wc['file']}" in c["args"], "exporter: --web.config.file does not name webConfig.file")
                self.expect(any((x.get("secret") or {}).get("secretName") == wc["secretName"] for x in vols.values()),
                            "exporter: the web-config Secret is not mounted")
            scheme = c["readinessProbe"]["httpGet"].get("scheme", "HTTP")
            self.expect(scheme == ("HTTPS" if wc["tls"] else "HTTP"), f"exporter: readiness probe scheme {scheme} with webConfig.tls={wc['tls']}")
            self.scheduling(ps, "exporter")
        # installer
        i = v["installer"]
        inst, ips = self.pod("DaemonSet", "vigil-installer", i["enabled"])
        if inst:
            hp = [x["hostPath"]["path"] for x in ips.get("volumes") or [] if "hostPath" in x]
            self.expect(hp == [i["hostDir"]], f"installer: hostPath volumes {hp} are not exactly installer.hostDir")
            ic = (ips.get("initContainers") or [{}])[0]
            self.expect(ic.get("command") == ["/opt/vigil/bin/vigil-install", "/host" + i["hostDir"]],
                        f"installer: init command {ic.get('command')} does not install into installer.hostDir")
            self.expect(ic.get("image") == self.image(i["image"]), f"installer: image {ic.get('image')} is not {self.image(i['image'])}")
            self.expect(not ips.get("hostPID"), "installer: must not use hostPID")
            self.scheduling(ips, "installer")
        # monitors
        sm = self.one("ServiceMonitor", "vigil-exporter", e["enabled"] and v["serviceMonitor"]["enabled"])
        if sm:
            for k, val in (v["serviceMonitor"]["labels"] or {}).items():
                self.expect(sm["metadata"]["labels"].get(k) == val, f"ServiceMonitor: label {k}={val} missing")
            for ep in sm["spec"]["endpoints"]:
                self.monitor_endpoint(ep, "ServiceMonitor")
                self.expect(ep.get("scheme", "http") == ("https" if e["webConfig"]["tls"] else "http"), "ServiceMonitor: scheme does not follow webConfig.tls")
                self.expect((ep.get("basicAuth") or {}) == (v["serviceMonitor"]["basicAuth"] or {}), "ServiceMonitor: basicAuth is not the values'")
        pm = self.one("PodMonitor", "vigil-exporter-sidecars", v["podMonitor"]["enabled"])
        if pm:
            self.expect(pm["spec"]["selector"] == {"matchLabels": {"vigil.dev/exporter": "sidecar"}}, "PodMonitor: selector is not vigil.dev/exporter=sidecar")
            self.expect(pm["spec"]["namespaceSelector"] == v["podMonitor"]["namespaceSelector"], "PodMonitor: namespaceSelector is not the values'")
            for ep in pm["spec"]["podMetricsEndpoints"]:
                self.monitor_endpoint(ep, "PodMonitor")
        # sidecar example
        s = v["sidecarExample"]
        dep = self.one("Deployment", s["name"], s["enabled"])
        if dep:
            self.expect(dep["metadata"].get("namespace", "") == s["namespace"], "sidecar example: namespace is not the values'")
            self.expect(dep["spec"]["template"]["metadata"]["labels"].get("vigil.dev/exporter") == "sidecar",
                        "sidecar example: pod lacks the label the PodMonitor selects")
        # rules
        pr = self.one("PrometheusRule", "vigil-alerts", v["prometheusRule"]["enabled"])
        if pr:
            self.rules(pr, src_groups)

    def rules(self, pr, src_groups):
        r = self.v["prometheusRule"]
        for k, val in (r["labels"] or {}).items():
            self.expect(pr["metadata"]["labels"].get(k) == val, f"PrometheusRule: label {k}={val} for the ruleSelector missing")
        job = r["jobSelector"] or f'job="{self.v["monitoring"]["jobLabel"]}"'
        expected_groups = []
        for g in src_groups:
            rules = []
            for src in g.get("rules") or []:
                rule = copy.deepcopy(src)
                if isinstance(rule.get("expr"), str):
                    rule["expr"] = JOB_RE.sub(lambda m: job, rule["expr"])
                if "alert" in src:
                    a = r["alerts"][src["alert"]]
                    if not a["enabled"]:
                        continue
                    rule["for"] = a["for"]
                    labels = {**(src.get("labels") or {}), **(r["additionalRuleLabels"] or {}), "severity": a["severity"]}
                    rule["labels"] = labels
                    url = (rule.get("annotations") or {}).get("runbook_url")
                    if url and "#" in url:
                        rule["annotations"]["runbook_url"] = r["runbookUrlBase"] + "#" + url.split("#", 1)[1]
                    if "threshold" in a:
                        rule["threshold"] = float(a["threshold"])
                        desc = (rule.get("annotations") or {}).get("description")
                        m_src = THRESHOLD_RE.search(rule["expr"])
                        if desc and m_src:
                            rule["annotations"]["description"] = requote(
                                desc, float(m_src.group(2)), float(a["threshold"]))
                rules.append(rule)
            if rules:
                expected_groups.append({**g, "rules": rules})
        got_groups = pr["spec"]["groups"]
        exp_names = [g["name"] for g in expected_groups]
        got_names = [g["name"] for g in got_groups]
        self.expect(exp_names == got_names, f"PrometheusRule: groups {got_names}, expected {exp_names} (a group whose alerts are all disabled is absent)")
        got_by = {(rr.get("alert") or rr.get("record")): rr for g in got_groups for rr in g.get("rules") or []}
        exp_by = {(rr.get("alert") or rr.get("record")): rr for g in expected_groups for rr in g["rules"]}
        for name in sorted(set(got_by) - set(exp_by)):
            self.errors.append(f"PrometheusRule: {name} is rendered but the values disable it")
        for name, exp in exp_by.items():
            got = got_by.get(name)
            if got is None:
                self.errors.append(f"PrometheusRule: {name} is missing")
                continue
            exp = copy.deepcopy(exp)
            got = copy.deepcopy(got)
            want_threshold = exp.pop("threshold", None)
            if want_threshold is not None:
                m_got = THRESHOLD_RE.search(got["expr"])
                m_exp = THRESHOLD_RE.search(exp["expr"])
                if not m_got:
                    self.errors.append(f"PrometheusRule: {name}: expression no longer ends in a comparison")
                    continue
                self.expect(float(m_got.group(2)) == want_threshold,
                            f"PrometheusRule: {name}: threshold {m_got.group(2)}, values say {want_threshold}")
                got["expr"] = got["expr"][:m_got.start(2)] + "N" + got["expr"][m_got.end(2):]
                exp["expr"] = exp["expr"][:m_exp.start(2)] + "N" + exp["expr"][m_exp.end(2):]
            for k in sorted(set(got) | set(exp)):
                g, x = got.get(k), exp.get(k)
                if isinstance(g, dict) and isinstance(x, dict):
                    for kk in sorted(set(g) | set(x)):
                        if g.get(kk) != x.get(kk):
                            self.errors.append(f"PrometheusRule: {name}: {k}.{kk} is {str(g.get(kk))[:300]!r}, "
                                               f"expected {str(x.get(kk))[:300]!r}")
                elif g != x:
                    self.errors.append(f"PrometheusRule: {name}: {k} is {str(g)[:300]!r}, expected {str(x)[:300]!r}")


def go_float(x):
    """x as Go's templates print a float64 (shortest form, no `.0`)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def requote(desc, default, value):
    """A description whose quote of its alert's default threshold (`threshold N`,
    `threshold N%` = N/100, `threshold Ns`) says `value` instead: what the chart must
    render when the values change the threshold. Other quoted numbers stay."""
    def sub(m):
        num = float(m.group(1)) / (100 if m.group(2) == "%" else 1)
        if abs(num - default) > 1e-9 * max(1.0, abs(default)):
            return m.group(0)
        shown = go_float(round(value * 100, 6)) if m.group(2) == "%" else go_float(value)
        return f"threshold {shown}{m.group(2) or ''}"
    return re.sub(r"\bthreshold (\d+(?:\.\d+)?)(%|s)?(?![\w.])", sub, desc)


def cmd_case(args):
    path = args.file
    with open(os.path.join(CHART, "values.yaml")) as f:
        defaults = yaml.safe_load(f)
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        meta = yaml.safe_load(f)
    with open(path) as f:
        case_values = yaml.safe_load(f) or {}
    values = merge(defaults, case_values)
    r = helm("template", RELEASE, CHART, "--namespace", NAMESPACE, "--values", path)
    if r.returncode != 0:
        print(f"FAIL helm template with {rel(path)}:\n{r.stderr}")
        return 1
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        rendered = os.path.join(tmp, os.path.basename(path).replace(".values", ".rendered"))
        with open(rendered, "w") as f:
            f.write(r.stdout)
        try:
            docs = [d for d in yaml.load_all(r.stdout, Loader=StrictLoader) if d]
        except yaml.YAMLError as e:
            print(f"FAIL helm template with {rel(path)} rendered invalid YAML: {e}")
            return 1
        print(f"helm template with {rel(path)}: {len(docs)} objects: "
              + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs))
        vargs = [sys.executable, os.path.join(ROOT, "deploy", "validate-manifests.py")]
        for k in args.kubernetes_version or []:
            vargs += ["-k", k]
        v = subprocess.run(vargs + [rendered], capture_output=True, text=True, timeout=300)
        print(v.stdout.rstrip())
        if v.returncode != 0:
            print(f"FAIL deploy/validate-manifests.py on the rendered objects\n{v.stderr}")
            failures += 1
        rules = [d for d in docs if d["kind"] == "PrometheusRule"]
        if rules:
            rules_file = os.path.join(tmp, "rules.yml")
            with open(rules_file, "w") as f:
                yaml.safe_dump({"groups": [g for d in rules for g in d["spec"]["groups"]]}, f, sort_keys=False)
            p = subprocess.run(["promtool", "check", "rules", rules_file], capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                print(f"FAIL promtool check rules on the rendered PrometheusRule:\n{p.stdout}{p.stderr}")
                failures += 1
            else:
                print("ok   promtool check rules: " + " ".join(p.stdout.split()[-3:]))
        src_groups = []
        for f_ in sorted(set(glob.glob(os.path.join(ROOT, "alerts", "*.yml")) + glob.glob(os.path.join(ROOT, "alerts", "*.yaml")))):
            with open(f_) as f:
                src_groups += (yaml.safe_load(f) or {}).get("groups") or []
        c = Checker(values, docs, meta)
        c.run(src_groups)
        if c.errors:
            failures += 1
            print(f"FAIL the rendered objects do not do what {rel(path)} asks:")
            for e in c.errors:
                print(f"     {e}")
        else:
            print(f"ok   the rendered objects do what {rel(path)} asks (exporter, installer, monitors, sidecar, rules)")
        if case_values == {} and rules:
            same = rules[0]["spec"]["groups"] == src_groups
            print(("ok   " if same else "FAIL ") + "with the defaults the PrometheusRule's groups equal alerts/ exactly")
            failures += 0 if same else 1
    return 1 if failures else 0


def cmd_bad(_args):
    files = sorted(glob.glob(os.path.join(TESTS, "bad", "*.values.yaml")))
    if not files:
        print("FAIL no deploy/helm/tests/bad/*.values.yaml")
        return 1
    failures = 0
    for path in files:
        with open(path) as f:
            text = f.read()
        expects = re.findall(r"^#\s*expect:\s*(.+?)\s*$", text, re.M)
        if not expects:
            print(f"FAIL {rel(path)}: no `# expect: TEXT` line")
            failures += 1
            continue
        verbs = [["template", RELEASE, CHART], ["lint", "--strict", CHART]]
        if re.search(r"^#\s*refused-by:\s*template\b", text, re.M):
            # A template's `fail` (a rule the schema cannot say clearly): helm lint only
            # logs those, helm template/install refuse.
            verbs = verbs[:1]
        for verb in verbs:
            r = helm(*verb, "--values", path)
            out = r.stdout + r.stderr
            missing = [e for e in expects if e not in out]
            if r.returncode == 0 or missing:
                failures += 1
                print(f"FAIL helm {verb[0]} with {rel(path)}: exit {r.returncode}, "
                      f"{'missing ' + repr(missing) if missing else 'accepted'}\n{out.strip()}")
            else:
                msg = next((line.strip() for line in out.splitlines() if expects[0] in line), "")
                print(f"ok   helm {verb[0]} rejects {rel(path)}: {msg[:200]}")
    return 1 if failures else 0


SYNTHETIC_RULES = r"""
groups:
  - name: synthetic-recording
    interval: 1m
    rules:
      - record: vigil:up:sum
        expr: sum by (instance) (up{job="vigil-exporter"})
        labels:
          source: synthetic
  - name: synthetic-alerts
    rules:
      - alert: SynthSingleLine
        expr: vigil:up:sum{job="vigil-exporter"} == 0
        for: 2m
        labels: {severity: info, team: gpu}
        annotations:
          summary: 'It''s "quoted": {{ $labels.instance }} }} {{ "{{" }}'
          runbook_url: https://example.com/rb.md#synthsingleline
      - alert: SynthBool
        expr: |
          count(up{job="vigil-exporter"}) >= bool 3
        for: 0m
        keep_firing_for: 5m
        labels: {severity: warning}
        annotations:
          description: >-
            {{ $value | humanize }} of
            {{ $labels.job }} (threshold 3; the fixed threshold 2s stays)
          runbook_url: https://example.com/rb.md#synthbool
      - alert: SynthPct
        expr: avg(up) < 0.25
        for: 0m
        labels: {severity: warning}
        annotations:
          description: '{{ $value | humanizePercentage }} up (threshold 25%)'

  - name: synthetic-only-one
    rules:
      - alert: SynthLt
        expr: min(up) < 1
        for: 1m
        labels: {severity: critical}
"""

SYNTHETIC_OVERRIDES = """
prometheusRule:
  jobSelector: job=~"a|b"
  runbookUrlBase: https://runbooks.example.org/x
  additionalRuleLabels: {team: platform}
  alerts:
    SynthLt: {enabled: false}
    SynthBool: {threshold: 7.5, severity: page, for: 10m}
    SynthPct: {threshold: 0.3}
"""


def cmd_generator(_args):
    """gen-prometheusrule.py on rules of its own: a recording rule, a one-line expression,
    `== N` (no threshold), `>= bool N`, keep_firing_for, quotes and Prometheus's {{ }} in
    annotations, a group of one alert; rendered with the defaults (equal to the source),
    with overrides (what they ask), through promtool, and --check catching a stale chart."""
    failures = []
    gen = os.path.join(ROOT, "deploy", "gen-prometheusrule.py")
    with tempfile.TemporaryDirectory() as tmp:
        chart = os.path.join(tmp, "vigil")
        subprocess.run(["cp", "-r", CHART, chart], check=True)
        alerts = os.path.join(tmp, "alerts")
        os.mkdir(alerts)
        src_file = os.path.join(alerts, "synthetic.yml")
        with open(src_file, "w") as f:
            f.write(SYNTHETIC_RULES)
        p = subprocess.run(["promtool", "check", "rules", src_file], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"FAIL the synthetic rules themselves do not pass promtool:\n{p.stdout}{p.stderr}")
            return 1
        base = [sys.executable, gen, "--alerts-dir", alerts, "--chart", chart]
        g = subprocess.run(base, capture_output=True, text=True)
        if g.returncode != 0:
            print(f"FAIL gen-prometheusrule.py on the synthetic rules:\n{g.stdout}{g.stderr}")
            return 1
        src_groups = yaml.safe_load(SYNTHETIC_RULES)["groups"]
        with open(os.path.join(chart, "values.yaml")) as f:
            defaults = yaml.safe_load(f)
        thresholds = {n: a.get("threshold") for n, a in defaults["prometheusRule"]["alerts"].items()}
        want = {"SynthSingleLine": None, "SynthBool": 3, "SynthPct": 0.25, "SynthLt": 1}
        if thresholds != want:
            failures.append(f"generated thresholds {thresholds}, expected {want} (== is no threshold)")
        over_file = os.path.join(tmp, "over.yaml")
        with open(over_file, "w") as f:
            f.write(SYNTHETIC_OVERRIDES)
        for label, extra, values in (("defaults", [], defaults),
                                     ("overrides", ["--values", over_file],
                                      merge(defaults, yaml.safe_load(SYNTHETIC_OVERRIDES)))):
            r = helm("template", RELEASE, chart, "--namespace", NAMESPACE, "--show-only",
                     "templates/prometheusrule.yaml", *extra)
            if r.returncode != 0:
                failures.append(f"helm template ({label}): {r.stderr.strip()}")
                continue
            pr = yaml.safe_load(r.stdout)
            rules_file = os.path.join(tmp, f"{label}.yml")
            with open(rules_file, "w") as f:
                yaml.safe_dump({"groups": pr["spec"]["groups"]}, f, sort_keys=False)
            p = subprocess.run(["promtool", "check", "rules", rules_file], capture_output=True, text=True)
            if p.returncode != 0:
                failures.append(f"promtool check rules ({label}): {p.stdout}{p.stderr}")
            if label == "defaults" and pr["spec"]["groups"] != src_groups:
                failures.append(f"with the defaults the groups differ from the source:\n{yaml.safe_dump(pr['spec']['groups'])}")
            c = Checker(values, [pr], {"appVersion": "0"})
            c.rules(pr, src_groups)
            failures += [f"({label}) {e}" for e in c.errors]
            if label == "overrides":
                names = [gr["name"] for gr in pr["spec"]["groups"]]
                if "synthetic-only-one" in names:
                    failures.append("(overrides) the group whose only alert is disabled is still rendered")
                # Descriptions quote the threshold in force; a fixed one stays.
                for quote in ("(threshold 7.5; the fixed threshold 2s stays)", "up (threshold 30%)"):
                    if quote not in r.stdout:
                        failures.append(f"(overrides) no description says {quote!r}")
                if 'job=~"a|b"' not in r.stdout or "https://runbooks.example.org/x#synthbool" not in r.stdout:
                    failures.append("(overrides) the job selector or the runbook URL base does not appear")
        if subprocess.run(base + ["--check"], capture_output=True, text=True).returncode != 0:
            failures.append("gen-prometheusrule.py --check fails right after generating")
        with open(src_file, "a") as f:
            f.write("      - alert: SynthNew\n        expr: up == 0\n        labels: {severity: info}\n")
        if subprocess.run(base + ["--check"], capture_output=True, text=True).returncode == 0:
            failures.append("gen-prometheusrule.py --check passes although alerts/ gained an alert")
        # A description quoting a threshold the expression does not have is refused:
        # the chart could not keep it true.
        with open(src_file, "a") as f:
            f.write("      - alert: SynthWrongQuote\n        expr: up < 1\n        labels: {severity: info}\n"
                    "        annotations: {description: 'down (threshold 5%)'}\n")
        g = subprocess.run(base, capture_output=True, text=True)
        if g.returncode == 0 or "SynthWrongQuote" not in g.stderr + g.stdout:
            failures.append(f"gen-prometheusrule.py accepts a description quoting another threshold: "
                            f"{g.stdout}{g.stderr}")
    for f_ in failures:
        print(f"FAIL {f_}")
    if not failures:
        print("ok   gen-prometheusrule.py on synthetic rules (recording rule, ==, >= bool, keep_firing_for, "
              "{{ }} and quotes, a one-alert group, threshold quotes in descriptions): defaults equal "
              "the source, overrides applied, promtool clean, --check detects staleness, a wrong "
              "quote is refused")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("lint")
    c = sub.add_parser("case")
    c.add_argument("file")
    c.add_argument("--kubernetes-version", "-k", action="append")
    sub.add_parser("bad")
    sub.add_parser("generator")
    args = ap.parse_args()
    return {"lint": cmd_lint, "case": cmd_case, "bad": cmd_bad, "generator": cmd_generator}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
