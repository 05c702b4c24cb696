//! Tests of the `nbd` backend: the protocol machine with byte scripts (every handshake path,
//! every chunk type, every way a server can break the protocol), configuration, and the whole
//! backend on a real event loop (`LocalLoop`) against blocksmith's own server running in
//! process, including pooling, an upstream that goes away and comes back, and `retry=`.

use std::cell::RefCell;
use std::io::IoSlice;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use blocksmith_core::conn::ConnConfig;
use blocksmith_core::control::ServerControl;
use blocksmith_core::error::{Errno, NbdError};
use blocksmith_core::io::reactor::LocalLoop;
use blocksmith_core::io::server::{serve, Listener, ServerConfig};
use blocksmith_core::layer::{
    BackendFactory, Done, Extent, Extents, Flags, Layer, OpenCx, Stack, Support, EXTENT_HOLE, EXTENT_ZERO,
};
use blocksmith_core::proto::*;

use super::machine::{Fatal, Machine, Op, Reply, TlsMode, UpstreamInfo};
use super::*;
use crate::memory::MemoryFactory;
use crate::testutil::{make_err, params};

// ---- Byte-script helpers ---------------------------------------------------------------------

/// Everything the machine wants to send, drained.
fn sent<T>(m: &mut Machine<T>) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let out = m.out();
        let n = {
            let mut iov = [IoSlice::new(&[]); 8];
            let k = out.iovecs(&mut iov);
            for s in &iov[..k] {
                v.extend_from_slice(s);
            }
            iov[..k].iter().map(|s| s.len()).sum::<usize>()
        };
        if n == 0 {
            return v;
        }
        out.consume(n);
    }
}

/// Feed `bytes` in pieces of `step` bytes (1 finds every resumption bug).
fn feed<T>(m: &mut Machine<T>, bytes: &[u8], step: usize) -> Result<(), Fatal> {
    for piece in bytes.chunks(step.max(1)) {
        m.feed(piece)?;
    }
    Ok(())
}

fn greeting(flags: u16) -> Vec<u8> {
    let mut v = Vec::new();
    encode_newstyle_greeting(&mut v, flags);
    v
}

fn reply(opt: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_option_reply(&mut v, opt, typ, data);
    v
}

/// Split the client's bytes into (option code, data) pairs.
fn options(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let h = decode_option_header(b[..16].try_into().unwrap()).unwrap();
        let len = h.len as usize;
        v.push((h.code, b[16..16 + len].to_vec()));
        b = &b[16 + len..];
    }
    v
}

const FLAGS_RW: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_FAST_ZERO
    | FLAG_CAN_MULTI_CONN
    | FLAG_SEND_CACHE;

/// Drive the usual successful handshake (fixed newstyle, SR, base:allocation as context 5, GO)
/// in pieces of `step` bytes, checking every option the client sends.
fn handshake(export: &str, step: usize) -> Machine<u32> {
    let mut m = Machine::new(export);
    assert!(sent(&mut m).is_empty(), "the server speaks first");
    feed(&mut m, &greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), step).unwrap();
    let out = sent(&mut m);
    assert_eq!(&out[..4], &(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    assert_eq!(options(&out[4..]), vec![(OPT_STRUCTURED_REPLY, vec![])]);
    feed(&mut m, &reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]), step).unwrap();
    let o = options(&sent(&mut m));
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].0, OPT_SET_META_CONTEXT);
    let q = parse_meta_context_request(&o[0].1, 10).unwrap();
    assert_eq!((q.name.as_str(), q.queries), (export, vec![BASE_ALLOCATION.to_string()]));
    let mut meta = Vec::new();
    encode_rep_meta_context(&mut meta, OPT_SET_META_CONTEXT, 5, BASE_ALLOCATION);
    meta.extend(reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    feed(&mut m, &meta, step).unwrap();
    let o = options(&sent(&mut m));
    assert_eq!(o[0].0, OPT_GO);
    let go = parse_info_request(&o[0].1).unwrap();
    assert_eq!(go.name, export);
    assert!(go.infos.contains(&INFO_BLOCK_SIZE));
    let mut info = Vec::new();
    encode_info_export(&mut info, OPT_GO, 1 << 20, FLAGS_RW);
    encode_info_block_size(&mut info, OPT_GO, 512, 4096, 1 << 21);
    encode_info_string(&mut info, OPT_GO, INFO_DESCRIPTION, "upstream disk");
    encode_info_string(&mut info, OPT_GO, 77, "an info type from the future");
    assert!(!m.is_ready());
    info.extend(reply(OPT_GO, REP_ACK, &[]));
    feed(&mut m, &info, step).unwrap();
    assert!(m.is_ready());
    m
}

/// The request headers (and write payloads) the client sent.
fn requests(mut b: &[u8]) -> Vec<(RequestHeader, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let h = decode_compact_request(b[..28].try_into().unwrap()).unwrap();
        let n = if h.typ == CMD_WRITE { h.length as usize } else { 0 };
        v.push((h, b[28..28 + n].to_vec()));
        b = &b[28 + n..];
    }
    v
}

fn structured(flags: u16, typ: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_chunk_header(&mut v, ReplyForm::Structured, flags, typ, cookie, 0, payload.len() as u64);
    v.extend_from_slice(payload);
    v
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_offset_data_header(&mut v, ReplyForm::Structured, flags, cookie, 0, offset, data.len());
    v.extend_from_slice(data);
    v
}

fn simple(error: u32, cookie: u64) -> Vec<u8> {
    let mut v = Vec::new();
    encode_simple_reply(&mut v, error, cookie);
    v
}

/// Submit, and return the cookie the machine used.
fn submit(m: &mut Machine<u32>, op: Op, offset: u64, flags: u16, token: u32) -> (RequestHeader, Vec<u8>) {
    assert!(m.submit(op, offset, flags, token).is_ok());
    let mut r = requests(&sent(m));
    assert_eq!(r.len(), 1);
    r.remove(0)
}

// ---- Handshake -------------------------------------------------------------------------------

#[test]
fn handshake_negotiates_everything_byte_by_byte() {
    for step in [1, 3, 7, 1000] {
        let m = handshake("disk", step);
        let i = m.info().unwrap();
        assert_eq!(
            i,
            UpstreamInfo {
                size: 1 << 20,
                flags: FLAGS_RW,
                block_size: Some((512, 4096, 1 << 21)),
                description: Some("upstream disk".into()),
                structured: true,
                extents: true,
            }
        );
        let e = export_info(&i);
        assert!(e.can_write && e.can_flush && e.can_trim && e.can_fast_zero && e.can_extents);
        assert!(e.can_multi_conn && !e.is_rotational);
        assert_eq!((e.fua, e.zero, e.cache), (Support::Native, Support::Native, Support::Native));
        assert_eq!(e.block_size.unwrap().maximum, 1 << 21);
        assert_eq!(e.description.as_deref(), Some("upstream disk"));
    }
}

