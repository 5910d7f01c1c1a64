//! Settings from the environment, HAMi's variables first. Pure: takes a lookup
//! function, so it is unit-tested without touching the process environment.

use std::path::PathBuf;
use std::time::Duration;

/// HAMi-core's default region path.
pub const DEFAULT_REGION: &str = "/tmp/cudevshr.cache";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `CUDA_DEVICE_MEMORY_SHARED_CACHE`.
    pub region_path: PathBuf,
    /// `LIBCUDA_LOG_LEVEL`: 0 silent, 1 errors, 2 warnings, 3 info, 4 debug.
    pub log_level: u8,
    /// `VIGIL_LOG_FILE`: append logs there instead of stderr.
    pub log_file: Option<PathBuf>,
    /// `VIGIL_DETECT_POLL_START`: first wait between NVML polls.
    pub poll_start: Duration,
    /// `VIGIL_DETECT_POLL_MAX`: the backoff's cap.
    pub poll_max: Duration,
    /// `VIGIL_DETECT_DEADLINE`: give up detection after this long.
    pub deadline: Duration,
    /// `VIGIL_NODE_LOCK_DIR`: a directory shared by every container on the node;
    /// when set, detection is also serialized node-wide through a lock file there.
    pub node_lock_dir: Option<PathBuf>,
    /// `CUDA_VISIBLE_DEVICES`, as physical NVML indices by CUDA ordinal; None = all.
    pub visible_devices: Option<Vec<u32>>,
    /// Problems found while reading the environment, to be logged once the log is up.
    pub warnings: Vec<String>,
}

/// Parses a duration: a number with `us`, `ms` or `s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(split);
    let v: f64 = n.parse().ok()?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        _ => return None,
    };
    (secs.is_finite() && (0.0..3600.0).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

/// Numeric `CUDA_VISIBLE_DEVICES` ("1,0"). UUID or MIG forms are not mapped: None.
pub fn parse_visible(s: &str) -> Option<Vec<u32>> {
    let v: Option<Vec<u32>> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().ok())
        .collect();
    v.filter(|v| !v.is_empty())
}

impl Config {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Config {
        let mut warnings = Vec::new();
        let mut duration = |name: &str, default_ms: u64| match get(name) {
            None => Duration::from_millis(default_ms),
            Some(v) => parse_duration(&v).unwrap_or_else(|| {
                warnings.push(format!(
                    "{name}={v:?} is not a duration (e.g. 1ms, 250us, 2s); using {default_ms}ms"
                ));
                Duration::from_millis(default_ms)
            }),
        };
        let poll_start = duration("VIGIL_DETECT_POLL_START", 1);
        let poll_max = duration("VIGIL_DETECT_POLL_MAX", 10);
        let deadline = duration("VIGIL_DETECT_DEADLINE", 5000);
        let log_level = match get("LIBCUDA_LOG_LEVEL") {
            None => 2,
            Some(v) => match v.trim().parse::<u8>() {
                Ok(l) if l <= 4 => l,
                _ => {
                    warnings.push(format!(
                        "LIBCUDA_LOG_LEVEL={v:?} is not 0-4; using 2 (warnings)"
                    ));
                    2
                }
            },
        };
        let visible_devices = match get("CUDA_VISIBLE_DEVICES") {
            None => None,
            Some(v) => {
                let p = parse_visible(&v);
                if p.is_none() && !v.trim().is_empty() {
                    warnings.push(format!(
                        "CUDA_VISIBLE_DEVICES={v:?} is not a list of indices; detection watches every device"
                    ));
                }
                p
            }
        };
        let nonempty = |name: &str| {
            get(name)
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
        };
        Config {
            region_path: nonempty("CUDA_DEVICE_MEMORY_SHARED_CACHE")
                .unwrap_or_else(|| PathBuf::from(DEFAULT_REGION)),
            log_level,
            log_file: nonempty("VIGIL_LOG_FILE"),
            poll_start,
            poll_max: poll_max.max(poll_start),
            deadline,
            node_lock_dir: nonempty("VIGIL_NODE_LOCK_DIR"),
            visible_devices,
            warnings,
        }
    }

    pub fn from_env() -> Config {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// The physical (NVML) index of CUDA ordinal `i`.
    /// The CUDA ordinal of physical device `phys` (what NVML indexes by), if visible.
    pub fn cuda_ordinal(&self, phys: u32) -> Option<u32> {
        match &self.visible_devices {
            Some(v) => v.iter().position(|&p| p == phys).map(|i| i as u32),
            None => Some(phys),
        }
    }

    pub fn physical_device(&self, i: u32) -> u32 {
        self.visible_devices
            .as_ref()
            .and_then(|v| v.get(i as usize).copied())
            .unwrap_or(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_match_hami() {
        let c = cfg(&[]);
        assert_eq!(c.region_path, PathBuf::from("/tmp/cudevshr.cache"));
        assert_eq!(c.log_level, 2);
        assert_eq!(c.poll_start, Duration::from_millis(1));
        assert_eq!(c.poll_max, Duration::from_millis(10));
        assert_eq!(c.deadline, Duration::from_secs(5));
        assert!(c.warnings.is_empty());
        assert_eq!(c.physical_device(3), 3);
    }

    #[test]
    fn values_and_bad_values() {
        let c = cfg(&[
            ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/x/y.cache"),
            ("LIBCUDA_LOG_LEVEL", "4"),
            ("VIGIL_DETECT_POLL_START", "250us"),
            ("VIGIL_DETECT_DEADLINE", "2s"),
            ("CUDA_VISIBLE_DEVICES", "2,0"),
        ]);
        assert_eq!(c.region_path, PathBuf::from("/x/y.cache"));
        assert_eq!(c.log_level, 4);
        assert_eq!(c.poll_start, Duration::from_micros(250));
        assert_eq!(c.deadline, Duration::from_secs(2));
        assert_eq!(c.physical_device(0), 2);
        assert_eq!(c.physical_device(1), 0);
        let bad = cfg(&[
            ("LIBCUDA_LOG_LEVEL", "loud"),
            ("VIGIL_DETECT_DEADLINE", "soon"),
            ("CUDA_VISIBLE_DEVICES", "GPU-abc"),
        ]);
        assert_eq!(bad.log_level, 2);
        assert_eq!(bad.deadline, Duration::from_secs(5));
        assert_eq!(bad.visible_devices, None);
        assert_eq!(bad.warnings.len(), 3);
        assert!(bad
            .warnings
            .iter()
            .any(|w| w.contains("VIGIL_DETECT_DEADLINE") && w.contains("soon")));
    }
}
