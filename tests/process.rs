//! Process plumbing of the command line: help and version, start-up errors, --run, --print-uri,
//! pidfiles, forking to the background, --exit-with-parent, -s, signals.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{run_ok, run_server_cmd, run_with_timeout, tool, Output, Server, TempDir};

const QUICK: Duration = Duration::from_secs(10);

/// Kills a process we do not own as a child (a daemonized server) if the test fails.
struct PidGuard(i32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if self.0 > 0 && common::pid_alive(self.0) {
            common::signal(self.0, common::Signal::KILL);
        }
    }
}

fn read_pidfile(path: &std::path::Path) -> i32 {
    let s = common::wait_for_file(path, QUICK)
        .unwrap_or_else(|| panic!("pidfile {} was not written within {QUICK:?}", path.display()));
    s.trim().parse().unwrap_or_else(|_| panic!("pidfile {} holds {s:?}", path.display()))
}

fn assert_startup_error(args: &[&str], mention: &[&str]) -> Output {
    let dir = TempDir::new("bad");
    let sock = dir.join("sock");
    let mut full = vec!["-f", "-U", sock.to_str().unwrap()];
    full.extend_from_slice(args);
    let out = run_server_cmd(&full, QUICK);
    assert!(!out.success(), "server accepted a bad command line {args:?}:\n{}", out.describe());
    assert!(out.status.code().is_some(), "server crashed instead of exiting:\n{}", out.describe());
    assert!(!out.stderr.trim().is_empty(), "no error message for {args:?}:\n{}", out.describe());
    let lower = out.stderr.to_lowercase();
    assert!(
        mention.iter().any(|m| lower.contains(&m.to_lowercase())),
        "error message for {args:?} should mention one of {mention:?}:\n{}",
        out.describe()
    );
    assert!(!lower.contains("panicked"), "the server panicked:\n{}", out.describe());
    out
}

#[test]
fn help_and_version() {
    let out = run_server_cmd(&["--help"], QUICK).assert_success();
    for opt in ["--port", "--unix", "--filter", "--run", "--readonly"] {
        assert!(out.stdout.contains(opt), "--help does not mention {opt}:\n{}", out.describe());
    }

    let out = run_server_cmd(&["memory", "--help"], QUICK).assert_success();
    assert!(out.stdout.contains("size"), "memory --help should document size=:\n{}", out.describe());

    let out = run_server_cmd(&["--filter=delay", "memory", "--help"], QUICK).assert_success();
    assert!(out.stdout.contains("rdelay"), "delay filter help missing:\n{}", out.describe());
    assert!(out.stdout.contains("size"), "memory help missing after the filter's:\n{}", out.describe());

    let out = run_server_cmd(&["-V"], QUICK).assert_success();
    assert!(out.stdout.contains("blocksmith"), "-V: {}", out.describe());
    assert!(out.stdout.contains(env!("CARGO_PKG_VERSION")), "-V lacks the version:\n{}", out.describe());
    let out2 = run_server_cmd(&["--version"], QUICK).assert_success();
    assert_eq!(out.stdout, out2.stdout);
}

#[test]
fn startup_errors_are_clear() {
    assert_startup_error(&["memory", "1M", "bogus=1"], &["bogus"]);
    assert_startup_error(&["memory", "size=12Q"], &["12Q", "size"]);
    assert_startup_error(&["memory", "size=abc"], &["abc", "size"]);
    assert_startup_error(&["memory", "size=-5"], &["-5", "size"]);
    assert_startup_error(&["memory", "size=99999999999T"], &["99999999999T", "size", "large", "overflow"]);
    assert_startup_error(&["nosuchbackend"], &["nosuchbackend"]);
    assert_startup_error(&["--filter=nosuchfilter", "memory", "1M"], &["nosuchfilter"]);
    assert_startup_error(&["--filter=delay", "memory", "1M", "rdelay=soon"], &["rdelay", "soon"]);
    assert_startup_error(&["file", "/nonexistent/dir/disk.img"], &["/nonexistent/dir/disk.img", "no such"]);
    assert_startup_error(
        &["--no-such-option", "memory", "1M"],
        &["no-such-option", "unrecognized", "unknown"],
    );
    assert_startup_error(&["--threads", "lots", "memory", "1M"], &["threads", "lots"]);
}

#[test]
fn no_backend_is_an_error() {
    let out = run_server_cmd(&[], QUICK);
    assert!(!out.success(), "no backend given:\n{}", out.describe());
}

