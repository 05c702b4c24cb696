//! The generated-content backends (data, random, sparse-random, info, split, partitioning)
//! through real clients, compared with nbdkit's plugins of the same names: every test starts
//! blocksmith and nbdkit with the same parameters on Unix sockets and compares what clients see.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{python_script, run_ok, run_with_timeout, tool, Server, TempDir};

/// Everything a server serves, through nbdcopy.
fn copy_out(srv: &Server, dir: &TempDir, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(&out));
    common::read_file(&out)
}

/// blocksmith and nbdkit, started with the same arguments.
fn both(args: &[&str]) -> (Server, Server) {
    (Server::unix(args), Server::nbdkit_unix(args))
}

/// Both servers serve the same bytes for `args`; returns them.
fn same_as_nbdkit(args: &[&str]) -> Vec<u8> {
    let dir = TempDir::new("cmp");
    let (ours, theirs) = both(args);
    let a = copy_out(&ours, &dir, "ours.img");
    let b = copy_out(&theirs, &dir, "nbdkit.img");
    common::assert_same_bytes(&format!("{args:?}"), &b, &a);
    a
}

/// `nbdinfo --map` of both servers is the same.
fn same_map(ours: &Server, theirs: &Server) -> String {
    let a = run_ok(tool("nbdinfo").args(["--map", &ours.uri()])).stdout;
    let b = run_ok(tool("nbdinfo").args(["--map", &theirs.uri()])).stdout;
    assert_eq!(a, b, "block status maps differ");
    a
}

/// The same reads (any alignment) from both servers give the same bytes.
fn same_reads(ours: &Server, theirs: &Server, ranges: &[(u64, u64)]) {
    let r: Vec<String> = ranges.iter().map(|(o, l)| format!("{o}:{l}")).collect();
    run_ok(python_script("generated_compare.py").arg("read").arg(ours.uri()).arg(theirs.uri()).args(&r));
}

/// Start blocksmith (or nbdkit) with a bad command line: it must exit with an error, quickly.
fn start_fails(bin: &Path, args: &[&str]) -> String {
    let dir = TempDir::new("bad");
    let sock = dir.join("sock");
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg("-U").arg(&sock).args(args);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    assert!(!out.success(), "{} accepted {args:?}:\n{}", bin.display(), out.describe());
    out.stderr
}

fn nbdkit_bin() -> std::path::PathBuf {
    common::require_tool("nbdkit")
}

// ---------------------------------------------------------------------------------------------
// data
// ---------------------------------------------------------------------------------------------

