//! One upstream connection's protocol, client side, without IO: bytes from the server go in
//! through [`Machine::feed`], bytes for the server come out of [`Machine::out`], and finished
//! requests come out of [`Machine::take_completions`]. The driver (`upstream.rs`) owns the
//! socket; tests drive this with byte scripts.
//!
//! Handshake (fixed newstyle, one option at a time as the spec asks of clients):
//! STRUCTURED_REPLY, then SET_META_CONTEXT `base:allocation` if that was accepted, then GO with
//! INFO_BLOCK_SIZE and INFO_DESCRIPTION; a server that does not know GO gets EXPORT_NAME. A
//! plain (non-fixed) newstyle server gets EXPORT_NAME straight away, and an oldstyle greeting is
//! the whole handshake. Extended headers are never requested, so every request is the compact
//! form and every length we send fits in 32 bits.
//!
//! Replies are decoded incrementally: headers and small payloads are gathered in a small buffer,
//! while READ data (simple replies and OFFSET_DATA chunks) is copied straight into the request's
//! buffer as it arrives, so a 32 MiB read is never held twice. Everything the server sends is
//! untrusted: a cookie we did not send, a chunk that does not fit its request, a length over a
//! bound, or a bad magic is fatal for the connection (the caller drops it and fails what is in
//! flight); nothing the server sends can make this code panic or allocate more than the bounds
//! below.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;

use blocksmith_core::error::{Errno, NbdError};
use blocksmith_core::layer::Extents;
use blocksmith_core::proto::client::{
    decode_data_offset, decode_export_name_reply, decode_greeting_start, decode_oldstyle_rest,
    decode_reply_magic, lossy_string, parse_block_status, parse_error_chunk, parse_info_reply,
    parse_meta_context_reply, parse_offset_hole, reply_type_name, GreetingKind, InfoItem, ReplyMagic,
    EXPORT_NAME_REPLY_LEN, OLDSTYLE_REST_LEN,
};
use blocksmith_core::proto::*;

/// Largest option reply we read. Real ones are a few bytes (INFO items) up to a 4 KiB message.
const MAX_OPTION_REPLY: usize = 64 * 1024;

/// Largest chunk payload gathered in memory (everything but READ data, which streams): a
/// BLOCK_STATUS reply with the spec's maximum of 2^20 descriptors.
pub const MAX_SMALL_CHUNK: usize = 4 + 8 * blocksmith_core::limits::MAX_EXTENTS_PER_REPLY;

/// A segment queued for output is merged with the next header while it is this small.
const SMALL_SEGMENT: usize = 64 * 1024;

/// What the handshake learnt about the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamInfo {
    pub size: u64,
    /// Transmission flags (0 if the server did not set HAS_FLAGS, as libnbd does).
    pub flags: u16,
    /// (minimum, preferred, maximum) from NBD_INFO_BLOCK_SIZE, as sent.
    pub block_size: Option<(u32, u32, u32)>,
    pub description: Option<String>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected: BLOCK_STATUS works.
    pub extents: bool,
}

/// A request, with what it carries.
#[derive(Debug)]
pub enum Op {
    /// Fill this buffer (its length is the count).
    Read(Vec<u8>),
    Write(Vec<u8>),
    Flush,
    Trim(u32),
    Zero(u32),
    Cache(u32),
    BlockStatus(u32),
}

/// A successful reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Data(Vec<u8>),
    Done,
    Extents(Extents),
}

pub type Completion<T> = (T, Result<Reply, NbdError>);

/// Bytes waiting to be written to the server: small headers are merged into one segment, write
/// payloads are queued as the caller's own buffers (never copied).
#[derive(Default)]
pub struct OutQueue {
    segs: VecDeque<Vec<u8>>,
    /// Bytes of the front segment already written.
    head: usize,
    /// The back segment is ours (headers) and may be appended to.
    tail_open: bool,
}

impl OutQueue {
    fn small(&mut self) -> &mut Vec<u8> {
        let open = self.tail_open && self.segs.back().is_some_and(|s| s.len() < SMALL_SEGMENT);
        if !open {
            self.segs.push_back(Vec::with_capacity(256));
            self.tail_open = true;
        }
        let last = self.segs.len() - 1;
        &mut self.segs[last]
    }

