//! The region file damaged from outside while workloads use it, with real preloaded
//! processes against a real tmpfs: a full filesystem, a truncated or overwritten
//! file, and a zero-filled one. Nothing may kill a workload, and the limit holds.
//!
//! These tests mount small tmpfs instances, which needs root (CAP_SYS_ADMIN); where
//! mounting fails they print why and pass without checking anything.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[path = "../../region/tests/common/tmpfs.rs"]
mod tmpfs;
use tmpfs::Tmpfs;

/// The region file on a tmpfs.
fn region_on(fs: &Tmpfs) -> PathBuf {
    fs.path.join("region.cache")
}

/// A workload on `region` (instead of the simulator's default path).
fn workload(sim: &Sim, region: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = sim.workload(args, env, true);
    c.env("CUDA_DEVICE_MEMORY_SHARED_CACHE", region);
    c
}

/// Never a signal: the workload ended by itself.
fn assert_no_signal(out: &Output, what: &str) {
    assert!(
        out.status.signal().is_none(),
        "{what}: killed by signal {:?} (status {})\nstdout:\n{}\nstderr:\n{}",
        out.status.signal(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        tail(&String::from_utf8_lossy(&out.stderr)),
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn run_all(cmds: Vec<Command>) -> Vec<Output> {
    let children: Vec<Child> = cmds
        .into_iter()
        .map(|mut c| {
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// Row 1: on a full filesystem the region cannot get its blocks. Before the fix the
/// file was grown sparse and the first touch of a page died of SIGBUS (exit 135); so
/// did most later workloads, which found the sparse file. Now: an error naming the
/// file and ENOSPC, then refused (closed policy) or passed through (no limit, open).
#[test]
fn a_full_filesystem_is_a_clear_error_never_a_signal() {
    let Some(fs) = Tmpfs::mount("4m") else { return };
    fs.fill();
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let region = region_on(&fs);
    let limit = ("CUDA_DEVICE_MEMORY_LIMIT", "1g");
    let check_error = |out: &Output, what: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&region.display().to_string())
                && err.contains("no space left")
                && err.contains("ENOSPC"),
            "{what}: the log must name the file and ENOSPC:\n{}",
            tail(&err)
        );
    };
    // The first workload, then twelve later ones at once (the file the first one left
    // behind is what killed them before).
    for round in [1, 12] {
        let outs = run_all(
            (0..round)
                .map(|_| workload(&sim, &region, &["--alloc", "16MiB"], &[limit]))
                .collect(),
        );
        for out in &outs {
            assert_no_signal(out, "closed policy");
            check_error(out, "closed policy");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.code() == Some(3) && stdout.contains("code=2"),
                "a limit that cannot be enforced refuses (CUDA_ERROR_OUT_OF_MEMORY): {}\n{stdout}",
                out.status
            );
        }
    }
    for (what, env) in [
        ("open policy", vec![limit, ("VIGIL_LIMIT_POLICY", "open")]),
        ("no limit", vec![]),
    ] {
        let outs = run_all(
            (0..4)
                .map(|_| workload(&sim, &region, &["--alloc", "16MiB"], &env))
                .collect(),
        );
        for out in &outs {
            assert_no_signal(out, what);
            check_error(out, what);
            assert!(
                out.status.success(),
                "{what}: passes through: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

/// Row 1, second half: a region created while there was room, and the filesystem
/// filled afterwards. Its pages must all be the file's already, or later workloads
/// die touching them (slots, events) for the first time.
#[test]
fn a_region_created_before_the_filesystem_filled_keeps_enforcing() {
    let Some(fs) = Tmpfs::mount("4m") else { return };
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let region = region_on(&fs);
    let limit = [("CUDA_DEVICE_MEMORY_LIMIT", "1g")];
    let first = run_all(vec![workload(&sim, &region, &["--alloc", "16MiB"], &limit)]);
    assert_no_signal(&first[0], "the first workload");
    assert!(first[0].status.success());
    fs.fill();
    // Many at once, so that they claim distinct slots and write many events.
    for _ in 0..2 {
        let outs = run_all(
            (0..16)
                .map(|_| {
                    workload(
                        &sim,
                        &region,
                        &["--alloc", "16MiB", "--alloc", "8MiB"],
                        &limit,
                    )
                })
                .collect(),
        );
        for out in &outs {
            assert_no_signal(out, "a later workload");
            assert!(
                out.status.success(),
                "a later workload failed: {}\n{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr))
            );
        }
    }
    let s = vigil_region::RegionReader::open(&region)
        .unwrap()
        .snapshot();
    assert!(
        s.devices[0].peak >= 24 * MIB,
        "accounted: {:?}",
        s.devices[0]
    );
    assert_eq!(s.counter(vigil_region::Counter::SlotsClaimed), 33);
}

/// A thread reading one of a child's pipes; it returns the lines it kept.
type Reader = std::thread::JoinHandle<Vec<u8>>;

/// Churners on `region`, each printing its lines to a channel as they come.
struct Churners {
    children: Vec<Child>,
    lines: Vec<mpsc::Receiver<String>>,
    /// Per churner: its stdout without the `refused` lines, and its stderr without
    /// the DEBUG lines, both read as they come: a churner must never block on a full
    /// pipe (it would stop touching the region while the test damages it).
    readers: Vec<(Reader, Reader)>,
}

/// Reads `r` to its end on a thread of its own, sending every line to `tx` if given;
/// the thread returns the lines `keep` accepts, each ending in a newline.
fn keep_lines(
    r: impl std::io::Read + Send + 'static,
    keep: fn(&str) -> bool,
    tx: Option<mpsc::Sender<String>>,
) -> Reader {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if keep(&line) {
                kept.extend_from_slice(line.as_bytes());
                kept.push(b'\n');
            }
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
        kept
    })
}

impl Churners {
    /// Starts the first alone and the others once it runs: the first initializes the
    /// region and measures a context, and the others then start quickly, so that all
    /// are running when the test damages the file (a first process whose detection
    /// competes with five others can take seconds).
    fn start(cmds: Vec<Command>) -> Churners {
        let mut c = Churners {
            children: Vec::new(),
            lines: Vec::new(),
            readers: Vec::new(),
        };
        let mut cmds = cmds.into_iter();
        if let Some(first) = cmds.next() {
            c.spawn(first);
            c.wait_started();
        }
        for cmd in cmds {
            c.spawn(cmd);
        }
        c.wait_started();
        c
    }

    fn spawn(&mut self, mut cmd: Command) {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let err_reader = keep_lines(err, |l| !l.contains(" DEBUG "), None);
        // Only the first lines matter; the rest is drained so the child never blocks on
        // a full pipe.
        let out_reader = keep_lines(out, |l| !l.starts_with("refused"), Some(tx));
        self.readers.push((out_reader, err_reader));
        self.children.push(child);
        self.lines.push(rx);
    }

    /// Waits until every churner has its context (Vigil started in it).
    fn wait_started(&mut self) {
        let rxs = std::mem::take(&mut self.lines);
        for rx in &rxs {
            loop {
                match rx.recv_timeout(Duration::from_secs(60)) {
                    Ok(l) if l.starts_with("ctx") => break,
                    Ok(_) => {}
                    Err(e) => panic!("a churner never started: {e}"),
                }
            }
        }
    }

    /// (status, stdout without the `refused` lines, stderr without DEBUG) of each.
    fn finish(self) -> Vec<(ExitStatus, String, String)> {
        self.children
            .into_iter()
            .zip(self.readers)
            .map(|(mut c, (out, err))| {
                let st = c.wait().unwrap();
                let out = out.join().unwrap();
                let err = err.join().unwrap();
                (
                    st,
                    String::from_utf8_lossy(&out).into_owned(),
                    String::from_utf8_lossy(&err).into_owned(),
                )
            })
            .collect()
    }
}

fn churn(
    sim: &Sim,
    region: &Path,
    n: usize,
    cap: &str,
    chunk: &str,
    secs: u32,
    env: &[(&str, &str)],
) -> Churners {
    Churners::start(
        (0..n)
            .map(|i| {
                let seed = (7 + i).to_string();
                let dur = format!("{secs}s");
                workload(
                    sim,
                    region,
                    &[
                        "--stress",
                        "churn",
                        "--cap",
                        cap,
                        "--max-chunk",
                        chunk,
                        "--duration",
                        &dur,
                        "--seed",
                        &seed,
                    ],
                    env,
                )
            })
            .collect(),
    )
}

/// Every churner lived, ran on after the damage (at `tampered`, CLOCK_MONOTONIC ns),
/// and logged the damage it met once, plus a summary at exit.
fn check_survivors(
    results: &[(ExitStatus, String, String)],
    what: &str,
    closed: bool,
    tampered: u64,
) {
    for (st, out, err) in results {
        assert!(
            st.signal().is_none() && st.success(),
            "{what}: a workload died ({st})\nstdout:\n{out}\nstderr:\n{}",
            tail(err)
        );
        let ended: u64 = out
            .lines()
            .find(|l| l.starts_with("stress "))
            .and_then(|l| l.split_whitespace().find_map(|t| t.strip_prefix("ts_ns=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no stress line:\n{out}"));
        assert!(
            ended > tampered + 500_000_000,
            "{what}: a churner stopped {} ms after the damage: this test needs them to run on (a slow start-up?)",
            (ended as i64 - tampered as i64) / 1_000_000
        );
        // Once per damaged region. A process that re-attached in the instant between
        // the shell's truncation and its write (echo garbage >) meets a second one.
        let detected = err.matches("region damaged").count();
        assert!(
            (1..=2).contains(&detected),
            "{what}: the damage is logged once per damaged region, not per call ({detected} times):\n{}",
            tail(err)
        );
        let summary = err
            .lines()
            .find(|l| l.contains("since the region was damaged"))
            .unwrap_or_else(|| panic!("{what}: no damage summary at exit:\n{}", tail(err)));
        let count = |word: &str| -> u64 {
            let i = summary
                .find(word)
                .unwrap_or_else(|| panic!("{what}: {summary}"));
            summary[..i]
                .split_whitespace()
                .rev()
                .find_map(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("{what}: no count before {word:?}: {summary}"))
        };
        let (refused, passed) = (
            count("allocation(s) refused"),
            count("passed through unchecked"),
        );
        if closed {
            assert_eq!(
                passed, 0,
                "{what}: the closed policy lets nothing through: {summary}"
            );
        } else {
            assert_eq!(
                refused, 0,
                "{what}: the open policy refuses nothing: {summary}"
            );
        }
    }
}

/// Row 2: six workloads run while someone damages the file. Before the fix all six
/// died of SIGBUS. Now they live on, detect the damage, log it once, count it, and
/// the device stays within the limit.
fn tamper_under_six_churners(
    tamper: &dyn Fn(&Path),
    what: &str,
    env: &[(&str, &str)],
    closed: bool,
) {
    let Some(fs) = Tmpfs::mount("16m") else {
        return;
    };
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let region = region_on(&fs);
    let mut env = env.to_vec();
    env.push(("CUDA_DEVICE_MEMORY_LIMIT", "1g"));
    let c = churn(&sim, &region, 6, "160MiB", "32MiB", 5, &env);
    std::thread::sleep(Duration::from_millis(300));
    let tampered = vigil_region::monotonic_ns();
    tamper(&region);
    let results = c.finish();
    check_survivors(&results, what, closed, tampered);
    let (_, peak) = sim_stats(&sim);
    assert!(
        peak <= GIB,
        "{what}: the device reached {peak} bytes, past the 1 GiB limit"
    );
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}: {st}");
}

#[test]
fn truncating_the_region_to_zero_under_six_workloads_kills_none() {
    tamper_under_six_churners(
        &|r| sh(&format!("truncate -s 0 '{}'", r.display())),
        "truncate -s 0",
        &[],
        true,
    );
}

#[test]
fn truncating_and_regrowing_the_region_under_six_workloads_kills_none() {
    tamper_under_six_churners(
        &|r| {
            sh(&format!(
                "truncate -s 4096 '{0}' && sleep 0.2 && truncate -s {1} '{0}'",
                r.display(),
                vigil_region::layout::REGION_SIZE
            ))
        },
        "truncate to 4096 and back",
        &[("VIGIL_LIMIT_POLICY", "open")],
        false,
    );
}

#[test]
fn overwriting_the_region_with_garbage_under_six_workloads_kills_none() {
    tamper_under_six_churners(
        &|r| sh(&format!("echo garbage > '{}'", r.display())),
        "echo garbage >",
        &[],
        true,
    );
}

/// Row 3: the live region zero-filled in place while churners share a 2 GiB limit,
/// and new workloads starting right after (the first one initializes the zeroed file
/// afresh). Before the fix the churners took the fresh region's limit and zero totals
/// at face value: the device reached 2.3-2.9 GiB. Now the churners detect the damage,
/// re-attach and re-charge what they hold, the fresh region grants nothing until they
/// all have, and nothing is granted past the limit.
#[test]
fn zero_filling_the_live_region_never_lets_the_device_past_the_limit() {
    let Some(fs) = Tmpfs::mount("16m") else {
        return;
    };
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let region = region_on(&fs);
    let env = [("CUDA_DEVICE_MEMORY_LIMIT", "2g")];
    // Four churners that would hold up to 4 GiB between them without the limit.
    let c = churn(&sim, &region, 4, "1GiB", "128MiB", 5, &env);
    std::thread::sleep(Duration::from_millis(500));
    let tampered = vigil_region::monotonic_ns();
    sh(&format!(
        "dd if=/dev/zero of='{}' conv=notrunc bs={} count=1 2>/dev/null",
        region.display(),
        vigil_region::layout::REGION_SIZE
    ));
    let late = run_all(
        (0..3)
            .map(|_| workload(&sim, &region, &["--alloc", "256MiB", "--hold", "1s"], &env))
            .collect(),
    );
    for out in &late {
        assert_no_signal(out, "a workload started after the zero-fill");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() || (out.status.code() == Some(3) && stdout.contains("code=2")),
            "a late workload either fits or is refused: {}\n{stdout}\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let results = c.finish();
    let (_, peak) = sim_stats(&sim);
    // Contexts are charged, never refused (docs/memory.md): a late starter's 2 MiB
    // context can take a full limit past it by that much. Allocations never do.
    let contexts = late.len() as u64 * 2 * MIB;
    assert!(
        peak <= 2 * GIB + contexts,
        "the device reached {:.3} GiB ({} MiB over the 2 GiB limit, late contexts included)",
        peak as f64 / GIB as f64,
        (peak as i64 - 2 * GIB as i64) / MIB as i64
    );
    check_survivors(&results, "zero-filled", true, tampered);
}
