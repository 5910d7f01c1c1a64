//! Parsing of rates and lag distributions, shared by flags and environment variables.
//! Every error names the setting and the value. Sizes and durations are `vigil_units`'
//! grammar.

use std::time::Duration;
use vigil_units::{parse_duration, ParseError};

fn err(setting: &str, value: &str, expected: &'static str) -> ParseError {
    ParseError::new(setting, value, expected)
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
