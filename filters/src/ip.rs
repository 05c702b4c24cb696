//! The ip filter (nbdkit-ip-filter): allow or deny clients by address.
//!
//! Rules, as in nbdkit: if the client matches anything in `allow=`, it may connect; otherwise if
//! it matches anything in `deny=`, it may not; otherwise it may. Each list is comma-separated
//! and the parameters may be repeated. Entries: `all`/`any`, `allipv4`/`anyipv4`,
//! `allipv6`/`anyipv6`, `allunix`/`anyunix`, `allvsock`/`anyvsock`, an IPv4 or IPv6 address,
//! an address with `/prefix` (CIDR), `vsock-cid:N`/`vsock-port:N` (blocksmith has no vsock
//! listener, so these never match) and `dn:SUBJECT`, the exact subject of the client's verified
//! TLS certificate. An IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`) also matches IPv4 entries.
//!
//! `pid:N`, `uid:N` and `gid:N` match the credentials of a client on a Unix socket.
//!
//! The check runs when the client connects (the server's preconnect hook), before it can
//! negotiate anything, as nbdkit does. A `dn:` rule can only be decided once TLS is up, so
//! while one could still let the client in, the decision waits for the export to be opened,
//! which then fails with EPERM (NBD_REP_ERR_POLICY) for a refused client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{FilterFactory, FilterSpec, Layer, Next, OpenCx, ParamSpec, PeerCred};

pub const SPEC: FilterSpec = FilterSpec {
    name: "ip",
    summary: "allow or deny clients by IP address, network, socket type or TLS subject",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "allow",
        help: "Comma-separated clients to allow: all, anyipv4, anyipv6, anyunix, 127.0.0.1,\n\
               10.0.0.0/8, ::1, fe80::/10, dn:SUBJECT ... Checked first.",
    },
    ParamSpec { name: "deny", help: "Comma-separated clients to deny (same forms). Checked after allow=." },
];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    Any,
    AnyV4,
    AnyV6,
    AnyUnix,
    AnyVsock,
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
    Dn(String),
    Pid(i32),
    Uid(u32),
    Gid(u32),
    /// vsock rules: accepted for compatibility; there are no vsock clients to match.
    Vsock,
}

/// Who the client is, from `OpenCx::peer`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Peer {
    Ip(IpAddr),
    Unix,
    /// `-s` (stdin) or anything else that is not a socket address.
    Other,
}

fn parse_peer(peer: &str) -> Peer {
    if peer == "unix" {
        return Peer::Unix;
    }
    if let Ok(sa) = peer.parse::<SocketAddr>() {
        return Peer::Ip(sa.ip());
    }
    match peer.parse::<IpAddr>() {
        Ok(ip) => Peer::Ip(ip),
        Err(_) => Peer::Other,
    }
}

fn parse_rule(key: &str, s: &str) -> Result<Rule, ConfigError> {
    let bad = |why: &str| ConfigError::new(format!("ip: {key}: '{s}': {why}"));
    let lower = s.to_ascii_lowercase();
    match lower.as_str() {
        "all" | "any" => return Ok(Rule::Any),
        "allipv4" | "anyipv4" => return Ok(Rule::AnyV4),
        "allipv6" | "anyipv6" => return Ok(Rule::AnyV6),
        "allunix" | "anyunix" => return Ok(Rule::AnyUnix),
        "allvsock" | "anyvsock" => return Ok(Rule::AnyVsock),
        _ => {}
    }
    if let Some(dn) = s.strip_prefix("dn:") {
        return if dn.is_empty() { Err(bad("empty TLS subject")) } else { Ok(Rule::Dn(dn.to_string())) };
    }
    if let Some(n) = lower.strip_prefix("pid:") {
        return n.parse().map(Rule::Pid).map_err(|_| bad("expected a process id"));
    }
    if let Some(n) = lower.strip_prefix("uid:") {
        return n.parse().map(Rule::Uid).map_err(|_| bad("expected a numeric user id"));
    }
    if let Some(n) = lower.strip_prefix("gid:") {
        return n.parse().map(Rule::Gid).map_err(|_| bad("expected a numeric group id"));
    }
    for prefix in ["vsock-cid:", "vsock-port:"] {
        if let Some(n) = lower.strip_prefix(prefix) {
            n.parse::<u32>().map_err(|_| bad("expected a number"))?;
            return Ok(Rule::Vsock);
        }
    }
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| bad("bad prefix length"))?)),
        None => (s, None),
    };
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => match len.unwrap_or(32) {
            l @ 0..=32 => Ok(Rule::V4(a, l)),
            _ => Err(bad("an IPv4 prefix is at most 32 bits")),
        },
        Ok(IpAddr::V6(a)) => match len.unwrap_or(128) {
            l @ 0..=128 => Ok(Rule::V6(a, l)),
            _ => Err(bad("an IPv6 prefix is at most 128 bits")),
        },
        Err(_) => Err(bad("not an address, a network or a keyword")),
    }
}

