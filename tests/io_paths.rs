//! The IO paths under the server: the `file` backend through io_uring and through the thread
//! pool (`--io=pool`) passes the same clients, with and without the page-cache fast path, and
//! with `cache=none` (O_DIRECT); so do the `cow` and `cache` filters' block stores; the memory
//! budget backpressures without deadlocking; thousands of clients at once are all served.
//! (`scripts/test.sh` also runs every integration test on the pool path: `BLOCKSMITH_TEST_IO`.)

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    assert_same_bytes, python_script, run_ok, run_with_timeout, tool, write_random_file, Server, TempDir,
};

/// The same client work against the file backend for each IO path.
fn exercise_file_backend(io: &str) {
    exercise_file_backend_with(io, &[]);
}

fn exercise_file_backend_with(io: &str, params: &[&str]) {
    let dir = TempDir::new(&format!("io-{io}"));
    let img = dir.join("disk.img");
    fs::write(&img, vec![0u8; 64 << 20]).expect("image");
    let mut args =
        vec!["-v".to_string(), format!("--io={io}"), "file".into(), img.to_str().expect("utf-8 path").into()];
    args.extend(params.iter().map(|p| p.to_string()));
    let srv = Server::unix(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let uri = srv.uri();
    run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 3M",
        "-c",
        "read -P 0x5a 1M 3M",
        "-c",
        "flush",
        "-c",
        "write -f -P 0x33 0 64k",
        "-c",
        "read -P 0x33 0 64k",
        // Zeroing and trimming (fallocate: through io_uring where it can).
        "-c",
        "write -z 2M 256k",
        "-c",
        "write -z -u -f 3M 128k",
        "-c",
        "discard 1M 64k",
        "-c",
        "read -P 0 2M 256k",
        "-c",
        "read -P 0 3M 128k",
        "-c",
        "read -P 0x5a 3080192 64k",
        "-c",
        "read -P 0x5a 3276800 64k",
        &uri,
    ]));
    // The data is in the file itself, with the zeroed ranges zero (and the trimmed one too:
    // a punched hole reads as zeroes).
    let on_disk = fs::read(&img).expect("read image");
    let zeroed = |a: usize, b: usize| on_disk[a..b].iter().all(|&x| x == 0);
    assert!(zeroed(1 << 20, (1 << 20) + (64 << 10)), "the trimmed range is a hole");
    assert!(
        on_disk[(1 << 20) + (64 << 10)..2 << 20].iter().all(|&b| b == 0x5a),
        "qemu-io's write reached the file"
    );
    assert!(zeroed(2 << 20, (2 << 20) + (256 << 10)) && zeroed(3 << 20, (3 << 20) + (128 << 10)));
    assert!(on_disk[(3 << 20) + (128 << 10)..4 << 20].iter().all(|&b| b == 0x5a));
    fio_verify(&dir, &uri, "0");
    let log = srv.stderr();
    let want = if io == "pool" { "thread pool" } else { "file IO: io_uring" };
    assert!(log.contains(want), "-v does not say which IO path is in use ({want}):\n{log}");
}

/// fio's random reads and writes of 16 MiB from `offset`, every block checked (crc32c).
fn fio_verify(dir: &TempDir, uri: &str, offset: &str) {
    let out = run_with_timeout(
        // fio leaves a verify state file in its working directory: keep it in the temp dir.
        tool("fio").current_dir(dir.path()).args([
            "--name=iopath",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--size=16M",
            &format!("--offset={offset}"),
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
        ]),
        Duration::from_secs(120),
    )
    .assert_success();
    assert!(out.stdout.contains("err= 0:"), "{}", out.describe());
}

#[test]
fn file_backend_through_io_uring() {
    exercise_file_backend("uring");
}

#[test]
fn file_backend_through_the_thread_pool() {
    exercise_file_backend("pool");
}

#[test]
fn file_backend_with_every_read_queued() {
    // nowait-reads=false: no preadv2(RWF_NOWAIT) on the loop; every read goes to the ring.
    exercise_file_backend_with("uring", &["nowait-reads=false"]);
}

/// A directory on the build's own file system (under cargo's target directory), which takes
/// O_DIRECT: the system temp directory may be a tmpfs. Removed on drop.
struct DiskDir(PathBuf);

impl DiskDir {
    fn new(tag: &str) -> DiskDir {
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        DiskDir(p)
    }
}

