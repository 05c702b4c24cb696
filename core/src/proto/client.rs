//! Client-side decoders: the server's half of the protocol as a client (the `nbd` backend
//! talking to an upstream server) reads it. The fixed-size transmission headers already have
//! decoders in [`super::codec`]; this adds the greeting, the option reply payloads and the
//! structured chunk payloads.
//!
//! Everything the server sends is untrusted: every length is checked against the bytes that are
//! actually present before anything is sliced or allocated, and nothing here panics on any
//! input.

use std::fmt;

use super::codec::BadMagic;
use super::consts::*;

/// A reply payload that breaks the protocol. The caller should drop the connection: after a
/// malformed reply nothing guarantees the stream is still in sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn malformed(msg: impl Into<String>) -> Malformed {
    Malformed(msg.into())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A string from the server: lossy UTF-8 (a bad byte in a message must not fail a request that
/// otherwise has a perfectly good errno), cut to the spec's 4096 bytes.
pub fn lossy_string(b: &[u8]) -> String {
    let b = &b[..b.len().min(MAX_STRING_LEN)];
    String::from_utf8_lossy(b).into_owned()
}

// ---- Greeting --------------------------------------------------------------------------------

/// What the first 16 bytes from a server say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GreetingKind {
    /// `IHAVEOPT` follows `NBDMAGIC`: 2 bytes of handshake flags come next.
    Newstyle,
    /// The oldstyle magic: 136 more bytes (size, flags, zeroes) complete the handshake.
    Oldstyle,
}

/// Bytes that follow the first 16 of an oldstyle greeting.
pub const OLDSTYLE_REST_LEN: usize = OLDSTYLE_GREETING_LEN - 16;

pub fn decode_greeting_start(b: &[u8; 16]) -> Result<GreetingKind, BadMagic> {
    let magic = be64(&b[0..8]);
    if magic != NBDMAGIC {
        return Err(BadMagic(magic));
    }
    match be64(&b[8..16]) {
        IHAVEOPT => Ok(GreetingKind::Newstyle),
        OLDSTYLE_MAGIC => Ok(GreetingKind::Oldstyle),
        other => Err(BadMagic(other)),
    }
}

/// The rest of an oldstyle greeting: export size and the 32-bit flags word (transmission flags
/// in its low 16 bits).
pub fn decode_oldstyle_rest(b: &[u8; OLDSTYLE_REST_LEN]) -> (u64, u32) {
    (be64(&b[0..8]), be32(&b[8..12]))
}

/// Bytes of the successful NBD_OPT_EXPORT_NAME answer before the optional 124 zeroes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;

/// The NBD_OPT_EXPORT_NAME answer: export size and transmission flags.
pub fn decode_export_name_reply(b: &[u8; EXPORT_NAME_REPLY_LEN]) -> (u64, u16) {
    (be64(&b[0..8]), be16(&b[8..10]))
}

// ---- Option replies --------------------------------------------------------------------------

/// One NBD_REP_INFO item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoItem {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An info type this client does not know; clients must ignore it.
    Unknown(u16),
}

/// Parse the data of an NBD_REP_INFO reply. The fixed-size items must have exactly their size
/// (libnbd is as strict).
pub fn parse_info_reply(data: &[u8]) -> Result<InfoItem, Malformed> {
    if data.len() < 2 {
        return Err(malformed(format!("NBD_REP_INFO of {} bytes has no info type", data.len())));
    }
    let typ = be16(data);
    let rest = &data[2..];
    match typ {
        INFO_EXPORT => {
            if rest.len() != 10 {
                return Err(malformed(format!("NBD_INFO_EXPORT with {} bytes, not 12", data.len())));
            }
            Ok(InfoItem::Export { size: be64(&rest[0..8]), flags: be16(&rest[8..10]) })
        }
        INFO_BLOCK_SIZE => {
            if rest.len() != 12 {
                return Err(malformed(format!("NBD_INFO_BLOCK_SIZE with {} bytes, not 14", data.len())));
            }
            Ok(InfoItem::BlockSize {
                minimum: be32(&rest[0..4]),
                preferred: be32(&rest[4..8]),
                maximum: be32(&rest[8..12]),
            })
        }
        INFO_NAME => Ok(InfoItem::Name(lossy_string(rest))),
        INFO_DESCRIPTION => Ok(InfoItem::Description(lossy_string(rest))),
        other => Ok(InfoItem::Unknown(other)),
    }
}

