//! Helpers shared by the benchmarks in `benches/`: a scripted client that takes a sans-IO
//! [`Conn`] through the handshake, so the benches measure steady-state request handling only.

use std::io::IoSlice;
use std::time::Instant;

use blocksmith_core::budget::Budget;
use blocksmith_core::conn::{Conn, ConnConfig, Event};
use blocksmith_core::layer::{ExportInfo, Support};
use blocksmith_core::proto::*;

/// Move everything the connection wants to send into `sink`; returns the byte count.
pub fn drain_output(conn: &mut Conn, sink: &mut Vec<u8>) -> usize {
    let mut total = 0;
    while conn.has_output() {
        let mut iov = [IoSlice::new(&[]); 16];
        let n = conn.fill_iovecs(&mut iov);
        let mut written = 0;
        for s in &iov[..n] {
            sink.extend_from_slice(s);
            written += s.len();
        }
        conn.handle_written(written);
        total += written;
    }
    total
}

/// Feed bytes to the connection through its own read buffer, as the driver does.
pub fn feed(conn: &mut Conn, mut bytes: &[u8], now: Instant) {
    while !bytes.is_empty() {
        let buf = conn.read_buf();
        let n = buf.len().min(bytes.len());
        assert!(n > 0, "connection stopped reading");
        buf[..n].copy_from_slice(&bytes[..n]);
        conn.handle_read(n, now);
        bytes = &bytes[n..];
    }
}

/// A writable 1 GiB export.
pub fn export_info() -> ExportInfo {
    let mut info = ExportInfo::read_only(1 << 30);
    info.can_write = true;
    info.can_flush = true;
    info.fua = Support::Native;
    info.zero = Support::Native;
    info.can_extents = true;
    info
}

/// A connection in transmission, with structured replies if `structured`.
pub fn connected(structured: bool) -> Conn {
    let now = Instant::now();
    let mut conn = Conn::new(ConnConfig::default(), Budget::new(1 << 30), now);
    let mut sink = Vec::new();
    drain_output(&mut conn, &mut sink);
    let mut c = Vec::new();
    c.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    if structured {
        encode_option_request(&mut c, OPT_STRUCTURED_REPLY, &[]);
    }
    encode_option_request(&mut c, OPT_GO, &encode_info_request("", &[]));
    feed(&mut conn, &c, now);
    while let Some(ev) = conn.poll_event() {
        if let Event::OpenExport { .. } = ev {
            conn.handle_export(Ok(export_info()), now);
        }
    }
    drain_output(&mut conn, &mut sink);
    assert!(conn.in_transmission(), "handshake did not complete");
    conn
}

/// A compact request header.
pub fn request(typ: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::new();
    encode_compact_request(
        &mut out,
        &RequestHeader { flags, typ, cookie, offset, length: u64::from(length) },
    );
    out
}
