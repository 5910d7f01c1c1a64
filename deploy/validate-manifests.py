#!/usr/bin/env python3
"""Validate every Kubernetes manifest under deploy/ (schemas and Vigil's policies).

  deploy/validate-manifests.py [--kubernetes-version 1.30.0 ...] [FILE ...]

* Core kinds (Deployment, DaemonSet, Service, Namespace, ServiceAccount, ...) are
  validated with kubernetes-validate (PyPI) in strict mode (unknown fields rejected)
  against each pinned Kubernetes version (default 1.30.0, the oldest we support;
  repeat the option for more). A kind it has no schema for is an error, not a warning.
* monitoring.coreos.com/v1 kinds (ServiceMonitor, PodMonitor, PrometheusRule) are not
  in those schemas: they are validated against deploy/schemas/monitoring.coreos.com-v1.json,
  a JSON Schema written from the prometheus-operator CRDs (see its description).
  Other CRD groups are errors.
* Policies the issue asks for, checked on every pod template:
  - every container and init container: allowPrivilegeEscalation false, capabilities
    drop ALL, readOnlyRootFilesystem true; runAsNonRoot true (pod or container);
  - the exporter (image .../vigil-exporter): every volume mount read-only, and its
    args name --regions-dir or --region;
  - a container that preloads libvigil.so: CUDA_DEVICE_MEMORY_SHARED_CACHE, POD_NAME and
    POD_NAMESPACE (downward API) and CONTAINER_NAME set;
  - hostPath volumes are only mounted read-only;
  - the one exception: the libvigil.so node installer (the chart's installer.enabled),
    an INIT container whose command is /opt/vigil/bin/vigil-install DEST_DIR, may run
    as root (it writes into a root-owned host directory as its owner, which needs no
    capability) and mount one hostPath read-write, exactly at DEST_DIR; everything else
    above still applies to it (no capabilities, no privilege escalation, read-only root
    filesystem), and its pod may not use hostPID, hostNetwork or hostIPC.
The chart's sources (deploy/helm/) are not manifests: the default file list leaves them
out (scripts/check-monitoring.sh validates what the chart renders instead).
Exit 1 on any failure, listing every problem.
"""
import argparse
import glob
import json
import os
import sys

try:
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:
    sys.exit(f"validate-manifests.py needs kubernetes-validate and PyYAML ({e}); "
             "scripts/check-monitoring.sh installs them into target/pyenv")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CRD_SCHEMA = os.path.join(HERE, "schemas", "monitoring.coreos.com-v1.json")
POD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "Pod", "CronJob"}
INSTALLER = "/opt/vigil/bin/vigil-install"


def installer_dest(c, is_init):
    """DEST_DIR if c is the libvigil.so node installer (an init container), else None."""
    cmd = list(c.get("command") or []) + list(c.get("args") or [])
    if is_init and len(cmd) == 2 and cmd[0] == INSTALLER and cmd[1].startswith("/"):
        return cmd[1].rstrip("/") or "/"
    return None


