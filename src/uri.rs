//! NBD URIs (the NBD project's `doc/uri.md`) for `--print-uri` and `--run`.

use std::path::Path;

/// Percent-encode everything outside the URI "unreserved" set.
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn tcp(export: &str, host: &str, port: u16) -> String {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    format!("nbd://{host}:{port}/{}", encode(export, false))
}

pub fn unix(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{}?socket={}", encode(export, false), encode(&socket.display().to_string(), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(tcp("", "localhost", 10809), "nbd://localhost:10809/");
        assert_eq!(tcp("a b", "::1", 1), "nbd://[::1]:1/a%20b");
        assert_eq!(unix("", Path::new("/tmp/x/sock")), "nbd+unix:///?socket=/tmp/x/sock");
    }
}
