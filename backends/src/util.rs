//! Small helpers shared by the backends.

use blocksmith_core::config::Params;
use blocksmith_core::ConfigError;

/// Prefix a parameter error with the backend's name, so a start-up failure says who complained.
pub fn named(backend: &str, e: ConfigError) -> ConfigError {
    ConfigError::new(format!("{backend}: {}", e.0))
}

/// `size=` as nbdkit's plugins take it: optional, with suffixes, at most 2^63-1.
pub fn take_size(params: &mut Params, backend: &str) -> Result<Option<u64>, ConfigError> {
    params.take_size("size").map_err(|e| named(backend, e))
}

/// `size=` for the backends where nbdkit insists on it.
pub fn require_size(params: &mut Params, backend: &str) -> Result<u64, ConfigError> {
    take_size(params, backend)?
        .ok_or_else(|| ConfigError::new(format!("{backend}: you must give a size ([size=]SIZE)")))
}

/// True when every byte is zero. Folds fixed-size chunks so the compiler can vectorise the inner
/// loop; a byte-at-a-time `all()` with its early exit is several times slower on 32 KiB pages.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(64).all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Parse an unsigned byte the way nbdkit_parse_uint8_t (strtoul base 0) does: decimal, `0x` hex
/// or leading-`0` octal; no sign, nothing trailing, at most 255.
pub fn parse_u8(key: &str, s: &str) -> Result<u8, ConfigError> {
    let t = s.trim();
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    // from_str_radix accepts a leading '+'; strtoul would too, but a sign on a byte is a typo.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(ConfigError::new(format!("{key}: could not parse number '{s}'")));
    }
    u8::from_str_radix(digits, radix)
        .map_err(|_| ConfigError::new(format!("{key}: '{s}' is out of range (0 to 255)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 32 * 1024 + 3];
        assert!(is_zero(&v));
        assert!(is_zero(&[]));
        let last = v.len() - 1;
        v[last] = 1;
        assert!(!is_zero(&v));
        v[last] = 0;
        v[100] = 0x80;
        assert!(!is_zero(&v));
    }

    #[test]
    fn bytes() {
        assert_eq!(parse_u8("byte", "255").unwrap(), 255);
        assert_eq!(parse_u8("byte", "0").unwrap(), 0);
        assert_eq!(parse_u8("byte", "0x1F").unwrap(), 0x1f);
        assert_eq!(parse_u8("byte", "017").unwrap(), 0o17);
        assert!(parse_u8("byte", "256").unwrap_err().0.contains("out of range"));
        assert!(parse_u8("byte", "-1").is_err());
        assert!(parse_u8("byte", "+1").is_err());
        assert!(parse_u8("byte", "0x").is_err());
        assert!(parse_u8("byte", "08").is_err());
        assert!(parse_u8("byte", "").is_err());
        assert!(parse_u8("byte", "12abc").is_err());
    }
}
