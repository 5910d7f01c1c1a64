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

/// Limits per CUDA ordinal for `devices` devices (0 = no limit), from `get`.
/// Returns the limits and the errors found; a device whose variable is invalid gets no
/// limit from it, and the error is reported so the caller can log it loudly.
pub fn from_lookup(
    devices: usize,
    get: impl Fn(&str) -> Option<String>,
) -> (Vec<u64>, Vec<String>) {
    let mut errors = Vec::new();
    let mut read = |var: String| -> Option<u64> {
        let v = get(&var)?;
        match parse_limit(&var, &v) {
            Ok(n) => Some(n),
            Err(e) => {
                errors.push(e);
                None
            }
        }
    };
    let all = read("CUDA_DEVICE_MEMORY_LIMIT".to_string());
    let limits = (0..devices)
        .map(|i| {
            read(format!("CUDA_DEVICE_MEMORY_LIMIT_{i}"))
                .or(all)
                .unwrap_or(0)
        })
        .collect();
    (limits, errors)
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
        let (l, e) = from_lookup(
            3,
            env(&[
                ("CUDA_DEVICE_MEMORY_LIMIT", "2g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "1g"),
            ]),
        );
        assert_eq!(l, vec![2 << 30, 1 << 30, 2 << 30]);
        assert!(e.is_empty());
        let (l, e) = from_lookup(2, env(&[]));
        assert_eq!((l, e.len()), (vec![0, 0], 0), "no variable, no enforcement");
        let (l, e) = from_lookup(
            2,
            env(&[
                ("CUDA_DEVICE_MEMORY_LIMIT", "lots"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "1g"),
            ]),
        );
        assert_eq!(l, vec![0, 1 << 30]);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].contains("CUDA_DEVICE_MEMORY_LIMIT=\"lots\""),
            "{}",
            e[0]
        );
    }
}