#[test]
fn handshake_without_structured_replies_or_meta_contexts() {
    let mut m: Machine<u32> = Machine::new("");
    m.feed(&greeting(FLAG_FIXED_NEWSTYLE)).unwrap();
    let out = sent(&mut m);
    // No NO_ZEROES from a server that did not offer it.
    assert_eq!(&out[..4], &FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    m.feed(&reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"no")).unwrap();
    // Straight to GO: no meta context without structured replies.
    assert_eq!(options(&sent(&mut m))[0].0, OPT_GO);
    let mut info = Vec::new();
    encode_info_export(&mut info, OPT_GO, 4096, FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_ROTATIONAL);
    info.extend(reply(OPT_GO, REP_ACK, &[]));
    m.feed(&info).unwrap();
    let i = m.info().unwrap();
    assert!(!i.structured && !i.extents && i.block_size.is_none());
    let e = export_info(&i);
    assert!(!e.can_write && !e.can_flush && !e.can_extents && e.is_rotational && !e.can_multi_conn);
    assert_eq!((e.fua, e.cache), (Support::None, Support::None));
    // The spec's default limit when the server gives none.
    assert_eq!(e.block_size.unwrap().maximum, 32 << 20);

    // Meta context refused: structured replies but no block status.
    let mut m: Machine<u32> = Machine::new("x");
    m.feed(&greeting(3)).unwrap();
    m.feed(&reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])).unwrap();
    sent(&mut m);
    m.feed(&reply(OPT_SET_META_CONTEXT, REP_ERR_INVALID, b"")).unwrap();
    assert_eq!(options(&sent(&mut m))[0].0, OPT_GO);
    let mut info = Vec::new();
    encode_info_export(&mut info, OPT_GO, 4096, FLAG_HAS_FLAGS);
    info.extend(reply(OPT_GO, REP_ACK, &[]));
    m.feed(&info).unwrap();
    let i = m.info().unwrap();
    assert!(i.structured && !i.extents);
    // FUA is emulated by a flush only where there is a flush.
    let e = export_info(&UpstreamInfo { flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH, ..i });
    assert_eq!(e.fua, Support::Emulate);
}

#[test]
fn handshake_falls_back_to_export_name() {
    for no_zeroes in [false, true] {
        let mut m: Machine<u32> = Machine::new("old");
        let hflags = FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 };
        m.feed(&greeting(hflags)).unwrap();
        m.feed(&reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[])).unwrap();
        sent(&mut m);
        m.feed(&reply(OPT_GO, REP_ERR_UNSUP, &[])).unwrap();
        let o = options(&sent(&mut m));
        assert_eq!(o, vec![(OPT_EXPORT_NAME, b"old".to_vec())]);
        let mut r = Vec::new();
        encode_export_name_reply(&mut r, 8192, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH, !no_zeroes);
        let (head, last) = r.split_at(r.len() - 1);
        m.feed(head).unwrap();
        assert!(!m.is_ready(), "ready before the last zero byte");
        m.feed(last).unwrap();
        let i = m.info().unwrap();
        assert_eq!((i.size, i.flags), (8192, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH));
    }
    // Plain (not fixed) newstyle: EXPORT_NAME at once, no other option.
    let mut m: Machine<u32> = Machine::new("e");
    m.feed(&greeting(0)).unwrap();
    let out = sent(&mut m);
    assert_eq!(&out[..4], &[0, 0, 0, 0]);
    assert_eq!(options(&out[4..]), vec![(OPT_EXPORT_NAME, b"e".to_vec())]);
    let mut r = Vec::new();
    // A server that forgets HAS_FLAGS advertises nothing (libnbd's reading).
    encode_export_name_reply(&mut r, 512, FLAG_SEND_FLUSH, true);
    m.feed(&r).unwrap();
    assert_eq!(m.info().unwrap().flags, 0);
    // Oldstyle: the greeting is the handshake.
    let mut m: Machine<u32> = Machine::new("ignored");
    let mut g = Vec::new();
    encode_oldstyle_greeting(&mut g, 1 << 30, u32::from(FLAG_HAS_FLAGS | FLAG_READ_ONLY));
    feed(&mut m, &g, 5).unwrap();
    assert!(sent(&mut m).is_empty());
    let i = m.info().unwrap();
    assert_eq!((i.size, i.flags, i.structured), (1 << 30, FLAG_HAS_FLAGS | FLAG_READ_ONLY, false));
}

