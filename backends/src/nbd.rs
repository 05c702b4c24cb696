//! `nbd`: a proxy to another NBD server (nbdkit-nbd-plugin), as a nonblocking client on the
//! event loop — no thread per connection, no blocking call on the loop.
//!
//! - [`uri`]: where the upstream is (`socket=`, `hostname=`/`port=`, `uri=`, `command=`).
//! - [`machine`]: the client side of the protocol without IO (handshake, requests, incremental
//!   reply decoding), tested with byte scripts.
//! - [`lane`]: one upstream connection on the loop: connect, watch, reconnect with backoff.
//! - [`pool`]: each loop's upstream connections, capped, shared by clients beyond the cap.
//! - [`command`]: `command=`, an upstream server we start with socket activation.
//!
//! What the upstream advertises becomes this layer's `ExportInfo`: size, the transmission flags
//! (write, flush, FUA, trim, zero, fast zero, cache, multi-conn, rotational), block sizes and
//! description; block status is passed through when `base:allocation` was negotiated. A client
//! request becomes one upstream request (trim, zero and cache longer than a compact header can
//! carry are split; block status is cut, as a reply may describe less than asked).
//!
//! Differences from nbdkit's plugin: connections are per event loop and capped (see `pool`);
//! a dropped upstream connection is re-established automatically with backoff; requests made
//! while it is down fail at once with EIO instead of waiting; no vsock, `socket-fd=` or
//! `dynamic-export=`.
//!
//! TLS towards the upstream (`tls=`, `tls-certificates=`, `tls-verify=`, `tls-hostname=`,
//! `tls-username=`, `tls-psk=`, and `nbds://` URIs): after the greeting the lane sends
//! NBD_OPT_STARTTLS and, once acknowledged, runs a sans-IO client session
//! ([`blocksmith_core::tls::client`]: rustls for certificates, OpenSSL for PSK) between the
//! socket and the machine; the rest of the handshake and all requests go through it.

pub mod command;
pub mod lane;
pub mod machine;
pub mod pool;
pub mod uri;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::NbdError;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, BlockSize, Done, ExportInfo, Extents, Flags, Layer, OpenCx, ParamSpec,
    Support,
};
use blocksmith_core::proto::*;
use blocksmith_core::ConfigError;

use blocksmith_core::tls::client::ClientTls;
use lane::{Lane, Waiter};
use machine::{Op, TlsMode, UpstreamInfo};
use pool::{pool_for, Pool};
use uri::{parse_port, parse_uri, Addr, DEFAULT_PORT};

const NAME: &str = "nbd";

