//! fio's nbd engine (libnbd underneath): random read/write with crc32c verification.

mod common;

use std::time::Duration;

use common::{run_with_timeout, tool, Output, Server};

fn fio(uri: &str, extra: &[&str]) -> Output {
    let mut cmd = tool("fio");
    // fio leaves a verify state file in its working directory: not in the repository.
    cmd.current_dir(std::env::temp_dir());
    cmd.args([
        "--name=nbdverify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--bs=4k",
        "--size=32M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--runtime=60",
    ])
    .args(extra);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(120)).assert_success();
    assert!(out.stdout.contains("err= 0:"), "fio job reported an error:\n{}", out.describe());
    let all = format!("{}{}", out.stdout, out.stderr);
    for bad in ["verify failed", "bad magic", "bad header", "mismatch", "error="] {
        assert!(!all.contains(bad), "fio reported {bad:?}:\n{}", out.describe());
    }
    out
}

#[test]
fn fio_randrw_verify() {
    let srv = Server::unix(&["memory", "64M"]);
    let out = fio(&srv.uri(), &["--rw=randrw"]);
    assert!(out.stdout.contains("READ:") && out.stdout.contains("WRITE:"), "{}", out.describe());
}

#[test]
fn fio_randwrite_then_verify_all_tcp() {
    // Writes all 32 MiB in random order, then reads every block back and checks its crc32c.
    let srv = Server::tcp(&["memory", "64M"]);
    fio(&srv.uri(), &["--rw=randwrite", "--do_verify=1"]);
}

#[test]
fn replies_held_for_a_deep_queue_client_stay_right() {
    // Reply moderation (io::moderation) holds a deep-queue client's replies to batch them: a
    // QD32 mixed load with every block verified runs through the held path, and the log
    // shows the path was taken. A queue-depth-1 client on a fresh server is never held.
    let srv = Server::unix(&["-v", "memory", "64M"]);
    fio(&srv.uri(), &["--rw=randrw", "--iodepth=32", "--size=64M", "--time_based", "--runtime=3"]);
    let log = srv.stderr();
    assert!(log.contains("reply moderation: this loop holds replies"), "never held:\n{log}");

    let srv = Server::unix(&["-v", "memory", "64M"]);
    fio(&srv.uri(), &["--rw=randrw", "--iodepth=1", "--size=8M"]);
    let log = srv.stderr();
    assert!(!log.contains("reply moderation: this loop holds"), "a depth-1 client was held:\n{log}");

    // --reply-hold=0: never.
    let srv = Server::unix(&["-v", "--reply-hold=0", "memory", "64M"]);
    fio(&srv.uri(), &["--rw=randrw", "--iodepth=32", "--size=64M", "--time_based", "--runtime=2"]);
    assert!(!srv.stderr().contains("reply moderation: this loop holds"), "{}", srv.stderr());
}
