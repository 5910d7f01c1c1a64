//! The simulator plus preloaded workloads, for the interposer's tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use vigil_region::{Counter, RegionReader};

pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub fn artifact(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --features vigil-interposer/fault-injection` (scripts/test.sh does)",
        p.display()
    );
    p
}

pub struct Sim {
    pub dir: tempfile::TempDir,
    pub daemon: Child,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

impl Sim {
    pub fn start(args: &[&str]) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new(artifact("vigil-gpusim"))
            .arg("install-libs")
            .arg(dir.path().join("lib"))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let mut daemon = Command::new(artifact("vigil-gpusim"))
            .arg("--socket")
            .arg(dir.path().join("gpu.sock"))
            .args(["--ctx-create-time", "20ms", "--nvml-lag", "40ms"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(daemon.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("listening"), "{line}");
        Sim { dir, daemon }
    }

    pub fn region(&self) -> PathBuf {
        self.dir.path().join("region.cache")
    }

    /// A workload with libvigil.so preloaded (unless `preload` is false).
    pub fn workload(&self, args: &[&str], env: &[(&str, &str)], preload: bool) -> Command {
        let mut c = Command::new(artifact("vigil-workload"));
        c.args(args)
            .env("VIGIL_GPUSIM_SOCKET", self.dir.path().join("gpu.sock"))
            .env("LD_LIBRARY_PATH", self.dir.path().join("lib"))
            .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", self.region())
            .env("LIBCUDA_LOG_LEVEL", "4");
        if preload {
            c.env("LD_PRELOAD", artifact("libvigil.so"));
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = self.workload(args, env, true).output().unwrap();
        assert!(
            out.status.success(),
            "workload failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn counter(region: &Path, c: Counter) -> u64 {
    RegionReader::open(region).unwrap().snapshot().counter(c)
}

/// The simulator's own totals: (used now, peak ever) across devices, from
/// `vigil-gpusim stats` (the truth the limit tests compare with).
pub fn sim_stats(sim: &Sim) -> (u64, u64) {
    let out = Command::new(artifact("vigil-gpusim"))
        .arg("--socket")
        .arg(sim.dir.path().join("gpu.sock"))
        .arg("stats")
        .output()
        .unwrap();
    let kv: std::collections::HashMap<String, u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|t| t.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    (kv["used"], kv["peak"])
}
