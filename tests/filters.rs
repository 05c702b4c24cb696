//! Filters through real clients: offset, delay, log, and the stacking order of `--filter`.

mod common;

use std::time::Duration;

use common::{python_script, run_ok, run_with_timeout, tool, Server, TempDir};

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(|pos| (pos & !7).to_be_bytes()[(pos & 7) as usize]).collect()
}

#[test]
fn offset_filter_windows_a_pattern_disk() {
    let dir = TempDir::new("offset");
    let out_img = dir.join("window.img");
    let srv = Server::unix(&["--filter=offset", "pattern", "1M", "offset=4096", "range=65536"]);
    let info = run_ok(tool("nbdinfo").args(["--size", &srv.uri()]));
    assert_eq!(info.stdout.trim(), "65536");
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&out_img));
    common::assert_same_bytes("offset window", &pattern(4096, 65536), &common::read_file(&out_img));
    // Reads past the window fail instead of leaking the rest of the disk.
    let out = run_ok(tool("nbdsh").args([
        "-u",
        &srv.uri(),
        "-c",
        "h.set_strict_mode(0)",
        "-c",
        "try:\n    h.pread(512, 65536)\n    print('read past window succeeded')\nexcept nbd.Error as e:\n    print('errno', e.errnum)",
    ]));
    assert_eq!(out.stdout.trim(), "errno 22", "{}", out.describe());
}

#[test]
fn offset_filter_writes_land_in_window() {
    // offset without range: the rest of the disk after `offset`.
    let srv = Server::unix(&["--filter=offset", "memory", "2M", "offset=1M"]);
    let out = run_ok(tool("nbdsh").args([
        "-u",
        &srv.uri(),
        "-c",
        "assert h.get_size() == 1048576, h.get_size()",
        "-c",
        "h.pwrite(b'\\xab' * 4096, 1048576 - 4096)",
        "-c",
        "assert h.pread(4096, 1048576 - 4096) == b'\\xab' * 4096",
        "-c",
        "print('ok')",
    ]));
    assert_eq!(out.stdout.trim(), "ok");
}

#[test]
fn delay_filter_1000_concurrent_reads_complete() {
    let srv = Server::unix(&["--filter=delay", "memory", "1M", "rdelay=100ms"]);
    // Correctness only, not timing; the bound is generous for a server that overlaps delays
    // (a serial one would need 100 s).
    run_with_timeout(python_script("delay_aio.py").arg(srv.uri()), Duration::from_secs(90)).assert_success();
}

#[test]
fn delay_filter_write_and_zero_delays() {
    let srv = Server::unix(&["--filter=delay", "memory", "1M", "wdelay=20ms", "rdelay=10ms"]);
    run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x3c 0 64k",
        "-c",
        "read -P 0x3c 0 64k",
        &srv.uri(),
    ]));
}

/// Index of the first line that has `word` as a whole whitespace-separated word.
fn first_line_with_word(log: &str, word: &str) -> Option<usize> {
    log.lines().position(|l| l.split_whitespace().any(|w| w == word))
}

fn wait_for_log(path: &std::path::Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.contains(needle) || std::time::Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn log_filter_records_connect_read_write_disconnect() {
    let dir = TempDir::new("log");
    let logfile = dir.join("nbd.log");
    let srv = Server::unix(&["--filter=log", "memory", "1M", &format!("logfile={}", logfile.display())]);
    run_ok(tool("nbdsh").args([
        "-u",
        &srv.uri(),
        "-c",
        "h.pwrite(b'q' * 512, 1024)",
        "-c",
        "assert h.pread(512, 1024) == b'q' * 512",
    ]));
    let log = wait_for_log(&logfile, "Disconnect");
    let order: Vec<usize> = ["Connect", "Write", "Read", "Disconnect"]
        .iter()
        .map(|w| first_line_with_word(&log, w).unwrap_or_else(|| panic!("log file lacks a {w} line:\n{log}")))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "log lines out of order:\n{log}");
}

/// Offsets of the Read lines in a log ("offset=0x1000" or "offset=4096").
fn read_offsets(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.split_whitespace().any(|w| w == "Read"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("offset=")))
        .map(|v| {
            let v = v.trim_end_matches(',');
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).unwrap_or_else(|_| panic!("bad offset {v}")),
                None => v.parse().unwrap_or_else(|_| panic!("bad offset {v}")),
            }
        })
        .collect()
}

#[test]
fn filter_order_first_is_nearest_client() {
    let dir = TempDir::new("order");
    // offset first (nearest the client), log below it: the log sees shifted offsets.
    let log1 = dir.join("below.log");
    let srv = Server::unix(&[
        "--filter=offset",
        "--filter=log",
        "pattern",
        "1M",
        "offset=12288",
        &format!("logfile={}", log1.display()),
    ]);
    run_ok(tool("nbdsh").args(["-u", &srv.uri(), "-c", "h.pread(512, 0)"]));
    let log = wait_for_log(&log1, "Disconnect");
    assert_eq!(read_offsets(&log), vec![12288], "log below the offset filter sees shifted offsets:\n{log}");
    drop(srv);

    // log first, offset below it: the log sees the client's offsets.
    let log2 = dir.join("above.log");
    let srv = Server::unix(&[
        "--filter=log",
        "--filter=offset",
        "pattern",
        "1M",
        "offset=12288",
        &format!("logfile={}", log2.display()),
    ]);
    run_ok(tool("nbdsh").args(["-u", &srv.uri(), "-c", "h.pread(512, 0)"]));
    let log = wait_for_log(&log2, "Disconnect");
    assert_eq!(read_offsets(&log), vec![0], "log above the offset filter sees client offsets:\n{log}");
}
