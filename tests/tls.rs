//! TLS (STARTTLS) end to end: real clients (nbdinfo, nbdcopy, qemu-img, gnutls-cli) with
//! X.509 certificates and pre-shared keys, refusals that must leave the server serving others,
//! and raw-wire checks of the option rules under `--tls=require` and of the STARTTLS state
//! reset, with a rustls client driving the TLS part.
//!
//! Keys and certificates are made at test time (certtool, openssl, psktool from gnutls-bin and
//! openssl) in each test's temporary directory; none is committed.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw;
use common::{run, run_ok, tool, Server, TempDir};

const MIB: usize = 1 << 20;

const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const FLAG_SEND_DF: u16 = 1 << 7;

// ---------------------------------------------------------------------------------------------
// Keys and certificates
// ---------------------------------------------------------------------------------------------

/// A CA, a server certificate for localhost, a client certificate for alice signed by the CA,
/// and a rogue CA with a client certificate of its own, laid out as nbdkit, libnbd and qemu
/// expect (`ca-cert.pem`, `server-cert.pem`/`server-key.pem`, `client-cert.pem`/
/// `client-key.pem`):
/// - `srv/`: the server's directory;
/// - `cli/`: a client that trusts the CA and has no certificate;
/// - `alice/`: a client with a certificate signed by the CA;
/// - `mallory/`: a client whose certificate the rogue CA signed;
/// - `untrusting/`: a client that trusts only the rogue CA.
struct Pki {
    dir: TempDir,
}

fn certtool(dir: &Path, args: &[&str], template: Option<&str>) {
    let mut cmd = tool("certtool");
    cmd.current_dir(dir).args(args);
    if let Some(t) = template {
        let path = dir.join("template.info");
        fs::write(&path, t).expect("write certtool template");
        cmd.arg("--template").arg(&path);
    }
    run_ok(&mut cmd);
}

fn copy(from: &Path, to: &Path) {
    fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new("pki");
        let d = dir.path();
        let key =
            |name: &str| certtool(d, &["--generate-privkey", "--key-type=ecdsa", "--outfile", name], None);
        for k in ["ca-key.pem", "server-key.pem", "client-key.pem", "rogue-key.pem", "mallory-key.pem"] {
            key(k);
        }
        let ca = "cn = blocksmith test CA\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 2\n";
        certtool(
            d,
            &["--generate-self-signed", "--load-privkey", "ca-key.pem", "--outfile", "ca-cert.pem"],
            Some(ca),
        );
        certtool(
            d,
            &["--generate-self-signed", "--load-privkey", "rogue-key.pem", "--outfile", "rogue-cert.pem"],
            Some("cn = rogue CA\nca\ncert_signing_key\nexpiration_days = 2\n"),
        );
        let sign = |key: &str, out: &str, ca: &str, template: &str| {
            let (ca_cert, ca_key) = (format!("{ca}-cert.pem"), format!("{ca}-key.pem"));
            certtool(
                d,
                &[
                    "--generate-certificate",
                    "--load-privkey",
                    key,
                    "--load-ca-certificate",
                    &ca_cert,
                    "--load-ca-privkey",
                    &ca_key,
                    "--outfile",
                    out,
                ],
                Some(template),
            );
        };
        sign(
            "server-key.pem",
            "server-cert.pem",
            "ca",
            "organization = blocksmith\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n\
             tls_www_server\nsigning_key\nexpiration_days = 2\n",
        );
        sign(
            "client-key.pem",
            "client-cert.pem",
            "ca",
            "country = GB\norganization = Example\ncn = alice\ntls_www_client\nsigning_key\nexpiration_days = 2\n",
        );
        sign(
            "mallory-key.pem",
            "mallory-cert.pem",
            "rogue",
            "cn = mallory\ntls_www_client\nsigning_key\nexpiration_days = 2\n",
        );
        let layout: &[(&str, &[(&str, &str)])] = &[
            (
                "srv",
                &[
                    ("ca-cert.pem", "ca-cert.pem"),
                    ("server-cert.pem", "server-cert.pem"),
                    ("server-key.pem", "server-key.pem"),
                ],
            ),
            ("cli", &[("ca-cert.pem", "ca-cert.pem")]),
            (
                "alice",
                &[
                    ("ca-cert.pem", "ca-cert.pem"),
                    ("client-cert.pem", "client-cert.pem"),
                    ("client-key.pem", "client-key.pem"),
                ],
            ),
            (
                "mallory",
                &[
                    ("ca-cert.pem", "ca-cert.pem"),
                    ("mallory-cert.pem", "client-cert.pem"),
                    ("mallory-key.pem", "client-key.pem"),
                ],
            ),
            ("untrusting", &[("rogue-cert.pem", "ca-cert.pem")]),
        ];
        for (sub, files) in layout {
            fs::create_dir_all(d.join(sub)).expect("mkdir");
            for (from, to) in *files {
                copy(&d.join(from), &d.join(sub).join(to));
            }
        }
        Pki { dir }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.join(sub)
    }

    fn arg(&self, sub: &str) -> String {
        self.path(sub).display().to_string()
    }
}