#[test]
fn run_captive_passes_env_and_status() {
    let bin = common::server_bin();
    let bin = bin.to_str().unwrap();
    let out = run_ok(Command::new(bin).args(["-U", "-", "memory", "1M", "--run", "nbdinfo \"$uri\""]));
    assert!(out.stdout.contains("export-size: 1048576"), "{}", out.describe());

    let script = r#"test -S "$unixsocket" || exit 10
test "$uri" = "$nbd" || exit 11
case "$uri" in nbd+unix:///myexp\?socket=*) ;; *) exit 12 ;; esac
test "$exportname" = myexp || exit 13
nbdinfo --size "nbd+unix:///?socket=$unixsocket""#;
    let out = run_ok(Command::new(bin).args(["-U", "-", "-e", "myexp", "memory", "2M", "--run", script]));
    assert_eq!(out.stdout.trim(), "2097152", "{}", out.describe());

    let out = run_with_timeout(Command::new(bin).args(["-U", "-", "memory", "1M", "--run", "exit 3"]), QUICK);
    assert_eq!(out.code(), Some(3), "--run must pass the command's exit status through:\n{}", out.describe());

    let out = run_with_timeout(
        Command::new(bin).args([
            "-U",
            "-",
            "memory",
            "1M",
            "--run",
            "nbdinfo nbd+unix:///?socket=/nonexistent",
        ]),
        QUICK,
    );
    assert!(!out.success(), "a failing --run command must fail the server:\n{}", out.describe());
}

#[test]
fn run_captive_over_tcp() {
    let bin = common::server_bin();
    let port = common::free_port().to_string();
    let script = r#"test "$port" = "$1" || exit 20; nbdinfo --size "$uri""#;
    let out = run_ok(Command::new(&bin).args([
        "-p",
        &port,
        "-i",
        "127.0.0.1",
        "memory",
        "3M",
        "--run",
        &format!("set -- {port}; {script}"),
    ]));
    assert_eq!(out.stdout.trim(), "3145728", "{}", out.describe());
}

#[test]
fn print_uri_prints_usable_uri() {
    let srv = Server::unix(&["--print-uri", "memory", "1M"]);
    let sock = srv.socket_path().to_string_lossy().into_owned();
    let stdout =
        common::wait_for_file(&srv.dir.join("server.stdout"), QUICK).expect("--print-uri printed nothing");
    let uri = stdout.lines().next().unwrap().trim().to_string();
    assert!(uri.starts_with("nbd+unix://"), "--print-uri: {stdout:?}");
    assert!(uri.contains(&sock), "URI {uri:?} does not name the socket {sock}");
    let out = run_ok(tool("nbdinfo").args(["--size", &uri]));
    assert_eq!(out.stdout.trim(), "1048576");

    let srv = Server::tcp(&["--print-uri", "memory", "1M"]);
    let port = match srv.endpoint {
        common::Endpoint::Tcp(p) => p,
        _ => unreachable!(),
    };
    let stdout =
        common::wait_for_file(&srv.dir.join("server.stdout"), QUICK).expect("--print-uri printed nothing");
    let uri = stdout.lines().next().unwrap().trim().to_string();
    assert!(uri.starts_with("nbd://") && uri.contains(&format!(":{port}")), "--print-uri: {stdout:?}");
    let out = run_ok(tool("nbdinfo").args(["--size", &uri]));
    assert_eq!(out.stdout.trim(), "1048576");
}

#[test]
fn pidfile_written_in_foreground() {
    let dir = TempDir::new("pid");
    let pidfile = dir.join("server.pid");
    let srv = Server::unix(&["-P", pidfile.to_str().unwrap(), "memory", "1M"]);
    let pid = read_pidfile(&pidfile);
    assert_eq!(pid, srv.pid(), "pidfile holds the wrong pid");
}

#[test]
fn forks_to_background_without_f() {
    let dir = TempDir::new("fork");
    let sock = dir.join("sock");
    let pidfile = dir.join("pid");
    let bin = common::server_bin();
    let mut cmd = Command::new(&bin);
    cmd.args(["-U", sock.to_str().unwrap(), "-P", pidfile.to_str().unwrap(), "memory", "1M"]);
    let parent = run_with_timeout(&mut cmd, QUICK);
    let pid = read_pidfile(&pidfile);
    let _guard = PidGuard(pid);
    assert!(parent.success(), "the foreground process must exit 0 after forking:\n{}", parent.describe());
    assert!(common::pid_alive(pid), "daemonized server (pid {pid}) is not running");
    // It is already listening when the parent returns (the socket was bound before the fork).
    let out = run_ok(tool("nbdinfo").args(["--size", &format!("nbd+unix:///?socket={}", sock.display())]));
    assert_eq!(out.stdout.trim(), "1048576");
    common::signal(pid, common::Signal::TERM);
    assert!(common::wait_pid_gone(pid, QUICK), "daemon did not exit on SIGTERM");
}