/// Default cap on upstream connections per event loop.
pub const DEFAULT_MAX_UPSTREAM: usize = 4;
/// Highest `max-upstream=` accepted.
const MAX_MAX_UPSTREAM: usize = 1024;
/// Without NBD_INFO_BLOCK_SIZE the spec tells clients to keep payloads to 32 MiB.
const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Longest trim/zero/cache/block status sent in one compact request: under 4 GiB and a multiple
/// of every legal minimum block size (a power of two up to 64 KiB), so the pieces of an aligned
/// request stay aligned.
const MAX_EFFECT: u64 = 0xffff_0000;

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "proxy to another NBD server, nonblocking, with pooled upstream connections (nbdkit-nbd-plugin)",
    magic: Some("uri"),
    params: &[
        ParamSpec {
            name: "uri",
            help: "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (the export name is\n\
                   the percent-decoded path). nbds:// and nbds+unix:// imply tls=require and take\n\
                   tls-certificates=DIR, tls-psk-file=FILE, tls-verify-peer=, tls-hostname= query\n\
                   parameters (and USER@ for the PSK user name). nbd+vsock:// is not supported.",
        },
        ParamSpec { name: "socket", help: "Unix socket of the upstream server." },
        ParamSpec { name: "hostname", help: "TCP host of the upstream server." },
        ParamSpec { name: "port", help: "TCP port with hostname= (default 10809)." },
        ParamSpec { name: "export", help: "Upstream export name (default \"\"); not with uri=." },
        ParamSpec {
            name: "command",
            help: "Run this upstream server ourselves (with arg=, repeated, for its arguments),\n\
                   handing it a listening Unix socket by systemd socket activation\n\
                   (LISTEN_FDS), as nbdkit does; e.g. command=qemu-nbd arg=-f arg=qcow2 arg=/abs/disk.\n\
                   Started at the first client, killed at shutdown. Implies shared=true; with\n\
                   several event loops each opens its own connection, so the command must accept\n\
                   that many (qemu-nbd: arg=-e arg=0) or run blocksmith with --threads=1.",
        },
        ParamSpec { name: "arg", help: "One argument for command= (repeat for more)." },
        ParamSpec {
            name: "shared",
            help: "false (default, as nbdkit): each client gets an upstream connection of its own\n\
                   while the loop holds fewer than max-upstream, then shares the least used one;\n\
                   idle connections close. true: every client on a loop shares `connections`\n\
                   connections, opened at the first client and kept.",
        },
        ParamSpec {
            name: "retry",
            help: "A client's open waits for up to N more connection attempts, one second apart,\n\
                   if the upstream cannot be reached (default 0, as nbdkit).",
        },
        ParamSpec {
            name: "connections",
            help: "(blocksmith) Upstream connections one client's requests may be spread over\n\
                   when the upstream advertises multi-conn (default 1). With shared=true, the\n\
                   number of connections each loop opens. At most max-upstream.",
        },
        ParamSpec {
            name: "max-upstream",
            help: "(blocksmith) Most upstream connections per event loop (default 4), however\n\
                   many clients connect: at most max-upstream x --threads in total.",
        },
        ParamSpec {
            name: "tls",
            help: "off (default), on (STARTTLS, plaintext if the upstream refuses) or require.",
        },
        ParamSpec {
            name: "tls-certificates",
            help: "Directory with ca-cert.pem (the CA the upstream's certificate must chain to)\n\
                   and optionally client-cert.pem and client-key.pem (default: system CAs).",
        },
        ParamSpec {
            name: "tls-verify",
            help: "true (default): verify the upstream's certificate; false: accept any.",
        },
        ParamSpec {
            name: "tls-hostname",
            help: "Name the upstream's certificate must carry (default: hostname=; over a Unix\n\
                   socket, only the chain is checked).",
        },
        ParamSpec { name: "tls-username", help: "PSK user name (default: the login name)." },
        ParamSpec {
            name: "tls-psk",
            help: "psktool key file (USER:HEXKEY lines): TLS with a pre-shared key.",
        },
    ],
    make,
};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The backend's configuration, shared by every loop.
pub struct Config {
    /// Keys this backend's pool on each loop.
    pub id: u64,
    pub addr: Addr,
    pub export: String,
    pub shared: bool,
    pub connections: usize,
    pub max_upstream: usize,
    pub retry: u32,
    pub command: Option<command::CommandServer>,
    /// `tls=`; with anything but off, `tls` holds the credentials.
    pub tls_mode: TlsMode,
    pub tls: Option<ClientTls>,
    /// Connected to ready ([`lane::HANDSHAKE_TIMEOUT`]; shorter in tests).
    pub handshake_timeout: std::time::Duration,
}

impl Config {
    pub fn addr_text(&self) -> String {
        self.addr.to_string()
    }
}

fn err(msg: impl std::fmt::Display) -> ConfigError {
    ConfigError::new(format!("{NAME}: {msg}"))
}

fn take_count(params: &mut Params, key: &str, default: usize, max: usize) -> Result<usize, ConfigError> {
    match params.take(key) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(err(format!("{key}: '{v}' is not a number from 1 to {max}"))),
        },
    }
}

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    Ok(Arc::new(NbdFactory { cfg: Arc::new(configure(params)?) }))
}

