//! X.509 through rustls (ring provider), sans IO: `ServerConnection` already is a state machine
//! over byte buffers, so this is a thin adapter to [`TlsSession`].

use std::io::{self, IoSlice, Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivateSec1KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{Connection, RootCertStore, ServerConfig, ServerConnection};

use super::{dn, TlsSession};

pub(super) const CA_CERT: &str = "ca-cert.pem";
pub(super) const CA_CRL: &str = "ca-crl.pem";
pub(super) const SERVER_CERT: &str = "server-cert.pem";
pub(super) const SERVER_KEY: &str = "server-key.pem";

/// rustls' limit on records waiting for the socket (its default, stated here because the
/// session budget counts on it).
const SEND_BUFFER_LIMIT: usize = 64 * 1024;

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

pub(super) fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, String> {
    let chain = load_certs(&dir.join(SERVER_CERT))?;
    let key_path = dir.join(SERVER_KEY);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let key = match key {
        PrivateKeyDer::Sec1(k) => match unpad_sec1(k.secret_sec1_der()) {
            Some(fixed) => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(fixed)),
            None => PrivateKeyDer::Sec1(k),
        },
        other => other,
    };
    let provider = Arc::new(provider::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        // TLS 1.3 and 1.2 only (checklist §F item 78: nothing older).
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = if verify_peer {
        let ca_path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for c in load_certs(&ca_path)? {
            roots.add(c).map_err(|e| format!("{}: {e}", ca_path.display()))?;
        }
        let crl_path = dir.join(CA_CRL);
        let crls: Vec<CertificateRevocationListDer<'static>> = if crl_path.exists() {
            CertificateRevocationListDer::pem_file_iter(&crl_path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", crl_path.display()))?
        } else {
            Vec::new()
        };
        // A client without a certificate is refused, as nbdkit refuses it.
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls(crls)
            .build()
            .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", dir.join(SERVER_KEY).display()))?;
    // NBD clients reconnect rarely and each connection is long-lived: session resumption
    // would only add state (and tickets are another key to rotate).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// GnuTLS's certtool (3.7) writes about half of its EC keys with the private key octet string
/// zero-padded like an INTEGER (33 bytes for P-256), which RFC 5915 does not allow and ring
/// rejects. Re-encode such a key without the pad; `None` when the key needs no change.
fn unpad_sec1(der: &[u8]) -> Option<Vec<u8>> {
    let seq = dn::tlv(der).filter(|t| t.tag == dn::SEQUENCE)?;
    let version = dn::tlv(seq.body).filter(|t| t.tag == 0x02)?;
    let key = dn::tlv(version.rest).filter(|t| t.tag == 0x04)?;
    // P-256, P-384 and P-521 scalars (32, 48, 66 bytes) with one byte of padding.
    if !(matches!(key.body.len(), 33 | 49 | 67) && key.body[0] == 0) {
        return None;
    }
    let mut body = version.whole.to_vec();
    push_der(&mut body, 0x04, &key.body[1..]);
    body.extend_from_slice(key.rest);
    let mut out = Vec::with_capacity(body.len() + 4);
    push_der(&mut out, dn::SEQUENCE, &body);
    Some(out)
}

fn push_der(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    let len = body.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        // SEC1 keys are far below 64 KiB.
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(body);
}

/// A rustls session on either side: the server's (certificates) or the `nbd` backend's towards
/// an upstream (`client.rs`). rustls is itself sans-IO, so this only forwards.
pub(super) struct RustlsSession {
    conn: Connection,
}

impl RustlsSession {
    pub(super) fn new(config: Arc<ServerConfig>) -> Result<RustlsSession, String> {
        let mut conn = ServerConnection::new(config).map_err(|e| format!("TLS: {e}"))?;
        conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
        Ok(RustlsSession { conn: conn.into() })
    }

    /// The client side of a connection already set up by the caller.
    pub(super) fn client(conn: rustls::ClientConnection) -> RustlsSession {
        RustlsSession { conn: conn.into() }
    }
}

impl TlsSession for RustlsSession {
    fn read_tls(&mut self, rd: &mut dyn Read) -> io::Result<usize> {
        self.conn.read_tls(rd)
    }

    fn process(&mut self) -> Result<(), String> {
        self.conn.process_new_packets().map(|_| ()).map_err(|e| e.to_string())
    }

    fn wants_read(&self) -> bool {
        self.conn.wants_read()
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.reader().read(buf)
    }

    fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.conn.writer().write_vectored(bufs)
    }

    fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    fn write_tls(&mut self, wr: &mut dyn Write) -> io::Result<usize> {
        self.conn.write_tls(wr)
    }

    fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    fn peer_subject(&self) -> Option<String> {
        // Server side: only present when --tls-verify-peer asked for a certificate and it
        // chained to the CA. Client side: the upstream's certificate.
        self.conn.peer_certificates()?.first().and_then(|c| dn::subject(c))
    }

    fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    fn describe(&self) -> String {
        let version = self.conn.protocol_version().map_or("?".to_string(), |v| format!("{v:?}"));
        let suite =
            self.conn.negotiated_cipher_suite().map_or("?".to_string(), |s| format!("{:?}", s.suite()));
        let peer = match self.conn {
            Connection::Server(_) => "client",
            Connection::Client(_) => "server",
        };
        match self.peer_subject() {
            Some(s) => format!("{version} {suite}, {peer} certificate {s:?}"),
            None => format!("{version} {suite}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_sec1_keys_are_repaired() {
        // A P-256 key as certtool writes it: version 1, a 33-byte zero-padded key, then the
        // curve and public key (shortened here; they are copied as they are).
        let scalar: Vec<u8> = (0x80..0xa0).collect();
        let mut body = vec![0x02, 0x01, 0x01, 0x04, 33, 0x00];
        body.extend_from_slice(&scalar);
        body.extend_from_slice(&[0xa0, 0x02, 0x06, 0x00]);
        let mut der = vec![0x30, body.len() as u8];
        der.extend_from_slice(&body);
        let fixed = unpad_sec1(&der).expect("repaired");
        let mut want = vec![0x30, (body.len() - 1) as u8, 0x02, 0x01, 0x01, 0x04, 32];
        want.extend_from_slice(&scalar);
        want.extend_from_slice(&[0xa0, 0x02, 0x06, 0x00]);
        assert_eq!(fixed, want);
        assert_eq!(unpad_sec1(&fixed), None, "a proper key is left alone");
        assert_eq!(unpad_sec1(&[0x30, 0x00]), None);
    }
}