#[test]
fn handshake_failures_are_fatal_with_a_reason() {
    let go_refused = |typ: u32, msg: &[u8]| {
        let mut m: Machine<u32> = Machine::new("nope");
        m.feed(&greeting(3)).unwrap();
        m.feed(&reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[])).unwrap();
        m.feed(&reply(OPT_GO, typ, msg)).unwrap_err()
    };
    let e = go_refused(REP_ERR_UNKNOWN, b"no such export");
    assert!(
        e.0.contains("NBD_REP_ERR_UNKNOWN") && e.0.contains("no such export") && e.0.contains("nope"),
        "{e:?}"
    );
    assert!(go_refused(REP_ERR_TLS_REQD, b"").0.contains("TLS_REQD"));

    let script = |bytes: Vec<u8>| {
        let mut m: Machine<u32> = Machine::new("");
        m.feed(&bytes).unwrap_err()
    };
    // Not NBD at all.
    assert!(script(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).0.contains("not an NBD server"));
    // A reply to another option.
    let mut b = greeting(3);
    b.extend(reply(OPT_GO, REP_ACK, &[]));
    assert!(script(b).0.contains("while waiting for option 8"));
    // ACK with data, a huge option reply, a bad reply magic.
    let mut b = greeting(3);
    b.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, b"x"));
    assert!(script(b).0.contains("NBD_REP_ACK with 1 bytes"));
    let mut b = greeting(3);
    encode_option_reply_header(&mut b, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, u32::MAX);
    assert!(script(b).0.contains("option reply of"));
    let mut b = greeting(3);
    b.extend_from_slice(&[0u8; 20]);
    assert!(script(b).0.contains("bad magic"));
    // GO acknowledged without NBD_INFO_EXPORT; a malformed INFO.
    let mut b = greeting(3);
    b.extend(reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    b.extend(reply(OPT_GO, REP_ACK, &[]));
    assert!(script(b).0.contains("without NBD_INFO_EXPORT"));
    let mut b = greeting(3);
    b.extend(reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    b.extend(reply(OPT_GO, REP_INFO, &[0, 0, 1]));
    assert!(script(b).0.contains("NBD_INFO_EXPORT with 3 bytes"));
    // After a fatal error nothing more is accepted.
    let mut m: Machine<u32> = Machine::new("");
    assert!(m.feed(&[0; 16]).is_err());
    assert!(m.feed(&greeting(3)).is_err());
    // Requests before the handshake are handed back.
    let mut m: Machine<u32> = Machine::new("");
    assert_eq!(m.submit(Op::Flush, 0, 0, 9), Err(9));
}

#[test]
fn starttls_comes_first_and_refusals_follow_the_mode() {
    // Accepted: nothing more is sent until the driver has a session.
    for mode in [TlsMode::On, TlsMode::Require] {
        let mut m: Machine<u32> = Machine::with_tls("", mode);
        feed(&mut m, &greeting(3), 1).unwrap();
        let out = sent(&mut m);
        assert_eq!(options(&out[4..]), vec![(OPT_STARTTLS, Vec::new())]);
        feed(&mut m, &reply(OPT_STARTTLS, REP_ACK, &[]), 3).unwrap();
        assert!(m.wants_tls() && sent(&mut m).is_empty());
        // Plaintext after the ACK is a protocol error.
        let mut m2: Machine<u32> = Machine::with_tls("", mode);
        let mut b = greeting(3);
        b.extend(reply(OPT_STARTTLS, REP_ACK, &[]));
        b.push(0x16);
        assert!(m2.feed(&b).unwrap_err().0.contains("after the server accepted STARTTLS"));
        // Inside TLS the handshake goes on as usual.
        m.tls_established();
        assert!(m.is_encrypted() && !m.wants_tls());
        assert_eq!(options(&sent(&mut m))[0].0, OPT_STRUCTURED_REPLY);
    }
    // tls=on: a refusal means plaintext.
    for refusal in [REP_ERR_POLICY, REP_ERR_UNSUP] {
        let mut m: Machine<u32> = Machine::with_tls("", TlsMode::On);
        m.feed(&greeting(3)).unwrap();
        sent(&mut m);
        m.feed(&reply(OPT_STARTTLS, refusal, b"no tls here")).unwrap();
        assert!(!m.wants_tls() && !m.is_encrypted());
        assert_eq!(options(&sent(&mut m))[0].0, OPT_STRUCTURED_REPLY);
    }
    // tls=require: a refusal, a plain newstyle or an oldstyle server is fatal.
    let mut m: Machine<u32> = Machine::with_tls("", TlsMode::Require);
    m.feed(&greeting(3)).unwrap();
    let e = m.feed(&reply(OPT_STARTTLS, REP_ERR_POLICY, b"off")).unwrap_err();
    assert!(e.0.contains("refused STARTTLS") && e.0.contains("NBD_REP_ERR_POLICY"), "{e:?}");
    let mut m: Machine<u32> = Machine::with_tls("", TlsMode::Require);
    assert!(m.feed(&greeting(0)).unwrap_err().0.contains("not fixed newstyle"));
    let mut m: Machine<u32> = Machine::with_tls("", TlsMode::Require);
    let mut g = Vec::new();
    encode_oldstyle_greeting(&mut g, 1 << 20, 0);
    assert!(m.feed(&g).unwrap_err().0.contains("oldstyle"));
    // tls=on with an oldstyle server: plaintext.
    let mut m: Machine<u32> = Machine::with_tls("", TlsMode::On);
    m.feed(&g).unwrap();
    assert!(m.is_ready());
}

// ---- Transmission ----------------------------------------------------------------------------

#[test]
fn requests_are_encoded_with_their_payload() {
    let mut m = handshake("", 100);
    let (h, payload) = submit(&mut m, Op::Write(b"hello".to_vec()), 4096, CMD_FLAG_FUA, 1);
    assert_eq!((h.typ, h.flags, h.offset, h.length), (CMD_WRITE, CMD_FLAG_FUA, 4096, 5));
    assert_eq!(payload, b"hello");
    let (h2, _) = submit(&mut m, Op::Zero(1 << 20), 0, CMD_FLAG_NO_HOLE, 2);
    assert_eq!((h2.typ, h2.flags, h2.length), (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 1 << 20));
    assert_ne!(h.cookie, h2.cookie);
    for (op, typ) in [
        (Op::Flush, CMD_FLUSH),
        (Op::Trim(9), CMD_TRIM),
        (Op::Cache(9), CMD_CACHE),
        (Op::BlockStatus(9), CMD_BLOCK_STATUS),
        (Op::Read(vec![0; 9]), CMD_READ),
    ] {
        assert_eq!(submit(&mut m, op, 0, 0, 3).0.typ, typ);
    }
    assert_eq!(m.in_flight(), 7);
    // Replies in any order; simple replies for non-reads (as nbdkit sends them).
    let mut b = simple(0, h2.cookie);
    b.extend(simple(ENOSPC, h.cookie));
    m.feed(&b).unwrap();
    let mut done = m.take_completions();
    done.sort_by_key(|(t, _)| *t);
    assert_eq!(done[0], (1, Err(NbdError::new(Errno::NoSpc))));
    assert_eq!(done[1], (2, Ok(Reply::Done)));
    // A disconnect is queued as NBD_CMD_DISC.
    m.disconnect();
    assert_eq!(requests(&sent(&mut m))[0].0.typ, CMD_DISC);
    // Losing the connection fails what is left.
    let lost = m.fail_all(&NbdError::io("gone"));
    assert_eq!(lost.len(), 5);
    assert!(lost.iter().all(|(_, r)| r.as_ref().unwrap_err().errno == Errno::Io));
}

#[test]
fn structured_read_is_assembled_from_data_and_holes() {
    for step in [1, 5, 13, 10_000] {
        let mut m = handshake("", 1000);
        let (h, _) = submit(&mut m, Op::Read(vec![0xa5; 100]), 1000, 0, 7);
        // Out of order: the tail first, a hole in the middle, then the head; then NONE.
        let mut b = data_chunk(0, h.cookie, 1060, &[2; 40]);
        let mut hole = Vec::new();
        encode_offset_hole(&mut hole, ReplyForm::Structured, 0, h.cookie, 0, 1030, 30);
        b.extend(hole);
        b.extend(data_chunk(0, h.cookie, 1000, &[1; 30]));
        b.extend(structured(REPLY_FLAG_DONE, REPLY_TYPE_NONE, h.cookie, &[]));
        feed(&mut m, &b, step).unwrap();
        let mut want = vec![1u8; 30];
        want.extend([0; 30]);
        want.extend([2; 40]);
        assert_eq!(m.take_completions(), vec![(7, Ok(Reply::Data(want)))]);
        assert_eq!(m.in_flight(), 0);
    }
    // A simple reply with data (a server without structured replies), fed byte by byte.
    let mut m = handshake("", 1000);
    let (h, _) = submit(&mut m, Op::Read(vec![0; 4]), 0, 0, 1);
    let mut b = simple(0, h.cookie);
    b.extend_from_slice(b"abcd");
    feed(&mut m, &b, 1).unwrap();
    assert_eq!(m.take_completions(), vec![(1, Ok(Reply::Data(b"abcd".to_vec())))]);
    // A simple error carries no data: the next reply follows at once.
    let (h1, _) = submit(&mut m, Op::Read(vec![0; 4]), 0, 0, 2);
    let (h2, _) = submit(&mut m, Op::Flush, 0, 0, 3);
    let mut b = simple(EIO, h1.cookie);
    b.extend(simple(0, h2.cookie));
    m.feed(&b).unwrap();
    assert_eq!(m.take_completions().len(), 2);
    // The last data chunk may carry DONE itself.
    let (h, _) = submit(&mut m, Op::Read(vec![0; 3]), 10, 0, 4);
    m.feed(&data_chunk(REPLY_FLAG_DONE, h.cookie, 10, b"xyz")).unwrap();
    assert_eq!(m.take_completions(), vec![(4, Ok(Reply::Data(b"xyz".to_vec())))]);
}

#[test]
fn read_data_can_go_straight_into_the_buffer() {
    let mut m = handshake("", 1000);
    assert!(m.data_target().is_none());
    let (h, _) = submit(&mut m, Op::Read(vec![0; 10]), 100, 0, 1);
    // Structured: after the chunk header and offset the machine asks for the data itself.
    let chunk = data_chunk(0, h.cookie, 102, b"abcdefgh");
    m.feed(&chunk[..28]).unwrap();
    let dst = m.data_target().unwrap();
    assert_eq!(dst.len(), 8);
    dst[..3].copy_from_slice(b"abc");
    m.data_received(3);
    m.data_target().unwrap().copy_from_slice(b"defgh");
    m.data_received(5);
    assert!(m.data_target().is_none());
    let mut hole = Vec::new();
    encode_offset_hole(&mut hole, ReplyForm::Structured, REPLY_FLAG_DONE, h.cookie, 0, 100, 2);
    m.feed(&hole).unwrap();
    assert_eq!(m.take_completions(), vec![(1, Ok(Reply::Data(b"\0\0abcdefgh".to_vec())))]);
    // Simple: the whole request length follows the header.
    let (h, _) = submit(&mut m, Op::Read(vec![0; 4]), 0, 0, 2);
    m.feed(&simple(0, h.cookie)).unwrap();
    m.data_target().unwrap().copy_from_slice(b"wxyz");
    m.data_received(4);
    assert_eq!(m.take_completions(), vec![(2, Ok(Reply::Data(b"wxyz".to_vec())))]);
    assert!(m.data_target().is_none());
}

#[test]
fn read_that_is_not_covered_fails() {
    let mut m = handshake("", 1000);
    let (h, _) = submit(&mut m, Op::Read(vec![0; 10]), 0, 0, 1);
    let mut b = data_chunk(0, h.cookie, 0, &[1; 4]);
    b.extend(structured(REPLY_FLAG_DONE, REPLY_TYPE_NONE, h.cookie, &[]));
    m.feed(&b).unwrap();
    let (_, r) = m.take_completions().remove(0);
    let e = r.unwrap_err();
    assert_eq!(e.errno, Errno::Io);
    assert!(e.message.unwrap().contains("covered 4 of 10"));
}

#[test]
fn error_chunks_carry_errno_and_message() {
    let mut m = handshake("", 1000);
    let (h, _) = submit(&mut m, Op::Read(vec![0; 512]), 0, 0, 1);
    let mut e = Vec::new();
    encode_error_offset_chunk(&mut e, ReplyForm::Structured, 0, h.cookie, 0, ENOSPC, "disk full", 256);
    // A second error is ignored; the first one wins.
    encode_error_chunk(&mut e, ReplyForm::Structured, REPLY_FLAG_DONE, h.cookie, 0, EPERM, "later");
    feed(&mut m, &e, 3).unwrap();
    assert_eq!(m.take_completions(), vec![(1, Err(NbdError::msg(Errno::NoSpc, "disk full")))]);
    // An unknown error type still yields its errno; error 0 becomes EIO.
    let (h, _) = submit(&mut m, Op::Flush, 0, 0, 2);
    m.feed(&structured(REPLY_FLAG_DONE, 0x8042, h.cookie, &[0, 0, 0, 95, 0, 2, b'n', b'o', 9, 9])).unwrap();
    assert_eq!(m.take_completions(), vec![(2, Err(NbdError::msg(Errno::NotSup, "no")))]);
    let (h, _) = submit(&mut m, Op::Flush, 0, 0, 3);
    m.feed(&structured(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, h.cookie, &[0, 0, 0, 0, 0, 0])).unwrap();
    assert_eq!(m.take_completions()[0].1.as_ref().unwrap_err().errno, Errno::Io);
    // An errno outside the protocol's set reads as EINVAL, as the spec says.
    let (h, _) = submit(&mut m, Op::Flush, 0, 0, 4);
    m.feed(&simple(77, h.cookie)).unwrap();
    assert_eq!(m.take_completions()[0].1.as_ref().unwrap_err().errno, Errno::Inval);
}

#[test]
fn block_status_becomes_extents() {
    let mut m = handshake("", 1000);
    let (h, _) = submit(&mut m, Op::BlockStatus(1 << 16), 0, CMD_FLAG_REQ_ONE, 1);
    assert_eq!(h.flags, CMD_FLAG_REQ_ONE);
    let mut b = Vec::new();
    // Another context's answer is ignored; ours (id 5) is used; zero lengths are dropped.
    encode_block_status(&mut b, 0, h.cookie, 9, &[(1, 0)]);
    encode_block_status(&mut b, REPLY_FLAG_DONE, h.cookie, 5, &[(4096, 3), (0, 0), (8192, 0), (4096, 0)]);
    feed(&mut m, &b, 2).unwrap();
    let want = Extents(vec![
        Extent { length: 4096, flags: EXTENT_HOLE | EXTENT_ZERO },
        Extent { length: 12288, flags: 0 },
    ]);
    assert_eq!(m.take_completions(), vec![(1, Ok(Reply::Extents(want)))]);
    // Success without our context is an error, not an empty answer.
    let (h, _) = submit(&mut m, Op::BlockStatus(512), 0, 0, 2);
    m.feed(&structured(REPLY_FLAG_DONE, REPLY_TYPE_NONE, h.cookie, &[])).unwrap();
    assert_eq!(m.take_completions()[0].1.as_ref().unwrap_err().errno, Errno::Io);
}

#[test]
fn protocol_violations_are_fatal() {
    let check = |make: &dyn Fn(u64) -> Vec<u8>, op: Op, what: &str| {
        let mut m = handshake("", 1000);
        let (h, _) = submit(&mut m, op, 1000, 0, 1);
        let e = m.feed(&make(h.cookie)).unwrap_err();
        assert!(e.0.contains(what), "{what}: got {e:?}");
        // What was in flight is failed by the driver.
        assert_eq!(m.fail_all(&NbdError::io("x")).len(), 1);
    };
    let rd = || Op::Read(vec![0; 100]);
    check(&|c| simple(0, c + 1), rd(), "unknown cookie");
    check(&|c| structured(REPLY_FLAG_DONE, REPLY_TYPE_NONE, c + 1, &[]), rd(), "unknown cookie");
    check(&|c| data_chunk(0, c, 999, &[0; 4]), rd(), "outside its request");
    check(&|c| data_chunk(0, c, 1090, &[0; 11]), rd(), "outside its request");
    check(&|c| data_chunk(0, c, u64::MAX, &[0; 1]), rd(), "outside its request");
    check(&|c| structured(0, REPLY_TYPE_OFFSET_DATA, c, &[0; 8]), rd(), "OFFSET_DATA chunk of 8");
    check(&|c| data_chunk(0, c, 1000, &[0; 4]), Op::Flush, "not a read");
    check(
        &|c| {
            let mut v = Vec::new();
            encode_offset_hole(&mut v, ReplyForm::Structured, 0, c, 0, 1050, 51);
            v
        },
        rd(),
        "outside its request",
    );
    check(&|c| structured(0, REPLY_TYPE_OFFSET_HOLE, c, &[0; 12]), Op::Flush, "not a read");
    check(&|c| structured(0, REPLY_TYPE_NONE, c, &[1]), rd(), "NBD_REPLY_TYPE_NONE with 1");
    check(&|c| structured(0, 42, c, &[]), rd(), "unknown reply chunk type 42");
    check(&|c| structured(0, REPLY_TYPE_BLOCK_STATUS, c, &[0; 12]), rd(), "not block status");
    check(&|c| structured(0, REPLY_TYPE_BLOCK_STATUS, c, &[0; 7]), Op::BlockStatus(1), "BLOCK_STATUS of 7");
    check(&|c| structured(0, REPLY_TYPE_ERROR, c, &[0, 0, 0, 5, 0, 9]), rd(), "overruns");
    check(
        &|c| {
            let mut v = Vec::new();
            encode_chunk_header(&mut v, ReplyForm::Structured, 0, REPLY_TYPE_BLOCK_STATUS, c, 0, 1 << 30);
            v
        },
        Op::BlockStatus(1),
        "bytes of payload",
    );
    check(&|_| vec![0x67, 0x44, 0x66, 0x99], rd(), "bad magic");
    check(
        &|c| {
            let mut v = Vec::new();
            encode_chunk_header(&mut v, ReplyForm::Extended, REPLY_FLAG_DONE, 0, c, 0, 0);
            v
        },
        rd(),
        "not negotiated",
    );
    // Structured chunks from a server that never agreed to them.
    let mut m: Machine<u32> = Machine::new("");
    m.feed(&greeting(3)).unwrap();
    m.feed(&reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[])).unwrap();
    let mut info = Vec::new();
    encode_info_export(&mut info, OPT_GO, 4096, FLAG_HAS_FLAGS);
    info.extend(reply(OPT_GO, REP_ACK, &[]));
    m.feed(&info).unwrap();
    sent(&mut m);
    let (h, _) = submit(&mut m, Op::Flush, 0, 0, 1);
    let e = m.feed(&structured(REPLY_FLAG_DONE, REPLY_TYPE_NONE, h.cookie, &[])).unwrap_err();
    assert!(e.0.contains("not negotiated"));
}