fn prefix_match(a: u128, b: u128, len: u8, bits: u8) -> bool {
    if len == 0 {
        return true;
    }
    let shift = u32::from(bits - len);
    (a >> shift) == (b >> shift)
}

impl Rule {
    fn matches(&self, peer: &Peer, cred: Option<PeerCred>, tls_subject: Option<&str>) -> bool {
        let v4 = |ip: &IpAddr| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(a) => a.to_ipv4_mapped(),
        };
        match (self, peer) {
            (Rule::Any, _) => true,
            (Rule::AnyUnix, Peer::Unix) => true,
            (Rule::AnyV4, Peer::Ip(ip)) => v4(ip).is_some(),
            (Rule::AnyV6, Peer::Ip(IpAddr::V6(_))) => true,
            (Rule::V4(net, len), Peer::Ip(ip)) => {
                v4(ip).is_some_and(|a| prefix_match(u32::from(a).into(), u32::from(*net).into(), *len, 32))
            }
            (Rule::V6(net, len), Peer::Ip(IpAddr::V6(a))) => {
                prefix_match(u128::from(*a), u128::from(*net), *len, 128)
            }
            (Rule::Dn(dn), _) => tls_subject == Some(dn.as_str()),
            (Rule::Pid(p), _) => cred.is_some_and(|c| c.pid == *p),
            (Rule::Uid(u), _) => cred.is_some_and(|c| c.uid == *u),
            (Rule::Gid(g), _) => cred.is_some_and(|c| c.gid == *g),
            _ => false,
        }
    }
}

fn rules(p: &mut Params, key: &str) -> Result<Vec<Rule>, ConfigError> {
    let mut out = Vec::new();
    for v in p.take_all(key) {
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            out.push(parse_rule(key, item)?);
        }
    }
    Ok(out)
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let allow = rules(p, "allow")?;
    let deny = rules(p, "deny")?;
    Ok(Arc::new(IpFactory { allow, deny }))
}

struct IpFactory {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl IpFactory {
    fn permitted_as(&self, peer: &str, cred: Option<PeerCred>, tls_subject: Option<&str>) -> bool {
        let p = parse_peer(peer);
        if self.allow.iter().any(|r| r.matches(&p, cred, tls_subject)) {
            return true;
        }
        !self.deny.iter().any(|r| r.matches(&p, cred, tls_subject))
    }

    #[cfg(test)]
    fn permitted(&self, peer: &str, tls_subject: Option<&str>) -> bool {
        self.permitted_as(peer, None, tls_subject)
    }

