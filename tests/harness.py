"""What the Python test drivers under tests/ share: the built binaries, the simulator and
the exporter as context managers (always stopped, even on an exception or SIGTERM),
temporary directories that are always removed, a free-port helper, and a region's state
read as JSON (`vigil-exporter inspect --json`), never by matching the text of
`vigil-region inspect`.

Environment:
  VIGIL_SKIP_BUILD=1      use the binaries already in target/debug (`build()` does nothing)
  VIGIL_KEEP=1            keep every temporary directory (logs, sockets, regions) and say
                          where it is; VIGIL_KEEP=failed keeps only those of failed runs
"""
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "debug"
# Any one helper command (vigil-exporter inspect, vigil-gpusim stats, ...).
CMD_LIMIT_S = 30.0
# One PID namespace per process (the kill-child keeps no orphan behind its unshare).
UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
KEEP_ENV = "VIGIL_KEEP"


class HarnessError(Exception):
    """A daemon or helper that the run needs did not start or answer."""


def build():
    """Builds the workspace as the tests need it, unless VIGIL_SKIP_BUILD=1."""
    if os.environ.get("VIGIL_SKIP_BUILD") != "1":
        subprocess.run(["cargo", "build", "--quiet", "--workspace", "--features", "vigil-interposer/fault-injection"],
                       cwd=ROOT, check=True)


def exit_on_sigterm():
    """Turns SIGTERM (e.g. from `timeout`) into SystemExit, so that every `finally` and
    context manager runs and no daemon or temporary directory is left behind."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def run_tool(args, timeout=CMD_LIMIT_S):
    """Runs a helper command under a timeout; (returncode, stdout, stderr)."""
    try:
        p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return 124, "", f"{args[0]}: timed out after {timeout} s"


def free_port(host="127.0.0.1"):
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TempDir:
    """A fresh temporary directory, removed on exit unless VIGIL_KEEP asks to keep it
    (`1`: always; `failed`: when the block raised or the caller set `failed`).
    Use as `with TempDir("vigil-x-") as d:`; `d.path` is the Path."""

    def __init__(self, prefix):
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.failed = False

    def __enter__(self):
        return self

    def keep(self):
        """Whether the directory will be kept (as things stand)."""
        want = os.environ.get(KEEP_ENV, "")
        return want == "1" or (want == "failed" and self.failed)

    def __exit__(self, exc_type, exc, _tb):
        if exc_type is not None and not (exc_type is SystemExit and exc.code in (0, None)):
            self.failed = True
        if self.keep():
            print(f"kept {self.path}", file=sys.stderr)
        else:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def stop(proc, timeout=10.0):
    """SIGTERM, then SIGKILL after `timeout` s; waits. Does nothing if it already exited."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def reap(procs):
    """SIGKILLs whatever is still running (an unshare parent and, through --kill-child
    and directly, its child: `p.vigil_child`) and waits for all of it."""
    for p in procs:
        if p.poll() is None:
            kid = getattr(p, "vigil_child", None)
            if kid:
                try:
                    # Only while it is still ours: its parent is the unshare we started.
                    ppid = int(re.search(r"^PPid:\s+(\d+)", open(f"/proc/{kid}/status").read(), re.M).group(1))
                    if ppid == p.pid:
                        os.kill(kid, signal.SIGKILL)
                except (OSError, AttributeError, ValueError):
                    pass
            try:
                p.kill()
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            print(f"process {p.pid} did not die after SIGKILL", file=sys.stderr)


