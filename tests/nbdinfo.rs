//! nbdinfo (libnbd-bin) against the server: plain output, --map, --list, --json. nbdinfo issues
//! NBD_OPT_INFO before GO, so it also checks that both report the same export.
//! `LIBNBD_DEBUG=1` makes libnbd print the server bugs it merely logs; those fail the test.

mod common;

use common::{json, run_ok, tool, Output, Server};

const MIB: u64 = 1 << 20;

fn nbdinfo(args: &[&str]) -> Output {
    let out = run_ok(tool("nbdinfo").env("LIBNBD_DEBUG", "1").args(args));
    common::assert_no_libnbd_complaints("nbdinfo", &out.stderr);
    out
}

fn field<'a>(out: &'a Output, key: &str) -> &'a str {
    common::nbdinfo_field(&out.stdout, key)
        .unwrap_or_else(|| panic!("nbdinfo output has no {key:?} line:\n{}", out.describe()))
}

#[test]
fn nbdinfo_plain_memory() {
    let srv = Server::unix(&["memory", "1G"]);
    let out = nbdinfo(&[&srv.uri()]);
    assert!(out.stdout.contains("protocol: newstyle-fixed"), "{}", out.describe());
    assert_eq!(field(&out, "export-size"), "1073741824 (1G)", "{}", out.describe());
    assert_eq!(field(&out, "is_read_only"), "false");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero"] {
        assert_eq!(field(&out, flag), "true", "memory backend should advertise {flag}:\n{}", out.describe());
    }
    // Whatever is advertised, each can_* line must be a boolean.
    for line in out.stdout.lines().map(str::trim).filter(|l| l.starts_with("can_")) {
        let (_, v) = line.split_once(':').unwrap();
        assert!(matches!(v.trim(), "true" | "false"), "odd nbdinfo line {line:?}");
    }
    assert!(out.stdout.contains("base:allocation"), "base:allocation context missing:\n{}", out.describe());
}

#[test]
fn nbdinfo_readonly_flag() {
    let srv = Server::unix(&["-r", "memory", "1M"]);
    let out = nbdinfo(&[&srv.uri()]);
    assert_eq!(field(&out, "is_read_only"), "true", "{}", out.describe());
    assert_eq!(field(&out, "export-size"), "1048576 (1M)");
}

#[test]
fn nbdinfo_size_only_and_tcp() {
    let srv = Server::tcp(&["memory", "size=3M"]);
    let out = nbdinfo(&["--size", &srv.uri()]);
    assert_eq!(out.stdout.trim(), (3 * MIB).to_string());
}

#[test]
fn nbdinfo_map_holes_and_data() {
    let srv = Server::unix(&["memory", "16M"]);
    let uri = srv.uri();
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0xab 2M 1M", "-c", "write -P 1 12M 2M", &uri]));
    let out = nbdinfo(&["--map", &uri]);
    let map = common::parse_nbdinfo_map(&out.stdout);
    common::assert_map_covers(&map, 16 * MIB);
    // type 0 = data, 3 = hole,zero (2 = zero without hole is acceptable for unwritten space).
    assert_eq!(common::map_kind_of(&map, 2 * MIB, 3 * MIB), 0, "{map:?}");
    assert_eq!(common::map_kind_of(&map, 12 * MIB, 14 * MIB), 0, "{map:?}");
    for (a, b) in [(0, 2 * MIB), (4 * MIB, 11 * MIB), (15 * MIB, 16 * MIB)] {
        let k = common::map_kind_of(&map, a, b);
        assert!(k & 2 != 0, "unwritten [{a},{b}) must be reported zero, got type {k}: {map:?}");
    }
    // --totals adds up to 100 %.
    let totals = nbdinfo(&["--map", "--totals", &uri]);
    let sum: u64 = totals
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.parse::<u64>().unwrap_or_else(|_| panic!("bad totals line: {}", totals.describe())))
        .sum();
    assert_eq!(sum, 16 * MIB, "nbdinfo --map --totals: {}", totals.describe());
}