/// Parse the data of an NBD_REP_META_CONTEXT reply: context id and name.
pub fn parse_meta_context_reply(data: &[u8]) -> Result<(u32, String), Malformed> {
    if data.len() < 4 {
        return Err(malformed(format!("NBD_REP_META_CONTEXT of {} bytes", data.len())));
    }
    if data.len() - 4 > MAX_STRING_LEN {
        return Err(malformed("NBD_REP_META_CONTEXT name longer than 4096 bytes"));
    }
    Ok((be32(data), lossy_string(&data[4..])))
}

/// Parse the data of an NBD_REP_SERVER reply: export name and optional description.
pub fn parse_rep_server(data: &[u8]) -> Result<(String, Option<String>), Malformed> {
    if data.len() < 4 {
        return Err(malformed(format!("NBD_REP_SERVER of {} bytes", data.len())));
    }
    let n = be32(data) as usize;
    if n > data.len() - 4 {
        return Err(malformed(format!("NBD_REP_SERVER name of {n} bytes overruns the reply")));
    }
    let name = lossy_string(&data[4..4 + n]);
    let desc = &data[4 + n..];
    Ok((name, if desc.is_empty() { None } else { Some(lossy_string(desc)) }))
}

/// The spec's name of an option reply type, for messages (`NBD_REP_ERR_UNKNOWN`...).
pub fn reply_type_name(reply_type: u32) -> String {
    let s = match reply_type {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        other => return format!("reply type {other:#x}"),
    };
    s.to_string()
}

// ---- Transmission replies --------------------------------------------------------------------

/// Which reply header starts with these 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyMagic {
    /// 16-byte simple reply.
    Simple,
    /// 20-byte structured chunk header.
    Structured,
    /// 32-byte extended chunk header.
    Extended,
}

pub fn decode_reply_magic(b: &[u8; 4]) -> Result<ReplyMagic, BadMagic> {
    match be32(b) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyMagic::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyMagic::Structured),
        EXTENDED_REPLY_MAGIC => Ok(ReplyMagic::Extended),
        other => Err(BadMagic(u64::from(other))),
    }
}

impl ReplyMagic {
    /// Length of the whole header this magic starts.
    pub fn header_len(self) -> usize {
        match self {
            ReplyMagic::Simple => SIMPLE_REPLY_LEN,
            ReplyMagic::Structured => STRUCTURED_REPLY_HEADER_LEN,
            ReplyMagic::Extended => EXTENDED_REPLY_HEADER_LEN,
        }
    }
}

/// An error chunk (NBD_REPLY_TYPE_ERROR, ERROR_OFFSET, or an unknown type with the error bit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorChunk {
    /// As sent; the spec forbids 0, and callers should treat 0 as EIO rather than success.
    pub error: u32,
    pub message: String,
    /// ERROR_OFFSET only: where in the request the error happened.
    pub offset: Option<u64>,
}

