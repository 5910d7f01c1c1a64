//! Per-device memory limits from HAMi's variables: `CUDA_DEVICE_MEMORY_LIMIT` for every
//! device and `CUDA_DEVICE_MEMORY_LIMIT_<i>` for CUDA ordinal `i` (which wins). Values
//! are bytes, or a number with a `k`/`m`/`g` suffix in either case (powers of 1024).
//! An invalid or overflowing value is an error naming the variable, never "no limit".
//!
//! A value of 0 means what it means in HAMi-core (`get_limit_from_env` returns 0 for
//! it, warning "invalid device memory limit", and 0 is "no limit" to its `oom_check`):
//! unset. `CUDA_DEVICE_MEMORY_LIMIT=0` limits nothing, and `CUDA_DEVICE_MEMORY_LIMIT_<i>=0`
//! falls back to `CUDA_DEVICE_MEMORY_LIMIT` as if it were not there. `explain` says so
//! at start, and names a per-device variable for a device that does not exist.

/// Parses one HAMi limit value.
pub fn parse_limit(var: &str, value: &str) -> Result<u64, String> {
    let v = value.trim();
    let (num, shift) = match v.chars().last() {
        Some('k' | 'K') => (&v[..v.len() - 1], 10),
        Some('m' | 'M') => (&v[..v.len() - 1], 20),
        Some('g' | 'G') => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("{var}={value:?} is not a memory size (bytes, or a number with k, m or g, e.g. 4g)")
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{var}={value:?} overflows 64 bits"))
}

/// How many CUDA ordinals `CUDA_DEVICE_MEMORY_LIMIT_<i>` can name (the region's devices).
pub const MAX_ORDINALS: usize = vigil_region::layout::MAX_DEVICES;

/// The limits of `devices` devices as the environment gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes per CUDA ordinal; 0 = no limit. An invalid variable contributes nothing
    /// (the device falls back to `CUDA_DEVICE_MEMORY_LIMIT`, or to no limit).
    pub limits: Vec<u64>,
    /// Per device: the variable that decides its limit was set but invalid. Under
    /// `VIGIL_LIMIT_POLICY=closed` such a device refuses every allocation.
    pub invalid: Vec<bool>,
    /// One message per invalid variable, naming it and its value.
    pub errors: Vec<String>,
}

/// Limits per CUDA ordinal for `devices` devices, from `get`.
pub fn from_lookup(devices: usize, get: impl Fn(&str) -> Option<String>) -> Parsed {
    let mut errors = Vec::new();
    // Some(Ok(n)): valid; Some(Err(())): set but invalid; None: unset.
    let mut read = |var: String| -> Option<Result<u64, ()>> {
        let v = get(&var)?;
        Some(parse_limit(&var, &v).map_err(|e| errors.push(e)))
    };
    let all = read("CUDA_DEVICE_MEMORY_LIMIT".to_string());
    let (mut limits, mut invalid) = (Vec::new(), Vec::new());
    for i in 0..devices {
        let own = read(format!("CUDA_DEVICE_MEMORY_LIMIT_{i}"));
        let fallback = match all {
            Some(Ok(n)) => n,
            _ => 0,
        };
        let (bytes, bad) = match own {
            Some(Ok(n)) if n > 0 => (n, false),
            Some(Err(())) => (fallback, true),
            // 0 is "unset", as in HAMi-core: the device falls back to the global value.
            Some(Ok(_)) | None => (fallback, matches!(all, Some(Err(())))),
        };
        limits.push(bytes);
        invalid.push(bad);
    }
    Parsed {
        limits,
        invalid,
        errors,
    }
}

/// Whether a limit variable's value asks for a limit: anything but a valid 0 (an
/// invalid value asks for one that cannot be enforced).
pub fn asks_for_limit(var: &str, value: &str) -> bool {
    parse_limit(var, value) != Ok(0)
}

const GLOBAL: &str = "CUDA_DEVICE_MEMORY_LIMIT";