/// A psktool key file with users alice and bob; returns (file, alice's hex key).
fn psk_file(dir: &Path) -> (PathBuf, String) {
    let file = dir.join("keys.psk");
    for user in ["alice", "bob"] {
        run_ok(tool("psktool").arg("-u").arg(user).arg("-p").arg(&file));
    }
    let text = fs::read_to_string(&file).expect("read keys.psk");
    let key =
        text.lines().find_map(|l| l.strip_prefix("alice:")).expect("alice in keys.psk").trim().to_string();
    (file, key)
}

fn tls_uri(srv: &Server, query: &str) -> String {
    format!("nbds+unix:///?socket={}&{query}", srv.socket_path().display())
}

fn psk_uri(srv: &Server, user: &str, file: &Path) -> String {
    format!("nbds+unix://{user}@/?socket={}&tls-psk-file={}", srv.socket_path().display(), file.display())
}

/// qemu's image options for a TLS connection over the server's socket, with its `--object`.
fn qemu_tls(srv: &Server, object: &str) -> (String, String) {
    (
        object.to_string(),
        format!("driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost", srv.socket_path().display()),
    )
}

// ---------------------------------------------------------------------------------------------
// A raw NBD client over any byte stream, so the same code speaks before and after STARTTLS
// ---------------------------------------------------------------------------------------------

struct Wire<S: Read + Write> {
    s: S,
}

impl<S: Read + Write> Wire<S> {
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
        self.s.flush().expect("flush");
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        b
    }

    fn opt(&mut self, code: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&raw::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.recv(20);
        let magic = u64::from_be_bytes(h[..8].try_into().unwrap());
        assert_eq!(magic, raw::OPT_REPLY_MAGIC, "option reply magic");
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (opt, typ, self.recv(len as usize))
    }

    fn expect(&mut self, code: u32, data: &[u8], want: u32) -> Vec<u8> {
        self.opt(code, data);
        let (opt, typ, d) = self.reply();
        assert_eq!((opt, typ), (code, want), "reply to option {code}: {:?}", String::from_utf8_lossy(&d));
        d
    }

    /// GO to the default export: the transmission flags.
    fn go(&mut self) -> u16 {
        self.opt(raw::OPT_GO, &raw::Conn::info_data("", &[]));
        let mut flags = None;
        loop {
            let (opt, typ, d) = self.reply();
            assert_eq!(opt, raw::OPT_GO);
            match typ {
                raw::REP_INFO if d[..2] == [0, 0] => flags = Some(u16::from_be_bytes([d[10], d[11]])),
                raw::REP_INFO => {}
                raw::REP_ACK => return flags.expect("NBD_INFO_EXPORT"),
                t => panic!("GO failed: {t:#x} {:?}", String::from_utf8_lossy(&d)),
            }
        }
    }
}

fn connect(srv: &Server) -> Wire<UnixStream> {
    let s = UnixStream::connect(srv.socket_path()).expect("connect");
    s.set_read_timeout(Some(raw::IO_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(raw::IO_TIMEOUT)).expect("timeout");
    let mut w = Wire { s };
    let g = w.recv(18);
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    w.send(&(raw::CFLAG_FIXED_NEWSTYLE | raw::CFLAG_NO_ZEROES).to_be_bytes());
    w
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, UnixStream>;

/// STARTTLS on `w` (expecting the ACK), then a rustls handshake trusting `ca`.
fn starttls(mut w: Wire<UnixStream>, ca: &Path) -> Wire<TlsStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    w.expect(raw::OPT_STARTTLS, &[], raw::REP_ACK);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(c.expect("CA certificate")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut s = rustls::StreamOwned::new(conn, w.s);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("TLS handshake");
    }
    Wire { s }
}

/// The server has closed `w`: EOF (or a reset) within `limit`, with nothing more sent.
fn assert_closed<S: Read + Write>(w: &mut Wire<S>, limit: Duration) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    match w.s.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("server sent {n} more bytes: {:02x?}", &buf[..n]),
    }
    assert!(start.elapsed() <= limit, "closed only after {:?}", start.elapsed());
}

