//! The overlay, fault, access and lifecycle filters through the real binary and real clients:
//! cow, cache, readahead, scan, error, evil, rate, ip, limit, time-limit, exitlast, exitwhen,
//! exportname, and how `--filter` order changes what a stack does.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_same_bytes, python_script, read_file, run, run_ok, run_server_cmd, tool, write_random_file,
    Server, TempDir,
};

const MIB: usize = 1 << 20;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Make a file read-only the way nbdkit's documentation does for cow. (As root the file backend
/// may still open it read-write; the tests compare its bytes, which is what matters.)
fn chmod_ro(p: &Path) {
    fs::set_permissions(p, fs::Permissions::from_mode(0o444)).expect("chmod 0444");
}

/// Files left in a directory the server used as `$TMPDIR`.
fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Bytes allocated to a deleted temporary file the server holds open, found by name under
/// /proc/PID/fd.
fn temp_file_allocated(pid: i32, name_part: &str) -> Option<u64> {
    for e in fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let target = fs::read_link(e.path()).ok()?;
        let t = target.to_string_lossy();
        if t.contains(name_part) && t.ends_with("(deleted)") {
            return fs::metadata(e.path()).ok().map(|m| m.blocks() * 512);
        }
    }
    None
}

fn nbdsh(uri: &str, code: &str) -> String {
    run_ok(tool("nbdsh").args(["-u", uri, "-c", code])).stdout
}

// ---------------------------------------------------------------------------------------------
// cow
// ---------------------------------------------------------------------------------------------

#[test]
fn cow_writes_land_in_the_overlay_and_the_file_is_unchanged() {
    let dir = TempDir::new("cow");
    let tmp = dir.join("tmp");
    fs::create_dir(&tmp).unwrap();
    let img = dir.join("disk.img");
    let original = write_random_file(&img, 4 * MIB, 1);
    chmod_ro(&img);
    let mut srv = Server::start_unix(&["--filter=cow", "file", &s(&img)], &[("TMPDIR", &s(&tmp))]);
    run_ok(python_script("filters_overlay_cow.py").arg(srv.uri()));
    // A copy made through the server has the writes; the file does not.
    let out = dir.join("copy.img");
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&out));
    let copy = read_file(&out);
    assert_ne!(copy, original, "the writes are visible through the server");
    assert_same_bytes("file below the cow overlay", &original, &read_file(&img));
    // The overlay lives in $TMPDIR but was unlinked at once: nothing to see or clean up.
    assert!(temp_file_allocated(srv.pid(), "blocksmith-cow").is_some(), "overlay file is open");
    assert_eq!(leftovers(&tmp), Vec::<String>::new());
    srv.stop();
    assert_eq!(leftovers(&tmp), Vec::<String>::new());
    assert_same_bytes("file after the server exits", &original, &read_file(&img));
}

#[test]
fn cow_makes_a_read_only_backend_writable() {
    // The pattern backend cannot write at all.
    let srv = Server::unix(&["--filter=cow", "pattern", "1M", "cow-block-size=4k"]);
    let out = nbdsh(
        &srv.uri(),
        "assert not h.is_read_only()\n\
         h.pwrite(b'\\xff' * 10, 4090)\n\
         b = h.pread(20, 4088)\n\
         import struct\n\
         assert b[2:12] == b'\\xff' * 10, b\n\
         assert b[:2] == struct.pack('>Q', 4088)[:2], b\n\
         print('ok')",
    );
    assert_eq!(out.trim(), "ok");
    // Without the overlay the same write is refused.
    let ro = Server::unix(&["pattern", "1M"]);
    let out = nbdsh(&ro.uri(), "print(h.is_read_only())");
    assert_eq!(out.trim(), "True");
}

// ---------------------------------------------------------------------------------------------
// cache
// ---------------------------------------------------------------------------------------------

