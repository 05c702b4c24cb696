//! The `sh` and `eval` backends with the real binary and real clients, checked against nbdkit's
//! sh and eval plugins running the very same scripts.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{nbdinfo_field, run, run_ok, tool, Server, TempDir, PYTHON};

const MIB: usize = 1 << 20;

/// The demo script, copied next to the test's files and made executable (git may not keep the
/// mode).
fn demo_script(dir: &TempDir) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/sh_ramdisk.sh");
    let text = fs::read_to_string(&src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    script(dir, "ramdisk.sh", &text)
}

fn script(dir: &TempDir, name: &str, text: &str) -> String {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p.to_string_lossy().into_owned()
}

/// Run Python code (with the distro `nbd` module) with `args`; it must succeed.
fn python(code: &str, args: &[&str]) -> common::Output {
    run_ok(tool(PYTHON).arg("-c").arg(code).args(args))
}

/// The talk's demo, as a test: partition the shell-script disk with sfdisk, write and read it
/// with qemu-io, copy it out with nbdcopy; nbdkit running the same script must give the same
/// bytes.
#[test]
fn demo_ramdisk_partitioned_written_and_same_as_nbdkit() {
    let dir = TempDir::new("shdemo");
    let demo = demo_script(&dir);

    // A DOS partition table with a fixed disk id, made on a local image of the same size.
    let pt = dir.join("pt.img");
    fs::File::create(&pt).unwrap().set_len(16 * MIB as u64).unwrap();
    let layout = dir.join("layout");
    fs::write(&layout, "label: dos\nlabel-id: 0x0badcafe\n,4M,L\n,,L\n").unwrap();
    run_ok(tool("sh").arg("-c").arg("sfdisk -q \"$1\" < \"$2\"").arg("sh").arg(&pt).arg(&layout));

    let ours = Server::unix(&["sh", &demo]);
    let theirs = Server::nbdkit_unix(&["sh", &demo]);
    let mut images = Vec::new();
    for (who, srv) in [("blocksmith", &ours), ("nbdkit", &theirs)] {
        run_ok(tool("nbdcopy").arg(&pt).arg(srv.uri()));
        let out = run_ok(tool("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x55 1M 64k",
            "-c",
            "read -P 0x55 1M 64k",
            &srv.uri(),
        ]));
        assert!(
            out.stdout.contains("wrote 65536/65536 bytes at offset 1048576")
                && out.stdout.contains("read 65536/65536 bytes at offset 1048576")
                && !out.stdout.contains("fail"),
            "{who}: qemu-io:\n{}",
            out.describe()
        );
        let img = dir.join(&format!("{who}.img"));
        run_ok(tool("nbdcopy").arg(srv.uri()).arg(&img));
        let listing = run_ok(tool("sfdisk").arg("-d").arg(&img)).stdout;
        assert!(listing.contains("label-id: 0x0badcafe"), "{who}: {listing}");
        assert_eq!(listing.matches("type=83").count(), 2, "{who}: two Linux partitions expected:\n{listing}");
        let bytes = common::read_file(&img);
        assert_eq!(bytes.len(), 16 * MIB);
        assert!(bytes[MIB..MIB + 65536].iter().all(|&b| b == 0x55), "{who}: pattern missing");
        images.push(bytes);
    }
    common::assert_same_bytes("blocksmith sh vs nbdkit sh", &images[1], &images[0]);
    stop_all([ours, theirs]);
}

/// 200 reads in flight over four connections against a script that sleeps 100 ms, with at most
/// 64 scripts at a time: all complete with the right data, and no more than 64 ever overlap.
#[test]
fn two_hundred_sleepy_reads_under_a_cap_of_64() {
    let dir = TempDir::new("shload");
    let log = dir.join("runs.log");
    let text = format!(
        r#"#!/bin/sh
case "$1" in
  thread_model) echo parallel ;;
  get_size) echo 1M ;;
  pread)
    echo "S $(date +%s%N)" >> {log}
    sleep 0.1
    printf '%016d' "$4"
    dd if=/dev/zero bs=$(($3 - 16)) count=1 status=none
    echo "E $(date +%s%N)" >> {log} ;;
  *) exit 2 ;;
