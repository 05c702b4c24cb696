//! The `nbd` backend (a proxy to another NBD server) with the real binary, in front of real
//! upstreams: blocksmith `memory`, nbdkit `memory`, and qemu-nbd, checked with qemu-io,
//! qemu-img compare, nbdinfo --map and the Python `nbd` module. Also: the upstream killed and
//! restarted under a connected client, and 1000 clients through one proxy with a bounded number
//! of upstream connections.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// A proxy in front of the server on `upstream`.
fn proxy(upstream: &Path, extra: &[&str]) -> Server {
    let sock = format!("socket={}", upstream.display());
    let mut args = vec!["nbd", sock.as_str()];
    args.extend_from_slice(extra);
    Server::unix(&args)
}

/// qemu-io output never contains these when every command succeeded.
fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri));
    let all = format!("{}{}", out.stdout, out.stderr);
    for bad in ["failed", "Pattern verification", "error", "Error"] {
        assert!(!all.contains(bad), "qemu-io reported a failure ({bad:?}):\n{}", out.describe());
    }
}

fn assert_identical(a: &str, b: &str) {
    let cmp = run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
    assert!(cmp.success() && cmp.stdout.contains("identical"), "qemu-img compare:\n{}", cmp.describe());
}

fn map(uri: &str) -> Vec<MapEntry> {
    parse_nbdinfo_map(&run_ok(tool("nbdinfo").args(["--map", uri])).stdout)
}

/// Write through the proxy, then check the proxy and the upstream agree byte for byte and in
/// their allocation maps.
fn exercise(proxy_uri: &str, upstream_uri: &str, size: u64) {
    qemu_io(
        proxy_uri,
        &[
            "write -P 0x55 0 1M",
            "write -P 0xaa 5M 64k",
            "write -z 5M 4k",
            "write -P 0x11 7340032 3M",
            "discard 8M 1M",
            "flush",
            "read -P 0x55 0 1M",
            "read -P 0 5M 4k",
            "read -P 0xaa 5246976 61440",
        ],
    );
    assert_identical(proxy_uri, upstream_uri);
    let (p, u) = (map(proxy_uri), map(upstream_uri));
    assert_map_covers(&p, size);
    assert_eq!(p, u, "nbdinfo --map through the proxy differs from the upstream's");
    assert!(p.iter().any(|e| e.kind & 1 != 0), "the map shows no hole at all: {p:?}");
    // What the upstream says about itself, the proxy says too.
    let info = |uri: &str| run_ok(tool("nbdinfo").arg(uri)).stdout;
    let (pi, ui) = (info(proxy_uri), info(upstream_uri));
    for key in
        ["export-size", "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"]
    {
        assert_eq!(nbdinfo_field(&pi, key), nbdinfo_field(&ui, key), "{key} differs:\n{pi}\n---\n{ui}");
    }
}

#[test]
fn proxy_in_front_of_blocksmith_memory() {
    let up = Server::unix(&["memory", "size=16M"]);
    let px = proxy(up.socket_path(), &[]);
    exercise(&px.uri(), &up.uri(), 16 * MIB as u64);
    // The upstream's error comes back with its errno: a read past the end (libnbd's own bounds
    // check is off so the request reaches the proxy, whose shim answers EINVAL).
    let out = run(tool("nbdsh").args([
        "-u",
        &px.uri(),
        "-c",
        "h.set_strict_mode(0)\ntry:\n  h.pread(512, 16*1024*1024)\nexcept nbd.Error as e:\n  print('errno', e.errnum)",
    ]));
    assert!(out.stdout.contains("errno 22"), "{}", out.describe());
}

#[test]
fn proxy_in_front_of_nbdkit_memory() {
    let up = Server::nbdkit_unix(&["memory", "size=16M"]);
    let px = proxy(up.socket_path(), &[]);
    exercise(&px.uri(), &up.uri(), 16 * MIB as u64);
}

/// A process we start ourselves (qemu-nbd, or a server that must come back on the same socket
/// path), killed on drop.
struct Proc {
    child: Option<Child>,
    sock: PathBuf,
}

impl Proc {
    fn start(mut cmd: Command, sock: &Path) -> Proc {
        let _ = fs::remove_file(sock);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let mut p = Proc { child: Some(child), sock: sock.to_path_buf() };
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            if let Some(Ok(Some(st))) = p.child.as_mut().map(|c| c.try_wait()) {
                panic!("{cmd:?} exited at start: {st}");
            }
            assert!(Instant::now() < deadline, "{cmd:?} did not start listening on {}", sock.display());
            thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_file(&self.sock);
    }
}

