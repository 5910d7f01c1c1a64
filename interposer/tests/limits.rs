//! CUDA_DEVICE_MEMORY_LIMIT enforced across real preloaded processes against the
//! simulator, whose own accounting is the truth: no overrun, no false OOM while
//! holders are SIGKILLed, and virtualized reporting through CUDA and NVML.

mod common;
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vigil_region::{Counter, RegionRead, RegionReader};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn python() -> String {
    std::env::var("VIGIL_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// "word k=v ..." lines of a workload's stdout, by word.
fn lines(stdout: &[u8]) -> Vec<(String, HashMap<String, String>)> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            let w = it.next().unwrap_or("").to_string();
            let kv = it
                .filter_map(|t| t.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (w, kv)
        })
        .collect()
}

fn field(out: &[u8], word: &str, key: &str) -> u64 {
    lines(out)
        .into_iter()
        .find(|(w, _)| w == word)
        .and_then(|(_, kv)| kv.get(key).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| {
            panic!(
                "no {word} {key}= in output:\n{}",
                String::from_utf8_lossy(out)
            )
        })
}

#[test]
fn sixteen_processes_filling_a_1gib_limit_never_pass_it_and_usage_returns_to_zero() {
    // Contexts are small here so the limit is mostly allocations; they are charged
    // (and counted by the simulator) all the same.
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let limit = [("CUDA_DEVICE_MEMORY_LIMIT", "1g")];
    let procs: Vec<Child> = (0..16)
        .map(|i| {
            let seed = (i + 1).to_string();
            sim.workload(
                &["--stress", "fill", "--max-chunk", "64MiB", "--seed", &seed],
                &limit,
                true,
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let (mut granted, mut denied) = (0, 0);
    for p in procs {
        let out = succeeded(p.wait_with_output().unwrap(), &"a racing workload");
        granted += field(&out.stdout, "stress", "granted");
        denied += field(&out.stdout, "stress", "denied");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("refused") && err.contains("CUDA_DEVICE_MEMORY_LIMIT"),
            "denials are logged: {err}"
        );
    }
    assert_eq!(denied, 16 * 3, "every process ran until its third refusal");
    assert!(granted > 16, "{granted}");
    let (_, peak) = sim_stats(&sim);
    assert!(
        peak <= GIB,
        "the simulator saw {peak} bytes in use, past the 1 GiB limit"
    );
    assert!(
        peak > GIB - 64 * MIB,
        "peak {peak}: the limit was not really reached"
    );
    let reader = RegionReader::open(sim.region()).unwrap();
    let s = reader.snapshot();
    assert_eq!(s.devices[0].used, 0, "usage returns to 0");
    // Contexts are charged, never refused: one charged while the limit is full takes
    // the region's figure past it (the device itself stayed within, checked above).
    assert!(
        s.devices[0].peak <= GIB + 16 * 2 * MIB,
        "region peak {}",
        s.devices[0].peak
    );
    assert_eq!(s.devices[0].denials, denied);
    assert_eq!(s.counter(Counter::AllocationDenials), denied);
    let mut events = 0;
    reader.drain(&mut reader.ring_consumer(), usize::MAX, |e| {
        if e.kind == vigil_region::EventKind::AllocationDenied {
            assert_eq!(e.c, GIB, "event carries the limit");
            assert!(e.a + e.b > GIB, "refused {} with {} used", e.a, e.b);
            events += 1;
        }
    });
    assert_eq!(events, denied);
}

/// A child killed and reaped when dropped, so a failed assertion leaves nothing behind.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns a workload and waits for its `ready` line. (Clippy cannot see that every
/// path either reaps the child or hands it to a `Holder`, which reaps it on drop.)
#[allow(clippy::zombie_processes)]
fn spawn_ready(mut cmd: Command) -> (Holder, HashMap<String, String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let st = child.wait().unwrap();
            panic!("workload ended before ready ({st})");
        }
        if let Some((w, kv)) = lines(line.as_bytes()).into_iter().next() {
            if w == "ready" {
                return (Holder(child), kv);
            }
            if w == "error" {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{line}");
            }
        }
    }
}