esac
"#,
        log = log.display()
    );
    let s = script(&dir, "sleepy.sh", &text);
    let srv = Server::unix(&["sh", &s, "max-children=64"]);
    let started = Instant::now();
    python(
        r#"
import sys, nbd
uri = sys.argv[1]
hs = []
for _ in range(4):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
reqs = []
for i in range(200):
    h = hs[i % 4]
    b = nbd.Buffer(4096)
    reqs.append((h, i * 4096, b, h.aio_pread(b, i * 4096)))
for h in hs:
    while h.aio_in_flight() > 0:
        h.poll(-1)
for h, off, b, c in reqs:
    assert h.aio_command_completed(c), off
    got = b.to_bytearray()
    assert got[:16] == b"%016d" % off, (off, got[:16])
    assert got[16:] == bytearray(4096 - 16), off
for h in hs:
    h.shutdown()
print("ok")
"#,
        &[&srv.uri()],
    );
    eprintln!("200 sleepy reads took {:?}", started.elapsed());
    // Reconstruct how many scripts overlapped from their start and end stamps.
    let text = fs::read_to_string(&log).unwrap();
    let mut events: Vec<(u128, i32)> = text
        .lines()
        .map(|l| {
            let (kind, t) = l.split_once(' ').unwrap_or_else(|| panic!("bad log line {l:?}"));
            (t.trim().parse().unwrap(), if kind == "S" { 1 } else { -1 })
        })
        .collect();
    assert_eq!(events.len(), 400, "every read ran the script once");
    events.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in events {
        now += d;
        most = most.max(now);
    }
    assert!(most <= 64, "{most} scripts overlapped, more than max-children=64");
    assert!(most > 1, "the reads never ran in parallel");
    stop_all([srv]);
}

/// A script that hangs is killed after script-timeout; its request fails with EIO while the
/// server goes on serving, and nothing is left behind (no zombie, no orphaned sleep).
#[test]
fn a_hanging_script_is_killed_and_its_request_fails_with_eio() {
    let dir = TempDir::new("shhang");
    let s = script(
        &dir,
        "hang.sh",
        r#"#!/bin/sh
case "$1" in
  thread_model) echo parallel ;;
  get_size) echo 1M ;;
  pread)
    if [ "$4" = 0 ]; then sleep 3599.25; fi
    dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  *) exit 2 ;;
esac
"#,
    );
    let mut srv = Server::unix(&["sh", &s, "script-timeout=1s"]);
    python(
        r#"
import sys, errno, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
b = nbd.Buffer(512)
c = h.aio_pread(b, 0)
# The hung read does not hold up the others.
assert h.pread(512, 4096) == bytes(512)
while h.aio_in_flight() > 0:
    h.poll(-1)
try:
    h.aio_command_completed(c)
    raise SystemExit("the hung read succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EIO, e
assert h.pread(4096, 8192) == bytes(4096)
h.shutdown()
"#,
        &[&srv.uri()],
    );
    srv.assert_alive();
    let out = run_ok(tool("nbdinfo").arg(srv.uri()));
    assert_eq!(
        nbdinfo_field(&out.stdout, "export-size").map(|v| v.split(' ').next().unwrap_or("")),
        Some("1048576")
    );
    // The sleep died with its script (the whole process group), and the script was reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sleepers = processes_with("3599.25");
        let zombies = zombie_children(srv.pid());
        if sleepers.is_empty() && zombies.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: sleepers {sleepers:?}, zombies {zombies:?}");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(srv.stderr().contains("timed out"), "the kill is logged:\n{}", srv.stderr());
    stop_all([srv]);
}

/// Pids whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) && common::pid_alive(pid) {
            v.push(pid);
        }
    }
    v
}

/// Zombie children of `pid` (any of its threads).
fn zombie_children(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let kids = fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for k in kids.split_whitespace().filter_map(|k| k.parse::<i32>().ok()) {
            let stat = fs::read_to_string(format!("/proc/{k}/stat")).unwrap_or_default();
            if stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')) {
                v.push(k);
            }
        }
    }
    v
}