fn assert_nbdinfo_ok(uri: &str) -> common::Output {
    let out = run_ok(tool("nbdinfo").arg(uri));
    assert!(out.stdout.contains("with TLS"), "nbdinfo did not use TLS:\n{}", out.describe());
    out
}

// ---------------------------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------------------------

#[test]
fn certificates_with_nbdinfo_nbdcopy_and_qemu() {
    let pki = Pki::new();
    let srv =
        Server::unix(&["--tls=require", &format!("--tls-certificates={}", pki.arg("srv")), "memory", "16M"]);
    let uri = tls_uri(&srv, &format!("tls-certificates={}", pki.arg("cli")));
    let out = assert_nbdinfo_ok(&uri);
    assert!(out.stdout.contains("export-size: 16777216"), "{}", out.describe());

    // Data in with nbdcopy (several connections, each its own TLS session), out with qemu-img.
    let dir = TempDir::new("tlscopy");
    let (src, back) = (dir.join("src"), dir.join("back"));
    let data = common::write_random_file(&src, 16 * MIB, 21);
    run_ok(tool("nbdcopy").arg(&src).arg(&uri));
    let (object, opts) =
        qemu_tls(&srv, &format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.arg("cli")));
    let info = run_ok(tool("qemu-img").args(["info", "--object", &object, "--image-opts", &opts]));
    assert!(info.stdout.contains("16 MiB"), "{}", info.describe());
    run_ok(
        tool("qemu-img")
            .args(["convert", "--object", &object, "--image-opts", &opts, "-O", "raw"])
            .arg(&back),
    );
    common::assert_same_bytes("qemu-img over TLS", &data, &common::read_file(&back));
    // And nbdcopy reading back.
    fs::remove_file(&back).unwrap();
    run_ok(tool("nbdcopy").arg(&uri).arg(&back));
    common::assert_same_bytes("nbdcopy over TLS", &data, &common::read_file(&back));
}

#[test]
fn openssl_made_rsa_certificates() {
    // rustls must take what openssl writes too: an RSA key in PKCS#8, a self-signed server
    // certificate that is also the CA.
    let dir = TempDir::new("osslpki");
    let srv_dir = dir.join("srv");
    fs::create_dir_all(&srv_dir).unwrap();
    run_ok(tool("openssl").current_dir(&srv_dir).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyCertSign",
        "-keyout",
        "server-key.pem",
        "-out",
        "server-cert.pem",
    ]));
    copy(&srv_dir.join("server-cert.pem"), &srv_dir.join("ca-cert.pem"));
    let srv = Server::unix(&[
        "--tls=require",
        &format!("--tls-certificates={}", srv_dir.display()),
        "memory",
        "1M",
    ]);
    assert_nbdinfo_ok(&tls_uri(&srv, &format!("tls-certificates={}", srv_dir.display())));
}

#[test]
fn psk_with_nbdinfo_nbdcopy_and_qemu() {
    let dir = TempDir::new("tlspsk");
    let (keys, _) = psk_file(dir.path());
    let srv = Server::unix(&["--tls=require", &format!("--tls-psk={}", keys.display()), "memory", "8M"]);
    let uri = psk_uri(&srv, "alice", &keys);
    assert_nbdinfo_ok(&uri);
    assert_nbdinfo_ok(&psk_uri(&srv, "bob", &keys));
    let (src, back) = (dir.join("src"), dir.join("back"));
    let data = common::write_random_file(&src, 8 * MIB, 22);
    run_ok(tool("nbdcopy").arg(&src).arg(&uri));
    // qemu wants the key file named keys.psk in a directory of its own.
    let qdir = dir.join("qemu");
    fs::create_dir_all(&qdir).unwrap();
    copy(&keys, &qdir.join("keys.psk"));
    let object = format!("tls-creds-psk,id=tls0,dir={},username=alice,endpoint=client", qdir.display());
    let opts = format!("driver=nbd,path={},tls-creds=tls0", srv.socket_path().display());
    run_ok(
        tool("qemu-img")
            .args(["convert", "--object", &object, "--image-opts", &opts, "-O", "raw"])
            .arg(&back),
    );
    common::assert_same_bytes("qemu-img over TLS-PSK", &data, &common::read_file(&back));
}

