//! A pure codec for the NBD wire format: fixed-size headers decode from byte arrays, option
//! payloads parse from a fully received slice, and every message encodes by appending to a
//! `Vec<u8>`. Nothing here allocates from a length the peer declared before checking it
//! against the bytes actually present.

use std::fmt;

use super::consts::*;

/// A header that does not start with the expected magic: the peer has lost sync (or never
/// spoke NBD), and the caller should drop the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMagic(pub u64);

impl fmt::Display for BadMagic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad magic {:#x}", self.0)
    }
}

/// Why the data of an option is unacceptable; maps onto an option error reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionDataError {
    /// Malformed: a length overruns the data, junk is left over, a string is invalid
    /// (`NBD_REP_ERR_INVALID`).
    Invalid(String),
    /// Well formed but more than we accept (`NBD_REP_ERR_TOO_BIG`).
    TooBig(String),
}

impl OptionDataError {
    /// The option reply type to send.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionDataError::Invalid(_) => REP_ERR_INVALID,
            OptionDataError::TooBig(_) => REP_ERR_TOO_BIG,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            OptionDataError::Invalid(m) | OptionDataError::TooBig(m) => m,
        }
    }
}

fn invalid(msg: impl Into<String>) -> OptionDataError {
    OptionDataError::Invalid(msg.into())
}

// ---- Small helpers ---------------------------------------------------------------------------

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
/// Used for strings the spec caps at 4096 bytes (messages, descriptions).
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounds-checked reader over option data. Every length read from the data is checked
/// against what remains before anything is sliced or allocated.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], OptionDataError> {
        if n > self.remaining() {
            return Err(invalid(format!(
                "{what}: {n} bytes declared but only {} left in the option",
                self.remaining()
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<u16, OptionDataError> {
        self.take(2, what).map(|b| be16(b, 0))
    }
    fn u32(&mut self, what: &str) -> Result<u32, OptionDataError> {
        self.take(4, what).map(|b| be32(b, 0))
    }
    /// A string with a 32-bit length prefix.
    fn string32(&mut self, what: &str) -> Result<String, OptionDataError> {
        let len = self.u32(what)?;
        let len = usize::try_from(len).map_err(|_| invalid(format!("{what}: length too large")))?;
        if len > MAX_STRING_LEN {
            return Err(invalid(format!("{what}: {len} bytes, more than the {MAX_STRING_LEN} allowed")));
        }
        parse_string(self.take(len, what)?, what)
    }
    fn finish(&self, what: &str) -> Result<(), OptionDataError> {
        if self.remaining() != 0 {
            return Err(invalid(format!("{what}: {} unexpected trailing bytes", self.remaining())));
        }
        Ok(())
    }
}

/// An NBD string: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(b: &[u8], what: &str) -> Result<String, OptionDataError> {
    if b.len() > MAX_STRING_LEN {
        return Err(invalid(format!("{what}: {} bytes, more than the {MAX_STRING_LEN} allowed", b.len())));
    }
    if b.contains(&0) {
        return Err(invalid(format!("{what}: contains a NUL byte")));
    }
    match std::str::from_utf8(b) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(invalid(format!("{what}: not valid UTF-8"))),
    }
}

// ---- Handshake -------------------------------------------------------------------------------

/// Newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_newstyle_greeting(out: &mut Vec<u8>, handshake_flags: u16) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&handshake_flags.to_be_bytes());
}

/// The whole oldstyle handshake: NBDMAGIC, magic, size, 32-bit flags, 124 zeroes.
pub fn encode_oldstyle_greeting(out: &mut Vec<u8>, size: u64, flags: u32) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0u8; ZEROES_LEN]);
}

/// The successful answer to NBD_OPT_EXPORT_NAME: size, transmission flags, and the 124 zero
/// bytes unless the client negotiated NO_ZEROES.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, transmission_flags: u16, zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if zeroes {
        out.extend_from_slice(&[0u8; ZEROES_LEN]);
    }
}

/// An option request header as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: u32,
    pub len: u32,
}

pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, BadMagic> {
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(BadMagic(magic));
    }
    Ok(OptionHeader { code: be32(b, 8), len: be32(b, 12) })
}

