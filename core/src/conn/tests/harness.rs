//! A tiny NBD client and fake driver around one `Conn`: client bytes go in through `read_buf`,
//! replies come out through `fill_iovecs`, and events are answered from an in-memory disk.

use std::io::IoSlice;
use std::time::Instant;

use crate::budget::Budget;
use crate::conn::{Conn, ConnConfig, Event, Op, Outcome, Request, RequestId};
use crate::error::{Errno, NbdError};
use crate::layer::registry::ExportDesc;
use crate::layer::{ExportInfo, Extent, Extents, Flags, Support};
use crate::proto::*;

pub const DISK_SIZE: usize = 1 << 20;
/// The in-memory disk reads as zeroes here; everything else is nonzero.
pub const ZERO_RANGE: std::ops::Range<usize> = 8192..16384;

pub fn rw_info(size: u64) -> ExportInfo {
    ExportInfo {
        size,
        can_write: true,
        can_flush: true,
        fua: Support::Native,
        can_trim: true,
        zero: Support::Native,
        can_fast_zero: true,
        can_extents: true,
        cache: Support::Native,
        can_multi_conn: true,
        is_rotational: false,
        block_size: None,
        description: Some("a test disk".into()),
    }
}

pub struct H {
    pub conn: Conn,
    pub now: Instant,
    pub budget: Budget,
    /// Exports the fake driver can open.
    pub exports: Vec<(String, ExportInfo)>,
    pub list: Vec<ExportDesc>,
    pub disk: Vec<u8>,
    /// Returned for every BLOCK_STATUS.
    pub extents: Extents,
    /// Answer OpenExport / ListExports / requests as soon as they appear.
    pub auto_open: bool,
    pub auto_requests: bool,
    pub held: Vec<Request>,
    /// Lent file ranges sent (in parts) by `drain_output`.
    pub file_sends: usize,
    pub opened: Vec<(String, bool)>,
    pub list_requests: usize,
    /// Every request the driver saw: (op name, offset, flags, count).
    pub seen: Vec<(String, u64, Flags, u64)>,
    /// Client bytes not yet accepted by the connection.
    tx: Vec<u8>,
    /// Server bytes written and not yet parsed by the test.
    rx: Vec<u8>,
    /// Requests use the 32-byte extended header.
    pub ext: bool,
    /// Replies are structured chunks (SR or EXT negotiated).
    pub structured: bool,
    /// `Event::StartTls` seen.
    pub tls_starts: usize,
}

impl H {
    pub fn new(cfg: ConnConfig) -> H {
        H::with_budget(cfg, Budget::new(1 << 30))
    }