#[test]
fn output_queue_keeps_order_across_partial_writes() {
    let mut m = handshake("", 1000);
    let big = vec![7u8; 200_000];
    m.submit(Op::Write(big.clone()), 0, 0, 1).unwrap();
    m.submit(Op::Flush, 0, 0, 2).unwrap();
    // Drain in odd-sized partial writes.
    let mut got = Vec::new();
    loop {
        let out = m.out();
        let n = {
            let mut iov = [IoSlice::new(&[]); 2];
            let k = out.iovecs(&mut iov);
            let mut n = 0;
            for s in &iov[..k] {
                let take = (777 - n).min(s.len());
                got.extend_from_slice(&s[..take]);
                n += take;
            }
            n
        };
        if n == 0 {
            break;
        }
        out.consume(n);
    }
    let r = requests(&got);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].1, big);
    assert_eq!(r[1].0.typ, CMD_FLUSH);
}

// ---- Configuration ---------------------------------------------------------------------------

fn cfg(kv: &[(&str, &str)]) -> Result<Config, String> {
    configure(&mut params(kv)).map_err(|e| e.0)
}

#[test]
fn parameters() {
    let c = cfg(&[("socket", "/tmp/s")]).unwrap();
    assert_eq!((c.addr.clone(), c.export.as_str()), (uri::Addr::Unix("/tmp/s".into()), ""));
    assert_eq!((c.shared, c.connections, c.max_upstream, c.retry), (false, 1, DEFAULT_MAX_UPSTREAM, 0));
    let c = cfg(&[("hostname", "h"), ("port", "99"), ("export", "e"), ("shared", "true"), ("retry", "3")])
        .unwrap();
    assert_eq!(c.addr, uri::Addr::Tcp { host: "h".into(), port: 99 });
    assert_eq!((c.export.as_str(), c.shared, c.retry), ("e", true, 3));
    let c =
        cfg(&[("uri", "nbd+unix:///d%20x?socket=/s"), ("connections", "2"), ("max-upstream", "8")]).unwrap();
    assert_eq!((c.export.as_str(), c.connections, c.max_upstream), ("d x", 2, 8));
    assert!(cfg(&[("socket", "/s"), ("tls", "off")]).is_ok());

    for (kv, msg) in [
        (&[][..], "give one of"),
        (&[("socket", "/s"), ("hostname", "h")][..], "only one"),
        (&[("socket", "/s"), ("port", "1")][..], "port= goes with hostname="),
        (&[("socket", "/s"), ("arg", "1")][..], "arg= goes with command="),
        (&[("uri", "nbd://h/x"), ("export", "y")][..], "cannot be combined"),
        (&[("uri", "nbds://h"), ("tls", "off")][..], "requires TLS"),
        (&[("uri", "nbd://h?tls-certificates=/d")][..], "nbds://"),
        (&[("socket", "/s"), ("tls", "maybe")][..], "tls=maybe"),
        (&[("socket", "/s"), ("tls", "require"), ("tls-psk", "/nonexistent/k")][..], "/nonexistent/k"),
        (&[("socket", "/s"), ("tls", "on"), ("tls-psk", "f"), ("tls-certificates", "d")][..], "not both"),
        (&[("socket", "/s"), ("tls", "on"), ("tls-certificates", "/nonexistent/d")][..], "ca-cert.pem"),
        (&[("socket", "/s"), ("tls-verify", "maybe")][..], "tls-verify"),
        (&[("socket", "/s"), ("dynamic-export", "true")][..], "dynamic-export"),
        (&[("vsock", "2")][..], "vsock"),
        (&[("socket", "/s"), ("retry", "-1")][..], "retry"),
        (&[("socket", "/s"), ("connections", "0")][..], "connections"),
        (&[("socket", "/s"), ("max-upstream", "x")][..], "max-upstream"),
        (&[("socket", "/s"), ("connections", "5")][..], "more than max-upstream"),
        (&[("hostname", "h"), ("port", "http")][..], "port"),
        (&[("socket", "/s"), ("frob", "1")][..], "unknown parameter 'frob'"),
        (&[("command", "true"), ("shared", "false")][..], "implies shared=true"),
    ] {
        let e = make_err(&SPEC, kv);
        assert!(e.contains(msg), "{kv:?}: {e}");
    }
    let long = "x".repeat(4097);
    assert!(make_err(&SPEC, &[("socket", "/s"), ("export", &long)]).contains("4096"));
}