/// Client side: an option request with its data.
pub fn encode_option_request(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

/// Parse INFO/GO data: 32-bit name length (at most optlen − 6), name, 16-bit count, that many
/// 16-bit info types, and nothing else.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionDataError> {
    let mut r = Reader { data, pos: 0 };
    let name = r.string32("export name")?;
    let count = r.u16("information request count")?;
    let want = usize::from(count) * 2;
    if r.remaining() != want {
        return Err(invalid(format!(
            "{count} information requests need {want} bytes but {} remain",
            r.remaining()
        )));
    }
    let mut infos = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        infos.push(r.u16("information request")?);
    }
    r.finish("information requests")?;
    Ok(InfoRequest { name, infos })
}

/// Client side: INFO/GO data.
pub fn encode_info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// Parse meta-context data: 32-bit name length, name, 32-bit query count, then that many
/// (32-bit length, query) pairs, and nothing else. More than `max_queries` is TOO_BIG.
pub fn parse_meta_context_request(
    data: &[u8],
    max_queries: u32,
) -> Result<MetaContextRequest, OptionDataError> {
    let mut r = Reader { data, pos: 0 };
    let name = r.string32("export name")?;
    let count = r.u32("query count")?;
    // Each query takes at least its 4-byte length: a count the data cannot hold is malformed,
    // whatever our own limit.
    if u64::from(count) * 4 > r.remaining() as u64 {
        return Err(invalid(format!("{count} queries cannot fit in {} bytes", r.remaining())));
    }
    if count > max_queries {
        return Err(OptionDataError::TooBig(format!("{count} queries; at most {max_queries} accepted")));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(r.string32("query")?);
    }
    r.finish("meta context queries")?;
    Ok(MetaContextRequest { name, queries })
}

/// Client side: meta-context data.
pub fn encode_meta_context_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

// ---- Option replies --------------------------------------------------------------------------

pub fn encode_option_reply_header(out: &mut Vec<u8>, opt: u32, reply_type: u32, len: u32) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A reply whose data the caller has already built. Option replies are small (a few KiB at
/// most), so the length always fits.
pub fn encode_option_reply(out: &mut Vec<u8>, opt: u32, reply_type: u32, data: &[u8]) {
    debug_assert!(data.len() <= u32::MAX as usize);
    encode_option_reply_header(out, opt, reply_type, data.len() as u32);
    out.extend_from_slice(data);
}

/// NBD_REP_ACK, which carries no data.
pub fn encode_rep_ack(out: &mut Vec<u8>, opt: u32) {
    encode_option_reply_header(out, opt, REP_ACK, 0);
}

/// An error reply with a human-readable message (cut to 4096 bytes).
pub fn encode_rep_error(out: &mut Vec<u8>, opt: u32, reply_type: u32, msg: &str) {
    debug_assert!(reply_type & REP_FLAG_ERROR != 0);
    let msg = truncate_str(msg, MAX_STRING_LEN);
    encode_option_reply(out, opt, reply_type, msg.as_bytes());
}

/// NBD_REP_SERVER: 32-bit name length, name, then the optional description.
pub fn encode_rep_server(out: &mut Vec<u8>, opt: u32, name: &str, description: Option<&str>) {
    let desc = truncate_str(description.unwrap_or(""), MAX_STRING_LEN);
    encode_option_reply_header(out, opt, REP_SERVER, (4 + name.len() + desc.len()) as u32);
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(desc.as_bytes());
}

/// NBD_REP_INFO / NBD_INFO_EXPORT: exactly 12 bytes of data.
pub fn encode_info_export(out: &mut Vec<u8>, opt: u32, size: u64, transmission_flags: u16) {
    encode_option_reply_header(out, opt, REP_INFO, 12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
}

/// NBD_REP_INFO / NBD_INFO_NAME or NBD_INFO_DESCRIPTION: the type and a string.
pub fn encode_info_string(out: &mut Vec<u8>, opt: u32, info_type: u16, s: &str) {
    let s = truncate_str(s, MAX_STRING_LEN);
    encode_option_reply_header(out, opt, REP_INFO, (2 + s.len()) as u32);
    out.extend_from_slice(&info_type.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// NBD_REP_INFO / NBD_INFO_BLOCK_SIZE: exactly 14 bytes of data.
pub fn encode_info_block_size(out: &mut Vec<u8>, opt: u32, minimum: u32, preferred: u32, maximum: u32) {
    encode_option_reply_header(out, opt, REP_INFO, 14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&minimum.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&maximum.to_be_bytes());
}

/// NBD_REP_META_CONTEXT: 32-bit context id, then the name.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, opt: u32, id: u32, name: &str) {
    encode_option_reply_header(out, opt, REP_META_CONTEXT, (4 + name.len()) as u32);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// An option reply header as a client receives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub opt: u32,
    pub reply_type: u32,
    pub len: u32,
}

pub fn decode_option_reply_header(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<OptionReplyHeader, BadMagic> {
    let magic = be64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(BadMagic(magic));
    }
    Ok(OptionReplyHeader { opt: be32(b, 8), reply_type: be32(b, 12), len: be32(b, 16) })
}

// ---- Requests --------------------------------------------------------------------------------

/// A request header, compact or extended. In the compact form `length` is 32 bits wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

/// Compact request: magic, flags, type, cookie, offset, 32-bit length (28 bytes).
pub fn decode_compact_request(b: &[u8; COMPACT_REQUEST_LEN]) -> Result<RequestHeader, BadMagic> {
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(u64::from(magic)));
    }
    Ok(RequestHeader {
        flags: be16(b, 4),
        typ: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        length: u64::from(be32(b, 24)),
    })
}

/// Extended request: magic, flags, type, cookie, offset, 64-bit length (32 bytes).
pub fn decode_extended_request(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<RequestHeader, BadMagic> {
    let magic = be32(b, 0);
    if magic != EXTENDED_REQUEST_MAGIC {
        return Err(BadMagic(u64::from(magic)));
    }
    Ok(RequestHeader {
        flags: be16(b, 4),
        typ: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        length: be64(b, 24),
    })
}

/// Client side: a compact request header (`length` is cut to 32 bits).
pub fn encode_compact_request(out: &mut Vec<u8>, h: &RequestHeader) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&h.flags.to_be_bytes());
    out.extend_from_slice(&h.typ.to_be_bytes());
    out.extend_from_slice(&h.cookie.to_be_bytes());
    out.extend_from_slice(&h.offset.to_be_bytes());
    out.extend_from_slice(&(h.length as u32).to_be_bytes());
}

