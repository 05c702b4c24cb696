//! The shaping, capability and observation filters through the real binary and real clients
//! (nbdsh and the Python `nbd` module, qemu-io, qemu-img, nbdinfo, nbdcopy), compared with
//! nbdkit running the same command line wherever nbdkit 1.32 has the filter.
//!
//! Most comparisons run `tests/python/filters_shaping_probe.py`, which performs a list of
//! operations and prints one line per operation (`op -> result`), against both servers.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    assert_same_bytes, python_script, random_bytes, read_file, require_tool, run, run_ok, run_server_cmd,
    run_with_timeout, signal, tool, wait_for_file, write_random_file, Server, TempDir,
};

/// Run the probe script against `srv`; its output lines, `op -> result`.
fn probe(srv: &Server, ops: &[&str]) -> Vec<String> {
    let out = run_ok(python_script("filters_shaping_probe.py").arg(srv.uri()).args(ops));
    out.stdout.lines().map(str::to_owned).collect()
}

/// The result of each operation (the last one, if an operation is repeated).
fn results(lines: &[String]) -> HashMap<String, String> {
    lines.iter().filter_map(|l| l.split_once(" -> ")).map(|(op, r)| (op.to_string(), r.to_string())).collect()
}

/// Start blocksmith and nbdkit with the same arguments and run the same probe on both.
fn both(args: &[&str], ops: &[&str]) -> (Vec<String>, Vec<String>) {
    let ours = probe(&Server::unix(args), ops);
    let theirs = probe(&Server::nbdkit_unix(args), ops);
    (ours, theirs)
}

/// Like [`both`], and the two must agree line by line.
fn same_as_nbdkit(args: &[&str], ops: &[&str]) -> HashMap<String, String> {
    let (ours, theirs) = both(args, ops);
    assert_eq!(ours, theirs, "blocksmith (left) and nbdkit (right) differ for {args:?}");
    results(&ours)
}

/// nbdkit's pattern plugin: each 8-byte word holds its own offset, big-endian.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(|pos| (pos & !7).to_be_bytes()[(pos & 7) as usize]).collect()
}

fn nbdinfo_size(uri: &str) -> u64 {
    let out = run_ok(tool("nbdinfo").args(["--size", uri]));
    out.stdout.trim().parse().unwrap_or_else(|_| panic!("nbdinfo --size printed {:?}", out.stdout))
}

// ---------------------------------------------------------------------------------------------
// truncate and ordering
// ---------------------------------------------------------------------------------------------

#[test]
fn truncate_grows_like_nbdkit() {
    let r = same_as_nbdkit(
        &["--filter=truncate", "memory", "1000", "truncate=4096"],
        &[
            "size",
            "write:0:1000:0x61",
            "read:992:16",
            "read:2000:100",
            "write:2000:100:0",
            "write:2000:100:0x78",
            "zero:900:3000",
            "read:892:16",
            "trim:0:4096",
            "flush",
            // Last: nbdkit writes the part below the real end before refusing; we refuse first.
            "write:950:100:0x78",
        ],
    );
    assert_eq!(r["size"], "4096");
    assert_eq!(r["read:2000:100"], "zeroes", "past the real end reads zeroes");
    assert_eq!(r["write:2000:100:0"], "ok", "writing zeroes past the end is allowed");
    assert_eq!(r["write:2000:100:0x78"], "errno ENOSPC");
    assert_eq!(r["write:950:100:0x78"], "errno ENOSPC");
    let half = format!("{}{}", "61".repeat(8), "00".repeat(8));
    assert_eq!(r["read:992:16"], half, "zeroes from the real end on");
    assert_eq!(r["read:892:16"], half, "zeroed from 900 on");
}

#[test]
fn truncate_rounding_like_nbdkit() {
    for (param, want) in [("round-up=512", 1024), ("round-down=512", 512), ("truncate=100", 100)] {
        let r = same_as_nbdkit(&["--filter=truncate", "memory", "1000", param], &["size", "read:0:16"]);
        assert_eq!(r["size"], want.to_string(), "{param}");
    }
}

