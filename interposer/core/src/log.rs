//! Logging compatible with HAMi's `LIBCUDA_LOG_LEVEL` (0 silent, 1 errors, 2 warnings
//! by default, 3 info, 4 debug), to stderr or `VIGIL_LOG_FILE`, one line per message,
//! prefixed `[vigil LEVEL pid=N]`.

use crate::config::Config;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

pub const ERROR: u8 = 1;
pub const WARN: u8 = 2;
pub const INFO: u8 = 3;
pub const DEBUG: u8 = 4;

struct Logger {
    level: u8,
    file: Option<Mutex<std::fs::File>>,
}

fn logger() -> &'static Logger {
    static L: OnceLock<Logger> = OnceLock::new();
    L.get_or_init(|| {
        let cfg = crate::config();
        let file = cfg
            .log_file
            .as_ref()
            .and_then(|p| open_log(p).map(Mutex::new));
        Logger {
            level: cfg.log_level,
            file,
        }
    })
}

/// Opens `VIGIL_LOG_FILE` for appending: never through a symlink (a root workload
/// must not append to whatever another user pointed the name at), only a regular file,
/// created private. On any problem the log goes to stderr.
fn open_log(p: &std::path::Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .ok()?;
    f.metadata().ok()?.file_type().is_file().then_some(f)
}

pub fn enabled(level: u8) -> bool {
    level <= logger().level
}

pub fn log(level: u8, msg: &str) {
    let l = logger();
    if level > l.level {
        return;
    }
    let name = match level {
        ERROR => "ERROR",
        WARN => "WARN",
        INFO => "INFO",
        _ => "DEBUG",
    };
    let line = format!("[vigil {name} pid={}] {msg}\n", std::process::id());
    match &l.file {
        Some(f) => {
            let _ = f.lock().map(|mut f| f.write_all(line.as_bytes()));
        }
        None => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// Logs the warnings collected while reading the environment.
pub fn config_warnings(cfg: &Config) {
    for w in &cfg.warnings {
        log(WARN, w);
    }
    for (setting, var) in &cfg.unenforced {
        log(
            WARN,
            &format!(
                "{var}: HAMi-core's {} is not enforced by Vigil, which enforces device memory limits only (exported as vigil_unenforced_settings{{setting=\"{}\"}}; see docs/adoption.md)",
                setting_words(*setting),
                setting.name()
            ),
        );
    }
}

fn setting_words(s: vigil_region::UnenforcedSetting) -> &'static str {
    use vigil_region::UnenforcedSetting::*;
    match s {
        SmLimit => "SM (core) limit",
        Oversubscribe => "memory oversubscription",
        CoreUtilizationPolicy => "core utilization policy",
        TaskPriority => "task priority",
        ActiveOomKiller => "active OOM killer",
    }
}

/// Logs a formatted line at `level` if the level is enabled (the formatting is skipped
/// otherwise).
#[macro_export]
macro_rules! vlog {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::log($level, &format!($($arg)*));
        }
    };
}
pub use crate::vlog;
