"""NVML probe for the simulator tests, through nvidia-ml-py (pynvml), unchanged.

  nvml_probe.py list          one JSON object: driver, devices, memory, processes
  nvml_probe.py poll MS       for MS milliseconds, one line per poll of device 0:
                              "<CLOCK_MONOTONIC ns> <pid>,<pid>,..."
  nvml_probe.py procutil      one JSON object: nvmlDeviceGetProcessUtilization through
                              pynvml, and called directly with NULL arguments
"""
import ctypes
import json
import sys
import time

import pynvml


def procs(h, fn):
    return [{"pid": p.pid, "used": p.usedGpuMemory} for p in fn(h)]


def main():
    pynvml.nvmlInit()
    if sys.argv[1] == "list":
        out = {"driver": pynvml.nvmlSystemGetDriverVersion(), "devices": []}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            m = pynvml.nvmlDeviceGetMemoryInfo(h)
            m2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
            out["devices"].append({
                "name": pynvml.nvmlDeviceGetName(h),
                "uuid": pynvml.nvmlDeviceGetUUID(h),
                "total": m.total, "free": m.free, "used": m.used,
                "total_v2": m2.total, "used_v2": m2.used,
                "procs": procs(h, pynvml.nvmlDeviceGetComputeRunningProcesses),
                "procs_v2": procs(h, pynvml.nvmlDeviceGetComputeRunningProcesses_v2),
            })
        print(json.dumps(out))
    elif sys.argv[1] == "poll":
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        end = time.monotonic() + int(sys.argv[2]) / 1000
        print("start", flush=True)
        while time.monotonic() < end:
            pids = [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
            print(time.clock_gettime_ns(time.CLOCK_MONOTONIC), ",".join(map(str, pids)), flush=True)
            time.sleep(0.002)
    elif sys.argv[1] == "procutil":
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        out = {}
        try:
            out["pynvml"] = len(pynvml.nvmlDeviceGetProcessUtilization(h, 0))
        except pynvml.NVMLError as e:
            out["pynvml"] = e.value
        # The same symbol pynvml resolves (dlsym on libnvidia-ml.so.1), called raw.
        fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetProcessUtilization")
        fn.restype = ctypes.c_int
        buf = (pynvml.c_nvmlProcessUtilizationSample_t * 4)()
        for name, samples, count in [
            ("null_buffer", None, 5),
            ("buffer", buf, 4),
            ("null_count", buf, None),
            ("null_both", None, None),
        ]:
            c = None if count is None else ctypes.c_uint(count)
            r = fn(h, samples, None if c is None else ctypes.byref(c), ctypes.c_ulonglong(0))
            out[name] = {"ret": r, "count": None if c is None else c.value}
        out["bad_handle"] = fn(ctypes.c_void_p(8), None, ctypes.byref(ctypes.c_uint(0)), ctypes.c_ulonglong(0))
        print(json.dumps(out))
    pynvml.nvmlShutdown()


if __name__ == "__main__":
    main()