#[test]
fn filter_order_changes_the_result() {
    // offset nearest the client: the disk is truncated to 2M first, then 1M is cut off the
    // front (1M left). truncate nearest the client: 1M is cut off first, leaving 3M, which is
    // then truncated to 2M.
    let offset_first = ["--filter=offset", "--filter=truncate", "pattern", "4M", "offset=1M", "truncate=2M"];
    let truncate_first =
        ["--filter=truncate", "--filter=offset", "pattern", "4M", "offset=1M", "truncate=2M"];
    let dir = TempDir::new("order");
    for (args, size) in [(&offset_first, 1u64 << 20), (&truncate_first, 2 << 20)] {
        for srv in [Server::unix(args), Server::nbdkit_unix(args)] {
            assert_eq!(nbdinfo_size(&srv.uri()), size, "{args:?}");
            let out = dir.join("copy.img");
            let _ = fs::remove_file(&out);
            run_ok(tool("nbdcopy").arg(srv.uri()).arg(&out));
            assert_same_bytes(&format!("{args:?}"), &pattern(1 << 20, size as usize), &read_file(&out));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// partition
// ---------------------------------------------------------------------------------------------

/// Make an 8 MiB disk image with sfdisk from `script` and fill it with random bytes outside the
/// partition tables (sectors 64 to the end but before the backup GPT).
fn partitioned_image(dir: &TempDir, script: &str) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    let sf = dir.join("layout.sfdisk");
    fs::write(&sf, script).expect("write sfdisk script");
    fs::File::create(&img).and_then(|f| f.set_len(8 << 20)).expect("create image");
    require_tool("sfdisk");
    run_ok(tool("sh").args(["-c", "sfdisk -q \"$0\" < \"$1\""]).arg(&img).arg(&sf));
    img
}

fn fill(img: &Path, sector: u64, sectors: u64, seed: u64) -> Vec<u8> {
    let data = random_bytes((sectors * 512) as usize, seed);
    let f = fs::OpenOptions::new().write(true).open(img).expect("open image");
    f.write_all_at(&data, sector * 512).expect("fill partition");
    data
}

/// The partition export's size, as `nbdinfo` reports it.
fn partition_size(uri: &str) -> u64 {
    let out = run_ok(tool("nbdinfo").args(["--size", uri]));
    out.stdout.trim().parse().expect("size")
}

#[test]
fn partition_of_a_gpt_image_serves_the_partition_bytes() {
    let dir = TempDir::new("gpt");
    let img = partitioned_image(&dir, "label: gpt\nstart=2048, size=4096\nstart=6144, size=8192\n");
    let p2 = fill(&img, 6144, 8192, 2);
    fill(&img, 2048, 4096, 1);
    let args = ["--filter=partition", "file", img.to_str().expect("utf-8 path"), "partition=2"];

    let srv = Server::unix(&args);
    assert_eq!(partition_size(&srv.uri()), 8192 * 512);
    let out = dir.join("p2.out");
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&out));
    assert_same_bytes("partition 2 via blocksmith", &p2, &read_file(&out));
    // qemu-img agrees, and so does nbdkit.
    let slice = dir.join("p2.slice");
    fs::write(&slice, &p2).expect("write slice");
    run_ok(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &srv.uri()]).arg(&slice));
    let nbdkit = Server::nbdkit_unix(&args);
    let out2 = dir.join("p2.nbdkit");
    run_ok(tool("nbdcopy").arg(nbdkit.uri()).arg(&out2));
    assert_same_bytes("partition 2 via nbdkit", &p2, &read_file(&out2));
    drop(nbdkit);

    // Writes land inside the partition, and cannot go past its end.
    let r = results(&probe(&srv, &["write:0:512:0xab", "write:4194303:1:1", "write:4194304:1:1", "flush"]));
    assert_eq!(r["write:0:512:0xab"], "ok");
    assert_eq!(r["write:4194304:1:1"], "errno ENOSPC", "{r:?}");
    let disk = read_file(&img);
    assert_eq!(&disk[6144 * 512..6144 * 512 + 512], &[0xab; 512][..]);
    assert_eq!(disk[6144 * 512 + 4194303], 1);
    assert_eq!(disk[6144 * 512 + 4194304], 0, "nothing written past the partition");
}

