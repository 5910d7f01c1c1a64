//! Parsing of sizes, durations and lag distributions, shared by flags and environment
//! variables. Every error names the setting and the value.

use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{setting}: {value:?} is not {expected}")]
pub struct ParseError {
    pub setting: String,
    pub value: String,
    pub expected: &'static str,
}

fn err(setting: &str, value: &str, expected: &'static str) -> ParseError {
    ParseError {
        setting: setting.to_string(),
        value: value.to_string(),
        expected,
    }
}

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
        return Err(err(setting, s, EXPECTED));
    }
    let n: u64 = num.parse().map_err(|_| err(setting, s, EXPECTED))?;
    let shift = match suffix.trim() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(err(setting, s, EXPECTED)),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err(setting, s, "a size that fits in 64 bits"))
}

/// A duration: a number with a unit, `ns`, `us`, `ms`, `s` (`0` alone is allowed).
pub fn parse_duration(setting: &str, s: &str) -> Result<Duration, ParseError> {
    const EXPECTED: &str = "a duration (e.g. 0, 500us, 20ms, 2s)";
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| err(setting, s, EXPECTED))?;
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| err(setting, s, EXPECTED))?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => return Err(err(setting, s, EXPECTED)),
    };
    let secs = v * scale;
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(err(setting, s, EXPECTED));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A probability in [0, 1].
pub fn parse_rate(setting: &str, s: &str) -> Result<f64, ParseError> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| err(setting, s, "a probability between 0 and 1"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(err(setting, s, "a probability between 0 and 1"));
    }
    Ok(v)
}

/// A delay distribution: how long a new context (`--nvml-lag`) or a change of a
/// process's memory (`--nvml-mem-lag`) stays invisible to NVML.
#[derive(Debug, Clone, PartialEq)]
pub enum Lag {
    Fixed(Duration),
    /// Uniform between the two bounds.
    Uniform(Duration, Duration),
    /// Exponential with this mean: most lags short, a long tail.
    Exp(Duration),
    /// Log-normal with this median and shape sigma: a heavier tail.
    LogNormal(Duration, f64),
}

impl Lag {
    /// `100ms`, `fixed:100ms`, `uniform:20ms..200ms`, `exp:50ms`, `lognormal:50ms,0.8`.
    pub fn parse(setting: &str, s: &str) -> Result<Lag, ParseError> {
        const EXPECTED: &str =
            "a lag: DURATION, fixed:DURATION, uniform:MIN..MAX, exp:MEAN or lognormal:MEDIAN,SIGMA";
        let t = s.trim();
        let (kind, rest) = t.split_once(':').unwrap_or(("fixed", t));
        let d = |v: &str| parse_duration(setting, v).map_err(|_| err(setting, s, EXPECTED));
        match kind {
            "fixed" => Ok(Lag::Fixed(d(rest)?)),
            "uniform" => {
                let (a, b) = rest
                    .split_once("..")
                    .ok_or_else(|| err(setting, s, EXPECTED))?;
                let (a, b) = (d(a)?, d(b)?);
                if a > b {
                    return Err(err(setting, s, "a uniform lag with MIN <= MAX"));
                }
                Ok(Lag::Uniform(a, b))
            }
            "exp" => Ok(Lag::Exp(d(rest)?)),
            "lognormal" => {
                let (m, sg) = rest
                    .split_once(',')
                    .ok_or_else(|| err(setting, s, EXPECTED))?;
                let sigma: f64 = sg.trim().parse().map_err(|_| err(setting, s, EXPECTED))?;
                if !(0.0..=5.0).contains(&sigma) {
                    return Err(err(setting, s, "a lognormal SIGMA between 0 and 5"));
                }
                Ok(Lag::LogNormal(d(m)?, sigma))
            }
            _ => Err(err(setting, s, EXPECTED)),
        }
    }

    /// Draws one lag. `u1`, `u2` are independent uniforms in (0, 1).
    pub fn sample(&self, u1: f64, u2: f64) -> Duration {
        let secs = match self {
            Lag::Fixed(d) => return *d,
            Lag::Uniform(a, b) => a.as_secs_f64() + (b.as_secs_f64() - a.as_secs_f64()) * u1,
            Lag::Exp(mean) => -mean.as_secs_f64() * u1.max(1e-12).ln(),
            Lag::LogNormal(median, sigma) => {
                // Box-Muller for a standard normal.
                let z =
                    (-2.0 * u1.max(1e-12).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                median.as_secs_f64() * (sigma * z).exp()
            }
        };
        Duration::from_secs_f64(secs.clamp(0.0, 3600.0))
    }
}

/// A small deterministic RNG (xorshift64*), seedable for reproducible runs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in (0, 1).
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
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
        for bad in ["banana", "-1ms", "10", "ms", "1e400s"] {
            assert!(parse_duration("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lags() {
        assert_eq!(
            Lag::parse("x", "100ms"),
            Ok(Lag::Fixed(Duration::from_millis(100)))
        );
        assert_eq!(
            Lag::parse("x", "uniform:20ms..200ms"),
            Ok(Lag::Uniform(
                Duration::from_millis(20),
                Duration::from_millis(200)
            ))
        );
        assert!(matches!(Lag::parse("x", "exp:50ms"), Ok(Lag::Exp(_))));
        assert!(matches!(
            Lag::parse("x", "lognormal:50ms,0.8"),
            Ok(Lag::LogNormal(_, _))
        ));
        let e = Lag::parse("--nvml-lag", "banana").unwrap_err();
        assert!(e.to_string().contains("--nvml-lag") && e.to_string().contains("banana"));
        assert!(Lag::parse("x", "uniform:200ms..20ms").is_err());
        assert!(Lag::parse("x", "gauss:1ms").is_err());
    }

    #[test]
    fn samples_stay_in_their_distribution() {
        let mut r = Rng::new(7);
        let u = Lag::Uniform(Duration::from_millis(20), Duration::from_millis(200));
        let e = Lag::Exp(Duration::from_millis(50));
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let s = u.sample(r.unit(), r.unit());
            assert!(s >= Duration::from_millis(20) && s <= Duration::from_millis(200));
            sum += e.sample(r.unit(), r.unit()).as_secs_f64();
        }
        let mean = sum / 10_000.0;
        assert!((0.045..0.055).contains(&mean), "exp mean {mean}");
    }
}