fn configure(params: &mut Params) -> Result<Config, ConfigError> {
    for (key, why) in [
        ("vsock", "vsock is not supported"),
        ("socket-fd", "socket-fd= is not supported"),
        ("dynamic-export", "dynamic-export= is not supported; every client gets export="),
    ] {
        if params.take(key).is_some() {
            return Err(err(why));
        }
    }
    let mut tls = TlsParams {
        mode: params.take("tls").map(|t| parse_tls_mode(&t)).transpose().map_err(err)?,
        certificates: params.take("tls-certificates"),
        verify: params.take_bool("tls-verify").map_err(err)?,
        hostname: params.take("tls-hostname"),
        username: params.take("tls-username"),
        psk: params.take("tls-psk"),
    };
    let uri = params.take("uri");
    let socket = params.take("socket");
    let hostname = params.take("hostname");
    let port = params.take("port");
    let export = params.take("export");
    let command = params.take("command");
    let args = params.take_all("arg");
    let shared = params.take_bool("shared").map_err(err)?;
    let retry = match params.take("retry") {
        None => 0,
        Some(v) => v.trim().parse::<u32>().map_err(|_| err(format!("retry: '{v}' is not a number")))?,
    };
    let max_upstream = take_count(params, "max-upstream", DEFAULT_MAX_UPSTREAM, MAX_MAX_UPSTREAM)?;
    let connections = take_count(params, "connections", 1, MAX_MAX_UPSTREAM)?;
    params.finish(NAME)?;

    let given = [uri.is_some(), socket.is_some(), hostname.is_some(), command.is_some()];
    match given.iter().filter(|g| **g).count() {
        0 => {
            return Err(err("give one of uri=, socket=, hostname= or command= (see 'blocksmith nbd --help')"))
        }
        1 => {}
        _ => return Err(err("give only one of uri=, socket=, hostname= and command=")),
    }
    if port.is_some() && hostname.is_none() {
        return Err(err("port= goes with hostname="));
    }
    if !args.is_empty() && command.is_none() {
        return Err(err("arg= goes with command="));
    }
    if connections > max_upstream {
        return Err(err(format!("connections={connections} is more than max-upstream={max_upstream}")));
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut server = None;
    let (addr, export) = if let Some(u) = uri {
        if export.is_some() {
            return Err(err("export= cannot be combined with uri= (put the export in the URI)"));
        }
        let t = parse_uri(u.trim()).map_err(err)?;
        tls.merge_uri(&t.tls).map_err(err)?;
        (t.addr, t.export)
    } else if let Some(s) = socket {
        (Addr::Unix(s.into()), export.unwrap_or_default())
    } else if let Some(host) = hostname {
        let port = match port {
            Some(p) => parse_port(&p).map_err(err)?,
            None => DEFAULT_PORT,
        };
        (Addr::Tcp { host, port }, export.unwrap_or_default())
    } else if let Some(program) = command {
        if shared == Some(false) {
            return Err(err("command= implies shared=true"));
        }
        let s = command::CommandServer::new(program, args, id);
        let addr = Addr::Unix(s.socket());
        server = Some(s);
        (addr, export.unwrap_or_default())
    } else {
        return Err(err("no upstream given"));
    };
    if export.len() > MAX_STRING_LEN {
        return Err(err("the export name is longer than 4096 bytes"));
    }
    let shared = shared.unwrap_or(server.is_some());
    let (tls_mode, tls) = tls.build(&addr).map_err(err)?;
    Ok(Config {
        id,
        addr,
        export,
        shared,
        connections,
        max_upstream,
        retry,
        command: server,
        tls_mode,
        tls,
        handshake_timeout: lane::HANDSHAKE_TIMEOUT,
    })
}

/// nbdkit-nbd-plugin's `tls=` values.
fn parse_tls_mode(s: &str) -> Result<TlsMode, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "require" | "required" | "force" => Ok(TlsMode::Require),
        "on" | "1" | "true" | "t" | "yes" | "y" | "allow" => Ok(TlsMode::On),
        "off" | "0" | "false" | "f" | "no" | "n" | "disable" => Ok(TlsMode::Off),
        _ => Err(format!("tls={s}: expected off, on or require")),
    }
}

/// The `tls-*` parameters, merged with what an `nbds://` URI said.
#[derive(Debug, Default)]
struct TlsParams {
    mode: Option<TlsMode>,
    certificates: Option<String>,
    verify: Option<bool>,
    hostname: Option<String>,
    username: Option<String>,
    psk: Option<String>,
}

