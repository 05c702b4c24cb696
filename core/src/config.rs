//! Parameter parsing shared by every backend and filter: the `key=value` list from the command
//! line, sizes with suffixes, booleans and durations, each with a clear error.

use std::time::Duration;

use crate::error::ConfigError;

/// The `key=value` parameters given after the backend name, in order. Filters take their own
/// keys; what is left belongs to the backend, which must take all of it.
#[derive(Clone, Debug, Default)]
pub struct Params {
    items: Vec<(String, String)>,
}

impl Params {
    pub fn new() -> Self {
        Params::default()
    }
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.items.push((key.into(), value.into()));
    }
    /// Remove and return the last value given for `key` (later ones override earlier ones).
    pub fn take(&mut self, key: &str) -> Option<String> {
        let mut found = None;
        self.items.retain(|(k, v)| {
            if k == key {
                found = Some(v.clone());
                false
            } else {
                true
            }
        });
        found
    }
    /// Remove and return every value given for a repeatable `key`, in order.
    pub fn take_all(&mut self, key: &str) -> Vec<String> {
        let mut found = Vec::new();
        self.items.retain(|(k, v)| {
            if k == key {
                found.push(v.clone());
                false
            } else {
                true
            }
        });
        found
    }
    /// Take a required key.
    pub fn require(&mut self, key: &str) -> Result<String, ConfigError> {
        self.take(key).ok_or_else(|| ConfigError::new(format!("missing required parameter {key}=")))
    }
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.take(key).map(|v| parse_size(&v).map_err(|e| keyed(key, e))).transpose()
    }
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.take(key).map(|v| parse_bool(&v).map_err(|e| keyed(key, e))).transpose()
    }
    pub fn take_duration(&mut self, key: &str) -> Result<Option<Duration>, ConfigError> {
        self.take(key).map(|v| parse_duration(&v).map_err(|e| keyed(key, e))).transpose()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.items.iter().map(|(k, _)| k.as_str())
    }
    /// Fail if anything is left: an unknown parameter is an error, never silently ignored.
    pub fn finish(&self, layer: &str) -> Result<(), ConfigError> {
        match self.items.first() {
            None => Ok(()),
            Some((k, _)) => Err(ConfigError::new(format!(
                "{layer}: unknown parameter '{k}' (see 'blocksmith {layer} --help')"
            ))),
        }
    }
}

fn keyed(key: &str, e: ConfigError) -> ConfigError {
    ConfigError::new(format!("{key}: {}", e.0))
}

/// Parse a size: a number with an optional suffix (b, s = 512 B sectors, k/K, m/M, g/G, t/T,
/// p/P, e/E, powers of 1024; an optional trailing `B`/`iB` is accepted), as nbdkit_parse_size.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(ConfigError::new(format!("could not parse size '{s}'")));
    }
    let n: u64 = t[..digits_end].parse().map_err(|_| ConfigError::new(format!("size '{s}' is too large")))?;
    let suffix = &t[digits_end..];
    let mult: u64 = match suffix {
        "" | "b" | "B" => 1,
        "s" | "S" => 512,
        "k" | "K" | "KiB" | "kiB" | "KB" | "kB" => 1 << 10,
        "m" | "M" | "MiB" | "MB" => 1 << 20,
        "g" | "G" | "GiB" | "GB" => 1 << 30,
        "t" | "T" | "TiB" | "TB" => 1 << 40,
        "p" | "P" | "PiB" | "PB" => 1 << 50,
        "e" | "E" | "EiB" | "EB" => 1 << 60,
        _ => return Err(ConfigError::new(format!("could not parse size '{s}': unknown suffix '{suffix}'"))),
    };
    let v = n.checked_mul(mult).ok_or_else(|| ConfigError::new(format!("size '{s}' is too large")))?;
    if v > i64::MAX as u64 {
        return Err(ConfigError::new(format!("size '{s}' is too large (at most 2^63-1)")));
    }
    Ok(v)
}

/// Parse a boolean the way nbdkit does: 1/true/yes/on and 0/false/no/off.
pub fn parse_bool(s: &str) -> Result<bool, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "y" | "t" => Ok(true),
        "0" | "false" | "no" | "off" | "n" | "f" | "" => Ok(false),
        _ => Err(ConfigError::new(format!("could not parse boolean '{s}'"))),
    }
}

/// Parse a duration: a number (integer or decimal) with an optional unit: `s` (default),
/// `ms`, `us`, `ns`, `m` (minutes), `h`.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let t = s.trim();
    let num_end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    let v: f64 = num.parse().map_err(|_| ConfigError::new(format!("could not parse duration '{s}'")))?;
    let secs = match unit.trim() {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "ns" => v / 1e9,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        u => return Err(ConfigError::new(format!("could not parse duration '{s}': unknown unit '{u}'"))),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(ConfigError::new(format!("duration '{s}' is out of range")));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("2s").unwrap(), 1024);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("9223372036854775807").unwrap(), i64::MAX as u64);
        assert!(parse_size("9223372036854775808").is_err());
        assert!(parse_size("8E").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn params_take_and_finish() {
        let mut p = Params::new();
        p.push("size", "1M");
        p.push("a", "1");
        p.push("a", "2");
        assert_eq!(p.take_size("size").unwrap(), Some(1 << 20));
        assert_eq!(p.take("a").as_deref(), Some("2"));
        assert!(p.finish("x").is_ok());
        p.push("bogus", "1");
        assert!(p.finish("memory").unwrap_err().0.contains("bogus"));
    }
}