#[test]
fn nbdinfo_list_shows_export() {
    let srv = Server::unix(&["memory", "1M"]);
    let out = nbdinfo(&["--list", &srv.uri()]);
    assert!(out.stdout.contains("export=\"\":"), "default export not listed:\n{}", out.describe());
    assert_eq!(field(&out, "export-size"), "1048576 (1M)", "{}", out.describe());
}

#[test]
fn nbdinfo_json() {
    let srv = Server::unix(&["memory", "64M"]);
    let out = nbdinfo(&["--json", &srv.uri()]);
    let v = json::parse(&out.stdout);
    assert_eq!(v.get("protocol").as_str(), "newstyle-fixed");
    assert!(!v.get("TLS").as_bool());
    let exports = v.get("exports").as_array();
    assert_eq!(exports.len(), 1, "{v:?}");
    let e = &exports[0];
    assert_eq!(e.get("export-name").as_str(), "");
    assert_eq!(e.get("export-size").as_u64(), 64 * MIB);
    assert!(!e.get("is_read_only").as_bool());
    assert!(e.get("can_flush").as_bool());
    assert!(e.get("can_trim").as_bool());
    assert!(e.get("can_zero").as_bool());
    let contexts: Vec<&str> = e.get("contexts").as_array().iter().map(|c| c.as_str()).collect();
    assert!(contexts.contains(&"base:allocation"), "{v:?}");
}

#[test]
fn nbdinfo_with_simple_replies_only() {
    // The server with structured replies refused (--no-sr) must still work for nbdinfo.
    let srv = Server::unix(&["--no-sr", "memory", "1M"]);
    let out = nbdinfo(&[&srv.uri()]);
    assert_eq!(field(&out, "export-size"), "1048576 (1M)");
    assert!(!out.stdout.contains("using structured packets"), "{}", out.describe());
    assert!(!out.stdout.contains("base:allocation"), "no SR means no meta contexts:\n{}", out.describe());
}

#[test]
fn nbdinfo_no_meta_contexts() {
    let srv = Server::unix(&["--no-mc", "memory", "1M"]);
    let out = nbdinfo(&[&srv.uri()]);
    assert!(out.stdout.contains("using structured packets"), "{}", out.describe());
    assert!(!out.stdout.contains("base:allocation"), "--no-mc must hide contexts:\n{}", out.describe());
    // So --map cannot work, and nbdinfo says why.
    let map = common::run(tool("nbdinfo").args(["--map", &srv.uri()]));
    assert!(!map.success(), "nbdinfo --map without meta contexts:\n{}", map.describe());
    assert!(map.stderr.contains("base:allocation"), "{}", map.describe());
    // Data still flows.
    let size = nbdinfo(&["--size", &srv.uri()]);
    assert_eq!(size.stdout.trim(), MIB.to_string());
}

#[test]
fn nbdinfo_handshake_variants() {
    // --mask-handshake 0: plain (unfixed) newstyle, so libnbd falls back to NBD_OPT_EXPORT_NAME.
    for (mask, protocol) in [("0", "protocol: newstyle without TLS"), ("1", "protocol: newstyle-fixed")] {
        let srv = Server::unix(&["--mask-handshake", mask, "memory", "1M"]);
        let out = nbdinfo(&[&srv.uri()]);
        assert!(out.stdout.contains(protocol), "--mask-handshake {mask}:\n{}", out.describe());
        assert_eq!(field(&out, "export-size"), "1048576 (1M)");
        run_ok(tool("nbdsh").args([
            "-u",
            &srv.uri(),
            "-c",
            "h.pwrite(b'm' * 4096, 0)",
            "-c",
            "assert h.pread(4096, 0) == b'm' * 4096",
        ]));
    }
    // Oldstyle.
    let srv = Server::unix(&["-o", "memory", "1M"]);
    let out = nbdinfo(&[&srv.uri()]);
    assert!(out.stdout.contains("protocol: oldstyle"), "{}", out.describe());
}
