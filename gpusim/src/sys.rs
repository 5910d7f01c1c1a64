//! The few syscalls the simulator needs directly.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// SO_PEERCRED: the connecting process's PID, translated by the kernel into our PID
/// namespace (the host's, for the daemon).
pub fn peer_pid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid socket fd; `cred` and `len` are live out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

/// CLOCK_MONOTONIC in ns: one timeline for every process on the host, so a test can
/// compare a workload's timestamps with its own.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How a process sees PID namespaces: its innermost namespace's id, and its PID in
/// each namespace from the outermost (`NSpid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidView {
    pub ns: String,
    pub nspid: Vec<u32>,
}

/// Reads `/proc/<pid>/ns/pid` and the `NSpid` line of `/proc/<pid>/status`.
pub fn pid_view(pid: u32) -> Option<PidView> {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    Some(PidView {
        ns: ns.to_string_lossy().into_owned(),
        nspid,
    })
}

/// The PID of `target` as `caller` sees it, or None if `target` is invisible to the
/// caller (another container). `daemon_ns` is our own namespace: a caller there sees
/// the PIDs the daemon sees.
pub fn translate_pid(
    caller: &PidView,
    target: &PidView,
    target_pid: u32,
    daemon_ns: &str,
) -> Option<u32> {
    if caller.ns == daemon_ns {
        Some(target_pid)
    } else if caller.ns == target.ns {
        target.nspid.last().copied()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ns: &str, nspid: &[u32]) -> PidView {
        PidView {
            ns: ns.into(),
            nspid: nspid.to_vec(),
        }
    }

    #[test]
    fn pids_are_translated_into_the_callers_namespace() {
        let host = v("pid:[1]", &[77]);
        let a1 = v("pid:[2]", &[500, 1]);
        let a2 = v("pid:[2]", &[501, 2]);
        let b1 = v("pid:[3]", &[600, 1]);
        assert_eq!(
            translate_pid(&host, &a1, 500, "pid:[1]"),
            Some(500),
            "the host sees host PIDs"
        );
        assert_eq!(
            translate_pid(&a2, &a1, 500, "pid:[1]"),
            Some(1),
            "a container sees its own PIDs"
        );
        assert_eq!(
            translate_pid(&a1, &b1, 600, "pid:[1]"),
            None,
            "and not other containers'"
        );
    }

    #[test]
    fn our_own_view_is_readable() {
        let me = pid_view(std::process::id()).expect("/proc/self");
        assert!(me.ns.starts_with("pid:["));
        assert_eq!(me.nspid.last().copied(), Some(std::process::id()));
    }
}
