//! `info`: serve information about the client and the server as the disk's contents
//! (nbdkit-info-plugin). Read-only; every connection gets its own disk.
//!
//! - `exportname` (default): the export name the client asked for, verbatim.
//! - `base64exportname`: the export name, base64-decoded (arbitrary bytes from a text name).
//! - `address`: the client's address as text (`127.0.0.1:4321`, `[::1]:4321`), or `unix` for a
//!   Unix socket (the socket's path is not leaked).
//! - `time`, `uptime`, `conntime`: 12 bytes, a big-endian 64-bit count of seconds then a 32-bit
//!   count of microseconds: the wall-clock time, the time since the server started, the time
//!   since this connection opened. Recomputed on every read; read all 12 bytes at once to see a
//!   consistent value. Uptime and connection time come from a monotonic clock, so unlike nbdkit's
//!   they do not jump when the system time is set.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blocksmith_core::config::Params;
use blocksmith_core::error::Errno;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Flags, Layer, OpenCx, ParamSpec, Support,
};
use blocksmith_core::{ConfigError, NbdError};

use crate::data::decode_base64;

const NAME: &str = "info";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "read-only disk holding the export name, client address or a time (nbdkit-info-plugin)",
    magic: Some("mode"),
    params: &[ParamSpec {
        name: "mode",
        help: "exportname (default): the export name the client asked for.\n\
               base64exportname: the export name, base64-decoded.\n\
               address: the client's address and port as text ('unix' for Unix sockets).\n\
               time, uptime, conntime: wall-clock time, server uptime or connection age, as 8 bytes\n\
               of seconds then 4 of microseconds, big-endian, refreshed on every read.",
    }],
    make,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    ExportName,
    Base64ExportName,
    Address,
    Time,
    Uptime,
    ConnTime,
}

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let mode = match params.take("mode") {
        None => Mode::ExportName,
        Some(m) => match m.to_ascii_lowercase().as_str() {
            "exportname" | "export-name" => Mode::ExportName,
            "base64exportname" | "base64-export-name" => Mode::Base64ExportName,
            "address" => Mode::Address,
            "time" => Mode::Time,
            "uptime" => Mode::Uptime,
            "conntime" => Mode::ConnTime,
            _ => {
                return Err(ConfigError::new(format!(
                    "{NAME}: unknown mode '{m}' (expected exportname, base64exportname, address, \
                     time, uptime or conntime)"
                )))
            }
        },
    };
    params.finish(NAME)?;
    Ok(Arc::new(InfoFactory { mode, started: Instant::now() }))
}

/// The address as nbdkit prints it: `a.b.c.d:port`, `[v6]:port` (without a scope id), `unix`.
/// Anything else (a client on stdin) has no address: an empty disk, as nbdkit serves for an
/// address family it does not know.
fn address_text(peer: &str) -> Vec<u8> {
    if peer == "unix" {
        return b"unix".to_vec();
    }
    match peer.parse::<std::net::SocketAddr>() {
        Ok(std::net::SocketAddr::V4(a)) => format!("{}:{}", a.ip(), a.port()).into_bytes(),
        Ok(std::net::SocketAddr::V6(a)) => format!("[{}]:{}", a.ip(), a.port()).into_bytes(),
        Err(_) => Vec::new(),
    }
}

/// 8 bytes of seconds then 4 of microseconds, big-endian.
fn encode_time(d: Duration) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&d.as_secs().to_be_bytes());
    out[8..].copy_from_slice(&d.subsec_micros().to_be_bytes());
    out
}

struct InfoFactory {
    mode: Mode,
    /// For uptime: when the server was configured (nbdkit: when the plugin was loaded).
    started: Instant,
}

impl BackendFactory for InfoFactory {
    fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        let data = match self.mode {
            Mode::ExportName => cx.export_name.as_bytes().to_vec(),
            Mode::Base64ExportName => match decode_base64(&cx.export_name) {
                Ok(d) => d,
                Err(e) => return done.err(NbdError::msg(Errno::Inval, format!("{NAME}: export name: {e}"))),
            },
            Mode::Address => address_text(&cx.peer),
            Mode::Time | Mode::Uptime | Mode::ConnTime => vec![0; 12],
        };
        done.ok(Rc::new(InfoLayer { mode: self.mode, data, started: self.started, opened: Instant::now() }))
    }
}

struct InfoLayer {
    mode: Mode,
    data: Vec<u8>,
    started: Instant,
    opened: Instant,
}

impl InfoLayer {
    /// The disk's contents right now.
    fn contents(&self) -> std::borrow::Cow<'_, [u8]> {
        let t = match self.mode {
            Mode::Time => SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(),
            Mode::Uptime => self.started.elapsed(),
            Mode::ConnTime => self.opened.elapsed(),
            _ => return std::borrow::Cow::Borrowed(&self.data),
        };
        std::borrow::Cow::Owned(encode_time(t).to_vec())
    }
}

