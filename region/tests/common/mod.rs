//! Helpers for tests that drive regions from real child processes.
#![allow(dead_code)]

mod tmpfs;
#[allow(unused_imports)] // only the full-filesystem tests use it
pub use tmpfs::Tmpfs;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vigil-region")
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A fresh temporary directory and the path of a region file `name` in it (not
/// created); the file goes when the directory is dropped.
pub fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    let path = dir.path().join(name);
    (dir, path)
}

/// `vigil-region exercise <args>` with piped stdout.
pub fn exercise(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("exercise")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// `vigil-region exercise <args>` as PID 1 of a new PID namespace (under `unshare`,
/// which stays its parent), with piped stdout.
pub fn exercise_in_pid_namespace(args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        bin(),
        "exercise",
    ])
    .args(args)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Parses "word k=v k=v" into (word, map).
pub fn parse_line(line: &str) -> (String, HashMap<String, String>) {
    let mut it = line.split_whitespace();
    let head = it.next().unwrap_or("").to_string();
    let kv = it
        .filter_map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    (head, kv)
}

/// A running child whose stdout lines we read one at a time.
pub struct Proc {
    pub child: Child,
    out: BufReader<ChildStdout>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.spawn().expect("spawn vigil-region");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Proc { child, out }
    }

    /// Next line starting with `word`, parsed; panics on EOF.
    pub fn expect(&mut self, word: &str) -> HashMap<String, String> {
        loop {
            let mut line = String::new();
            let n = self.out.read_line(&mut line).expect("read child stdout");
            assert!(n > 0, "child exited before printing {word:?}");
            let (head, kv) = parse_line(&line);
            if head == word {
                return kv;
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        signal(self.pid(), libc::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn wait_ok(mut self) -> String {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).ok();
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut stderr).ok();
        }
        let status = self.child.wait().expect("wait");
        let out = std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: stderr.into_bytes(),
        };
        assert!(
            out.status.success(),
            "child failed: {:?}\nstdout: {rest}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        rest
    }
}

impl Drop for Proc {
    /// A failed test must not leave its children running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal to a child we spawned; no memory is involved.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub fn get(kv: &HashMap<String, String>, k: &str) -> u64 {
    kv.get(k)
        .unwrap_or_else(|| panic!("missing {k} in {kv:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("bad {k} in {kv:?}"))
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// True if `unshare --pid` works here (root, or user namespaces allowed).
pub fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `unshare --pid` is usable here; if not, says the test is skipped.
pub fn unshare_or_skip() -> bool {
    let ok = can_unshare();
    if !ok {
        eprintln!("SKIPPED: unshare --pid is not available here (needs root or user namespaces)");
    }
    ok
}

/// Runs `cmd` with the fault point `point` armed and asserts the point killed it.
pub fn run_killed_at(mut cmd: Command, point: &str, what: &str) {
    cmd.env("VIGIL_FAULT", point);
    let out = cmd.output().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGKILL),
        "the fault point must kill {what}"
    );
}

/// Truncates the file at `path` to nothing, as another process could.
pub fn truncate_to_zero(path: &Path) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(0)
        .unwrap();
}

/// Overwrites the first `len` bytes of the file at `path` with zeros.
pub fn zero_fill(path: &Path, len: usize) {
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(path).unwrap(),
        &vec![0u8; len],
        0,
    )
    .unwrap();
}

pub fn region_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn p99(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    let i = ((v.len() as f64) * 0.99).ceil() as usize;
    v[i.saturating_sub(1).min(v.len() - 1)]
}
