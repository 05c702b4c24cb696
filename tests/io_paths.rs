//! The IO paths under the server: the `file` backend through io_uring and through the thread
//! pool (`--io=pool`) passes the same clients; the memory budget backpressures without
//! deadlocking; thousands of clients at once are all served.

mod common;

use std::fs;
use std::time::Duration;

use common::{python_script, run_ok, run_with_timeout, tool, Server, TempDir};

/// The same client work against the file backend for each IO path.
fn exercise_file_backend(io: &str) {
    let dir = TempDir::new(&format!("io-{io}"));
    let img = dir.join("disk.img");
    fs::write(&img, vec![0u8; 64 << 20]).expect("image");
    let srv = Server::unix(&["-v", &format!("--io={io}"), "file", img.to_str().expect("utf-8 path")]);
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
        &uri,
    ]));
    // The data is in the file itself.
    let on_disk = fs::read(&img).expect("read image");
    assert!(on_disk[1 << 20..4 << 20].iter().all(|&b| b == 0x5a), "qemu-io's write reached the file");
    let out = run_with_timeout(
        // fio leaves a verify state file in its working directory: keep it in the temp dir.
        tool("fio").current_dir(dir.path()).args([
            "--name=iopath",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
        ]),
        Duration::from_secs(120),
    )
    .assert_success();
    assert!(out.stdout.contains("err= 0:"), "{}", out.describe());
    let log = srv.stderr();
    let want = if io == "pool" { "thread pool" } else { "file IO: io_uring" };
    assert!(log.contains(want), "-v does not say which IO path is in use ({want}):\n{log}");
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
