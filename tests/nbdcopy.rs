//! nbdcopy (libnbd-bin) round trips, and nbdkit used as a reference: its `pattern` plugin for a
//! byte-for-byte comparison and its `nbd` plugin as a proxy client in front of blocksmith.

mod common;

use common::{run_ok, tool, Server, TempDir};

const MIB: usize = 1 << 20;

#[test]
fn nbdcopy_64m_roundtrip() {
    let dir = TempDir::new("ncopy");
    let src = dir.join("src.img");
    let back = dir.join("back.img");
    let data = common::write_random_file(&src, 64 * MIB, 3);
    let srv = Server::unix(&["memory", "64M"]);
    // nbdcopy uses several connections when multi-conn is advertised, and up to 64 requests in
    // flight on each.
    run_ok(tool("nbdcopy").arg(&src).arg(srv.uri()));
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&back));
    common::assert_same_bytes("nbdcopy round trip", &data, &common::read_file(&back));
}

#[test]
fn nbdcopy_roundtrip_tcp_single_connection_sparse() {
    let dir = TempDir::new("ncopyt");
    let src = dir.join("src.img");
    let back = dir.join("back.img");
    // Mostly zeroes with a few data islands: nbdcopy uses block status and zeroing here.
    let mut data = vec![0u8; 32 * MIB];
    for (i, off) in [0usize, 5 * MIB + 4096, 17 * MIB, 32 * MIB - 65536].iter().enumerate() {
        let island = common::random_bytes(65536, 10 + i as u64);
        data[*off..*off + 65536].copy_from_slice(&island);
    }
    std::fs::write(&src, &data).unwrap();
    let srv = Server::tcp(&["memory", "32M"]);
    // Pre-fill the disk with non-zero data so zeroing must really happen.
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0xee 0 32M", &srv.uri()]));
    run_ok(tool("nbdcopy").args(["--connections=1", "--requests=16"]).arg(&src).arg(srv.uri()));
    run_ok(tool("nbdcopy").args(["--connections=1"]).arg(srv.uri()).arg(&back));
    common::assert_same_bytes("sparse nbdcopy round trip", &data, &common::read_file(&back));
}

#[test]
fn pattern_matches_nbdkit_pattern_plugin() {
    let dir = TempDir::new("npat");
    let ours = dir.join("ours.img");
    let theirs = dir.join("theirs.img");
    let srv = Server::unix(&["pattern", "8M"]);
    let reference = Server::nbdkit_unix(&["pattern", "8M"]);
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&ours));
    run_ok(tool("nbdcopy").arg(reference.uri()).arg(&theirs));
    common::assert_same_bytes(
        "pattern vs nbdkit pattern",
        &common::read_file(&theirs),
        &common::read_file(&ours),
    );
}

#[test]
fn nbdkit_nbd_plugin_proxies_to_blocksmith() {
    let dir = TempDir::new("nproxy");
    let src = dir.join("src.img");
    let back = dir.join("back.img");
    let data = common::write_random_file(&src, 8 * MIB, 4);
    let srv = Server::unix(&["memory", "8M"]);
    let sock = srv.socket_path().to_string_lossy().into_owned();
    let proxy = Server::nbdkit_unix(&["nbd", &format!("socket={sock}")]);
    run_ok(tool("nbdcopy").arg(&src).arg(proxy.uri()));
    // Read back directly from blocksmith and through the proxy.
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&back));
    common::assert_same_bytes("written via nbdkit proxy", &data, &common::read_file(&back));
    std::fs::remove_file(&back).unwrap();
    run_ok(tool("nbdcopy").arg(proxy.uri()).arg(&back));
    common::assert_same_bytes("read via nbdkit proxy", &data, &common::read_file(&back));
    let info = run_ok(tool("nbdinfo").arg(proxy.uri()));
    assert_eq!(
        common::nbdinfo_field(&info.stdout, "export-size"),
        Some("8388608 (8M)"),
        "{}",
        info.describe()
    );
}