// ---- On a real loop against a real server ----------------------------------------------------

/// blocksmith's own server, in process, serving a memory disk on a Unix socket.
struct Upstream {
    control: Arc<ServerControl>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start(path: &Path, size: u64, conn: ConnConfig) -> Upstream {
        Upstream::start_tls(path, size, conn, None)
    }

    fn start_tls(
        path: &Path,
        size: u64,
        conn: ConnConfig,
        tls: Option<blocksmith_core::tls::ServerTls>,
    ) -> Upstream {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).expect("bind upstream socket");
        let control = ServerControl::new();
        let stack = Stack::new(("memory".into(), Arc::new(MemoryFactory::new(size))), vec![]);
        let cfg = ServerConfig {
            conn,
            loops: 1,
            io_threads: 1,
            memory_limit: 256 << 20,
            readonly: false,
            tls,
            reply_hold: blocksmith_core::limits::DEFAULT_REPLY_HOLD,
        };
        let c = control.clone();
        let thread = std::thread::spawn(move || {
            let _ = serve(cfg, stack, vec![Listener::Unix(l)], c);
        });
        Upstream { control, thread: Some(thread) }
    }

    fn clients(&self) -> usize {
        self.control.connections()
    }

    /// Stop while turning our loop, so our side of its connections sees the EOF and closes
    /// rather than leaving the server to wait out its linger time.
    fn stop_with(&mut self, lp: &mut LocalLoop) {
        self.control.shutdown();
        if let Some(t) = &self.thread {
            until(lp, || t.is_finished());
        }
        self.stop();
    }

    fn stop(&mut self) {
        self.control.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> TestDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("bs-nbd-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("sock")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const LIMIT: Duration = Duration::from_secs(20);

/// Turn the loop until `cond`, which may depend on another thread (the upstream's client
/// count): in short slices, since nothing on our loop wakes up when that changes.
fn until(lp: &mut LocalLoop, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + LIMIT;
    while std::time::Instant::now() < end {
        if lp.run_until(Duration::from_millis(10), &mut cond) {
            return true;
        }
    }
    false
}

type Slot<T> = Rc<RefCell<Option<Result<T, NbdError>>>>;

fn slot<T: 'static>() -> (Slot<T>, Done<T>) {
    let s: Slot<T> = Rc::new(RefCell::new(None));
    let s2 = s.clone();
    (s, Done::new(move |r| *s2.borrow_mut() = Some(r)))
}

/// Start `f`, turn the loop until it completes.
fn run<T: 'static>(lp: &mut LocalLoop, f: impl FnOnce(Done<T>)) -> Result<T, NbdError> {
    let (s, d) = slot();
    f(d);
    assert!(lp.run_until(LIMIT, || s.borrow().is_some()), "operation did not complete");
    let r = s.borrow_mut().take();
    r.expect("completed")
}