/// gnutls-cli through `tests/python/tls_gnutls_cli.py` with a pre-shared key: "ok ..." or
/// "refused: ...".
fn gnutls_cli(srv: &Server, dir: &Path, user: &str, key: &str, priority: &str) -> String {
    gnutls_cli_with(srv, dir, &format!("psk:{user}:{key}"), priority)
}

/// The same with `credentials` as the script takes them (`psk:USER:KEY` or `x509:CAFILE`).
fn gnutls_cli_with(srv: &Server, dir: &Path, credentials: &str, priority: &str) -> String {
    let log = dir.join("gnutls-cli.log");
    let out = run_ok(
        common::python_script("tls_gnutls_cli.py")
            .arg(srv.socket_path())
            .args([credentials, priority])
            .arg(&log),
    );
    out.stdout.trim().to_string()
}

#[test]
fn psk_with_gnutls_cli_tls12_and_tls13() {
    require_gnutls_cli();
    let dir = TempDir::new("gnutls");
    let (keys, key) = psk_file(dir.path());
    let srv = Server::unix(&["--tls=require", &format!("--tls-psk={}", keys.display()), "pattern", "1M"]);
    // The pattern plugin's first 8-byte word is its offset, 0.
    let first = "00000000000000000000000000000008";
    let tls13 = gnutls_cli(&srv, dir.path(), "alice", &key, "NORMAL:-VERS-ALL:+VERS-TLS1.3:+ECDHE-PSK:+PSK");
    assert!(tls13.starts_with("ok") && tls13.contains("TLS1.3") && tls13.ends_with(first), "{tls13}");
    let tls12 = gnutls_cli(&srv, dir.path(), "alice", &key, "NORMAL:-VERS-ALL:+VERS-TLS1.2:+PSK");
    assert!(tls12.starts_with("ok") && tls12.contains("TLS1.2") && tls12.contains("PSK"), "{tls12}");
    // A wrong key and an unknown user are refused by the handshake.
    let wrong =
        gnutls_cli(&srv, dir.path(), "alice", "00112233445566778899aabbccddeeff", "NORMAL:+ECDHE-PSK:+PSK");
    assert!(wrong.starts_with("refused"), "{wrong}");
    let unknown = gnutls_cli(&srv, dir.path(), "mallory", &key, "NORMAL:-VERS-ALL:+VERS-TLS1.2:+PSK");
    assert!(unknown.starts_with("refused"), "{unknown}");
    let stderr = srv.stderr();
    assert!(stderr.contains("TLS handshake failed"), "server log:\n{stderr}");
    assert!(stderr.contains("unknown identity \"mallory\""), "server log:\n{stderr}");
    assert!(!stderr.contains(&key), "the key must never be logged");
}

#[test]
fn certificates_with_gnutls_cli_tls12_and_tls13_and_nothing_older() {
    // §F item 78: TLS 1.2 or later with X.509 certificates; TLS 1.1 and older refused.
    require_gnutls_cli();
    let pki = Pki::new();
    let dir = TempDir::new("gnutls-x509");
    let srv =
        Server::unix(&["--tls=require", &format!("--tls-certificates={}", pki.arg("srv")), "pattern", "1M"]);
    let ca = format!("x509:{}", pki.path("cli/ca-cert.pem").display());
    let first = "00000000000000000000000000000008";
    let tls13 = gnutls_cli_with(&srv, dir.path(), &ca, "NORMAL:-VERS-ALL:+VERS-TLS1.3");
    assert!(tls13.starts_with("ok") && tls13.contains("TLS1.3") && tls13.ends_with(first), "{tls13}");
    let tls12 = gnutls_cli_with(&srv, dir.path(), &ca, "NORMAL:-VERS-ALL:+VERS-TLS1.2");
    assert!(tls12.starts_with("ok") && tls12.contains("TLS1.2") && tls12.ends_with(first), "{tls12}");
    for old in ["TLS1.1", "TLS1.0"] {
        let got = gnutls_cli_with(&srv, dir.path(), &ca, &format!("NORMAL:-VERS-ALL:+VERS-{old}"));
        assert!(got.starts_with("refused"), "{old}: {got}");
    }
    // The refusals were the server's: it saw each handshake and turned it down.
    let stderr = srv.stderr();
    assert_eq!(stderr.matches("TLS handshake failed").count(), 2, "server log:\n{stderr}");
}