#[test]
fn cache_writeback_reaches_the_file_only_on_flush() {
    let dir = TempDir::new("cachewb");
    let img = dir.join("disk.img");
    let original = write_random_file(&img, 2 * MIB, 2);
    let srv = Server::unix(&["--filter=cache", "file", &s(&img), "cache=writeback"]);
    // Written, not flushed: only in the cache.
    nbdsh(&srv.uri(), "h.pwrite(b'\\xaa' * 65536, 65536)\nh.pwrite(b'\\xbb' * 100, 1000)");
    assert_same_bytes("file before flush", &original, &read_file(&img));
    // Another connection reads the cached data, then flushes: the cache is shared.
    let out = nbdsh(
        &srv.uri(),
        "assert h.pread(65536, 65536) == b'\\xaa' * 65536\n\
         assert h.pread(100, 1000) == b'\\xbb' * 100\n\
         h.flush()\n\
         print('ok')",
    );
    assert_eq!(out.trim(), "ok");
    let mut expect = original.clone();
    expect[65536..131072].fill(0xaa);
    expect[1000..1100].fill(0xbb);
    assert_same_bytes("file after flush", &expect, &read_file(&img));

    // writethrough: in the file at once.
    let srv = Server::unix(&["--filter=cache", "file", &s(&img), "cache=writethrough"]);
    nbdsh(&srv.uri(), "h.pwrite(b'\\xcc' * 4096, 0)");
    assert_eq!(read_file(&img)[..4096], [0xcc; 4096]);
}

#[test]
fn cache_max_size_reclaims_and_loses_nothing() {
    let dir = TempDir::new("cachemax");
    let tmp = dir.join("tmp");
    fs::create_dir(&tmp).unwrap();
    let img = dir.join("disk.img");
    write_random_file(&img, 8 * MIB, 3);
    let srv = Server::start_unix(
        &["--filter=cache", "file", &s(&img), "cache-max-size=1M", "cache-min-block-size=64k"],
        &[("TMPDIR", &s(&tmp))],
    );
    let expected = dir.join("expected.img");
    run_ok(python_script("filters_overlay_cache.py").arg(srv.uri()).arg(&expected));
    // 8 MiB went through a cache of 1 MiB: blocks were reclaimed (dirty ones written back
    // first), the cache file never held more than its limit, and the flush left the file right.
    let allocated = temp_file_allocated(srv.pid(), "blocksmith-cache").expect("cache file open");
    assert!(allocated <= MIB as u64, "cache file holds {allocated} bytes, limit 1 MiB");
    assert_same_bytes("file after flush", &read_file(&expected), &read_file(&img));
    assert_eq!(leftovers(&tmp), Vec::<String>::new());
}

#[test]
fn concurrent_clients_on_several_loops_keep_every_byte() {
    let dir = TempDir::new("conc");
    let img = dir.join("disk.img");
    write_random_file(&img, 2 * MIB, 7);
    let img = s(&img);
    let stacks: [&[&str]; 3] = [
        &["--threads=4", "--filter=cow", "file", &img, "cow-block-size=4k"],
        &["--threads=4", "--filter=cow", "file", &img],
        &["--threads=4", "--filter=cache", "file", &img, "cache-max-size=256k", "cache-min-block-size=64k"],
    ];
    for argv in stacks {
        let srv = Server::unix(argv);
        run_ok(python_script("filters_overlay_concurrent.py").arg(srv.uri()).arg("4"));
    }
}

// ---------------------------------------------------------------------------------------------
// readahead, scan
// ---------------------------------------------------------------------------------------------

#[test]
fn readahead_and_scan_serve_the_right_data() {
    let dir = TempDir::new("ra");
    let img = dir.join("disk.img");
    let original = write_random_file(&img, 8 * MIB, 4);
    let img = s(&img);
    let stacks: [&[&str]; 4] = [
        &["--filter=readahead", "file", &img],
        &["--filter=readahead", "--filter=cache", "file", &img],
        &["--filter=scan", "--filter=cache", "file", &img],
        &["--filter=scan", "--filter=cow", "file", &img, "cow-on-cache=true"],
    ];
    for argv in stacks {
        let srv = Server::unix(argv);
        let out = dir.join("copy.img");
        // Small sequential requests, as a guest would make.
        run_ok(
            tool("nbdcopy")
                .args(["--request-size=65536", "--connections=1", "--requests=1"])
                .arg(srv.uri())
                .arg(&out),
        );
        assert_same_bytes(&format!("copy through {argv:?}"), &original, &read_file(&out));
    }
}

// ---------------------------------------------------------------------------------------------
// error, evil, rate, time-limit
// ---------------------------------------------------------------------------------------------

#[test]
fn error_trigger_file_switches_errors_on_and_off() {
    let dir = TempDir::new("err");
    let trigger = dir.join("inject");
    let srv = Server::unix(&[
        "--filter=error",
        "memory",
        "1M",
        "error-rate=100%",
        &format!("error-file={}", s(&trigger)),
    ]);
    run_ok(python_script("filters_overlay_error.py").arg(srv.uri()).arg(&trigger));
}