fn open(lp: &mut LocalLoop, f: &Arc<dyn BackendFactory>) -> Result<Rc<dyn Layer>, NbdError> {
    let cx = OpenCx::for_tests(lp.sched());
    open_with(lp, f, &cx)
}

fn open_with(
    lp: &mut LocalLoop,
    f: &Arc<dyn BackendFactory>,
    cx: &OpenCx,
) -> Result<Rc<dyn Layer>, NbdError> {
    let stack = Stack::new(("nbd".into(), f.clone()), vec![]);
    run(lp, |d| stack.open(cx, d))
}

fn factory(kv: &[(&str, &str)]) -> Arc<dyn BackendFactory> {
    (SPEC.make)(&mut params(kv)).expect("configure nbd")
}

#[test]
fn proxies_every_request_to_a_real_server() {
    let dir = TestDir::new("rw");
    let _up = Upstream::start(&dir.sock(), 4 << 20, ConnConfig::default());
    let mut lp = LocalLoop::new().unwrap();
    let f = factory(&[("socket", dir.sock().to_str().unwrap())]);
    let l = open(&mut lp, &f).unwrap();
    let i = l.info();
    assert_eq!(i.size, 4 << 20);
    assert!(i.can_write && i.can_flush && i.can_trim && i.can_extents && i.can_multi_conn && i.can_fast_zero);
    assert_eq!((i.fua, i.zero, i.cache), (Support::Native, Support::Native, Support::Native));

    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
    run(&mut lp, |d| l.pwrite(data.clone(), 100_000, Flags::FUA, d)).unwrap();
    assert_eq!(run(&mut lp, |d| l.pread(vec![0xee; data.len()], 100_000, Flags::NONE, d)).unwrap(), data);
    // The memory server sends an all-zero 4 KiB-aligned run as a hole: the hole must be zeroed
    // in our buffer, which starts out full of 0xee.
    assert_eq!(run(&mut lp, |d| l.pread(vec![0xee; 8192], 0, Flags::NONE, d)).unwrap(), vec![0; 8192]);
    run(&mut lp, |d| l.zero(65536, 131072, Flags::MAY_TRIM, d)).unwrap();
    run(&mut lp, |d| l.trim(32768, 0, Flags::NONE, d)).unwrap();
    run(&mut lp, |d| l.flush(Flags::NONE, d)).unwrap();
    run(&mut lp, |d| l.cache(4096, 0, Flags::NONE, d)).unwrap();
    let back = run(&mut lp, |d| l.pread(vec![0; 200_000], 100_000, Flags::NONE, d)).unwrap();
    assert_eq!(&back[..31072], &data[..31072]);
    assert_eq!(&back[31072..96608], &vec![0; 65536][..]);
    assert_eq!(&back[96608..], &data[96608..200_000]);
    let e = run(&mut lp, |d| l.extents(4 << 20, 0, Flags::NONE, d)).unwrap();
    assert_eq!(e.total(), 4 << 20);
    assert_eq!(e.0[0], Extent { length: 98304, flags: EXTENT_HOLE | EXTENT_ZERO });
    assert_eq!(e.0[1].flags, 0);
    let one = run(&mut lp, |d| l.extents(4 << 20, 0, Flags::REQ_ONE, d)).unwrap();
    assert_eq!(one.0.len(), 1);
    let past = run(&mut lp, |d| l.pread(vec![0; 10], (4 << 20) - 5, Flags::NONE, d)).unwrap_err();
    assert_eq!(past.errno, Errno::Inval, "shim catches the range");

    // Many requests in flight at once, completing in any order.
    type Reads = Rc<RefCell<Vec<(usize, Vec<u8>)>>>;
    let results: Reads = Rc::default();
    for k in 0..200usize {
        let r = results.clone();
        l.pread(
            vec![0; 1000],
            100_000 + 1000 * k as u64,
            Flags::NONE,
            Done::new(move |x: Result<Vec<u8>, NbdError>| r.borrow_mut().push((k, x.unwrap()))),
        );
    }
    assert!(lp.run_until(LIMIT, || results.borrow().len() == 200));
    for (k, got) in results.borrow().iter() {
        let at = 1000 * k;
        if !(31072..96608).contains(&at) && at + 1000 <= 31072 {
            assert_eq!(got[..], data[at..at + 1000]);
        }
    }
    l.close();
}

#[test]
fn connections_are_pooled_and_capped() {
    let dir = TestDir::new("pool");
    let mut up = Upstream::start(&dir.sock(), 1 << 20, ConnConfig::default());
    let mut lp = LocalLoop::new().unwrap();
    let f = factory(&[("socket", dir.sock().to_str().unwrap()), ("max-upstream", "3")]);
    let mut layers = Vec::new();
    for _ in 0..20 {
        layers.push(open(&mut lp, &f).unwrap());
    }
    assert!(until(&mut lp, || up.clients() == 3));
    // All 20 work at once over 3 upstream connections.
    let n = Rc::new(RefCell::new(0));
    for (k, l) in layers.iter().enumerate() {
        let n = n.clone();
        l.pwrite(
            vec![k as u8; 512],
            512 * k as u64,
            Flags::NONE,
            Done::new(move |r| {
                r.unwrap();
                *n.borrow_mut() += 1;
            }),
        );
    }
    assert!(lp.run_until(LIMIT, || *n.borrow() == 20));
    for (k, l) in layers.iter().enumerate() {
        assert_eq!(
            run(&mut lp, |d| l.pread(vec![0; 512], 512 * k as u64, Flags::NONE, d)).unwrap(),
            vec![k as u8; 512]
        );
    }
    assert_eq!(up.clients(), 3);
    // Idle unshared connections close when their last client goes.
    for l in layers.drain(..) {
        l.close();
    }
    assert!(until(&mut lp, || up.clients() == 0), "upstream still has {} clients", up.clients());

    // shared=true: one connection for everyone, kept after they leave.
    let f = factory(&[("socket", dir.sock().to_str().unwrap()), ("shared", "true")]);
    let a = open(&mut lp, &f).unwrap();
    let b = open(&mut lp, &f).unwrap();
    assert!(until(&mut lp, || up.clients() == 1));
    run(&mut lp, |d| a.pwrite(b"shared".to_vec(), 0, Flags::NONE, d)).unwrap();
    assert_eq!(run(&mut lp, |d| b.pread(vec![0; 6], 0, Flags::NONE, d)).unwrap(), b"shared");
    a.close();
    b.close();
    lp.run_until(Duration::from_millis(200), || false);
    assert_eq!(up.clients(), 1);

    // connections=3 with a multi-conn upstream: one client's requests spread over 3.
    let f = factory(&[("socket", dir.sock().to_str().unwrap()), ("connections", "3")]);
    let c = open(&mut lp, &f).unwrap();
    assert!(until(&mut lp, || up.clients() == 4));
    let n = Rc::new(RefCell::new(0));
    for k in 0..30u64 {
        let n = n.clone();
        c.pread(
            vec![0; 512],
            512 * k,
            Flags::NONE,
            Done::new(move |r| {
                r.unwrap();
                *n.borrow_mut() += 1;
            }),
        );
    }
    assert!(lp.run_until(LIMIT, || *n.borrow() == 30));
    c.close();
    assert!(until(&mut lp, || up.clients() == 1));
    up.stop_with(&mut lp);
}

