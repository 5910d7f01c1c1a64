//! The standard `process_*` metrics of a Prometheus exporter, for the exporter itself:
//! CPU time, memory, file descriptors and start time, read from `/proc/self`.

/// One reading; a field is None when `/proc` could not say.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// Fields of `/proc/PID/stat` after the command name (which may hold spaces and
/// parentheses: everything up to the last `)`).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// Parses `/proc/self/stat` (with the clock tick rate, the page size and the boot time).
pub fn parse(stat: &str, ticks: f64, page: u64, boot_time: Option<f64>) -> ProcessStats {
    let Some(f) = stat_fields(stat) else {
        return ProcessStats::default();
    };
    // After the name: state is field 3, so field N is at index N - 3.
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    ProcessStats {
        cpu_seconds: num(14).zip(num(15)).map(|(u, s)| (u + s) as f64 / ticks),
        virtual_bytes: num(23),
        resident_bytes: num(24).map(|p| p.saturating_mul(page)),
        start_time_seconds: num(22).zip(boot_time).map(|(t, b)| b + t as f64 / ticks),
        open_fds: None,
        max_fds: None,
    }
}

fn sysconf(name: libc::c_int, default: i64) -> i64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(name) };
    if v > 0 {
        v
    } else {
        default
    }
}

/// The boot time from `/proc/stat`, read once: it does not change, and `/proc/stat`
/// (every CPU's times, every interrupt's count) is costly to generate on every scrape.
fn boot_time() -> Option<f64> {
    static BOOT: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
    })
}

/// Reads this process's figures now.
pub fn read() -> ProcessStats {
    let boot = boot_time();
    let mut st = std::fs::read_to_string("/proc/self/stat")
        .map(|s| {
            parse(
                &s,
                sysconf(libc::_SC_CLK_TCK, 100) as f64,
                sysconf(libc::_SC_PAGESIZE, 4096) as u64,
                boot,
            )
        })
        .unwrap_or_default();
    st.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        st.max_fds = Some(r.rlim_cur);
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_an_odd_name_gives_times_and_memory() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime priority nice threads itrealvalue
        // starttime vsize rss ...
        let stat = "4242 (vigil (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 123456789 300 18446744073709551615";
        let s = parse(stat, 100.0, 4096, Some(1_700_000_000.0));
        assert_eq!(s.cpu_seconds, Some(3.0));
        assert_eq!(s.virtual_bytes, Some(123456789));
        assert_eq!(s.resident_bytes, Some(300 * 4096));
        assert_eq!(s.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(parse("garbage", 100.0, 4096, None), ProcessStats::default());
    }

    #[test]
    fn this_process_can_be_read() {
        let s = read();
        assert!(s.cpu_seconds.is_some() && s.resident_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() >= 3 && s.max_fds.unwrap() >= s.open_fds.unwrap());
        assert!(s.start_time_seconds.unwrap() > 1.6e9);
    }
}
