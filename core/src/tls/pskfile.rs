//! psktool's key file: one `username:hexkey` per line, as GnuTLS (and so nbdkit, qemu and
//! libnbd) reads it. Blank lines are skipped; anything else malformed is an error at start-up
//! rather than a key that silently never matches.

use std::fmt;
use std::path::Path;

/// One user's key. The key is kept out of `Debug` output so it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct PskKey {
    pub username: String,
    pub key: Vec<u8>,
}

impl fmt::Debug for PskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PskKey {{ username: {:?}, key: <{} bytes> }}", self.username, self.key.len())
    }
}

/// Longest identity TLS can carry in a PSK handshake (RFC 4279: 2^16-1 bytes) is far more than
/// any client sends; OpenSSL caps identities at 128 bytes, and so do we.
const MAX_USERNAME: usize = 128;
/// OpenSSL's PSK buffer is 256 bytes.
const MAX_KEY: usize = 256;

pub fn read_psk_file(path: &Path) -> Result<Vec<PskKey>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--tls-psk: {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("--tls-psk: {}: {e}", path.display()))
}

fn parse(text: &str) -> Result<Vec<PskKey>, String> {
    let mut keys: Vec<PskKey> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let (user, hex) =
            line.split_once(':').ok_or_else(|| format!("line {n}: expected username:hexkey"))?;
        if user.is_empty() || user.len() > MAX_USERNAME {
            return Err(format!("line {n}: the username must be 1 to {MAX_USERNAME} bytes"));
        }
        let key = decode_hex(hex.trim()).ok_or_else(|| format!("line {n}: the key is not hexadecimal"))?;
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(format!("line {n}: the key must be 1 to {MAX_KEY} bytes"));
        }
        // GnuTLS uses the first line for a user; later duplicates are ignored the same way.
        if keys.iter().any(|k| k.username == user) {
            log::warn!("--tls-psk: line {n}: user {user:?} appears again; the first key is used");
            continue;
        }
        keys.push(PskKey { username: user.to_string(), key });
    }
    if keys.is_empty() {
        return Err("no keys in the file (expected username:hexkey lines, as psktool writes)".into());
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psktool_format() {
        let k = parse("alice:00ff10\n\nbob:ABCD\r\nalice:11\n").unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(k[0], PskKey { username: "alice".into(), key: vec![0, 0xff, 0x10] });
        assert_eq!(k[1].key, vec![0xab, 0xcd]);
        assert!(!format!("{:?}", k[0]).contains("ff"), "keys stay out of Debug output");
    }

    #[test]
    fn malformed() {
        assert!(parse("").is_err());
        assert!(parse("alice").is_err());
        assert!(parse(":00").is_err());
        assert!(parse("alice:0").is_err());
        assert!(parse("alice:zz").is_err());
        assert!(parse("alice:").is_err());
        assert!(parse("alice:é0").is_err());
    }
}