/// The same eval command line under blocksmith and nbdkit: a writable disk from four
/// fragments, can_write implied by pwrite.
#[test]
fn eval_with_a_few_methods_matches_nbdkit() {
    let args = [
        "eval",
        "get_ready=truncate -s 4M $tmpdir/d",
        "get_size=stat -c %s $tmpdir/d",
        "pread=dd if=$tmpdir/d skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        "pwrite=dd of=$tmpdir/d seek=$4 conv=notrunc oflag=seek_bytes status=none",
        "thread_model=echo parallel",
    ];
    let ours = Server::unix(&args);
    let theirs = Server::nbdkit_unix(&args);
    let mut infos = Vec::new();
    for (who, srv) in [("blocksmith", &ours), ("nbdkit", &theirs)] {
        let out = run_ok(tool("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xa7 100k 300k",
            "-c",
            "read -P 0xa7 100k 300k",
            "-c",
            "read -P 0 0 100k",
            &srv.uri(),
        ]));
        assert!(!out.stdout.contains("fail"), "{who}: {}", out.describe());
        let info = run_ok(tool("nbdinfo").arg(srv.uri())).stdout;
        let fields: Vec<(&str, String)> =
            ["export-size", "is_read_only", "can_flush", "can_trim", "can_zero"]
                .into_iter()
                .map(|k| (k, nbdinfo_field(&info, k).unwrap_or("?").to_string()))
                .collect();
        infos.push(fields);
    }
    assert_eq!(infos[0], infos[1], "blocksmith vs nbdkit eval");
    assert!(infos[0].contains(&("is_read_only", "false".to_string())), "{:?}", infos[0]);
    stop_all([ours, theirs]);
}

/// Exit codes: 1 with ENOSPC on stderr reaches the client as ENOSPC, 2 falls back (flush
/// succeeds), 3 is a false capability, the same under blocksmith and nbdkit.
#[test]
fn exit_codes_one_two_three_as_nbdkit() {
    let dir = TempDir::new("shexit");
    let s = script(
        &dir,
        "codes.sh",
        r#"#!/bin/sh
case "$1" in
  get_size) echo 1M ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  can_write|can_flush|is_rotational) exit 0 ;;
  pwrite) cat >/dev/null; echo "ENOSPC the disk is full" >&2; exit 1 ;;
  flush) exit 2 ;;
  can_trim|can_extents|can_multi_conn) exit 3 ;;
  *) exit 2 ;;
esac
"#,
    );
    let ours = Server::unix(&["sh", &s]);
    let theirs = Server::nbdkit_unix(&["sh", &s]);
    let mut seen = Vec::new();
    for (who, srv) in [("blocksmith", &ours), ("nbdkit", &theirs)] {
        python(
            r#"
import sys, errno, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x" * 4096, 0)
    raise SystemExit("pwrite succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
h.flush()
assert h.pread(512, 0) == bytes(512)
h.shutdown()
"#,
            &[&srv.uri()],
        );
        let info = run_ok(tool("nbdinfo").arg(srv.uri())).stdout;
        let get = |k: &str| nbdinfo_field(&info, k).unwrap_or("?").to_string();
        assert_eq!(get("can_trim"), "false", "{who}: {info}");
        assert_eq!(get("can_flush"), "true", "{who}: {info}");
        assert_eq!(get("is_rotational"), "true", "{who}: {info}");
        assert_eq!(get("can_multi_conn"), "false", "{who}: {info}");
        let fields = [
            "is_read_only",
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_multi_conn",
            "is_rotational",
        ];
        seen.push(fields.map(|k| (k, get(k))));
    }
    assert_eq!(seen[0], seen[1], "blocksmith vs nbdkit");
    stop_all([ours, theirs]);
}

/// Exit 6 drops the client at once, without a reply; exit 7 answers (success), then closes the
/// connection gracefully. Other clients are unaffected. (nbdkit ≥ 1.34 does the same; the
/// Debian nbdkit 1.32 treats both as errors, so this is not compared.)
#[test]
fn exit_codes_six_and_seven_drop_the_client() {
    let dir = TempDir::new("shdrop");
    let s = script(
        &dir,
        "drop.sh",
        r#"#!/bin/sh
case "$1" in
  get_size) echo 1M ;;
  pread)
    case "$4" in
      4096) exit 6 ;;
      8192) dd if=/dev/zero count=$3 iflag=count_bytes status=none; exit 7 ;;
      *) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
    esac ;;
  *) exit 2 ;;
