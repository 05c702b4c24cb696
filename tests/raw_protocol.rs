//! Protocol corner cases through the real binary with a raw socket client: things libnbd and
//! qemu never send, and ordering guarantees they cannot observe.

mod common;

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use common::raw::{self, Conn};
use common::Server;

/// The pattern backend's content: every 8 bytes hold their own offset, big-endian.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    for pos in offset..offset + len as u64 {
        let word = pos & !7;
        v.push(word.to_be_bytes()[(pos - word) as usize]);
    }
    v
}

/// A full handshake plus one read proves the server is alive and serving.
fn assert_serves(srv: &mut Server) {
    srv.assert_alive();
    let mut c = srv.raw();
    let (size, _) = c.handshake();
    assert!(size >= 4096);
    c.request(0, raw::CMD_READ, 77, 0, 4096);
    let (err, cookie) = c.simple_reply();
    assert_eq!((err, cookie), (0, 77), "read on a fresh connection failed");
    c.recv(4096);
    c.request(0, raw::CMD_DISC, 78, 0, 0);
    c.expect_closed(Duration::from_secs(5));
}

/// Read the structured reply chunks of `n` READ requests; returns cookie -> assembled data.
fn read_structured_reads(c: &mut Conn, reqs: &HashMap<u64, (u64, usize)>) -> HashMap<u64, Vec<u8>> {
    let mut bufs: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut covered: HashMap<u64, usize> = HashMap::new();
    let mut done = 0;
    while done < reqs.len() {
        let ch = c.structured_chunk();
        let (off, len) =
            *reqs.get(&ch.cookie).unwrap_or_else(|| panic!("reply for unknown cookie {}", ch.cookie));
        let buf = bufs.entry(ch.cookie).or_insert_with(|| vec![0xa5; len]);
        match ch.typ {
            raw::REPLY_TYPE_OFFSET_DATA => {
                let at = u64::from_be_bytes(ch.payload[..8].try_into().unwrap());
                let data = &ch.payload[8..];
                assert!(
                    at >= off && at + data.len() as u64 <= off + len as u64,
                    "data chunk outside request"
                );
                let start = (at - off) as usize;
                buf[start..start + data.len()].copy_from_slice(data);
                *covered.entry(ch.cookie).or_default() += data.len();
            }
            raw::REPLY_TYPE_OFFSET_HOLE => {
                let at = u64::from_be_bytes(ch.payload[..8].try_into().unwrap());
                let hl = u32::from_be_bytes(ch.payload[8..12].try_into().unwrap()) as usize;
                assert!(at >= off && at + hl as u64 <= off + len as u64, "hole chunk outside request");
                let start = (at - off) as usize;
                buf[start..start + hl].fill(0);
                *covered.entry(ch.cookie).or_default() += hl;
            }
            raw::REPLY_TYPE_NONE => assert!(ch.payload.is_empty()),
            t => panic!("chunk type {t:#x} for a READ (0x8001 = error chunk): {:?}", ch.payload),
        }
        if ch.flags & raw::REPLY_FLAG_DONE != 0 {
            assert_eq!(covered.get(&ch.cookie).copied().unwrap_or(0), len, "chunks do not cover the read");
            done += 1;
        }
    }
    bufs
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let srv = Server::unix(&["memory", "1M"]);
    let mut c = srv.raw();
    let flags = c.greeting();
    assert_eq!(flags, raw::FLAG_FIXED_NEWSTYLE | raw::FLAG_NO_ZEROES, "handshake flags {flags:#x}");
}

#[test]
fn bad_client_flags_close_connection() {
    let mut srv = Server::unix(&["memory", "1M"]);
    for bad in [0x8000_0000u32 | 3, 0x4, 0x100] {
        let mut c = srv.raw();
        c.greeting();
        c.client_flags(bad);
        // A compliant server drops the connection; it must not answer options.
        let _ = c.try_send(&{
            let mut b = raw::IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&raw::OPT_LIST.to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
            b
        });
        let got = c.expect_closed(Duration::from_secs(5));
        assert!(got.is_empty(), "server answered after bad client flags {bad:#x}: {got:?}");
    }
    assert_serves(&mut srv);
}

