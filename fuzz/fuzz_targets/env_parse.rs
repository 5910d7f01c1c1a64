//! env_parse: every parser of settings that comes from the environment or a flag.
//!
//! Input: [sub-target byte] then the sub-target's input. Sub-targets:
//!   0 interposer `parse_limit` on a string       4 interposer `parse_duration`, `parse_visible`,
//!                                                  `parse_mode`
//!   1 interposer `parse_limit` on a built value  5 vigil_units `parse_size` (string and
//!                                                  built value)
//!   2 interposer `limits::from_lookup`           6 vigil_units `parse_duration`, gpusim
//!                                                  `parse_rate`
//!   3 interposer `Config::from_lookup`           7 gpusim `Lag::parse` and `Lag::sample`
//! An environment is a list of records [key byte][value bytes][NUL]; the key byte
//! picks a name from ENV_KEYS. Strings are taken as UTF-8 (lossily), as
//! `std::env::var` only ever yields UTF-8.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use vigil_fuzz::interposer::{config, limits};
use vigil_fuzz::{check, Bytes};
use vigil_gpusim::config as gsim;
use vigil_units as units;

const LIMIT: &str = "CUDA_DEVICE_MEMORY_LIMIT";
const CONFIG_KEYS: [&str; 10] = [
    "CUDA_DEVICE_MEMORY_SHARED_CACHE",
    "LIBCUDA_LOG_LEVEL",
    "VIGIL_LOG_FILE",
    "VIGIL_DETECT_POLL_START",
    "VIGIL_DETECT_POLL_MAX",
    "VIGIL_DETECT_DEADLINE",
    "VIGIL_NODE_LOCK_DIR",
    "CUDA_VISIBLE_DEVICES",
    "VIGIL_REGION_MODE",
    "VIGIL_LIMIT_POLICY",
];

fn env_key(k: u8) -> String {
    match k % 32 {
        0..=7 => CONFIG_KEYS[(k % 8) as usize].to_string(),
        8 => LIMIT.to_string(),
        9 => format!("{LIMIT}_00"),
        10 => format!("{LIMIT}_-1"),
        11 => format!("{LIMIT}_ 1"),
        30 => CONFIG_KEYS[8].to_string(),
        31 => CONFIG_KEYS[9].to_string(),
        n => format!("{LIMIT}_{}", n - 12), // _0 .. _17
    }
}

fn env(b: &mut Bytes) -> HashMap<String, String> {
    let mut m = HashMap::new();
    while !b.is_empty() {
        let k = env_key(b.u8());
        let v = String::from_utf8_lossy(b.until_nul()).into_owned();
        m.insert(k, v);
    }
    m
}

const SUFFIXES: [(&str, u32); 7] = [
    ("", 0),
    ("k", 10),
    ("K", 10),
    ("m", 20),
    ("M", 20),
    ("g", 30),
    ("G", 30),
];

