//! Interoperability with qemu's NBD client (qemu-img and qemu-io from qemu-utils). qemu 10 tries
//! extended headers first and falls back to structured replies, so these tests cover whichever
//! of the two the server negotiates.

mod common;

use common::{json, run_ok, tool, Server, TempDir};

const MIB: usize = 1 << 20;

/// qemu-io output never contains these when every command succeeded.
fn assert_qemu_io_clean(out: &common::Output) {
    let all = format!("{}\n{}", out.stdout, out.stderr);
    for bad in ["Pattern verification failed", "failed:", "Error", "error"] {
        assert!(!all.contains(bad), "qemu-io reported a failure ({bad:?}):\n{}", out.describe());
    }
}

#[test]
fn qemu_img_convert_roundtrip_and_compare() {
    let dir = TempDir::new("qconv");
    let src = dir.join("src.img");
    let back = dir.join("back.img");
    let data = common::write_random_file(&src, 16 * MIB, 1);
    let srv = Server::unix(&["memory", "16M"]);
    let uri = srv.uri();

    run_ok(tool("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
    run_ok(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&back));
    common::assert_same_bytes("qemu-img convert round trip", &data, &common::read_file(&back));

    let cmp = run_ok(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri));
    assert!(cmp.stdout.contains("identical"), "qemu-img compare: {}", cmp.describe());

    // A changed byte must be noticed by compare (exit status 1), proving it really read the disk.
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 4096 512", &uri]));
    let cmp = common::run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri));
    assert_eq!(cmp.code(), Some(1), "qemu-img compare should report a difference:\n{}", cmp.describe());
}

#[test]
fn qemu_img_convert_over_tcp() {
    let dir = TempDir::new("qconvt");
    let src = dir.join("src.img");
    let back = dir.join("back.img");
    let data = common::write_random_file(&src, 4 * MIB, 2);
    let srv = Server::tcp(&["memory", "4M"]);
    let uri = srv.uri();
    run_ok(tool("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
    run_ok(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&back));
    common::assert_same_bytes("qemu-img convert over TCP", &data, &common::read_file(&back));
}

#[test]
fn qemu_img_map_shows_data_and_zero() {
    let srv = Server::unix(&["memory", "16M"]);
    let uri = srv.uri();
    run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1M 1M",
        "-c",
        "write -P 0x01 8M 64k",
        &uri,
    ]));
    let out = run_ok(tool("qemu-img").args(["map", "-f", "raw", "--output=json", &uri]));
    let map = json::parse(&out.stdout);
    let entries = map.as_array();
    let mut pos = 0u64;
    for e in entries {
        assert_eq!(e.get("start").as_u64(), pos, "qemu-img map not contiguous: {map:?}");
        pos += e.get("length").as_u64();
    }
    assert_eq!(pos, 16 * MIB as u64, "qemu-img map does not cover the disk: {map:?}");

    // (data, zero) flags for a whole range; fails if the range straddles different kinds.
    let kind = |start: u64, end: u64| -> (bool, bool) {
        let mut found: Option<(bool, bool)> = None;
        for e in entries {
            let a = e.get("start").as_u64();
            let b = a + e.get("length").as_u64();
            if b <= start || a >= end {
                continue;
            }
            let k = (e.get("data").as_bool(), e.get("zero").as_bool());
            assert!(found.is_none() || found == Some(k), "[{start},{end}) straddles kinds: {map:?}");
            found = Some(k);
        }
        found.expect("range not in map")
    };
    let m = MIB as u64;
    assert_eq!(kind(m, 2 * m), (true, false), "written area must be data: {map:?}");
    assert_eq!(kind(8 * m, 8 * m + 65536), (true, false), "written area must be data: {map:?}");
    assert_eq!(kind(0, m), (false, true), "never-written area must read as zero: {map:?}");
    assert_eq!(kind(3 * m, 7 * m), (false, true), "never-written area must read as zero: {map:?}");
    assert_eq!(kind(10 * m, 16 * m), (false, true), "never-written area must read as zero: {map:?}");
}