fn qemu_nbd(file: &Path, sock: &Path) -> Proc {
    let mut c = tool("qemu-nbd");
    // -t: survive the last client; -e: the proxy and our checking clients at once.
    c.args(["-f", "raw", "-t", "-e", "16", "-k"]).arg(sock).arg(file);
    Proc::start(c, sock)
}

#[test]
fn proxy_in_front_of_qemu_nbd() {
    let dir = TempDir::new("qnbd");
    let file = dir.join("disk.img");
    // Sparse, so the ranges never written are holes whatever the file system makes of the
    // zeroed one (ext4 reports an unwritten extent as data once its zero pages are cached).
    fs::File::create(&file).unwrap().set_len(16 * MIB as u64).unwrap();
    let sock = dir.join("q.sock");
    let _q = qemu_nbd(&file, &sock);
    let px = proxy(&sock, &[]);
    exercise(&px.uri(), &unix_uri(&sock), 16 * MIB as u64);
    // And the file itself has what went through the proxy.
    let data = read_file(&file);
    assert!(data[..MIB].iter().all(|&b| b == 0x55));
    assert!(data[7340032..7340032 + 3 * MIB].iter().all(|&b| b == 0x11));
}

/// qemu-nbd processes whose command line mentions `needle` (to see that a spawned server is
/// gone). The proxy's own command line mentions it too, so the program name must match.
fn qemu_nbds_mentioning(needle: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            let prog = cmd.split('\0').next().unwrap_or("");
            if prog.ends_with("qemu-nbd") && cmd.contains(needle) && pid_alive(pid) {
                v.push(pid);
            }
        }
    }
    v
}

#[test]
fn command_runs_qemu_nbd_by_socket_activation() {
    let dir = TempDir::new("cmd");
    let file = dir.join("cmd-disk.img");
    fs::write(&file, vec![0u8; 4 * MIB]).unwrap();
    let file_arg = format!("arg={}", file.display());
    let mut px =
        Server::unix(&["--threads=1", "nbd", "command=qemu-nbd", "arg=-f", "arg=raw", "arg=-t", &file_arg]);
    qemu_io(&px.uri(), &["write -P 0x77 1M 64k", "flush", "read -P 0x77 1M 64k"]);
    let data = read_file(&file);
    assert!(data[MIB..MIB + 65536].iter().all(|&b| b == 0x77));
    let needle = file.display().to_string();
    assert_eq!(qemu_nbds_mentioning(&needle).len(), 1, "qemu-nbd is not running exactly once");
    px.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qemu_nbds_mentioning(&needle).is_empty() {
        assert!(Instant::now() < deadline, "qemu-nbd outlived the proxy");
        thread::sleep(Duration::from_millis(50));
    }
}

const RESTART_SCRIPT: &str = r#"
import errno, os, sys, time
import nbd
uri, d = sys.argv[1], sys.argv[2]
def say(s):
    print(s, flush=True)
def wait(name, t=30):
    end = time.time() + t
    while not os.path.exists(os.path.join(d, name)):
        if time.time() > end:
            sys.exit("timed out waiting for " + name)
        time.sleep(0.02)
def expect_eio(what, f):
    try:
        f()
    except nbd.Error as e:
        if e.errnum != errno.EIO:
            sys.exit("%s: errno %s, not EIO: %s" % (what, e.errnum, e))
        return
    sys.exit(what + " succeeded while the upstream was gone")

h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(b"x" * 4096, 0)
# The upstream delays reads by 5 s: this one is in flight when it is killed.
buf = nbd.Buffer(4096)
c = h.aio_pread(buf, 0)
say("inflight")
wait("killed")
t0 = time.time()
def complete():
    while not h.aio_command_completed(c):
        h.poll(1000)
        if time.time() - t0 > 20:
            sys.exit("in-flight read hung")
expect_eio("in-flight read", complete)
if time.time() - t0 > 4:
    sys.exit("in-flight read took %.1f s to fail" % (time.time() - t0))
say("eio")
expect_eio("read while down", lambda: h.pread(512, 0))
expect_eio("write while down", lambda: h.pwrite(b"z" * 512, 0))
say("down")
wait("restarted")
end = time.time() + 20
while True:
    try:
        data = h.pread(4096, 0)
        break
    except nbd.Error:
        if time.time() > end:
            sys.exit("the proxy did not recover")
        time.sleep(0.05)
if data != b"\0" * 4096:
    sys.exit("unexpected data after recovery")
h.pwrite(b"y" * 4096, 8192)
if h.pread(4096, 8192) != b"y" * 4096:
    sys.exit("write after recovery not read back")
say("recovered")
h.shutdown()
"#;

