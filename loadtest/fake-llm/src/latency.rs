//! Latency models: time to first token and per-chunk pacing, sampled from a seeded RNG.

use std::{str::FromStr, time::Duration};

use rand::Rng;

/// How long the fake "thinks" before its first token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatencyModel {
    /// Always the same delay (milliseconds); `Fixed(0.0)` is the default.
    Fixed(f64),
    /// Uniformly distributed between `min` and `max` milliseconds.
    Uniform { min: f64, max: f64 },
    /// Log-normal with the given median (ms) and shape `sigma` (real LLM TTFTs have a long tail).
    LogNormal { median_ms: f64, sigma: f64 },
}

impl Default for LatencyModel {
    fn default() -> Self {
        LatencyModel::Fixed(0.0)
    }
}

impl LatencyModel {
    /// Draws one delay.
    pub fn sample(&self, rng: &mut impl Rng) -> Duration {
        let ms = match *self {
            LatencyModel::Fixed(ms) => ms,
            LatencyModel::Uniform { min, max } => {
                if max > min {
                    rng.gen_range(min..max)
                } else {
                    min
                }
            }
            LatencyModel::LogNormal { median_ms, sigma } => {
                // Box-Muller: one standard normal from two uniforms (no rand_distr dependency).
                let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
                let u2: f64 = rng.r#gen();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                median_ms * (sigma * z).exp()
            }
        };
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }
}

/// Error parsing a latency model string.
#[derive(Debug, thiserror::Error)]
#[error("invalid latency model {input:?}: expected MS, uniform:MIN-MAX or lognormal:MEDIAN,SIGMA")]
pub struct LatencyParseError {
    pub input: String,
}

impl FromStr for LatencyModel {
    type Err = LatencyParseError;

    /// `50` (fixed ms), `uniform:10-80`, `lognormal:300,0.6`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LatencyParseError {
            input: s.to_string(),
        };
        let num = |t: &str| t.trim().parse::<f64>().map_err(|_| err());
        if let Some(rest) = s.strip_prefix("uniform:") {
            let (a, b) = rest.split_once('-').ok_or_else(err)?;
            Ok(LatencyModel::Uniform {
                min: num(a)?,
                max: num(b)?,
            })
        } else if let Some(rest) = s.strip_prefix("lognormal:") {
            let (a, b) = rest.split_once(',').ok_or_else(err)?;
            Ok(LatencyModel::LogNormal {
                median_ms: num(a)?,
                sigma: num(b)?,
            })
        } else {
            Ok(LatencyModel::Fixed(num(s)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The three textual forms parse; garbage does not.
    #[test]
    fn parses_forms() {
        assert_eq!(
            "50".parse::<LatencyModel>().unwrap(),
            LatencyModel::Fixed(50.0)
        );
        assert_eq!(
            "uniform:10-80".parse::<LatencyModel>().unwrap(),
            LatencyModel::Uniform {
                min: 10.0,
                max: 80.0
            }
        );
        assert_eq!(
            "lognormal:300,0.5".parse::<LatencyModel>().unwrap(),
            LatencyModel::LogNormal {
                median_ms: 300.0,
                sigma: 0.5
            }
        );
        assert!("fast".parse::<LatencyModel>().is_err());
    }

    /// Samples stay in range and the log-normal median is near the configured one.
    #[test]
    fn samples_are_plausible() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let u = LatencyModel::Uniform {
            min: 10.0,
            max: 20.0,
        };
        for _ in 0..100 {
            let d = u.sample(&mut rng).as_secs_f64() * 1000.0;
            assert!((10.0..20.0).contains(&d));
        }
        let l = LatencyModel::LogNormal {
            median_ms: 100.0,
            sigma: 0.5,
        };
        let mut v: Vec<f64> = (0..2001)
            .map(|_| l.sample(&mut rng).as_secs_f64() * 1000.0)
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = v[1000];
        assert!((80.0..125.0).contains(&median), "median {median}");
    }
}
