//! Host PIDs checked against the kernel, with real processes in real PID namespaces:
//! `vigil_host_pid_checks_total{result}` and `inspect`'s resolved host PID.
//!
//! Each workload is `unshare --pid --fork --kill-child --mount-proc <this test binary>
//! slot_child`: PID 1 in a namespace of its own (so every one has the same namespace
//! PID, and often the same start tick; only the namespace inode tells them apart). It
//! claims a slot, prints it, then records the detection the test sends it on stdin.
//! The test knows its true host PID: the only child of `unshare`, as seen from here.

mod common;
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;
use vigil_gpusim::testing::{in_new_pid_namespace, pid_namespaces_or_skip};
use vigil_region::{DetectOutcome, InitParams, Region};

const CHECKS: &str = "vigil_host_pid_checks_total";

/// Child-process mode: when VIGIL_TEST_SLOT_REGION names a region, claim a slot, print
/// "slot index=I pid=P", read one line from stdin ("found PID", "same_namespace" or
/// "none"), record that detection as the interposer would, print "recorded", and wait
/// to be killed.
#[test]
#[ignore = "helper run as a child process by the other tests"]
fn slot_child() {
    let Some((r, me)) = child_region("VIGIL_TEST_SLOT_REGION") else {
        return;
    };
    println!("slot index={} pid={}", me.index, std::process::id());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["found", pid] => r.record_detection(
            me,
            DetectOutcome::Found,
            Some(pid.parse().unwrap()),
            1_000_000,
            1,
            500_000,
        ),
        // The driver reports namespace PIDs: the interposer records its own.
        ["same_namespace"] => r.record_detection(
            me,
            DetectOutcome::SameNamespace,
            Some(std::process::id()),
            1_000_000,
            1,
            500_000,
        ),
        _ => {}
    }
    println!("recorded");
    wait_to_be_killed();
}

/// A `slot_child` in a PID namespace of its own.
struct NsWorkload {
    unshare: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    slot: u16,
    /// Its PID inside its namespace (1).
    ns_pid: u32,
    /// Its PID as this test (in the host's namespace) sees it.
    host_pid: u32,
}

impl NsWorkload {
    fn spawn(region: &Path) -> NsWorkload {
        let mut unshare = in_new_pid_namespace(std::env::current_exe().unwrap())
            .args(["--exact", "slot_child", "--ignored", "--nocapture"])
            .env("VIGIL_TEST_SLOT_REGION", region)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn unshare");
        let stdin = unshare.stdin.take();
        let mut out = BufReader::new(unshare.stdout.take().unwrap());
        let kv = read_until(&mut out, "slot");
        let id = unshare.id();
        let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
            .expect("/proc/<pid>/task/<pid>/children (CONFIG_PROC_CHILDREN)");
        let host_pid = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("unshare's child");
        NsWorkload {
            unshare,
            stdin,
            out,
            slot: kv["index"].parse().unwrap(),
            ns_pid: kv["pid"].parse().unwrap(),
            host_pid,
        }
    }

    /// Records a detection ("found PID", "same_namespace", "none") and waits until it
    /// is in the region.
    fn record(&mut self, what: &str) {
        let mut stdin = self.stdin.take().unwrap();
        writeln!(stdin, "{what}").unwrap();
        read_until(&mut self.out, "recorded");
    }