class StrictLoader(yaml.SafeLoader):
    """A key twice in one mapping is an error: PyYAML would keep the last silently, the
    API server and kubectl refuse the object."""


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for k, _ in node.value:
        key = loader.construct_object(k, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", k.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def pod_spec(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    return (spec.get("template") or {}).get("spec") or {}


def policy(doc):
    errs = []
    ps = pod_spec(doc)
    pod_sc = ps.get("securityContext") or {}
    volumes = {v["name"]: v for v in ps.get("volumes") or []}
    inits = ps.get("initContainers") or []
    for idx, c in enumerate(inits + (ps.get("containers") or [])):
        n = c.get("name")
        sc = c.get("securityContext") or {}
        dest = installer_dest(c, idx < len(inits))
        if dest is not None:
            for host in ("hostPID", "hostNetwork", "hostIPC"):
                if ps.get(host):
                    errs.append(f"container {n} (libvigil.so installer): its pod must not set {host}")
        if sc.get("allowPrivilegeEscalation") is not False:
            errs.append(f"container {n}: securityContext.allowPrivilegeEscalation must be false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            errs.append(f"container {n}: securityContext.capabilities.drop must contain ALL")
        if sc.get("readOnlyRootFilesystem") is not True:
            errs.append(f"container {n}: securityContext.readOnlyRootFilesystem must be true")
        if dest is None and not (sc.get("runAsNonRoot") is True or (pod_sc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
            errs.append(f"container {n}: runAsNonRoot must be true (pod or container securityContext)")
        mounts = c.get("volumeMounts") or []
        rw_host = [m for m in mounts if "hostPath" in volumes.get(m["name"], {}) and not m.get("readOnly")]
        if dest is not None and len(rw_host) == 1 and rw_host[0].get("mountPath", "").rstrip("/") == dest:
            rw_host = []  # the installer's one writable hostPath, at its DEST_DIR
        for m in rw_host:
            errs.append(f"container {n}: hostPath volume {m['name']} must be mounted readOnly"
                        + (f" (the installer may write only to its DEST_DIR {dest})" if dest else ""))
        if "vigil-exporter" in (c.get("image") or ""):
            for m in mounts:
                if not m.get("readOnly"):
                    errs.append(f"container {n} (exporter): volume mount {m['name']} must be readOnly")
            args = " ".join(c.get("args") or []) + " " + " ".join(c.get("command") or [])
            if "--regions-dir" not in args and "--region" not in args:
                errs.append(f"container {n} (exporter): needs --regions-dir or --region")
        env = {e["name"]: e for e in c.get("env") or []}
        if "libvigil.so" in (env.get("LD_PRELOAD") or {}).get("value", ""):
            for need in ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "CONTAINER_NAME"):
                if need not in env:
                    errs.append(f"container {n}: preloads libvigil.so but does not set {need}")
            for need, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
                ref = ((env.get(need) or {}).get("valueFrom") or {}).get("fieldRef") or {}
                if ref.get("fieldPath") != path:
                    errs.append(f"container {n}: {need} must come from the downward API ({path})")
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubernetes-version", "-k", action="append", dest="versions")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    versions = args.versions or ["1.30.0"]
    files = args.files or sorted(
        f for f in glob.glob(os.path.join(HERE, "**", "*.y*ml"), recursive=True)
        if os.path.basename(os.path.dirname(f)) != "schemas"
        and not os.path.relpath(f, HERE).startswith("helm" + os.sep))
    with open(CRD_SCHEMA) as f:
        crd = json.load(f)
    jsonschema.Draft202012Validator.check_schema(crd)
    crd_validators = {k: jsonschema.Draft202012Validator({"$schema": crd["$schema"], "$defs": crd["$defs"],
                                                          "$ref": f"#/$defs/{k}"})
                      for k in ("ServiceMonitor", "PodMonitor", "PrometheusRule")}
    failures, count = 0, 0
    for path in files:
        rel = os.path.relpath(path, ROOT)
        try:
            with open(path) as f:
                docs = [d for d in yaml.load_all(f, Loader=StrictLoader) if d]
        except yaml.YAMLError as e:
            print(f"FAIL {rel}: not YAML: {e}")
            failures += 1
            continue
        for doc in docs:
            count += 1
            what = f"{rel}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            errs = []
            api = doc.get("apiVersion", "")
            if api.startswith("monitoring.coreos.com/"):
                v = crd_validators.get(doc.get("kind")) if api == "monitoring.coreos.com/v1" else None
                if v is None:
                    errs.append(f"no schema for {api} {doc.get('kind')} in {os.path.relpath(CRD_SCHEMA, ROOT)}")
                else:
                    for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                        msg = e.message[:300]
                        if e.validator in ("oneOf", "anyOf", "not"):
                            msg = (f"matches none or several of the alternatives of '{e.validator}' at "
                                   f"{'/'.join(map(str, e.schema_path))} (e.g. a rule needs exactly one of alert, record)")
                        errs.append(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {msg}")
            elif "." in api.split("/")[0] and not api.split("/")[0].endswith(".k8s.io"):
                errs.append(f"custom resource group {api} has no schema here")
            else:
                for ver in versions:
                    try:
                        kubernetes_validate.validate(doc, ver, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        errs.append(f"Kubernetes {ver}: {'.'.join(map(str, e.path))}: {e.message[:300]}")
                    except kubernetes_validate.utils.SchemaNotFoundError as e:
                        errs.append(e.message)
                    except kubernetes_validate.utils.VersionNotSupportedError:
                        errs.append(f"kubernetes-validate {kubernetes_validate.__version__} "
                                    f"does not support Kubernetes {ver}")
            if doc.get("kind") in POD_KINDS:
                errs += policy(doc)
            if errs:
                failures += 1
                print(f"FAIL {what}")
                for e in errs:
                    print(f"     {e}")
            else:
                print(f"ok   {what}")
    print(f"{count} objects in {len(files)} files, Kubernetes {', '.join(versions)}: "
          f"{'all valid' if not failures else f'{failures} invalid'}")
    return 1 if failures or not count else 0


if __name__ == "__main__":
    sys.exit(main())