#[test]
fn unknown_option_gets_unsup_then_handshake_works() {
    let srv = Server::unix(&["pattern", "1M"]);
    let mut c = srv.raw();
    c.start();
    c.send_opt(0x1234, b"some option data");
    let r = c.opt_reply();
    assert_eq!((r.opt, r.typ), (0x1234, raw::REP_ERR_UNSUP), "unknown option reply {r:?}");
    // The withdrawn PEEK_EXPORT (4) counts as unknown.
    c.send_opt(4, &[]);
    let r = c.opt_reply();
    assert_eq!((r.opt, r.typ), (4, raw::REP_ERR_UNSUP), "PEEK_EXPORT reply {r:?}");
    let (size, flags) = c.go("");
    assert_eq!(size, 1 << 20);
    assert!(flags & 1 != 0, "HAS_FLAGS missing: {flags:#x}");
    c.request(0, raw::CMD_READ, 5, 8192, 4096);
    assert_eq!(c.simple_reply(), (0, 5));
    assert_eq!(c.recv(4096), pattern(8192, 4096));
}

#[test]
fn starttls_without_tls_gets_policy() {
    let srv = Server::unix(&["memory", "1M"]);
    let mut c = srv.raw();
    c.start();
    c.send_opt(raw::OPT_STARTTLS, &[]);
    let r = c.opt_reply();
    assert_eq!(r.opt, raw::OPT_STARTTLS);
    assert_eq!(r.typ, raw::REP_ERR_POLICY, "STARTTLS on a server without TLS: {r:?}");
    let (size, _) = c.go("");
    assert_eq!(size, 1 << 20);
}

#[test]
fn list_with_data_is_invalid_then_list_works() {
    let srv = Server::unix(&["memory", "1M"]);
    let mut c = srv.raw();
    c.start();
    c.send_opt(raw::OPT_LIST, b"junk");
    let r = c.opt_reply();
    assert_eq!((r.opt, r.typ), (raw::OPT_LIST, raw::REP_ERR_INVALID), "LIST with data: {r:?}");
    c.send_opt(raw::OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = c.opt_reply();
        assert_eq!(r.opt, raw::OPT_LIST);
        match r.typ {
            raw::REP_SERVER => {
                let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
            }
            raw::REP_ACK => break,
            t => panic!("LIST reply type {t:#x}"),
        }
    }
    assert!(names.contains(&String::new()), "default export not listed: {names:?}");
    // ABORT gets an ACK (or a close), and the server closes.
    c.send_opt(raw::OPT_ABORT, &[]);
    let rest = c.expect_closed(Duration::from_secs(5));
    if !rest.is_empty() {
        assert!(rest.len() >= 20, "partial ABORT reply {rest:?}");
        assert_eq!(u32::from_be_bytes(rest[12..16].try_into().unwrap()), raw::REP_ACK);
    }
}

#[test]
fn export_name_option_with_and_without_zeroes() {
    let srv = Server::unix(&["pattern", "1M"]);
    for no_zeroes in [true, false] {
        let mut c = srv.raw();
        c.greeting();
        c.client_flags(raw::CFLAG_FIXED_NEWSTYLE | if no_zeroes { raw::CFLAG_NO_ZEROES } else { 0 });
        c.send_opt(raw::OPT_EXPORT_NAME, b"");
        assert_eq!(c.u64(), 1 << 20, "EXPORT_NAME size");
        let flags = c.u16();
        assert!(flags & 1 != 0);
        if !no_zeroes {
            assert_eq!(c.recv(124), vec![0u8; 124], "124 zero bytes expected without NO_ZEROES");
        }
        c.request(0, raw::CMD_READ, 9, 16, 16);
        assert_eq!(c.simple_reply(), (0, 9), "read after EXPORT_NAME (no_zeroes={no_zeroes})");
        assert_eq!(c.recv(16), pattern(16, 16));
    }
}

