//! TLS for NBD's STARTTLS, with nbdkit's options: `--tls=off|on|require`,
//! `--tls-certificates=DIR`, `--tls-verify-peer`, `--tls-psk=FILE`.
//!
//! A [`TlsSession`] sits between the socket and the sans-IO [`crate::conn::Conn`]: ciphertext
//! from the socket goes in with [`TlsSession::read_tls`], plaintext comes out with
//! [`TlsSession::read_plain`] into `Conn::read_buf`; the connection's replies go in with
//! [`TlsSession::write_plain`] and ciphertext comes out with [`TlsSession::write_tls`]. Sessions
//! never touch the socket by themselves and never block, so the event loop drives them exactly
//! like a plaintext connection; every buffer they keep is bounded (see
//! [`SESSION_BUDGET_BYTES`]).
//!
//! Two implementations behind the one interface:
//! - certificates (X.509): rustls with the ring provider ([`certs`]);
//! - pre-shared keys: rustls has no external-PSK support, so OpenSSL's PSK server callback,
//!   driven over in-memory buffers ([`psk`], cargo feature `psk`). GnuTLS clients (libnbd,
//!   qemu) negotiate TLS 1.3 or TLS 1.2 PSK with it.

mod certs;
pub mod client;
mod dn;
#[cfg(feature = "psk")]
mod psk;
mod pskfile;

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use dn::subject as certificate_subject;
pub use pskfile::{read_psk_file, PskKey};

/// Budget reserved (from `--memory-limit`) for each TLS session while it lives: an upper
/// estimate of what one session can hold. rustls: at most 64 KiB of unsent records (its buffer
/// limit), one 16 KiB record of received plaintext, its record deframer (~18 KiB) and
/// handshake reassembly (up to 64 KiB for a client certificate chain). OpenSSL PSK sessions:
/// two 17 KiB record buffers and our two bounded in-memory buffers (32 KiB in, 64 KiB out).
pub const SESSION_BUDGET_BYTES: usize = 192 * 1024;

/// What STARTTLS is to the server (checklist §F, item 70).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// NOTLS: STARTTLS is refused with NBD_REP_ERR_POLICY.
    #[default]
    Off,
    /// SELECTIVETLS: clients may upgrade; plaintext clients are served too.
    On,
    /// FORCEDTLS: nothing but ABORT and STARTTLS before TLS.
    Require,
}

impl TlsPolicy {
    /// nbdkit's spellings: `require`/`required`/`force`, or a boolean.
    pub fn parse(s: &str) -> Result<TlsPolicy, String> {
        match s.to_ascii_lowercase().as_str() {
            "require" | "required" | "force" => Ok(TlsPolicy::Require),
            "on" | "1" | "true" | "t" | "yes" | "y" => Ok(TlsPolicy::On),
            "off" | "0" | "false" | "f" | "no" | "n" => Ok(TlsPolicy::Off),
            _ => Err(format!("--tls: expected off, on or require, got '{s}'")),
        }
    }

    /// nbdkit's `$tls` in `--run`: 0, 1 or 2.
    pub fn as_number(self) -> u8 {
        match self {
            TlsPolicy::Off => 0,
            TlsPolicy::On => 1,
            TlsPolicy::Require => 2,
        }
    }
}

/// One connection's TLS state machine, sans IO. See the module docs for the data flow.
pub trait TlsSession {
    /// Read ciphertext from `rd` (the socket). `Ok(0)` is EOF. Call only when
    /// [`TlsSession::wants_read`].
    fn read_tls(&mut self, rd: &mut dyn Read) -> io::Result<usize>;
    /// Handshake and decrypt what `read_tls` brought in. An error is fatal: send what
    /// [`TlsSession::write_tls`] still has (the alert), then close.
    fn process(&mut self) -> Result<(), String>;
    /// Ciphertext may be read now: false while decrypted input waits to be taken (backpressure)
    /// or once the peer has closed.
    fn wants_read(&self) -> bool;
    /// Take decrypted bytes. `Ok(0)`: the peer closed the session (close_notify);
    /// `WouldBlock`: nothing decrypted yet; `UnexpectedEof`: the socket closed without
    /// close_notify.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Encrypt application bytes; returns how many were taken, 0 when the session's bounded
    /// output buffer is full (flush with `write_tls` first).
    fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Ciphertext is waiting for the socket.
    fn wants_write(&self) -> bool;
    /// Write waiting ciphertext to `wr` (the socket).
    fn write_tls(&mut self, wr: &mut dyn Write) -> io::Result<usize>;
    fn is_handshaking(&self) -> bool;
    /// The verified client certificate's subject (RFC 4514), if the client sent one.
    fn peer_subject(&self) -> Option<String>;
    /// Queue close_notify (flush with `write_tls`).
    fn send_close_notify(&mut self);
    /// Protocol, cipher and client identity, for the log once the handshake is done.
    fn describe(&self) -> String;
}

