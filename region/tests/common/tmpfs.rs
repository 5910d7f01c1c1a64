//! A tmpfs mounted for one test (needs root, CAP_SYS_ADMIN), for the tests of a full
//! filesystem. Shared by the region's tests and the interposer's (which include this
//! file by path).

use std::path::PathBuf;
use std::process::Command;

/// A tmpfs mounted for one test, unmounted (lazily, so a straggler cannot keep it)
/// when dropped.
pub struct Tmpfs {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Tmpfs {
    /// None (with the reason printed) where this process may not mount.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { _dir: dir, path }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    /// Fills the filesystem to the last block, as `dd` does.
    pub fn fill(&self) {
        let out = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", self.path.join("fill").display()))
            .arg("bs=64k")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("No space left"),
            "dd should have filled the filesystem: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
