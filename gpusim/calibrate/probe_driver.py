"""Measures the driver behaviours the simulator must reproduce, against whatever
libcuda.so.1 / libnvidia-ml.so.1 the dynamic loader finds: the real driver on a GPU
machine, or the simulator (LD_LIBRARY_PATH + VIGIL_GPUSIM_SOCKET).

    python3 probe_driver.py WORKLOAD [RUNS]

WORKLOAD is the vigil-workload binary. Prints one JSON object per line.
"""
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

import pynvml

WORKLOAD = sys.argv[1]
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 10


def now():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def emit(**kv):
    print(json.dumps(kv), flush=True)


pynvml.nvmlInit()
emit(probe="driver", version=pynvml.nvmlSystemGetDriverVersion(), devices=pynvml.nvmlDeviceGetCount())
h = pynvml.nvmlDeviceGetHandleByIndex(0)


def pids():
    return {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}


class Poller(threading.Thread):
    """Polls NVML as fast as it can; records when each pid was first and last seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.first, self.last, self.stop, self.polls = {}, {}, False, 0

    def run(self):
        while not self.stop:
            t = now()
            for p in pids():
                self.first.setdefault(p, t)
                self.last[p] = t
            self.polls += 1
            time.sleep(0.0005)


def run_workload(args, prefix=()):
    return subprocess.Popen(list(prefix) + [WORKLOAD] + args, stdout=subprocess.PIPE, text=True)


def read_until(proc, word):
    for line in proc.stdout:
        parts = line.split()
        if parts and parts[0] == word:
            return dict(kv.split("=", 1) for kv in parts[1:] if "=" in kv)
        if parts and parts[0] == "error":
            raise RuntimeError(line)
    raise RuntimeError("workload exited before " + word)


# 1. NVML visibility lag after primary-context creation, and the context footprint.
lags, creates, footprints = [], [], []
for i in range(RUNS):
    poller = Poller()
    poller.start()
    w = run_workload(["--alloc", "1MiB", "--exit", "wait"])
    ctx = read_until(w, "ctx")
    read_until(w, "ready")
    deadline = time.monotonic() + 5
    while w.pid not in poller.first and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)
    seen = poller.first.get(w.pid)
    used = pids().get(w.pid)
    # 2. SIGKILL: how long until NVML forgets it.
    t_kill = now()
    w.kill()
    w.wait()
    gone = None
    while time.monotonic() < deadline + 5:
        if w.pid not in pids():
            gone = now() - t_kill
            break
        time.sleep(0.0005)
    poller.stop = True
    poller.join()
    lag = None if seen is None else (seen - int(ctx["ts_ns"])) / 1e6
    lags.append(lag)
    creates.append(int(ctx["create_ns"]) / 1e6)
    footprints.append(used)
    emit(probe="context", run=i, nvml_lag_ms=lag, ctx_create_ms=int(ctx["create_ns"]) / 1e6,
         used_bytes_with_1mib=used, gone_after_kill_ms=None if gone is None else gone / 1e6, polls=poller.polls)

ok = [x for x in lags if x is not None]
if ok:
    ok.sort()
    emit(probe="lag_summary", runs=len(ok), min_ms=ok[0], median_ms=ok[len(ok) // 2], max_ms=ok[-1],
         ctx_create_median_ms=sorted(creates)[len(creates) // 2])

# 3. PID namespaces: which PID does NVML report for a process in its own namespace?
try:
    w = run_workload(["--alloc", "1MiB", "--exit", "wait"], prefix=("unshare", "--pid", "--fork", "--kill-child", "--mount-proc"))
    ready = read_until(w, "ready")
    children = open(f"/proc/{w.pid}/task/{w.pid}/children").read().split()
    time.sleep(1.0)
    emit(probe="pid_namespace", pid_inside=ready["pid"], host_pid=int(children[0]), nvml_pids=sorted(pids()))
    w.kill()
    w.wait()
except Exception as e:  # noqa: BLE001 - report, do not fail the other probes
    emit(probe="pid_namespace", error=str(e))

# 4. cuGetProcAddress_v2 semantics: returned status for versions and unknown names.
cuda = ctypes.CDLL("libcuda.so.1")
gp = cuda.cuGetProcAddress_v2
gp.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64, ctypes.POINTER(ctypes.c_int)]
results = {}
for phase in ("before_cuInit", "after_cuInit"):
    if phase == "after_cuInit":
        cuda.cuInit(0)
    for name, ver, flags in [("cuMemAlloc", 12000, 0), ("cuMemAlloc", 3000, 0), ("cuMemAlloc", 2000, 0),
                             ("cuNoSuchThing", 12000, 0), ("cuMemAlloc_v2", 12000, 0), ("cuMemcpyHtoD", 12000, 2),
                             ("cuGetProcAddress", 12000, 0), ("cuCtxCreate", 12080, 0)]:
        p, st = ctypes.c_void_p(), ctypes.c_int(-1)
        r = gp(name.encode(), ctypes.byref(p), ver, flags, ctypes.byref(st))
        results[f"{phase}:{name}@{ver}/{flags}"] = [r, st.value, bool(p.value)]
emit(probe="getprocaddress", results=results)