impl TlsParams {
    /// An `nbds` URI implies tls=require; its query parameters fill what was not given
    /// directly (a conflicting direct parameter is an error).
    fn merge_uri(&mut self, u: &uri::UriTls) -> Result<(), String> {
        if u.required {
            if matches!(self.mode, Some(m) if m != TlsMode::Require) {
                return Err("an nbds:// URI requires TLS: tls= must be require (or left out)".into());
            }
            self.mode = Some(TlsMode::Require);
        } else if u.certificates.is_some() || u.psk_file.is_some() {
            return Err("TLS query parameters need an nbds:// or nbds+unix:// URI".into());
        }
        fn merge<T: Clone + PartialEq>(
            slot: &mut Option<T>,
            v: &Option<T>,
            what: &str,
        ) -> Result<(), String> {
            match (slot.as_ref(), v) {
                (Some(a), Some(b)) if a != b => Err(format!("{what} given twice with different values")),
                (None, Some(b)) => {
                    *slot = Some(b.clone());
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        merge(&mut self.certificates, &u.certificates, "tls-certificates")?;
        merge(&mut self.psk, &u.psk_file, "tls-psk")?;
        merge(&mut self.verify, &u.verify, "tls-verify")?;
        merge(&mut self.hostname, &u.hostname, "tls-hostname")?;
        merge(&mut self.username, &u.username, "tls-username")?;
        Ok(())
    }

    fn build(self, addr: &Addr) -> Result<(TlsMode, Option<ClientTls>), String> {
        let mode = self.mode.unwrap_or_default();
        if mode == TlsMode::Off {
            return Ok((mode, None));
        }
        if let Some(psk) = &self.psk {
            if self.certificates.is_some() {
                return Err("give tls-psk= or tls-certificates=, not both".into());
            }
            let c = ClientTls::psk(std::path::Path::new(psk), self.username.as_deref())?;
            return Ok((mode, Some(c)));
        }
        // libnbd checks the host name it connected to; over a Unix socket only the chain.
        let host = self.hostname.or_else(|| match addr {
            Addr::Tcp { host, .. } => Some(host.clone()),
            _ => None,
        });
        let dir = self.certificates.as_deref().map(std::path::Path::new);
        let c = ClientTls::certificates(dir, self.verify.unwrap_or(true), host.as_deref())?;
        Ok((mode, Some(c)))
    }
}

/// The configured backend.
pub struct NbdFactory {
    cfg: Arc<Config>,
}

impl BackendFactory for NbdFactory {
    fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        if let Some(c) = &self.cfg.command {
            if let Err(e) = c.ensure_started() {
                return done.err(e);
            }
        }
        let pool = pool_for(&self.cfg, &cx.sched, &cx.budget);
        let Some(lane) = pool.acquire(&[]) else {
            return done.err(NbdError::io("internal error: no upstream connection available"));
        };
        lane.add_user();
        let cfg = self.cfg.clone();
        let primary = lane.clone();
        lane.wait_ready(Box::new(move |r: Result<UpstreamInfo, NbdError>| match r {
            Ok(info) => {
                let layer = NbdLayer::new(cfg, pool, primary, &info);
                layer.spread();
                done.ok(Rc::new(layer))
            }
            Err(e) => {
                primary.remove_user();
                done.err(e)
            }
        }));
    }
}

/// What this layer advertises, from what the upstream does.
pub fn export_info(u: &UpstreamInfo) -> ExportInfo {
    let has = |bit: u16| u.flags & bit != 0;
    let can_flush = has(FLAG_SEND_FLUSH);
    let zero = has(FLAG_SEND_WRITE_ZEROES);
    let block_size = match u.block_size {
        Some((minimum, preferred, maximum)) => BlockSize { minimum, preferred, maximum },
        None => BlockSize { minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_PAYLOAD },
    };
    ExportInfo {
        size: u.size,
        can_write: !has(FLAG_READ_ONLY),
        can_flush,
        // Without FUA upstream, the shim's write-then-flush gives the same guarantee.
        fua: if has(FLAG_SEND_FUA) {
            Support::Native
        } else if can_flush {
            Support::Emulate
        } else {
            Support::None
        },
        can_trim: has(FLAG_SEND_TRIM),
        zero: if zero { Support::Native } else { Support::Emulate },
        can_fast_zero: zero && has(FLAG_SEND_FAST_ZERO),
        can_extents: u.extents,
        cache: if has(FLAG_SEND_CACHE) { Support::Native } else { Support::None },
        can_multi_conn: has(FLAG_CAN_MULTI_CONN),
        is_rotational: has(FLAG_ROTATIONAL),
        block_size: Some(block_size),
        description: u.description.clone(),
    }
}

/// One client's proxy.
pub struct NbdLayer(Rc<Inner>);

struct Inner {
    cfg: Arc<Config>,
    pool: Rc<Pool>,
    /// The upstream connections this client's requests go to: one, or with multi-conn up to
    /// `connections`.
    lanes: RefCell<Vec<Rc<Lane>>>,
    info: ExportInfo,
    closed: Cell<bool>,
}

impl NbdLayer {
    fn new(cfg: Arc<Config>, pool: Rc<Pool>, primary: Rc<Lane>, info: &UpstreamInfo) -> NbdLayer {
        NbdLayer(Rc::new(Inner {
            cfg,
            pool,
            lanes: RefCell::new(vec![primary]),
            info: export_info(info),
            closed: Cell::new(false),
        }))
    }

    /// With multi-conn upstream, every connection sees every other's writes once flushed, so a
    /// client may use several: take up to `connections` lanes. Without it, a client must stay
    /// on one connection or a FLUSH would not cover its own writes.
    fn spread(&self) {
        let i = &self.0;
        if !i.info.can_multi_conn {
            return;
        }
        let want = if i.cfg.shared { i.pool.cap() } else { i.cfg.connections };
        while i.lanes.borrow().len() < want {
            let current = i.lanes.borrow().clone();
            let Some(lane) = i.pool.acquire(&current) else { break };
            lane.add_user();
            lane.wake();
            i.lanes.borrow_mut().push(lane);
        }
    }
}

/// Wire command flags for layer flags.
fn wire_flags(f: Flags) -> u16 {
    let mut w = 0;
    if f.contains(Flags::FUA) {
        w |= CMD_FLAG_FUA;
    }
    if f.contains(Flags::REQ_ONE) {
        w |= CMD_FLAG_REQ_ONE;
    }
    if f.contains(Flags::FAST_ZERO) {
        w |= CMD_FLAG_FAST_ZERO;
    }
    w
}

impl Inner {
    /// A payload over the upstream's maximum block size must not be sent: the spec lets the
    /// server drop the connection for it. The server above never asks for one (it advertises
    /// our maximum); a filter might.
    fn check_payload(&self, len: usize) -> Result<(), NbdError> {
        let max = match self.info.block_size.map_or(0, |b| b.maximum) {
            0 => u32::MAX,
            m => m,
        };
        if len as u64 > u64::from(max) {
            return Err(NbdError::inval(format!(
                "{len}-byte request is over the upstream's maximum block size of {max}"
            )));
        }
        Ok(())
    }

    /// The ready lane with the fewest requests in flight.
    fn pick(&self) -> Option<Rc<Lane>> {
        let lanes = self.lanes.borrow();
        if lanes.len() == 1 {
            return lanes.first().filter(|l| l.is_ready()).cloned();
        }
        lanes.iter().filter(|l| l.is_ready()).min_by_key(|l| l.in_flight()).cloned()
    }

    fn send(&self, op: Op, offset: u64, flags: u16, w: Waiter) {
        if self.closed.get() {
            return w.fail(NbdError::io("connection is closed"));
        }
        match self.pick() {
            Some(lane) => lane.submit(op, offset, flags, w),
            None => w.fail(NbdError::io(format!(
                "upstream {} is not connected (reconnecting)",
                self.cfg.addr_text()
            ))),
        }
    }

    /// A trim, zero or cache in pieces a compact request can carry, one after another.
    fn send_chunked(self: &Rc<Self>, op: fn(u32) -> Op, count: u64, offset: u64, flags: u16, done: Done<()>) {
        let n = count.min(MAX_EFFECT);
        let rest = count - n;
        // n ≤ MAX_EFFECT < 2^32.
        let piece = op(n as u32);
        if rest == 0 {
            return self.send(piece, offset, flags, Waiter::Unit(done));
        }
        let me = self.clone();
        let next = Done::new(move |r: Result<(), NbdError>| match r {
            Ok(()) => me.send_chunked(op, rest, offset + n, flags, done),
            Err(e) => done.err(e),
        });
        self.send(piece, offset, flags, Waiter::Unit(next));
    }

    fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        let lanes = std::mem::take(&mut *self.lanes.borrow_mut());
        for l in lanes {
            l.remove_user();
        }
    }
}

impl Drop for NbdLayer {
    fn drop(&mut self) {
        // The server always calls close(); this covers a stack whose open failed above us.
        self.0.close();
    }
}

impl Layer for NbdLayer {
    fn info(&self) -> ExportInfo {
        self.0.info.clone()
    }

