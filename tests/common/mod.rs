//! Shared helpers for the integration tests that run the real `blocksmith` binary against real
//! Debian NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh, the Python `nbd` module, fio).
//!
//! Rules every test follows:
//! - servers listen only on a Unix socket in a fresh temporary directory or on 127.0.0.1 with a
//!   port picked by the kernel, and are killed when the [`Server`] is dropped;
//! - every client runs with a bounded timeout ([`CLIENT_TIMEOUT`]) and is killed (with its whole
//!   process group) if it hangs;
//! - a missing client tool fails the test loudly ([`require_tool`]); nothing is ever skipped.
//!   `scripts/test.sh` installs the tools.
//!
//! Setting `BLOCKSMITH_TEST_SERVER=/usr/sbin/nbdkit` (or any path) runs the suite against another
//! server with nbdkit's command line, which is how the tests themselves are validated. Tests of
//! blocksmith-only features are then expected to fail.

#![allow(dead_code)] // each test binary uses a different subset of these helpers

pub mod json;
pub mod raw;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::process::Pid;
pub use rustix::process::Signal;

/// How long a server may take to start accepting connections.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound for one client command.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The distro Python that has the `nbd` module (python3-libnbd).
pub const PYTHON: &str = "/usr/bin/python3";

/// Phrases libnbd logs (or nbdinfo prints with `LIBNBD_DEBUG=1`) when it notices a server bug
/// that it only logs instead of failing (see the protocol checklist's appendix).
pub const LIBNBD_BAD_PHRASES: &[&str] = &[
    "server bug",
    "bug in the server",
    "ignoring improper",
    "ignoring claim",
    "unexpected",
    "wrong byte length",
    "skipping unknown",
];

/// The server binary under test.
pub fn server_bin() -> PathBuf {
    match std::env::var_os("BLOCKSMITH_TEST_SERVER") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_blocksmith")),
    }
}

/// True when the suite is being validated against nbdkit instead of blocksmith.
pub fn testing_nbdkit() -> bool {
    server_bin().file_name().map(|n| n.to_string_lossy().contains("nbdkit")).unwrap_or(false)
}

/// Directory holding the Python helper scripts.
pub fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("python")
}