#[test]
fn data_format_matches_nbdkit() {
    let mbr = "
      @0x1be    # MBR first partition entry
        0           # Partition status
        0 2 0       # CHS start
        0x83        # Partition type (Linux)
        0x20 0x20 0 # CHS last sector
        le32:1      # LBA first sector
        le32:0x7ff  # LBA number of sectors
      @0x1fe    # Boot signature
        0x55 0xaa
      ";
    let cases: &[&[&str]] = &[
        &["data", "0 1 2 3 @0x1fe 0x55 0xaa"],
        &["data", mbr, "size=1M"],
        &["data", " ( 0x55 0xAA )*2048 "],
        &["data", r#" ( "Hello" )*2000 "#, "size=8192"],
        &["data", "0 1 2 3 @^0x200 @-2 le16:0xaa55"],
        &[
            "data",
            r" ( 0x55 0xAA ) -> \boot-signature ( @0x1fe \boot-signature ) -> \sector \sector \sector ",
        ],
        &["data", "$pattern*16 @+3 $pattern", "pattern=0x55 0xAA"],
        &["data", r#""abc\x01\n\t\\\"\q" "xyz"[1:] "hello"[:3] "hello"[1:3] ("abcdef")[2:4]*3 "x"[:]"#],
        &["data", "08 0x 010 0XfF 255*3 1 * 4 ( 1 2 ( 3 @+2 4 ) @^16 ) * 3"],
        &["data", "be16:0x1234 le16:0x1234 be32:1 le32:1 be64:0x0102030405060708 le64:0x0102030405060708"],
        &["data", "9 9 ( @2 1 ) 7 ( @3 )*2 1 \"XXXX\" @-4 ( @3 1 ) @^4096"],
        &["data", r"1 -> \a ( 2 -> \a \a ) \a ( \a -> \b \b \b )*2"],
        &["data", "@1048576 1 @-1048576 2 # comment\n @+10 3"],
        &["data", "( 1 2 3 @+4093 )*4096 ( 0 )*100 ( \"ab\" )*100000"],
        &["data", "<(echo hello) <( printf 'a(b)c' )[:3] <(yes)[:100] <(echo hi)[:] <(echo hi)[1:] 1"],
        &["data", "</dev/zero[:3] 1 ( 1 )*0 ( 7 8 9 )[1:1] @^8"],
        &["data", "1 2 3", "size=2"],
        &["data", "1", "size=0"],
        &["data", "raw=hello", "size=1M"],
        &["data", "base64=aGVsbG8gbmJka2l0IHVzZXI="],
        &["data", "base64=aGVs\nbG8=", "size=5"],
    ];
    for args in cases {
        same_as_nbdkit(args);
    }
}

#[test]
fn data_files_match_nbdkit() {
    let dir = TempDir::new("datafile");
    let f1 = dir.join("f1");
    let f2 = dir.join("f2");
    common::write_random_file(&f1, 1000, 1);
    common::write_random_file(&f2, 70000, 2);
    let (p1, p2) = (f1.to_str().unwrap(), f2.to_str().unwrap());
    let data =
        format!("<{p1} @^512 <{p2} @^512 <{p1}[3:10] <{p2}[:5]*3 (<{p1})[1:4] ( <{p1} )[900:2000] @^4096");
    let got = same_as_nbdkit(&["data", &data]);
    assert_eq!(&got[..1000], &common::read_file(&f1)[..]);
    // The same random sector 16 times (the manual's example; nbdkit reads /dev/urandom too, so
    // only the shape can be compared).
    let dir2 = TempDir::new("urandom");
    let srv = Server::unix(&["data", "</dev/urandom[:512]*16"]);
    let d = copy_out(&srv, &dir2, "u.img");
    assert_eq!(d.len(), 8192);
    assert!(d.chunks(512).all(|s| s == &d[..512]));
    assert!(d[..512].iter().any(|&b| b != 0));
    // $VAR from the environment when no parameter has the name.
    let srv = Server::start_unix(
        &["data", "$BS_GENERATED_PATTERN*3 $x", "x=9"],
        &[("BS_GENERATED_PATTERN", "1 2")],
    );
    assert_eq!(copy_out(&srv, &dir2, "env.img"), [1, 2, 1, 2, 1, 2, 9]);
}

#[test]
fn data_is_writable_and_sparse_like_nbdkit() {
    let (ours, theirs) = both(&["data", "@1048576 1 @-1048576 2", "size=4M"]);
    // Block status: the written pages are data, the rest holes (nbdkit's allocator uses the same
    // 32 KiB pages).
    same_map(&ours, &theirs);
    for srv in [&ours, &theirs] {
        run_ok(tool("nbdsh").args([
            "-u",
            &srv.uri(),
            "-c",
            "h.pwrite(b'xyz' * 1000, 5000); h.zero(4096, 1048576)",
        ]));
    }
    same_reads(&ours, &theirs, &[(0, 4 << 20)]);
}

#[test]
fn data_bad_strings_are_refused_like_nbdkit() {
    let ours = common::server_bin();
    for bad in [
        "0xg",
        "1 )",
        "( 1",
        r#""abc"#,
        "le16:0x10000",
        "256",
        "@^3",
        r"\undefined",
        "$undefined_variable_xyz",
        "(1 2 3)[1:5]",
        "1 @-2",
        "<no-such-file-here",
    ] {
        let msg = start_fails(&ours, &["data", bad]);
        assert!(msg.contains("data"), "{bad:?}: {msg}");
        start_fails(&nbdkit_bin(), &["data", bad]);
    }
    for args in
        [&["data"][..], &["data", "data=1", "raw=2"], &["data", "raw=1", "x=2"], &["data", "base64=abc"]]
    {
        start_fails(&ours, args);
        start_fails(&nbdkit_bin(), args);
    }
}

// ---------------------------------------------------------------------------------------------
// random
// ---------------------------------------------------------------------------------------------

#[test]
fn random_matches_nbdkit() {
    for (size, seed) in
        [("1M", "0"), ("1000001", "1"), ("2M", "12345"), ("64K", "4294967295"), ("4M", "0x10")]
    {
        let seed = format!("seed={seed}");
        let args = ["random", size, &seed];
        same_as_nbdkit(&args);
        let (ours, theirs) = both(&args);
        same_reads(&ours, &theirs, &[(1, 1), (4097, 10), (65533, 3), (12345, 50000)]);
        // Writing back what is there succeeds, anything else is EIO.
        run_ok(
            python_script("generated_compare.py")
                .arg("selfwrite")
                .arg(ours.uri())
                .args(["0:4096", "777:100"]),
        );
    }
    // nbdcopy onto itself: the manual's self-checking copy test.
    let srv = Server::unix(&["random", "32M", "seed=9"]);
    run_ok(tool("nbdcopy").arg(srv.uri()).arg(srv.uri()));
}

// ---------------------------------------------------------------------------------------------
// sparse-random
// ---------------------------------------------------------------------------------------------

#[test]
fn sparse_random_matches_nbdkit() {
    let cases: &[&[&str]] = &[
        &["sparse-random", "64M", "seed=1"],
        &["sparse-random", "64M", "seed=2", "percent=50", "runlength=65536"],
        &["sparse-random", "32M", "seed=3", "percent=30", "runlength=1048576", "random-content=true"],
        &["sparse-random", "1000000", "seed=4", "percent=100"],
        &["sparse-random", "16M", "seed=5", "percent=0"],
        &["sparse-random", "size=48M", "seed=6", "percent=12.5", "runlength=4096"],
    ];
    for args in cases {
        same_as_nbdkit(args);
        let (ours, theirs) = both(args);
        same_map(&ours, &theirs);
        // Unaligned reads too (nbdkit seeds a request's first block with its start offset).
        same_reads(
            &ours,
            &theirs,
            &[(0, 1), (4097, 10), (100, 9000), (65536 * 3 + 1, 70000), (999_000, 1000)],
        );
    }
}

#[test]
fn sparse_random_large_layout_matches_nbdkit() {
    let args = ["sparse-random", "256G", "seed=7"];
    let (ours, theirs) = both(&args);
    let map = same_map(&ours, &theirs);
    assert!(map.lines().count() > 100, "{map}");
    // Copying onto itself checks every write (and every zero in a hole).
    let small = Server::unix(&["sparse-random", "64M", "seed=8", "percent=40", "runlength=1048576"]);
    run_ok(tool("nbdcopy").arg(small.uri()).arg(small.uri()));
    run_ok(
        python_script("generated_compare.py").arg("selfwrite").arg(small.uri()).args(["0:65536", "1:4096"]),
    );
}

// ---------------------------------------------------------------------------------------------
// info
// ---------------------------------------------------------------------------------------------

#[test]
fn info_modes() {
    for bin in ["ours", "nbdkit"] {
        let start =
            |args: &[&str]| if bin == "ours" { Server::unix(args) } else { Server::nbdkit_unix(args) };
        let srv = start(&["info"]);
        run_ok(python_script("generated_info.py").args(["exportname", &srv.uri_for("hello"), "hello"]));
        run_ok(python_script("generated_info.py").args(["exportname", &srv.uri(), ""]));
        let srv = start(&["info", "mode=base64exportname"]);
        run_ok(python_script("generated_info.py").args([
            "base64exportname",
            &srv.uri_for("aGVsbG8gbmJka2l0IHVzZXI="),
            "68656c6c6f206e62646b69742075736572",
        ]));
        let srv = start(&["info", "address"]);
        run_ok(python_script("generated_info.py").args(["address", &srv.uri(), "unix"]));
        for mode in ["time", "uptime", "conntime"] {
            let srv = start(&["info", mode]);
            run_ok(python_script("generated_info.py").args([mode, &srv.uri()]));
        }
    }
    // Over TCP the address is the client's.
    let srv = Server::start_tcp(&["info", "mode=address"], &[]);
    run_ok(python_script("generated_info.py").args(["address", &srv.uri(), r"127\.0\.0\.1:[0-9]+"]));
    // A bad export name for base64 mode fails that connection, not the server.
    let mut srv = Server::unix(&["info", "base64exportname"]);
    let bad = srv.uri_for("not%20base64%21");
    let out = common::run(tool("nbdinfo").arg(&bad));
    assert!(!out.success(), "{}", out.describe());
    srv.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// split
// ---------------------------------------------------------------------------------------------

#[test]
fn split_matches_nbdkit() {
    let dir = TempDir::new("split");
    let sizes = [1000usize, 0, 3 * 4096 + 7, 1, 65536];
    let mut paths = Vec::new();
    let mut all = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let p = dir.join(&format!("part{i}"));
        all.extend(common::write_random_file(&p, *n, 20 + i as u64));
        paths.push(p.to_str().unwrap().to_string());
    }
    // A sparse file too: a hole and then data, so block status has something to say.
    let sparse = dir.join("sparse");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 4096], 512 * 1024).unwrap();
    drop(f);
    paths.push(sparse.to_str().unwrap().to_string());
    let mut args = vec!["split".to_string()];
    args.extend(paths.iter().map(|p| format!("file={p}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let got = same_as_nbdkit(&args);
    assert_eq!(&got[..all.len()], &all[..]);
    assert_eq!(got.len(), all.len() + (1 << 20));
    let (ours, theirs) = both(&args);
    same_map(&ours, &theirs);
    same_reads(&ours, &theirs, &[(990, 20), (999, 12302), (1000 + 12295, 3)]);
    drop(theirs);
    // A write across file boundaries lands inside each file (nbdkit 1.32 gets this wrong, so
    // it is checked against the files).
    run_ok(tool("nbdsh").args(["-u", &ours.uri(), "-c", "h.pwrite(b'\\xee' * 12400, 900); h.flush()"]));
    let mut want = all.clone();
    want[900..13300].fill(0xee);
    let mut at = 0;
    for (i, n) in sizes.iter().enumerate() {
        common::assert_same_bytes(
            &format!("part{i}"),
            &want[at..at + n],
            &common::read_file(Path::new(&paths[i])),
        );
        at += n;
    }
}

// ---------------------------------------------------------------------------------------------
// partitioning
// ---------------------------------------------------------------------------------------------

/// Files for partitions: random data of the given sizes in `dir`.
fn partition_files(dir: &TempDir, sizes: &[usize]) -> Vec<String> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let p = dir.join(&format!("p{i}"));
            common::write_random_file(&p, *n, 40 + i as u64);
            p.to_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn partitioning_mbr_matches_nbdkit() {
    let dir = TempDir::new("pmbr");
    let f = partition_files(&dir, &[1000, 3000, 512, 70000, 5, 8192]);
    let file = |i: usize| format!("file={}", f[i]);
    let cases: Vec<Vec<String>> = vec![
        vec![file(0)],
        vec![
            file(0),
            "mbr-id=0x82".into(),
            file(1),
            "mbr-id=default".into(),
            "alignment=4096".into(),
            file(2),
        ],
        vec!["partition-type=mbr".into(), file(0), file(1), file(2), file(3)],
        // More than 4 files with MBR: logical partitions in an extended partition.
        vec![
            "partition-type=dos".into(),
            "alignment=512".into(),
            file(0),
            file(1),
            file(2),
            file(3),
            file(4),
            file(5),
        ],
        vec!["partition-type=mbr".into(), file(0), "mbr-id=12".into(), file(1), file(2), file(3), file(4)],
    ];
    for c in cases {
        let mut args = vec!["partitioning"];
        args.extend(c.iter().map(String::as_str));
        same_as_nbdkit(&args);
    }
}

/// The CRC-32 of UEFI (zlib's).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn le(b: &[u8]) -> u64 {
    let mut v = 0u64;
    for (i, &x) in b.iter().enumerate() {
        v |= u64::from(x) << (8 * i);
    }
    v
}

/// Check a GPT image's CRCs, then blank the random parts (unique partition GUIDs and the CRCs
/// that cover them) so images can be compared.
fn check_and_mask_gpt(img: &mut [u8]) {
    let size = img.len();
    for header_at in [512, size - 512] {
        let hsize = le(&img[header_at + 12..header_at + 16]) as usize;
        assert!((92..=512).contains(&hsize), "header size {hsize}");
        let h = &img[header_at..header_at + hsize];
        let entries = le(&h[80..84]) as usize;
        let pta_at = le(&h[72..80]) as usize * 512;
        let pta = &img[pta_at..pta_at + entries * 128];
        assert_eq!(le(&h[88..92]) as u32, crc32(pta), "partition array CRC (header at {header_at})");
        let mut z = h.to_vec();
        z[16..20].fill(0);
        assert_eq!(le(&h[16..20]) as u32, crc32(&z), "header CRC (header at {header_at})");
        for (k, e) in pta.chunks(128).enumerate() {
            if e.iter().any(|&b| b != 0) {
                assert!(e[16..32].iter().any(|&b| b != 0), "entry {k} has a zero unique GUID");
            }
        }
        let img_h = &mut img[header_at..header_at + hsize];
        img_h[16..20].fill(0);
        img_h[88..92].fill(0);
        for e in img[pta_at..pta_at + entries * 128].chunks_mut(128) {
            e[16..32].fill(0);
        }
    }
}

#[test]
fn partitioning_gpt_matches_nbdkit() {
    let dir = TempDir::new("pgpt");
    let f = partition_files(&dir, &[1000, 3000, 512, 70000, 5]);
    let file = |i: usize| format!("file={}", f[i]);
    let mut many = vec!["alignment=512".to_string()];
    for _ in 0..130 {
        many.push(file(2));
    }
    let cases: Vec<Vec<String>> = vec![
        vec!["partition-type=gpt".into(), file(0), file(1)],
        // More than 4 files: GPT by default.
        vec![
            file(0),
            "type-guid=C12A7328-F81F-11D2-BA4B-00A0C93EC93B".into(),
            file(1),
            file(2),
            "type-guid=default".into(),
            file(3),
            file(4),
        ],
        vec!["partition-type=GPT".into(), "alignment=65536".into(), file(3), "alignment=512".into(), file(4)],
        // More than 128 partitions: the entry array grows.
        many,
    ];
    for c in cases {
        let mut args = vec!["partitioning"];
        args.extend(c.iter().map(String::as_str));
        let scratch = TempDir::new("pgptcopy");
        let (ours, theirs) = both(&args);
        let mut a = copy_out(&ours, &scratch, "ours.img");
        let mut b = copy_out(&theirs, &scratch, "nbdkit.img");
        assert_eq!(a.len(), b.len(), "{args:?}");
        check_and_mask_gpt(&mut a);
        check_and_mask_gpt(&mut b);
        common::assert_same_bytes(&format!("{args:?} (unique GUIDs masked)"), &b, &a);
    }
}

#[test]
fn partitioning_writes() {
    let dir = TempDir::new("pwrite");
    let f = partition_files(&dir, &[1000]);
    let srv = Server::unix(&["partitioning", "alignment=512", &f[0]]);
    let uri = srv.uri();
    // Partition data can be written; the table and padding only with what is there.
    run_ok(tool("nbdsh").args(["-u", &uri, "-c", "h.pwrite(b'\\x11' * 100, 512 + 10); h.flush()"]));
    assert_eq!(&common::read_file(Path::new(&f[0]))[10..110], &[0x11; 100]);
    let out = common::run(tool("nbdsh").args(["-u", &uri, "-c", "h.pwrite(b'\\x01', 0x1c2)"]));
    assert!(!out.success() && out.stderr.contains("Input/output error"), "{}", out.describe());
    let out = common::run(tool("nbdsh").args(["-u", &uri, "-c", "h.pwrite(b'\\x01', 1520)"]));
    assert!(!out.success(), "{}", out.describe());
    run_ok(tool("nbdsh").args(["-u", &uri, "-c", "h.pwrite(h.pread(1536, 0), 0)"]));
}

// ---------------------------------------------------------------------------------------------
// Help and parameters
// ---------------------------------------------------------------------------------------------

#[test]
fn help_and_bad_parameters() {
    for (name, params) in [
        ("data", &["data", "raw", "base64", "size", "allocator"][..]),
        ("random", &["size", "seed"]),
        ("sparse-random", &["size", "seed", "percent", "runlength", "random-content"]),
        ("info", &["mode"]),
        ("split", &["file"]),
        ("partitioning", &["file", "partition-type", "alignment", "mbr-id", "type-guid"]),
    ] {
        let out = common::run_server_cmd(&[name, "--help"], Duration::from_secs(20)).assert_success();
        assert!(out.stdout.contains(&format!("backend {name}:")), "{}", out.describe());
        for p in params {
            assert!(out.stdout.contains(&format!("  {p}=")), "{name} --help lacks {p}: {}", out.stdout);
        }
    }
    let ours = common::server_bin();
    for (args, want) in [
        (&["random", "1M", "seed=-1"][..], "negative"),
        (&["random", "1M", "colour=red"], "unknown parameter 'colour'"),
        (&["sparse-random", "1M", "percent=200"], "percent"),
        (&["sparse-random", "1M", "runlength=0"], "runlength"),
        (&["info", "mode=bogus"], "unknown mode"),
        (&["split"], "at least one file="),
        (&["split", "/nonexistent/file"], "/nonexistent/file"),
        (&["partitioning", "/nonexistent/file"], "/nonexistent/file"),
        (&["partitioning", "/nonexistent/file", "partition-type=bsd"], "partition-type"),
    ] {
        let msg = start_fails(&ours, args);
        assert!(msg.contains(want), "{args:?}: {msg}");
    }
}