/// Parse an error chunk's payload: 32-bit error, 16-bit message length, message, and for
/// ERROR_OFFSET a 64-bit offset after it. Unknown error types carry the same first 6 bytes; any
/// bytes after what the type defines are ignored, as the spec asks of clients for unknown types.
pub fn parse_error_chunk(typ: u16, payload: &[u8]) -> Result<ErrorChunk, Malformed> {
    if payload.len() < 6 {
        return Err(malformed(format!("error chunk of {} bytes (at least 6 needed)", payload.len())));
    }
    let error = be32(payload);
    let msg_len = usize::from(be16(&payload[4..6]));
    let rest = &payload[6..];
    if msg_len > rest.len() {
        return Err(malformed(format!(
            "error chunk message of {msg_len} bytes overruns the {}-byte payload",
            payload.len()
        )));
    }
    let message = lossy_string(&rest[..msg_len]);
    let after = &rest[msg_len..];
    let offset = match typ {
        REPLY_TYPE_ERROR_OFFSET => {
            if after.len() != 8 {
                return Err(malformed(format!(
                    "NBD_REPLY_TYPE_ERROR_OFFSET with {} bytes after the message, not 8",
                    after.len()
                )));
            }
            Some(be64(after))
        }
        REPLY_TYPE_ERROR if !after.is_empty() => {
            return Err(malformed(format!("NBD_REPLY_TYPE_ERROR with {} trailing bytes", after.len())));
        }
        _ => None,
    };
    Ok(ErrorChunk { error, message, offset })
}

/// Parse an OFFSET_HOLE payload: offset and a nonzero 32-bit length.
pub fn parse_offset_hole(payload: &[u8]) -> Result<(u64, u32), Malformed> {
    if payload.len() != 12 {
        return Err(malformed(format!("NBD_REPLY_TYPE_OFFSET_HOLE of {} bytes, not 12", payload.len())));
    }
    let len = be32(&payload[8..12]);
    if len == 0 {
        return Err(malformed("NBD_REPLY_TYPE_OFFSET_HOLE of length 0"));
    }
    Ok((be64(&payload[0..8]), len))
}

/// The offset at the start of an OFFSET_DATA payload.
pub fn decode_data_offset(b: &[u8; 8]) -> u64 {
    u64::from_be_bytes(*b)
}

