//! Per-device memory limits from HAMi's variables: `CUDA_DEVICE_MEMORY_LIMIT` for every
//! device and `CUDA_DEVICE_MEMORY_LIMIT_<i>` for CUDA ordinal `i` (which wins). Values
//! are bytes, or a number with a `k`/`m`/`g` suffix in either case (powers of 1024).
//! An invalid or overflowing value is an error naming the variable, never "no limit".

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
            Some(Ok(n)) => (n, false),
            Some(Err(())) => (fallback, true),
            None => (fallback, matches!(all, Some(Err(())))),
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
        assert_eq!(parse_limit("X", "1073741824"), Ok(1 << 30));
        assert_eq!(parse_limit("X", "4g"), Ok(4 << 30));
        assert_eq!(parse_limit("X", "4G"), Ok(4 << 30));
        assert_eq!(parse_limit("X", "512m"), Ok(512 << 20));
        assert_eq!(parse_limit("X", "64K"), Ok(64 << 10));
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
}