esac
"#,
    );
    let srv = Server::unix(&["sh", &s]);
    python(
        r#"
import sys, nbd
def conn():
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS)
    h.connect_uri(sys.argv[1])
    return h
bystander = conn()
# Exit 6: no reply, the connection is gone.
h = conn()
assert h.pread(512, 0) == bytes(512)
try:
    h.pread(512, 4096)
    raise SystemExit("read with exit 6 succeeded")
except nbd.Error as e:
    pass
assert h.aio_is_dead() or h.aio_is_closed(), "connection still up after exit 6"
# Exit 7: this read succeeds, then the server closes the connection.
h = conn()
assert h.pread(512, 8192) == bytes(512)
try:
    h.pread(512, 0)
    raise SystemExit("read after exit 7 succeeded")
except nbd.Error:
    pass
assert h.aio_is_dead() or h.aio_is_closed(), "connection still up after exit 7"
# Other clients carry on.
assert bystander.pread(512, 0) == bytes(512)
bystander.shutdown()
"#,
        &[&srv.uri()],
    );
    stop_all([srv]);
}

/// Stop servers with SIGTERM (dropping one kills it), so they unload and remove $tmpdir.
fn stop_all<const N: usize>(servers: [Server; N]) {
    for mut s in servers {
        let st = s.stop().expect("server was running");
        assert!(st.success(), "server exit: {st}\n{}", s.stderr());
    }
}

/// `sh -` reads the script from stdin; $tmpdir exists while the server runs, `unload` runs and
/// $tmpdir is removed when it exits — also when it forked into the background, where the
/// parent's exit must leave both alone.
#[test]
fn inline_script_tmpdir_and_unload_foreground_and_background() {
    for background in [false, true] {
        let dir = TempDir::new("shinline");
        let sock = dir.join("sock");
        let pidfile = dir.join("pid");
        let marker = dir.join("tmpdir");
        let unloaded = dir.join("unloaded");
        let text = format!(
            "case \"$1\" in\n  load) echo \"$tmpdir\" > {m} ;;\n  unload) touch {u} ;;\n  get_size) echo 64K ;;\n  \
             pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;\n  *) exit 2 ;;\nesac\n",
            m = marker.display(),
            u = unloaded.display()
        );
        let mut cmd = Command::new(common::server_bin());
        if !background {
            cmd.arg("-f");
        }
        cmd.arg("-U").arg(&sock).arg("-P").arg(&pidfile).args(["sh", "-"]);
        cmd.env("PATH", common::client_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn blocksmith");
        {
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(text.as_bytes()).unwrap();
        }
        let pid_text = common::wait_for_file(&pidfile, Duration::from_secs(10)).expect("pidfile written");
        let pid: i32 = pid_text.trim().parse().unwrap();
        if background {
            // The parent exits at once; its exit must not clean up what the child serves with.
            let st = wait_child(&mut child, Duration::from_secs(10));
            assert!(st.success());
        }
        let tmpdir = PathBuf::from(common::wait_for_file(&marker, Duration::from_secs(10)).unwrap().trim());
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let out = run(tool("nbdinfo").arg(&uri));
        assert!(out.success(), "background={background}: {}", out.describe());
        assert!(tmpdir.is_dir(), "background={background}: $tmpdir exists while serving");
        assert!(tmpdir.join("inline-script.sh").is_file());
        assert!(!unloaded.exists(), "background={background}: unload ran too early");
        common::signal(pid, common::Signal::TERM);
        // The server itself, or (in the background case) its parent, long gone by now.
        let st = wait_child(&mut child, Duration::from_secs(10));
        assert!(st.success(), "background={background}: exit {st}");
        assert!(common::wait_pid_gone(pid, Duration::from_secs(10)), "server did not exit");
        assert!(unloaded.exists(), "background={background}: unload did not run");
        assert!(!tmpdir.exists(), "background={background}: $tmpdir left behind");
    }
}

fn wait_child(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("process did not exit in {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}
