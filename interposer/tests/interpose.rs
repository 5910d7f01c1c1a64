//! libvigil.so preloaded into real workloads against the simulator: interception
//! through every path, thread and fork safety, and fail-safe behaviour.
//! Needs `cargo build --workspace --features vigil-interposer/fault-injection` first
//! (scripts/test.sh does it).

mod common;
use common::*;
use std::process::Stdio;
use vigil_region::{Counter, RegionRead, RegionReader};

#[test]
fn cu_mem_alloc_is_seen_through_cu_get_proc_address_v2_and_through_dlsym() {
    let sim = Sim::start(&[]);
    // vigil-workload resolves everything through cuGetProcAddress_v2 by default.
    let out = sim.run(&["--alloc", "3MiB"], &[]);
    assert!(
        stderr(&out).contains("cuMemAlloc_v2(3145728 bytes) = 0"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("cuGetProcAddress(cuMemAlloc) -> Vigil's hook"));
    let out = sim.run(&["--alloc", "5MiB", "--api", "dlsym"], &[]);
    assert!(
        stderr(&out).contains("cuMemAlloc_v2(5242880 bytes) = 0"),
        "{}",
        stderr(&out)
    );
    // The control: without the preload nothing of Vigil runs.
    let out = sim
        .workload(&["--alloc", "3MiB"], &[], false)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!stderr(&out).contains("[vigil"), "{}", stderr(&out));
}

/// Detections the region counted, whatever their outcome.
fn detections(r: &std::path::Path) -> u64 {
    [
        Counter::DetectFound,
        Counter::DetectSameNamespace,
        Counter::DetectAmbiguous,
        Counter::DetectTimeout,
        Counter::DetectNvmlError,
    ]
    .into_iter()
    .map(|c| counter(r, c))
    .sum()
}

#[test]
fn many_threads_calling_cuinit_at_once_initialize_once() {
    let sim = Sim::start(&[]);
    sim.run(&["--init-threads", "16"], &[]);
    let r = sim.region();
    assert_eq!(counter(&r, Counter::SlotsClaimed), 1);
    assert_eq!(detections(&r), 1);
    assert_eq!(
        counter(&r, Counter::ProcessInitsInitializer) + counter(&r, Counter::ProcessInitsFastPath),
        1
    );
}