/// A BLOCK_STATUS payload (32-bit form): context id and (length, flags) descriptors. The vector
/// is sized from the bytes present, never from a declared count.
pub fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>), Malformed> {
    if payload.len() < 12 || payload.len() % 8 != 4 {
        return Err(malformed(format!(
            "NBD_REPLY_TYPE_BLOCK_STATUS of {} bytes (must be 4 + 8n, n >= 1)",
            payload.len()
        )));
    }
    let id = be32(payload);
    let descs = payload[4..].chunks_exact(8).map(|d| (be32(&d[0..4]), be32(&d[4..8]))).collect();
    Ok((id, descs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::codec::*;

    #[test]
    fn greetings() {
        let mut g = Vec::new();
        encode_newstyle_greeting(&mut g, 3);
        let start: [u8; 16] = g[..16].try_into().unwrap();
        assert_eq!(decode_greeting_start(&start), Ok(GreetingKind::Newstyle));
        let mut o = Vec::new();
        encode_oldstyle_greeting(&mut o, 1 << 20, 0x0003);
        let start: [u8; 16] = o[..16].try_into().unwrap();
        assert_eq!(decode_greeting_start(&start), Ok(GreetingKind::Oldstyle));
        let rest: [u8; OLDSTYLE_REST_LEN] = o[16..].try_into().unwrap();
        assert_eq!(decode_oldstyle_rest(&rest), (1 << 20, 3));
        assert!(decode_greeting_start(&[0u8; 16]).is_err());
        let mut r = Vec::new();
        encode_export_name_reply(&mut r, 4096, 0x1ed, false);
        assert_eq!(decode_export_name_reply(&r[..10].try_into().unwrap()), (4096, 0x1ed));
    }

    #[test]
    fn option_payloads() {
        // Round trips through the server-side encoders, header stripped.
        let mut v = Vec::new();
        encode_info_export(&mut v, OPT_GO, 1234, 0x0d);
        assert_eq!(parse_info_reply(&v[20..]), Ok(InfoItem::Export { size: 1234, flags: 0x0d }));
        v.clear();
        encode_info_block_size(&mut v, OPT_GO, 1, 4096, 1 << 25);
        assert_eq!(
            parse_info_reply(&v[20..]),
            Ok(InfoItem::BlockSize { minimum: 1, preferred: 4096, maximum: 1 << 25 })
        );
        v.clear();
        encode_info_string(&mut v, OPT_GO, INFO_DESCRIPTION, "a disk");
        assert_eq!(parse_info_reply(&v[20..]), Ok(InfoItem::Description("a disk".into())));
        assert_eq!(parse_info_reply(&[0, 9, 1]), Ok(InfoItem::Unknown(9)));
        assert!(parse_info_reply(&[0]).is_err());
        assert!(parse_info_reply(&[0, 0, 1, 2]).is_err());
        assert!(parse_info_reply(&[0, 3, 0, 0, 0, 1]).is_err());
        v.clear();
        encode_rep_meta_context(&mut v, OPT_SET_META_CONTEXT, 7, BASE_ALLOCATION);
        assert_eq!(parse_meta_context_reply(&v[20..]), Ok((7, BASE_ALLOCATION.to_string())));
        assert!(parse_meta_context_reply(&[0, 0]).is_err());
        v.clear();
        encode_rep_server(&mut v, OPT_LIST, "disk", Some("desc"));
        assert_eq!(parse_rep_server(&v[20..]), Ok(("disk".into(), Some("desc".into()))));
        assert!(parse_rep_server(&[0, 0, 0, 9, b'a']).is_err());
        assert_eq!(reply_type_name(REP_ERR_UNKNOWN), "NBD_REP_ERR_UNKNOWN");
    }

    #[test]
    fn chunk_payloads() {
        let mut v = Vec::new();
        encode_error_chunk(&mut v, ReplyForm::Structured, REPLY_FLAG_DONE, 1, 0, ENOSPC, "full");
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR, &v[20..]),
            Ok(ErrorChunk { error: ENOSPC, message: "full".into(), offset: None })
        );
        v.clear();
        encode_error_offset_chunk(&mut v, ReplyForm::Structured, 0, 1, 0, EIO, "bad", 512);
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &v[20..]),
            Ok(ErrorChunk { error: EIO, message: "bad".into(), offset: Some(512) })
        );
        // Message overrunning, too short, trailing junk on ERROR.
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0]).is_err());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 0, 1]).is_err());
        // Unknown error types: same prefix, extra bytes ignored.
        let e = parse_error_chunk(0x8003, &[0, 0, 0, 5, 0, 1, b'x', 1, 2]).unwrap();
        assert_eq!((e.error, e.message.as_str(), e.offset), (EIO, "x", None));
        // A message that is not UTF-8 still yields the errno.
        assert_eq!(parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 1, 0xff]).unwrap().error, EIO);
        v.clear();
        encode_offset_hole(&mut v, ReplyForm::Structured, 0, 1, 0, 4096, 512);
        assert_eq!(parse_offset_hole(&v[20..]), Ok((4096, 512)));
        assert!(parse_offset_hole(&[0; 12]).is_err());
        assert!(parse_offset_hole(&[0; 11]).is_err());
        v.clear();
        encode_block_status(&mut v, REPLY_FLAG_DONE, 1, 3, &[(4096, 3), (512, 0)]);
        assert_eq!(parse_block_status(&v[20..]), Ok((3, vec![(4096, 3), (512, 0)])));
        assert!(parse_block_status(&[0; 4]).is_err());
        assert!(parse_block_status(&[0; 13]).is_err());
        assert_eq!(decode_reply_magic(&SIMPLE_REPLY_MAGIC.to_be_bytes()), Ok(ReplyMagic::Simple));
        assert_eq!(decode_reply_magic(&STRUCTURED_REPLY_MAGIC.to_be_bytes()).unwrap().header_len(), 20);
        assert!(decode_reply_magic(&[1, 2, 3, 4]).is_err());
        assert_eq!(decode_data_offset(&7u64.to_be_bytes()), 7);
    }
}
