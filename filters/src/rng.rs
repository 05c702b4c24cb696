//! Small deterministic randomness for the fault filters (`error`, `evil`): a seeded xorshift
//! generator, and probability parsing in the forms nbdkit accepts.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use blocksmith_core::error::ConfigError;

/// SplitMix64: turns any 64-bit value (a seed, a seed mixed with a block number) into a
/// well-spread one. Also used to derive independent streams from one seed.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A seed from the clock, for runs that did not ask to be repeatable.
pub(crate) fn time_seed() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    splitmix64(d.as_secs() ^ (u64::from(d.subsec_nanos()) << 32) ^ u64::from(std::process::id()))
}

/// xorshift64*: fast, small, and the same sequence for the same seed everywhere.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        // The state must never be zero.
        Rng(splitmix64(seed) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        p >= 1.0 || (p > 0.0 && self.next_f64() < p)
    }

    /// How many trials fail before the next success, each succeeding with probability `p`
    /// (geometric distribution): the distance to the next event among independent bits, drawn
    /// with one random number however rare the events are.
    pub(crate) fn gap(&mut self, p: f64) -> u64 {
        if p >= 1.0 {
            return 0;
        }
        if p <= 0.0 {
            return u64::MAX;
        }
        let u = self.next_f64();
        let g = (-u).ln_1p() / (-p).ln_1p();
        if g.is_finite() && g < u64::MAX as f64 {
            g as u64
        } else {
            u64::MAX
        }
    }
}

/// Parse a probability as nbdkit does: `10%`, `0.1`, `1e-8`, or a ratio `1:10` / `1/10`.
pub(crate) fn parse_probability(key: &str, value: &str) -> Result<f64, ConfigError> {
    let v = value.trim();
    let bad = || ConfigError::new(format!("{key}: could not parse probability '{value}'"));
    let p = if let Some(pct) = v.strip_suffix('%') {
        pct.trim().parse::<f64>().map_err(|_| bad())? / 100.0
    } else if let Some((a, b)) = v.split_once([':', '/']) {
        let (a, b): (f64, f64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if b == 0.0 {
            return Err(bad());
        }
        a / b
    } else {
        v.parse::<f64>().map_err(|_| bad())?
    };
    if !(0.0..=1.0).contains(&p) {
        return Err(ConfigError::new(format!(
            "{key}: probability out of range (0 to 1 or 0% to 100%): '{value}'"
        )));
    }
    Ok(p)
}

/// A trigger file given on the command line, made absolute now so that changing directory later
/// does not change what it means (nbdkit_absolute_path).
pub(crate) fn absolute(path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let (mut a, mut b, mut c) = (Rng::new(7), Rng::new(7), Rng::new(8));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(xs, (0..5).map(|_| c.next_u64()).collect::<Vec<_>>());
        assert!((0..1000).all(|_| (0.0..1.0).contains(&a.next_f64())));
    }

    #[test]
    fn gaps_have_the_right_mean() {
        let mut r = Rng::new(1);
        let n = 20000;
        let mean = (0..n).map(|_| r.gap(0.01) as f64).sum::<f64>() / n as f64;
        // Geometric mean (1 - p) / p = 99.
        assert!((90.0..110.0).contains(&mean), "{mean}");
        assert_eq!(r.gap(1.0), 0);
        assert_eq!(r.gap(0.0), u64::MAX);
        assert!(r.gap(1e-300) > 1 << 40);
    }

    #[test]
    fn probabilities() {
        assert_eq!(parse_probability("k", "10%").unwrap(), 0.1);
        assert_eq!(parse_probability("k", "0.25").unwrap(), 0.25);
        assert_eq!(parse_probability("k", "1e-8").unwrap(), 1e-8);
        assert_eq!(parse_probability("k", "1:4").unwrap(), 0.25);
        assert_eq!(parse_probability("k", "1/2").unwrap(), 0.5);
        for bad in ["", "x", "101%", "2", "-0.1", "1:0"] {
            assert!(parse_probability("k", bad).is_err(), "{bad}");
        }
    }
}