#[test]
fn disc_after_pipelined_reads_answers_all_simple() {
    let srv = Server::unix(&["pattern", "4M"]);
    for round in 0..10 {
        let mut c = srv.raw();
        c.handshake();
        let mut batch = Vec::new();
        for i in 0..8u64 {
            batch.extend(Conn::request_bytes(0, raw::CMD_READ, 100 + i, i * 65536 + 512, 65536));
        }
        batch.extend(Conn::request_bytes(0, raw::CMD_DISC, 999, 0, 0));
        c.send(&batch);
        let got = c.expect_closed(Duration::from_secs(10));
        let mut pos = 0;
        let mut seen = Vec::new();
        while let Some((err, cookie, next)) = raw::parse_simple_reply(&got, pos) {
            assert_eq!(err, 0, "read {cookie} failed (108 = ESHUTDOWN: requests sent before DISC refused)");
            let i = cookie - 100;
            assert!(i < 8, "reply with unknown cookie {cookie}");
            assert!(got.len() >= next + 65536, "round {round}: reply {cookie} truncated by the close");
            assert_eq!(got[next..next + 65536], pattern(i * 65536 + 512, 65536)[..], "read {cookie} data");
            seen.push(cookie);
            pos = next + 65536;
        }
        assert_eq!(pos, got.len(), "round {round}: trailing garbage after replies");
        seen.sort();
        assert_eq!(seen, (100..108).collect::<Vec<_>>(), "round {round}: replies before close");
    }
}

#[test]
fn disc_after_pipelined_reads_answers_all_structured() {
    let srv = Server::unix(&["pattern", "4M"]);
    for round in 0..10 {
        let mut c = srv.raw();
        c.start();
        c.send_opt(raw::OPT_STRUCTURED_REPLY, &[]);
        let r = c.opt_reply();
        assert_eq!((r.opt, r.typ), (raw::OPT_STRUCTURED_REPLY, raw::REP_ACK));
        c.go("");
        let mut reqs = HashMap::new();
        let mut batch = Vec::new();
        for i in 0..8u64 {
            reqs.insert(200 + i, (i * 131072 + 4096, 65536));
            batch.extend(Conn::request_bytes(0, raw::CMD_READ, 200 + i, i * 131072 + 4096, 65536));
        }
        batch.extend(Conn::request_bytes(0, raw::CMD_DISC, 999, 0, 0));
        c.send(&batch);
        let bufs = read_structured_reads(&mut c, &reqs);
        for (cookie, (off, len)) in &reqs {
            assert_eq!(bufs[cookie], pattern(*off, *len), "round {round}: read {cookie} data");
        }
        let rest = c.expect_closed(Duration::from_secs(10));
        assert!(rest.is_empty(), "round {round}: data after the last reply: {} bytes", rest.len());
    }
}

#[test]
fn client_that_pipelines_then_vanishes_does_not_hurt_server() {
    let mut srv = Server::unix(&["memory", "64M"]);
    for _ in 0..3 {
        let mut c = srv.raw();
        c.handshake();
        let mut batch = Vec::new();
        for i in 0..256u64 {
            batch.extend(Conn::request_bytes(0, raw::CMD_READ, i, (i % 64) << 20, 1 << 20));
        }
        c.send(&batch);
        drop(c); // close without reading a single reply
    }
    // Also one that vanishes halfway through a write payload.
    let mut c = srv.raw();
    c.handshake();
    c.request(0, raw::CMD_WRITE, 1, 0, 1 << 20);
    c.send(&vec![0x33; 4096]);
    drop(c);
    thread::sleep(Duration::from_millis(300));
    assert_serves(&mut srv);
    // The half-written request must not have been applied.
    let mut c = srv.raw();
    c.handshake();
    c.request(0, raw::CMD_READ, 2, 0, 4096);
    assert_eq!(c.simple_reply(), (0, 2));
    assert_eq!(c.recv(4096), vec![0u8; 4096], "a truncated WRITE changed the disk");
}

#[test]
fn many_concurrent_clients() {
    // 100 connections open at once, all mid-session, each served in turn and together.
    let mut srv = Server::unix(&["pattern", "16M"]);
    let mut conns: Vec<Conn> = (0..100)
        .map(|_| {
            let mut c = srv.raw();
            c.handshake();
            c
        })
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        let off = i as u64 * 65536 + 8;
        c.request(0, raw::CMD_READ, i as u64, off, 4096);
    }
    for (i, c) in conns.iter_mut().enumerate().rev() {
        assert_eq!(c.simple_reply(), (0, i as u64));
        assert_eq!(c.recv(4096), pattern(i as u64 * 65536 + 8, 4096), "client {i}");
    }
    drop(conns);
    assert_serves(&mut srv);
}

