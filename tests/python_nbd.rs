//! libnbd as the strict client, through the Python bindings (python3-libnbd) run by Debian's
//! `/usr/bin/python3`. The scripts live in `tests/python/`; each turns on libnbd debugging and
//! fails if libnbd logged a server bug it did not turn into an error.

mod common;

use std::time::Duration;

use common::{python_script, run_ok, run_with_timeout, Server};

#[test]
fn python_all_commands_strict() {
    let srv = Server::unix(&["memory", "64M"]);
    run_ok(python_script("ops.py").arg(srv.uri()));
}

#[test]
fn python_all_commands_strict_tcp() {
    let srv = Server::tcp(&["memory", "16M"]);
    run_ok(python_script("ops.py").arg(srv.uri()));
}

#[test]
fn python_opt_mode_list_info_go() {
    let srv = Server::unix(&["memory", "5M"]);
    run_ok(python_script("opt_mode.py").arg(srv.uri()).arg((5u64 << 20).to_string()));
}

#[test]
fn python_aio_pipelining() {
    let srv = Server::unix(&["memory", "32M"]);
    run_ok(python_script("pipeline.py").arg(srv.uri()));
}

#[test]
fn python_multiple_connections_share_data() {
    let srv = Server::unix(&["memory", "4M"]);
    run_ok(python_script("multiconn.py").arg(srv.uri()));
}

#[test]
fn python_negative_requests_keep_connection() {
    let rw = Server::unix(&["memory", "1M"]);
    let ro = Server::unix(&["-r", "memory", "1M"]);
    run_ok(python_script("negative.py").arg(rw.uri()).arg(ro.uri()));
}

#[test]
fn python_connect_command_single_mode() {
    let bin = common::server_bin();
    run_ok(python_script("single.py").arg(&bin));
}

#[test]
fn nbdsh_connect_command_single_mode() {
    let bin = common::server_bin();
    let bin = bin.to_string_lossy();
    let out = run_with_timeout(
        common::tool("nbdsh").args([
            "-c",
            &format!("h.connect_command([{bin:?}, '-s', 'memory', '1M'])"),
            "-c",
            "assert h.get_size() == 1048576",
            "-c",
            "h.pwrite(b'\\x5a' * 4096, 8192)",
            "-c",
            "assert h.pread(4096, 8192) == b'\\x5a' * 4096",
            "-c",
            "assert h.pread(512, 0) == bytes(512)",
            "-c",
            "print('nbdsh-ok')",
        ]),
        Duration::from_secs(60),
    )
    .assert_success();
    assert!(out.stdout.contains("nbdsh-ok"), "{}", out.describe());
}

#[test]
fn nbdsh_uri_with_distro_python() {
    let srv = Server::unix(&["memory", "2M"]);
    let out = run_ok(common::tool("nbdsh").args([
        "-u",
        &srv.uri(),
        "-c",
        "h.pwrite(b'abc' * 100, 1000)",
        "-c",
        "assert h.pread(300, 1000) == b'abc' * 100",
        "-c",
        "print(h.get_size())",
    ]));
    assert_eq!(out.stdout.trim(), "2097152", "{}", out.describe());
}