impl Drop for DiskDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Bytes a process (all its threads) has had read from storage: `read_bytes` in /proc/PID/io.
/// Reads served from the page cache do not count; O_DIRECT reads always do.
fn storage_read_bytes(pid: i32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no read_bytes in /proc/{pid}/io:\n{io}"))
}

/// Copy the whole export into a file with nbdcopy (256 KiB requests: all aligned) and return it.
fn copy_out(uri: &str, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    run_ok(tool("nbdcopy").args(["--no-extents", uri, out.to_str().expect("utf-8 path")]));
    fs::read(&out).expect("copy")
}

/// cache=none through one IO path: O_DIRECT is opened and used for aligned requests, and
/// aligned and unaligned reads and writes all see each other's data.
fn exercise_cache_none(io: &str) {
    const SIZE: usize = 8 << 20;
    let dir = DiskDir::new(&format!("direct-{io}"));
    let img = dir.0.join("disk.img");
    // Written through the page cache just now, so the kernel holds all of it in memory.
    let mut model = write_random_file(&img, SIZE, 0x5eed);
    let srv =
        Server::unix(&["-v", &format!("--io={io}"), "file", img.to_str().expect("utf-8 path"), "cache=none"]);
    let uri = srv.uri();
    let log = srv.stderr();
    let align: u64 = log
        .lines()
        .find_map(|l| l.split("file: cache=none: O_DIRECT, alignment ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("-v does not say that cache=none uses O_DIRECT:\n{log}"));
    assert!(align.is_power_of_two() && (512..=4096).contains(&align), "alignment {align}");

    // Aligned reads of the whole disk come from the device, not from the page cache that
    // holds the file: the server's storage reads grow by at least the disk's size.
    let before = storage_read_bytes(srv.pid());
    assert_same_bytes("aligned reads of the original data", &model, &copy_out(&uri, &dir.0, "copy1.img"));
    let read = storage_read_bytes(srv.pid()) - before;
    assert!(read >= SIZE as u64, "only {read} bytes read from storage for {SIZE} bytes of O_DIRECT reads");

    // Writes aligned (O_DIRECT), unaligned (buffered, evicted), with FUA, aligned to 512 only
    // (direct where the file system's alignment is 512), and an unaligned write inside an
    // aligned one; each read back aligned and unaligned.
    let writes: &[(u8, u64, u64, bool)] = &[
        (0x11, 0, 64 << 10, false),
        (0x22, 70_001, 3000, false),
        (0x33, 1 << 20, 8192, true),
        (0x44, (2 << 20) + 512, 1536, false),
        (0x55, 3 << 20, 64 << 10, false),
        (0x66, (3 << 20) + 100, 200, true),
    ];
    let mut cmds: Vec<String> = Vec::new();
    for &(p, off, len, fua) in writes {
        cmds.push(format!("write {}-P {p:#x} {off} {len}", if fua { "-f " } else { "" }));
        model[off as usize..(off + len) as usize].fill(p);
    }
    for (p, off, len) in [
        (0x11, 0, 64 << 10),
        (0x11, 100, 1000),
        (0x22, 70_001, 3000),
        (0x33, 1 << 20, 8192),
        (0x33, (1 << 20) + 4096, 4096),
        (0x44, (2 << 20) + 512, 1536),
        (0x55, 3 << 20, 100),
        (0x66, (3 << 20) + 100, 200),
        (0x55, (3 << 20) + 4096, 60 << 10),
    ] {
        cmds.push(format!("read -P {p:#x} {off} {len}"));
    }
    cmds.push("flush".into());
    let mut qemu_io = tool("qemu-io");
    qemu_io.args(["-f", "raw"]);
    for c in &cmds {
        qemu_io.args(["-c", c]);
    }
    let out = run_ok(qemu_io.arg(&uri));
    assert!(!out.stdout.contains("Pattern verification failed"), "{}", out.describe());

    // The file itself, the export read aligned, and the export read unaligned all agree.
    assert_same_bytes("the file after the writes", &model, &fs::read(&img).expect("image"));
    assert_same_bytes("aligned reads after the writes", &model, &copy_out(&uri, &dir.0, "copy2.img"));
    let pieces: &[(u64, u64)] =
        &[(1, 4095), (69_999, 3004), ((2 << 20) + 511, 1538), ((3 << 20) + 99, 4000), (5_000_001, 123_457)];
    let script =
        format!("import sys\nfor off, n in {:?}:\n    sys.stdout.buffer.write(h.pread(n, off))\n", pieces);
    let out = run_ok(tool("nbdsh").args(["-u", &uri, "-c", &script]));
    let want: Vec<u8> =
        pieces.iter().flat_map(|&(o, n)| model[o as usize..(o + n) as usize].to_vec()).collect();
    assert_same_bytes("unaligned reads after the writes", &want, &out.stdout_bytes);
}

#[test]
fn cache_none_uses_o_direct_through_io_uring() {
    exercise_cache_none("uring");
}

#[test]
fn cache_none_uses_o_direct_through_the_thread_pool() {
    exercise_cache_none("pool");
}

/// Large cached reads go to the socket with sendfile (`sendfile=true`, the default): the same
/// bytes as with the copy (`sendfile=false`), for whole-disk copies with big requests and for
/// reads at odd offsets and lengths, through either IO path.
#[test]
fn cached_reads_sent_with_sendfile_are_the_file() {
    let dir = TempDir::new("sendfile");
    let img = dir.join("disk.img");
    let data = write_random_file(&img, 16 << 20, 11);
    for (io, sendfile) in [("uring", "true"), ("pool", "true"), ("uring", "false")] {
        let srv = Server::unix(&[
            &format!("--io={io}"),
            "file",
            img.to_str().expect("utf-8 path"),
            &format!("sendfile={sendfile}"),
        ]);
        let out = dir.join(&format!("copy-{io}-{sendfile}.img"));
        run_ok(tool("nbdcopy").args(["--request-size=4194304", &srv.uri()]).arg(&out));
        assert_same_bytes(
            &format!("nbdcopy, io={io} sendfile={sendfile}"),
            &data,
            &fs::read(&out).expect("copy"),
        );
        // Unaligned reads of 64 KiB and more, with and without structured replies.
        run_ok(python_script("sendfile_reads.py").arg(srv.uri()).arg(&img));
    }
}

/// `cow` and `cache` keep their blocks in a temporary file, which they read and write through
/// the loop's io_uring or the pool like the `file` backend: the same client work on both paths,
/// over a `memory` disk (which does no file IO of its own, so `-v` naming io_uring proves the
/// filter's store went through the ring).
fn exercise_overlay(filter: &str, io: &str) {
    let dir = TempDir::new(&format!("overlay-{filter}-{io}"));
    let srv = Server::unix(&["-v", &format!("--io={io}"), &format!("--filter={filter}"), "memory", "64M"]);
    let uri = srv.uri();
    run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 3M",
        "-c",
        "read -P 0x5a 1M 3M",
        "-c",
        "write -P 0x33 1000k 48k",
        "-c",
        "read -P 0x5a 1048k 1M",
        "-c",
        "read -P 0x33 1000k 48k",
        "-c",
        "read -P 0 0 1000k",
        "-c",
        "write -z 2M 256k",
        "-c",
        "read -P 0 2M 256k",
        "-c",
        "flush",
        &uri,
    ]));
    fio_verify(&dir, &uri, "32M");
    let log = srv.stderr();
    if io == "pool" {
        assert!(!log.contains("file IO: io_uring"), "--io=pool used io_uring:\n{log}");
    } else {
        assert!(log.contains("file IO: io_uring"), "{filter}'s store did not use io_uring:\n{log}");
    }
}