    /// Whether a TLS subject could still change the verdict (an allow rule naming one).
    fn waits_for_tls(&self) -> bool {
        self.allow.iter().any(|r| matches!(r, Rule::Dn(_)))
    }
}

impl FilterFactory for IpFactory {
    fn preconnect(&self, peer: &blocksmith_core::layer::Peer) -> Result<(), NbdError> {
        if self.waits_for_tls() || self.permitted_as(&peer.addr, peer.cred, None) {
            Ok(())
        } else {
            Err(NbdError::msg(Errno::Perm, format!("ip: client {} is not permitted", peer.addr)))
        }
    }

    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        if self.permitted_as(&cx.peer, cx.peer_cred, cx.tls_subject.as_deref()) {
            Ok(next)
        } else {
            ::log::info!("ip: client {} (connection {}) denied", cx.peer, cx.conn_id);
            Err(NbdError::msg(Errno::Perm, format!("ip: client {} is not permitted", cx.peer)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make_err, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn factory(params: &[(&str, &str)]) -> IpFactory {
        let mut p = Params::new();
        for (k, v) in params {
            p.push(*k, *v);
        }
        let f = IpFactory { allow: rules(&mut p, "allow").unwrap(), deny: rules(&mut p, "deny").unwrap() };
        assert!(p.is_empty());
        f
    }

    #[test]
    fn allow_is_checked_before_deny() {
        let f = factory(&[("allow", "127.0.0.1,::1"), ("deny", "all")]);
        assert!(f.permitted("127.0.0.1:5000", None));
        assert!(f.permitted("[::1]:5000", None));
        assert!(!f.permitted("10.1.2.3:5000", None));
        assert!(!f.permitted("unix", None));
        let f = factory(&[("deny", "8.0.0.0/8")]);
        assert!(!f.permitted("8.8.8.8:53", None));
        assert!(f.permitted("9.8.8.8:53", None));
        assert!(f.permitted("unix", None), "nothing matched: allowed");
    }

    #[test]
    fn unix_credentials_and_preconnect() {
        let me = PeerCred { pid: 42, uid: 1000, gid: 100 };
        let f = factory(&[("allow", "uid:1000"), ("deny", "anyunix")]);
        assert!(f.permitted_as("unix", Some(me), None));
        assert!(!f.permitted_as("unix", Some(PeerCred { uid: 0, ..me }), None));
        let peer = |cred| blocksmith_core::layer::Peer { addr: "unix".into(), cred, ..Default::default() };
        assert!(f.preconnect(&peer(Some(me))).is_ok());
        assert_eq!(f.preconnect(&peer(None)).unwrap_err().errno, Errno::Perm);
        // A dn: allow rule may still admit the client once TLS is up: decided at open.
        let f = factory(&[("allow", "dn:CN=good"), ("deny", "all")]);
        assert!(f.preconnect(&peer(None)).is_ok());
        let f = factory(&[("deny", "pid:42,gid:7")]);
        assert!(!f.permitted_as("unix", Some(me), None));
        assert!(f.permitted_as("unix", Some(PeerCred { pid: 1, ..me }), None));
    }

    #[test]
    fn keywords_networks_and_subjects() {
        let f = factory(&[("allow", "anyunix"), ("allow", "fe80::/10,dn:CN=good"), ("deny", "any")]);
        assert!(f.permitted("unix", None));
        assert!(f.permitted("[fe80::1]:1", None));
        assert!(!f.permitted("[fec0::1]:1", None));
        assert!(f.permitted("1.2.3.4:1", Some("CN=good")));
        assert!(!f.permitted("1.2.3.4:1", Some("CN=bad")));
        assert!(!f.permitted("stdin", None));
        let f = factory(&[("deny", "anyipv4")]);
        assert!(!f.permitted("1.2.3.4:1", None));
        assert!(!f.permitted("[::ffff:1.2.3.4]:1", None), "IPv4-mapped counts as IPv4");
        assert!(f.permitted("[2001:db8::1]:1", None));
        let f = factory(&[("deny", "10.0.0.0/24,anyipv6")]);
        assert!(!f.permitted("10.0.0.255:1", None));
        assert!(f.permitted("10.0.1.0:1", None));
        assert!(!f.permitted("[::1]:1", None));
        let f = factory(&[("deny", "0.0.0.0/0,vsock-cid:3")]);
        assert!(!f.permitted("1.1.1.1:1", None));
        assert!(f.permitted("unix", None));
    }

    #[test]
    fn refusal_is_eperm_at_open() {
        let sim = SimScheduler::new();
        let f: Arc<dyn FilterFactory> = Arc::new(factory(&[("deny", "anyunix")]));
        let mut c = cx(&sim);
        assert!(f.open(&c, Ram::new(4096)).is_ok(), "peer 'test' is not a Unix socket");
        c.peer = "unix".into();
        let e = f.open(&c, Ram::new(4096)).err().unwrap();
        assert_eq!(e.errno, Errno::Perm);
    }

    #[test]
    fn bad_rules_are_rejected() {
        assert!(make_err(&SPEC, &[("allow", "uid:alice")]).contains("numeric user id"));
        assert!(make_err(&SPEC, &[("deny", "gid:-1")]).contains("numeric group id"));
        assert!(make_err(&SPEC, &[("deny", "1.2.3.4/33")]).contains("at most 32"));
        assert!(make_err(&SPEC, &[("deny", "example.com")]).contains("not an address"));
        assert!(make_err(&SPEC, &[("allow", "dn:")]).contains("empty"));
    }
}