#[test]
fn evil_corrupts_reads_the_same_way_for_the_same_seed() {
    let dir = TempDir::new("evil");
    let img = dir.join("disk.img");
    let original = write_random_file(&img, 2 * MIB, 5);
    let srv = Server::unix(&[
        "--filter=evil",
        "file",
        &s(&img),
        "evil=stuck-bits",
        "evil-probability=1e-4",
        "evil-seed=1234",
    ]);
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&a));
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&b));
    let (a, b) = (read_file(&a), read_file(&b));
    assert_eq!(a, b, "stuck bits stay stuck");
    let flipped: u32 = a.iter().zip(&original).map(|(x, y)| (x ^ y).count_ones()).sum();
    // 16 Mbit at 1e-4, about half of them stuck at the value they already had: ~840.
    assert!((500..1300).contains(&flipped), "{flipped} bits differ");
    assert_same_bytes("the file itself", &original, &read_file(&img));
}

#[test]
fn rate_limited_requests_complete() {
    // Functional only: speed belongs to bench/rate.sh.
    let srv = Server::unix(&["--filter=rate", "memory", "4M", "rate=64M", "connection-rate=32M"]);
    let out = nbdsh(
        &srv.uri(),
        "h.pwrite(b'\\x5a' * 1048576, 0)\nassert h.pread(1048576, 0) == b'\\x5a' * 1048576\nprint('ok')",
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn time_limit_disconnects_the_client() {
    let srv = Server::unix(&["--filter=time-limit", "memory", "1M", "time-limit=1s"]);
    let out = nbdsh(
        &srv.uri(),
        "import time\n\
         h.pread(512, 0)\n\
         time.sleep(1.5)\n\
         try:\n    h.pread(512, 0)\n    print('still served')\n\
         except nbd.Error as e:\n    print('refused:', e)",
    );
    assert!(out.trim().starts_with("refused:"), "{out}");
    // Another client is served (its own clock starts when it connects).
    assert_eq!(nbdsh(&srv.uri(), "print(h.get_size())").trim(), "1048576");
}

// ---------------------------------------------------------------------------------------------
// ip, limit
// ---------------------------------------------------------------------------------------------

fn can_open(uri: &str) -> bool {
    run(tool("nbdinfo").args(["--size", uri])).success()
}

#[test]
fn ip_filter_on_a_unix_socket() {
    let denied = Server::unix(&["--filter=ip", "memory", "1M", "deny=anyunix"]);
    assert!(!can_open(&denied.uri()));
    let allowed = Server::unix(&["--filter=ip", "memory", "1M", "allow=anyunix", "deny=all"]);
    assert!(can_open(&allowed.uri()));
    let other = Server::unix(&["--filter=ip", "memory", "1M", "allow=127.0.0.1", "deny=all"]);
    assert!(!can_open(&other.uri()), "a TCP rule does not let a Unix client in");
}

#[test]
fn ip_filter_on_tcp_loopback() {
    let allowed = Server::tcp(&["--filter=ip", "memory", "1M", "allow=127.0.0.1", "deny=all"]);
    assert!(can_open(&allowed.uri()));
    let net = Server::tcp(&["--filter=ip", "memory", "1M", "deny=127.0.0.0/8"]);
    assert!(!can_open(&net.uri()));
    let v6only = Server::tcp(&["--filter=ip", "memory", "1M", "allow=::1,anyunix", "deny=all"]);
    assert!(!can_open(&v6only.uri()));
    let v4 = Server::tcp(&["--filter=ip", "memory", "1M", "deny=anyipv6"]);
    assert!(can_open(&v4.uri()));
}

#[test]
fn limit_refuses_a_second_client() {
    let srv = Server::unix(&["--filter=limit", "memory", "1M", "limit=1"]);
    run_ok(python_script("filters_overlay_limit.py").arg(srv.uri()));
}

// ---------------------------------------------------------------------------------------------
// exitlast, exitwhen
// ---------------------------------------------------------------------------------------------

#[test]
fn exitlast_exits_after_the_last_client() {
    let mut srv = Server::unix(&["--filter=exitlast", "memory", "1M"]);
    // Not before the first client.
    assert!(srv.wait_exit(Duration::from_millis(300)).is_none());
    let uri = srv.uri();
    run_ok(tool("nbdinfo").args(["--size", &uri]));
    let st = srv.wait_exit(Duration::from_secs(15)).expect("server exited after its last client");
    assert!(st.success(), "{st}");
}

/// A helper process, killed if the test ends first.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exists(p: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !p.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn hold_connection(uri: &str, ready: &Path, release: &Path) -> Helper {
    let mut cmd: Command = python_script("filters_overlay_hold.py");
    cmd.arg(uri).arg(ready).arg(release).stdin(Stdio::null());
    Helper(cmd.spawn().expect("spawn the holding client"))
}

#[test]
fn exitwhen_file_created_shuts_down_once_clients_leave() {
    let dir = TempDir::new("exitwhen");
    let stop = dir.join("stop");
    let (ready, release) = (dir.join("ready"), dir.join("release"));
    let mut srv = Server::unix(&[
        "--filter=exitwhen",
        "memory",
        "1M",
        &format!("exit-when-file-created={}", s(&stop)),
        // Whole seconds, so nbdkit can run this test too.
        "exit-when-poll=1",
    ]);
    let uri = srv.uri();
    let mut holder = hold_connection(&uri, &ready, &release);
    assert!(wait_exists(&ready, Duration::from_secs(20)), "the holding client connected");
    fs::write(&stop, b"").unwrap();
    // The event happened with a client connected: the server stays for it, refuses new ones.
    std::thread::sleep(Duration::from_millis(1500));
    srv.assert_alive();
    assert!(!can_open(&uri), "a new client was let in after the event");
    fs::write(&release, b"").unwrap();
    let st = holder.0.wait().expect("holding client");
    assert!(st.success(), "the connected client was served to the end");
    let st = srv.wait_exit(Duration::from_secs(15)).expect("server exited after the last client");
    assert!(st.success(), "{st}");
}

#[test]
fn exitwhen_blocksmith_spelling_and_idle_polling() {
    let dir = TempDir::new("exitwhen2");
    let stop = dir.join("stop");
    let mut srv = Server::unix(&[
        "--filter=exitwhen",
        "memory",
        "1M",
        &format!("exitwhen-file-created={}", s(&stop)),
        "exitwhen-poll=100ms",
    ]);
    // One client starts the polling; then the server is idle when the file appears.
    run_ok(tool("nbdinfo").args(["--size", &srv.uri()]));
    assert!(srv.wait_exit(Duration::from_millis(300)).is_none());
    fs::write(&stop, b"").unwrap();
    let st = srv.wait_exit(Duration::from_secs(15)).expect("server exited when the file appeared");
    assert!(st.success(), "{st}");
}

// ---------------------------------------------------------------------------------------------
// exportname
// ---------------------------------------------------------------------------------------------

#[test]
fn exportname_lists_and_rewrites_names() {
    let dir = TempDir::new("expname");
    let log = dir.join("log");
    let srv = Server::unix(&[
        "--filter=exportname",
        "--filter=log",
        "memory",
        "1M",
        &format!("logfile={}", s(&log)),
        "default-export=disk1",
        "exportname-list=explicit",
        "exportname=disk1",
        "exportname=disk2",
        "exportdesc=fixed:a test disk",
    ]);
    let list = run_ok(tool("nbdinfo").args(["--list", &srv.uri()])).stdout;
    assert!(list.contains("export=\"disk1\"") && list.contains("export=\"disk2\""), "{list}");
    assert!(list.contains("description: a test disk"), "{list}");
    // The default export reaches the layer below as disk1 (the log filter sits below).
    run_ok(tool("nbdinfo").args(["--size", &srv.uri()]));
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("export=disk1") || text.contains("export='disk1'"), "{text}");

    let strict =
        Server::unix(&["--filter=exportname", "memory", "1M", "exportname-strict=true", "exportname=ok"]);
    assert!(can_open(&strict.uri_for("ok")));
    assert!(!can_open(&strict.uri_for("other")));
    assert!(!can_open(&strict.uri()), "the default export is not listed");

    let empty = Server::unix(&["--filter=exportname", "memory", "1M", "exportname-list=empty"]);
    let list = run_ok(tool("nbdinfo").args(["--list", &empty.uri()])).stdout;
    assert!(!list.contains("export="), "{list}");
}

