//! Test support (cargo feature `test-support`): the simulator started for one test,
//! the way every Rust test and bench in the workspace starts it.
//!
//! A [`Sim`] owns a temporary directory holding the stand-in driver libraries
//! (`lib/`, from `vigil-gpusim install-libs`) and the daemon's socket (`gpu.sock`);
//! the daemon runs with the test's flags and is killed when the `Sim` is dropped.
//! Binaries are taken from cargo's output directory (`target/<profile>/`), so build
//! the workspace first (`cargo build --workspace`; scripts/test.sh does).

use crate::protocol::{Conn, Reply, Request};
use crate::state::Stats;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `target/<profile>/`: where cargo puts the workspace's binaries and libraries, found
/// from the running test or bench executable (`target/<profile>/deps/NAME-HASH`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("a test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// A built binary or library in [`bin_dir`]; panics, saying how to build it, if it is
/// missing.
pub fn artifact(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace --features vigil-interposer/fault-injection`; scripts/test.sh does)",
        p.display()
    );
    p
}

/// Links the driver library into `dir/lib` under the real libraries' names and
/// returns that directory.
pub fn install_libs(dir: &Path) -> PathBuf {
    let lib = dir.join("lib");
    let st = Command::new(artifact("vigil-gpusim"))
        .arg("install-libs")
        .arg(&lib)
        .arg("--driver")
        .arg(artifact("libvigil_gpusim_driver.so"))
        .stdout(Stdio::null())
        .status()
        .expect("run vigil-gpusim install-libs");
    assert!(st.success(), "vigil-gpusim install-libs failed");
    lib
}

/// `unshare --pid --fork --kill-child --mount-proc PROGRAM`: `PROGRAM` (and its
/// arguments, added by the caller) as PID 1 of a new PID namespace, with `unshare`
/// as its parent in this one; killed when `unshare` is.
pub fn in_new_pid_namespace(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(program);
    c
}

/// Whether new PID namespaces can be made here (root, or user namespaces allowed);
/// if not, prints why the test calling it is skipped.
pub fn pid_namespaces_or_skip() -> bool {
    match in_new_pid_namespace("true")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIPPED: unshare --pid failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run unshare: {e}");
            false
        }
    }
}

/// Declares a test crate's own simulator type: `pub struct NAME(testing::Sim)`,
/// dereferencing to the shared [`Sim`], to which the crate adds its defaults (its own
/// `start`) and helpers. The doc comments given go on the type.
#[macro_export]
macro_rules! test_sim {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name($crate::testing::Sim);

        impl std::ops::Deref for $name {
            type Target = $crate::testing::Sim;
            fn deref(&self) -> &$crate::testing::Sim {
                &self.0
            }
        }
    };
}

/// A simulator daemon and its stand-in libraries in a temporary directory; the
/// daemon is killed (and reaped) on drop.
pub struct Sim {
    /// The temporary directory: `lib/`, `gpu.sock`, and whatever a test puts there.
    pub dir: tempfile::TempDir,
    daemon: Child,
}

impl Sim {
    /// Installs the libraries and starts `vigil-gpusim` with `args`, returning once it
    /// listens.
    pub fn start(args: &[&str]) -> Sim {
        Sim::start_with(args, |_| {})
    }

    /// `start`, with the daemon's command adjusted by `configure` first (e.g. its
    /// stderr silenced). Its stdout is the simulator's: it must stay piped.
    pub fn start_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Sim {
        let dir = tempfile::tempdir().expect("a temporary directory");
        install_libs(dir.path());
        let mut cmd = Command::new(artifact("vigil-gpusim"));
        cmd.arg("--socket")
            .arg(dir.path().join("gpu.sock"))
            .args(args);
        configure(&mut cmd);
        let mut daemon = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn vigil-gpusim");
        // The daemon prints one line once its socket accepts connections.
        let mut line = String::new();
        let read = std::io::BufReader::new(daemon.stdout.take().expect("piped stdout"))
            .read_line(&mut line);
        let sim = Sim { dir, daemon };
        assert!(
            read.is_ok() && line.starts_with("listening"),
            "vigil-gpusim did not start: {line:?}"
        );
        sim
    }

    /// The temporary directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("gpu.sock")
    }

    /// The directory holding `libcuda.so.1` and `libnvidia-ml.so.1`.
    pub fn lib(&self) -> PathBuf {
        self.dir.path().join("lib")
    }

    /// Points a workload at this simulator: `VIGIL_GPUSIM_SOCKET` and
    /// `LD_LIBRARY_PATH`.
    pub fn env<'c>(&self, c: &'c mut Command) -> &'c mut Command {
        c.env("VIGIL_GPUSIM_SOCKET", self.socket())
            .env("LD_LIBRARY_PATH", self.lib())
    }

    /// A direct protocol connection (e.g. for fast polling in timing tests).
    pub fn conn(&self) -> Conn {
        Conn::connect(&self.socket(), std::process::id())
            .unwrap_or_else(|e| panic!("connect to the simulator: {e:?}"))
    }

    /// The simulator's totals, not counting the connection asking.
    pub fn stats(&self) -> Stats {
        match self.conn().call(&Request::Stats) {
            Ok(Reply::Stats(st)) => st,
            r => panic!("stats: {r:?}"),
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}