#[test]
fn tls_sessions_end_with_close_notify() {
    // §E item 67 and §D item 28: after DISC, and after ABORT, the server ends the TLS session
    // properly before closing; a client sees a clean end of the session, not a truncation.
    let pki = Pki::new();
    let srv = cert_server(&pki, "require", &[]);
    let mut t = starttls(connect(&srv), &pki.path("cli/ca-cert.pem"));
    t.go();
    t.send(&raw::Conn::request_bytes(0, raw::CMD_READ, 1, 0, 512));
    assert_eq!(t.recv(16 + 512).len(), 528);
    t.send(&raw::Conn::request_bytes(0, raw::CMD_DISC, 2, 0, 0));
    assert_clean_tls_end(&mut t);

    let mut t = starttls(connect(&srv), &pki.path("cli/ca-cert.pem"));
    t.opt(raw::OPT_ABORT, &[]);
    let (opt, _, _) = t.reply();
    assert_eq!(opt, raw::OPT_ABORT);
    assert_clean_tls_end(&mut t);
}

/// The next read ends the TLS stream cleanly: rustls reports end of stream (0 bytes) only after
/// a close_notify alert, and an error for a connection closed without one.
fn assert_clean_tls_end(t: &mut Wire<TlsStream>) {
    let mut buf = [0u8; 64];
    match t.s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("server sent {n} more bytes: {:02x?}", &buf[..n]),
        Err(e) => panic!("the session ended without close_notify: {e}"),
    }
}

fn require_gnutls_cli() {
    common::require_tool("gnutls-cli");
}

#[test]
fn refusals_leave_the_server_serving() {
    let pki = Pki::new();
    let mut srv = Server::start_unix(
        &[
            "-v",
            "--tls=require",
            "--tls-verify-peer",
            &format!("--tls-certificates={}", pki.arg("srv")),
            "memory",
            "1M",
        ],
        &[],
    );
    let cert_uri = |srv: &Server, sub: &str| tls_uri(srv, &format!("tls-certificates={}", pki.arg(sub)));
    // A plaintext client gets TLS_REQD (libnbd 1.14 words it as "not supported").
    let plain = run(tool("nbdinfo").arg(srv.uri()));
    assert!(!plain.success(), "plaintext client served under --tls=require:\n{}", plain.describe());
    assert!(srv.stderr().contains("refused (0x80000005)"), "no TLS_REQD:\n{}", srv.stderr());
    // No client certificate, a certificate from another CA, a client that does not trust the
    // server's CA: all refused.
    for sub in ["cli", "mallory", "untrusting"] {
        let out = run(tool("nbdinfo").arg(cert_uri(&srv, sub)));
        assert!(!out.success(), "client {sub} was served:\n{}", out.describe());
        srv.assert_alive();
    }
    // And a proper client still gets in, with its certificate's subject reaching the layers.
    assert_nbdinfo_ok(&cert_uri(&srv, "alice"));
    let log = srv.stderr();
    assert!(log.contains("peer sent no certificates"), "server log:\n{log}");
    assert!(log.matches("TLS handshake failed").count() >= 3, "server log:\n{log}");
    assert!(
        log.contains("opening export \"\" over TLS, client certificate CN=alice,O=Example,C=GB"),
        "server log:\n{log}"
    );
}

#[test]
fn psk_refusals_leave_the_server_serving() {
    let dir = TempDir::new("pskref");
    let (keys, _) = psk_file(dir.path());
    let other = dir.join("other.psk");
    run_ok(tool("psktool").args(["-u", "alice", "-p"]).arg(&other));
    let mut srv = Server::unix(&["--tls=require", &format!("--tls-psk={}", keys.display()), "memory", "1M"]);
    let wrong = run(tool("nbdinfo").arg(psk_uri(&srv, "alice", &other)));
    assert!(!wrong.success(), "a wrong key was accepted:\n{}", wrong.describe());
    let plain = run(tool("nbdinfo").arg(srv.uri()));
    assert!(!plain.success());
    srv.assert_alive();
    assert_nbdinfo_ok(&psk_uri(&srv, "alice", &keys));
}

