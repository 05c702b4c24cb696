//! The command line, nbdkit's: `blocksmith [OPTIONS] BACKEND [KEY=]VALUE... [--filter=NAME...]`.
//!
//! Options may come before or after the backend name. Arguments after the backend name that
//! are not options are parameters: `key=value`, or a bare value for the backend's magic key
//! (`memory 1G`, `file disk.img`).

use std::time::Duration;

use blocksmith_core::config::{parse_duration, parse_size, Params};
use blocksmith_core::limits;
use blocksmith_core::tls::TlsPolicy;
use blocksmith_core::ConfigError;

/// Everything the command line says.
#[derive(Debug, Default)]
pub struct Options {
    pub port: Option<String>,
    pub ipaddr: Option<String>,
    pub unix: Option<String>,
    pub single: bool,
    pub readonly: bool,
    pub foreground: bool,
    pub exportname: Option<String>,
    pub pidfile: Option<String>,
    pub oldstyle: bool,
    pub verbose: bool,
    pub version: bool,
    pub help: bool,
    pub run: Option<String>,
    pub exit_with_parent: bool,
    pub print_uri: bool,
    pub timeout: Option<Duration>,
    pub filters: Vec<String>,
    pub no_sr: bool,
    pub no_mc: bool,
    pub mask_handshake: Option<u16>,
    pub threads: Option<usize>,
    pub io_threads: Option<usize>,
    /// `--io=uring|pool`: how the file backend and the cow/cache stores do their IO.
    pub io_pool: bool,
    /// `--reply-hold`: how long replies may wait to be batched (`io::moderation`).
    pub reply_hold: Option<Duration>,
    pub memory_limit: Option<usize>,
    pub max_request: Option<u32>,
    pub ipv4_only: bool,
    pub ipv6_only: bool,
    /// `--tls` (default off).
    pub tls: TlsPolicy,
    pub tls_certificates: Option<String>,
    pub tls_psk: Option<String>,
    pub tls_verify_peer: bool,
    pub backend: Option<String>,
    /// Raw parameters after the backend name: (Some(key), value) or (None, bare value).
    pub params: Vec<(Option<String>, String)>,
}

/// Options that take a value: (long name, short letter).
const VALUED: &[(&str, Option<char>)] = &[
    ("port", Some('p')),
    ("ipaddr", Some('i')),
    ("unix", Some('U')),
    ("exportname", Some('e')),
    ("export-name", None),
    ("pidfile", Some('P')),
    ("run", None),
    ("timeout", None),
    ("filter", None),
    ("threads", Some('t')),
    ("io-threads", None),
    ("io", None),
    ("reply-hold", None),
    ("memory-limit", None),
    ("max-request", None),
    ("mask-handshake", None),
    ("log", None),
    ("debug", Some('D')),
    ("user", Some('u')),
    ("group", Some('g')),
    ("tls", None),
    ("tls-certificates", None),
    ("tls-psk", None),
];

fn long_for_short(c: char) -> Option<&'static str> {
    Some(match c {
        's' => "single",
        'r' => "readonly",
        'f' => "foreground",
        'o' => "oldstyle",
        'n' => "newstyle",
        'v' => "verbose",
        'V' => "version",
        'h' => "help",
        '4' => "ipv4-only",
        '6' => "ipv6-only",
        _ => return VALUED.iter().find(|(_, s)| *s == Some(c)).map(|(l, _)| *l),
    })
}

fn takes_value(long: &str) -> bool {
    VALUED.iter().any(|(l, _)| *l == long)
}

