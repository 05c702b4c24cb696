//! NBD URIs (the NBD project's `doc/uri.md`) for `--print-uri` and `--run`.
//!
//! With `--tls=require` the scheme is `nbds`/`nbds+unix` and, as nbdkit does, the query tells
//! libnbd where the client's credentials are: `tls-certificates=DIR` or `tls-psk-file=FILE`
//! (libnbd ≥ 1.10 reads them; qemu ignores them). For PSK we also put the file's first user in
//! the URI (`nbds://alice@host/`), which nbdkit does not: without it libnbd would present the
//! local login name as the PSK identity, which the file rarely holds.

use std::path::Path;

/// What the URI says about TLS.
pub enum Tls<'a> {
    /// Plaintext (`--tls=off`, or `on` where plaintext clients are served).
    Plain,
    /// `--tls=require` with certificates in this directory.
    Certificates(&'a Path),
    /// `--tls=require` with pre-shared keys.
    Psk { file: &'a Path, user: Option<&'a str> },
}

impl Tls<'_> {
    fn scheme(&self, base: &str) -> String {
        match self {
            Tls::Plain => base.to_string(),
            _ => base.replacen("nbd", "nbds", 1),
        }
    }

    fn userinfo(&self) -> String {
        match self {
            Tls::Psk { user: Some(u), .. } => format!("{}@", encode(u, false)),
            _ => String::new(),
        }
    }

    fn query(&self) -> Option<String> {
        match self {
            Tls::Plain => None,
            Tls::Certificates(d) => {
                Some(format!("tls-certificates={}", encode(&d.display().to_string(), true)))
            }
            Tls::Psk { file, .. } => {
                Some(format!("tls-psk-file={}", encode(&file.display().to_string(), true)))
            }
        }
    }
}

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

pub fn tcp(export: &str, host: &str, port: u16, tls: &Tls<'_>) -> String {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    let mut u = format!("{}://{}{host}:{port}/{}", tls.scheme("nbd"), tls.userinfo(), encode(export, false));
    if let Some(q) = tls.query() {
        u.push('?');
        u.push_str(&q);
    }
    u
}

pub fn unix(export: &str, socket: &Path, tls: &Tls<'_>) -> String {
    let mut u = format!(
        "{}://{}/{}?socket={}",
        tls.scheme("nbd+unix"),
        tls.userinfo(),
        encode(export, false),
        encode(&socket.display().to_string(), true)
    );
    if let Some(q) = tls.query() {
        u.push('&');
        u.push_str(&q);
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(tcp("", "localhost", 10809, &Tls::Plain), "nbd://localhost:10809/");
        assert_eq!(tcp("a b", "::1", 1, &Tls::Plain), "nbd://[::1]:1/a%20b");
        assert_eq!(unix("", Path::new("/tmp/x/sock"), &Tls::Plain), "nbd+unix:///?socket=/tmp/x/sock");
    }

    #[test]
    fn tls_uris() {
        let certs = Tls::Certificates(Path::new("/etc/my pki"));
        assert_eq!(
            tcp("", "localhost", 10809, &certs),
            "nbds://localhost:10809/?tls-certificates=/etc/my%20pki"
        );
        assert_eq!(
            unix("e", Path::new("/s"), &certs),
            "nbds+unix:///e?socket=/s&tls-certificates=/etc/my%20pki"
        );
        let psk = Tls::Psk { file: Path::new("/k/keys.psk"), user: Some("alice") };
        assert_eq!(unix("", Path::new("/s"), &psk), "nbds+unix://alice@/?socket=/s&tls-psk-file=/k/keys.psk");
        assert_eq!(tcp("", "h", 1, &psk), "nbds://alice@h:1/?tls-psk-file=/k/keys.psk");
        let anon = Tls::Psk { file: Path::new("/k"), user: None };
        assert_eq!(tcp("", "h", 1, &anon), "nbds://h:1/?tls-psk-file=/k");
    }
}
