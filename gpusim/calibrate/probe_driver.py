"""Measures the driver behaviours the simulator must reproduce, against whatever
libcuda.so.1 / libnvidia-ml.so.1 the dynamic loader finds: the real driver on a GPU
machine, or the simulator (LD_LIBRARY_PATH + VIGIL_GPUSIM_SOCKET).

    python3 probe_driver.py WORKLOAD [RUNS] [--probes LIST] [--mem-reps N]

WORKLOAD is the vigil-workload binary (not needed with --probes memory). LIST is a
comma-separated subset of context,pid_namespace,getprocaddress,memory (default: all).
Prints one JSON object per line.
"""
import argparse
import ctypes
import json
import os
import subprocess
import threading
import time

import pynvml

PROBES = ("context", "pid_namespace", "getprocaddress", "memory")
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("workload", nargs="?", help="the vigil-workload binary")
ap.add_argument("runs", nargs="?", type=int, default=10, help="context runs (default 10)")
ap.add_argument("--probes", default=",".join(PROBES), help="comma-separated subset of " + ",".join(PROBES))
ap.add_argument("--mem-reps", type=int, default=5, help="memory probe: repetitions per size (default 5)")
ap.add_argument("--mem-timeout", type=float, default=2.0,
                help="memory probe: seconds to wait for NVML to show a change (default 2)")
ARGS = ap.parse_args()
SELECTED = set(ARGS.probes.split(","))
if SELECTED - set(PROBES):
    ap.error("unknown probes: " + ",".join(sorted(SELECTED - set(PROBES))))
if SELECTED & {"context", "pid_namespace"} and not ARGS.workload:
    ap.error("WORKLOAD is needed for the context and pid_namespace probes")
WORKLOAD = ARGS.workload
RUNS = ARGS.runs


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
for i in range(RUNS if "context" in SELECTED else 0):
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
if "pid_namespace" in SELECTED:
    try:
        w = run_workload(["--alloc", "1MiB", "--exit", "wait"],
                         prefix=("unshare", "--pid", "--fork", "--kill-child", "--mount-proc"))
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
for phase in ("before_cuInit", "after_cuInit") if "getprocaddress" in SELECTED else ():
    if phase == "after_cuInit":
        cuda.cuInit(0)
    for name, ver, flags in [("cuMemAlloc", 12000, 0), ("cuMemAlloc", 3000, 0), ("cuMemAlloc", 2000, 0),
                             ("cuNoSuchThing", 12000, 0), ("cuMemAlloc_v2", 12000, 0), ("cuMemcpyHtoD", 12000, 2),
                             ("cuGetProcAddress", 12000, 0), ("cuCtxCreate", 12080, 0)]:
        p, st = ctypes.c_void_p(), ctypes.c_int(-1)
        r = gp(name.encode(), ctypes.byref(p), ver, flags, ctypes.byref(st))
        results[f"{phase}:{name}@{ver}/{flags}"] = [r, st.value, bool(p.value)]
if "getprocaddress" in SELECTED:
    emit(probe="getprocaddress", results=results)


# 5. Memory signatures: how soon, and how exactly, NVML's per-process usedGpuMemory
#    follows cuMemAlloc / cuMemFree of k x 2 MiB made by this process. The delay is
#    from the call's return to the first poll showing a change (delay_ms), and from the
#    call's start (delay_from_call_ms, an upper bound on the driver's own lag); `exact`
#    says whether that first change was exactly +/- k x 2 MiB. device_step is how much
#    nvmlDeviceGetMemoryInfo's `used` had moved right after the call returned (other
#    processes on a real GPU may add noise to it).
def probe_memory():
    me = os.getpid()
    cuda.cuInit.argtypes = [ctypes.c_uint]
    cuda.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    cuda.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    cuda.cuDevicePrimaryCtxRelease_v2.argtypes = [ctypes.c_int]
    cuda.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
    cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    cuda.cuMemFree_v2.argtypes = [ctypes.c_uint64]

    def check(name, r):
        if r != 0:
            raise RuntimeError(f"{name} returned {r}")

    def mine():
        return pids().get(me)

    def device_used():
        return pynvml.nvmlDeviceGetMemoryInfo(h).used

    check("cuInit", cuda.cuInit(0))
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    check("cuDeviceGet", cuda.cuDeviceGet(ctypes.byref(dev), 0))
    check("cuDevicePrimaryCtxRetain", cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    check("cuCtxSetCurrent", cuda.cuCtxSetCurrent(ctx))
    # Wait until NVML lists us and our usage has been steady for 200 ms.
    deadline, last, steady_since = time.monotonic() + 10, None, time.monotonic()
    while time.monotonic() < deadline:
        u = mine()
        if u != last:
            last, steady_since = u, time.monotonic()
        elif u is not None and time.monotonic() - steady_since > 0.2:
            break
        time.sleep(0.002)
    if last is None:
        emit(probe="memory", error=f"pid {me} never listed by NVML (PID namespace?)")
        return
    emit(probe="memory_start", pid=me, used_bytes=last)

    def measure(op, k, rep, call):
        base, dev_before = mine(), device_used()
        t0 = now()
        call()
        t1 = now()
        dev_step = device_used() - dev_before
        polls, u, t2 = 0, base, None
        end = time.monotonic() + ARGS.mem_timeout
        while time.monotonic() < end:
            u = mine()
            polls += 1
            if u != base:
                t2 = now()
                break
        bytes_ = k * (2 << 20)
        want = base + bytes_ if op == "alloc" else base - bytes_
        step = None if u is None or base is None else u - base
        emit(probe="memory", op=op, k=k, bytes=bytes_, rep=rep, call_ms=(t1 - t0) / 1e6,
             delay_ms=None if t2 is None else (t2 - t1) / 1e6,
             delay_from_call_ms=None if t2 is None else (t2 - t0) / 1e6,
             step=step, exact=u == want, device_step=dev_step, polls=polls)
        # Let a partial step finish before the next measurement.
        settle = time.monotonic() + ARGS.mem_timeout
        while mine() != want and time.monotonic() < settle:
            time.sleep(0.001)
        return None if t2 is None else (t2 - t1) / 1e6, u == want

    results = {"alloc": [], "free": []}
    for rep in range(ARGS.mem_reps):
        for k in (1, 2, 5, 16):
            ptr = ctypes.c_uint64()
            results["alloc"].append(measure(
                "alloc", k, rep,
                lambda: check("cuMemAlloc_v2", cuda.cuMemAlloc_v2(ctypes.byref(ptr), k * (2 << 20)))))
            results["free"].append(measure(
                "free", k, rep, lambda: check("cuMemFree_v2", cuda.cuMemFree_v2(ptr.value))))
    for op, rs in results.items():
        seen = sorted(d for d, _ in rs if d is not None)
        emit(probe="memory_summary", op=op, runs=len(rs), seen=len(seen),
             exact=sum(1 for _, e in rs if e),
             min_ms=seen[0] if seen else None, median_ms=seen[len(seen) // 2] if seen else None,
             max_ms=seen[-1] if seen else None)
    cuda.cuDevicePrimaryCtxRelease_v2(dev)


if "memory" in SELECTED:
    try:
        probe_memory()
    except Exception as e:  # noqa: BLE001 - report what failed
        emit(probe="memory", error=str(e))