    fn push_owned(&mut self, v: Vec<u8>) {
        if !v.is_empty() {
            self.segs.push_back(v);
            self.tail_open = false;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Fill `iov` with the unwritten bytes, in order; returns how many slices were used.
    pub fn iovecs<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, s) in self.segs.iter().enumerate() {
            if n == iov.len() {
                break;
            }
            let s = if i == 0 { &s[self.head..] } else { &s[..] };
            if !s.is_empty() {
                iov[n] = IoSlice::new(s);
                n += 1;
            }
        }
        n
    }

    /// `n` bytes were written.
    pub fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.segs.front() else { return };
            let left = front.len() - self.head;
            if n < left {
                self.head += n;
                return;
            }
            n -= left;
            self.segs.pop_front();
            self.head = 0;
            if self.segs.is_empty() {
                self.tail_open = false;
            }
        }
    }
}

struct Pending<T> {
    token: T,
    typ: u16,
    offset: u64,
    len: u64,
    /// READ: the destination.
    buf: Vec<u8>,
    /// READ: bytes filled by data or hole chunks.
    covered: u64,
    extents: Option<Extents>,
    /// The first error chunk; later ones are ignored.
    error: Option<NbdError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// NBDMAGIC and the second magic (16 bytes).
    Greeting,
    /// Newstyle handshake flags (2 bytes).
    HandshakeFlags,
    /// The rest of an oldstyle greeting.
    Oldstyle,
    /// An option reply header for `opt` (20 bytes).
    OptionHeader {
        opt: u32,
    },
    /// Its payload.
    OptionPayload {
        opt: u32,
        reply_type: u32,
        len: usize,
    },
    /// The NBD_OPT_EXPORT_NAME answer (10 bytes, plus 124 zeroes without NO_ZEROES).
    ExportName {
        len: usize,
    },
    /// STARTTLS was accepted: the driver runs the TLS handshake, then calls
    /// [`Machine::tls_established`]. No plaintext byte may arrive meanwhile.
    StartTls,
    Ready(Rx),
    /// A fatal error happened; nothing more is read.
    Dead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    /// The 4 magic bytes of a reply.
    Magic,
    /// The rest of a header whose magic said which kind it is.
    Header(ReplyMagic),
    /// READ data after a simple reply, into `buf[at..]`.
    SimpleData { cookie: u64, at: usize },
    /// A chunk payload gathered whole.
    Payload(ChunkHeader),
    /// The 8-byte offset of an OFFSET_DATA chunk.
    DataOffset(ChunkHeader),
    /// OFFSET_DATA bytes, into `buf[at..end]`.
    Data { cookie: u64, at: usize, end: usize, last: bool },
}

/// A fatal protocol error: the connection must be dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fatal(pub String);

fn fatal<T>(msg: impl Into<String>) -> Result<T, Fatal> {
    Err(Fatal(msg.into()))
}

/// Move bytes from `input` into `acc` until it holds `need`; true when it does.
fn fill(acc: &mut Vec<u8>, need: usize, input: &mut &[u8]) -> bool {
    let want = need.saturating_sub(acc.len()).min(input.len());
    acc.extend_from_slice(&input[..want]);
    *input = &input[want..];
    acc.len() >= need
}

/// `tls=` towards the upstream (nbdkit-nbd-plugin's values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Never STARTTLS.
    #[default]
    Off,
    /// STARTTLS; continue in plaintext if the server refuses it.
    On,
    /// STARTTLS, and fail if the server refuses it (or cannot be asked).
    Require,
}

pub struct Machine<T> {
    export: String,
    tls: TlsMode,
    /// TLS was established: everything after it runs inside the session.
    encrypted: bool,
    phase: Phase,
    acc: Vec<u8>,
    out: OutQueue,
    no_zeroes: bool,
    structured: bool,
    meta_id: Option<u32>,
    size: Option<u64>,
    flags: u16,
    block_size: Option<(u32, u32, u32)>,
    description: Option<String>,
    next_cookie: u64,
    pending: HashMap<u64, Pending<T>>,
    done: Vec<Completion<T>>,
}