/// The server's TLS credentials, shared by every loop; makes one session per STARTTLS.
#[derive(Clone)]
pub struct ServerTls {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Certificates {
        config: Arc<rustls::ServerConfig>,
        dir: PathBuf,
        verify_peer: bool,
    },
    #[cfg(feature = "psk")]
    Psk {
        ctx: Arc<psk::PskContext>,
        file: PathBuf,
    },
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ServerTls {
    /// X.509 from an nbdkit-layout directory: `server-cert.pem` (with any intermediates),
    /// `server-key.pem`, and for `verify_peer` `ca-cert.pem` (client certificates must chain
    /// to it) and an optional `ca-crl.pem`.
    pub fn certificates(dir: &Path, verify_peer: bool) -> Result<ServerTls, String> {
        let config = certs::server_config(dir, verify_peer)?;
        Ok(ServerTls { kind: Kind::Certificates { config, dir: dir.to_path_buf(), verify_peer } })
    }

    /// Pre-shared keys from a psktool file (`username:hexkey` lines).
    #[cfg(feature = "psk")]
    pub fn psk(file: &Path) -> Result<ServerTls, String> {
        let keys = read_psk_file(file)?;
        let ctx = psk::PskContext::new(keys)?;
        Ok(ServerTls { kind: Kind::Psk { ctx: Arc::new(ctx), file: file.to_path_buf() } })
    }

    /// Without the `psk` feature there is no PSK implementation; say so rather than ignore it.
    #[cfg(not(feature = "psk"))]
    pub fn psk(file: &Path) -> Result<ServerTls, String> {
        Err(format!("--tls-psk={}: this blocksmith was built without the 'psk' feature", file.display()))
    }

    /// A fresh server-side session for one STARTTLS.
    pub fn new_session(&self) -> Result<Box<dyn TlsSession>, String> {
        match &self.kind {
            Kind::Certificates { config, .. } => Ok(Box::new(certs::RustlsSession::new(config.clone())?)),
            #[cfg(feature = "psk")]
            Kind::Psk { ctx, .. } => Ok(Box::new(psk::PskSession::new(ctx)?)),
        }
    }

    pub fn is_psk(&self) -> bool {
        !matches!(self.kind, Kind::Certificates { .. })
    }

    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Certificates { dir, verify_peer, .. } => format!(
                "X.509 certificates from {}{}",
                dir.display(),
                if *verify_peer { ", client certificates verified" } else { "" }
            ),
            #[cfg(feature = "psk")]
            Kind::Psk { file, .. } => format!("pre-shared keys from {}", file.display()),
        }
    }
}

/// nbdkit's certificate directories, in the order it tries them when `--tls-certificates` is
/// not given: `$HOME/.pki/nbdkit` and `$HOME/.config/pki/nbdkit` for ordinary users,
/// `/etc/pki/nbdkit` for root.
pub fn default_certificate_dirs() -> Vec<PathBuf> {
    // /proc/self belongs to the effective user: root without any unsafe code.
    let root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    };
    if root {
        return vec![PathBuf::from("/etc/pki/nbdkit")];
    }
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => {
            let home = PathBuf::from(h);
            vec![home.join(".pki/nbdkit"), home.join(".config/pki/nbdkit")]
        }
        _ => Vec::new(),
    }
}

/// The first default directory that holds a server certificate.
pub fn find_default_certificates() -> Result<PathBuf, String> {
    let dirs = default_certificate_dirs();
    dirs.iter().find(|d| d.join(certs::SERVER_CERT).is_file()).cloned().ok_or_else(|| {
        let tried: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        format!(
            "no TLS certificates found (looked for {} in: {}); give --tls-certificates=DIR",
            certs::SERVER_CERT,
            if tried.is_empty() { "no directory: HOME is not set".to_string() } else { tried.join(", ") }
        )
    })
}