#[test]
fn a_forked_child_takes_its_own_slot_and_detects_its_own_pid() {
    let sim = Sim::start(&[]);
    let out = sim.run(&["--fork"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("forked child="), "{stdout}");
    let snap = RegionReader::open(sim.region()).unwrap().snapshot();
    assert_eq!(
        snap.counter(Counter::SlotsClaimed),
        2,
        "parent and child each claim a slot"
    );
    assert_eq!(detections(&sim.region()), 2);
    // The parent released its slot at exit; the detections are in the ring.
    let reader = RegionReader::open(sim.region()).unwrap();
    let mut pids = Vec::new();
    reader.drain(&mut reader.ring_consumer(), usize::MAX, |e| {
        if e.kind == vigil_region::EventKind::Detection {
            pids.push(e.c);
        }
    });
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(
        pids[0] != pids[1] && pids.iter().all(|&p| p != 0),
        "two different PIDs recorded: {pids:?}"
    );
    assert!(stderr(&out).contains("forked from pid"), "{}", stderr(&out));
}

#[test]
fn an_internal_panic_never_reaches_the_workload() {
    let sim = Sim::start(&[]);
    let out = sim.run(&[], &[("VIGIL_FAULT", "hook.panic")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("freed"));
    assert!(
        stderr(&out).contains("internal error (panic caught); passing through"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_corrupt_region_leaves_the_workload_running_and_says_why() {
    let sim = Sim::start(&[]);
    let bytes: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(sim.region(), &bytes).unwrap();
    let out = sim.run(&[], &[]);
    let err = stderr(&out);
    says(
        &err,
        &["region.cache", "bad magic", "continuing without Vigil"],
    );
    assert_eq!(
        std::fs::read(sim.region()).unwrap(),
        bytes,
        "the corrupt file is left as it was"
    );
}

#[test]
fn an_unwritable_region_path_leaves_the_workload_running_and_says_why() {
    let sim = Sim::start(&[]);
    let out = sim.run(
        &[],
        &[(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            "/proc/vigil-nope/region.cache",
        )],
    );
    let err = stderr(&out);
    says(
        &err,
        &["/proc/vigil-nope/region.cache", "continuing without Vigil"],
    );
}

#[test]
fn nvml_errors_are_counted_and_bounded_by_the_deadline() {
    let sim = Sim::start(&["--nvml-error-rate", "1"]);
    let t = std::time::Instant::now();
    let out = sim.run(&[], &[("VIGIL_DETECT_DEADLINE", "300ms")]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(stderr(&out).contains("NVML"), "{}", stderr(&out));
    assert_eq!(counter(&sim.region(), Counter::DetectNvmlError), 1);
}

#[test]
fn bad_settings_are_logged_with_their_name_and_defaults_used() {
    let sim = Sim::start(&[]);
    let out = sim.run(
        &[],
        &[
            ("VIGIL_DETECT_DEADLINE", "soon"),
            ("LIBCUDA_LOG_LEVEL", "4"),
        ],
    );
    assert!(
        stderr(&out).contains("VIGIL_DETECT_DEADLINE=\"soon\" is not a duration"),
        "{}",
        stderr(&out)
    );
    assert_eq!(counter(&sim.region(), Counter::DetectSameNamespace), 1);
}

#[test]
fn in_serial_mode_vigil_node_lock_dir_serializes_detection_across_containers() {
    let sim = Sim::start(&[]);
    let node = tempfile::tempdir().unwrap();
    let node_dir = node.path().to_str().unwrap();
    let a_region = sim.dir.path().join("a.cache");
    let b_region = sim.dir.path().join("b.cache");
    // Container A holds detection (and so the node lock) for 400 ms.
    let a = sim
        .workload(
            &[],
            &[
                ("VIGIL_DETECT_MODE", "serial"),
                ("VIGIL_NODE_LOCK_DIR", node_dir),
                ("VIGIL_TEST_HOLD_DETECT_MS", "400"),
            ],
            true,
        )
        .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", &a_region)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    // Container B has its own region, so only the node lock can make it wait.
    let b = sim
        .workload(
            &[],
            &[
                ("VIGIL_DETECT_MODE", "serial"),
                ("VIGIL_NODE_LOCK_DIR", node_dir),
            ],
            true,
        )
        .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", &b_region)
        .output()
        .unwrap();
    let a = a.wait_with_output().unwrap();
    assert!(a.status.success() && b.status.success());
    let err = stderr(&b);
    let waited: f64 = err
        .split("waited ")
        .nth(1)
        .and_then(|s| s.split(" ms for the node lock").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("B did not wait for the node lock: {err}"));
    assert!(waited >= 100.0, "B waited only {waited} ms");
    assert_eq!(counter(&a_region, Counter::DetectSameNamespace), 1);
    assert_eq!(counter(&b_region, Counter::DetectSameNamespace), 1);
}

#[test]
fn the_first_process_sets_the_limits_and_later_disagreement_is_reported() {
    let sim = Sim::start(&["--devices", "2"]);
    sim.run(
        &[],
        &[
            ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "512m"),
        ],
    );
    let limits: Vec<u64> = RegionReader::open(sim.region())
        .unwrap()
        .snapshot()
        .devices
        .iter()
        .map(|d| d.limit)
        .collect();
    assert_eq!(limits, vec![1 << 30, 512 << 20]);
    let out = sim.run(&[], &[("CUDA_DEVICE_MEMORY_LIMIT", "2g")]);
    assert!(stderr(&out).contains("the region wins"), "{}", stderr(&out));
    // An invalid value is an error naming it, and (closed policy, the default when a
    // limit is set) the process's allocations are refused rather than unlimited.
    let out = sim
        .workload(&[], &[("CUDA_DEVICE_MEMORY_LIMIT", "lots")], true)
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("CUDA_DEVICE_MEMORY_LIMIT=\"lots\" is not a memory size"),
        "{}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("code=2"));
}

/// The host PID of the workload `unshare --pid --fork` started: its only child.
fn unshare_child(parent: u32) -> Option<u32> {
    for _ in 0..5000 {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")) {
            if let Some(c) = s.split_whitespace().next() {
                return c.parse().ok();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    None
}

#[test]
fn threads_allocating_as_soon_as_they_can_do_not_spoil_the_signature() {
    let ok = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: unshare --pid is not available here");
        return;
    }
    // In a PID namespace of its own, so NVML lists it by a PID it cannot see and the
    // signature runs; 7 more threads call cuInit at the same moment and allocate the
    // moment theirs returns, through the hooks, 16 times each.
    let sim = Sim::start(&[]);
    let wl = sim.workload(
        &[
            "--init-threads",
            "8",
            "--init-threads-alloc",
            "6MiB",
            "--alloc",
            "4MiB",
        ],
        &[("CUDA_DEVICE_MEMORY_LIMIT", "4g")],
        true,
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(wl.get_program())
        .args(wl.get_args())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in wl.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let child = cmd.spawn().unwrap();
    let truth = unshare_child(child.id());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let truth = truth.expect("the workload's host PID");
    assert!(
        err.contains(&format!("host PID {truth} found")),
        "expected host PID {truth}:\n{err}"
    );
    // Every allocation was counted and freed: only the context stays until exit, and
    // the slot's release credits it.
    let used = RegionReader::open(sim.region())
        .unwrap()
        .device_usage(0)
        .unwrap()
        .1;
    assert_eq!(used, 0);
}