#[test]
fn handshake_timeout_drops_stalled_client() {
    let mut srv = Server::unix(&["--timeout", "1", "memory", "1M"]);
    let start = Instant::now();
    let mut stalled = srv.raw();
    stalled.greeting();
    // Meanwhile other clients are served normally.
    assert_serves(&mut srv);
    // A client that finished its handshake may idle past the timeout.
    let mut idle = srv.raw();
    idle.handshake();
    let got = stalled.expect_closed(Duration::from_secs(10));
    assert!(got.is_empty(), "stalled client got data: {got:?}");
    assert!(start.elapsed() >= Duration::from_millis(500), "dropped too early: {:?}", start.elapsed());
    thread::sleep(Duration::from_millis(1500));
    idle.request(0, raw::CMD_READ, 3, 0, 512);
    assert_eq!(idle.simple_reply(), (0, 3), "--timeout must not apply after the handshake");
    idle.recv(512);
    assert_serves(&mut srv);
}

#[test]
fn oversize_write_header_gets_einval_and_close() {
    let mut srv = Server::unix(&["memory", "1M"]);
    let mut c = srv.raw();
    c.handshake();
    // A 2 GiB WRITE header with no payload: reject it, and never parse the "payload" as commands.
    c.request(0, raw::CMD_WRITE, 42, 0, 0x7fff_ffff);
    let _ = c.try_send(&Conn::request_bytes(0, raw::CMD_READ, 43, 0, 512));
    let got = c.expect_closed(Duration::from_secs(10));
    let (err, cookie, next) = raw::parse_simple_reply(&got, 0)
        .unwrap_or_else(|| panic!("no EINVAL reply before the close: {got:?}"));
    assert_eq!((err, cookie), (raw::EINVAL, 42), "oversize WRITE reply");
    assert_eq!(next, got.len(), "server answered more after the oversize WRITE: {got:?}");
    assert_serves(&mut srv);
}

#[test]
fn small_maximum_is_advertised_unasked_and_writes_over_it_are_read_past() {
    // §M items 127 and 129: `--max-request 1M` is stricter than the spec's default maximum
    // (32 MiB), so GO tells a client that did not ask; a WRITE over it but within 32 MiB gets
    // EINVAL with its payload read past, and the connection lives on.
    let srv = Server::unix(&["--max-request", "1M", "memory", "4M"]);
    let mut c = srv.raw();
    c.start();
    c.send_opt(raw::OPT_GO, &Conn::info_data("", &[]));
    let mut infos = Vec::new();
    loop {
        let r = c.opt_reply();
        match r.typ {
            raw::REP_INFO => infos.push(r.data),
            raw::REP_ACK => break,
            t => panic!("GO failed with {t:#x}"),
        }
    }
    let block_size = infos.iter().find(|d| d[..2] == raw::INFO_BLOCK_SIZE.to_be_bytes());
    let block_size = block_size.unwrap_or_else(|| panic!("no NBD_INFO_BLOCK_SIZE among {infos:?}"));
    let word = |i: usize| u32::from_be_bytes(block_size[2 + 4 * i..6 + 4 * i].try_into().unwrap());
    assert_eq!((word(0), word(1), word(2)), (1, 4096, 1 << 20), "minimum, preferred, maximum");

    // The payload looks like READ requests: it must be skipped, not parsed.
    let fake = Conn::request_bytes(0, raw::CMD_READ, 666, 0, 16);
    let payload: Vec<u8> = fake.iter().cycle().take(2 << 20).copied().collect();
    c.request(0, raw::CMD_WRITE, 1, 0, payload.len() as u32);
    c.send(&payload);
    assert_eq!(c.simple_reply(), (raw::EINVAL, 1), "WRITE over the maximum");
    c.request(0, raw::CMD_READ, 2, 0, 16);
    assert_eq!(c.simple_reply(), (0, 2), "next request after the refused write");
    assert_eq!(c.recv(16), vec![0u8; 16], "the refused write changed the disk");
}

