//! The simulator plus preloaded workloads, for the interposer's tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vigil_region::{Counter, RegionReader};

pub use vigil_gpusim::testing::artifact;

vigil_gpusim::test_sim! {
    /// The shared simulator (`vigil_gpusim::testing`) with this crate's defaults (fast
    /// context creation, a short NVML lag), plus workloads under the interposer.
    Sim
}

impl Sim {
    pub fn start(args: &[&str]) -> Sim {
        let mut all = vec!["--ctx-create-time", "20ms", "--nvml-lag", "40ms"];
        all.extend_from_slice(args);
        Sim(vigil_gpusim::testing::Sim::start(&all))
    }

    pub fn region(&self) -> PathBuf {
        self.dir.path().join("region.cache")
    }

    /// A workload with libvigil.so preloaded (unless `preload` is false).
    pub fn workload(&self, args: &[&str], env: &[(&str, &str)], preload: bool) -> Command {
        let mut c = Command::new(artifact("vigil-workload"));
        c.args(args);
        self.env(&mut c)
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
        run_ok(self.workload(args, env, true))
    }
}

/// Runs `c` to the end; it must succeed (a failure shows its stdout and stderr).
pub fn run_ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    succeeded(out, &c)
}

/// `out`, which must be a success (a failure shows `what` ran, its stdout and stderr).
pub fn succeeded(out: Output, what: &dyn std::fmt::Debug) -> Output {
    assert!(
        out.status.success(),
        "{what:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `text` (a log, a line of it) contains every one of `parts`.
pub fn says(text: &str, parts: &[&str]) {
    assert!(parts.iter().all(|p| text.contains(p)), "{text}");
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn counter(region: &Path, c: Counter) -> u64 {
    RegionReader::open(region).unwrap().snapshot().counter(c)
}

/// The simulator's own totals: (used now, peak ever) across devices (the truth the
/// limit tests compare with).
pub fn sim_stats(sim: &Sim) -> (u64, u64) {
    let st = sim.stats();
    (st.used, st.peak)
}