#[test]
fn partition_of_an_mbr_image_with_logical_partitions() {
    let dir = TempDir::new("mbr");
    let img = partitioned_image(
        &dir,
        "label: dos\nstart=2048, size=2048, type=83\nstart=4096, size=10240, type=5\n\
         start=6144, size=2048, type=83\nstart=10240, size=3072, type=83\n",
    );
    let p6 = fill(&img, 10240, 3072, 6);
    let path = img.to_str().expect("utf-8 path");
    for (part, size) in
        [("partition=1", 2048 * 512), ("partition=5", 2048 * 512), ("partition=6", 3072 * 512)]
    {
        let args = ["--filter=partition", "file", path, part];
        let srv = Server::unix(&args);
        assert_eq!(partition_size(&srv.uri()), size, "{part}");
        assert_eq!(nbdinfo_size(&Server::nbdkit_unix(&args).uri()), size, "nbdkit {part}");
        if part == "partition=6" {
            let out = dir.join("p6.out");
            run_ok(tool("nbdcopy").arg(srv.uri()).arg(&out));
            assert_same_bytes("logical partition 6", &p6, &read_file(&out));
        }
    }
    // The extended partition itself, and a missing one, are refused.
    for part in ["partition=2", "partition=7"] {
        let args = ["--filter=partition", "file", path, part];
        let srv = Server::unix(&args);
        for _ in 0..3 {
            let out = run(tool("nbdinfo").args(["--size", &srv.uri()]));
            assert!(!out.success(), "{part} served: {}", out.describe());
        }
        assert!(srv.stderr().contains("not found"), "{part}: {}", srv.stderr());
    }
}

// ---------------------------------------------------------------------------------------------
// blocksize and blocksize-policy
// ---------------------------------------------------------------------------------------------

/// (count, offset) of each Read and Write line of a log filter file.
fn logged_requests(log: &str) -> Vec<(u64, u64)> {
    let field = |l: &str, k: &str| {
        l.split_whitespace().find_map(|w| w.strip_prefix(k)).map(|v| {
            u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("bad {k} in {l}"))
        })
    };
    log.lines()
        .filter(|l| l.split_whitespace().any(|w| w == "Read" || w == "Write"))
        .filter_map(|l| Some((field(l, "count=")?, field(l, "offset=")?)))
        .collect()
}