impl Layer for InfoLayer {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            // Already in memory: caching is a no-op.
            cache: Support::Native,
            // Connections with the same export name see the same disk; the other modes differ
            // between connections (or from one moment to the next).
            can_multi_conn: matches!(self.mode, Mode::ExportName | Mode::Base64ExportName),
            ..ExportInfo::read_only(self.data.len() as u64)
        }
    }

    fn pread(&self, mut buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        // The shim has checked the range against the size, which never changes.
        let start = offset as usize;
        let n = buf.len();
        buf.copy_from_slice(&self.contents()[start..start + n]);
        done.ok(buf)
    }

    fn cache(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make_err, params, run};
    use blocksmith_core::layer::{OpenCx, Stack};
    use blocksmith_core::sched::SimScheduler;

    /// Open an info backend as a client with this export name and address would.
    fn open_as(mode: &str, export: &str, peer: &str) -> Result<(Rc<SimScheduler>, Rc<dyn Layer>), NbdError> {
        let f = make(&mut params(&[("mode", mode)])).unwrap();
        let sim = SimScheduler::new();
        let mut cx = OpenCx::for_tests(sim.sched());
        cx.export_name = export.into();
        cx.peer = peer.into();
        let stack = Stack::new(("info".into(), f), vec![]);
        let layer = run(&sim, |d| stack.open(&cx, d))?;
        Ok((sim, layer))
    }

    fn read_all(mode: &str, export: &str, peer: &str) -> Vec<u8> {
        let (sim, l) = open_as(mode, export, peer).unwrap();
        let size = l.info().size as usize;
        run(&sim, |d| l.pread(vec![0; size], 0, Flags::NONE, d)).unwrap()
    }

    #[test]
    fn export_names() {
        assert_eq!(read_all("exportname", "hello", "unix"), b"hello");
        assert_eq!(read_all("EXPORT-NAME", "", "unix"), b"");
        assert_eq!(read_all("base64exportname", "aGVsbG8=", "unix"), b"hello");
        assert_eq!(read_all("base64-export-name", "", "unix"), b"");
        let e = open_as("base64exportname", "not base64!", "unix").err().unwrap();
        assert_eq!(e.errno, Errno::Inval);
        let (sim, l) = open_as("exportname", "abcdef", "unix").unwrap();
        assert_eq!(run(&sim, |d| l.pread(vec![0; 3], 2, Flags::NONE, d)).unwrap(), b"cde");
        let i = l.info();
        assert!(!i.can_write && i.can_multi_conn && !i.can_extents);
        assert_eq!(i.size, 6);
        assert_eq!(run(&sim, |d| l.pwrite(b"x".to_vec(), 0, Flags::NONE, d)).unwrap_err().errno, Errno::Perm);
    }

    #[test]
    fn addresses() {
        assert_eq!(read_all("address", "", "unix"), b"unix");
        assert_eq!(read_all("address", "", "127.0.0.1:4321"), b"127.0.0.1:4321");
        assert_eq!(read_all("address", "", "[::1]:80"), b"[::1]:80");
        assert_eq!(read_all("address", "", "[fe80::1%2]:80"), b"[fe80::1]:80");
        assert_eq!(read_all("address", "", "stdin"), b"");
        assert!(!open_as("address", "", "unix").unwrap().1.info().can_multi_conn);
    }

    #[test]
    fn times() {
        let (sim, l) = open_as("time", "", "unix").unwrap();
        assert_eq!(l.info().size, 12);
        assert!(!l.info().can_multi_conn);
        let b = run(&sim, |d| l.pread(vec![0; 12], 0, Flags::NONE, d)).unwrap();
        let secs = u64::from_be_bytes(b[..8].try_into().unwrap());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(secs <= now && now - secs < 5, "{secs} vs {now}");
        assert!(u32::from_be_bytes(b[8..].try_into().unwrap()) < 1_000_000);
        for mode in ["uptime", "conntime"] {
            let (sim, l) = open_as(mode, "", "unix").unwrap();
            let b = run(&sim, |d| l.pread(vec![0; 12], 0, Flags::NONE, d)).unwrap();
            assert_eq!(&b[..8], &[0; 8], "{mode}: a fresh server is less than a second old");
            std::thread::sleep(Duration::from_millis(20));
            let later = run(&sim, |d| l.pread(vec![0; 4], 8, Flags::NONE, d)).unwrap();
            let us = u32::from_be_bytes(later[..].try_into().unwrap());
            assert!(us >= 20_000, "{mode}: {us} µs");
        }
        assert_eq!(
            encode_time(Duration::new(0x5d8f24c7, 0x42401 * 1000)),
            [0, 0, 0, 0, 0x5d, 0x8f, 0x24, 0xc7, 0, 0x04, 0x24, 0x01]
        );
    }

    #[test]
    fn parameters() {
        assert!(make_err(&SPEC, &[("mode", "bogus")]).contains("unknown mode 'bogus'"));
        assert!(make_err(&SPEC, &[("size", "1")]).contains("unknown parameter 'size'"));
    }
}
