//! Settings from the environment, HAMi's variables first. Pure: takes a lookup
//! function, so it is unit-tested without touching the process environment.

use std::path::PathBuf;
use std::time::Duration;
use vigil_region::UnenforcedSetting;

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
    /// `VIGIL_DETECT_MODE`: signature detection without a lock (`parallel`, the
    /// default) or the seed's detection lock plus NVML diff (`serial`).
    pub detect_mode: DetectMode,
    /// `VIGIL_DETECT_STEPS`: marker steps in a signature (2-12, default 5).
    pub detect_steps: usize,
    /// `VIGIL_NODE_LOCK_DIR` (serial mode only): a directory shared by every container
    /// on the node; when set, serial detection is also serialized node-wide there.
    pub node_lock_dir: Option<PathBuf>,
    /// `CUDA_VISIBLE_DEVICES`, as physical NVML indices by CUDA ordinal; None = all.
    pub visible_devices: Option<Vec<u32>>,
    /// `VIGIL_REGION_MODE`: permissions of a region file this process creates.
    pub region_mode: u32,
    /// `VIGIL_LIMIT_POLICY`: what allocations do when limits cannot be enforced.
    pub limit_policy: LimitPolicy,
    /// This process's environment asks for a memory limit (a limit variable set to
    /// anything but 0). Decides the default policy, and whether `dlopen` drops
    /// `RTLD_DEEPBIND` (see `dl`).
    pub limit_requested: bool,
    /// A setuid/setgid (AT_SECURE) program: the environment is not trusted, nothing is
    /// read from it, and Vigil stays out of the way.
    pub secure: bool,
    /// Problems found while reading the environment, to be logged once the log is up.
    pub warnings: Vec<String>,
    /// HAMi-core settings in the environment that Vigil does not enforce, each with
    /// the variable that asked for it (`VAR="value"`): warned about, counted in the
    /// region and exported (`vigil_unenforced_settings`).
    pub unenforced: Vec<(UnenforcedSetting, String)>,
}

/// The HAMi-core settings Vigil does not enforce that `get` asks for. Values that mean
/// "off" in HAMi-core (an SM limit of 0 or 100, `ACTIVE_OOM_KILLER=false`, the
/// `default` policy) ask for nothing.
pub fn unenforced_settings(
    get: &impl Fn(&str) -> Option<String>,
) -> Vec<(UnenforcedSetting, String)> {
    let mut out = Vec::new();
    let shown = |k: &str, v: &str| format!("{k}={v:?}");
    let truthy = |v: &str| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    };
    let sm_vars = std::iter::once("CUDA_DEVICE_SM_LIMIT".to_string())
        .chain((0..16).map(|i| format!("CUDA_DEVICE_SM_LIMIT_{i}")));
    for k in sm_vars {
        if let Some(v) = get(&k).filter(|v| !v.trim().is_empty()) {
            // HAMi-core: a percentage; 0 is no limit, and 100 or more leaves every SM.
            let off = matches!(v.trim().parse::<u64>(), Ok(0) | Ok(100..));
            if !off {
                out.push((UnenforcedSetting::SmLimit, shown(&k, &v)));
                break;
            }
        }
    }
    if let Some(v) = get("CUDA_OVERSUBSCRIBE").filter(|v| truthy(v)) {
        out.push((
            UnenforcedSetting::Oversubscribe,
            shown("CUDA_OVERSUBSCRIBE", &v),
        ));
    }
    if let Some(v) = get("GPU_CORE_UTILIZATION_POLICY")
        .filter(|v| !v.trim().is_empty() && !v.trim().eq_ignore_ascii_case("default"))
    {
        out.push((
            UnenforcedSetting::CoreUtilizationPolicy,
            shown("GPU_CORE_UTILIZATION_POLICY", &v),
        ));
    }
    if let Some(v) = get("CUDA_TASK_PRIORITY").filter(|v| !v.trim().is_empty()) {
        out.push((
            UnenforcedSetting::TaskPriority,
            shown("CUDA_TASK_PRIORITY", &v),
        ));
    }
    if let Some(v) = get("ACTIVE_OOM_KILLER").filter(|v| truthy(v)) {
        out.push((
            UnenforcedSetting::ActiveOomKiller,
            shown("ACTIVE_OOM_KILLER", &v),
        ));
    }
    out
}