#[test]
fn print_uri_and_run_environment() {
    let pki = Pki::new();
    let certs = pki.arg("srv");
    // $uri carries the hint, and libnbd connects with it as it is.
    let out = common::run_server_cmd(
        &[
            "--tls=require",
            &format!("--tls-certificates={certs}"),
            "-U",
            "-",
            "--run",
            "echo \"$uri\"; echo \"$tls|$tls_certificates|$tls_psk\"; nbdinfo --size \"$uri\"",
            "memory",
            "1M",
        ],
        Duration::from_secs(60),
    )
    .assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("nbds+unix:///?socket=")
            && lines[0].ends_with(&format!("&tls-certificates={certs}")),
        "{}",
        out.describe()
    );
    assert_eq!(lines[1], format!("2|{certs}|"));
    assert_eq!(lines[2], "1048576");

    let dir = TempDir::new("uripsk");
    let (keys, _) = psk_file(dir.path());
    let out = common::run_server_cmd(
        &[
            "--tls=require",
            &format!("--tls-psk={}", keys.display()),
            "-U",
            "-",
            "--run",
            "echo \"$uri\"; echo \"$tls|$tls_certificates|$tls_psk\"; nbdinfo --size \"$uri\"",
            "memory",
            "1M",
        ],
        Duration::from_secs(60),
    )
    .assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    // The first user in the file is the URI's user, so the URI works as printed.
    assert!(
        lines[0].starts_with("nbds+unix://alice@/?socket=")
            && lines[0].ends_with(&format!("&tls-psk-file={}", keys.display())),
        "{}",
        out.describe()
    );
    assert_eq!(lines[1], format!("2||{}", keys.display()));
    assert_eq!(lines[2], "1048576");

    // --tls=on: plaintext clients are served, so the URI stays nbd://.
    let mut srv = Server::start_tcp(
        &["--print-uri", "--tls=on", &format!("--tls-certificates={certs}"), "memory", "1M"],
        &[],
    );
    let printed =
        common::wait_for_file(&srv.dir.join("server.stdout"), Duration::from_secs(5)).unwrap_or_default();
    assert!(printed.trim_end().starts_with("nbd://") && !printed.contains("tls-"), "printed: {printed:?}");
    srv.stop();
    let srv = Server::start_tcp(
        &["--print-uri", "--tls=require", &format!("--tls-certificates={certs}"), "memory", "1M"],
        &[],
    );
    let printed =
        common::wait_for_file(&srv.dir.join("server.stdout"), Duration::from_secs(5)).unwrap_or_default();
    let printed = printed.trim_end();
    assert!(
        printed.starts_with("nbds://127.0.0.1:") && printed.ends_with(&format!("/?tls-certificates={certs}")),
        "printed: {printed:?}"
    );
    // Over TCP the URI's host must match the certificate (it names 127.0.0.1 too).
    assert_nbdinfo_ok(printed);
}

#[test]
fn tls_fallback_serves_the_readme_to_plaintext_clients() {
    let pki = Pki::new();
    let srv = Server::unix(&[
        "--tls=on",
        &format!("--tls-certificates={}", pki.arg("srv")),
        "--filter=tls-fallback",
        "pattern",
        "1M",
        "tlsreadme=Please use TLS.",
    ]);
    // Plaintext, whatever export name: the readme, 512 bytes, read-only.
    let out = run_ok(tool("nbdinfo").arg(srv.uri_for("anything")));
    assert!(
        out.stdout.contains("export-size: 512") && out.stdout.contains("is_read_only: true"),
        "{}",
        out.describe()
    );
    let dir = TempDir::new("fallback");
    let readme = dir.join("readme");
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&readme));
    let got = common::read_file(&readme);
    assert_eq!(got.len(), 512);
    assert!(got.starts_with(b"Please use TLS.") && got[15..].iter().all(|&b| b == 0));
    // TLS: the real export.
    let out = assert_nbdinfo_ok(&tls_uri(&srv, &format!("tls-certificates={}", pki.arg("cli"))));
    assert!(out.stdout.contains("export-size: 1048576"), "{}", out.describe());
}