    pub fn with_budget(cfg: ConnConfig, budget: Budget) -> H {
        let now = Instant::now();
        let conn = Conn::new(cfg, budget.clone(), now);
        static DISK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let disk = DISK
            .get_or_init(|| {
                let mut d: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8 + 1).collect();
                d[ZERO_RANGE].fill(0);
                d
            })
            .clone();
        H {
            conn,
            now,
            budget,
            exports: vec![
                (String::new(), rw_info(DISK_SIZE as u64)),
                ("other".into(), rw_info(DISK_SIZE as u64)),
                ("ro".into(), ExportInfo::read_only(DISK_SIZE as u64)),
            ],
            list: vec![
                ExportDesc { name: String::new(), description: None },
                ExportDesc { name: "other".into(), description: Some("the other one".into()) },
            ],
            disk,
            extents: Extents(vec![
                Extent { length: 4096, flags: 0 },
                Extent { length: 4096, flags: 3 },
                Extent { length: (DISK_SIZE - 8192) as u64, flags: 0 },
            ]),
            auto_open: true,
            auto_requests: true,
            held: Vec::new(),
            file_sends: 0,
            opened: Vec::new(),
            list_requests: 0,
            seen: Vec::new(),
            tx: Vec::new(),
            rx: Vec::new(),
            ext: false,
            structured: false,
            tls_starts: 0,
        }
    }

    pub fn default_h() -> H {
        H::new(ConnConfig::default())
    }

    // ---- moving bytes ----

    /// Offer pending client bytes to the connection; returns how many it took.
    fn feed_tx(&mut self) -> usize {
        let mut total = 0;
        while !self.tx.is_empty() && !self.conn.is_aborted() && !self.conn.is_finished() {
            let buf = self.conn.read_buf();
            if buf.is_empty() {
                break;
            }
            let n = buf.len().min(self.tx.len());
            buf[..n].copy_from_slice(&self.tx[..n]);
            self.conn.handle_read(n, self.now);
            self.tx.drain(..n);
            total += n;
            self.pump();
        }
        total
    }

    /// Send bytes without calling `process` (for per-turn tests).
    pub fn feed(&mut self, b: &[u8]) {
        self.tx.extend_from_slice(b);
        self.feed_tx();
    }

    /// Send bytes and let everything settle like a driver would.
    pub fn send(&mut self, b: &[u8]) {
        self.tx.extend_from_slice(b);
        self.settle();
    }

    /// Client bytes the connection has not accepted yet.
    pub fn unsent(&self) -> usize {
        self.tx.len()
    }

    /// Client EOF.
    pub fn eof(&mut self) {
        let _ = self.conn.read_buf();
        self.conn.handle_read(0, self.now);
    }

    /// Drain events, feed bytes and call `process` until nothing changes.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            let mut progress = self.pump() > 0;
            progress |= self.feed_tx() > 0;
            progress |= self.conn.process(self.now);
            progress |= self.pump() > 0;
            if !progress {
                return;
            }
        }
        panic!("connection never settled");
    }

    /// Answer every queued event; returns how many there were.
    pub fn pump(&mut self) -> usize {
        let mut n = 0;
        while let Some(ev) = self.conn.poll_event() {
            n += 1;
            match ev {
                Event::OpenExport { name, probe } => {
                    self.opened.push((name.clone(), probe));
                    if self.auto_open {
                        let r = self.open(&name);
                        self.conn.handle_export(r, self.now);
                    }
                }
                Event::ListExports => {
                    self.list_requests += 1;
                    if self.auto_open {
                        let l = self.list.clone();
                        self.conn.handle_export_list(l);
                    }
                }
                Event::StartTls => self.tls_starts += 1,
                Event::Request(r) => {
                    let (name, count) = match &r.op {
                        Op::Read { count } => ("read", *count as u64),
                        Op::Write { data } => ("write", data.len() as u64),
                        Op::Flush => ("flush", 0),
                        Op::Trim { count } => ("trim", *count),
                        Op::Zero { count } => ("zero", *count),
                        Op::BlockStatus { count } => ("block_status", *count),
                        Op::Cache { count } => ("cache", *count),
                    };
                    self.seen.push((name.into(), r.offset, r.flags, count));
                    if self.auto_requests {
                        let id = r.id;
                        let res = self.execute(r);
                        self.conn.handle_result(id, res);
                    } else {
                        self.held.push(r);
                    }
                }
            }
        }
        n
    }

    pub fn open(&self, name: &str) -> Result<ExportInfo, NbdError> {
        match self.exports.iter().find(|(n, _)| n == name) {
            Some((_, i)) => Ok(i.clone()),
            None => Err(NbdError::msg(Errno::Inval, format!("no export named {name:?}"))),
        }
    }

    /// Run a request against the in-memory disk (with the checks a shim would make).
    pub fn execute(&mut self, r: Request) -> Result<Outcome, NbdError> {
        let in_range = |off: u64, n: u64| off.checked_add(n).is_some_and(|e| e <= DISK_SIZE as u64);
        match r.op {
            Op::Read { count } => {
                let mut buf = vec![0u8; count];
                if !in_range(r.offset, buf.len() as u64) {
                    return Err(NbdError::inval("read out of range"));
                }
                let o = r.offset as usize;
                let n = buf.len();
                buf.copy_from_slice(&self.disk[o..o + n]);
                Ok(Outcome::Data(buf))
            }
            Op::Write { data } => {
                if !in_range(r.offset, data.len() as u64) {
                    return Err(NbdError::msg(Errno::NoSpc, "write out of range"));
                }
                let o = r.offset as usize;
                self.disk[o..o + data.len()].copy_from_slice(&data);
                Ok(Outcome::Done)
            }
            Op::Zero { count } => {
                if !in_range(r.offset, count) {
                    return Err(NbdError::new(Errno::NoSpc));
                }
                let o = r.offset as usize;
                self.disk[o..o + count as usize].fill(0);
                Ok(Outcome::Done)
            }
            Op::BlockStatus { .. } => Ok(Outcome::Extents(self.extents.clone())),
            Op::Flush | Op::Trim { .. } | Op::Cache { .. } => Ok(Outcome::Done),
        }
    }

    /// Complete the held request at index `i` (in arrival order).
    pub fn complete(&mut self, i: usize) {
        let r = self.held.remove(i);
        let id: RequestId = r.id;
        let res = self.execute(r);
        self.conn.handle_result(id, res);
        self.settle();
    }

    /// Complete the held request at index `i` (in arrival order) with `res` instead of
    /// executing it.
    pub fn finish(&mut self, i: usize, res: Result<Outcome, NbdError>) {
        let r = self.held.remove(i);
        self.conn.handle_result(r.id, res);
        self.settle();
    }

    pub fn complete_all(&mut self) {
        while !self.held.is_empty() {
            self.complete(0);
        }
    }

    /// Move everything the connection has queued into `rx`.
    pub fn drain_output(&mut self) {
        while self.conn.has_output() {
            let mut v = Vec::new();
            // A lent file range: the driver sends it with sendfile; here it is read, in two
            // steps to exercise partial sends.
            if let Some((file, offset, len)) = self.conn.output_file() {
                use std::os::unix::fs::FileExt;
                let mut b = vec![0u8; len.div_ceil(2)];
                file.read_exact_at(&mut b, offset).expect("read lent file range");
                self.conn.handle_written(b.len());
                self.rx.extend_from_slice(&b);
                self.file_sends += 1;
                continue;
            }
            {
                let mut iov = [IoSlice::new(&[]); 64];
                let n = self.conn.fill_iovecs(&mut iov);
                assert!(n > 0, "has_output but no iovecs");
                for s in &iov[..n] {
                    v.extend_from_slice(s);
                }
            }
            self.conn.handle_written(v.len());
            self.rx.extend_from_slice(&v);
            self.settle();
        }
    }

    /// Bytes received and not yet parsed.
    pub fn rx_len(&mut self) -> usize {
        self.drain_output();
        self.rx.len()
    }

    pub fn take(&mut self, n: usize) -> Vec<u8> {
        self.drain_output();
        assert!(
            self.rx.len() >= n,
            "wanted {n} bytes from the server, have {}: {:02x?}",
            self.rx.len(),
            self.rx
        );
        self.rx.drain(..n).collect()
    }

    pub fn take_arr<const N: usize>(&mut self) -> [u8; N] {
        let v = self.take(N);
        let mut a = [0u8; N];
        a.copy_from_slice(&v);
        a
    }

    /// Forget whatever the server sent so far.
    pub fn discard_rx(&mut self) {
        self.drain_output();
        self.rx.clear();
    }

    pub fn assert_silent(&mut self) {
        let n = self.rx_len();
        assert_eq!(n, 0, "unexpected server bytes: {:02x?}", self.rx);
    }

    // ---- handshake client ----

    /// Read the newstyle greeting; returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let g = self.take(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        u16::from_be_bytes([g[16], g[17]])
    }

    pub fn client_flags(&mut self, f: u32) {
        self.send(&f.to_be_bytes());
    }

    /// Greeting plus client flags FIXED_NEWSTYLE | NO_ZEROES.
    pub fn start(&mut self) {
        assert_eq!(self.greeting(), 3);
        self.client_flags(3);
    }

    pub fn opt(&mut self, code: u32, data: &[u8]) {
        let mut v = Vec::new();
        encode_option_request(&mut v, code, data);
        self.send(&v);
    }

    /// One option reply: (option, reply type, data).
    pub fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = decode_option_reply_header(&self.take_arr()).expect("option reply magic");
        let d = self.take(h.len as usize);
        (h.opt, h.reply_type, d)
    }

    /// Replies up to and including the final one (ACK or error).
    pub fn opt_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.1 == REP_ACK || r.1 & REP_FLAG_ERROR != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Send an option and expect a lone reply of type `want`.
    pub fn opt_expect(&mut self, code: u32, data: &[u8], want: u32) -> Vec<u8> {
        self.opt(code, data);
        let (o, t, d) = self.opt_reply();
        assert_eq!((o, t), (code, want), "reply to option {code}: {:?}", String::from_utf8_lossy(&d));
        d
    }

    /// What a driver does after `Event::StartTls` once the ACK is out: the session is in
    /// place. From here the harness's bytes stand for the session's plaintext.
    pub fn tls_started(&mut self) {
        assert_eq!(self.tls_starts, 1, "Event::StartTls expected once");
        assert!(!self.conn.has_output(), "the ACK must be flushed before TLS starts");
        self.conn.handle_tls_started();
        self.settle();
    }

    /// STARTTLS, its ACK, and the session in place; replies are simple again.
    pub fn starttls(&mut self) {
        self.opt_expect(OPT_STARTTLS, &[], REP_ACK);
        self.tls_started();
        self.structured = false;
        self.ext = false;
    }

    pub fn negotiate_sr(&mut self) {
        self.opt_expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
        self.structured = true;
    }

    pub fn negotiate_ext(&mut self) {
        self.opt_expect(OPT_EXTENDED_HEADERS, &[], REP_ACK);
        self.ext = true;
        self.structured = true;
    }

    /// GO to `name`; returns (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        self.opt(OPT_GO, &encode_info_request(name, &[]));
        let replies = self.opt_replies();
        let last = replies.last().expect("replies");
        assert_eq!(last.1, REP_ACK, "GO failed: {:?}", String::from_utf8_lossy(&last.2));
        let exp = replies.iter().find(|r| r.1 == REP_INFO && r.2[..2] == [0, 0]).expect("INFO_EXPORT");
        assert!(self.conn.in_transmission());
        let d = &exp.2;
        (u64::from_be_bytes(d[2..10].try_into().unwrap()), u16::from_be_bytes([d[10], d[11]]))
    }

    /// Greeting, flags, GO "" with simple replies.
    pub fn simple() -> H {
        let mut h = H::default_h();
        h.start();
        h.go("");
        h
    }

    /// Greeting, flags, structured replies, `base:allocation`, GO "".
    pub fn structured() -> H {
        let mut h = H::default_h();
        h.start();
        h.negotiate_sr();
        h.opt(OPT_SET_META_CONTEXT, &encode_meta_context_request("", &[BASE_ALLOCATION]));
        assert_eq!(h.opt_replies().len(), 2);
        h.go("");
        h
    }

    /// Greeting, flags, extended headers, `base:allocation`, GO "".
    pub fn extended() -> H {
        let mut h = H::default_h();
        h.start();
        h.negotiate_ext();
        h.opt(OPT_SET_META_CONTEXT, &encode_meta_context_request("", &[BASE_ALLOCATION]));
        assert_eq!(h.opt_replies().len(), 2);
        h.go("");
        h
    }

    // ---- transmission client ----

    pub fn req_bytes(&self, typ: u16, flags: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
        let h = RequestHeader { flags, typ, cookie, offset, length };
        let mut v = Vec::new();
        if self.ext {
            encode_extended_request(&mut v, &h);
        } else {
            encode_compact_request(&mut v, &h);
        }
        v
    }

    pub fn req(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, length: u64) {
        let v = self.req_bytes(typ, flags, cookie, offset, length);
        self.send(&v);
    }

    pub fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let flags = if self.ext { flags | CMD_FLAG_PAYLOAD_LEN } else { flags };
        let mut v = self.req_bytes(CMD_WRITE, flags, cookie, offset, data.len() as u64);
        v.extend_from_slice(data);
        self.send(&v);
    }

    /// A simple reply: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let r = decode_simple_reply(&self.take_arr()).expect("simple reply magic");
        (r.error, r.cookie)
    }

    /// One structured or extended chunk: header and payload.
    pub fn chunk(&mut self) -> (ChunkHeader, Vec<u8>) {
        let h = if self.ext {
            decode_extended_reply_header(&self.take_arr()).expect("extended reply magic")
        } else {
            decode_structured_header(&self.take_arr()).expect("structured reply magic")
        };
        let p = self.take(h.len as usize);
        (h, p)
    }

    /// A complete reply to anything but READ: Ok(()) or Err(errno), checking the cookie.
    pub fn reply(&mut self, cookie: u64) -> Result<(), u32> {
        if !self.structured {
            let (e, c) = self.simple_reply();
            assert_eq!(c, cookie);
            return if e == 0 { Ok(()) } else { Err(e) };
        }
        // Non-READ success may be simple under SR; never with extended headers.
        if !self.ext && self.peek_simple() {
            let (e, c) = self.simple_reply();
            assert_eq!(c, cookie);
            return if e == 0 { Ok(()) } else { Err(e) };
        }
        let (h, p) = self.chunk();
        assert_eq!(h.cookie, cookie);
        assert_eq!(h.flags, REPLY_FLAG_DONE);
        match h.typ {
            REPLY_TYPE_NONE => Ok(()),
            REPLY_TYPE_ERROR => Err(u32::from_be_bytes(p[..4].try_into().unwrap())),
            t => panic!("unexpected chunk type {t}"),
        }
    }

    fn peek_simple(&mut self) -> bool {
        self.drain_output();
        self.rx.len() >= 4 && self.rx[..4] == SIMPLE_REPLY_MAGIC.to_be_bytes()
    }

    /// A complete READ reply reassembled: Ok(data) or Err(errno, message).
    pub fn read_reply(&mut self, cookie: u64, offset: u64, len: usize) -> Result<Vec<u8>, (u32, String)> {
        if !self.structured {
            let (e, c) = self.simple_reply();
            assert_eq!(c, cookie);
            if e != 0 {
                return Err((e, String::new()));
            }
            return Ok(self.take(len));
        }
        let mut out = vec![0xAAu8; len];
        let mut covered = 0;
        loop {
            let (h, p) = self.chunk();
            assert_eq!(h.cookie, cookie);
            if self.ext {
                assert_eq!(h.offset, offset, "extended chunks echo the request offset");
            }
            match h.typ {
                REPLY_TYPE_NONE => assert!(p.is_empty()),
                REPLY_TYPE_OFFSET_DATA => {
                    let at = u64::from_be_bytes(p[..8].try_into().unwrap());
                    let s = (at - offset) as usize;
                    out[s..s + p.len() - 8].copy_from_slice(&p[8..]);
                    covered += p.len() - 8;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    assert_eq!(p.len(), 12);
                    let at = u64::from_be_bytes(p[..8].try_into().unwrap());
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                    let s = (at - offset) as usize;
                    out[s..s + n].fill(0);
                    covered += n;
                }
                REPLY_TYPE_ERROR => {
                    assert_eq!(h.flags, REPLY_FLAG_DONE);
                    let e = u32::from_be_bytes(p[..4].try_into().unwrap());
                    let ml = u16::from_be_bytes([p[4], p[5]]) as usize;
                    assert_eq!(p.len(), 6 + ml);
                    return Err((e, String::from_utf8(p[6..].to_vec()).unwrap()));
                }
                t => panic!("unexpected chunk type {t} in a READ reply"),
            }
            if h.flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        assert_eq!(covered, len, "chunks must cover the whole read");
        Ok(out)
    }
}