/// A parameter key as nbdkit accepts it; anything else before an `=` makes the whole argument a
/// bare value (so `file /tmp/a=b.img` works).
fn is_key(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

pub fn parse(args: &[String]) -> Result<Options, ConfigError> {
    let mut o = Options::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        // After the backend, a lone "-" is a value (e.g. `sh -`), not an option.
        let is_option = a.starts_with('-') && a.len() > 1 && a != "--";
        if !is_option {
            if a == "--" && o.backend.is_some() {
                continue;
            }
            if o.backend.is_none() {
                o.backend = Some(a.clone());
            } else {
                match a.split_once('=') {
                    Some((k, v)) if is_key(k) => o.params.push((Some(k.to_string()), v.to_string())),
                    _ => o.params.push((None, a.clone())),
                }
            }
            continue;
        }
        let (long, inline): (String, Option<String>) = if let Some(rest) = a.strip_prefix("--") {
            match rest.split_once('=') {
                Some((l, v)) => (l.to_string(), Some(v.to_string())),
                None => (rest.to_string(), None),
            }
        } else {
            let mut chars = a[1..].chars();
            let c = chars.next().unwrap_or('?');
            let rest: String = chars.collect();
            let long = long_for_short(c).ok_or_else(|| ConfigError::new(format!("unknown option '{a}'")))?;
            if takes_value(long) {
                (long.to_string(), if rest.is_empty() { None } else { Some(rest) })
            } else if rest.is_empty() {
                (long.to_string(), None)
            } else {
                return Err(ConfigError::new(format!("unknown option '{a}'")));
            }
        };
        let value = if takes_value(&long) {
            match inline {
                Some(v) => Some(v),
                None => {
                    let v = args
                        .get(i)
                        .cloned()
                        .ok_or_else(|| ConfigError::new(format!("option '{a}' needs a value")))?;
                    i += 1;
                    Some(v)
                }
            }
        } else {
            if inline.is_some() {
                return Err(ConfigError::new(format!("option '--{long}' takes no value")));
            }
            None
        };
        let v = value.unwrap_or_default();
        match long.as_str() {
            "port" => o.port = Some(v),
            "ipaddr" => o.ipaddr = Some(v),
            "unix" => o.unix = Some(v),
            "exportname" | "export-name" => o.exportname = Some(v),
            "pidfile" => o.pidfile = Some(v),
            "run" => o.run = Some(v),
            "timeout" => {
                o.timeout = Some(parse_duration(&v).map_err(|e| ConfigError::new(format!("--timeout: {e}")))?)
            }
            "filter" => o.filters.push(v),
            "threads" => o.threads = Some(parse_count("--threads", &v)?),
            "io-threads" => o.io_threads = Some(parse_count("--io-threads", &v)?),
            "io" => {
                o.io_pool = match v.as_str() {
                    "uring" | "io_uring" => false,
                    "pool" | "threads" => true,
                    _ => return Err(ConfigError::new(format!("--io: expected uring or pool, got '{v}'"))),
                }
            }
            "reply-hold" => {
                let d = parse_duration(&v).map_err(|e| ConfigError::new(format!("--reply-hold: {e}")))?;
                if d > limits::MAX_REPLY_HOLD {
                    return Err(ConfigError::new("--reply-hold: at most 1ms"));
                }
                o.reply_hold = Some(d);
            }
            "memory-limit" => {
                let n = parse_size(&v).map_err(|e| ConfigError::new(format!("--memory-limit: {e}")))?;
                o.memory_limit =
                    Some(usize::try_from(n).map_err(|_| ConfigError::new("--memory-limit: too large"))?);
            }
            "max-request" => {
                let n = parse_size(&v).map_err(|e| ConfigError::new(format!("--max-request: {e}")))?;
                if !(512..=(1 << 30)).contains(&n) {
                    return Err(ConfigError::new("--max-request: must be between 512 and 1G"));
                }
                o.max_request = Some(n as u32);
            }
            "mask-handshake" => {
                let n: u16 =
                    v.parse().map_err(|_| ConfigError::new(format!("--mask-handshake: bad value '{v}'")))?;
                o.mask_handshake = Some(n);
            }
            // Accepted for nbdkit compatibility; blocksmith logs to stderr and has no debug flags.
            "log" | "debug" => {}
            "user" | "group" => {
                return Err(ConfigError::new(format!(
                    "--{long} is not supported; start blocksmith as that user"
                )))
            }
            "single" | "stdin" => o.single = true,
            "readonly" | "read-only" => o.readonly = true,
            "foreground" | "no-fork" => o.foreground = true,
            "oldstyle" => o.oldstyle = true,
            "newstyle" => o.oldstyle = false,
            "verbose" => o.verbose = true,
            "version" => o.version = true,
            "help" => o.help = true,
            "exit-with-parent" => o.exit_with_parent = true,
            "print-uri" => o.print_uri = true,
            "no-sr" | "no-structured-replies" => o.no_sr = true,
            "no-mc" | "no-meta-contexts" => o.no_mc = true,
            "tls" => o.tls = TlsPolicy::parse(&v).map_err(ConfigError::new)?,
            "tls-certificates" => o.tls_certificates = Some(v),
            "tls-psk" => o.tls_psk = Some(v),
            "tls-verify-peer" => o.tls_verify_peer = true,
            "ipv4-only" => o.ipv4_only = true,
            "ipv6-only" => o.ipv6_only = true,
            _ => return Err(ConfigError::new(format!("unknown option '{a}' (see 'blocksmith --help')"))),
        }
    }
    Ok(o)
}

