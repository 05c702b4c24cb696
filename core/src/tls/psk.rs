//! Pre-shared keys through OpenSSL (rustls has no external PSKs): the server's PSK callback, and
//! the session type both the server and the `nbd` backend's client use (`client.rs`). The
//! `SslStream` runs over [`Duplex`], two in-memory buffers: reading an empty one gives
//! `WouldBlock`, so OpenSSL returns WANT_READ instead of blocking and the event loop moves the
//! bytes between the buffers and the socket. Both buffers are bounded by the session's callers:
//! `read_tls` only runs while [`Duplex::IN_LIMIT`] is not reached and `write_plain` stops at
//! [`Duplex::OUT_LIMIT`].
//!
//! TLS 1.3 works through OpenSSL's compatibility path for the TLS 1.2 callback (an external
//! PSK with SHA-256, which is what GnuTLS clients use); TLS 1.2 through the PSK cipher suites.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};

use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVersion,
};

use super::{PskKey, TlsSession};

/// TLS 1.2 suites: forward-secret ECDHE-PSK first, plain PSK for old clients; AEAD and CBC
/// with AES or ChaCha20 only.
pub(super) const TLS12_CIPHERS: &str =
    "ECDHEPSK+AESGCM:ECDHEPSK+CHACHA20:PSK+AESGCM:PSK+CHACHA20:ECDHEPSK+AES:PSK+AES";

/// The shared OpenSSL context with the key table behind its callback.
pub(super) struct PskContext {
    ctx: SslContext,
    /// Where the callback leaves the client's identity: OpenSSL's own record of it is empty
    /// under TLS 1.3.
    identity: Index<Ssl, String>,
}

impl PskContext {
    pub(super) fn new(keys: Vec<PskKey>) -> Result<PskContext, String> {
        let table: HashMap<Vec<u8>, Vec<u8>> =
            keys.into_iter().map(|k| (k.username.into_bytes(), k.key)).collect();
        let err = |e: openssl::error::ErrorStack| format!("TLS-PSK: {e}");
        let identity = Ssl::new_ex_index::<String>().map_err(err)?;
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(err)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(err)?;
        b.set_cipher_list(TLS12_CIPHERS).map_err(err)?;
        // No session tickets or cache: nothing to resume, no extra state per client. No
        // renegotiation either: a client could only use it to make us spend CPU.
        b.set_options(
            SslOptions::NO_TICKET | SslOptions::CIPHER_SERVER_PREFERENCE | SslOptions::NO_RENEGOTIATION,
        );
        b.set_num_tickets(0).map_err(err)?;
        b.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::OFF);
        b.set_psk_server_callback(move |ssl, id, out| {
            let Some(id) = id else { return Ok(0) };
            match table.get(id) {
                Some(key) if key.len() <= out.len() => {
                    ssl.set_ex_data(identity, String::from_utf8_lossy(id).into_owned());
                    out[..key.len()].copy_from_slice(key);
                    Ok(key.len())
                }
                _ => {
                    // 0 = unknown identity: the handshake fails with an alert.
                    log::warn!("TLS-PSK: unknown identity {:?}", String::from_utf8_lossy(id));
                    Ok(0)
                }
            }
        });
        Ok(PskContext { ctx: b.build(), identity })
    }
}

/// In-memory transport under the `SslStream`.
#[derive(Default)]
struct Duplex {
    incoming: Vec<u8>,
    in_pos: usize,
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The socket reached EOF: reads past the buffered bytes return 0, not WouldBlock.
    eof: bool,
}

impl Duplex {
    /// Ciphertext buffered for OpenSSL: two full records, so a record split across reads can
    /// always be completed.
    const IN_LIMIT: usize = 32 * 1024;
    /// Ciphertext waiting for the socket before `write_plain` says "full".
    const OUT_LIMIT: usize = 64 * 1024;
    /// Largest plaintext handed to one `ssl_write`: one TLS record.
    const RECORD: usize = 16 * 1024;

