//! Small helpers shared by the binary and the library.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Parses a flag's duration in `vigil_units`' grammar (`250ms`, `1s`, `2m`, ...), with
/// two rules of the exporter's own: a bare number is milliseconds, and the duration
/// must be positive.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bare_ms;
    let t = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        bare_ms = format!("{t}ms");
        &bare_ms
    } else {
        t
    };
    let d = vigil_units::parse_duration("duration", t)
        .map_err(|_| format!("{:?} is not a duration (try 100ms, 1s, 2m)", s.trim()))?;
    if d.is_zero() {
        return Err(format!("{:?}: a duration must be positive", s.trim()));
    }
    Ok(d)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: `(soft before, soft now)`.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = r.rlim_cur;
    if r.rlim_cur >= r.rlim_max {
        return Ok((old, old));
    }
    r.rlim_cur = r.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((old, r.rlim_cur))
}

/// Keeps allocations up to 8 MiB on the heap instead of a fresh `mmap` each: every
/// scrape renders a body of hundreds of KiB, and glibc's default (128 KiB, raised only
/// after the first free) mapped, faulted in and unmapped it each time: 8 % of a
/// 64-region scrape. Returns whether glibc took the setting (other allocators ignore it).
pub fn keep_scrape_buffers_on_heap() -> bool {
    // SAFETY: mallopt only changes glibc's allocation policy; it takes two integers and
    // touches no memory of ours.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20) == 1 }
}

/// Resident set size of this process in bytes, from /proc (0 if unreadable).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Poisoning only means another thread panicked mid-update of plain data; the data
/// is still usable, and the exporter must keep serving.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The text of a caught panic, for the log.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(" 500us "), Ok(Duration::from_micros(500)));
        for bad in ["0s", "0", "0ms", "soon", "-1s", "", "ms"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(&format!("{:?}", bad.trim())), "{e}");
        }
    }
}