def can_unshare():
    """Whether this machine lets us create PID namespaces."""
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=CMD_LIMIT_S).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def children(pid, timeout=5.0):
    """The first child of `pid` (e.g. the workload an unshare forked), or None."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        time.sleep(0.001)
    return None


class _Daemon:
    """A background process that `with` starts (`setup`) and always stops."""
    proc = None

    def setup(self):
        return self.start()

    def stop(self):
        stop(self.proc)

    def __enter__(self):
        try:
            return self.setup()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_):
        self.stop()
        return False


class Simulator(_Daemon):
    """The GPU simulator (vigil-gpusim) on WORK/gpu.sock, its stand-in libraries in
    WORK/lib and its stderr in WORK/gpusim.log. `with Simulator(work, args) as sim:`
    installs the libraries, starts it, and stops it on the way out; or call
    install_libs(), start() and stop() yourself. Errors raise HarnessError."""

    def __init__(self, work, args=()):
        self.work = Path(work)
        self.lib = self.work / "lib"
        self.sock = self.work / "gpu.sock"
        self.log = self.work / "gpusim.log"
        self.args = [str(a) for a in args]
        self.proc = None

    def install_libs(self):
        rc, _, err = run_tool([BIN / "vigil-gpusim", "install-libs", self.lib])
        if rc != 0:
            raise HarnessError(err.strip())

    def start(self, timeout=20.0):
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([str(BIN / "vigil-gpusim"), "--socket", str(self.sock), *self.args],
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("listening"):
            raise HarnessError(f"the simulator did not start (rc={self.proc.poll()}): "
                               f"{self.log.read_text(errors='replace').strip()}")
        # Keep draining its stdout, so it can never block on a full pipe.
        out = self.proc.stdout
        threading.Thread(target=lambda: [None for _ in out], daemon=True).start()
        return self

    def env(self):
        """The variables that point CUDA and NVML clients at this simulator."""
        return {"VIGIL_GPUSIM_SOCKET": str(self.sock), "LD_LIBRARY_PATH": str(self.lib)}

    def stats(self):
        """`vigil-gpusim stats` as a dict of ints ({} if it did not answer)."""
        rc, out, _ = run_tool([BIN / "vigil-gpusim", "--socket", self.sock, "stats"])
        if rc != 0:
            return {}
        return {k: int(v) for k, v in re.findall(r"\b(\w+)=(\d+)\b", out)}

    def setup(self):
        self.install_libs()
        return self.start()


class Exporter(_Daemon):
    """vigil-exporter watching REGIONS_DIR on a free loopback port, its stderr in
    WORK/exporter.log; started and ready (/healthz answers) inside `with`, stopped on
    the way out."""

    def __init__(self, regions_dir, work, args=(), env=None):
        self.regions_dir = Path(regions_dir)
        self.log = Path(work) / "exporter.log"
        self.args = [str(a) for a in args]
        self.env = env
        self.port = free_port()
        self.proc = None

    def url(self, path="/metrics"):
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self, timeout=10.0):
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([str(BIN / "vigil-exporter"), "--regions-dir", str(self.regions_dir),
                                          "--web.listen-address", f"127.0.0.1:{self.port}", *self.args],
                                         stderr=log, env=self.env)
        end = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url("/healthz"), timeout=1).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise HarnessError(f"the exporter did not answer on {self.url('/healthz')} "
                                       f"(rc={self.proc.poll()}): {self.log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)

    def scrape(self, timeout=5):
        """The /metrics page as text (raises OSError if it does not answer)."""
        return urllib.request.urlopen(self.url(), timeout=timeout).read().decode()


# --- a region's state -------------------------------------------------------------------

def inspect(region):
    """A region's state as `vigil-exporter inspect --json` prints it: (state, error).
    state is None (and error says why) when the region cannot be read or does not
    validate."""
    rc, out, err = run_tool([BIN / "vigil-exporter", "inspect", "--json", region])
    if rc != 0:
        return None, err.strip() or f"vigil-exporter inspect exited {rc}"
    try:
        return json.loads(out), ""
    except json.JSONDecodeError as e:
        return None, f"vigil-exporter inspect --json printed no JSON: {e}"


def device(state, index=0):
    """One device's figures: limit_bytes, used_bytes, peak_bytes, allocation_denials, ..."""
    devs = (state or {}).get("devices") or []
    return devs[index] if index < len(devs) else None


def counters(state):
    """Counter name (e.g. ProcessInitsInitializer) -> value."""
    return dict((state or {}).get("counters") or {})


def lock_owner(state, name):
    """The slot holding lock `name` (detect, region, ...), or None when it is free."""
    for lock in (state or {}).get("locks") or []:
        if lock.get("lock") == name:
            return lock.get("owner_slot")
    return None


def active_slots(state):
    """How many slots are claimed."""
    return len((state or {}).get("slots") or [])


# InitPath's wire values (region/src/region.rs) and names.
def events(region, lost=None, status=None):
    """The region's event ring as dicts (`vigil-region events --json`, one JSON object a
    line: numbers as numbers, enums by name); `lost` gets the lost counts, `status` the
    reader's exit status and stderr (a region it cannot read has no events)."""
    rc, out, err = run_tool([BIN / "vigil-region", "events", "--json", region])
    if status is not None:
        status.update(rc=rc, err=err.strip())
    evs = []
    for line in out.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "lost" in obj:
            if lost is not None:
                lost.update(obj["lost"])
            continue
        evs.append(obj)
    return evs


# --- running the start-up scenario and reporting ------------------------------------------

def stop_group(p, grace=15.0):
    """Stops the process group that Popen `p` leads (started with start_new_session):
    SIGTERM, so that its `finally` blocks clean up, then SIGKILL after `grace` s.
    Returns what `p` still wrote: (stdout, stderr)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return p.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        except ValueError:  # its pipes were already read to the end
            p.wait()
            return "", ""
    return "", ""


def run_scenario(n, env, timeout):
    """Runs tests/comprehensive.py with N workloads in `env`, in a session of its own
    (so that on a timeout the scenario, its simulator and its workloads all go).
    Returns a dict: rc (124 on a timeout), timed_out, out, err, summary (its last JSON
    line, or None), fails (its FAIL lines)."""
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "comprehensive.py"), str(n)], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        timed_out = True
        out, _ = stop_group(p)
        rc, err = 124, f"timed out after {timeout} s"
    except BaseException:
        stop_group(p)
        raise
    lines = (out or "").strip().splitlines()
    try:
        summary = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        summary = None
    return {"rc": rc, "timed_out": timed_out, "out": out or "", "err": err or "", "summary": summary,
            "fails": [line for line in lines if "FAIL" in line]}


def print_checks(checks):
    """Prints one `✓ PASS`/`✗ FAIL` line per (name, passed, detail); True if all passed."""
    ok = True
    for name, passed, detail in checks:
        ok &= bool(passed)
        print(f"{'✓ PASS' if passed else '✗ FAIL'}: {name} ({detail})")
    return ok


def main():
    """`python3 tests/harness.py free-port`: prints a free loopback port (for the shell
    scripts)."""
    if sys.argv[1:] != ["free-port"]:
        sys.exit("usage: tests/harness.py free-port")
    print(free_port())


if __name__ == "__main__":
    main()