/// Client side: an extended request header.
pub fn encode_extended_request(out: &mut Vec<u8>, h: &RequestHeader) {
    out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&h.flags.to_be_bytes());
    out.extend_from_slice(&h.typ.to_be_bytes());
    out.extend_from_slice(&h.cookie.to_be_bytes());
    out.extend_from_slice(&h.offset.to_be_bytes());
    out.extend_from_slice(&h.length.to_be_bytes());
}

// ---- Transmission replies --------------------------------------------------------------------

/// Simple reply: magic, error, cookie. READ data (on success) follows separately.
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Which chunk header to use: structured (20 bytes, 32-bit length) or extended (32 bytes,
/// echoing the request offset, 64-bit length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyForm {
    Structured,
    Extended,
}

/// A chunk header. `req_offset` is the offset of the request being answered (extended form
/// only). Structured payloads are bounded by the server's maximum payload, far below 4 GiB;
/// a longer one is a bug in the caller.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    form: ReplyForm,
    flags: u16,
    typ: u16,
    cookie: u64,
    req_offset: u64,
    payload_len: u64,
) {
    match form {
        ReplyForm::Structured => {
            let len = u32::try_from(payload_len);
            assert!(len.is_ok(), "structured chunk payload of {payload_len} bytes exceeds 32 bits");
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&typ.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&len.unwrap_or(u32::MAX).to_be_bytes());
        }
        ReplyForm::Extended => {
            out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&typ.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&req_offset.to_be_bytes());
            out.extend_from_slice(&payload_len.to_be_bytes());
        }
    }
}

/// NBD_REPLY_TYPE_NONE with DONE: success with nothing more to say.
pub fn encode_none_chunk(out: &mut Vec<u8>, form: ReplyForm, cookie: u64, req_offset: u64) {
    encode_chunk_header(out, form, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, req_offset, 0);
}

/// NBD_REPLY_TYPE_OFFSET_DATA header and offset; the `data_len` bytes of data follow
/// separately so they can be sent without copying.
#[allow(clippy::too_many_arguments)]
pub fn encode_offset_data_header(
    out: &mut Vec<u8>,
    form: ReplyForm,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    data_offset: u64,
    data_len: usize,
) {
    encode_chunk_header(out, form, flags, REPLY_TYPE_OFFSET_DATA, cookie, req_offset, 8 + data_len as u64);
    out.extend_from_slice(&data_offset.to_be_bytes());
}