/// How host-PID detection tells its NVML entry from the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectMode {
    /// Memory signatures, concurrently: correct when many containers start at once.
    Parallel,
    /// One process at a time per region, under the detection lock (the seed's design).
    Serial,
}

/// What an allocation does when a limit is set but cannot be enforced (the region
/// cannot be opened or locked, or a limit variable is invalid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitPolicy {
    /// Pass through: the workload runs unlimited, and the log says why.
    Open,
    /// Refuse with CUDA_ERROR_OUT_OF_MEMORY: the damage stays in this container.
    Closed,
}

/// Parses `VIGIL_REGION_MODE`: octal permission bits such as 0660 or 666.
pub fn parse_mode(s: &str) -> Option<u32> {
    let t = s.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    u32::from_str_radix(t, 8).ok().filter(|m| *m <= 0o777)
}

/// Parses a duration in the shared grammar (`vigil_units`: `0`, or a number with
/// `ns`, `us`, `ms`, `s` or `m`), under an hour.
pub fn parse_duration(s: &str) -> Option<Duration> {
    // The one grammar every Vigil tool reads durations with, and a bound of our own.
    vigil_units::parse_duration("", s)
        .ok()
        .filter(|d| *d < Duration::from_secs(3600))
}

/// Numeric `CUDA_VISIBLE_DEVICES` ("1,0"). As in CUDA, only the devices listed before
/// the first invalid entry are visible, and a device listed twice ends the list too
/// (one physical device cannot be two ordinals). UUID or MIG forms (a list whose first
/// entry is not a number) are not mapped: None.
pub fn parse_visible(s: &str) -> Option<Vec<u32>> {
    let mut v: Vec<u32> = Vec::new();
    for t in s.split(',').map(str::trim) {
        match t.parse::<u32>() {
            Ok(d) if !v.contains(&d) => v.push(d),
            _ => break,
        }
    }
    (!v.is_empty()).then_some(v)
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
        let region_mode = match get("VIGIL_REGION_MODE") {
            None => 0o666,
            Some(v) => parse_mode(&v).unwrap_or_else(|| {
                warnings.push(format!(
                    "VIGIL_REGION_MODE={v:?} is not an octal mode (e.g. 0660); using 0666"
                ));
                0o666
            }),
        };
        // A limit protects the *other* tenants of the GPU: when one is asked for and
        // cannot be enforced, refusing keeps the damage inside this container. A 0
        // asks for none (HAMi-core's meaning); an invalid value asks for one.
        let asks = |name: &str| get(name).is_some_and(|v| crate::limits::asks_for_limit(name, &v));
        let limit_set = asks("CUDA_DEVICE_MEMORY_LIMIT")
            || (0..crate::limits::MAX_ORDINALS)
                .any(|i| asks(&format!("CUDA_DEVICE_MEMORY_LIMIT_{i}")));
        let default_policy = if limit_set {
            LimitPolicy::Closed
        } else {
            LimitPolicy::Open
        };
        let limit_policy = match get("VIGIL_LIMIT_POLICY").as_deref().map(str::trim) {
            None | Some("") => default_policy,
            Some("open") => LimitPolicy::Open,
            Some("closed") => LimitPolicy::Closed,
            Some(v) => {
                warnings.push(format!(
                    "VIGIL_LIMIT_POLICY={v:?} is not open or closed; using {}",
                    if limit_set {
                        "closed (a limit is set)"
                    } else {
                        "open (no limit is set)"
                    }
                ));
                default_policy
            }
        };
        let detect_mode = match get("VIGIL_DETECT_MODE").as_deref().map(str::trim) {
            None | Some("") | Some("parallel") => DetectMode::Parallel,
            Some("serial") => DetectMode::Serial,
            Some(v) => {
                warnings.push(format!(
                    "VIGIL_DETECT_MODE={v:?} is not parallel or serial; using parallel"
                ));
                DetectMode::Parallel
            }
        };
        let detect_steps = match get("VIGIL_DETECT_STEPS") {
            None => 5,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (2..=12).contains(&n) => n,
                _ => {
                    warnings.push(format!(
                        "VIGIL_DETECT_STEPS={v:?} is not a whole number from 2 to 12; using 5"
                    ));
                    5
                }
            },
        };
        Config {
            region_path: nonempty("CUDA_DEVICE_MEMORY_SHARED_CACHE")
                .unwrap_or_else(|| PathBuf::from(DEFAULT_REGION)),
            log_level,
            log_file: nonempty("VIGIL_LOG_FILE"),
            poll_start,
            poll_max: poll_max.max(poll_start),
            deadline,
            detect_mode,
            detect_steps,
            node_lock_dir: nonempty("VIGIL_NODE_LOCK_DIR"),
            visible_devices,
            region_mode,
            limit_policy,
            limit_requested: limit_set,
            secure: false,
            warnings,
            unenforced: unenforced_settings(&get),
        }
    }

    pub fn from_env() -> Config {
        // SAFETY: getauxval has no preconditions.
        if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
            let mut c = Config::from_lookup(|_| None);
            c.secure = true;
            return c;
        }
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// The CUDA ordinal of physical device `phys` (what NVML indexes by), if visible.
    pub fn cuda_ordinal(&self, phys: u32) -> Option<u32> {
        match &self.visible_devices {
            Some(v) => v.iter().position(|&p| p == phys).map(|i| i as u32),
            None => Some(phys),
        }
    }

    /// The physical (NVML) index of CUDA ordinal `i`.
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

    #[test]
    fn limit_policy_defaults_to_closed_only_when_a_limit_is_set() {
        assert_eq!(cfg(&[]).limit_policy, LimitPolicy::Open);
        assert_eq!(
            cfg(&[("CUDA_DEVICE_MEMORY_LIMIT", "1g")]).limit_policy,
            LimitPolicy::Closed
        );
        assert_eq!(
            cfg(&[("CUDA_DEVICE_MEMORY_LIMIT_3", "1g")]).limit_policy,
            LimitPolicy::Closed
        );
        let c = cfg(&[
            ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
            ("VIGIL_LIMIT_POLICY", "open"),
        ]);
        assert_eq!(c.limit_policy, LimitPolicy::Open);
        // 0 asks for no limit (HAMi-core's meaning), so it leaves the policy open.
        let c = cfg(&[
            ("CUDA_DEVICE_MEMORY_LIMIT", "0"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "0g"),
        ]);
        assert_eq!(
            (c.limit_policy, c.limit_requested),
            (LimitPolicy::Open, false)
        );
        let c = cfg(&[("CUDA_DEVICE_MEMORY_LIMIT", "4gb")]);
        assert_eq!(
            (c.limit_policy, c.limit_requested),
            (LimitPolicy::Closed, true)
        );
        let c = cfg(&[("VIGIL_LIMIT_POLICY", "strict")]);
        assert_eq!(c.limit_policy, LimitPolicy::Open);
        assert!(c.warnings.iter().any(|w| w.contains("VIGIL_LIMIT_POLICY")));
    }

    #[test]
    fn detect_mode_defaults_to_parallel() {
        assert_eq!(cfg(&[]).detect_mode, DetectMode::Parallel);
        assert_eq!(cfg(&[]).detect_steps, 5);
        let c = cfg(&[("VIGIL_DETECT_MODE", "serial"), ("VIGIL_DETECT_STEPS", "3")]);
        assert_eq!((c.detect_mode, c.detect_steps), (DetectMode::Serial, 3));
        let c = cfg(&[("VIGIL_DETECT_MODE", "fast"), ("VIGIL_DETECT_STEPS", "1")]);
        assert_eq!((c.detect_mode, c.detect_steps), (DetectMode::Parallel, 5));
        assert!(c
            .warnings
            .iter()
            .any(|w| w.contains("VIGIL_DETECT_MODE") && w.contains("fast")));
        assert!(c.warnings.iter().any(|w| w.contains("VIGIL_DETECT_STEPS")));
    }

    #[test]
    fn region_mode_is_octal_and_bounded() {
        assert_eq!(cfg(&[]).region_mode, 0o666);
        assert_eq!(cfg(&[("VIGIL_REGION_MODE", "0660")]).region_mode, 0o660);
        assert_eq!(cfg(&[("VIGIL_REGION_MODE", "600")]).region_mode, 0o600);
        for bad in ["rw", "0999", "7777", ""] {
            let c = cfg(&[("VIGIL_REGION_MODE", bad)]);
            assert_eq!(c.region_mode, 0o666, "{bad}");
            assert!(c.warnings.iter().any(|w| w.contains("VIGIL_REGION_MODE")));
        }
    }

    #[test]
    fn visible_devices_stop_at_the_first_invalid_or_repeated_entry() {
        assert_eq!(parse_visible("1,0"), Some(vec![1, 0]));
        assert_eq!(parse_visible(" 3 , 1 "), Some(vec![3, 1]));
        assert_eq!(parse_visible("0,0"), Some(vec![0]));
        assert_eq!(parse_visible("2,x,1"), Some(vec![2]));
        assert_eq!(parse_visible("1,,0"), Some(vec![1]));
        assert_eq!(parse_visible("GPU-abc,0"), None);
        assert_eq!(parse_visible(""), None);
        let c = cfg(&[("CUDA_VISIBLE_DEVICES", "1,1")]);
        assert_eq!(c.cuda_ordinal(1), Some(0));
        assert_eq!(c.cuda_ordinal(0), None);
    }
}