#[test]
fn exit_with_parent() {
    let dir = TempDir::new("ewp");
    let sock = dir.join("sock");
    let pidfile = dir.join("pid");
    let bin = common::server_bin();
    // sh starts the server in the background and then becomes `sleep`: the server's parent.
    let mut parent = Command::new("/bin/sh")
        .args([
            "-c",
            r#""$0" --exit-with-parent -U "$1" -P "$2" memory 1M & exec sleep 60"#,
            bin.to_str().unwrap(),
            sock.to_str().unwrap(),
            pidfile.to_str().unwrap(),
        ])
        .env("PATH", common::client_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sh");
    let pid = read_pidfile(&pidfile);
    let _guard = PidGuard(pid);
    let out = run_ok(tool("nbdinfo").args(["--size", &format!("nbd+unix:///?socket={}", sock.display())]));
    assert_eq!(out.stdout.trim(), "1048576");
    let _ = parent.kill();
    let _ = parent.wait();
    assert!(common::wait_pid_gone(pid, QUICK), "server outlived its parent despite --exit-with-parent");
}

#[test]
fn sigterm_stops_foreground_server_cleanly() {
    let mut srv = Server::unix(&["memory", "1M"]);
    let st = srv.stop().expect("server status");
    assert_ne!(common::term_signal(&st), Some(libc::SIGKILL), "server ignored SIGTERM for 5 s");
}

#[test]
fn single_mode_over_pipes() {
    // -s speaks NBD on stdin/stdout; do a raw handshake over the pipes.
    let bin = common::server_bin();
    let mut child = Command::new(&bin)
        .args(["-s", "pattern", "1M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn -s");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let pid = child.id() as i32;
    // Bounded: kill the server if the exchange below hangs or the test fails. The child is not
    // reaped before the watchdog is cancelled, so its pid cannot have been reused.
    let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if cancelled.recv_timeout(Duration::from_secs(20)).is_err() {
            common::signal(pid, common::Signal::KILL);
        }
    });
    use std::io::{Read, Write};
    let mut buf = [0u8; 18];
    stdout.read_exact(&mut buf).expect("greeting on stdout");
    assert_eq!(&buf[..8], b"NBDMAGIC");
    stdin.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = common::raw::IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&common::raw::OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    opt.extend(common::raw::Conn::request_bytes(0, common::raw::CMD_READ, 7, 8, 8));
    opt.extend(common::raw::Conn::request_bytes(0, common::raw::CMD_DISC, 8, 0, 0));
    stdin.write_all(&opt).unwrap();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("read until the server exits");
    // size(8) flags(2), then a simple reply (16) and 8 bytes of data.
    assert_eq!(rest.len(), 10 + 16 + 8, "unexpected -s output {rest:?}");
    assert_eq!(u64::from_be_bytes(rest[..8].try_into().unwrap()), 1 << 20);
    assert_eq!(&rest[10 + 16..], &8u64.to_be_bytes());
    let deadline = std::time::Instant::now() + QUICK;
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    cancel.send(()).unwrap();
    watchdog.join().unwrap();
    let st = st.unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("-s server did not exit after NBD_CMD_DISC")
    });
    assert!(st.success(), "-s server exit status {st}");
}

#[test]
fn assorted_options_are_accepted() {
    for opts in [
        &["-n"][..],
        &["-v"],
        &["--threads", "1"],
        &["--threads", "3"],
        &["--memory-limit", "256M"],
        &["--max-request", "1M", "--memory-limit", "8M"],
        &["-e", "ignored"],
    ] {
        let mut args = opts.to_vec();
        args.extend_from_slice(&["memory", "4M"]);
        let srv = Server::unix(&args);
        let out = run_ok(tool("nbdsh").args([
            "-u",
            &srv.uri(),
            "-c",
            "h.pwrite(b'\\x01' * 65536, 4096)",
            "-c",
            "assert h.pread(65536, 4096) == b'\\x01' * 65536",
            "-c",
            "print(h.get_size())",
        ]));
        assert_eq!(out.stdout.trim(), "4194304", "with {opts:?}: {}", out.describe());
    }
}

#[test]
fn max_request_is_advertised_and_enforced() {
    let srv = Server::unix(&["--max-request", "1M", "memory", "4M"]);
    let out = run_ok(tool("nbdsh").args([
        "-u",
        &srv.uri(),
        "-c",
        "assert h.get_block_size(nbd.SIZE_MAXIMUM) == 1048576, h.get_block_size(nbd.SIZE_MAXIMUM)",
        "-c",
        "h.pwrite(b'\\x07' * 1048576, 0)",
        "-c",
        "h.set_strict_mode(0)",
        "-c",
        "try:\n    h.pread(2097152, 0)\n    print('2M read succeeded')\nexcept nbd.Error as e:\n    print('errno', e.errnum)",
        "-c",
        "assert h.pread(1048576, 0) == b'\\x07' * 1048576",
    ]));
    assert_eq!(out.stdout.trim(), "errno 22", "READ over --max-request must get EINVAL:\n{}", out.describe());
}