#[test]
fn no_allocation_that_fits_is_refused_while_holders_are_killed() {
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let limit = [("CUDA_DEVICE_MEMORY_LIMIT", "1g")];
    let secs = std::env::var("VIGIL_CHURN_SECS").unwrap_or_else(|_| "30".into());
    // Four churners, each never holding more than 160 MiB, plus one victim at a time
    // holding 240 MiB: the live total stays under 1 GiB with contexts. Only memory of
    // the dead could make an allocation fail.
    let churners: Vec<Child> = (0..4)
        .map(|i| {
            let seed = (100 + i).to_string();
            let args = [
                "--stress",
                "churn",
                "--cap",
                "160MiB",
                "--max-chunk",
                "48MiB",
                "--duration",
                &format!("{secs}s"),
                "--seed",
                &seed,
            ];
            sim.workload(&args, &limit, true)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(secs.parse().unwrap());
    let mut killed = 0;
    while Instant::now() < end {
        let (victim, _) = spawn_ready(sim.workload(
            &["--alloc", "120MiB", "--alloc", "120MiB", "--exit", "wait"],
            &limit,
            true,
        ));
        std::thread::sleep(Duration::from_millis(50));
        drop(victim); // SIGKILL, holding its memory
        killed += 1;
    }
    let mut refused = 0;
    for c in churners {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        refused += field(&out.stdout, "stress", "denied");
        assert!(field(&out.stdout, "stress", "granted") > 10);
    }
    assert!(killed >= 5, "only {killed} holders were killed");
    assert_eq!(refused, 0, "allocations that fit were refused");
    let s = RegionReader::open(sim.region()).unwrap().snapshot();
    assert_eq!(s.counter(Counter::AllocationDenials), 0);
    assert!(
        s.counter(Counter::SlotsReclaimedDead) >= killed - 1,
        "dead holders reclaimed: {} of {killed}",
        s.counter(Counter::SlotsReclaimedDead)
    );
}

#[test]
fn cuda_and_nvml_report_the_limit_as_total_and_what_it_leaves_as_free() {
    let sim = Sim::start(&[]);
    let env = [("CUDA_DEVICE_MEMORY_LIMIT", "4g")];
    let (holder, kv) =
        spawn_ready(sim.workload(&["--alloc", "100MiB", "--exit", "wait"], &env, true));
    let reader = RegionReader::open(sim.region()).unwrap();
    let (limit, used) = reader.device_usage(0).unwrap();
    assert_eq!(limit, 4 * GIB);
    // The context (518 MiB in the simulator, as on an H100) plus the allocation.
    assert_eq!(used, (518 + 100) * MIB);
    let num = |k: &str| kv[k].parse::<u64>().unwrap();
    assert_eq!(num("total"), limit, "cuMemGetInfo total");
    assert_eq!(num("free"), limit - used, "cuMemGetInfo free");
    assert_eq!(num("device_total"), limit, "cuDeviceTotalMem");

    // nvidia-ml-py in another process of the container, which never touches CUDA.
    let v = pynvml(&sim, Some("4g"));
    assert_eq!(
        v,
        vec![limit, limit - used, used, limit, limit - used, used]
    );
    // Without the preload, NVML reports the whole device.
    let whole = pynvml(&sim, None)[0];
    assert!(whole > limit, "unhooked total {whole}");
    drop(holder);
}

/// nvmlDeviceGetMemoryInfo (v1 and v2) from nvidia-ml-py: total, free, used twice.
/// With `limit`, under LD_PRELOAD with that CUDA_DEVICE_MEMORY_LIMIT.
fn pynvml(sim: &Sim, limit: Option<&str>) -> Vec<u64> {
    let script = "import pynvml as n\n\
        n.nvmlInit()\n\
        h = n.nvmlDeviceGetHandleByIndex(0)\n\
        m = n.nvmlDeviceGetMemoryInfo(h)\n\
        m2 = n.nvmlDeviceGetMemoryInfo(h, version=n.nvmlMemory_v2)\n\
        print(m.total, m.free, m.used, m2.total, m2.free, m2.used)\n";
    let mut cmd = Command::new(python());
    cmd.args(["-c", script])
        .env("VIGIL_GPUSIM_SOCKET", sim.dir.path().join("gpu.sock"))
        .env("LD_LIBRARY_PATH", sim.dir.path().join("lib"))
        .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", sim.region());
    if let Some(l) = limit {
        cmd.env("CUDA_DEVICE_MEMORY_LIMIT", l)
            .env("LD_PRELOAD", artifact("libvigil.so"));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pynvml (set VIGIL_PYTHON to a python with nvidia-ml-py; scripts/test.sh does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

#[test]
fn usage_past_the_limit_reads_as_zero_free_never_a_huge_number() {
    // A 300 MiB limit below the 518 MiB context: the context is charged anyway (it
    // exists), every allocation is refused, and free reads 0, not 2^64 - 218 MiB.
    let sim = Sim::start(&[]);
    let env = [("CUDA_DEVICE_MEMORY_LIMIT", "300m")];
    let out = sim
        .workload(&["--alloc", "1MiB"], &env, true)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("error call=cuMemAlloc code=2"), "{stdout}");
    let (holder, _) = spawn_ready(sim.workload(
        &["--stress", "fill", "--refusals", "1", "--exit", "wait"],
        &env,
        true,
    ));
    let v = pynvml(&sim, Some("300m"));
    assert_eq!(v[..3], [300 * MIB, 0, 518 * MIB]);
    drop(holder);
}

#[test]
fn allocations_resolved_with_dlsym_are_limited_too() {
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let out = sim.run(
        &["--api", "dlsym", "--stress", "fill", "--refusals", "2"],
        &[("CUDA_DEVICE_MEMORY_LIMIT", "256m")],
    );
    assert_eq!(field(&out.stdout, "stress", "denied"), 2);
    let (_, peak) = sim_stats(&sim);
    assert!(peak <= 256 * MIB, "peak {peak}");
    let s = RegionReader::open(sim.region()).unwrap().snapshot();
    assert_eq!(s.devices[0].used, 0);
    assert_eq!(s.devices[0].denials, 2);
}

#[test]
fn a_limit_that_cannot_be_enforced_refuses_by_default_and_passes_when_told_to() {
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    // An invalid limit: refused (closed is the default when a limit is set), and the
    // error names the variable.
    let bad = [("CUDA_DEVICE_MEMORY_LIMIT", "4gb")];
    let out = sim
        .workload(&["--alloc", "1MiB"], &bad, true)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(so.contains("error call=cuMemAlloc code=2"), "{so}");
    assert!(se.contains("CUDA_DEVICE_MEMORY_LIMIT=\"4gb\""), "{se}");
    // The same with VIGIL_LIMIT_POLICY=open: logged, and the workload runs unlimited.
    let open = [
        ("CUDA_DEVICE_MEMORY_LIMIT", "4gb"),
        ("VIGIL_LIMIT_POLICY", "open"),
    ];
    let out = sim.run(&["--alloc", "1MiB"], &open);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignored"));
    // A region that cannot be opened, with a limit: refused, saying why, once.
    let unopenable = [
        ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
        (
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            "/proc/vigil-nope/r.cache",
        ),
    ];
    let out = sim
        .workload(&["--alloc", "1MiB"], &unopenable, true)
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && se.contains("VIGIL_LIMIT_POLICY=closed"),
        "{se}"
    );
    // Without a limit nothing is refused, region or not (open is the default then).
    let out = sim.run(
        &["--alloc", "1MiB"],
        &[(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            "/proc/vigil-nope/r.cache",
        )],
    );
    assert!(out.status.success());
}

#[test]
fn under_the_closed_policy_a_stricter_own_limit_also_holds() {
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    // The first process sets the region's limit to 4 GiB and stays.
    let (holder, _) = spawn_ready(sim.workload(
        &["--alloc", "1MiB", "--exit", "wait"],
        &[("CUDA_DEVICE_MEMORY_LIMIT", "4g")],
        true,
    ));
    // A later process whose own environment says 1 GiB: the region wins for the
    // accounting, but its own, stricter limit is enforced too.
    let out = sim
        .workload(
            &["--alloc", "2GiB"],
            &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")],
            true,
        )
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("code=2") && se.contains("stricter"),
        "{se}"
    );
    // With the policy open, only the region's 4 GiB applies.
    let out = sim.run(
        &["--alloc", "2GiB"],
        &[
            ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
            ("VIGIL_LIMIT_POLICY", "open"),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("the region wins"));
    drop(holder);
}

/// The same command in a PID namespace of its own, as in a container: NVML lists it
/// by a PID it cannot see, so detection runs its markers.
fn in_pid_namespace(cmd: Command) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// (limit, used) of a device in the region, as the exporter would read it.
fn region_usage(sim: &Sim, dev: usize) -> (u64, u64) {
    RegionReader::open(sim.region())
        .unwrap()
        .device_usage(dev)
        .unwrap()
}

#[test]
fn detection_markers_are_charged_so_a_late_starter_never_pushes_the_device_past_the_limit() {
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let limit = [("CUDA_DEVICE_MEMORY_LIMIT", "1g")];
    // The first holds the limit but for the 2 MiB the second's context takes (its
    // context 2 MiB + 1020 MiB).
    let _a = spawn_ready(sim.workload(&["--alloc", "1020MiB", "--hold", "60s"], &limit, true));
    // The second's detection markers would take the device past the limit if they
    // were not charged. Charged, they are refused and detection says why.
    let out = in_pid_namespace(sim.workload(&["--alloc", "2MiB"], &limit, true))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let (_, peak) = sim_stats(&sim);
    assert!(
        peak <= GIB,
        "the device reached {peak} bytes under a {GIB}-byte limit:\n{err}"
    );
    says(
        &err,
        &[
            "no detection marker could be allocated",
            "refused by the memory limit",
        ],
    );
}

#[test]
fn the_context_is_charged_even_when_detection_fails() {
    // Contexts never show in NVML within the detection deadline: no host PID, no
    // footprint from NVML's process list.
    let sim = Sim::start(&["--nvml-lag", "60s"]);
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
        ("VIGIL_DETECT_DEADLINE", "300ms"),
    ];
    let (_h, _) = spawn_ready(sim.workload(&["--alloc", "64MiB", "--hold", "60s"], &env, true));
    let (_, used) = region_usage(&sim, 0);
    assert!(
        used >= 518 * MIB + 64 * MIB,
        "only {used} bytes charged: the 518 MiB context is missing"
    );
    // And so the limit leaves room for what is really free: 600 MiB more is refused.
    let out = sim
        .workload(&["--alloc", "600MiB"], &env, true)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "600 MiB granted on top of a 518 MiB context and 64 MiB under 1 GiB"
    );
}

#[test]
fn a_primary_context_on_another_device_is_charged_too() {
    let sim = Sim::start(&[]);
    let env = [("CUDA_DEVICE_MEMORY_LIMIT", "4g")];
    let (_h, _) = spawn_ready(sim.workload(
        &["--device", "1", "--alloc", "64MiB", "--hold", "60s"],
        &env,
        true,
    ));
    let (_, used1) = region_usage(&sim, 1);
    assert!(
        used1 >= 518 * MIB + 64 * MIB,
        "device 1: {used1} bytes charged, its 518 MiB context missing"
    );
    let (_, used0) = region_usage(&sim, 0);
    assert!(
        used0 >= 518 * MIB,
        "device 0 (detection's context): {used0}"
    );
}