#[test]
fn cow_store_through_io_uring() {
    exercise_overlay("cow", "uring");
}

#[test]
fn cow_store_through_the_thread_pool() {
    exercise_overlay("cow", "pool");
}

#[test]
fn cache_store_through_io_uring() {
    exercise_overlay("cache", "uring");
}

#[test]
fn cache_store_through_the_thread_pool() {
    exercise_overlay("cache", "pool");
}

#[test]
fn bad_io_mode_is_refused() {
    let out = run_with_timeout(
        std::process::Command::new(env!("CARGO_BIN_EXE_blocksmith")).args(["--io=magic", "memory", "1M"]),
        Duration::from_secs(20),
    );
    assert!(!out.success() && out.stderr.contains("expected uring or pool"), "{}", out.describe());
}

#[test]
fn memory_budget_backpressure_does_not_deadlock() {
    // Room for two 1 MiB requests at a time; the client keeps 48 in flight.
    let srv = Server::unix(&["--max-request", "1M", "--memory-limit", "2M", "memory", "64M"]);
    run_ok(python_script("io_backpressure.py").arg(srv.uri()));
}

#[test]
fn five_thousand_clients_are_all_served() {
    let srv = Server::unix(&["pattern", "1M"]);
    let out = run_ok(python_script("io_many_clients.py").args([&srv.uri(), "5000"]));
    assert!(out.stdout.contains("ok 5000"), "{}", out.describe());
}