impl<T> Machine<T> {
    /// A machine for a fresh connection to `export`; it waits for the server's greeting.
    pub fn new(export: &str) -> Self {
        Self::with_tls(export, TlsMode::Off)
    }

    /// A machine that negotiates TLS first as `tls` says.
    pub fn with_tls(export: &str, tls: TlsMode) -> Self {
        Machine {
            export: export.to_string(),
            tls,
            encrypted: false,
            phase: Phase::Greeting,
            acc: Vec::with_capacity(64),
            out: OutQueue::default(),
            no_zeroes: false,
            structured: false,
            meta_id: None,
            size: None,
            flags: 0,
            block_size: None,
            description: None,
            next_cookie: 1,
            pending: HashMap::new(),
            done: Vec::new(),
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    /// What the handshake negotiated, once ready.
    pub fn info(&self) -> Option<UpstreamInfo> {
        if !self.is_ready() {
            return None;
        }
        Some(UpstreamInfo {
            size: self.size.unwrap_or(0),
            flags: self.flags,
            block_size: self.block_size,
            description: self.description.clone(),
            structured: self.structured,
            extents: self.meta_id.is_some(),
        })
    }

    /// The server accepted STARTTLS: the TLS handshake is due now (the output queue is empty).
    pub fn wants_tls(&self) -> bool {
        self.phase == Phase::StartTls
    }

    /// The TLS handshake finished: the option haggling continues inside the session.
    pub fn tls_established(&mut self) {
        if self.phase == Phase::StartTls {
            self.encrypted = true;
            self.send_option(OPT_STRUCTURED_REPLY, &[]);
        }
    }

    /// TLS is in use on this connection.
    pub fn is_encrypted(&self) -> bool {
        self.encrypted
    }

    pub fn out(&mut self) -> &mut OutQueue {
        &mut self.out
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Replies completed since the last call.
    pub fn take_completions(&mut self) -> Vec<Completion<T>> {
        std::mem::take(&mut self.done)
    }

    /// The connection is gone: every request in flight fails with `err`.
    pub fn fail_all(&mut self, err: &NbdError) -> Vec<Completion<T>> {
        self.phase = Phase::Dead;
        let mut v = self.take_completions();
        v.extend(self.pending.drain().map(|(_, p)| (p.token, Err(err.clone()))));
        v
    }

    /// Queue NBD_CMD_DISC (soft disconnect). Only sensible when nothing is in flight.
    pub fn disconnect(&mut self) {
        if self.is_ready() {
            let h = RequestHeader { flags: 0, typ: CMD_DISC, cookie: 0, offset: 0, length: 0 };
            encode_compact_request(self.out.small(), &h);
        }
    }

    /// Send a request. `flags` are wire command flags. Before the handshake is done the token
    /// is handed back. Lengths must fit the compact header (the caller splits).
    pub fn submit(&mut self, op: Op, offset: u64, flags: u16, token: T) -> Result<(), T> {
        if !self.is_ready() {
            return Err(token);
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        let (typ, len, buf, payload) = match op {
            Op::Read(buf) => (CMD_READ, buf.len() as u64, buf, None),
            Op::Write(data) => (CMD_WRITE, data.len() as u64, Vec::new(), Some(data)),
            Op::Flush => (CMD_FLUSH, 0, Vec::new(), None),
            Op::Trim(n) => (CMD_TRIM, u64::from(n), Vec::new(), None),
            Op::Zero(n) => (CMD_WRITE_ZEROES, u64::from(n), Vec::new(), None),
            Op::Cache(n) => (CMD_CACHE, u64::from(n), Vec::new(), None),
            Op::BlockStatus(n) => (CMD_BLOCK_STATUS, u64::from(n), Vec::new(), None),
        };
        debug_assert!(len <= u64::from(u32::MAX), "compact requests carry 32-bit lengths");
        let h = RequestHeader { flags, typ, cookie, offset, length: len };
        encode_compact_request(self.out.small(), &h);
        if let Some(p) = payload {
            self.out.push_owned(p);
        }
        let p = Pending { token, typ, offset, len, buf, covered: 0, extents: None, error: None };
        self.pending.insert(cookie, p);
        Ok(())
    }

    /// Bytes from the server. On `Err` the connection must be dropped (and [`Machine::fail_all`]
    /// called); completions gathered before the error are still delivered by it.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), Fatal> {
        while !input.is_empty() {
            let r = match self.phase {
                Phase::Ready(rx) => self.rx(rx, &mut input),
                Phase::Dead => return fatal("connection already failed"),
                Phase::StartTls => return fatal("plaintext data after the server accepted STARTTLS"),
                _ => self.handshake(&mut input),
            };
            if let Err(e) = r {
                self.phase = Phase::Dead;
                return Err(e);
            }
        }
        Ok(())
    }

    // ---- Handshake ---------------------------------------------------------------------------

    fn send_option(&mut self, opt: u32, data: &[u8]) {
        encode_option_request(self.out.small(), opt, data);
        self.phase = Phase::OptionHeader { opt };
    }

    fn send_export_name(&mut self) {
        let name = self.export.clone();
        encode_option_request(self.out.small(), OPT_EXPORT_NAME, name.as_bytes());
        let len = EXPORT_NAME_REPLY_LEN + if self.no_zeroes { 0 } else { ZEROES_LEN };
        self.phase = Phase::ExportName { len };
    }

    fn send_go(&mut self) {
        let data = encode_info_request(&self.export, &[INFO_BLOCK_SIZE, INFO_DESCRIPTION]);
        self.send_option(OPT_GO, &data);
    }

    fn set_transmission_flags(&mut self, flags: u16) {
        // libnbd's rule: without HAS_FLAGS none of the other bits mean anything.
        self.flags = if flags & FLAG_HAS_FLAGS != 0 { flags } else { 0 };
    }

    fn handshake(&mut self, input: &mut &[u8]) -> Result<(), Fatal> {
        match self.phase {
            Phase::Greeting => {
                if !fill(&mut self.acc, 16, input) {
                    return Ok(());
                }
                let mut b = [0u8; 16];
                b.copy_from_slice(&self.acc);
                self.acc.clear();
                match decode_greeting_start(&b) {
                    Ok(GreetingKind::Newstyle) => self.phase = Phase::HandshakeFlags,
                    Ok(GreetingKind::Oldstyle) => self.phase = Phase::Oldstyle,
                    Err(e) => return fatal(format!("not an NBD server: greeting has {e}")),
                }
            }
            Phase::HandshakeFlags => {
                if !fill(&mut self.acc, 2, input) {
                    return Ok(());
                }
                let flags = u16::from_be_bytes([self.acc[0], self.acc[1]]);
                self.acc.clear();
                let fixed = flags & FLAG_FIXED_NEWSTYLE != 0;
                self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
                let mut cflags = 0u32;
                if fixed {
                    cflags |= FLAG_C_FIXED_NEWSTYLE;
                }
                if self.no_zeroes {
                    cflags |= FLAG_C_NO_ZEROES;
                }
                self.out.small().extend_from_slice(&cflags.to_be_bytes());
                if fixed && self.tls != TlsMode::Off {
                    self.send_option(OPT_STARTTLS, &[]);
                } else if self.tls == TlsMode::Require {
                    return fatal("tls=require, but the upstream is not fixed newstyle (no STARTTLS)");
                } else if fixed {
                    self.send_option(OPT_STRUCTURED_REPLY, &[]);
                } else {
                    // Plain newstyle knows no option but EXPORT_NAME.
                    self.send_export_name();
                }
            }
            Phase::Oldstyle => {
                if !fill(&mut self.acc, OLDSTYLE_REST_LEN, input) {
                    return Ok(());
                }
                if self.tls == TlsMode::Require {
                    return fatal("tls=require, but the upstream speaks oldstyle (no STARTTLS)");
                }
                let mut b = [0u8; OLDSTYLE_REST_LEN];
                b.copy_from_slice(&self.acc);
                self.acc = Vec::with_capacity(64);
                let (size, flags) = decode_oldstyle_rest(&b);
                self.size = Some(size);
                self.set_transmission_flags((flags & 0xffff) as u16);
                self.phase = Phase::Ready(Rx::Magic);
            }
            Phase::OptionHeader { opt } => {
                if !fill(&mut self.acc, OPTION_REPLY_HEADER_LEN, input) {
                    return Ok(());
                }
                let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
                b.copy_from_slice(&self.acc);
                self.acc.clear();
                let h = match decode_option_reply_header(&b) {
                    Ok(h) => h,
                    Err(e) => return fatal(format!("option reply with {e}")),
                };
                if h.opt != opt {
                    return fatal(format!("reply for option {} while waiting for option {opt}", h.opt));
                }
                let len = h.len as usize;
                if len > MAX_OPTION_REPLY {
                    return fatal(format!(
                        "option reply of {len} bytes (at most {MAX_OPTION_REPLY} accepted)"
                    ));
                }
                if h.reply_type == REP_ACK && len != 0 {
                    return fatal(format!("NBD_REP_ACK with {len} bytes of data"));
                }
                self.phase = Phase::OptionPayload { opt, reply_type: h.reply_type, len };
                if len == 0 {
                    return self.option_reply(opt, h.reply_type);
                }
            }
            Phase::OptionPayload { opt, reply_type, len } => {
                if fill(&mut self.acc, len, input) {
                    return self.option_reply(opt, reply_type);
                }
            }
            Phase::ExportName { len } => {
                if !fill(&mut self.acc, len, input) {
                    return Ok(());
                }
                let mut b = [0u8; EXPORT_NAME_REPLY_LEN];
                b.copy_from_slice(&self.acc[..EXPORT_NAME_REPLY_LEN]);
                self.acc = Vec::with_capacity(64);
                let (size, flags) = decode_export_name_reply(&b);
                self.size = Some(size);
                self.set_transmission_flags(flags);
                // A server too old for GO is not trusted with a meta context selected before
                // EXPORT_NAME either: no block status after this fallback.
                self.meta_id = None;
                self.phase = Phase::Ready(Rx::Magic);
            }
            Phase::StartTls | Phase::Ready(_) | Phase::Dead => {}
        }
        Ok(())
    }

    /// A whole option reply (its payload in `acc`).
    fn option_reply(&mut self, opt: u32, reply_type: u32) -> Result<(), Fatal> {
        let data = std::mem::take(&mut self.acc);
        let is_error = reply_type & REP_FLAG_ERROR != 0;
        let refusal = || format!("{}: {}", reply_type_name(reply_type), lossy_string(&data));
        match opt {
            OPT_STARTTLS => match reply_type {
                REP_ACK => self.phase = Phase::StartTls,
                _ if is_error && self.tls == TlsMode::Require => {
                    return fatal(format!("tls=require, but the upstream refused STARTTLS ({})", refusal()));
                }
                _ if is_error => {
                    log::info!("nbd: upstream refused STARTTLS ({}); continuing in plaintext", refusal());
                    self.send_option(OPT_STRUCTURED_REPLY, &[]);
                }
                _ => return fatal(format!("unexpected {} to STARTTLS", reply_type_name(reply_type))),
            },
            OPT_STRUCTURED_REPLY => match reply_type {
                REP_ACK => {
                    self.structured = true;
                    let d = encode_meta_context_request(&self.export, &[BASE_ALLOCATION]);
                    self.send_option(OPT_SET_META_CONTEXT, &d);
                }
                _ if is_error => {
                    log::debug!("upstream refused structured replies ({}): no block status", refusal());
                    self.send_go();
                }
                _ => return fatal(format!("unexpected {} to STRUCTURED_REPLY", reply_type_name(reply_type))),
            },
            OPT_SET_META_CONTEXT => match reply_type {
                REP_META_CONTEXT => {
                    let (id, name) = parse_meta_context_reply(&data).map_err(|e| Fatal(e.0))?;
                    if name == BASE_ALLOCATION && self.meta_id.is_none() {
                        self.meta_id = Some(id);
                    }
                    self.phase = Phase::OptionHeader { opt };
                }
                REP_ACK => self.send_go(),
                _ if is_error => {
                    log::debug!("upstream refused base:allocation ({}): no block status", refusal());
                    self.meta_id = None;
                    self.send_go();
                }
                _ => {
                    log::debug!("ignoring {} to SET_META_CONTEXT", reply_type_name(reply_type));
                    self.phase = Phase::OptionHeader { opt };
                }
            },
            OPT_GO => match reply_type {
                REP_INFO => {
                    match parse_info_reply(&data).map_err(|e| Fatal(e.0))? {
                        InfoItem::Export { size, flags } => {
                            self.size = Some(size);
                            self.set_transmission_flags(flags);
                        }
                        InfoItem::BlockSize { minimum, preferred, maximum } => {
                            self.block_size = Some((minimum, preferred, maximum));
                        }
                        InfoItem::Description(d) => self.description = Some(d),
                        InfoItem::Name(_) | InfoItem::Unknown(_) => {}
                    }
                    self.phase = Phase::OptionHeader { opt };
                }
                REP_ACK => {
                    if self.size.is_none() {
                        return fatal("GO succeeded without NBD_INFO_EXPORT");
                    }
                    self.acc = Vec::with_capacity(64);
                    self.phase = Phase::Ready(Rx::Magic);
                }
                REP_ERR_UNSUP => {
                    // A server from before GO (nbd-server < 3.10): the old way still works.
                    self.size = None;
                    self.send_export_name();
                }
                _ if is_error => {
                    return fatal(format!("upstream refused export {:?}: {}", self.export, refusal()));
                }
                _ => {
                    log::debug!("ignoring {} to GO", reply_type_name(reply_type));
                    self.phase = Phase::OptionHeader { opt };
                }
            },
            _ => return fatal(format!("reply to option {opt} that was never sent")),
        }
        Ok(())
    }

    // ---- Transmission ------------------------------------------------------------------------

    fn rx(&mut self, rx: Rx, input: &mut &[u8]) -> Result<(), Fatal> {
        match rx {
            Rx::Magic => {
                if !fill(&mut self.acc, 4, input) {
                    return Ok(());
                }
                let b = [self.acc[0], self.acc[1], self.acc[2], self.acc[3]];
                let m = match decode_reply_magic(&b) {
                    Ok(m) => m,
                    Err(e) => return fatal(format!("reply with {e}")),
                };
                match m {
                    ReplyMagic::Simple => {}
                    ReplyMagic::Structured if self.structured => {}
                    _ => return fatal(format!("{m:?} reply header that was not negotiated")),
                }
                self.phase = Phase::Ready(Rx::Header(m));
            }
            Rx::Header(m) => {
                if !fill(&mut self.acc, m.header_len(), input) {
                    return Ok(());
                }
                let hdr = std::mem::take(&mut self.acc);
                self.acc.reserve(64);
                match m {
                    ReplyMagic::Simple => {
                        let mut b = [0u8; SIMPLE_REPLY_LEN];
                        b.copy_from_slice(&hdr);
                        let r = decode_simple_reply(&b).map_err(|e| Fatal(e.to_string()))?;
                        self.simple_reply(r.error, r.cookie)?;
                    }
                    _ => {
                        let mut b = [0u8; STRUCTURED_REPLY_HEADER_LEN];
                        b.copy_from_slice(&hdr);
                        let h = decode_structured_header(&b).map_err(|e| Fatal(e.to_string()))?;
                        self.chunk_header(h)?;
                    }
                }
            }
            Rx::SimpleData { .. } | Rx::Data { .. } => {
                let Some(dst) = self.data_target() else {
                    return fatal("internal: read reply lost its request");
                };
                let n = dst.len().min(input.len());
                dst[..n].copy_from_slice(&input[..n]);
                *input = &input[n..];
                self.data_received(n);
            }
            Rx::Payload(h) => {
                if fill(&mut self.acc, h.len as usize, input) {
                    let payload = std::mem::take(&mut self.acc);
                    self.acc.reserve(64);
                    self.phase = Phase::Ready(Rx::Magic);
                    self.chunk_payload(h, &payload)?;
                }
            }
            Rx::DataOffset(h) => {
                if !fill(&mut self.acc, 8, input) {
                    return Ok(());
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.acc);
                self.acc.clear();
                let off = decode_data_offset(&b);
                let data_len = h.len - 8;
                let Some(p) = self.pending.get_mut(&h.cookie) else {
                    return fatal("internal: data chunk lost its request");
                };
                let start = off.checked_sub(p.offset);
                let fits = start.and_then(|s| s.checked_add(data_len)).is_some_and(|e| e <= p.len);
                let Some(start) = start.filter(|_| fits) else {
                    return fatal(format!(
                        "data chunk [{off}, +{data_len}) outside its request [{}, +{})",
                        p.offset, p.len
                    ));
                };
                p.covered = p.covered.saturating_add(data_len);
                // Both fit in the request's buffer, whose length is a usize.
                let (at, end) = (start as usize, (start + data_len) as usize);
                let last = h.flags & REPLY_FLAG_DONE != 0;
                self.phase = Phase::Ready(Rx::Data { cookie: h.cookie, at, end, last });
            }
        }
        Ok(())
    }

    /// While READ data is expected: where the next bytes go (never empty). The driver may read
    /// from the socket straight into it, then call [`Machine::data_received`], which saves a
    /// copy of every large read.
    pub fn data_target(&mut self) -> Option<&mut [u8]> {
        let (cookie, at, end) = match self.phase {
            Phase::Ready(Rx::SimpleData { cookie, at }) => (cookie, at, None),
            Phase::Ready(Rx::Data { cookie, at, end, .. }) => (cookie, at, Some(end)),
            _ => return None,
        };
        let p = self.pending.get_mut(&cookie)?;
        let end = end.unwrap_or(p.buf.len());
        p.buf.get_mut(at..end)
    }

    /// `n` bytes (at most the length of [`Machine::data_target`]) were put there.
    pub fn data_received(&mut self, n: usize) {
        match self.phase {
            Phase::Ready(Rx::SimpleData { cookie, at }) => {
                let Some(p) = self.pending.get_mut(&cookie) else { return };
                let at = at + n;
                if at >= p.buf.len() {
                    p.covered = p.len;
                    self.phase = Phase::Ready(Rx::Magic);
                    self.complete(cookie);
                } else {
                    self.phase = Phase::Ready(Rx::SimpleData { cookie, at });
                }
            }
            Phase::Ready(Rx::Data { cookie, at, end, last }) => {
                let at = at + n;
                if at >= end {
                    self.phase = Phase::Ready(Rx::Magic);
                    if last {
                        self.complete(cookie);
                    }
                } else {
                    self.phase = Phase::Ready(Rx::Data { cookie, at, end, last });
                }
            }
            _ => {}
        }
    }

    fn simple_reply(&mut self, error: u32, cookie: u64) -> Result<(), Fatal> {
        let Some(p) = self.pending.get_mut(&cookie) else {
            return fatal(format!("simple reply for unknown cookie {cookie:#x}"));
        };
        self.phase = Phase::Ready(Rx::Magic);
        if error != 0 {
            p.error = Some(NbdError::new(Errno::from_wire(error)));
            self.complete(cookie);
        } else if p.typ == CMD_READ && !p.buf.is_empty() {
            self.phase = Phase::Ready(Rx::SimpleData { cookie, at: 0 });
        } else {
            p.covered = p.len;
            self.complete(cookie);
        }
        Ok(())
    }

    fn chunk_header(&mut self, h: ChunkHeader) -> Result<(), Fatal> {
        let Some(p) = self.pending.get(&h.cookie) else {
            return fatal(format!("reply chunk for unknown cookie {:#x}", h.cookie));
        };
        if h.typ == REPLY_TYPE_OFFSET_DATA {
            if p.typ != CMD_READ {
                return fatal("OFFSET_DATA chunk for a request that is not a read");
            }
            if h.len <= 8 {
                return fatal(format!("OFFSET_DATA chunk of {} bytes", h.len));
            }
            self.phase = Phase::Ready(Rx::DataOffset(h));
            return Ok(());
        }
        if h.len > MAX_SMALL_CHUNK as u64 {
            return fatal(format!("reply chunk of type {} with {} bytes of payload", h.typ, h.len));
        }
        if h.len == 0 {
            self.phase = Phase::Ready(Rx::Magic);
            return self.chunk_payload(h, &[]);
        }
        self.phase = Phase::Ready(Rx::Payload(h));
        Ok(())
    }

    /// A whole chunk other than OFFSET_DATA.
    fn chunk_payload(&mut self, h: ChunkHeader, payload: &[u8]) -> Result<(), Fatal> {
        let meta_id = self.meta_id;
        let Some(p) = self.pending.get_mut(&h.cookie) else {
            return fatal(format!("reply chunk for unknown cookie {:#x}", h.cookie));
        };
        match h.typ {
            REPLY_TYPE_NONE => {
                if !payload.is_empty() {
                    return fatal(format!("NBD_REPLY_TYPE_NONE with {} bytes", payload.len()));
                }
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if p.typ != CMD_READ {
                    return fatal("OFFSET_HOLE chunk for a request that is not a read");
                }
                let (off, len) = parse_offset_hole(payload).map_err(|e| Fatal(e.0))?;
                let len = u64::from(len);
                let start =
                    off.checked_sub(p.offset).filter(|s| s.checked_add(len).is_some_and(|e| e <= p.len));
                let Some(start) = start else {
                    return fatal(format!(
                        "hole [{off}, +{len}) outside its request [{}, +{})",
                        p.offset, p.len
                    ));
                };
                p.buf[start as usize..(start + len) as usize].fill(0);
                p.covered = p.covered.saturating_add(len);
            }
            REPLY_TYPE_BLOCK_STATUS => {
                if p.typ != CMD_BLOCK_STATUS {
                    return fatal("BLOCK_STATUS chunk for a request that is not block status");
                }
                let (id, descs) = parse_block_status(payload).map_err(|e| Fatal(e.0))?;
                // Only the context we selected, and only its first answer.
                if Some(id) == meta_id && p.extents.is_none() {
                    let mut e = Extents::new();
                    for (len, flags) in descs {
                        // Zero-length descriptors are forbidden; skipping them is harmless.
                        e.push(u64::from(len), flags);
                    }
                    p.extents = Some(e);
                }
            }
            t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
                let ec = parse_error_chunk(t, payload).map_err(|e| Fatal(e.0))?;
                if p.error.is_none() {
                    let err = if ec.error == 0 {
                        NbdError::io(format!("upstream sent error 0 (message: {:?})", ec.message))
                    } else if ec.message.is_empty() {
                        NbdError::new(Errno::from_wire(ec.error))
                    } else {
                        NbdError::msg(Errno::from_wire(ec.error), ec.message)
                    };
                    p.error = Some(err);
                }
            }
            t => return fatal(format!("unknown reply chunk type {t}")),
        }
        if h.flags & REPLY_FLAG_DONE != 0 {
            self.complete(h.cookie);
        }
        Ok(())
    }

    /// The last chunk of a reply arrived: hand the result out.
    fn complete(&mut self, cookie: u64) {
        let Some(p) = self.pending.remove(&cookie) else { return };
        let r = match p.error {
            Some(e) => Err(e),
            None => match p.typ {
                CMD_READ if p.covered != p.len => Err(NbdError::io(format!(
                    "upstream's read reply covered {} of {} bytes",
                    p.covered, p.len
                ))),
                CMD_READ => Ok(Reply::Data(p.buf)),
                CMD_BLOCK_STATUS => match p.extents {
                    Some(e) if !e.0.is_empty() => Ok(Reply::Extents(e)),
                    _ => Err(NbdError::io("upstream's block status reply described nothing")),
                },
                _ => Ok(Reply::Done),
            },
        };
        self.done.push((p.token, r));
    }
}