#[cfg(test)]
mod unenforced_tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Config {
        Config::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn hami_settings_vigil_does_not_enforce_are_named_with_their_variable() {
        let c = cfg(&[
            ("CUDA_DEVICE_SM_LIMIT_1", "30"),
            ("CUDA_OVERSUBSCRIBE", "true"),
            ("GPU_CORE_UTILIZATION_POLICY", "force"),
            ("CUDA_TASK_PRIORITY", "0"),
            ("ACTIVE_OOM_KILLER", "1"),
        ]);
        let names: Vec<_> = c.unenforced.iter().map(|(s, _)| s.name()).collect();
        assert_eq!(
            names,
            [
                "sm_limit",
                "oversubscribe",
                "core_utilization_policy",
                "task_priority",
                "active_oom_killer"
            ]
        );
        assert_eq!(c.unenforced[0].1, r#"CUDA_DEVICE_SM_LIMIT_1="30""#);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn values_that_mean_off_in_hami_ask_for_nothing() {
        let c = cfg(&[
            ("CUDA_DEVICE_SM_LIMIT", "0"),
            ("CUDA_DEVICE_SM_LIMIT_0", "100"),
            ("CUDA_OVERSUBSCRIBE", "false"),
            ("GPU_CORE_UTILIZATION_POLICY", "default"),
            ("CUDA_TASK_PRIORITY", ""),
            ("ACTIVE_OOM_KILLER", "false"),
        ]);
        assert!(c.unenforced.is_empty(), "{:?}", c.unenforced);
        // Garbage in an SM limit is not "off": it asks for something Vigil ignores.
        let g = cfg(&[("CUDA_DEVICE_SM_LIMIT", "half")]);
        assert_eq!(g.unenforced.len(), 1);
    }
}