#[test]
fn bad_tls_configuration() {
    // require without certificates is fatal; on warns and serves plaintext with STARTTLS refused.
    let out = common::run_server_cmd(
        &["--tls=require", "--tls-certificates=/nonexistent", "-U", "-", "--run", "true", "null"],
        Duration::from_secs(10),
    );
    assert!(!out.success() && out.stderr.contains("certificates"), "{}", out.describe());
    let out = common::run_server_cmd(
        &["--tls=require", "--tls-psk=/nonexistent.psk", "-U", "-", "--run", "true", "null"],
        Duration::from_secs(10),
    );
    assert!(!out.success() && out.stderr.contains("nonexistent.psk"), "{}", out.describe());
    let out = common::run_server_cmd(&["--tls=require", "-o", "null"], Duration::from_secs(10));
    assert!(!out.success() && out.stderr.contains("oldstyle"), "{}", out.describe());
    let srv = Server::unix(&["--tls=on", "--tls-certificates=/nonexistent", "memory", "1M"]);
    assert!(srv.stderr().contains("TLS is disabled"), "{}", srv.stderr());
    let mut w = connect(&srv);
    w.expect(raw::OPT_STARTTLS, &[], REP_ERR_POLICY);
    w.go();
}

// ---------------------------------------------------------------------------------------------
// Raw wire
// ---------------------------------------------------------------------------------------------

fn cert_server(pki: &Pki, policy: &str, extra: &[&str]) -> Server {
    let mut args = vec![format!("--tls={policy}"), format!("--tls-certificates={}", pki.arg("srv"))];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["memory".to_string(), "1M".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::unix(&args)
}

#[test]
fn require_refuses_every_option_before_starttls() {
    let pki = Pki::new();
    let mut srv = cert_server(&pki, "require", &[]);
    let mut w = connect(&srv);
    let meta = {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        d
    };
    for (code, data) in [
        (raw::OPT_LIST, vec![]),
        (raw::OPT_INFO, raw::Conn::info_data("", &[])),
        (raw::OPT_GO, raw::Conn::info_data("", &[])),
        (raw::OPT_STRUCTURED_REPLY, vec![]),
        (raw::OPT_LIST_META_CONTEXT, meta.clone()),
        (raw::OPT_SET_META_CONTEXT, meta),
        (raw::OPT_EXTENDED_HEADERS, vec![]),
        (4, vec![]),
        (0x1234, b"unknown option data".to_vec()),
    ] {
        w.expect(code, &data, REP_ERR_TLS_REQD);
    }
    // ABORT is answered normally, then the server closes.
    w.expect(raw::OPT_ABORT, &[], raw::REP_ACK);
    assert_closed(&mut w, Duration::from_secs(5));
    // EXPORT_NAME before TLS: a hard disconnect, no reply.
    let mut w = connect(&srv);
    w.send(&{
        let mut b = raw::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&raw::OPT_EXPORT_NAME.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    });
    assert_closed(&mut w, Duration::from_secs(5));
    // A client without fixed newstyle cannot do TLS at all.
    let mut c = srv.raw();
    c.greeting();
    c.client_flags(raw::CFLAG_NO_ZEROES);
    assert!(c.expect_closed(Duration::from_secs(5)).is_empty());
    srv.assert_alive();
    // After STARTTLS everything is served, and a second STARTTLS is INVALID.
    let mut t = starttls(connect(&srv), &pki.path("cli/ca-cert.pem"));
    t.expect(raw::OPT_STARTTLS, &[], raw::REP_ERR_INVALID);
    t.expect(raw::OPT_STRUCTURED_REPLY, &[], raw::REP_ACK);
    let flags = t.go();
    assert_ne!(flags & FLAG_SEND_DF, 0);
}

#[test]
fn starttls_forgets_what_was_negotiated_in_plaintext() {
    // CVE-2021-3716: a STRUCTURED_REPLY negotiated in plaintext (e.g. injected by a man in the
    // middle) must not survive STARTTLS.
    let pki = Pki::new();
    let srv = cert_server(&pki, "on", &[]);
    let mut w = connect(&srv);
    w.expect(raw::OPT_STARTTLS, b"data", raw::REP_ERR_INVALID);
    w.expect(raw::OPT_STRUCTURED_REPLY, &[], raw::REP_ACK);
    let mut t = starttls(w, &pki.path("cli/ca-cert.pem"));
    let flags = t.go();
    assert_eq!(flags & FLAG_SEND_DF, 0, "DF offered: structured replies survived STARTTLS");
    // Replies are simple.
    t.send(&raw::Conn::request_bytes(0, raw::CMD_READ, 9, 0, 4096));
    let h = t.recv(16);
    assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), raw::SIMPLE_REPLY_MAGIC);
    assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
    assert_eq!(t.recv(4096), vec![0u8; 4096]);
    t.send(&raw::Conn::request_bytes(0, raw::CMD_DISC, 10, 0, 0));
    assert_closed(&mut t, Duration::from_secs(5));
}

