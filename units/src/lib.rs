//! Vigil's one grammar for sizes and durations, shared by flags and environment
//! variables. Every error names the setting and the value.
//!
//! This crate has no dependencies, so any Vigil crate (the interposer included) can
//! use it.

use std::fmt;
use std::time::Duration;

/// A value that does not parse: which setting, what it was, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The flag or variable the value came from, e.g. `--memory/VIGIL_GPUSIM_MEMORY`.
    pub setting: String,
    /// The value as given.
    pub value: String,
    /// What the value should have been, e.g. "a duration (e.g. 0, 500us, 20ms, 2s)".
    pub expected: &'static str,
}

impl ParseError {
    /// An error for `setting`'s `value`, which is not `expected`.
    pub fn new(setting: &str, value: &str, expected: &'static str) -> ParseError {
        ParseError {
            setting: setting.to_string(),
            value: value.to_string(),
            expected,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {:?} is not {}",
            self.setting, self.value, self.expected
        )
    }
}

impl std::error::Error for ParseError {}

/// Bytes: a plain number, or with a suffix: k/m/g/t (powers of 1024, any case, an
/// optional "b" or "ib"): `512`, `64k`, `512MiB`, `16g`, `16GiB`.
pub fn parse_size(setting: &str, s: &str) -> Result<u64, ParseError> {
    const EXPECTED: &str = "a size in bytes (e.g. 1048576, 512MiB, 16g)";
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (num, suffix) = lower.split_at(digits_end);
    if num.is_empty() {
        return Err(ParseError::new(setting, s, EXPECTED));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| ParseError::new(setting, s, EXPECTED))?;
    let shift = match suffix.trim() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(ParseError::new(setting, s, EXPECTED)),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| ParseError::new(setting, s, "a size that fits in 64 bits"))
}

/// The longest duration [`parse_duration`] accepts: 365 days.
pub const MAX_DURATION: Duration = Duration::from_secs(86_400 * 365);

/// A duration: a number (decimals allowed) with a unit, `ns`, `us` (or `µs`), `ms`,
/// `s` or `m` (minutes); `0` alone is allowed. At most [`MAX_DURATION`].
pub fn parse_duration(setting: &str, s: &str) -> Result<Duration, ParseError> {
    const EXPECTED: &str = "a duration (e.g. 0, 500us, 20ms, 2s, 2m)";
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| ParseError::new(setting, s, EXPECTED))?;
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| ParseError::new(setting, s, EXPECTED))?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        _ => return Err(ParseError::new(setting, s, EXPECTED)),
    };
    let secs = v * scale;
    if !secs.is_finite() || !(0.0..=MAX_DURATION.as_secs_f64()).contains(&secs) {
        return Err(ParseError::new(setting, s, EXPECTED));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("x", "1024"), Ok(1024));
        assert_eq!(parse_size("x", "64k"), Ok(64 << 10));
        assert_eq!(parse_size("x", "512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("x", "16G"), Ok(16 << 30));
        assert_eq!(parse_size("x", "2gb"), Ok(2 << 30));
        for bad in ["-5", "", "abc", "5 parsecs", "1.5g", "99999999999999999999"] {
            let e = parse_size("VIGIL_GPUSIM_MEMORY", bad).unwrap_err();
            assert!(e.to_string().contains("VIGIL_GPUSIM_MEMORY"), "{e}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(
            parse_size("x", "16777216t").is_err(),
            "overflow is an error"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("x", "20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("x", "1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("x", "500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("x", "500µs"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("x", "7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("x", "2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("x", " 3s "), Ok(Duration::from_secs(3)));
        for bad in [
            "banana", "-1ms", "10", "ms", "1e400s", "", "366d", "525601m",
        ] {
            let e = parse_duration("--hold", bad).unwrap_err();
            assert!(e.to_string().contains("--hold"), "{e}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = ParseError::new("--memory", "lots", "a size in bytes");
        assert_eq!(e.to_string(), "--memory: \"lots\" is not a size in bytes");
    }
}