    fn unread(&self) -> usize {
        self.incoming.len() - self.in_pos
    }
    fn unsent(&self) -> usize {
        self.outgoing.len() - self.out_pos
    }
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.unread() == 0 {
            return if self.eof { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
        }
        let n = buf.len().min(self.unread());
        buf[..n].copy_from_slice(&self.incoming[self.in_pos..self.in_pos + n]);
        self.in_pos += n;
        if self.in_pos == self.incoming.len() {
            self.incoming.clear();
            self.in_pos = 0;
        }
        Ok(n)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One TLS-PSK session over in-memory buffers, on either side: the server's (with the
/// identity its callback recorded) or the `nbd` backend's towards an upstream.
pub(super) struct PskSession {
    stream: SslStream<Duplex>,
    /// Server side: where the callback left the client's identity. `None` on the client side.
    identity: Option<Index<Ssl, String>>,
    handshaking: bool,
    failed: bool,
    closed: bool,
}

impl PskSession {
    pub(super) fn new(ctx: &PskContext) -> Result<PskSession, String> {
        let mut ssl = Ssl::new(&ctx.ctx).map_err(|e| format!("TLS-PSK: {e}"))?;
        ssl.set_accept_state();
        let stream = SslStream::new(ssl, Duplex::default()).map_err(|e| format!("TLS-PSK: {e}"))?;
        Ok(PskSession {
            stream,
            identity: Some(ctx.identity),
            handshaking: true,
            failed: false,
            closed: false,
        })
    }

    /// The client side, for a context whose PSK client callback supplies the key. The
    /// ClientHello is produced at once, ready for `write_tls`.
    pub(super) fn client(ctx: &SslContext) -> Result<PskSession, String> {
        let mut ssl = Ssl::new(ctx).map_err(|e| format!("TLS-PSK: {e}"))?;
        ssl.set_connect_state();
        let stream = SslStream::new(ssl, Duplex::default()).map_err(|e| format!("TLS-PSK: {e}"))?;
        let mut s = PskSession { stream, identity: None, handshaking: true, failed: false, closed: false };
        s.handshake()?;
        Ok(s)
    }

    fn handshake(&mut self) -> Result<(), String> {
        if !self.handshaking || self.failed {
            return Ok(());
        }
        match self.stream.do_handshake() {
            Ok(()) => {
                self.handshaking = false;
                Ok(())
            }
            Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => Ok(()),
            Err(_) if self.stream.get_ref().eof && self.identity.is_none() => {
                self.failed = true;
                Err("the server closed the connection during the TLS handshake".into())
            }
            Err(_) if self.stream.get_ref().eof => {
                // The client went away mid-handshake: an EOF (`read_plain` says so), not a
                // failure worth a warning, as with rustls.
                self.failed = true;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(describe_error(&e))
            }
        }
    }
}

fn describe_error(e: &openssl::ssl::Error) -> String {
    match e.ssl_error() {
        Some(stack) => stack.to_string(),
        None => e.to_string(),
    }
}

impl TlsSession for PskSession {
    fn read_tls(&mut self, rd: &mut dyn Read) -> io::Result<usize> {
        let d = self.stream.get_mut();
        let room = Duplex::IN_LIMIT.saturating_sub(d.unread());
        if room == 0 {
            return Err(io::Error::other("TLS input buffer full"));
        }
        let mut chunk = [0u8; 16 * 1024];
        let want = room.min(chunk.len());
        let n = rd.read(&mut chunk[..want])?;
        if n == 0 {
            d.eof = true;
        } else {
            d.incoming.extend_from_slice(&chunk[..n]);
        }
        Ok(n)
    }

    fn process(&mut self) -> Result<(), String> {
        self.handshake()
    }

    fn wants_read(&self) -> bool {
        let d = self.stream.get_ref();
        !self.failed && !self.closed && !d.eof && d.unread() < Duplex::IN_LIMIT
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.handshaking {
            self.handshake().map_err(io::Error::other)?;
            if self.handshaking {
                return Err(if self.failed || self.stream.get_ref().eof {
                    io::ErrorKind::UnexpectedEof.into()
                } else {
                    io::ErrorKind::WouldBlock.into()
                });
            }
        }
        if buf.is_empty() {
            return Ok(0);
        }
        match self.stream.ssl_read(buf) {
            Ok(n) => Ok(n),
            Err(e) => match e.code() {
                ErrorCode::ZERO_RETURN => {
                    self.closed = true;
                    Ok(0)
                }
                ErrorCode::WANT_READ | ErrorCode::WANT_WRITE => Err(io::ErrorKind::WouldBlock.into()),
                _ if self.stream.get_ref().eof => Err(io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    self.failed = true;
                    Err(io::Error::other(describe_error(&e)))
                }
            },
        }
    }

    fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.handshaking || self.failed {
            return Ok(0);
        }
        let mut total = 0;
        for b in bufs {
            let mut done = 0;
            while done < b.len() {
                if self.stream.get_ref().unsent() >= Duplex::OUT_LIMIT {
                    return Ok(total);
                }
                let end = (done + Duplex::RECORD).min(b.len());
                match self.stream.ssl_write(&b[done..end]) {
                    Ok(n) => {
                        done += n;
                        total += n;
                    }
                    Err(e) => {
                        self.failed = true;
                        return if total > 0 { Ok(total) } else { Err(io::Error::other(describe_error(&e))) };
                    }
                }
            }
        }
        Ok(total)
    }

    fn wants_write(&self) -> bool {
        self.stream.get_ref().unsent() > 0
    }

    fn write_tls(&mut self, wr: &mut dyn Write) -> io::Result<usize> {
        let d = self.stream.get_mut();
        let n = wr.write(&d.outgoing[d.out_pos..])?;
        d.out_pos += n;
        if d.out_pos == d.outgoing.len() {
            d.outgoing.clear();
            d.out_pos = 0;
        } else if d.out_pos > Duplex::OUT_LIMIT {
            // Keep the buffer from growing when the socket drains slowly.
            d.outgoing.drain(..d.out_pos);
            d.out_pos = 0;
        }
        Ok(n)
    }

    fn is_handshaking(&self) -> bool {
        self.handshaking
    }

    fn peer_subject(&self) -> Option<String> {
        // A PSK client has no certificate; its identity is in `describe`.
        None
    }

    fn send_close_notify(&mut self) {
        if !self.handshaking && !self.failed {
            // Writes the alert into the outgoing buffer; the peer's reply is not awaited.
            let _ = self.stream.shutdown();
        }
    }

    fn describe(&self) -> String {
        let ssl = self.stream.ssl();
        let cipher = ssl.current_cipher().map_or("?", |c| c.name());
        match self.identity {
            Some(index) => {
                let id = ssl.ex_data(index).map_or("?", |s| s.as_str());
                format!("{} {cipher}, PSK identity {id:?}", ssl.version_str())
            }
            None => format!("{} {cipher}, PSK", ssl.version_str()),
        }
    }
}