#[test]
fn plaintext_pipelined_after_starttls_is_never_processed() {
    let pki = Pki::new();
    let mut srv = cert_server(&pki, "on", &[]);
    // STARTTLS with options appended in the same write, as a man in the middle would inject
    // them: the server must not act on them, so it answers nothing and drops the connection.
    let mut w = connect(&srv);
    let mut b = Vec::new();
    for (code, data) in [
        (raw::OPT_STARTTLS, vec![]),
        (raw::OPT_STRUCTURED_REPLY, vec![]),
        (raw::OPT_GO, raw::Conn::info_data("", &[])),
    ] {
        b.extend_from_slice(&raw::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(&data);
    }
    w.send(&b);
    assert_closed(&mut w, Duration::from_secs(5));
    // Plaintext where the ClientHello should be: the handshake fails, nothing else happens.
    let mut w = connect(&srv);
    w.expect(raw::OPT_STARTTLS, &[], raw::REP_ACK);
    w.send(&{
        let mut b = raw::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&raw::OPT_GO.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    });
    let mut rest = Vec::new();
    let _ = w.s.read_to_end(&mut rest);
    assert!(
        !rest.windows(8).any(|x| x == raw::OPT_REPLY_MAGIC.to_be_bytes()),
        "an option reply: {rest:02x?}"
    );
    srv.assert_alive();
    assert_nbdinfo_ok(&tls_uri(&srv, &format!("tls-certificates={}", pki.arg("cli"))));
}

#[test]
fn a_stalled_handshake_is_dropped_at_the_deadline() {
    let pki = Pki::new();
    let mut srv = cert_server(&pki, "require", &["--timeout=1"]);
    // After the ACK, half a TLS record header and then silence.
    let mut w = connect(&srv);
    w.expect(raw::OPT_STARTTLS, &[], raw::REP_ACK);
    w.send(&[0x16, 0x03]);
    let start = Instant::now();
    assert_closed(&mut w, Duration::from_secs(5));
    assert!(start.elapsed() >= Duration::from_millis(500), "closed before the deadline");
    // And one that says nothing at all after the ACK.
    let mut w = connect(&srv);
    w.expect(raw::OPT_STARTTLS, &[], raw::REP_ACK);
    assert_closed(&mut w, Duration::from_secs(5));
    srv.assert_alive();
    assert_nbdinfo_ok(&tls_uri(&srv, &format!("tls-certificates={}", pki.arg("cli"))));
}

#[test]
fn tls_sessions_are_paid_from_the_memory_budget() {
    // 300 KiB of budget holds one TLS session (192 KiB) but not two.
    let pki = Pki::new();
    let srv = cert_server(&pki, "on", &["--max-request=64K", "--memory-limit=300K"]);
    let ca = pki.path("cli/ca-cert.pem");
    let first = starttls(connect(&srv), &ca);
    let mut second = connect(&srv);
    let msg = second.expect(raw::OPT_STARTTLS, &[], REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&msg).contains("memory"), "{:?}", String::from_utf8_lossy(&msg));
    // The refused client carries on in plaintext.
    second.go();
    drop(first);
    // Once the first session's connection is gone, its budget is back.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut w = connect(&srv);
        w.opt(raw::OPT_STARTTLS, &[]);
        let (_, typ, _) = w.reply();
        if typ == raw::REP_ACK {
            break;
        }
        assert!(Instant::now() < deadline, "the first session's budget never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `file` export over TLS: large cached reads, which a plaintext connection sends with
/// sendfile, reach a TLS client through the session intact (read into a buffer instead).
#[test]
fn file_reads_over_tls_arrive_intact() {
    let dir = TempDir::new("tlsfile");
    let (keys, _) = psk_file(dir.path());
    let img = dir.join("disk.img");
    let data = common::write_random_file(&img, 8 << 20, 7);
    let srv = Server::unix(&[
        "--tls=require",
        &format!("--tls-psk={}", keys.display()),
        "file",
        img.to_str().expect("utf-8 path"),
    ]);
    let out = dir.join("copy.img");
    run_ok(tool("nbdcopy").args(["--request-size=1048576", &psk_uri(&srv, "alice", &keys)]).arg(&out));
    common::assert_same_bytes("nbdcopy over TLS", &data, &fs::read(&out).expect("read copy"));
}
