//! The file a region target hands to `RegionReader::open`.
//!
//! One file per process, reused across executions (rewriting 1.7 MiB on tmpfs is
//! cheap; creating and unlinking a file per run is not). It lives in
//! `$VIGIL_FUZZ_SCRATCH` if set (scripts/fuzz.sh points it at a folder it removes at
//! exit), else /dev/shm, else the temp dir, and is unlinked at normal exit.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Slots whose liveness tokens this harness holds through its own open file
/// description: an active slot among them reads as alive, every other one as dead.
pub const HELD_SLOT_TOKENS: [usize; 4] = [0, 2, 5, vigil_region::layout::MAX_SLOTS - 1];

pub struct Scratch {
    pub path: PathBuf,
    pub file: File,
    /// A second open file description holding the token locks (OFD locks conflict
    /// between descriptions of the same process, exactly as between processes).
    _holder: File,
}

static PATH: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn unlink_at_exit() {
    if let Some(p) = PATH.get() {
        let _ = std::fs::remove_file(p);
    }
}

fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VIGIL_FUZZ_SCRATCH") {
        return PathBuf::from(d);
    }
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// A fresh, empty folder `vigil-fuzz-<what>-<pid>` of this process, in
/// `$VIGIL_FUZZ_SCRATCH` if set, else the temp dir (one left by an earlier process
/// with the same PID is emptied first). The caller removes it.
pub fn private_dir(what: &str) -> PathBuf {
    let parent = std::env::var_os("VIGIL_FUZZ_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!("vigil-fuzz-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("harness: {what} dir: {e}"));
    dir
}

fn lock_byte(f: &File, offset: u64) {
    // SAFETY: flock is a plain C struct; all-zero is valid, and l_pid must be 0.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset as libc::off_t;
    fl.l_len = 1;
    // SAFETY: valid fd and a pointer to an initialized flock for the call.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(rc, 0, "harness: cannot take OFD lock at {offset}");
}

/// Removes scratch files left by fuzzing processes that died (a crash aborts, so the
/// exit hook never ran).
fn remove_stale(name: &str) {
    let prefix = format!("vigil-fuzz-{name}-");
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|f| f.strip_suffix(".region"))
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Scratch {
    /// The process's scratch file for `name` (one per target).
    pub fn new(name: &str) -> Scratch {
        remove_stale(name);
        let path = dir().join(format!("vigil-fuzz-{name}-{}.region", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("harness: cannot create {}: {e}", path.display()));
        let holder = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("harness: reopen scratch file");
        for s in HELD_SLOT_TOKENS {
            lock_byte(&holder, vigil_region::layout::slot_token_offset(s));
        }
        if PATH.set(path.clone()).is_ok() {
            // SAFETY: registers a plain extern "C" function.
            unsafe { libc::atexit(unlink_at_exit) };
        }
        Scratch {
            path,
            file,
            _holder: holder,
        }
    }

    /// Makes the file exactly `data` (its first `len` bytes), then zero-extends or
    /// truncates it to `len`.
    pub fn write(&self, data: &[u8], len: u64) {
        let n = data.len().min(len as usize);
        self.file.set_len(0).expect("harness: truncate");
        self.file
            .write_all_at(&data[..n], 0)
            .expect("harness: write");
        self.file.set_len(len).expect("harness: set length");
    }

    pub fn write_at(&self, data: &[u8], offset: u64) {
        self.file
            .write_all_at(data, offset)
            .expect("harness: pwrite");
    }

    pub fn set_len(&self, len: u64) {
        self.file.set_len(len).expect("harness: set length");
    }
}