fn parse_count(opt: &str, v: &str) -> Result<usize, ConfigError> {
    match v.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(format!("{opt}: expected a number from 1 to 1024, got '{v}'"))),
    }
}

/// Turn raw parameters into `Params`, giving bare values to the backend's magic key.
pub fn params(o: &Options, magic: Option<&str>, backend: &str) -> Result<Params, ConfigError> {
    let mut p = Params::new();
    for (k, v) in &o.params {
        match (k, magic) {
            (Some(k), _) => p.push(k.clone(), v.clone()),
            (None, Some(m)) => p.push(m, v.clone()),
            (None, None) => {
                return Err(ConfigError::new(format!(
                    "{backend}: unexpected parameter '{v}' (expected key=value)"
                )))
            }
        }
    }
    Ok(p)
}

pub const USAGE: &str = "\
Usage: blocksmith [OPTIONS] BACKEND [[KEY=]VALUE ...] [--filter=FILTER ...]

Serve a block device over NBD. Options (nbdkit's):
  -p, --port PORT          TCP port (default 10809)
  -i, --ipaddr ADDR        listen on this address only (default: all)
  -4, -6                   listen on IPv4 / IPv6 only
  -U, --unix PATH          listen on a Unix socket ('-' = private socket in a temp dir)
  -s, --single             serve one client on stdin/stdout, then exit
  -r, --readonly           read-only export
  -f, --foreground         do not fork into the background
  -e, --exportname NAME    export name used in --run and --print-uri
  -P, --pidfile FILE       write the server's pid here once it is ready
  -o, --oldstyle           oldstyle handshake (no options, no export names)
  -n, --newstyle           newstyle handshake (the default)
      --run CMD            captive mode: run CMD with $uri, $nbd, $port, $unixsocket,
                           $exportname, $tls, $tls_certificates, $tls_psk set, stop when
                           it exits, exit with its status
      --exit-with-parent   exit when the parent process exits (implies -f)
      --print-uri          print the NBD URI to connect to
      --timeout SECS       drop clients that have not finished the handshake in time (default 10)
      --filter FILTER      stack a filter; the first given is nearest the client
      --no-sr              refuse structured replies
      --no-mc              refuse meta contexts (no block status)
      --mask-handshake N   handshake flags offered (bit 0 fixed newstyle, bit 1 no zeroes)
      --tls=off|on|require STARTTLS: refused (default), offered, or mandatory
      --tls-certificates DIR  ca-cert.pem, server-cert.pem, server-key.pem [, ca-crl.pem]
                           (default $HOME/.pki/nbdkit, $HOME/.config/pki/nbdkit, or
                           /etc/pki/nbdkit as root)
      --tls-psk FILE       pre-shared keys (psktool's username:hexkey); overrides certificates
      --tls-verify-peer    require a client certificate signed by ca-cert.pem
  -t, --threads N          event loops (default: one per core)
      --io-threads N       threads for blocking file IO (default 8)
      --io uring|pool      file IO (file backend, cow and cache stores) through io_uring
                           (default, when the kernel has it) or the thread pool
      --reply-hold TIME    while clients keep several requests in flight, hold each batch of
                           replies this long so more requests join it (default 50us; 0: never)
      --memory-limit SIZE  budget for request and reply buffers; when spent, clients wait
                           (default: 1/8 of RAM, or of the cgroup's memory limit if lower,
                           between 2 x --max-request and 16G; -v prints it)
      --max-request SIZE   largest READ/WRITE served (default 64M)
  -v, --verbose            debug messages on stderr
  -V, --version            print the version
      --help               this text; 'blocksmith BACKEND --help' and
                           'blocksmith --filter=F BACKEND --help' list parameters
";

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Options, ConfigError> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn nbdkit_style_lines() {
        let o = p(&["-f", "-p", "10810", "--filter=delay", "memory", "1G", "rdelay=100ms", "-r"]).unwrap();
        assert_eq!(o.port.as_deref(), Some("10810"));
        assert!(o.foreground && o.readonly);
        assert_eq!(o.filters, vec!["delay"]);
        assert_eq!(o.backend.as_deref(), Some("memory"));
        assert_eq!(o.params, vec![(None, "1G".to_string()), (Some("rdelay".into()), "100ms".into())]);
        let o = p(&["-U", "-", "--run", "nbdinfo $uri", "file", "/tmp/a=b.img"]).unwrap();
        assert_eq!(o.unix.as_deref(), Some("-"));
        assert_eq!(o.params, vec![(None, "/tmp/a=b.img".to_string())]);
        let o = p(&["-p10811", "sh", "-"]).unwrap();
        assert_eq!(o.port.as_deref(), Some("10811"));
        assert_eq!(o.params, vec![(None, "-".to_string())]);
    }

    #[test]
    fn tls_options() {
        let o =
            p(&["--tls=require", "--tls-certificates", "/c", "--tls-verify-peer", "memory", "1M"]).unwrap();
        assert_eq!(o.tls, TlsPolicy::Require);
        assert_eq!(o.tls_certificates.as_deref(), Some("/c"));
        assert!(o.tls_verify_peer);
        let o = p(&["--tls", "on", "--tls-psk=k.psk", "null"]).unwrap();
        assert_eq!((o.tls, o.tls_psk.as_deref()), (TlsPolicy::On, Some("k.psk")));
        assert_eq!(p(&["--tls=required", "null"]).unwrap().tls, TlsPolicy::Require);
        assert_eq!(p(&["--tls=off", "null"]).unwrap().tls, TlsPolicy::Off);
        assert_eq!(p(&["null"]).unwrap().tls, TlsPolicy::Off);
        assert!(p(&["--tls=maybe", "null"]).is_err());
        assert!(p(&["--tls-verify-peer=1", "null"]).is_err());
    }

    #[test]
    fn memory_limit() {
        assert_eq!(p(&["null"]).unwrap().memory_limit, None, "absent: sized to the machine at start-up");
        assert_eq!(p(&["--memory-limit", "256M", "null"]).unwrap().memory_limit, Some(256 << 20));
        assert_eq!(p(&["--memory-limit=1G", "null"]).unwrap().memory_limit, Some(1 << 30));
        assert!(USAGE.contains("1/8 of RAM"), "--help says how the default is computed");
    }

    #[test]
    fn reply_hold() {
        assert_eq!(p(&["null"]).unwrap().reply_hold, None, "absent: the default");
        assert_eq!(p(&["--reply-hold=0", "null"]).unwrap().reply_hold, Some(Duration::ZERO));
        assert_eq!(p(&["--reply-hold", "80us", "null"]).unwrap().reply_hold, Some(Duration::from_micros(80)));
        let e = p(&["--reply-hold=5ms", "null"]).unwrap_err().to_string();
        assert!(e.contains("at most 1ms"), "{e}");
        assert!(p(&["--reply-hold=soon", "null"]).is_err());
    }

    #[test]
    fn bad_options() {
        assert!(p(&["--bogus", "memory"]).is_err());
        assert!(p(&["-p"]).is_err());
        assert!(p(&["--threads=0", "memory"]).is_err());
        assert!(p(&["--memory-limit=lots", "memory"]).is_err());
        assert!(p(&["--readonly=1", "memory"]).is_err());
    }
}