/// NBD_REPLY_TYPE_OFFSET_HOLE: offset and a 32-bit nonzero size (in both forms).
#[allow(clippy::too_many_arguments)]
pub fn encode_offset_hole(
    out: &mut Vec<u8>,
    form: ReplyForm,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    hole_offset: u64,
    hole_len: u32,
) {
    debug_assert!(hole_len > 0);
    encode_chunk_header(out, form, flags, REPLY_TYPE_OFFSET_HOLE, cookie, req_offset, 12);
    out.extend_from_slice(&hole_offset.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
}

/// NBD_REPLY_TYPE_BLOCK_STATUS (structured form only): context id, then (length, status)
/// descriptors of 32 bits each.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    context_id: u32,
    descs: &[(u32, u32)],
) {
    let len = 4 + 8 * descs.len() as u64;
    encode_chunk_header(out, ReplyForm::Structured, flags, REPLY_TYPE_BLOCK_STATUS, cookie, 0, len);
    out.extend_from_slice(&context_id.to_be_bytes());
    for (l, s) in descs {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&s.to_be_bytes());
    }
}

/// NBD_REPLY_TYPE_BLOCK_STATUS_EXT (extended form only): context id, descriptor count, then
/// (length, status) descriptors of 64 bits each.
pub fn encode_block_status_ext(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    context_id: u32,
    descs: &[(u64, u64)],
) {
    let len = 8 + 16 * descs.len() as u64;
    encode_chunk_header(
        out,
        ReplyForm::Extended,
        flags,
        REPLY_TYPE_BLOCK_STATUS_EXT,
        cookie,
        req_offset,
        len,
    );
    out.extend_from_slice(&context_id.to_be_bytes());
    out.extend_from_slice(&(descs.len() as u32).to_be_bytes());
    for (l, s) in descs {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&s.to_be_bytes());
    }
}

/// NBD_REPLY_TYPE_ERROR: nonzero error, 16-bit message length, message (cut to 4096 bytes).
#[allow(clippy::too_many_arguments)]
pub fn encode_error_chunk(
    out: &mut Vec<u8>,
    form: ReplyForm,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    error: u32,
    msg: &str,
) {
    debug_assert!(error != 0);
    let msg = truncate_str(msg, MAX_STRING_LEN);
    encode_chunk_header(out, form, flags, REPLY_TYPE_ERROR, cookie, req_offset, 6 + msg.len() as u64);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// NBD_REPLY_TYPE_ERROR_OFFSET: as ERROR, followed by the offset (inside the request) where
/// the error happened.
#[allow(clippy::too_many_arguments)]
pub fn encode_error_offset_chunk(
    out: &mut Vec<u8>,
    form: ReplyForm,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    error: u32,
    msg: &str,
    error_offset: u64,
) {
    debug_assert!(error != 0);
    let msg = truncate_str(msg, MAX_STRING_LEN);
    encode_chunk_header(out, form, flags, REPLY_TYPE_ERROR_OFFSET, cookie, req_offset, 14 + msg.len() as u64);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
    out.extend_from_slice(&error_offset.to_be_bytes());
}

/// A simple reply as a client receives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

pub fn decode_simple_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, BadMagic> {
    let magic = be32(b, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(BadMagic(u64::from(magic)));
    }
    Ok(SimpleReply { error: be32(b, 4), cookie: be64(b, 8) })
}

/// A structured or extended chunk header as a client receives it (`offset` is 0 for the
/// structured form, which has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

pub fn decode_structured_header(b: &[u8; STRUCTURED_REPLY_HEADER_LEN]) -> Result<ChunkHeader, BadMagic> {
    let magic = be32(b, 0);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(BadMagic(u64::from(magic)));
    }
    Ok(ChunkHeader {
        flags: be16(b, 4),
        typ: be16(b, 6),
        cookie: be64(b, 8),
        offset: 0,
        len: u64::from(be32(b, 16)),
    })
}

pub fn decode_extended_reply_header(b: &[u8; EXTENDED_REPLY_HEADER_LEN]) -> Result<ChunkHeader, BadMagic> {
    let magic = be32(b, 0);
    if magic != EXTENDED_REPLY_MAGIC {
        return Err(BadMagic(u64::from(magic)));
    }
    Ok(ChunkHeader {
        flags: be16(b, 4),
        typ: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        len: be64(b, 24),
    })
}