#[test]
fn blocksize_write_disconnect_drops_the_client() {
    // nbdkit-blocksize-policy-filter: a write over blocksize-write-disconnect ends the
    // connection (nbdkit_disconnect(true)); smaller writes are served, other clients too.
    let mut srv =
        Server::unix(&["--filter=blocksize-policy", "memory", "1M", "blocksize-write-disconnect=4k"]);
    let mut c = srv.raw();
    c.handshake();
    c.request(0, raw::CMD_WRITE, 1, 0, 4096);
    c.send(&[7; 4096]);
    assert_eq!(c.simple_reply(), (0, 1), "a write at the limit");
    c.request(0, raw::CMD_WRITE, 2, 0, 8192);
    let _ = c.try_send(&[7; 8192]);
    let got = c.expect_closed(Duration::from_secs(10));
    // Dropped at once: at most the write's own ESHUTDOWN made it out first.
    let eshutdown = raw::parse_simple_reply(&got, 0) == Some((raw::ESHUTDOWN, 2, 16)) && got.len() == 16;
    assert!(got.is_empty() || eshutdown, "bytes after the oversize write: {got:?}");
    assert!(srv.stderr().contains("disconnecting the client"), "server log:\n{}", srv.stderr());
    assert_serves(&mut srv);
}

#[test]
fn accepted_tcp_connections_have_nagle_off() {
    // §A item 3: small replies must not wait for Nagle's algorithm. The server's own socket is
    // looked at through pidfd_getfd: the descriptor whose peer is this client.
    use std::io::Read;
    use std::os::fd::AsFd;
    let srv = Server::tcp(&["memory", "1M"]);
    let port = srv.uri().rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse::<u16>().ok());
    let mut client =
        std::net::TcpStream::connect(("127.0.0.1", port.expect("port in URI"))).expect("connect");
    let mut greeting = [0u8; 18];
    client.read_exact(&mut greeting).expect("greeting");
    let me = client.local_addr().expect("local address");
    let pid = rustix::process::Pid::from_raw(srv.pid()).expect("pid");
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).expect("pidfd_open");
    let mut nodelay = None;
    for entry in std::fs::read_dir(format!("/proc/{}/fd", srv.pid())).expect("server's descriptors") {
        let entry = entry.expect("fd entry");
        let is_socket =
            std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        let Ok(theirs) = rustix::process::pidfd_getfd(&pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
        else {
            continue;
        };
        let peer = rustix::net::getpeername(theirs.as_fd()).ok().flatten();
        if peer.and_then(|p| std::net::SocketAddr::try_from(p).ok()) == Some(me) {
            nodelay =
                Some(rustix::net::sockopt::tcp_nodelay(theirs.as_fd()).expect("getsockopt TCP_NODELAY"));
        }
    }
    assert_eq!(nodelay, Some(true), "TCP_NODELAY on the server's end of the connection (None: not found)");
}

#[test]
fn zero_length_write_succeeds() {
    let srv = Server::unix(&["memory", "1M"]);
    let mut c = srv.raw();
    c.handshake();
    c.request(0, raw::CMD_WRITE, 1, 4096, 0);
    assert_eq!(c.simple_reply(), (0, 1), "zero-length WRITE");
    c.request(0, raw::CMD_FLUSH, 2, 0, 0);
    assert_eq!(c.simple_reply(), (0, 2), "the stream stays in step");
}

#[test]
fn sigterm_answers_requests_in_flight_and_refuses_new_ones_with_eshutdown() {
    // §E item 68: on shutdown, requests in flight complete; new ones get ESHUTDOWN; then the
    // server closes the connection and exits.
    let mut srv = Server::unix(&["--filter=delay", "memory", "1M", "rdelay=1s"]);
    let mut c = srv.raw();
    c.handshake();
    c.request(0, raw::CMD_READ, 1, 0, 512);
    thread::sleep(Duration::from_millis(200));
    common::signal(srv.pid(), common::Signal::TERM);
    thread::sleep(Duration::from_millis(300));
    c.request(0, raw::CMD_WRITE, 2, 0, 512);
    c.send(&[0x25; 512]);
    c.request(0, raw::CMD_FLUSH, 3, 0, 0);
    assert_eq!(c.simple_reply(), (raw::ESHUTDOWN, 2), "WRITE sent after SIGTERM");
    assert_eq!(c.simple_reply(), (raw::ESHUTDOWN, 3), "FLUSH sent after SIGTERM");
    assert_eq!(c.simple_reply(), (0, 1), "the READ in flight at SIGTERM");
    assert_eq!(c.recv(512), vec![0u8; 512]);
    let rest = c.expect_closed(Duration::from_secs(10));
    assert!(rest.is_empty(), "bytes after the last reply: {rest:?}");
    let st = srv.wait_exit(Duration::from_secs(10)).expect("server still running 10 s after SIGTERM");
    assert!(st.success(), "exit status {st}\n{}", srv.stderr());
}