// ---------------------------------------------------------------------------------------------
// Stacking order
// ---------------------------------------------------------------------------------------------

/// `--filter=offset --filter=cow`: the overlay covers the whole file and the window starts 4K
/// into it, so client block 0 straddles two overlay blocks. `--filter=cow --filter=offset`: the
/// overlay covers the window, aligned to it. Same data either way; different block behaviour.
#[test]
fn offset_and_cow_in_either_order() {
    let dir = TempDir::new("order");
    let img = dir.join("disk.img");
    let original = write_random_file(&img, MIB, 6);
    chmod_ro(&img);
    let check = "import errno\n\
                 h.zero(65536, 0)\n\
                 try:\n    h.zero(65536, 61440, nbd.CMD_FLAG_FAST_ZERO)\n    print('fast')\n\
                 except nbd.Error as e:\n    print(errno.errorcode.get(e.errnum))\n\
                 h.pwrite(b'\\x01' * 10, 200000)";
    let mut results = Vec::new();
    for order in [["--filter=offset", "--filter=cow"], ["--filter=cow", "--filter=offset"]] {
        let srv = Server::unix(&[order[0], order[1], "file", &s(&img), "offset=4096"]);
        let fast = nbdsh(&srv.uri(), check);
        let map = run_ok(tool("nbdinfo").args(["--map", &srv.uri()])).stdout;
        let out = dir.join("copy.img");
        run_ok(tool("nbdcopy").arg(srv.uri()).arg(&out));
        results.push((fast.trim().to_string(), map, read_file(&out)));
    }
    // The data each stack should hold: the fast zero only happened where it was accepted.
    let mut expect = original[4096..].to_vec();
    expect[..65536].fill(0);
    expect[200000..200010].fill(1);
    assert_same_bytes("cow over offset", &expect, &results[1].2);
    expect[61440..61440 + 65536].fill(0);
    assert_same_bytes("offset over cow", &expect, &results[0].2);
    assert_same_bytes("the file", &original, &read_file(&img));
    // Offset over cow: client offset 61440 is disk offset 65536, a whole overlay block, so the
    // fast zero succeeds; the first client block maps to parts of two overlay blocks, written as
    // data. Cow over offset: the overlay is aligned to the window, 61440 is not a block start
    // (ENOTSUP), and the first 64K were zeroed as a whole block: a hole.
    assert_eq!(results[0].0, "fast");
    assert_eq!(results[1].0, "ENOTSUP");
    let first =
        |map: &str| map.lines().next().unwrap_or("").split_whitespace().skip(3).collect::<Vec<_>>().join(" ");
    assert_eq!(first(&results[0].1), "data", "{}", results[0].1);
    assert_eq!(first(&results[1].1), "hole,zero", "{}", results[1].1);
}