    fn kill(&mut self) {
        // --kill-child: the workload dies with unshare.
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

impl Drop for NsWorkload {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_until(out: &mut BufReader<ChildStdout>, word: &str) -> HashMap<String, String> {
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "workload exited before printing {word:?}");
        let mut it = line.split_whitespace();
        if it.next() == Some(word) {
            return it
                .filter_map(|t| t.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
    }
}

/// A fresh region in a temporary directory, kept open, and an exporter watching it.
struct Watched {
    dir: tempfile::TempDir,
    path: PathBuf,
    _region: Region,
    ex: Exporter,
}

/// Where `unshare --pid` works: a [`Watched`] region whose exporter checks host PIDs
/// every 50 ms in the /proc that `proc_path` makes in the directory (`None`: the real
/// one). `None` (the test is skipped) elsewhere.
fn watched_region(proc_path: impl FnOnce(&Path) -> Option<PathBuf>) -> Option<Watched> {
    if !pid_namespaces_or_skip() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.cache");
    let (region, _) = Region::open(&path, &InitParams::default()).unwrap();
    let mut args = vec![
        "--region".to_string(),
        path.to_str().unwrap().to_string(),
        "--proc.scan-interval".to_string(),
        "50ms".to_string(),
    ];
    if let Some(p) = proc_path(dir.path()) {
        args.extend(["--proc.path".to_string(), p.to_str().unwrap().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ex = Exporter::start(&args);
    Some(Watched {
        dir,
        path,
        _region: region,
        ex,
    })
}

fn checks(ex: &Exporter) -> [f64; 4] {
    let m = ex.scrape();
    ["match", "mismatch", "unresolvable", "not_recorded"].map(|r| m.value(CHECKS, &[("result", r)]))
}

fn wait_checks(ex: &Exporter, want: [f64; 4]) {
    let mut last = [0.0; 4];
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < end {
        last = checks(ex);
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    panic!(
        "checks [match, mismatch, unresolvable, not_recorded] = {last:?}, want {want:?}\n{}",
        ex.log_text()
    );
}

fn slot_json(v: &serde_json::Value, slot: u16) -> serde_json::Value {
    v["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["slot"] == slot)
        .unwrap_or_else(|| panic!("slot {slot} not in {v}"))
        .clone()
}

#[test]
fn recorded_host_pids_are_checked_against_the_kernel_once_per_slot_incarnation() {
    let Some(Watched {
        dir: _dir,
        path,
        _region,
        ex,
    }) = watched_region(|_| None)
    else {
        return;
    };
    assert_eq!(
        checks(&ex),
        [0.0; 4],
        "every result exported from the start"
    );

    // Right: the recorded host PID is the process's true one.
    let mut right = NsWorkload::spawn(&path);
    // Wrong: it recorded this test's PID (a live process, not itself).
    let mut wrong = NsWorkload::spawn(&path);
    // A 580-class driver: the recorded PID is the namespace PID, nothing to compare.
    let mut same_ns = NsWorkload::spawn(&path);
    // No outcome yet: not checked until there is one.
    let pending = NsWorkload::spawn(&path);
    for w in [&right, &wrong, &same_ns, &pending] {
        assert_eq!(w.ns_pid, 1, "PID 1 of its own namespace");
        assert_ne!(w.host_pid, 1);
    }
    right.record(&format!("found {}", right.host_pid));
    wrong.record(&format!("found {}", std::process::id()));
    same_ns.record("same_namespace");
    wait_checks(&ex, [1.0, 1.0, 0.0, 1.0]);
    // Scraping again counts nothing again.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(checks(&ex), [1.0, 1.0, 0.0, 1.0]);
    }

    // inspect resolves every live slot, the same_namespace one included: that is how
    // an operator learns its host PID.
    let v = inspect_json(&path, None);
    let s = slot_json(&v, same_ns.slot);
    assert_eq!(s["detect_outcome"], "same_namespace");
    assert_eq!(s["pid"], 1);
    assert_eq!(s["host_pid"], 1, "the namespace PID, as recorded");
    assert_eq!(s["resolved_host_pid"], same_ns.host_pid);
    assert_eq!(s["host_pid_check"], "not_recorded");
    let proc_dir = Path::new("/proc").join(same_ns.host_pid.to_string());
    assert_eq!(
        s["pidns_inode"],
        vigil_region::procfs::pidns_inode(&proc_dir).unwrap()
    );
    assert_eq!(
        s["start_time_ticks"],
        vigil_region::procfs::start_time_ticks(&proc_dir).unwrap()
    );
    let s = slot_json(&v, right.slot);
    assert_eq!(
        (&s["resolved_host_pid"], &s["host_pid_check"]),
        (
            &serde_json::json!(right.host_pid),
            &serde_json::json!("match")
        )
    );
    let s = slot_json(&v, wrong.slot);
    assert_eq!(s["host_pid"], std::process::id());
    assert_eq!(
        (&s["resolved_host_pid"], &s["host_pid_check"]),
        (
            &serde_json::json!(wrong.host_pid),
            &serde_json::json!("mismatch")
        )
    );
    let s = slot_json(&v, pending.slot);
    assert_eq!(s["resolved_host_pid"], pending.host_pid);
    assert_eq!(s["host_pid_check"], "pending");
    let text = Command::new(BIN)
        .args(["inspect", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "host_pid=1 resolved_host_pid={} resolution=host check=not_recorded",
            same_ns.host_pid
        )),
        "{text}"
    );

    // A new incarnation is a new check: the right process dies, another takes a slot.
    right.kill();
    let mut again = NsWorkload::spawn(&path);
    again.record(&format!("found {}", again.host_pid));
    wait_checks(&ex, [2.0, 1.0, 0.0, 1.0]);
    drop(pending);
}

#[test]
fn a_proc_that_does_not_show_the_process_makes_the_check_unresolvable() {
    // As a sidecar without the host's /proc would be.
    let Some(Watched {
        dir,
        path,
        _region,
        ex,
    }) = watched_region(|dir| {
        let empty = dir.join("empty-proc");
        std::fs::create_dir(&empty).unwrap();
        Some(empty)
    })
    else {
        return;
    };
    let empty = dir.path().join("empty-proc");
    let mut w = NsWorkload::spawn(&path);
    w.record(&format!("found {}", w.host_pid));
    wait_checks(&ex, [0.0, 0.0, 1.0, 0.0]);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(checks(&ex), [0.0, 0.0, 1.0, 0.0]);
    }
    let s = slot_json(&inspect_json(&path, Some(&empty)), w.slot);
    assert_eq!(s["resolved_host_pid"], serde_json::Value::Null);
    assert_eq!(s["resolution"], "not_found");
    assert_eq!(s["host_pid_check"], "unresolvable");
    // The same region, looked at through the real /proc: a match.
    let s = slot_json(&inspect_json(&path, None), w.slot);
    assert_eq!(s["host_pid_check"], "match");
}