/// What the limit variables among `vars` mean where they may surprise: a 0 (no limit,
/// as in HAMi-core), a per-device variable for an ordinal past the `devices` this
/// process sees (it limits nothing), and a per-device name that is never read. One
/// warning each, naming the variable; `devices` 0 (unknown) skips the ordinal check.
/// Invalid values are not repeated here (`from_lookup` reports them).
pub fn explain(devices: usize, vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| k == GLOBAL || k.starts_with("CUDA_DEVICE_MEMORY_LIMIT_"))
        .collect();
    vars.sort();
    let global = vars
        .iter()
        .find(|(k, _)| k == GLOBAL)
        .and_then(|(k, v)| parse_limit(k, v).ok())
        .filter(|n| *n > 0);
    let mut out = Vec::new();
    for (k, v) in &vars {
        let zero = parse_limit(k, v) == Ok(0);
        let Some(suffix) = k.strip_prefix("CUDA_DEVICE_MEMORY_LIMIT_") else {
            if zero {
                out.push(format!(
                    "{k}={v:?} means no limit (HAMi-core treats 0 as unset): a device without a CUDA_DEVICE_MEMORY_LIMIT_<i> of its own may use all of its memory"
                ));
            }
            continue;
        };
        let ordinal = suffix
            .parse::<usize>()
            .ok()
            .filter(|i| i.to_string() == suffix);
        let Some(i) = ordinal else {
            out.push(format!(
                "{k} is never read: per-device limits are CUDA_DEVICE_MEMORY_LIMIT_<i>, with i a CUDA ordinal in decimal (0, 1, ...)"
            ));
            continue;
        };
        if devices > 0 && i >= devices {
            out.push(format!(
                "{k} is set, but this process sees {devices} CUDA device{} (ordinals 0 to {}): it limits nothing",
                if devices == 1 { "" } else { "s" },
                devices - 1
            ));
        } else if zero {
            let then = match global {
                Some(n) => format!("device {i} falls back to {GLOBAL} ({n} bytes)"),
                None => format!("device {i} has no limit"),
            };
            out.push(format!(
                "{k}={v:?} sets no limit of its own (HAMi-core treats 0 as unset): {then}"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn hami_syntax() {
        for (text, bytes) in [
            ("1073741824", 1 << 30),
            ("4g", 4 << 30),
            ("4G", 4 << 30),
            ("512m", 512 << 20),
            ("64K", 64 << 10),
        ] {
            assert_eq!(parse_limit("X", text), Ok(bytes), "{text}");
        }
        for bad in ["", "-1", "4gb", "four", "1.5g", "g"] {
            let e = parse_limit("CUDA_DEVICE_MEMORY_LIMIT", bad).unwrap_err();
            assert!(e.contains("CUDA_DEVICE_MEMORY_LIMIT"), "{e}");
        }
        assert!(parse_limit("X", "99999999999999g")
            .unwrap_err()
            .contains("overflows"));
    }

    #[test]
    fn per_device_wins_and_errors_are_not_silently_unlimited() {
        let p = from_lookup(
            3,
            env(&[
                ("CUDA_DEVICE_MEMORY_LIMIT", "2g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "1g"),
            ]),
        );
        assert_eq!(p.limits, vec![2 << 30, 1 << 30, 2 << 30]);
        assert!(p.errors.is_empty() && !p.invalid.contains(&true));
        let p = from_lookup(2, env(&[]));
        assert_eq!(
            (p.limits, p.errors.len()),
            (vec![0, 0], 0),
            "no variable, no enforcement"
        );
        let p = from_lookup(
            3,
            env(&[
                ("CUDA_DEVICE_MEMORY_LIMIT", "lots"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "1g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_2", "2x"),
            ]),
        );
        assert_eq!(p.limits, vec![0, 1 << 30, 0]);
        // Device 0 is decided by the invalid global, device 2 by its own invalid one.
        assert_eq!(p.invalid, vec![true, false, true]);
        assert_eq!(p.errors.len(), 2);
        assert!(
            p.errors[0].contains("CUDA_DEVICE_MEMORY_LIMIT=\"lots\""),
            "{}",
            p.errors[0]
        );
    }

    #[test]
    fn zero_is_unset_as_in_hami_core() {
        // The global 0: no limit anywhere.
        let p = from_lookup(2, env(&[("CUDA_DEVICE_MEMORY_LIMIT", "0")]));
        assert_eq!((p.limits, p.errors.len()), (vec![0, 0], 0));
        // A per-device 0 falls back to the global value, as HAMi-core's
        // do_init_device_memory_limits does (it keeps only a non-zero own value).
        let p = from_lookup(
            2,
            env(&[
                ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "0"),
            ]),
        );
        assert_eq!(p.limits, vec![1 << 30, 1 << 30]);
        let p = from_lookup(2, env(&[("CUDA_DEVICE_MEMORY_LIMIT_0", "0m")]));
        assert_eq!(p.limits, vec![0, 0]);
        assert!(!asks_for_limit("X", "0") && !asks_for_limit("X", "0g"));
        assert!(asks_for_limit("X", "1") && asks_for_limit("X", "lots"));
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `line` contains every one of `parts`.
    fn says(line: &str, parts: &[&str]) {
        assert!(parts.iter().all(|p| line.contains(p)), "{line}");
    }

    #[test]
    fn explain_says_what_zero_means_and_names_missing_devices() {
        let w = explain(
            2,
            vars(&[
                ("CUDA_DEVICE_MEMORY_LIMIT", "0"),
                ("CUDA_DEVICE_MEMORY_LIMIT_5", "1g"),
                ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/tmp/x"),
                ("PATH", "/bin"),
            ]),
        );
        assert_eq!(w.len(), 2, "{w:?}");
        says(
            &w[0],
            &["CUDA_DEVICE_MEMORY_LIMIT=\"0\"", "no limit", "HAMi-core"],
        );
        says(
            &w[1],
            &[
                "CUDA_DEVICE_MEMORY_LIMIT_5",
                "2 CUDA devices",
                "limits nothing",
            ],
        );
        // A per-device 0 says where its device falls back to.
        let w = explain(
            2,
            vars(&[
                ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "0"),
            ]),
        );
        assert_eq!(w.len(), 1, "{w:?}");
        says(&w[0], &["falls back", "1073741824"]);
        let w = explain(1, vars(&[("CUDA_DEVICE_MEMORY_LIMIT_0", "0")]));
        assert!(w[0].contains("device 0 has no limit"), "{}", w[0]);
        // Names that are never read; one device; an unknown device count.
        let w = explain(
            1,
            vars(&[
                ("CUDA_DEVICE_MEMORY_LIMIT_01", "1g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_x", "1g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "1g"),
            ]),
        );
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w.iter().filter(|l| l.contains("never read")).count() == 2);
        assert!(w
            .iter()
            .any(|l| l.contains("sees 1 CUDA device (ordinals 0 to 0)")));
        assert!(explain(0, vars(&[("CUDA_DEVICE_MEMORY_LIMIT_9", "1g")])).is_empty());
        // Ordinary settings and invalid values (reported elsewhere) say nothing here.
        let w = explain(
            2,
            vars(&[
                ("CUDA_DEVICE_MEMORY_LIMIT", "4g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "2g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "lots"),
            ]),
        );
        assert!(w.is_empty(), "{w:?}");
    }
}
