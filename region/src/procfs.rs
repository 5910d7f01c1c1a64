//! What the kernel says about a process, read from procfs.
//!
//! Every slot records its owner's [`ProcessIdentity`]: its PID in its own namespace,
//! the inode of that PID namespace, and its start time. Together they name one
//! process on the node, whatever namespace it is seen from, and never a later process
//! that reuses the PID (a reused PID has another start time). The exporter looks for
//! the same triple in its own view of `/proc` to learn the process's host PID
//! independently of what the interposer recorded (`docs/region.md`, "Process
//! identity").
//!
//! The parsers take bytes, not `str`: a process's `comm` can hold any byte but NUL
//! (spaces, parentheses, newlines, invalid UTF-8), and a file a tenant's process
//! influences must never make a reader fail or panic.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Inode of the kernel's initial PID namespace (`PROC_PID_INIT_INO` in
/// `include/linux/proc_ns.h`, fixed since Linux 3.8): the host's PID namespace.
pub const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;

/// A process as the kernel knows it. A zero field means "could not be read".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessIdentity {
    /// PID in the process's own PID namespace (`getpid()`).
    pub pid: u32,
    /// Inode of the process's PID namespace (`stat /proc/self/ns/pid`).
    pub pidns_inode: u64,
    /// Start time in clock ticks after boot (field 22 of `/proc/self/stat`).
    pub start_time_ticks: u64,
}

impl ProcessIdentity {
    /// The calling process, from `/proc/self`. Fields that cannot be read (no `/proc`
    /// mounted, a foreign procfs) are 0; this never fails.
    pub fn current() -> ProcessIdentity {
        let dir = Path::new("/proc/self");
        ProcessIdentity {
            pid: crate::sys::getpid(),
            pidns_inode: pidns_inode(dir).unwrap_or(0),
            start_time_ticks: start_time_ticks(dir).unwrap_or(0),
        }
    }

    /// True if every field is known: only then can a reader look the process up.
    pub fn is_complete(&self) -> bool {
        self.pid != 0 && self.pidns_inode != 0 && self.start_time_ticks != 0
    }
}

/// Inode of the PID namespace of the process whose procfs directory is `dir`
/// (`/proc/self`, `/proc/1234`). Needs ptrace read access to that process (the
/// kernel's rule for `ns/*`): always granted for oneself.
pub fn pidns_inode(dir: &Path) -> io::Result<u64> {
    let link = dir.join("ns/pid");
    match std::fs::metadata(&link) {
        Ok(m) => Ok(m.ino()),
        Err(e) => {
            // Without the namespace filesystem's inode (an odd procfs), the link's text
            // carries the same number: "pid:[4026531836]".
            let text = std::fs::read_link(&link).map_err(|_| e)?;
            parse_ns_link(text.as_os_str().as_encoded_bytes())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad ns/pid link"))
        }
    }
}