#[test]
fn qemu_img_info_shows_size() {
    let srv = Server::unix(&["memory", "size=48M"]);
    let out = run_ok(tool("qemu-img").args(["info", "-f", "raw", "--output=json", &srv.uri()]));
    let info = json::parse(&out.stdout);
    assert_eq!(info.get("virtual-size").as_u64(), 48 * MIB as u64, "{info:?}");
    let human = run_ok(tool("qemu-img").args(["info", "-f", "raw", &srv.uri()]));
    assert!(human.stdout.contains("50331648 bytes"), "qemu-img info: {}", human.describe());
}

#[test]
fn qemu_io_write_read_discard_zero() {
    let srv = Server::unix(&["memory", "16M"]);
    let uri = srv.uri();
    // -d unmap: qemu ignores discard requests unless told to pass them on.
    let out = run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-d",
        "unmap",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "write -P 0xcd 1M 1M",
        "-c",
        "discard 0 1M",
        "-c",
        "read -P 0xcd 1M 1M",
        "-c",
        "write -z 1M 512k",
        "-c",
        "read -P 0 1M 512k",
        "-c",
        "read -P 0xcd 1536k 512k",
        "-c",
        "flush",
        // Unaligned I/O: qemu does read-modify-write only if the server asks for alignment.
        "-c",
        "write -P 0x77 3000000 1234",
        "-c",
        "read -P 0x77 3000000 1234",
        &uri,
    ]));
    assert_qemu_io_clean(&out);
    assert_eq!(out.stdout.matches("wrote ").count(), 4, "{}", out.describe());
    assert_eq!(out.stdout.matches("read ").count(), 5, "{}", out.describe());

    // The discarded range must read back as zeroes or as the old data, never as garbage:
    // the memory backend frees it, so it reads as zeroes.
    let out = run_ok(tool("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0 0 1M", &uri]));
    assert_qemu_io_clean(&out);
}

#[test]
fn qemu_io_over_tcp_and_large_offsets() {
    // 8 GiB sparse disk: offsets above 4 GiB exercise 64-bit fields end to end.
    let srv = Server::tcp(&["memory", "8G"]);
    let uri = srv.uri();
    let out = run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 5G 1M",
        "-c",
        "write -P 0x22 8388607k 1k",
        "-c",
        "read -P 0x11 5G 1M",
        "-c",
        "read -P 0x22 8388607k 1k",
        "-c",
        "read -P 0 4G 1M",
        "-c",
        "write -z 5G 512k",
        "-c",
        "read -P 0 5G 512k",
        "-c",
        "read -P 0x11 5369233408 512k",
        &uri,
    ]));
    assert_qemu_io_clean(&out);
}

#[test]
fn qemu_io_refuses_writes_on_readonly_export() {
    let srv = Server::unix(&["-r", "memory", "1M"]);
    let out = common::run(tool("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 512", &srv.uri()]));
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        !out.success() || all.to_lowercase().contains("read-only") || all.contains("Operation not permitted"),
        "a write to a read-only export must fail:\n{}",
        out.describe()
    );
    assert!(!all.contains("wrote 512/512"), "write to read-only export succeeded:\n{}", out.describe());
    let out = run_ok(tool("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0 0 1M", &srv.uri()]));
    assert_qemu_io_clean(&out);
}

/// (major, minor) of the installed qemu-io.
fn qemu_version() -> (u32, u32) {
    let out = run_ok(tool("qemu-io").arg("--version"));
    let v = out
        .stdout
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or_else(|| panic!("cannot parse qemu-io --version: {}", out.describe()));
    let mut it = v.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[test]
fn qemu_io_negotiates_extended_headers() {
    // qemu >= 8.2 asks for NBD_OPT_EXTENDED_HEADERS first; the server's debug log (-v) says which
    // header style each client entered transmission with.
    let srv = Server::unix(&["-v", "memory", "64M"]);
    let out = run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-d",
        "unmap",
        "-c",
        "write -P 0x42 0 4M",
        "-c",
        "write -z 8M 32M",
        "-c",
        "discard 48M 8M",
        "-c",
        "read -P 0x42 0 4M",
        "-c",
        "read -P 0 8M 32M",
        &srv.uri(),
    ]));
    assert_qemu_io_clean(&out);
    if qemu_version() >= (8, 2) {
        let log = srv.stderr();
        assert!(
            log.contains("extended headers"),
            "qemu {:?} should have negotiated extended headers (no 'extended headers' in the -v log):\n{log}",
            qemu_version()
        );
    }
}