// ---------------------------------------------------------------------------------------------
// Help and start-up errors
// ---------------------------------------------------------------------------------------------

#[test]
fn every_filter_has_help_and_rejects_bad_parameters_at_start_up() {
    let cases: &[(&str, &str, &str)] = &[
        ("cow", "cow-block-size=1000", "power of two"),
        ("cache", "cache=sometimes", "writeback, writethrough or unsafe"),
        ("scan", "scan-size=3M", "power of two"),
        ("error", "error=EWHAT", "unknown error name"),
        ("evil", "evil=gremlins", "cosmic-rays"),
        ("rate", "rate=0", "cannot be 0"),
        ("ip", "allow=uid:root", "numeric user id"),
        ("limit", "limit=x", "expected a number"),
        ("time-limit", "time-limit=soon", "could not parse duration"),
        ("exitwhen", "exit-when-poll=0", "more than 0"),
        ("exportname", "exportname-list=error", "not supported"),
    ];
    for (filter, bad, msg) in cases {
        let help =
            run_server_cmd(&[&format!("--filter={filter}"), "null", "--help"], Duration::from_secs(20));
        assert!(help.success(), "{}", help.describe());
        assert!(help.stdout.contains(&format!("filter {filter}:")), "{}", help.stdout);
        let started = Instant::now();
        let out = run_server_cmd(
            &["-f", "-U", "/nonexistent/sock", &format!("--filter={filter}"), "null", bad],
            Duration::from_secs(20),
        );
        assert!(!out.success(), "{filter} {bad} was accepted");
        assert!(out.stderr.contains(msg), "{filter} {bad}: {}", out.stderr);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    for filter in ["readahead", "exitlast"] {
        let help =
            run_server_cmd(&[&format!("--filter={filter}"), "null", "--help"], Duration::from_secs(20));
        assert!(help.stdout.contains("no parameters"), "{}", help.stdout);
    }
}