#[test]
fn file_shrinking_under_queued_sendfile_replies_drops_the_connection() {
    // §L items 96 and 99: a simple reply's header promises the data. Large cached `file` reads
    // are queued as file ranges and sent with sendfile later; if the file shrinks meanwhile,
    // the data cannot be sent as promised, and the only honest end is a hard disconnect:
    // every reply that arrives whole is right, and nothing follows the broken one.
    let dir = common::TempDir::new("shrink");
    let path = dir.join("disk.img");
    const MIB: usize = 1 << 20;
    let data = common::write_random_file(&path, 8 * MIB, 99);
    let mut srv = Server::unix(&["file", &path.display().to_string()]);
    let mut c = srv.raw();
    c.handshake();
    // Eight 1 MiB reads in one write, not read back yet: the socket buffer takes a fraction of
    // one, and the rest wait in the server's queue as file ranges. The first reply's header
    // shows the server has taken them all (one turn of its loop).
    let mut reads = Vec::new();
    for i in 0..8u64 {
        reads.extend(Conn::request_bytes(0, raw::CMD_READ, i + 1, i * MIB as u64, MIB as u32));
    }
    c.send(&reads);
    let mut got = c.recv(16);
    thread::sleep(Duration::from_millis(100));
    std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(0).expect("truncate");
    got.extend(c.expect_closed(Duration::from_secs(10)));
    let mut pos = 0;
    let mut whole = 0;
    while let Some((err, cookie, at)) = raw::parse_simple_reply(&got, pos) {
        assert_eq!((err, cookie), (0, whole + 1), "reply {whole}");
        if got.len() < at + MIB {
            break; // cut off: the disconnect
        }
        let offset = whole as usize * MIB;
        common::assert_same_bytes("a whole reply", &data[offset..offset + MIB], &got[at..at + MIB]);
        whole += 1;
        pos = at + MIB;
    }
    assert!(whole < 8, "all eight replies arrived whole from a truncated file");
    assert!(got.len() < pos + 16 + MIB, "bytes after the broken reply");
    // The server lives on, serving the file as it now is.
    srv.assert_alive();
    assert_eq!(srv.raw().handshake().0, 0, "size of the emptied file");
    let log = srv.stderr();
    assert!(log.contains("sendfile: the file ended early; disconnecting"), "server log:\n{log}");
}

#[test]
fn oversize_read_gets_einval_and_connection_survives() {
    let srv = Server::unix(&["memory", "1G"]);
    let mut c = srv.raw();
    c.handshake();
    c.request(0, raw::CMD_READ, 1, 0, 0x7fff_ffff);
    let (err, cookie) = c.simple_reply();
    assert_eq!((err, cookie), (raw::EINVAL, 1), "2 GiB READ must get EINVAL (not ENOMEM)");
    c.request(0, raw::CMD_READ, 2, 0, 512);
    assert_eq!(c.simple_reply(), (0, 2));
    c.recv(512);
}

#[test]
fn unknown_command_gets_einval() {
    let srv = Server::unix(&["memory", "1M"]);
    let mut c = srv.raw();
    c.handshake();
    c.request(0, 0x55, 1, 0, 0);
    assert_eq!(c.simple_reply(), (raw::EINVAL, 1), "unknown command");
    c.request(0, raw::CMD_FLUSH, 2, 0, 0);
    assert_eq!(c.simple_reply(), (0, 2), "flush after unknown command");
}

#[test]
fn write_past_end_consumes_payload() {
    let srv = Server::unix(&["memory", "1M"]);
    let mut c = srv.raw();
    c.handshake();
    // The refused write's payload must be skipped, not parsed as requests: fill it with bytes
    // that look like a READ request.
    let fake = Conn::request_bytes(0, raw::CMD_READ, 666, 0, 16);
    let payload: Vec<u8> = fake.iter().cycle().take(28 * 10).copied().collect();
    c.request(0, raw::CMD_WRITE, 1, (1 << 20) - 28, payload.len() as u32);
    c.send(&payload);
    assert_eq!(c.simple_reply(), (raw::ENOSPC, 1), "write past end");
    c.request(0, raw::CMD_READ, 2, 0, 16);
    assert_eq!(c.simple_reply(), (0, 2), "next request after refused write");
    assert_eq!(c.recv(16), vec![0u8; 16]);
}

