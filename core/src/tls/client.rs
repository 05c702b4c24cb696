//! TLS for the client side of STARTTLS (the `nbd` backend talking to its upstream), behind the
//! same sans-IO [`TlsSession`] interface as the server side: certificates through rustls'
//! `ClientConnection`, pre-shared keys through OpenSSL's PSK client callback over in-memory
//! buffers (feature `psk`).
//!
//! Options follow nbdkit-nbd-plugin / libnbd: a certificate directory holding `ca-cert.pem`
//! (the CA the server's certificate must chain to) and optionally `client-cert.pem` and
//! `client-key.pem`; peer verification on or off; a host name to check the certificate
//! against (without one, as libnbd over a Unix socket, only the chain is checked).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::ring as provider;
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::TlsSession;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";
/// Where Debian-family systems keep the trusted CAs, for verification without a directory.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const SEND_BUFFER_LIMIT: usize = 64 * 1024;

/// The client's TLS credentials; makes one session per connection.
#[derive(Clone)]
pub struct ClientTls {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Certificates {
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        describe: String,
    },
    #[cfg(feature = "psk")]
    Psk {
        ctx: Arc<openssl::ssl::SslContext>,
        username: String,
    },
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// A private key in a form ring accepts: certtool writes some EC keys in a padded SEC1 form
/// ring refuses, so with OpenSSL at hand the key is re-encoded as PKCS#8.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    #[cfg(feature = "psk")]
    {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Ok(k) = openssl::pkey::PKey::private_key_from_pem(&pem) {
            if let Ok(der) = k.private_key_to_pkcs8() {
                return Ok(PrivateKeyDer::Pkcs8(der.into()));
            }
        }
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Checks the chain, and the name only when one was given.
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `tls-verify=false`: any certificate is accepted (the handshake signatures are still checked,
/// so the server must hold the key of the certificate it sent).
#[derive(Debug)]
struct NoVerifier(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerifier {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

impl ClientTls {
    /// X.509. `dir`: `ca-cert.pem` and optional `client-cert.pem`/`client-key.pem` (without it
    /// the system's CA bundle); `hostname`: the name the certificate must carry, or `None` to
    /// check only the chain (a Unix socket has no host name).
    pub fn certificates(
        dir: Option<&Path>,
        verify: bool,
        hostname: Option<&str>,
    ) -> Result<ClientTls, String> {
        let provider: Arc<CryptoProvider> = Arc::new(provider::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = if verify {
            let ca_path = match dir {
                Some(d) => d.join(CA_CERT),
                None => Path::new(SYSTEM_CA_BUNDLE).to_path_buf(),
            };
            let mut roots = RootCertStore::empty();
            for c in load_certs(&ca_path)? {
                roots.add(c).map_err(|e| format!("{}: {e}", ca_path.display()))?;
            }
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("{}: {e}", ca_path.display()))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainVerifier {
                inner,
                check_name: hostname.is_some(),
            }))
        } else {
            let algs = provider.signature_verification_algorithms;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerifier(algs)))
        };
        let cert = dir.map(|d| d.join(CLIENT_CERT)).filter(|p| p.is_file());
        let mut config = match cert {
            Some(cert_path) => {
                let Some(d) = dir else {
                    return Err("internal: client certificate without directory".into());
                };
                let chain = load_certs(&cert_path)?;
                let key_path = d.join(CLIENT_KEY);
                let key = load_key(&key_path)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{}: {e}", key_path.display()))?
            }
            None => builder.with_no_client_auth(),
        };
        config.resumption = rustls::client::Resumption::disabled();
        let name_text = hostname.unwrap_or("localhost");
        let name = ServerName::try_from(name_text.to_string())
            .map_err(|e| format!("tls-hostname '{name_text}': {e}"))?;
        let describe = format!(
            "X.509{}{}",
            dir.map_or(String::new(), |d| format!(" from {}", d.display())),
            if verify { "" } else { ", server certificate not verified" }
        );
        Ok(ClientTls { kind: Kind::Certificates { config: Arc::new(config), name, describe } })
    }

    /// Pre-shared key from a psktool file: the entry for `username`, or without one the entry
    /// for the login name ($LOGNAME, $USER), or else the file's first entry.
    #[cfg(feature = "psk")]
    pub fn psk(file: &Path, username: Option<&str>) -> Result<ClientTls, String> {
        let keys = super::read_psk_file(file)?;
        let login = ["LOGNAME", "USER"].iter().find_map(|v| std::env::var(v).ok());
        let key = match username {
            Some(u) => keys
                .into_iter()
                .find(|k| k.username == u)
                .ok_or_else(|| format!("{}: no key for user '{u}'", file.display()))?,
            None => {
                let pos = keys.iter().position(|k| Some(&k.username) == login.as_ref()).unwrap_or(0);
                keys.into_iter().nth(pos).ok_or_else(|| format!("{}: no keys", file.display()))?
            }
        };
        psk::context(key)
    }

    #[cfg(not(feature = "psk"))]
    pub fn psk(file: &Path, _username: Option<&str>) -> Result<ClientTls, String> {
        Err(format!("tls-psk={}: this blocksmith was built without the 'psk' feature", file.display()))
    }

    /// A fresh client session; its ClientHello is ready to be written at once.
    pub fn new_session(&self) -> Result<Box<dyn TlsSession>, String> {
        match &self.kind {
            Kind::Certificates { config, name, .. } => {
                let mut conn =
                    ClientConnection::new(config.clone(), name.clone()).map_err(|e| format!("TLS: {e}"))?;
                conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
                Ok(Box::new(super::certs::RustlsSession::client(conn)))
            }
            #[cfg(feature = "psk")]
            Kind::Psk { ctx, .. } => Ok(Box::new(crate::tls::psk::PskSession::client(ctx)?)),
        }
    }

    pub fn is_psk(&self) -> bool {
        !matches!(self.kind, Kind::Certificates { .. })
    }

    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Certificates { describe, .. } => describe.clone(),
            #[cfg(feature = "psk")]
            Kind::Psk { username, .. } => format!("pre-shared key of {username:?}"),
        }
    }
}

#[cfg(feature = "psk")]
mod psk {
    use std::sync::Arc;

    use openssl::ssl::{SslContextBuilder, SslMethod, SslVersion};

    use super::{ClientTls, Kind};
    use crate::tls::PskKey;

    use crate::tls::psk::TLS12_CIPHERS;

    pub(super) fn context(key: PskKey) -> Result<ClientTls, String> {
        let err = |e: openssl::error::ErrorStack| format!("TLS-PSK: {e}");
        let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(err)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(err)?;
        b.set_cipher_list(TLS12_CIPHERS).map_err(err)?;
        b.set_options(openssl::ssl::SslOptions::NO_TICKET);
        b.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::OFF);
        let username = key.username.clone();
        let (id, secret) = (key.username.into_bytes(), key.key);
        b.set_psk_client_callback(move |_ssl, _hint, identity, out| {
            // The identity is written NUL-terminated.
            if id.len() >= identity.len() || secret.len() > out.len() {
                return Ok(0);
            }
            identity[..id.len()].copy_from_slice(&id);
            identity[id.len()] = 0;
            out[..secret.len()].copy_from_slice(&secret);
            Ok(secret.len())
        });
        Ok(ClientTls { kind: Kind::Psk { ctx: Arc::new(b.build()), username } })
    }
}