#[test]
fn upstream_restart_fails_requests_then_recovers() {
    let dir = TestDir::new("restart");
    let mut up = Upstream::start(&dir.sock(), 1 << 20, ConnConfig::default());
    let mut lp = LocalLoop::new().unwrap();
    let f = factory(&[("socket", dir.sock().to_str().unwrap())]);
    let l = open(&mut lp, &f).unwrap();
    run(&mut lp, |d| l.pwrite(vec![1; 512], 0, Flags::NONE, d)).unwrap();

    // A read in flight when the upstream goes away is answered, not left hanging.
    let (s, d) = slot::<Vec<u8>>();
    l.pread(vec![0; 512], 0, Flags::NONE, d);
    up.stop_with(&mut lp);
    assert!(lp.run_until(LIMIT, || s.borrow().is_some()));
    let r = s.borrow_mut().take().unwrap();
    // It may have been answered before the server went; or the upstream, already shutting
    // down, refused it with ESHUTDOWN (passed through as the upstream's own error); or the
    // connection dropped under it, which fails it with EIO.
    if let Err(e) = r {
        assert!(matches!(e.errno, Errno::Io | Errno::Shutdown), "{e:?}");
    }
    // While it is down, requests fail at once with EIO.
    lp.run_until(Duration::from_millis(100), || false);
    let e = run(&mut lp, |d| l.pread(vec![0; 512], 0, Flags::NONE, d)).unwrap_err();
    assert_eq!(e.errno, Errno::Io);
    assert!(e.message.unwrap().contains("not connected"));

    // Back on the same socket (a fresh, empty disk): the lane reconnects by itself.
    let up2 = Upstream::start(&dir.sock(), 1 << 20, ConnConfig::default());
    let mut ok = false;
    for _ in 0..100 {
        if run(&mut lp, |d| l.pread(vec![9; 512], 0, Flags::NONE, d)) == Ok(vec![0; 512]) {
            ok = true;
            break;
        }
        lp.run_until(Duration::from_millis(50), || false);
    }
    assert!(ok, "the proxy did not recover");
    run(&mut lp, |d| l.pwrite(vec![2; 512], 0, Flags::NONE, d)).unwrap();
    assert_eq!(up2.clients(), 1);
    l.close();
}

#[test]
fn open_retries_then_fails_cleanly() {
    let dir = TestDir::new("retry");
    let mut lp = LocalLoop::new().unwrap();
    // Nothing listening, no retries: the open fails with EIO and a reason.
    let f = factory(&[("socket", dir.sock().to_str().unwrap())]);
    let e = open(&mut lp, &f).map(|_| ()).unwrap_err();
    assert_eq!(e.errno, Errno::Io);
    assert!(e.message.as_deref().unwrap_or("").contains("cannot connect"), "{e:?}");

    // retry=3: a server that appears a little later is found.
    let f = factory(&[("socket", dir.sock().to_str().unwrap()), ("retry", "3")]);
    let (s, d) = slot::<Rc<dyn Layer>>();
    let cx = OpenCx::for_tests(lp.sched());
    Stack::new(("nbd".into(), f.clone()), vec![]).open(&cx, d);
    lp.run_until(Duration::from_millis(300), || false);
    assert!(s.borrow().is_none(), "open must still be waiting");
    let _up = Upstream::start(&dir.sock(), 1 << 20, ConnConfig::default());
    assert!(lp.run_until(LIMIT, || s.borrow().is_some()));
    let l = s.borrow_mut().take().unwrap().unwrap();
    assert_eq!(run(&mut lp, |d| l.pread(vec![1; 4], 0, Flags::NONE, d)).unwrap(), vec![0; 4]);
    l.close();
}

#[test]
fn old_servers_through_the_fallbacks() {
    let dir = TestDir::new("old");
    let mut lp = LocalLoop::new().unwrap();
    for (conn, structured) in [
        (ConnConfig { structured_replies: false, ..ConnConfig::default() }, false),
        (ConnConfig { meta_contexts: false, ..ConnConfig::default() }, true),
        (ConnConfig { handshake_flags: 0, ..ConnConfig::default() }, false),
        (ConnConfig { oldstyle: true, ..ConnConfig::default() }, false),
    ] {
        let _up = Upstream::start(&dir.sock(), 1 << 20, conn);
        let f = factory(&[("socket", dir.sock().to_str().unwrap())]);
        let l = open(&mut lp, &f).unwrap();
        assert!(!l.info().can_extents);
        run(&mut lp, |d| l.pwrite(vec![3; 70_000], 5, Flags::NONE, d)).unwrap();
        assert_eq!(run(&mut lp, |d| l.pread(vec![0; 70_000], 5, Flags::NONE, d)).unwrap(), vec![3; 70_000]);
        // Block status falls back to "all data" in the shim.
        let e = run(&mut lp, |d| l.extents(1 << 20, 0, Flags::NONE, d)).unwrap();
        assert_eq!(e.0, vec![Extent { length: 1 << 20, flags: 0 }], "structured={structured}");
        l.close();
    }
}

// ---- Against a scripted upstream -------------------------------------------------------------

type Respond = Box<dyn FnMut(usize, RequestHeader, &mut UnixStream) -> std::io::Result<bool> + Send>;

/// A scripted upstream on a thread: a correct handshake on each of `conns` connections (one
/// after another), then `respond(connection, request, stream)` answers each request; `false`
/// hangs up.
fn fake_upstream(path: &Path, conns: usize, mut respond: Respond) -> JoinHandle<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).expect("bind fake upstream");
    std::thread::spawn(move || {
        for n in 0..conns {
            let Ok((mut s, _)) = l.accept() else { return };
            let _ = s.set_read_timeout(Some(LIMIT));
            let _ = fake_session(n, &mut s, &mut respond);
        }
    })
}

fn fake_session(n: usize, s: &mut UnixStream, respond: &mut Respond) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let bad = |_| std::io::Error::other("bad magic from the proxy");
    s.write_all(&greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let h = decode_option_header(&h).map_err(bad)?;
        let mut data = vec![0; h.len as usize];
        s.read_exact(&mut data)?;
        let mut out = Vec::new();
        let go = h.code == OPT_GO;
        match h.code {
            OPT_STRUCTURED_REPLY => encode_rep_ack(&mut out, h.code),
            OPT_SET_META_CONTEXT => {
                encode_rep_meta_context(&mut out, h.code, 1, BASE_ALLOCATION);
                encode_rep_ack(&mut out, h.code);
            }
            OPT_GO => {
                encode_info_export(&mut out, h.code, 1 << 20, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH);
                encode_rep_ack(&mut out, h.code);
            }
            c => encode_rep_error(&mut out, c, REP_ERR_UNSUP, "not here"),
        }
        s.write_all(&out)?;
        if go {
            break;
        }
    }
    loop {
        let mut r = [0u8; 28];
        s.read_exact(&mut r)?;
        let h = decode_compact_request(&r).map_err(bad)?;
        if h.typ == CMD_DISC {
            return Ok(());
        }
        if h.typ == CMD_WRITE {
            let mut sink = vec![0; h.length as usize];
            s.read_exact(&mut sink)?;
        }
        if !respond(n, h, s)? {
            return Ok(());
        }
    }
}

