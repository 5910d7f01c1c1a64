//! The simulator end to end: the real daemon, the driver library found through
//! LD_LIBRARY_PATH, the test workload, and nvidia-ml-py as an unmodified NVML client.

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use vigil_gpusim::protocol::{Conn, Reply, Request};
use vigil_gpusim::sys::monotonic_ns;
use vigil_gpusim::testing::{self, in_new_pid_namespace, install_libs, pid_namespaces_or_skip};

fn python() -> String {
    std::env::var("VIGIL_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The shared simulator (`vigil_gpusim::testing`), plus this file's workloads and
/// NVML probes.
struct Sim(testing::Sim);

impl std::ops::Deref for Sim {
    type Target = testing::Sim;
    fn deref(&self) -> &testing::Sim {
        &self.0
    }
}

impl Sim {
    fn start(args: &[&str]) -> Sim {
        Sim(testing::Sim::start(args))
    }

    fn workload(&self, args: &[&str]) -> Workload {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vigil-workload"));
        c.args(args);
        self.spawn(c)
    }

    fn spawn(&self, mut c: Command) -> Workload {
        self.env(&mut c);
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = c.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Workload { child, out }
    }

    fn probe(&self, args: &[&str]) -> String {
        let mut c = Command::new(python());
        c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvml_probe.py"))
            .args(args);
        self.env(&mut c);
        let out = c.output().expect("run python");
        assert!(
            out.status.success(),
            "nvml_probe.py failed (is nvidia-ml-py installed? scripts/test.sh installs it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

struct Workload {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Workload {
    fn expect(&mut self, word: &str) -> HashMap<String, String> {
        loop {
            let mut line = String::new();
            assert!(
                self.out.read_line(&mut line).unwrap() > 0,
                "workload exited before {word:?}"
            );
            let mut it = line.split_whitespace();
            if it.next() == Some(word) {
                return it
                    .filter_map(|t| {
                        t.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                    })
                    .collect();
            }
            assert!(!line.starts_with("error"), "workload failed: {line}");
        }
    }
}

fn list(sim: &Sim) -> Value {
    serde_json::from_str(&sim.probe(&["list"])).expect("probe output is JSON")
}

/// (pid, used bytes) per process NVML lists on `device`, through pynvml's `_v3` call.
fn procs(v: &Value, device: usize, key: &str) -> Vec<(u64, u64)> {
    v["devices"][device][key]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["pid"].as_u64().unwrap(), p["used"].as_u64().unwrap()))
        .collect()
}

fn nvml_pids(sim: &Sim, device: usize) -> Vec<(u64, u64)> {
    procs(&list(sim), device, "procs")
}

#[test]
fn nvidia_ml_py_sees_devices_memory_and_the_workload_with_its_pid() {
    let sim = Sim::start(&[
        "--nvml-lag",
        "0",
        "--nvml-mem-lag",
        "0",
        "--devices",
        "2",
        "--memory",
        "8GiB",
        "--ctx-memory",
        "300MiB",
    ]);
    let v = list(&sim);
    assert_eq!(v["driver"], "560.35.03");
    let devs = v["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 2);
    assert_eq!(devs[0]["name"], "Vigil Simulated GPU");
    let uuid = devs[0]["uuid"].as_str().unwrap();
    assert!(uuid.starts_with("GPU-") && devs[0]["uuid"] != devs[1]["uuid"]);
    assert_eq!(devs[0]["total"].as_u64(), Some(8 << 30));
    assert!(procs(&v, 0, "procs").is_empty());

    let mut w = sim.workload(&[
        "--alloc", "100MiB", "--alloc", "28MiB", "--exit", "wait", "--verify",
    ]);
    let pid: u64 = w.expect("ready")["pid"].parse().unwrap();
    assert_eq!(pid, w.child.id() as u64);
    let v = list(&sim);
    let expected: u64 = (300 + 128) << 20;
    assert_eq!(procs(&v, 0, "procs"), vec![(pid, expected)]);
    assert_eq!(
        procs(&v, 0, "procs_v2"),
        vec![(pid, expected)],
        "_v2 struct layout"
    );
    assert_eq!(v["devices"][0]["used"].as_u64(), Some(expected));
    assert_eq!(
        v["devices"][0]["used_v2"].as_u64(),
        Some(expected),
        "nvmlMemory_v2_t layout"
    );
    assert_eq!(v["devices"][0]["total_v2"].as_u64(), Some(8 << 30));
    assert!(procs(&v, 1, "procs").is_empty(), "nothing on device 1");
}

fn find_child(pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            if let Some(c) = s.split_whitespace().next() {
                return c.parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "no child of {pid}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn namespaced_workload(sim: &Sim) -> (Workload, u32) {
    let mut c = in_new_pid_namespace(env!("CARGO_BIN_EXE_vigil-workload"));
    c.args(["--exit", "wait"]);
    let mut w = sim.spawn(c);
    let ready = w.expect("ready");
    assert_eq!(
        ready["pid"], "1",
        "inside its namespace the workload is PID 1"
    );
    let host_pid = find_child(w.child.id());
    (w, host_pid)
}

#[test]
fn a_workload_in_a_pid_namespace_appears_with_its_host_pid() {
    if !pid_namespaces_or_skip() {
        return;
    }
    let sim = Sim::start(&["--nvml-lag", "0"]);
    let (_w, host_pid) = namespaced_workload(&sim);
    let pids: Vec<u64> = nvml_pids(&sim, 0).iter().map(|p| p.0).collect();
    assert_eq!(pids, vec![host_pid as u64], "NVML must report the host PID");
}

#[test]
fn in_namespace_pid_mode_it_appears_with_its_namespace_pid() {
    if !pid_namespaces_or_skip() {
        return;
    }
    let sim = Sim::start(&["--nvml-lag", "0", "--pid-mode", "namespace"]);
    let (_w, _host_pid) = namespaced_workload(&sim);
    let pids: Vec<u64> = nvml_pids(&sim, 0).iter().map(|p| p.0).collect();
    assert_eq!(pids, vec![1]);
}

#[test]
fn a_new_context_is_invisible_to_nvml_until_the_lag_has_passed() {
    let lag = 300_000_000u64;
    let sim = Sim::start(&["--nvml-lag", "300ms", "--ctx-create-time", "20ms"]);
    // The poller (pynvml, polling every ~2 ms) runs across the whole window.
    let mut c = Command::new(python());
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvml_probe.py"))
        .args(["poll", "1500"]);
    let mut poller = sim.spawn(c);
    poller.expect("start");
    let before = monotonic_ns();
    let mut w = sim.workload(&["--exit", "wait"]);
    let ctx = w.expect("ctx");
    let pid = w.child.id().to_string();
    let ctx_done: u64 = ctx["ts_ns"].parse().unwrap();
    let out = poller.child.wait_with_output_of(&mut poller.out);
    assert!(before > 0);
    let mut last_absent = 0u64;
    let mut first_present = None;
    for line in out.lines() {
        let mut it = line.split_whitespace();
        let (Some(ts), pids) = (
            it.next().and_then(|t| t.parse::<u64>().ok()),
            it.next().unwrap_or(""),
        ) else {
            continue;
        };
        let present = pids.split(',').any(|p| p == pid);
        if present {
            first_present.get_or_insert(ts);
        } else if first_present.is_none() {
            last_absent = ts;
        } else {
            panic!("the process vanished from NVML at {ts} after appearing");
        }
    }
    let first_present = first_present.expect("the workload never appeared in NVML");
    // The lag counts from the start of context creation, which the workload reports.
    let started = ctx_done - ctx["create_ns"].parse::<u64>().unwrap();
    let boundary = started + lag;
    let tol = 40_000_000;
    assert!(
        first_present >= boundary,
        "visible {} ms before the lag",
        (boundary - first_present) / 1_000_000
    );
    assert!(
        first_present <= boundary + tol,
        "visible {} ms after the lag",
        (first_present - boundary) / 1_000_000
    );
    assert!(
        last_absent + tol >= boundary,
        "not observed absent close enough to the boundary"
    );
    eprintln!(
        "lag boundary: last absent at {} ms, first present at {} ms after creation began (lag 300 ms)",
        (last_absent as i64 - started as i64) / 1_000_000,
        (first_present as i64 - started as i64) / 1_000_000
    );
    let _ = before;
}

trait WaitOutput {
    fn wait_with_output_of(&mut self, out: &mut BufReader<ChildStdout>) -> String;
}

impl WaitOutput for Child {
    fn wait_with_output_of(&mut self, out: &mut BufReader<ChildStdout>) -> String {
        let mut s = String::new();
        std::io::Read::read_to_string(out, &mut s).unwrap();
        let st = self.wait().unwrap();
        assert!(st.success(), "poller failed");
        s
    }
}

#[test]
fn a_sigkilled_workload_leaves_nvml_and_meminfo_within_100ms() {
    let sim = Sim::start(&["--nvml-lag", "0", "--memory", "4GiB"]);
    let mut conn = sim.conn();
    let meminfo = |c: &mut Conn| match c.call(&Request::MemInfo { device: 0 }).unwrap() {
        Reply::MemInfo { free, total } => (free, total),
        r => panic!("meminfo: {r:?}"),
    };
    let total = meminfo(&mut conn).1;
    let mut w = sim.workload(&["--alloc", "1GiB", "--exit", "wait"]);
    w.expect("ready");
    let listed = |c: &mut Conn| {
        c.call(&Request::NvmlProcs { device: 0 }).unwrap() != Reply::NvmlProcs(vec![])
    };
    let free = |c: &mut Conn| meminfo(c).0;
    assert!(listed(&mut conn));
    assert!(free(&mut conn) < total);
    let killed = Instant::now();
    w.child.kill().unwrap();
    loop {
        if !listed(&mut conn) && free(&mut conn) == total {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_millis(100),
            "still accounted 100 ms after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("gone {} us after SIGKILL", killed.elapsed().as_micros());
    assert!(nvml_pids(&sim, 0).is_empty(), "and through NVML itself");
    assert_eq!(sim.stats().used, 0);
}

#[test]
fn thirty_two_concurrent_workloads_are_all_tracked_and_accounting_returns_to_zero() {
    let sim = Sim::start(&[
        "--nvml-lag",
        "0",
        "--memory",
        "64GiB",
        "--ctx-memory",
        "100MiB",
        "--ctx-create-time",
        "5ms",
    ]);
    let start = (monotonic_ns() + 300_000_000).to_string();
    let mut ws: Vec<Workload> = (0..32)
        .map(|i| {
            let exit = if i % 2 == 0 { "wait" } else { "normal" };
            let api = if i % 4 < 2 { "procaddress" } else { "dlsym" };
            sim.workload(&[
                "--alloc",
                "64MiB",
                "--alloc",
                "32MiB",
                "--exit",
                exit,
                "--hold",
                "2s",
                "--api",
                api,
                "--start-at-ns",
                &start,
            ])
        })
        .collect();
    let mut pids: Vec<u64> = ws
        .iter_mut()
        .map(|w| w.expect("ready")["pid"].parse().unwrap())
        .collect();
    pids.sort_unstable();
    let st = sim.stats();
    assert_eq!(st.processes, 32);
    assert_eq!(st.contexts, 32);
    assert_eq!(st.allocations, 64);
    assert_eq!(st.used, 32 * ((100 + 64 + 32) << 20));
    let mut listed: Vec<u64> = nvml_pids(&sim, 0).iter().map(|p| p.0).collect();
    listed.sort_unstable();
    assert_eq!(listed, pids, "NVML lists every workload");
    // Half exit normally after their hold; kill the other half.
    for (i, w) in ws.iter_mut().enumerate() {
        if i % 2 == 0 {
            w.child.kill().unwrap();
        }
    }
    for w in ws.iter_mut() {
        w.child.wait().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while sim.stats().processes != 0 {
        assert!(
            Instant::now() < deadline,
            "daemon still tracks {:?}",
            sim.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = sim.stats();
    assert_eq!((st.contexts, st.allocations, st.used), (0, 0, 0));
}

#[test]
fn refused_contexts_and_oom_return_the_real_error_codes() {
    // A 1 GiB device with 100 MiB contexts: first one that refuses every context.
    let one_gib = [
        "--nvml-lag",
        "0",
        "--memory",
        "1GiB",
        "--ctx-memory",
        "100MiB",
    ];
    let sim = Sim::start(&[&one_gib[..], &["--ctx-refuse-rate", "1"]].concat());
    let mut w = sim.workload(&[]);
    let e = w.expect("error");
    assert_eq!(e["call"], "cuDevicePrimaryCtxRetain");
    assert_eq!(e["code"], "999", "CUDA_ERROR_UNKNOWN");
    drop(sim);
    let sim = Sim::start(&one_gib);
    let mut w = sim.workload(&["--alloc", "2GiB"]);
    let e = w.expect("error");
    assert_eq!(
        (e["call"].as_str(), e["code"].as_str()),
        ("cuMemAlloc", "2"),
        "CUDA_ERROR_OUT_OF_MEMORY"
    );
    let mut w = sim.workload(&["--device", "7"]);
    assert_eq!(
        w.expect("error")["code"],
        "101",
        "CUDA_ERROR_INVALID_DEVICE"
    );
}

#[test]
fn nvml_faults_hang_and_fail_as_configured() {
    let sim = Sim::start(&[
        "--nvml-lag",
        "0",
        "--nvml-hang",
        "200ms",
        "--nvml-error-rate",
        "1",
    ]);
    let mut c = sim.conn();
    let t = Instant::now();
    let r = c.call(&Request::NvmlProcs { device: 0 });
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "the NVML call must hang"
    );
    assert!(matches!(
        r,
        Err(vigil_gpusim::protocol::CallError::Sim(
            vigil_gpusim::state::SimError::NvmlUnknown
        ))
    ));
    // CUDA calls are unaffected.
    assert!(c.call(&Request::MemInfo { device: 0 }).is_ok());
}

#[test]
fn without_a_daemon_cuinit_reports_no_device_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let lib = install_libs(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_vigil-workload"))
        .env("VIGIL_GPUSIM_SOCKET", dir.path().join("none.sock"))
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("call=cuInit code=100"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("none.sock"),
        "the log names the socket"
    );
}

#[test]
fn bad_settings_are_rejected_with_the_setting_named() {
    for (args, env, what) in [
        (vec!["--nvml-lag", "banana"], None, "--nvml-lag"),
        (vec!["--nvml-mem-lag", "banana"], None, "--nvml-mem-lag"),
        (vec!["--memory=-5"], None, "--memory"),
        (vec!["--devices", "0"], None, "--devices"),
        (vec!["--pid-mode", "guest"], None, "--pid-mode"),
        (vec!["--nvml-error-rate", "1.5"], None, "--nvml-error-rate"),
        (
            vec![],
            Some(("VIGIL_GPUSIM_MEMORY", "-5")),
            "VIGIL_GPUSIM_MEMORY",
        ),
        (
            vec![],
            Some(("VIGIL_GPUSIM_NVML_LAG", "uniform:9ms..1ms")),
            "VIGIL_GPUSIM_NVML_LAG",
        ),
        (
            vec![],
            Some(("VIGIL_GPUSIM_NVML_MEM_LAG", "exp:soon")),
            "VIGIL_GPUSIM_NVML_MEM_LAG",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_vigil-gpusim"));
        c.arg("--socket").arg(dir.path().join("s.sock")).args(&args);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(
            err.contains(what),
            "{args:?}: error must name {what}: {err}"
        );
    }
}

/// Runs the NVML probe inside a new PID namespace, next to an optional workload there.
fn probe_in_namespace(sim: &Sim, with_workload: bool) -> Value {
    let script = if with_workload {
        r#""$W" --exit wait >/dev/null & sleep 1; "$PY" "$PROBE" list; kill $! 2>/dev/null; true"#
    } else {
        r#""$PY" "$PROBE" list"#
    };
    let mut c = in_new_pid_namespace("sh");
    c.args(["-c", script])
        .env("W", env!("CARGO_BIN_EXE_vigil-workload"))
        .env("PY", python())
        .env(
            "PROBE",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvml_probe.py"),
        );
    sim.env(&mut c);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("probe JSON")
}

#[test]
fn in_caller_pid_mode_each_namespace_sees_its_own_pids() {
    if !pid_namespaces_or_skip() {
        return;
    }
    let sim = Sim::start(&[
        "--nvml-lag",
        "0",
        "--pid-mode",
        "caller",
        "--ctx-create-time",
        "5ms",
    ]);
    let (_w, host_pid) = namespaced_workload(&sim);
    let from_host: Vec<u64> = nvml_pids(&sim, 0).iter().map(|p| p.0).collect();
    assert_eq!(from_host, vec![host_pid as u64], "the host sees host PIDs");
    let other = probe_in_namespace(&sim, false);
    assert!(
        procs(&other, 0, "procs").is_empty(),
        "another container sees nothing: {other}"
    );
    let same = probe_in_namespace(&sim, true);
    let pids: Vec<u64> = procs(&same, 0, "procs").iter().map(|p| p.0).collect();
    // sh is PID 1 of that namespace and the workload it started is PID 2.
    assert_eq!(
        pids,
        vec![2],
        "its own container sees namespace PIDs: {same}"
    );
}

#[test]
fn a_malformed_request_is_refused_not_misread() {
    let sim = Sim::start(&["--nvml-lag", "0"]);
    let mut c = sim.conn();
    // "x" must not be dropped, which would make 5 the device.
    assert!(matches!(
        c.call_raw("alloc x 5"),
        Err(vigil_gpusim::protocol::CallError::Sim(
            vigil_gpusim::state::SimError::InvalidValue
        ))
    ));
    assert_eq!(sim.stats().used, 0);
}

/// Runs gpusim/calibrate/probe_driver.py's memory probe against the simulator: it
/// retains a context, then cuMemAlloc/cuMemFree k x 2 MiB and polls its own entry in
/// nvmlDeviceGetComputeRunningProcesses until it moves. Returns the per-call records.
fn memory_probe(sim: &Sim, reps: u32) -> Vec<Value> {
    let mut c = Command::new(python());
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("calibrate/probe_driver.py"))
        .args(["--probes", "memory", "--mem-reps", &reps.to_string()]);
    sim.env(&mut c);
    let out = c.output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe_driver.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .filter(|v: &Value| v["probe"] == "memory")
        .collect();
    assert_eq!(records.len(), 8 * reps as usize, "{stdout}");
    for r in &records {
        assert!(r.get("error").is_none(), "{r}");
        let bytes = r["bytes"].as_i64().unwrap();
        let step = if r["op"] == "alloc" { bytes } else { -bytes };
        assert_eq!(
            r["step"].as_i64(),
            Some(step),
            "NVML moved by exactly the size: {r}"
        );
        assert_eq!(r["exact"], true, "{r}");
        assert_eq!(
            r["device_step"].as_i64(),
            Some(step),
            "device memory moves at once: {r}"
        );
    }
    records
}

#[test]
fn nvml_process_memory_follows_cu_mem_alloc_and_free_after_the_mem_lag_exactly() {
    // Contexts show at once; only the memory lag differs between the two runs.
    let with_mem_lag = |lag| {
        Sim::start(&[
            "--nvml-lag",
            "0",
            "--ctx-create-time",
            "5ms",
            "--nvml-mem-lag",
            lag,
        ])
    };
    let sim = with_mem_lag("40ms");
    for r in memory_probe(&sim, 2) {
        // From before the call: the change cannot show sooner than the lag after it.
        let from_call = r["delay_from_call_ms"].as_f64().unwrap();
        assert!(
            from_call >= 40.0,
            "shown {from_call} ms after the call: {r}"
        );
        assert!(
            r["polls"].as_u64().unwrap() > 1,
            "not on the first poll: {r}"
        );
        // And then promptly (generous: a loaded machine stalls the poller).
        let delay = r["delay_ms"].as_f64().unwrap();
        assert!(
            delay <= 40.0 + 200.0,
            "shown {delay} ms after the call returned: {r}"
        );
    }
    drop(sim);
    let sim = with_mem_lag("0");
    for r in memory_probe(&sim, 1) {
        assert_eq!(r["polls"], 1, "with no lag the first poll shows it: {r}");
    }
}

#[test]
fn nvml_process_utilization_has_no_samples_and_takes_null_arguments() {
    let sim = Sim::start(&["--nvml-lag", "0"]);
    // A process with a context on the device, so "no samples" is not "no processes".
    let mut w = sim.workload(&["--exit", "wait"]);
    w.expect("ready");
    let v: Value = serde_json::from_str(&sim.probe(&["procutil"])).expect("JSON");
    const NOT_FOUND: u64 = 6;
    const INVALID_ARGUMENT: u64 = 2;
    assert_eq!(v["pynvml"], NOT_FOUND, "NVMLError_NotFound: {v}");
    for case in ["null_buffer", "buffer"] {
        assert_eq!(v[case]["ret"], NOT_FOUND, "{case}: {v}");
        assert_eq!(v[case]["count"], 0, "{case}: {v}");
    }
    for case in ["null_count", "null_both"] {
        assert_eq!(v[case]["ret"], INVALID_ARGUMENT, "{case}: {v}");
    }
    assert_eq!(v["bad_handle"], INVALID_ARGUMENT, "{v}");
}