#[test]
fn extended_headers_round_trip() {
    let srv = Server::unix(&["memory", "1M"]);
    let mut c = srv.raw();
    c.start();
    c.send_opt(raw::OPT_EXTENDED_HEADERS, &[]);
    let r = c.opt_reply();
    assert_eq!((r.opt, r.typ), (raw::OPT_EXTENDED_HEADERS, raw::REP_ACK), "EXTENDED_HEADERS: {r:?}");
    // STRUCTURED_REPLY after extended headers: EXT_HEADER_REQD (or another error), never ACK.
    c.send_opt(raw::OPT_STRUCTURED_REPLY, &[]);
    let r = c.opt_reply();
    assert!(r.typ & 0x8000_0000 != 0, "STRUCTURED_REPLY after EXTENDED_HEADERS was ACKed: {r:?}");
    let (size, _) = c.go("");
    assert_eq!(size, 1 << 20);

    let data = common::random_bytes(8192, 9);
    c.ext_request(raw::CMD_FLAG_PAYLOAD_LEN, raw::CMD_WRITE, 1, 4096, data.len() as u64);
    c.send(&data);
    let (ch, off) = c.ext_chunk();
    assert_eq!((ch.cookie, ch.typ, off), (1, raw::REPLY_TYPE_NONE, 4096), "extended WRITE reply {ch:?}");
    assert!(ch.flags & raw::REPLY_FLAG_DONE != 0);

    c.ext_request(0, raw::CMD_READ, 2, 4096, 8192);
    let mut buf = vec![0xa5u8; 8192];
    let mut covered = 0;
    loop {
        let (ch, off) = c.ext_chunk();
        assert_eq!((ch.cookie, off), (2, 4096), "extended replies echo cookie and request offset");
        match ch.typ {
            raw::REPLY_TYPE_OFFSET_DATA => {
                let at = u64::from_be_bytes(ch.payload[..8].try_into().unwrap()) as usize;
                let d = &ch.payload[8..];
                buf[at - 4096..at - 4096 + d.len()].copy_from_slice(d);
                covered += d.len();
            }
            raw::REPLY_TYPE_OFFSET_HOLE => {
                let at = u64::from_be_bytes(ch.payload[..8].try_into().unwrap()) as usize;
                let n = u32::from_be_bytes(ch.payload[8..12].try_into().unwrap()) as usize;
                buf[at - 4096..at - 4096 + n].fill(0);
                covered += n;
            }
            raw::REPLY_TYPE_NONE => {}
            t => panic!("unexpected chunk type {t:#x}"),
        }
        if ch.flags & raw::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, 8192);
    common::assert_same_bytes("extended read", &data, &buf);

    c.ext_request(0, raw::CMD_DISC, 3, 0, 0);
    let rest = c.expect_closed(Duration::from_secs(5));
    assert!(rest.is_empty(), "data after DISC");
}

#[test]
fn oldstyle_greeting_and_read() {
    let srv = Server::unix(&["-o", "pattern", "1M"]);
    let mut c = srv.raw();
    assert_eq!(c.u64(), raw::NBDMAGIC);
    assert_eq!(c.u64(), raw::OLDSTYLE_MAGIC, "oldstyle magic");
    assert_eq!(c.u64(), 1 << 20, "oldstyle size");
    let flags = c.u32();
    assert!(flags & 1 != 0, "HAS_FLAGS missing in oldstyle flags {flags:#x}");
    assert!(flags & 2 != 0, "pattern is read-only: {flags:#x}");
    assert_eq!(c.recv(124), vec![0u8; 124]);
    c.request(0, raw::CMD_READ, 1, 1024, 64);
    assert_eq!(c.simple_reply(), (0, 1));
    assert_eq!(c.recv(64), pattern(1024, 64));
    // Also libnbd understands it.
    let out = common::run_ok(common::tool("nbdinfo").arg(srv.uri()));
    assert!(out.stdout.contains("protocol: oldstyle"), "{}", out.describe());
}