/// Start time (clock ticks after boot) of the process whose procfs directory is `dir`.
pub fn start_time_ticks(dir: &Path) -> io::Result<u64> {
    let stat = read_small(&dir.join("stat"))?;
    parse_stat_start_time(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad stat line"))
}

/// Reads a procfs file of at most 64 KiB (`stat` and `status` are a few hundred
/// bytes to a few KiB; the cap keeps a strange file from costing memory).
pub fn read_small(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(2048);
    std::fs::File::open(path)?
        .take(64 * 1024)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The second field, `comm`, is
/// in parentheses and may itself contain spaces and parentheses, so the fields are
/// counted from the **last** `)`.
pub fn parse_stat_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After `comm` come field 3 (state) .. : field 22 is the 20th of them.
    let v: u64 = rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()?;
    (v != 0).then_some(v)
}

/// The `NSpid:` line of `/proc/<pid>/status`: the process's PID in each PID namespace
/// from the one the procfs belongs to (first) down to the process's own (last).
/// Kernels before 4.1 have no such line: None.
pub fn parse_nspid(status: &[u8]) -> Option<Vec<u32>> {
    // Every line but `Name:` is kernel-formatted ASCII, and `Name:` escapes newlines,
    // so a line that starts with "NSpid:" is the one.
    let line = status
        .split(|&b| b == b'\n')
        .find(|l| l.starts_with(b"NSpid:"))?;
    let text = std::str::from_utf8(&line[b"NSpid:".len()..]).ok()?;
    let pids: Option<Vec<u32>> = text
        .split_ascii_whitespace()
        .map(|t| t.parse::<u32>().ok().filter(|&p| p != 0))
        .collect();
    pids.filter(|p| !p.is_empty() && p.len() <= 32)
}

/// The inode in a namespace link's text, `pid:[4026531836]`.
pub fn parse_ns_link(link: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(link).ok()?;
    let inner = text.strip_prefix("pid:[")?.strip_suffix(']')?;
    inner.parse().ok().filter(|&v| v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line (Linux 6.x), with a `comm` that has spaces and both parentheses.
    const STAT: &[u8] = b"48213 (my (odd) ) proc) S 48190 48213 48190 34816 48213 4194304 \
        118 0 0 0 0 0 0 0 20 0 1 0 987654321 2478080 211 18446744073709551615 1 1 0 0 0 0 0 \
        0 0 0 0 0 17 3 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn start_time_is_field_22_counted_after_the_last_parenthesis() {
        assert_eq!(parse_stat_start_time(STAT), Some(987654321));
        // The same with an ordinary comm.
        let plain = b"1 (systemd) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 42 0 0 0";
        assert_eq!(parse_stat_start_time(plain), Some(42));
        // A comm holding ") S 1 2 3 ..." cannot shift the fields.
        let tricky = b"7 (a) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 99) R 0 7 7 0 -1 0 \
            0 0 0 0 0 0 0 0 20 0 1 0 555 0 0";
        assert_eq!(parse_stat_start_time(tricky), Some(555));
        // Invalid UTF-8 inside comm is fine; only the fields after it are parsed.
        let mut bytes = b"9 (\xff\xfe\n)) S".to_vec();
        bytes.extend_from_slice(b" 1 9 9 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 777 0");
        assert_eq!(parse_stat_start_time(&bytes), Some(777));
    }

    #[test]
    fn start_time_rejects_short_or_garbled_lines() {
        assert_eq!(parse_stat_start_time(b""), None);
        assert_eq!(parse_stat_start_time(b"1 (x) S 0 1 1"), None);
        assert_eq!(parse_stat_start_time(b"no parenthesis at all"), None);
        assert_eq!(
            parse_stat_start_time(b"1 (x) S 0 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 abc 0"),
            None
        );
        assert_eq!(
            parse_stat_start_time(b"1 (x) S 0 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 0 0"),
            None,
            "0 means unknown"
        );
    }

    const STATUS: &[u8] = b"Name:\tNSpid: fake\\nname\nUmask:\t0022\nState:\tS (sleeping)\n\
        Tgid:\t48213\nNgid:\t0\nPid:\t48213\nPPid:\t48190\nTracerPid:\t0\n\
        NStgid:\t48213\t7\t1\nNSpid:\t48213\t7\t1\nNSpgid:\t48213\t7\t1\nNSsid:\t48190\t1\t1\n\
        VmPeak:\t    8404 kB\n";

    #[test]
    fn nspid_lists_the_pid_in_every_namespace_outermost_first() {
        assert_eq!(parse_nspid(STATUS), Some(vec![48213, 7, 1]));
        assert_eq!(parse_nspid(b"Name:\tbash\nNSpid:\t812\n"), Some(vec![812]));
        // A `Name:` that merely contains "NSpid:" is not the line.
        assert_eq!(parse_nspid(b"Name:\tNSpid: 5\nPid:\t3\n"), None);
    }

    #[test]
    fn nspid_rejects_missing_or_garbled_lines() {
        assert_eq!(parse_nspid(b"Name:\tx\nPid:\t3\n"), None, "pre-4.1 kernel");
        assert_eq!(parse_nspid(b"NSpid:\n"), None);
        assert_eq!(parse_nspid(b"NSpid:\t12\tx\n"), None);
        assert_eq!(parse_nspid(b"NSpid:\t12\t0\n"), None);
        assert_eq!(parse_nspid(b"NSpid:\t-1\n"), None);
    }

    #[test]
    fn ns_link_text() {
        assert_eq!(parse_ns_link(b"pid:[4026531836]"), Some(PROC_PID_INIT_INO));
        assert_eq!(parse_ns_link(b"net:[4026531836]"), None);
        assert_eq!(parse_ns_link(b"pid:[]"), None);
        assert_eq!(parse_ns_link(b"pid:[12"), None);
    }

    #[test]
    fn the_current_process_is_read_from_proc_self() {
        let me = ProcessIdentity::current();
        assert_eq!(me.pid, std::process::id());
        if !Path::new("/proc/self/stat").exists() {
            eprintln!("SKIPPED: no /proc here");
            return;
        }
        assert!(me.is_complete(), "{me:?}");
        let link = std::fs::read_link("/proc/self/ns/pid").unwrap();
        assert_eq!(
            parse_ns_link(link.as_os_str().as_encoded_bytes()),
            Some(me.pidns_inode)
        );
        assert_eq!(
            start_time_ticks(Path::new(&format!("/proc/{}", me.pid))).unwrap(),
            me.start_time_ticks
        );
    }
}