/// PATH for every spawned process: the distro directories first, so `nbdsh` and any `python3`
/// resolve to Debian's Python that has the `nbd` module, not a pyenv shim.
pub fn client_path() -> OsString {
    let mut p = OsString::from("/usr/bin:/usr/sbin:/bin:/sbin");
    if let Some(old) = std::env::var_os("PATH") {
        p.push(":");
        p.push(old);
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Temporary directories and data
// ---------------------------------------------------------------------------------------------

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, unique directory, removed on drop. Names are short so Unix socket paths fit.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect();
        let path = std::env::temp_dir().join(format!("bs-{tag}-{}-{n}-{nanos:x}", std::process::id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating temp dir {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    if state == 0 {
        state = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Write `len` deterministic random bytes to `path` and return them.
pub fn write_random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(len, seed);
    fs::write(path, &data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    data
}

/// Compare two byte strings and, if they differ, fail with the first differing offset.
pub fn assert_same_bytes(what: &str, expected: &[u8], actual: &[u8]) {
    if expected == actual {
        return;
    }
    let first = expected.iter().zip(actual.iter()).position(|(a, b)| a != b);
    match first {
        Some(i) => panic!(
            "{what}: data differs at byte {i} (0x{i:x}): expected 0x{:02x}, got 0x{:02x} \
             (lengths {} and {})",
            expected[i],
            actual[i],
            expected.len(),
            actual.len()
        ),
        None => {
            panic!("{what}: length differs: expected {} bytes, got {}", expected.len(), actual.len())
        }
    }
}

/// Read a whole file, failing loudly.
pub fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Tools and commands
// ---------------------------------------------------------------------------------------------

/// Find `tool` on the client PATH; fail the test loudly if it is missing.
pub fn require_tool(tool: &str) -> PathBuf {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        assert!(
            p.is_file(),
            "required tool {tool} is missing: run `sudo scripts/test.sh`, which installs the \
             Debian packages the integration tests need"
        );
        return p;
    }
    for dir in std::env::split_paths(&client_path()) {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required tool `{tool}` is not installed: run `sudo scripts/test.sh`, which installs the \
         Debian packages the integration tests need (qemu-utils, libnbd-bin, python3-libnbd, fio, \
         nbdkit)"
    );
}

/// A `Command` for a client tool, with the distro PATH first. Fails if the tool is missing.
pub fn tool(name: &str) -> Command {
    let path = require_tool(name);
    let mut c = Command::new(path);
    c.env("PATH", client_path());
    c
}

/// A `Command` running one of the Python helper scripts under `tests/python/` with the distro
/// Python (which has the `nbd` module).
pub fn python_script(script: &str) -> Command {
    require_tool(PYTHON);
    let path = python_dir().join(script);
    assert!(path.is_file(), "missing helper script {}", path.display());
    let mut c = Command::new(PYTHON);
    c.arg(path).env("PATH", client_path()).env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// What a finished command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout_bytes: Vec<u8>,
    pub stdout: String,
    pub stderr: String,
    pub desc: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panic with everything we know unless the command succeeded.
    pub fn assert_success(self) -> Output {
        assert!(self.status.success(), "command failed ({}):\n{}", self.status, self.describe());
        self
    }

    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.desc,
            self.status,
            truncate(&self.stdout, 8000),
            truncate(&self.stderr, 8000)
        )
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}\n... ({} more bytes)", &s[..cut], s.len() - cut)
}

fn describe_command(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(a));
    }
    s
}

fn shell_quote(a: &OsStr) -> String {
    let a = a.to_string_lossy();
    if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./:,+@%".contains(c)) {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// Run `cmd` to completion within `timeout`. Output goes to files (not pipes), so a daemon that
/// inherits stdout cannot make us wait forever. On timeout the command's whole process group is
/// killed and the test fails with what it printed so far.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let dir = TempDir::new("out");
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let desc = describe_command(cmd);
    cmd.stdout(fs::File::create(&out_path).expect("create stdout file"))
        .stderr(fs::File::create(&err_path).expect("create stderr file"));
    if cmd.get_envs().all(|(k, _)| k != "PATH") {
        cmd.env("PATH", client_path());
    }
    cmd.stdin(Stdio::null()).process_group(0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {desc}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(st) => break st,
            None if Instant::now() >= deadline => {
                kill_group(&mut child);
                let stdout = String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned();
                let stderr = String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned();
                panic!(
                    "command timed out after {timeout:?} and was killed: {desc}\n--- stdout ---\n{}\n\
                     --- stderr ---\n{}",
                    truncate(&stdout, 8000),
                    truncate(&stderr, 8000)
                );
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout_bytes = fs::read(&out_path).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned();
    Output { status, stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(), stdout_bytes, stderr, desc }
}

/// Run with the default client timeout.
pub fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, CLIENT_TIMEOUT)
}

/// Run with the default client timeout and require success.
pub fn run_ok(cmd: &mut Command) -> Output {
    run(cmd).assert_success()
}

fn kill_group(child: &mut Child) {
    // The group we created for this child (`process_group(0)`): its id is the child's.
    let _ = rustix::process::kill_process_group(Pid::from_child(child), Signal::KILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// Fail if libnbd's debug output (`LIBNBD_DEBUG=1`) mentions a server bug it merely logged.
pub fn assert_no_libnbd_complaints(what: &str, debug_output: &str) {
    for line in debug_output.lines() {
        let lower = line.to_ascii_lowercase();
        for phrase in LIBNBD_BAD_PHRASES {
            assert!(!lower.contains(phrase), "{what}: libnbd complained about the server: {line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Is a process (not necessarily our child) still alive? Zombies count as dead.
pub fn pid_alive(pid: i32) -> bool {
    // Signal 0 only checks for existence and permission.
    if !Pid::from_raw(pid).is_some_and(|p| rustix::process::test_kill_process(p).is_ok()) {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state is the first field after the parenthesised command name.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some(Some('Z')) | Some(Some('X')))
        }
        Err(_) => false,
    }
}

/// Wait (bounded) until `pid` is gone.
pub fn wait_pid_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    !pid_alive(pid)
}

/// Send a signal to a process by id (a process already gone is not an error here).
pub fn signal(pid: i32, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Wait (bounded) until a file exists and is non-empty; return its contents.
pub fn wait_for_file(path: &Path, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = fs::read_to_string(path) {
            if !s.is_empty() {
                return Some(s);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

// ---------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------

/// Where a test server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
}

/// A running server (always started with `-f`), killed on drop.
pub struct Server {
    child: Option<Child>,
    pub endpoint: Endpoint,
    pub dir: TempDir,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    pub args: Vec<String>,
}

/// `BLOCKSMITH_TEST_IO=pool` runs the suite on the other IO path: every blocksmith server a
/// test starts gets `--io=pool` unless the test chose a path itself (`scripts/test.sh` runs
/// the integration tests twice, once each way).
fn with_io_path(bin: &Path, mut args: Vec<String>) -> Vec<String> {
    let chosen = args.iter().any(|a| a == "--io" || a.starts_with("--io="));
    match std::env::var("BLOCKSMITH_TEST_IO") {
        Ok(io) if !io.is_empty() && !chosen && bin == server_bin() && !testing_nbdkit() => {
            args.insert(0, format!("--io={io}"));
            args
        }
        _ => args,
    }
}

impl Server {
    /// `blocksmith -f -U DIR/sock ARGS...`
    pub fn unix(args: &[&str]) -> Server {
        Server::start_unix(args, &[])
    }

    /// `blocksmith -f -p PORT -i 127.0.0.1 ARGS...`
    pub fn tcp(args: &[&str]) -> Server {
        Server::start_tcp(args, &[])
    }

    /// Start on a Unix socket with `extra_env` set for the server.
    pub fn start_unix(args: &[&str], extra_env: &[(&str, &str)]) -> Server {
        Server::start_unix_with(&server_bin(), args, extra_env)
    }

    /// Start another server program with nbdkit's command line (nbdkit itself, for comparisons
    /// and for its `nbd` plugin) on a Unix socket.
    pub fn nbdkit_unix(args: &[&str]) -> Server {
        let bin = require_tool("nbdkit");
        Server::start_unix_with(&bin, args, &[])
    }

    fn start_unix_with(bin: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Server {
        let dir = TempDir::new("srv");
        let sock = dir.join("sock");
        let mut full = vec!["-f".to_string(), "-U".to_string(), sock.to_string_lossy().into_owned()];
        full.extend(args.iter().map(|s| s.to_string()));
        Server::spawn(bin, dir, Endpoint::Unix(sock), full, extra_env)
            .unwrap_or_else(|(msg, _)| panic!("{msg}"))
    }

    /// Start on TCP 127.0.0.1 with a free port; retry with another port if it was taken.
    pub fn start_tcp(args: &[&str], extra_env: &[(&str, &str)]) -> Server {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = TempDir::new("srv");
            let port = free_port();
            let mut full = vec![
                "-f".to_string(),
                "-p".to_string(),
                port.to_string(),
                "-i".to_string(),
                "127.0.0.1".to_string(),
            ];
            full.extend(args.iter().map(|s| s.to_string()));
            match Server::spawn(&server_bin(), dir, Endpoint::Tcp(port), full, extra_env) {
                Ok(s) => return s,
                Err((msg, stderr)) => {
                    let lower = stderr.to_ascii_lowercase();
                    if lower.contains("in use") || lower.contains("eaddrinuse") {
                        last = msg;
                        continue;
                    }
                    panic!("{msg}");
                }
            }
        }
        panic!("could not start a TCP server (ports kept being taken): {last}");
    }

    fn spawn(
        bin: &Path,
        dir: TempDir,
        endpoint: Endpoint,
        args: Vec<String>,
        extra_env: &[(&str, &str)],
    ) -> Result<Server, (String, String)> {
        let stdout_path = dir.join("server.stdout");
        let stderr_path = dir.join("server.stderr");
        let args = with_io_path(bin, args);
        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .current_dir(dir.path())
            .env("PATH", client_path())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path).expect("create server stdout"))
            .stderr(fs::File::create(&stderr_path).expect("create server stderr"));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let desc = describe_command(&cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning server {desc}: {e}"));
        let mut server = Server { child: Some(child), endpoint, dir, stdout_path, stderr_path, args };
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if let Some(st) = server.child.as_mut().unwrap().try_wait().expect("try_wait") {
                let stderr = server.stderr();
                let msg = format!(
                    "server exited before accepting connections ({st}): {desc}\n--- server stderr ---\n{}",
                    truncate(&stderr, 8000)
                );
                server.child = None;
                return Err((msg, stderr));
            }
            if server.probe() {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                let stderr = server.stderr();
                return Err((
                    format!(
                        "server did not accept connections within {SERVER_START_TIMEOUT:?}: {desc}\n\
                         --- server stderr ---\n{}",
                        truncate(&stderr, 8000)
                    ),
                    stderr,
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Can we connect right now?
    fn probe(&self) -> bool {
        match &self.endpoint {
            Endpoint::Unix(p) => UnixStream::connect(p).is_ok(),
            Endpoint::Tcp(port) => TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], *port)),
                Duration::from_millis(500),
            )
            .is_ok(),
        }
    }

    /// The NBD URI of the default export.
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    /// The NBD URI of a named export (`name` must be URI-safe).
    pub fn uri_for(&self, name: &str) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Endpoint::Tcp(port) => format!("nbd://127.0.0.1:{port}/{name}"),
        }
    }

    pub fn socket_path(&self) -> &Path {
        match &self.endpoint {
            Endpoint::Unix(p) => p,
            Endpoint::Tcp(_) => panic!("not a Unix-socket server"),
        }
    }

    /// A raw protocol connection to the server.
    pub fn raw(&self) -> raw::Conn {
        let stream = match &self.endpoint {
            Endpoint::Unix(p) => raw::Stream::Unix(
                UnixStream::connect(p).unwrap_or_else(|e| panic!("connect {}: {e}", p.display())),
            ),
            Endpoint::Tcp(port) => raw::Stream::Tcp(
                TcpStream::connect(("127.0.0.1", *port)).unwrap_or_else(|e| panic!("connect :{port}: {e}")),
            ),
        };
        raw::Conn::new(stream)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// Is the server process still running?
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Assert the server is still running (with its stderr if not).
    pub fn assert_alive(&mut self) {
        assert!(self.alive(), "server died unexpectedly\n--- server stderr ---\n{}", self.stderr());
    }

    /// Wait (bounded) for the server to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Some(st) = c.try_wait().expect("try_wait") {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stdout_path).unwrap_or_default()).into_owned()
    }

    /// Stop the server now (SIGTERM, then SIGKILL after 5 s). Returns its exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        signal(child.id() as i32, Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!("--- server ({}) stderr ---\n{}", self.args.join(" "), truncate(&self.stderr(), 8000));
        }
    }
}

/// Run the server binary itself (not as a long-running server), e.g. `--help` or a bad command
/// line, bounded by `timeout`.
pub fn run_server_cmd(args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(server_bin());
    cmd.args(args);
    run_with_timeout(&mut cmd, timeout)
}

/// The signal that terminated a process, if any.
pub fn term_signal(st: &ExitStatus) -> Option<i32> {
    st.signal()
}

/// Read all of a stream until EOF, with a bound.
pub fn read_all_bounded<R: Read>(r: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 || out.len() > max {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing client output
// ---------------------------------------------------------------------------------------------

/// One line of `nbdinfo --map` output: (offset, length, type, description).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub offset: u64,
    pub length: u64,
    pub kind: u32,
    pub desc: String,
}

/// Parse `nbdinfo --map` output.
pub fn parse_nbdinfo_map(out: &str) -> Vec<MapEntry> {
    let mut v = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let parse = |s: Option<&str>| -> u64 {
            s.and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad nbdinfo --map line: {line:?}"))
        };
        let offset = parse(it.next());
        let length = parse(it.next());
        let kind = parse(it.next()) as u32;
        let desc = it.collect::<Vec<_>>().join(" ");
        v.push(MapEntry { offset, length, kind, desc });
    }
    v
}

/// Check that map entries are contiguous from 0 and cover exactly `size` bytes.
pub fn assert_map_covers(map: &[MapEntry], size: u64) {
    let mut pos = 0;
    for e in map {
        assert_eq!(e.offset, pos, "map is not contiguous at {pos}: {map:?}");
        assert!(e.length > 0, "zero-length map entry: {map:?}");
        pos += e.length;
    }
    assert_eq!(pos, size, "map does not cover the disk exactly: {map:?}");
}

/// The map type (bit 0 hole, bit 1 zero) of every byte in `[start, end)`; fails if the range
/// crosses entries of different types.
pub fn map_kind_of(map: &[MapEntry], start: u64, end: u64) -> u32 {
    let mut kind = None;
    for e in map {
        let (a, b) = (e.offset, e.offset + e.length);
        if b <= start || a >= end {
            continue;
        }
        match kind {
            None => kind = Some(e.kind),
            Some(k) if k == e.kind => {}
            Some(k) => panic!("range [{start}, {end}) has mixed map types {k} and {}: {map:?}", e.kind),
        }
    }
    kind.unwrap_or_else(|| panic!("range [{start}, {end}) not in map {map:?}"))
}

/// Parse a size as blocksmith/nbdkit print it in `nbdinfo` ("export-size: N").
pub fn nbdinfo_field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| {
        let l = l.trim();
        l.strip_prefix(key).and_then(|r| r.strip_prefix(':')).map(|v| v.trim())
    })
}
