//! The GPU simulator for exporter tests: daemon, stand-in libraries, workloads under
//! the interposer in one container's region.

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const CTX_MIB: u64 = 64;

pub fn need(name: &str) -> PathBuf {
    workspace_bin(name).unwrap_or_else(|| {
        panic!(
            "{name} is not built: run `cargo build --workspace` (the README's test command does)"
        )
    })
}

vigil_gpusim::test_sim! {
    /// The shared simulator (`vigil_gpusim::testing`) with this crate's defaults and
    /// one container's regions directory; killed on drop.
    Sim
}

impl Sim {
    pub fn start() -> Sim {
        Sim::start_with(&[])
    }

    /// `start` with extra simulator flags.
    pub fn start_with(extra: &[&str]) -> Sim {
        let ctx_memory = format!("{CTX_MIB}MiB");
        let mut args = vec![
            "--nvml-lag",
            "5ms",
            "--ctx-create-time",
            "5ms",
            "--nvml-mem-lag",
            "0",
            "--ctx-memory",
            &ctx_memory,
        ];
        args.extend_from_slice(extra);
        let sim = vigil_gpusim::testing::Sim::start_with(&args, |c| {
            c.stderr(Stdio::null());
        });
        std::fs::create_dir_all(sim.path().join("regions/u1_main")).unwrap();
        Sim(sim)
    }

    pub fn regions(&self) -> PathBuf {
        self.dir.path().join("regions")
    }

    /// `prog` as a workload of container `u1_main`, under the interposer.
    pub fn workload(&self, prog: &Path, args: &[&str]) -> Child {
        self.workload_env(prog, args, &[])
    }

    /// `workload` with extra environment variables.
    pub fn workload_env(&self, prog: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut c = Command::new(prog);
        c.args(args).envs(env.iter().copied());
        self.env(&mut c)
            .env("LD_PRELOAD", need("libvigil.so"))
            .env(
                "CUDA_DEVICE_MEMORY_SHARED_CACHE",
                self.regions().join("u1_main/vigil.cache"),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "{prog:?} did not start: {line}");
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        child
    }

    pub fn exporter(&self, extra: &[&str]) -> Exporter {
        let regions = self.regions();
        let nvml = self.lib().join("libnvidia-ml.so.1");
        let mut args = vec![
            "--regions-dir.scan-interval",
            "100ms",
            "--regions-dir",
            regions.to_str().unwrap(),
            "--nvml.library",
            nvml.to_str().unwrap(),
            "--nvml.interval",
            "100ms",
        ];
        args.extend_from_slice(extra);
        let sock = self.socket();
        Exporter::start_with(&args, |c| {
            c.env("VIGIL_GPUSIM_SOCKET", sock);
        })
    }
    /// Compiles `tests/fixtures/uncounted.c` against the stand-in driver.
    pub fn build_uncounted(&self) -> PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/uncounted.c");
        let out = self.dir.path().join("uncounted");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let lib = self.lib();
        let res = Command::new(&cc)
            .arg("-O1")
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .arg("-L")
            .arg(&lib)
            .arg("-l:libcuda.so.1")
            .output()
            .unwrap_or_else(|e| {
                panic!("{cc}: {e}: install a C compiler (apt-get install gcc) or set CC")
            });
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        out
    }
}

pub struct Kill(pub Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