/// The documented syntax, decided independently of the parser: optional '+', ASCII
/// digits, one optional k/m/g suffix in either case, surrounding whitespace allowed.
/// Returns the exact value (u128) or None if the syntax is wrong or the digits alone
/// do not fit in 64 bits.
fn limit_model(value: &str) -> Option<u128> {
    let v = value.trim();
    let (num, shift) = match v.as_bytes().last() {
        Some(b'k' | b'K') => (&v[..v.len() - 1], 10),
        Some(b'm' | b'M') => (&v[..v.len() - 1], 20),
        Some(b'g' | b'G') => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let digits = num.strip_prefix('+').unwrap_or(num);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let d: u128 = digits.bytes().try_fold(0u128, |acc, c| {
        acc.checked_mul(10)?.checked_add((c - b'0') as u128)
    })?;
    (d <= u64::MAX as u128).then_some(d << shift)
}

fn check_limit(var: &str, value: &str) {
    let got = limits::parse_limit(var, value);
    match (limit_model(value), &got) {
        (Some(want), Ok(n)) => assert_eq!(*n as u128, want, "parse_limit({value:?})"),
        (Some(want), Err(e)) => {
            assert!(
                want > u64::MAX as u128,
                "parse_limit({value:?}) = Err({e}), want {want}"
            );
            check!(
                "limit-overflow-error",
                e.contains("overflows"),
                "overflow error does not say so: {e}"
            );
        }
        (None, Ok(n)) => panic!("parse_limit accepted {value:?} as {n}"),
        (None, Err(_)) => {}
    }
    match got {
        Ok(n) => {
            // Round trips: plain bytes, and every unit that divides it, both cases.
            assert_eq!(
                limits::parse_limit(var, &n.to_string()),
                Ok(n),
                "{n} bytes round trip"
            );
            for (suf, shift) in SUFFIXES {
                if n % (1u64 << shift) == 0 {
                    let s = format!("{}{suf}", n >> shift);
                    assert_eq!(limits::parse_limit(var, &s), Ok(n), "{s:?}");
                }
            }
            assert_eq!(
                limits::parse_limit(var, &format!(" \t{value}\n ")),
                Ok(n),
                "whitespace"
            );
        }
        Err(e) => {
            check!(
                "limit-error-names-var",
                e.contains(var),
                "error does not name {var}: {e}"
            );
            check!(
                "limit-error-shows-value",
                e.contains(&format!("{value:?}")),
                "error does not show the value {value:?}: {e}"
            );
        }
    }
}

fn check_from_lookup(b: &mut Bytes) {
    let devices = (b.u8() % 20) as usize;
    let m = env(b);
    let asked = RefCell::new(Vec::new());
    let limits::Parsed {
        limits: lims,
        invalid,
        errors,
    } = limits::from_lookup(devices, |k| {
        asked.borrow_mut().push(k.to_string());
        m.get(k).cloned()
    });
    assert_eq!(invalid.len(), devices);
    assert_eq!(lims.len(), devices);
    let parse = |k: &str| m.get(k).map(|v| limits::parse_limit(k, v));
    let global = parse(LIMIT);
    let mut want_errors = Vec::new();
    if let Some(Err(_)) = global {
        want_errors.push(LIMIT.to_string());
    }
    for (i, &l) in lims.iter().enumerate() {
        let var = format!("{LIMIT}_{i}");
        // A per-device 0 means unset (HAMi-core's meaning): the global value decides.
        let own = parse(&var).filter(|r| *r != Ok(0));
        let want = match (&own, &global) {
            (Some(Ok(n)), _) => *n,
            (Some(Err(_)), g) => {
                want_errors.push(var.clone());
                match g {
                    Some(Ok(n)) => *n,
                    _ => 0,
                }
            }
            (None, Some(Ok(n))) => *n,
            (None, _) => 0,
        };
        assert_eq!(l, want, "limit of device {i}");
        // The variable that decides this device's limit was set but invalid.
        let bad = matches!(own, Some(Err(_))) || (own.is_none() && matches!(global, Some(Err(_))));
        assert_eq!(invalid[i], bad, "invalid flag of device {i}");
    }
    assert_eq!(
        errors.len(),
        want_errors.len(),
        "errors {errors:?}, want one per {want_errors:?}"
    );
    for (e, var) in errors.iter().zip(&want_errors) {
        check!(
            "limit-error-names-var",
            e.starts_with(&format!("{var}=")),
            "error {e:?} is not about {var}"
        );
    }
    for k in asked.borrow().iter() {
        let ok = k == LIMIT || (0..devices).any(|i| *k == format!("{LIMIT}_{i}"));
        assert!(ok, "from_lookup({devices}) read {k}");
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Number and unit of a duration string, if it has the documented shape.
fn split_duration(s: &str) -> Option<(&str, &str)> {
    let t = s.trim();
    let i = t.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    Some(t.split_at(i))
}

fn check_duration(s: &str) {
    let Some(d) = config::parse_duration(s) else {
        return;
    };
    assert!(
        d < HOUR,
        "parse_duration({s:?}) = {d:?} is not under an hour"
    );
    if s.trim() == "0" {
        assert_eq!(d, Duration::ZERO, "parse_duration({s:?})");
        return;
    }
    let (num, unit) = split_duration(s).expect("accepted without a unit");
    assert!(
        ["ns", "us", "µs", "ms", "s", "m"].contains(&unit),
        "accepted unit {unit:?}"
    );
    if let Ok(n) = num.parse::<u64>() {
        let want = match unit {
            "ns" => Duration::from_nanos(n),
            "us" | "µs" => Duration::from_micros(n),
            "ms" => Duration::from_millis(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            _ => Duration::from_secs(n),
        };
        check!(
            "duration-exact",
            d == want,
            "parse_duration({s:?}) = {d:?}, want {want:?}"
        );
    }
    if d.subsec_nanos() % 1000 == 0 {
        let back = format!("{}us", d.as_micros());
        assert_eq!(
            config::parse_duration(&back),
            Some(d),
            "round trip through {back:?}"
        );
    }
}

fn check_visible(v: &[u32]) {
    assert!(!v.is_empty(), "an empty device list must be None");
    let mut seen = std::collections::HashSet::new();
    let dup = v.iter().find(|p| !seen.insert(**p));
    check!(
        "visible-duplicates",
        dup.is_none(),
        "CUDA_VISIBLE_DEVICES yields physical device {} twice in {v:?}",
        dup.unwrap()
    );
}

fn check_config(b: &mut Bytes) {
    let m = env(b);
    let c = config::Config::from_lookup(|k| m.get(k).cloned());
    let set = |k: &str| m.get(k);
    let mut want_warn: Vec<&str> = Vec::new();

    // Durations: the given value if valid, else the default and a warning; all < 1 h.
    let mut dur = |k: &'static str, default_ms: u64| match set(k) {
        None => Duration::from_millis(default_ms),
        Some(v) => config::parse_duration(v).unwrap_or_else(|| {
            want_warn.push(k);
            Duration::from_millis(default_ms)
        }),
    };
    let ps = dur("VIGIL_DETECT_POLL_START", 1);
    let pm = dur("VIGIL_DETECT_POLL_MAX", 10);
    let dl = dur("VIGIL_DETECT_DEADLINE", 5000);
    assert_eq!((c.poll_start, c.poll_max, c.deadline), (ps, pm.max(ps), dl));
    assert!(c.poll_start <= c.poll_max && c.poll_max < HOUR && c.deadline < HOUR);

    let lvl = set("LIBCUDA_LOG_LEVEL").map(|v| match v.trim().parse::<u8>() {
        Ok(l) if l <= 4 => l,
        _ => {
            want_warn.push("LIBCUDA_LOG_LEVEL");
            2
        }
    });
    assert_eq!(c.log_level, lvl.unwrap_or(2));
    assert!(c.log_level <= 4);

    if let Some(v) = set("CUDA_VISIBLE_DEVICES") {
        let p = config::parse_visible(v);
        assert_eq!(c.visible_devices, p);
        if p.is_none() && !v.trim().is_empty() {
            want_warn.push("CUDA_VISIBLE_DEVICES");
        }
    } else {
        assert_eq!(c.visible_devices, None);
    }
    // Region file mode: octal, at most 0777; default 0666.
    let mode = set("VIGIL_REGION_MODE").map(|v| {
        config::parse_mode(v).unwrap_or_else(|| {
            want_warn.push("VIGIL_REGION_MODE");
            0o666
        })
    });
    assert_eq!(c.region_mode, mode.unwrap_or(0o666));
    assert!(c.region_mode <= 0o777);
    // Limit policy: closed by default as soon as any limit variable asks for a limit:
    // set to anything but a valid 0 (which means unset, as in HAMi-core).
    let asks = |k: &str| set(k).is_some_and(|v| limits::parse_limit(k, v) != Ok(0));
    let limit_set =
        asks(LIMIT) || (0..limits::MAX_ORDINALS).any(|i| asks(&format!("{LIMIT}_{i}")));
    let default_policy = if limit_set {
        config::LimitPolicy::Closed
    } else {
        config::LimitPolicy::Open
    };
    let policy = match set("VIGIL_LIMIT_POLICY").map(|v| v.trim()) {
        None | Some("") => default_policy,
        Some("open") => config::LimitPolicy::Open,
        Some("closed") => config::LimitPolicy::Closed,
        Some(_) => {
            want_warn.push("VIGIL_LIMIT_POLICY");
            default_policy
        }
    };
    assert_eq!(
        c.limit_policy, policy,
        "limit policy (a limit is set: {limit_set})"
    );
    assert!(!c.secure, "from_lookup never marks the process secure");

    let path = |k: &str| set(k).filter(|v| !v.trim().is_empty()).map(PathBuf::from);
    assert_eq!(
        c.region_path,
        path("CUDA_DEVICE_MEMORY_SHARED_CACHE")
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_REGION))
    );
    assert!(!c.region_path.as_os_str().is_empty());
    assert_eq!(c.log_file, path("VIGIL_LOG_FILE"));
    assert_eq!(c.node_lock_dir, path("VIGIL_NODE_LOCK_DIR"));

    // One warning per bad variable, each naming it and showing the value.
    let mut got: Vec<&str> = Vec::new();
    for w in &c.warnings {
        let k = CONFIG_KEYS.iter().find(|k| w.starts_with(&format!("{k}=")));
        let k = k.unwrap_or_else(|| panic!("warning names no variable: {w}"));
        let (raw, trimmed) = (format!("{:?}", m[*k]), format!("{:?}", m[*k].trim()));
        check!(
            "warning-shows-value",
            w.contains(&raw) || w.contains(&trimmed),
            "warning {w:?}"
        );
        got.push(k);
    }
    got.sort();
    want_warn.sort();
    assert_eq!(got, want_warn, "warnings");

    // The device map: CUDA ordinal <-> physical index, both ways.
    if let Some(v) = &c.visible_devices {
        check_visible(v);
        for (i, &p) in v.iter().enumerate() {
            assert_eq!(c.physical_device(i as u32), p);
            check!(
                "visible-duplicates",
                c.cuda_ordinal(p) == Some(i as u32),
                "physical {p} is CUDA ordinal {i}, but cuda_ordinal says {:?} ({v:?})",
                c.cuda_ordinal(p)
            );
        }
    } else {
        for i in [0u32, 1, 7, u32::MAX] {
            assert_eq!((c.physical_device(i), c.cuda_ordinal(i)), (i, Some(i)));
        }
    }
}

fn gsim_size_model(s: &str) -> Option<u128> {
    let lower = s.trim().to_ascii_lowercase();
    let end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (num, suf) = lower.split_at(end);
    if num.is_empty() {
        return None;
    }
    let shift = match suf.trim() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    let d = num.parse::<u64>().ok()? as u128;
    Some(d << shift)
}

/// A simulator setting's error names the setting and quotes the value refused.
fn check_names_setting(e: &impl std::fmt::Display, setting: &str, s: &str) {
    let m = e.to_string();
    check!(
        "gpusim-error-names-setting",
        m.contains(setting) && m.contains(&format!("{s:?}")),
        "{m}"
    );
}

fn check_gsim_size(s: &str) {
    let got = units::parse_size("VIGIL_GPUSIM_MEMORY", s);
    match (gsim_size_model(s), &got) {
        (Some(w), Ok(n)) => assert_eq!(*n as u128, w, "parse_size({s:?})"),
        (Some(w), Err(_)) => assert!(w > u64::MAX as u128, "parse_size({s:?}) refused {w}"),
        (None, Ok(n)) => panic!("parse_size accepted {s:?} as {n}"),
        (None, Err(_)) => {}
    }
    match got {
        Ok(n) => {
            assert_eq!(units::parse_size("x", &n.to_string()), Ok(n));
            for (suf, shift) in [("KiB", 10), ("m", 20), ("GB", 30), ("t", 40)] {
                if n % (1u64 << shift) == 0 {
                    assert_eq!(
                        units::parse_size("x", &format!("{}{suf}", n >> shift)),
                        Ok(n)
                    );
                }
            }
        }
        Err(e) => check_names_setting(&e, "VIGIL_GPUSIM_MEMORY", s),
    }
}

fn check_gsim_duration(s: &str) {
    let Ok(d) = units::parse_duration("--nvml-lag", s) else {
        let e = units::parse_duration("--nvml-lag", s)
            .unwrap_err()
            .to_string();
        check!(
            "gpusim-error-names-setting",
            e.contains("--nvml-lag"),
            "{e}"
        );
        return;
    };
    assert!(d <= Duration::from_secs(86_400 * 365), "{s:?} -> {d:?}");
    if s.trim() == "0" {
        assert_eq!(d, Duration::ZERO);
        return;
    }
    let (num, unit) = split_duration(s).expect("accepted without a unit");
    if let Ok(n) = num.parse::<u64>() {
        let want = match unit {
            "ns" => Some(Duration::from_nanos(n)),
            "us" | "µs" => n.checked_mul(1000).map(Duration::from_nanos),
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            u => panic!("accepted unit {u:?}"),
        };
        if let Some(w) = want {
            // Exact to the nanosecond up to an hour; past that an f64 of seconds no
            // longer holds every nanosecond (2^53 ns is 104 days), so allow rounding.
            let off = d.abs_diff(w);
            let ok = if w <= HOUR {
                off.is_zero()
            } else {
                off.as_nanos() <= (w.as_nanos() >> 50) + 1
            };
            check!(
                "duration-exact",
                ok,
                "gpusim parse_duration({s:?}) = {d:?}, want {w:?}"
            );
        }
    }
}

fn check_lag(s: &str, u: &[u8]) {
    let lag = match gsim::Lag::parse("--nvml-lag", s) {
        Ok(l) => l,
        Err(e) => return check_names_setting(&e, "--nvml-lag", s),
    };
    if let gsim::Lag::Uniform(a, b) = &lag {
        assert!(a <= b, "uniform {a:?} > {b:?}");
    }
    if let gsim::Lag::LogNormal(_, sigma) = &lag {
        assert!((0.0..=5.0).contains(sigma));
    }
    // Uniforms in (0, 1), from the input and the extremes.
    let mut us: Vec<f64> = u.iter().map(|&x| (x as f64 + 0.5) / 256.0).collect();
    us.extend([f64::MIN_POSITIVE, 1e-300, 0.5, 1.0 - f64::EPSILON]);
    for w in us.windows(2) {
        let d = lag.sample(w[0], w[1]);
        // Drawn lags are capped at an hour; a fixed lag is returned as given.
        let fixed = matches!(lag, gsim::Lag::Fixed(_));
        assert!(
            fixed || d <= HOUR,
            "{lag:?}.sample({}, {}) = {d:?}",
            w[0],
            w[1]
        );
        if let gsim::Lag::Uniform(a, b) = &lag {
            let (lo, hi) = ((*a).min(HOUR), (*b).min(HOUR));
            let ns = Duration::from_nanos(1);
            assert!(
                d + ns >= lo && d <= hi + ns,
                "{lag:?}.sample({}) = {d:?}",
                w[0]
            );
        }
        if let gsim::Lag::Fixed(f) = &lag {
            assert_eq!(d, *f);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let which = b.u8() % 8;
    let s = String::from_utf8_lossy(b.remaining()).into_owned();
    match which {
        0 => {
            check_limit(LIMIT, &s);
            check_limit(&format!("{LIMIT}_3"), &s);
        }
        1 => {
            // A value built to be in range or just past it, with a suffix and spacing.
            let n = b.u64();
            let form = b.u8();
            let (suf, shift) = SUFFIXES[(form % 7) as usize];
            let pad = [" ", "", "\t", "\n", " \u{3000}"][(form >> 3) as usize % 5];
            let s = format!("{pad}{n}{suf}{pad}");
            let got = limits::parse_limit(LIMIT, &s);
            match n.checked_mul(1u64 << shift) {
                Some(want) => assert_eq!(got, Ok(want), "{s:?}"),
                None => {
                    let e = got.expect_err("overflow accepted");
                    check!(
                        "limit-overflow-error",
                        e.contains("overflows") && e.contains(LIMIT),
                        "{e}"
                    );
                }
            }
            check_limit(LIMIT, &s);
        }
        2 => check_from_lookup(&mut b),
        3 => check_config(&mut b),
        4 => {
            check_duration(&s);
            if let Some(m) = config::parse_mode(&s) {
                assert!(m <= 0o777, "mode {m:o} from {s:?}");
                for f in [
                    format!("{m:o}"),
                    format!("0{m:o}"),
                    format!("0o{m:o}"),
                    format!("{m:04o}"),
                ] {
                    assert_eq!(
                        config::parse_mode(&f),
                        Some(m),
                        "mode round trip through {f:?}"
                    );
                }
            }
            if let Some(v) = config::parse_visible(&s) {
                check_visible(&v);
                let c = config::Config::from_lookup(|k| {
                    (k == "CUDA_VISIBLE_DEVICES").then(|| s.clone())
                });
                for (i, &p) in v.iter().enumerate() {
                    check!(
                        "visible-duplicates",
                        c.cuda_ordinal(p) == Some(i as u32),
                        "physical {p} is CUDA ordinal {i}, but cuda_ordinal says {:?} ({v:?})",
                        c.cuda_ordinal(p)
                    );
                }
            }
        }
        5 => {
            check_gsim_size(&s);
            let n = u64::from_le_bytes(std::array::from_fn(|i| {
                data.get(1 + i).copied().unwrap_or(0)
            }));
            for suf in ["", "k", "MiB", "gb", "T"] {
                check_gsim_size(&format!("{n}{suf}"));
            }
        }
        6 => {
            check_gsim_duration(&s);
            if let Ok(r) = gsim::parse_rate("--fail-rate", &s) {
                assert!((0.0..=1.0).contains(&r), "rate {r}");
            }
        }
        _ => {
            let (u, rest) = b.remaining().split_at(b.remaining().len().min(4));
            check_lag(&String::from_utf8_lossy(rest), u);
        }
    }
});