/// Read, waiting out "not connected" while the lane reconnects.
fn read_when_connected(lp: &mut LocalLoop, l: &Rc<dyn Layer>) -> Result<Vec<u8>, NbdError> {
    for _ in 0..200 {
        match run(lp, |d| l.pread(vec![0xee; 512], 0, Flags::NONE, d)) {
            Err(e) if e.message.as_deref().is_some_and(|m| m.contains("not connected")) => {
                lp.run_until(Duration::from_millis(20), || false);
            }
            other => return other,
        }
    }
    panic!("the lane never reconnected");
}

#[test]
fn misbehaving_upstream_fails_requests_not_the_proxy() {
    let dir = TestDir::new("fake");
    let server = fake_upstream(
        &dir.sock(),
        4,
        Box::new(|n, h, s| {
            use std::io::Write;
            match n {
                // Hang up with the read in flight.
                0 => Ok(false),
                // Garbage instead of a reply.
                1 => s.write_all(b"this is not an NBD reply").map(|_| true),
                // A good simple reply.
                _ => {
                    let mut v = simple(0, h.cookie);
                    v.extend_from_slice(&[7; 512]);
                    s.write_all(&v).map(|_| true)
                }
            }
        }),
    );
    let mut lp = LocalLoop::new().unwrap();
    let f = factory(&[("socket", dir.sock().to_str().unwrap())]);
    let l = open(&mut lp, &f).unwrap();
    let i = l.info();
    assert!(i.can_extents && i.can_flush && !i.can_trim && !i.can_multi_conn);

    let e = read_when_connected(&mut lp, &l).unwrap_err();
    assert_eq!(e.errno, Errno::Io);
    assert!(e.message.as_deref().unwrap_or("").contains("closed the connection"), "{e:?}");
    let e = read_when_connected(&mut lp, &l).unwrap_err();
    assert_eq!(e.errno, Errno::Io);
    assert!(e.message.as_deref().unwrap_or("").contains("protocol error"), "{e:?}");
    assert_eq!(read_when_connected(&mut lp, &l).unwrap(), vec![7; 512]);
    l.close();
    // Straight to the layer, under the shim: a payload over the upstream's maximum (the spec's
    // 32 MiB default, as this server gives none) is refused here, never sent.
    let cx = OpenCx::for_tests(lp.sched());
    let raw = run(&mut lp, |d| f.open(&cx, d)).unwrap();
    assert_eq!(raw.info().block_size.unwrap().maximum, 32 << 20);
    let big = run(&mut lp, |d| raw.pwrite(vec![1; (32 << 20) + 1], 0, Flags::NONE, d)).unwrap_err();
    assert_eq!(big.errno, Errno::Inval);
    let big = run(&mut lp, |d| raw.pread(vec![1; (32 << 20) + 1], 0, Flags::NONE, d)).unwrap_err();
    assert_eq!(big.errno, Errno::Inval);
    raw.close();
    // Each lane sends NBD_CMD_DISC as it closes, which ends the last session.
    assert!(until(&mut lp, || server.is_finished()));
}

#[test]
fn silent_upstream_times_out_the_handshake() {
    let dir = TestDir::new("silent");
    // Listening but never accepting: connect succeeds (the backlog), no greeting ever comes.
    let _l = UnixListener::bind(dir.sock()).unwrap();
    let mut cfg = configure(&mut params(&[("socket", dir.sock().to_str().unwrap())])).unwrap();
    cfg.handshake_timeout = Duration::from_millis(200);
    let f: Arc<dyn BackendFactory> = Arc::new(NbdFactory { cfg: Arc::new(cfg) });
    let mut lp = LocalLoop::new().unwrap();
    let t0 = std::time::Instant::now();
    let e = open(&mut lp, &f).map(|_| ()).unwrap_err();
    assert!(e.message.as_deref().unwrap_or("").contains("handshake timed out"), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// TLS-PSK end to end in process: the upstream requires TLS, the lane negotiates it and proxies
/// requests through the session; the wrong key fails the open and leaves the upstream serving.
#[test]
fn psk_tls_to_a_real_server() {
    let dir = TestDir::new("psk");
    let keys = dir.0.join("keys.psk");
    std::fs::write(&keys, "alice:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n")
        .unwrap();
    let wrong = dir.0.join("wrong.psk");
    std::fs::write(&wrong, "alice:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n")
        .unwrap();
    let conn = ConnConfig { tls: blocksmith_core::tls::TlsPolicy::Require, ..ConnConfig::default() };
    let tls = blocksmith_core::tls::ServerTls::psk(&keys).unwrap();
    let _up = Upstream::start_tls(&dir.sock(), 1 << 20, conn, Some(tls));
    let mut lp = LocalLoop::new().unwrap();
    let sock = dir.sock().to_str().unwrap().to_string();
    let keyfile = keys.to_str().unwrap().to_string();
    let f =
        factory(&[("socket", &sock), ("tls", "require"), ("tls-psk", &keyfile), ("tls-username", "alice")]);
    let l = open(&mut lp, &f).unwrap();
    assert_eq!(l.info().size, 1 << 20);
    assert!(l.info().can_extents);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    run(&mut lp, |d| l.pwrite(data.clone(), 4096, Flags::NONE, d)).unwrap();
    assert_eq!(run(&mut lp, |d| l.pread(vec![0; data.len()], 4096, Flags::NONE, d)).unwrap(), data);
    l.close();

    // The session is paid for from --memory-limit: with no room for it, the open fails and
    // the reservation of the attempt is given back.
    let budget = blocksmith_core::budget::Budget::new(64 * 1024);
    let cx = OpenCx { budget: budget.clone(), ..OpenCx::for_tests(lp.sched()) };
    let f2 =
        factory(&[("socket", &sock), ("tls", "require"), ("tls-psk", &keyfile), ("tls-username", "alice")]);
    let e = open_with(&mut lp, &f2, &cx).map(|_| ()).unwrap_err();
    assert!(e.message.as_deref().unwrap_or("").contains("memory-limit"), "{e:?}");
    assert_eq!(budget.used(), 0);

    let wrongfile = wrong.to_str().unwrap().to_string();
    let f = factory(&[("socket", &sock), ("tls", "require"), ("tls-psk", &wrongfile)]);
    let e = open(&mut lp, &f).map(|_| ()).unwrap_err();
    assert!(e.message.as_deref().unwrap_or("").contains("TLS"), "{e:?}");
    // Plaintext is refused by a tls=require upstream, and tls=on continues in plaintext only if
    // STARTTLS is refused, which it is not here: tls=off gets TLS_REQD.
    let f = factory(&[("socket", &sock)]);
    assert!(open(&mut lp, &f).is_err());
    // The server still serves.
    let f = factory(&[("uri", &format!("nbds+unix:///?socket={sock}&tls-psk-file={keyfile}"))]);
    let l = open(&mut lp, &f).unwrap();
    assert_eq!(run(&mut lp, |d| l.pread(vec![0; 10], 4096, Flags::NONE, d)).unwrap(), data[..10]);
    l.close();
}