    fn pread(&self, buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        if let Err(e) = self.0.check_payload(buf.len()) {
            return done.err(e);
        }
        self.0.send(Op::Read(buf), offset, 0, Waiter::Data(done))
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        if let Err(e) = self.0.check_payload(data.len()) {
            return done.err(e);
        }
        self.0.send(Op::Write(data), offset, wire_flags(flags) & CMD_FLAG_FUA, Waiter::Unit(done))
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        self.0.send(Op::Flush, 0, 0, Waiter::Unit(done))
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        self.0.send_chunked(Op::Trim, count, offset, wire_flags(flags) & CMD_FLAG_FUA, done)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let mut w = wire_flags(flags) & (CMD_FLAG_FUA | CMD_FLAG_FAST_ZERO);
        if !flags.contains(Flags::MAY_TRIM) {
            w |= CMD_FLAG_NO_HOLE;
        }
        self.0.send_chunked(Op::Zero, count, offset, w, done)
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        // A reply may describe less than was asked; the client asks again from where it ends.
        let n = count.min(MAX_EFFECT) as u32;
        self.0.send(Op::BlockStatus(n), offset, wire_flags(flags) & CMD_FLAG_REQ_ONE, Waiter::Extents(done))
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        self.0.send_chunked(Op::Cache, count, offset, 0, done)
    }

    fn close(&self) {
        self.0.close()
    }
}

#[cfg(test)]
mod tests;
