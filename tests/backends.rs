//! Every backend through real clients: memory (up to 2^63-1 bytes), null, zero, ones, pattern,
//! full, file. The per-backend checks are in `tests/python/backends.py`.

mod common;

use common::{python_script, run_ok, tool, Server, TempDir};

const MIB: u64 = 1 << 20;

fn nbdinfo_size(uri: &str) -> u64 {
    let out = run_ok(tool("nbdinfo").args(["--size", uri]));
    out.stdout.trim().parse().unwrap_or_else(|_| panic!("nbdinfo --size: {}", out.describe()))
}

fn backend_check(srv: &Server, kind: &str, args: &[&str]) {
    run_ok(python_script("backends.py").arg(kind).arg(srv.uri()).args(args));
}

#[test]
fn memory_largest_size() {
    let max = (i64::MAX as u64).to_string();
    let srv = Server::unix(&["memory", &max]);
    assert_eq!(nbdinfo_size(&srv.uri()), i64::MAX as u64);
    backend_check(&srv, "bigmem", &[]);
}

#[test]
fn memory_largest_size_for_qemu() {
    // qemu's block layer tops out at 2^63 - 2^30 bytes (BDRV_MAX_LENGTH).
    let size = ((1u64 << 63) - (1 << 30)).to_string();
    let srv = Server::unix(&["memory", &size]);
    let out = run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5e 9223372035781033472 512",
        "-c",
        "read -P 0x5e 9223372035781033472 512",
        "-c",
        "read -P 0 4T 64k",
        &srv.uri(),
    ]));
    assert!(!out.stdout.contains("failed"), "{}", out.describe());
}

#[test]
fn memory_size_forms() {
    for (args, want) in [
        (&["memory", "1M"][..], MIB),
        (&["memory", "size=2M"], 2 * MIB),
        (&["memory", "3072k"], 3 * MIB),
        (&["memory", "1G"], 1 << 30),
        (&["memory", "2T"], 2 << 40),
        (&["memory", "12345"], 12345),
    ] {
        let srv = Server::unix(args);
        assert_eq!(nbdinfo_size(&srv.uri()), want, "{args:?}");
    }
}

#[test]
fn null_backend() {
    let srv = Server::unix(&["null", "1M"]);
    backend_check(&srv, "null", &["1048576"]);
}

#[test]
fn zero_backend_has_size_zero() {
    let srv = Server::unix(&["zero"]);
    assert_eq!(nbdinfo_size(&srv.uri()), 0);
    backend_check(&srv, "zero", &[]);
}

#[test]
fn ones_backend() {
    let srv = Server::unix(&["ones", "2M"]);
    backend_check(&srv, "ones", &["2097152"]);
}

#[test]
fn pattern_backend() {
    let srv = Server::unix(&["pattern", "16M"]);
    backend_check(&srv, "pattern", &["16777216"]);
}

#[test]
fn full_backend() {
    let srv = Server::unix(&["full", "1M"]);
    backend_check(&srv, "full", &["1048576"]);
}

#[test]
fn file_backend_read_write() {
    let dir = TempDir::new("file");
    let img = dir.join("disk.img");
    let initial = common::write_random_file(&img, 4 * MIB as usize, 5);
    let srv = Server::unix(&["file", img.to_str().unwrap()]);
    assert_eq!(nbdinfo_size(&srv.uri()), 4 * MIB);
    // Existing contents are served unchanged.
    let copy = dir.join("copy.img");
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&copy));
    common::assert_same_bytes("file served", &initial, &common::read_file(&copy));
    backend_check(&srv, "file", &["4194304", img.to_str().unwrap()]);
    drop(srv);
    // The key=value form too.
    let srv = Server::unix(&["file", &format!("file={}", img.display())]);
    assert_eq!(nbdinfo_size(&srv.uri()), 4 * MIB);
}

#[test]
fn file_backend_trim_makes_holes() {
    let dir = TempDir::new("filetrim");
    let img = dir.join("disk.img");
    common::write_random_file(&img, 8 * MIB as usize, 6);
    let srv = Server::unix(&["file", img.to_str().unwrap()]);
    let before = run_ok(tool("nbdinfo").args(["--map", &srv.uri()]));
    let map = common::parse_nbdinfo_map(&before.stdout);
    common::assert_map_covers(&map, 8 * MIB);
    assert_eq!(common::map_kind_of(&map, 0, 8 * MIB), 0, "fully written file must be all data: {map:?}");

    run_ok(tool("nbdsh").args(["-u", &srv.uri(), "-c", "h.trim(2097152, 2097152)", "-c", "h.flush()"]));
    let after = run_ok(tool("nbdinfo").args(["--map", &srv.uri()]));
    let map = common::parse_nbdinfo_map(&after.stdout);
    common::assert_map_covers(&map, 8 * MIB);
    assert_eq!(common::map_kind_of(&map, 2 * MIB, 4 * MIB), 3, "trimmed range must be a hole: {map:?}");
    assert_eq!(common::map_kind_of(&map, 0, 2 * MIB), 0, "{map:?}");
    assert_eq!(common::map_kind_of(&map, 4 * MIB, 8 * MIB), 0, "{map:?}");
    // The hole is real on disk and reads as zero.
    let on_disk = common::read_file(&img);
    assert!(on_disk[2 * MIB as usize..4 * MIB as usize].iter().all(|b| *b == 0), "hole is not zero on disk");
}

#[test]
fn file_backend_readonly() {
    let dir = TempDir::new("filero");
    let img = dir.join("disk.img");
    let initial = common::write_random_file(&img, MIB as usize, 7);
    let srv = Server::unix(&["-r", "file", img.to_str().unwrap()]);
    let info = run_ok(tool("nbdinfo").arg(srv.uri()));
    assert_eq!(common::nbdinfo_field(&info.stdout, "is_read_only"), Some("true"), "{}", info.describe());
    let out = common::run(tool("nbdsh").args([
        "-u",
        &srv.uri(),
        "-c",
        "h.set_strict_mode(0)",
        "-c",
        "import errno\ntry:\n    h.pwrite(b'x' * 512, 0)\nexcept nbd.Error as e:\n    print('errno', e.errnum)",
    ]));
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "errno 1", "write on -r file must fail with EPERM:\n{}", out.describe());
    common::assert_same_bytes("read-only file", &initial, &common::read_file(&img));
}