fn wait_for(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = fs::read_to_string(path).unwrap_or_default();
        if s.contains(needle) || Instant::now() >= deadline {
            return s;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn blocksize_maxdata_4k_serves_a_1mib_qemu_io_write() {
    let dir = TempDir::new("bsize");
    let qemu_io = |uri: &str, cmds: &[&str]| {
        let mut c = tool("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        run_ok(c.arg(uri))
    };
    let cmds =
        ["write -P 0x5a 0 1M", "read -P 0x5a 0 1M", "write -P 0x11 1000 3000", "read -P 0x11 1000 3000"];
    let cmds2 =
        ["read -P 0x5a 0 1000", "read -P 0x5a 4000 1044576", "write -z 100 5000", "read -P 0 100 5000"];
    for minblock in ["minblock=1", "minblock=512"] {
        let log = dir.join(&format!("{minblock}.log"));
        let logarg = format!("logfile={}", log.display());
        let args = ["--filter=blocksize", "--filter=log", "memory", "4M", "maxdata=4k", minblock, &logarg];
        let srv = Server::unix(&args);
        qemu_io(&srv.uri(), &cmds);
        qemu_io(&srv.uri(), &cmds2);
        drop(srv);
        let reqs = logged_requests(&wait_for(&log, "Disconnect"));
        assert!(reqs.len() >= 256 * 2, "the 1 MiB write and read were split: {} requests", reqs.len());
        let align = if minblock == "minblock=512" { 512 } else { 1 };
        for (count, offset) in reqs {
            assert!(count <= 4096, "{minblock}: a request of {count} bytes reached the layer below");
            assert_eq!((count % align, offset % align), (0, 0), "{minblock}: unaligned {count}@{offset}");
        }
        // nbdkit with the same command line gives the client the same answers.
        let srv = Server::nbdkit_unix(&args);
        qemu_io(&srv.uri(), &cmds);
        qemu_io(&srv.uri(), &cmds2);
    }
}

#[test]
fn blocksize_read_modify_write_from_several_connections_loses_nothing() {
    // Two event loops, four connections, a delay below to keep many read-modify-writes of the
    // same blocks in flight at once: the blocksize filter's shared lock must order them.
    let srv = Server::unix(&[
        "--threads=2",
        "--filter=blocksize",
        "--filter=delay",
        "memory",
        "1M",
        "minblock=4k",
        "rdelay=2ms",
        "wdelay=2ms",
    ]);
    run_with_timeout(
        python_script("filters_shaping_serial.py").arg("rmw").arg(srv.uri()),
        Duration::from_secs(90),
    )
    .assert_success();
}

#[test]
fn blocksize_policy_like_nbdkit() {
    let r = same_as_nbdkit(
        &[
            "--filter=blocksize-policy",
            "memory",
            "1M",
            "blocksize-minimum=512",
            "blocksize-preferred=4k",
            "blocksize-maximum=64k",
            "blocksize-error-policy=error",
        ],
        &[
            "bs:min",
            "bs:pref",
            "bs:max",
            "loose",
            "read:0:512",
            "read:1:512",
            "read:0:100",
            "write:512:512:1",
            "write:100:512:1",
            "zero:0:1000",
            "zero:0:131072",
            "trim:1:512",
            "cache:512:512",
        ],
    );
    assert_eq!((r["bs:min"].as_str(), r["bs:pref"].as_str(), r["bs:max"].as_str()), ("512", "4096", "65536"));
    for op in ["read:1:512", "read:0:100", "write:100:512:1", "zero:0:1000", "trim:1:512"] {
        assert_eq!(r[op], "errno EINVAL", "{op}");
    }
    assert_eq!(r["zero:0:131072"], "ok", "zero is not bound by the maximum");
}

// ---------------------------------------------------------------------------------------------
// swab, readonly, protect, checkwrite
// ---------------------------------------------------------------------------------------------

#[test]
fn swab_like_nbdkit() {
    let dir = TempDir::new("swab");
    let f = dir.join("words");
    fs::write(&f, b"0123456789abcdef").expect("write words");
    let writefile = format!("writefile:0:{}", f.display());
    for bits in ["swab-bits=8", "swab-bits=16", "swab-bits=32", "swab-bits=64"] {
        let r = same_as_nbdkit(
            &["--filter=swab", "pattern", "64k", bits],
            &["bs:min", "read:0:16", "read:4088:16", "loose", "read:1:4"],
        );
        if bits != "swab-bits=8" {
            assert_eq!(r["read:1:4"], "errno EINVAL", "{bits}");
        }
        // Over a writable disk a write then a read is the identity, and nbdkit stores the same.
        // (nbdkit 1.32 loses writes with swab-bits=8: they read back as zeroes. Not copied.)
        let args = ["--filter=swab", "memory", "64k", bits];
        let r = if bits == "swab-bits=8" {
            results(&probe(&Server::unix(&args), &[&writefile, "read:0:16"]))
        } else {
            same_as_nbdkit(&args, &[&writefile, "read:0:16"])
        };
        assert_eq!(r["read:0:16"], hex(b"0123456789abcdef"), "{bits}");
    }
    let r =
        results(&probe(&Server::unix(&["--filter=swab", "pattern", "64k", "swab-bits=32"]), &["read:0:8"]));
    assert_eq!(r["read:0:8"], "zeroes");
    let r =
        results(&probe(&Server::unix(&["--filter=swab", "pattern", "64k", "swab-bits=32"]), &["read:8:8"]));
    assert_eq!(r["read:8:8"], "0000000008000000", "each 32-bit word reversed");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn readonly_file_flipped_during_a_run() {
    let dir = TempDir::new("ro");
    let trigger = dir.join("ro-now");
    let touch = format!("touch:{}", trigger.display());
    let rm = format!("rm:{}", trigger.display());
    let srv =
        Server::unix(&["--filter=readonly", "memory", "1M", &format!("readonly-file={}", trigger.display())]);
    let lines = probe(
        &srv,
        &[
            "can:write",
            "write:0:512:1",
            &touch,
            "write:0:512:2",
            "zero:0:512",
            "trim:0:512",
            "flush",
            "read:0:4",
            &rm,
            "write:0:512:3",
            "read:4:4",
        ],
    );
    let expect: Vec<String> = [
        "can:write -> true".to_string(),
        "write:0:512:1 -> ok".into(),
        format!("{touch} -> ok"),
        "write:0:512:2 -> errno EPERM".into(),
        "zero:0:512 -> errno EPERM".into(),
        "trim:0:512 -> errno EPERM".into(),
        "flush -> ok".into(),
        "read:0:4 -> 01010101".into(),
        format!("{rm} -> ok"),
        "write:0:512:3 -> ok".into(),
        "read:4:4 -> 03030303".into(),
    ]
    .into();
    assert_eq!(lines, expect);

    // Without readonly-file the export is simply read-only.
    let srv = Server::unix(&["--filter=readonly", "memory", "1M"]);
    let out = run_ok(tool("nbdinfo").arg(srv.uri()));
    assert!(out.stdout.contains("is_read_only: true"), "{}", out.stdout);
}

#[test]
fn protect_like_nbdkit() {
    let r = same_as_nbdkit(
        &["--filter=protect", "memory", "1M", "protect=0-511", "protect=4096-8191"],
        &[
            "write:0:512:0",
            "write:0:512:1",
            "write:512:512:1",
            "write:4000:200:0",
            "write:4000:200:2",
            "write:8000:300:3",
            "zero:4096:4096",
            "zero:0:1024",
            "trim:0:512",
            "read:500:16",
        ],
    );
    assert_eq!(r["write:0:512:0"], "ok", "writing identical data is allowed");
    assert_eq!(r["write:0:512:1"], "errno EPERM");
    assert_eq!(r["write:512:512:1"], "ok");
    assert_eq!(r["write:4000:200:2"], "errno EPERM");
    assert_eq!(r["zero:0:1024"], "ok", "the protected part already reads as zeroes");
    assert_eq!(r["read:500:16"], "zeroes");
}

#[test]
fn checkwrite_detects_a_mismatch() {
    let dir = TempDir::new("cw");
    let img = dir.join("disk.img");
    let data = write_random_file(&img, 1 << 20, 7);
    let mut other = data.clone();
    other[300_000] ^= 0x40;
    let other_img = dir.join("other.img");
    fs::write(&other_img, &other).expect("write modified image");
    let path = img.to_str().expect("utf-8 path");
    let args = ["--filter=checkwrite", "file", path];
    for (who, srv) in [("blocksmith", Server::unix(&args)), ("nbdkit", Server::nbdkit_unix(&args))] {
        run_ok(tool("nbdcopy").arg(&img).arg(srv.uri()));
        run_ok(tool("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&img).arg(srv.uri()));
        let out = run(tool("nbdcopy").arg(&other_img).arg(srv.uri()));
        assert!(!out.success(), "{who}: copying a different image must fail: {}", out.describe());
        // Writable from the client's side, and nothing was written.
        let info = run_ok(tool("nbdinfo").arg(srv.uri()));
        assert!(info.stdout.contains("is_read_only: false"), "{}", info.stdout);
        assert_same_bytes("image after checkwrite", &data, &read_file(&img));
    }
}

// ---------------------------------------------------------------------------------------------
// fua, nozero, nocache, noextents, multi-conn: what is advertised and what requests do
// ---------------------------------------------------------------------------------------------

#[test]
fn capability_filters_like_nbdkit() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--filter=fua", "memory", "1M"], &["can:fua", "can:flush", "flush"]),
        (&["--filter=fua", "memory", "1M", "fuamode=emulate"], &["can:fua", "write:0:512:1:fua", "flush"]),
        (&["--filter=fua", "memory", "1M", "fuamode=native"], &["can:fua", "write:0:512:1:fua"]),
        (
            &["--filter=fua", "memory", "1M", "fuamode=force"],
            &["can:fua", "can:flush", "write:0:512:1", "flush"],
        ),
        (&["--filter=fua", "memory", "1M", "fuamode=discard"], &["can:fua", "write:0:512:1:fua", "flush"]),
        (&["--filter=nozero", "memory", "1M"], &["can:zero", "write:0:512:1", "read:0:4"]),
        (
            &["--filter=nozero", "memory", "1M", "zeromode=emulate"],
            &["can:zero", "zero:0:4096", "read:0:4096"],
        ),
        (&["--filter=nozero", "memory", "1M", "zeromode=notrim"], &["can:zero", "zero:0:4096"]),
        (&["--filter=nozero", "memory", "1M", "zeromode=plugin", "fastzeromode=slow"], &["zero:0:4096:fast"]),
        (
            &["--filter=nozero", "memory", "1M", "zeromode=plugin", "fastzeromode=ignore"],
            &["zero:0:4096:fast"],
        ),
        (&["--filter=nocache", "memory", "1M"], &["can:cache"]),
        (&["--filter=nocache", "memory", "1M", "cachemode=emulate"], &["can:cache", "cache:0:65536"]),
        (&["--filter=nocache", "memory", "1M", "cachemode=nop"], &["can:cache", "cache:0:65536"]),
        (&["--filter=noextents", "memory", "1M"], &["write:0:512:1", "map"]),
        (&["--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable"], &["can:multi_conn"]),
        (&["--filter=multi-conn", "memory", "1M", "multi-conn-mode=emulate"], &["can:multi_conn", "can:fua"]),
        (&["--filter=multi-conn", "memory", "1M", "multi-conn-mode=unsafe"], &["can:multi_conn", "flush"]),
    ];
    for (args, ops) in cases {
        same_as_nbdkit(args, ops);
    }
    // A few absolute answers, so agreeing with nbdkit is not all that is checked.
    let r = results(&probe(&Server::unix(&["--filter=fua", "memory", "1M"]), &["can:fua"]));
    assert_eq!(r["can:fua"], "false");
    let r = results(&probe(&Server::unix(&["--filter=nozero", "memory", "1M"]), &["can:zero"]));
    assert_eq!(r["can:zero"], "false");
    let r = results(&probe(&Server::unix(&["--filter=noextents", "memory", "1M"]), &["map"]));
    assert_eq!(r["map"], "0+1048576:0");
    let r = results(&probe(
        &Server::unix(&["--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable"]),
        &["can:multi_conn"],
    ));
    assert_eq!(r["can:multi_conn"], "false");
}

// ---------------------------------------------------------------------------------------------
// noparallel
// ---------------------------------------------------------------------------------------------

#[test]
fn noparallel_serializes_without_losing_requests() {
    for mode in ["serialize=requests", "serialize=all-requests"] {
        let args = ["--filter=noparallel", "--filter=delay", "memory", "1M", mode, "wdelay=1ms"];
        for srv in [Server::unix(&args), Server::nbdkit_unix(&args)] {
            let mut script = python_script("filters_shaping_serial.py");
            script.arg("burst").arg(srv.uri());
            run_with_timeout(&mut script, Duration::from_secs(90)).assert_success();
        }
    }
}

#[test]
fn noparallel_connections_take_turns() {
    let srv = Server::unix(&["--filter=noparallel", "memory", "1M", "serialize=connections"]);
    run_ok(python_script("filters_shaping_serial.py").arg("turns").arg(srv.uri()));
}

// ---------------------------------------------------------------------------------------------
// stats and count: written when the server exits
// ---------------------------------------------------------------------------------------------

const NBDSH_WORKLOAD: &str = "h.pwrite(b'a' * 65536, 0)\n\
    h.pwrite(b'b' * 512, 4096)\n\
    h.pwrite(b'c' * 700, 1000)\n\
    h.pread(1048576, 0)\n\
    h.zero(8192, 65536)\n\
    h.flush()\n";

fn stats_after_exit(nbdkit: bool, dir: &TempDir) -> String {
    let file = dir.join(if nbdkit { "nbdkit.stats" } else { "ours.stats" });
    let args = ["--filter=stats", "memory", "1M", &format!("statsfile={}", file.display())];
    let mut srv = if nbdkit { Server::nbdkit_unix(&args) } else { Server::unix(&args) };
    run_ok(tool("nbdsh").args(["-u", &srv.uri(), "-c", NBDSH_WORKLOAD]));
    // SIGTERM to the foreground server, and wait for it to exit.
    let st = srv.stop().expect("server exit status");
    assert!(st.success() || nbdkit, "server exit status {st}\n{}", srv.stderr());
    fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
}

#[test]
fn stats_file_after_sigterm() {
    let dir = TempDir::new("stats");
    let ours = stats_after_exit(false, &dir);
    let theirs = stats_after_exit(true, &dir);
    // Times and rates differ from run to run; the rest must match nbdkit's output, except that
    // nbdkit 1.32 prints the bytes of all the operation's requests on its "other sizes" line
    // where blocksmith prints those of the other sizes only.
    let stable = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| match (l.split_once(" ops, "), l.split_once(" reqs, ")) {
                (Some((head, _)), _) => format!("{head} ops"),
                (_, Some((head, _))) if l.contains("other sizes") => format!("{head} reqs"),
                _ => l.to_string(),
            })
            .collect()
    };
    assert_eq!(stable(&ours), stable(&theirs), "ours:\n{ours}\nnbdkit's:\n{theirs}");
    let lines: Vec<&str> = ours.lines().collect();
    assert!(lines[0].starts_with("total: 6 ops, ") && lines[0].contains(" s, 1.07 MiB, "), "{ours}");
    assert!(ours.contains("write: 3 ops, "), "{ours}");
    assert!(ours.contains("     9 bits: 66.7% (2 reqs, 1.18 KiB total)\n"), "{ours}");
    assert!(ours.contains("    other sizes: 33.3% (1 reqs, 64.00 KiB total)\n"), "{ours}");
    assert!(ours.contains("\nflush: 1 ops, "), "{ours}");
}

#[test]
fn stats_file_on_demand_with_sigusr1() {
    let dir = TempDir::new("stats-usr1");
    let file = dir.join("s.stats");
    let srv = Server::unix(&["--filter=stats", "memory", "1M", &format!("statsfile={}", file.display())]);
    // A client that stays connected while the report is asked for, so the report cannot come
    // from a connection closing.
    let ready = dir.join("ready");
    let code = format!(
        "{NBDSH_WORKLOAD}\nopen({:?}, 'w').write('ready')\nimport time\ntime.sleep(3)",
        ready.display().to_string()
    );
    let mut client = tool("nbdsh").args(["-u", &srv.uri(), "-c", &code]).spawn().expect("nbdsh");
    assert!(wait_for_file(&ready, Duration::from_secs(20)).is_some(), "the workload never finished");
    signal(srv.pid(), common::Signal::USR1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = fs::read_to_string(&file).unwrap_or_default();
        if t.contains("write: 3 ops, ") || Instant::now() > deadline {
            break t;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(text.starts_with("total: 6 ops, "), "{text}");
    assert!(text.contains("write: 3 ops, "), "{text}");
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn count_logs_bytes_at_exit() {
    let mut srv = Server::unix(&["-v", "--filter=count", "memory", "1M"]);
    run_ok(tool("nbdsh").args([
        "-u",
        &srv.uri(),
        "-c",
        "h.pwrite(b'x' * 4096, 0)\nh.pread(8192, 0)\nh.zero(512, 0)\nh.trim(1024, 4096)\nh.flush()\n",
    ]));
    srv.stop().expect("server exit status");
    let err = srv.stderr();
    assert!(err.contains("count bytes: read 8192, written 4096, zeroed 512, trimmed 1024"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// bad parameters
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_parameters_are_rejected_at_start_up() {
    let dir = TempDir::new("badparams");
    let sock = dir.join("sock");
    let sock = sock.to_str().expect("utf-8 path");
    // (arguments, what the error must mention, whether nbdkit 1.32 must refuse it too)
    let cases: &[(&[&str], &str, bool)] = &[
        (&["--filter=truncate", "memory", "1M", "round-up=1000"], "round-up: must be a power of 2", true),
        (
            &["--filter=truncate", "memory", "1M", "truncate=lots"],
            "truncate: truncate: could not parse size",
            true,
        ),
        (&["--filter=partition", "memory", "1M"], "you must supply the partition parameter", true),
        (&["--filter=partition", "memory", "1M", "partition=0"], "invalid partition number", true),
        (&["--filter=blocksize", "memory", "1M", "minblock=1000"], "minblock must be a power of 2", true),
        (
            &["--filter=blocksize", "memory", "1M", "minblock=4k", "maxdata=6k"],
            "maxdata must be a multiple",
            true,
        ),
        (&["--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=3"], "must be a power of 2", true),
        (
            &["--filter=blocksize-policy", "memory", "1M", "blocksize-error-policy=x"],
            "blocksize-error-policy",
            true,
        ),
        (&["--filter=swab", "memory", "1M", "swab-bits=12"], "swab-bits", true),
        (&["--filter=readonly", "memory", "1M", "readonly-file="], "readonly-file must not be empty", false),
        (&["--filter=protect", "memory", "1M", "protect=100"], "missing '-'", true),
        (&["--filter=protect", "memory", "1M", "protect=9-5"], "end < start", true),
        (&["--filter=fua", "memory", "1M", "fuamode=fast"], "unknown fuamode 'fast'", true),
        (&["--filter=nozero", "memory", "1M", "zeromode=x"], "unknown zeromode", true),
        (&["--filter=nozero", "memory", "1M", "fastzeromode=x"], "unknown fastzeromode", true),
        (&["--filter=nocache", "memory", "1M", "cachemode=x"], "unknown cachemode", true),
        (&["--filter=noparallel", "memory", "1M", "serialize=x"], "unknown serialize mode", true),
        (&["--filter=multi-conn", "memory", "1M", "multi-conn-mode=x"], "unknown multi-conn-mode", true),
        (
            &["--filter=multi-conn", "memory", "1M", "multi-conn-track-dirty=x"],
            "multi-conn-track-dirty",
            true,
        ),
        (&["--filter=stats", "memory", "1M"], "missing required parameter statsfile=", true),
        (&["--filter=stats", "memory", "1M", "statsfile=/nonexistent/dir/s"], "cannot open statsfile", true),
        // A key no layer takes is reported by the backend.
        (&["--filter=noextents", "memory", "1M", "noextents=1"], "unknown parameter 'noextents'", true),
    ];
    for (args, needle, nbdkit_too) in cases {
        let mut full = vec!["-f", "-U", sock];
        full.extend_from_slice(args);
        let out = run_server_cmd(&full, Duration::from_secs(20));
        assert!(!out.success(), "accepted {args:?}");
        assert!(out.stderr.contains(needle), "{args:?}: expected {needle:?} in:\n{}", out.stderr);
        if *nbdkit_too {
            let out = run_with_timeout(tool("nbdkit").args(&full), Duration::from_secs(20));
            assert!(!out.success(), "nbdkit accepted {args:?}");
        }
    }
}