fn blocksmith_upstream(sock: &Path, args: &[&str]) -> Proc {
    let mut c = Command::new(server_bin());
    c.args(["-f", "-U"]).arg(sock).args(args).env("PATH", client_path());
    Proc::start(c, sock)
}

/// Wait (bounded) for a line in a growing output file.
fn wait_line(path: &Path, line: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = fs::read_to_string(path).unwrap_or_default();
        if s.lines().any(|l| l.trim() == line) {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("client exited ({st}) before printing {line:?}; output:\n{s}");
        }
        assert!(Instant::now() < deadline, "client did not print {line:?}; output:\n{s}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn upstream_killed_then_restarted() {
    let dir = TempDir::new("restart");
    let sock = dir.join("up.sock");
    let mut up = blocksmith_upstream(&sock, &["--filter=delay", "memory", "size=16M", "rdelay=5"]);
    let px = proxy(&sock, &[]);

    require_tool(PYTHON);
    let out_path = dir.join("client.out");
    let err_path = dir.join("client.err");
    let mut client = Command::new(PYTHON)
        .args(["-c", RESTART_SCRIPT, &px.uri()])
        .arg(dir.path())
        .env("PATH", client_path())
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn python");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_line(&out_path, "inflight", &mut client);
        // Give the read time to reach the upstream's delay.
        thread::sleep(Duration::from_millis(300));
        up.kill();
        fs::write(dir.join("killed"), "").unwrap();
        wait_line(&out_path, "eio", &mut client);
        wait_line(&out_path, "down", &mut client);
        let _up2 = blocksmith_upstream(&sock, &["memory", "size=16M"]);
        fs::write(dir.join("restarted"), "").unwrap();
        wait_line(&out_path, "recovered", &mut client);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = client.try_wait().unwrap() {
                assert!(st.success(), "client failed: {st}");
                break;
            }
            assert!(Instant::now() < deadline, "client did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }));
    let _ = client.kill();
    let _ = client.wait();
    if let Err(e) = result {
        eprintln!(
            "--- client stdout ---\n{}\n--- client stderr ---\n{}",
            fs::read_to_string(&out_path).unwrap_or_default(),
            fs::read_to_string(&err_path).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
}

const MANY_SCRIPT: &str = r#"
import os, sys, time
import nbd
uri, n, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hs = []
for i in range(n):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
print("opened", flush=True)
end = time.time() + 60
while not os.path.exists(os.path.join(d, "counted")):
    if time.time() > end:
        sys.exit("timed out waiting for the count")
    time.sleep(0.02)
for i, h in enumerate(hs):
    off = (i % 1024) * 1024
    if h.pread(512, off) != bytes([i % 1024 % 251 + 1]) * 512:
        sys.exit("client %d read the wrong data" % i)
for h in hs:
    h.shutdown()
print("done", flush=True)
"#;

/// Upstream connections open now, from the upstream's log filter.
fn upstream_connections(log: &Path) -> (usize, usize) {
    let s = fs::read_to_string(log).unwrap_or_default();
    let opened = s.lines().filter(|l| l.contains(" Connect ")).count();
    let closed = s.lines().filter(|l| l.contains(" Disconnect ")).count();
    (opened, closed)
}

#[test]
fn thousand_clients_share_a_bounded_number_of_upstream_connections() {
    const CLIENTS: usize = 1000;
    const LOOPS: usize = 2;
    const PER_LOOP: usize = 4;
    let dir = TempDir::new("many");
    let log = dir.join("upstream.log");
    let logfile = format!("logfile={}", log.display());
    let up = Server::unix(&["--filter=log", "memory", "size=1M", &logfile]);
    let px = proxy(up.socket_path(), &["--threads=2", "max-upstream=4"]);
    // Every 1 KiB block starts with 512 bytes of its own value.
    let mut seed = tool(PYTHON);
    seed.args([
        "-c",
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         for b in range(1024):\n  h.pwrite(bytes([b % 251 + 1]) * 512, b * 1024)\nh.shutdown()",
        &px.uri(),
    ]);
    run_ok(&mut seed);

    let out_path = dir.join("many.out");
    let mut client = Command::new(PYTHON)
        .args(["-c", MANY_SCRIPT, &px.uri(), &CLIENTS.to_string()])
        .arg(dir.path())
        .env("PATH", client_path())
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python");
    wait_line(&out_path, "opened", &mut client);
    let (opened, closed) = upstream_connections(&log);
    let live = opened - closed;
    fs::write(dir.join("counted"), "").unwrap();
    wait_line(&out_path, "done", &mut client);
    assert!(client.wait().unwrap().success());
    assert!(
        (1..=LOOPS * PER_LOOP).contains(&live),
        "{CLIENTS} clients held {live} upstream connections open (bound {})",
        LOOPS * PER_LOOP
    );
    // No churn either: the seeding client's connection, then at most the bound.
    assert!(opened <= LOOPS * PER_LOOP + 1, "{opened} upstream connections were opened in all");
}

#[test]
fn proxy_over_tcp_by_hostname_and_by_uri_with_an_export_name() {
    let dir = TempDir::new("tcp");
    let log = dir.join("up.log");
    let logfile = format!("logfile={}", log.display());
    let up = Server::tcp(&["--filter=log", "memory", "size=4M", &logfile]);
    let Endpoint::Tcp(port) = up.endpoint else { panic!("not TCP") };
    let by_host = Server::unix(&["nbd", "hostname=127.0.0.1", &format!("port={port}"), "export=first"]);
    qemu_io(&by_host.uri(), &["write -P 0x42 0 64k", "read -P 0x42 0 64k"]);
    // The magic key: a bare URI; the export is its percent-decoded path.
    let by_uri = Server::unix(&["nbd", &format!("nbd://127.0.0.1:{port}/second%20disk")]);
    qemu_io(&by_uri.uri(), &["read -P 0x42 0 64k"]);
    let s = fs::read_to_string(&log).unwrap_or_default();
    assert!(s.contains("export=first "), "upstream log: {s}");
    assert!(s.contains("second disk"), "upstream log: {s}");
}

// ---- TLS towards the upstream ------------------------------------------------------------------

fn certtool(dir: &Path, args: &[&str], template: &str) {
    let path = dir.join("template.info");
    fs::write(&path, template).expect("write certtool template");
    run_ok(tool("certtool").current_dir(dir).args(args).arg("--template").arg(&path));
}

/// A CA and a server certificate for localhost signed by it (made with certtool, as
/// tests/tls.rs does): `srv/` is the server's directory, `cli/` holds only `ca-cert.pem`,
/// `rogue/` holds another CA's certificate as `ca-cert.pem`.
fn make_pki(d: &Path) {
    for k in ["ca-key.pem", "server-key.pem", "rogue-key.pem"] {
        run_ok(tool("certtool").current_dir(d).args([
            "--generate-privkey",
            "--key-type=ecdsa",
            "--outfile",
            k,
        ]));
    }
    certtool(
        d,
        &["--generate-self-signed", "--load-privkey", "ca-key.pem", "--outfile", "ca-cert.pem"],
        "cn = blocksmith test CA\nca\ncert_signing_key\nexpiration_days = 2\n",
    );
    certtool(
        d,
        &["--generate-self-signed", "--load-privkey", "rogue-key.pem", "--outfile", "rogue-cert.pem"],
        "cn = rogue CA\nca\ncert_signing_key\nexpiration_days = 2\n",
    );
    certtool(
        d,
        &[
            "--generate-certificate",
            "--load-privkey",
            "server-key.pem",
            "--load-ca-certificate",
            "ca-cert.pem",
            "--load-ca-privkey",
            "ca-key.pem",
            "--outfile",
            "server-cert.pem",
        ],
        "organization = blocksmith\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n\
         tls_www_server\nsigning_key\nexpiration_days = 2\n",
    );
    for (sub, files) in [
        (
            "srv",
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("server-cert.pem", "server-cert.pem"),
                ("server-key.pem", "server-key.pem"),
            ][..],
        ),
        ("cli", &[("ca-cert.pem", "ca-cert.pem")][..]),
        ("rogue", &[("rogue-cert.pem", "ca-cert.pem")][..]),
    ] {
        fs::create_dir_all(d.join(sub)).expect("mkdir");
        for (from, to) in files {
            fs::copy(d.join(from), d.join(sub).join(to)).expect("copy");
        }
    }
}

/// Write through the proxy with qemu-io and read it back, twice (the second time over a fresh
/// client connection).
fn write_and_read_back(proxy_uri: &str) {
    qemu_io(
        proxy_uri,
        &["write -P 0x5a 0 1M", "write -P 0xa5 3M 64k", "flush", "read -P 0x5a 0 1M", "read -P 0xa5 3M 64k"],
    );
    qemu_io(proxy_uri, &["read -P 0x5a 0 1M", "read -P 0xa5 3M 64k", "read -P 0 2M 1M"]);
}

/// The proxy's open fails (the client sees an error), and the proxy itself keeps running.
fn assert_open_fails(px: &mut Server) {
    let out = run(tool("nbdinfo").arg(px.uri()));
    assert!(!out.success(), "open through the proxy succeeded:\n{}", out.describe());
    px.assert_alive();
}

#[test]
fn tls_certificates_to_a_blocksmith_upstream() {
    let dir = TempDir::new("pxtls");
    make_pki(dir.path());
    let srv_dir = format!("--tls-certificates={}", dir.join("srv").display());
    let mut up = Server::unix(&["--tls=require", &srv_dir, "memory", "size=8M"]);
    let cli = format!("tls-certificates={}", dir.join("cli").display());
    let px = proxy(up.socket_path(), &["tls=require", &cli]);
    write_and_read_back(&px.uri());
    // With the host name checked; and by an nbds+unix URI with query parameters.
    let px2 = proxy(up.socket_path(), &["tls=on", &cli, "tls-hostname=localhost"]);
    qemu_io(&px2.uri(), &["read -P 0x5a 0 1M"]);
    let uri = format!(
        "uri=nbds+unix:///?socket={}&tls-certificates={}",
        up.socket_path().display(),
        dir.join("cli").display()
    );
    let px3 = Server::unix(&["nbd", &uri]);
    qemu_io(&px3.uri(), &["read -P 0xa5 3M 64k"]);
    // A certificate from a CA we do not trust, or for another name, fails the open; without
    // verification the same certificate is accepted.
    let rogue = format!("tls-certificates={}", dir.join("rogue").display());
    let mut bad = proxy(up.socket_path(), &["tls=require", &rogue]);
    assert_open_fails(&mut bad);
    let mut bad = proxy(up.socket_path(), &["tls=require", &cli, "tls-hostname=elsewhere.example"]);
    assert_open_fails(&mut bad);
    let lax = proxy(up.socket_path(), &["tls=require", &rogue, "tls-verify=false"]);
    qemu_io(&lax.uri(), &["read -P 0x5a 0 1M"]);
    // Plaintext to a tls=require upstream is refused by it.
    let mut plain = proxy(up.socket_path(), &[]);
    assert_open_fails(&mut plain);
    up.assert_alive();
}

#[test]
fn tls_psk_to_a_blocksmith_upstream() {
    let dir = TempDir::new("pxpsk");
    let (keys, other) = (dir.join("keys.psk"), dir.join("other.psk"));
    run_ok(tool("psktool").args(["-u", "alice", "-p"]).arg(&keys));
    run_ok(tool("psktool").args(["-u", "alice", "-p"]).arg(&other));
    let mut up =
        Server::unix(&["--tls=require", &format!("--tls-psk={}", keys.display()), "memory", "size=8M"]);
    let psk = format!("tls-psk={}", keys.display());
    let px = proxy(up.socket_path(), &["tls=require", "tls-username=alice", &psk]);
    write_and_read_back(&px.uri());
    // The same key under an nbds+unix URI with the user name in it.
    let uri = format!(
        "uri=nbds+unix://alice@/?socket={}&tls-psk-file={}",
        up.socket_path().display(),
        keys.display()
    );
    let px2 = Server::unix(&["nbd", &uri]);
    qemu_io(&px2.uri(), &["read -P 0x5a 0 1M"]);
    // A wrong key: the open fails, the proxy and the upstream keep serving.
    let wrong = format!("tls-psk={}", other.display());
    let mut bad = proxy(up.socket_path(), &["tls=require", "tls-username=alice", &wrong]);
    assert_open_fails(&mut bad);
    up.assert_alive();
    qemu_io(&px.uri(), &["read -P 0xa5 3M 64k"]);
}

#[test]
fn tls_certificates_to_an_nbdkit_upstream() {
    let dir = TempDir::new("pxnbdkit");
    make_pki(dir.path());
    let srv_dir = format!("--tls-certificates={}", dir.join("srv").display());
    let mut up = Server::nbdkit_unix(&["--tls=require", &srv_dir, "memory", "size=8M"]);
    let cli = format!("tls-certificates={}", dir.join("cli").display());
    let px = proxy(up.socket_path(), &["tls=require", &cli]);
    write_and_read_back(&px.uri());
    up.assert_alive();
}

#[test]
fn tls_on_falls_back_to_plaintext_when_the_upstream_has_none() {
    let dir = TempDir::new("pxon");
    make_pki(dir.path());
    let up = Server::unix(&["memory", "size=8M"]);
    let cli = format!("tls-certificates={}", dir.join("cli").display());
    let px = proxy(up.socket_path(), &["tls=on", &cli]);
    write_and_read_back(&px.uri());
    let mut strict = proxy(up.socket_path(), &["tls=require", &cli]);
    assert_open_fails(&mut strict);
}
