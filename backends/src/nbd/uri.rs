//! Where the upstream server is: `socket=`, `hostname=`/`port=`, or an NBD URI (the NBD
//! project's `doc/uri.md`), parsed here rather than through a URI library because the format is
//! small and its rules (percent-decoded export path, required `socket=` for Unix, report unknown
//! query parameters) are specific.

use std::path::PathBuf;

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A Linux abstract socket name (a URI `socket=` starting with `%00`), without the NUL.
    Abstract(Vec<u8>),
    Tcp {
        host: String,
        port: u16,
    },
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Abstract(n) => write!(f, "unix:@{}", String::from_utf8_lossy(n)),
            Addr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Addr::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// An address and the export named in a URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: Addr,
    pub export: String,
    pub tls: UriTls,
}

/// What an `nbds` URI says about TLS (libnbd's query parameters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UriTls {
    /// The scheme was `nbds` / `nbds+unix`: TLS is required.
    pub required: bool,
    pub certificates: Option<String>,
    pub psk_file: Option<String>,
    pub verify: Option<bool>,
    pub hostname: Option<String>,
    /// The userinfo (`nbds://alice@host`): the PSK user name.
    pub username: Option<String>,
}

/// A port: a number, or the service name `nbd`.
pub fn parse_port(s: &str) -> Result<u16, String> {
    let t = s.trim();
    if t == "nbd" {
        return Ok(DEFAULT_PORT);
    }
    match t.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("port '{s}' is not a port number (1-65535) or 'nbd'")),
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode `%XX` escapes (nothing else: `+` is a plus sign in a URI path).
fn percent_decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let pair = b.get(i + 1).and_then(|&h| hex(h)).zip(b.get(i + 2).and_then(|&l| hex(l)));
            match pair {
                Some((h, l)) => out.push(h << 4 | l),
                None => return Err(format!("bad percent escape in '{s}'")),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn decode_string(s: &str, what: &str) -> Result<String, String> {
    String::from_utf8(percent_decode(s)?).map_err(|_| format!("{what} is not UTF-8 once decoded"))
}

/// Parse `nbd://[user@]host[:port][/export]` or `nbd+unix:///[export]?socket=PATH`.
pub fn parse_uri(uri: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("uri '{uri}': {why}");
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("not a URI (no '://')"))?;
    let (unix, required) = match scheme.to_ascii_lowercase().as_str() {
        "nbd" => (false, false),
        "nbd+unix" => (true, false),
        "nbds" => (false, true),
        "nbds+unix" => (true, true),
        "nbd+vsock" | "nbds+vsock" => return Err(bad("vsock is not supported by this backend")),
        other => return Err(bad(&format!("unknown scheme '{other}' (use nbd:// or nbd+unix://)"))),
    };
    if rest.contains('#') {
        return Err(bad("fragments (#) are not allowed"));
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i..]),
        None => (before_query, ""),
    };
    // The path minus its leading '/' is the export ("nbd://h//x" names "/x").
    let export =
        decode_string(path.strip_prefix('/').unwrap_or(path), "the export name").map_err(|e| bad(&e))?;

    let mut socket = None;
    let mut tls = UriTls { required, ..UriTls::default() };
    for kv in query.into_iter().flat_map(|q| q.split('&')).filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "socket" if unix => socket = Some(percent_decode(v).map_err(|e| bad(&e))?),
            "socket" => return Err(bad("socket= is only for nbd+unix:// URIs")),
            "tls-certificates" => tls.certificates = Some(decode_string(v, k).map_err(|e| bad(&e))?),
            "tls-psk-file" => tls.psk_file = Some(decode_string(v, k).map_err(|e| bad(&e))?),
            "tls-hostname" => tls.hostname = Some(decode_string(v, k).map_err(|e| bad(&e))?),
            "tls-verify-peer" => {
                let b = blocksmith_core::config::parse_bool(&decode_string(v, k).map_err(|e| bad(&e))?)
                    .map_err(|e| bad(&format!("tls-verify-peer: {e}")))?;
                tls.verify = Some(b);
            }
            k if k.starts_with("tls") => {
                return Err(bad(&format!("{k}: TLS query parameter not supported by this backend")));
            }
            k => return Err(bad(&format!("unknown query parameter '{k}'"))),
        }
    }

    // Userinfo is the TLS (PSK) user name.
    let hostport = match authority.rsplit_once('@') {
        Some((user, h)) => {
            if required && !user.is_empty() {
                tls.username = Some(decode_string(user, "the user name").map_err(|e| bad(&e))?);
            }
            h
        }
        None => authority,
    };
    if unix {
        if !hostport.is_empty() {
            return Err(bad("nbd+unix URIs take no host (write nbd+unix:///export?socket=PATH)"));
        }
        let s = socket.ok_or_else(|| bad("nbd+unix URIs need ?socket=PATH"))?;
        let addr = match s.split_first() {
            None => return Err(bad("socket= is empty")),
            Some((0, name)) => Addr::Abstract(name.to_vec()),
            Some(_) => {
                use std::os::unix::ffi::OsStringExt;
                Addr::Unix(PathBuf::from(std::ffi::OsString::from_vec(s)))
            }
        };
        return Ok(Target { addr, export, tls });
    }
    let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(|| bad("unterminated [IPv6 address]"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => parse_port(p).map_err(|e| bad(&e))?,
    };
    let host = decode_string(&host, "the host").map_err(|e| bad(&e))?;
    // libnbd's default for an empty host.
    let host = if host.is_empty() { "localhost".to_string() } else { host };
    Ok(Target { addr: Addr::Tcp { host, port }, export, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> Target {
        Target { addr: Addr::Tcp { host: host.into(), port }, export: export.into(), tls: UriTls::default() }
    }

    #[test]
    fn tcp_uris() {
        assert_eq!(parse_uri("nbd://example.com"), Ok(tcp("example.com", 10809, "")));
        assert_eq!(parse_uri("nbd://example.com/"), Ok(tcp("example.com", 10809, "")));
        assert_eq!(parse_uri("nbd://h:1234/disk"), Ok(tcp("h", 1234, "disk")));
        assert_eq!(parse_uri("NBD://h//disk"), Ok(tcp("h", 10809, "/disk")));
        assert_eq!(parse_uri("nbd://h/hello%20world+x"), Ok(tcp("h", 10809, "hello world+x")));
        assert_eq!(parse_uri("nbd://[::1]:99/x"), Ok(tcp("::1", 99, "x")));
        assert_eq!(parse_uri("nbd://[::1]"), Ok(tcp("::1", 10809, "")));
        assert_eq!(parse_uri("nbd://user@h:7/"), Ok(tcp("h", 7, "")));
        assert_eq!(parse_uri("nbd://"), Ok(tcp("localhost", 10809, "")));
        assert_eq!(parse_uri("nbd://h:nbd"), Ok(tcp("h", 10809, "")));
        for bad in [
            "nbd://h:0",
            "nbd://h:99999",
            "nbd://h:x",
            "nbd://[::1",
            "nbd://[::1]x",
            "nbd://h/%zz",
            "nbd://h/%ff",
            "nbd://h?socket=/x",
            "nbd://h/#frag",
            "nbd+vsock:///2",
            "http://h",
            "h:10809",
            "nbd://h?tls-type=psk",
            "nbd://h?frob=1",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn unix_uris() {
        assert_eq!(
            parse_uri("nbd+unix:///?socket=/tmp/s"),
            Ok(Target { addr: Addr::Unix("/tmp/s".into()), export: String::new(), tls: UriTls::default() })
        );
        assert_eq!(
            parse_uri("nbd+unix:///my%2Fdisk?socket=/tmp/a%20b"),
            Ok(Target {
                addr: Addr::Unix("/tmp/a b".into()),
                export: "my/disk".into(),
                tls: UriTls::default()
            })
        );
        assert_eq!(
            parse_uri("nbd+unix:///?socket=%00abs"),
            Ok(Target {
                addr: Addr::Abstract(b"abs".to_vec()),
                export: String::new(),
                tls: UriTls::default()
            })
        );
        assert!(parse_uri("nbd+unix:///").is_err());
        assert!(parse_uri("nbd+unix:///?socket=").is_err());
        assert!(parse_uri("nbd+unix://host/?socket=/s").is_err());
    }

    #[test]
    fn tls_uris() {
        let t = parse_uri("nbds+unix:///d?socket=/s&tls-certificates=/c%20d&tls-verify-peer=false").unwrap();
        assert_eq!(t.addr, Addr::Unix("/s".into()));
        assert_eq!(t.export, "d");
        let want = UriTls {
            required: true,
            certificates: Some("/c d".into()),
            verify: Some(false),
            ..UriTls::default()
        };
        assert_eq!(t.tls, want);
        let t = parse_uri("nbds://alice@h:7/x?tls-psk-file=/k&tls-hostname=srv").unwrap();
        assert_eq!(t.addr, Addr::Tcp { host: "h".into(), port: 7 });
        assert_eq!(t.tls.username.as_deref(), Some("alice"));
        assert_eq!(t.tls.psk_file.as_deref(), Some("/k"));
        assert_eq!(t.tls.hostname.as_deref(), Some("srv"));
        assert!(t.tls.required);
        // Plain nbd:// records the parameters without requiring TLS (the caller refuses them).
        assert!(!parse_uri("nbd://h?tls-certificates=/d").unwrap().tls.required);
        assert!(parse_uri("nbds://h?tls-verify-peer=maybe").is_err());
        assert!(parse_uri("nbds://h?tls-type=x").is_err());
        assert!(parse_uri("nbds+vsock:///2").is_err());
    }

    #[test]
    fn ports_and_display() {
        assert_eq!(parse_port("10809"), Ok(10809));
        assert_eq!(parse_port("nbd"), Ok(10809));
        assert!(parse_port("-1").is_err());
        assert_eq!(Addr::Tcp { host: "::1".into(), port: 5 }.to_string(), "[::1]:5");
        assert_eq!(Addr::Unix("/s".into()).to_string(), "unix:/s");
    }
}
