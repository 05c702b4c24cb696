//! A deliberately simple raw NBD client for protocol corner cases that libnbd will not produce.
//! Every read has a timeout, so a misbehaving server fails the test instead of hanging it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CFLAG_FIXED_NEWSTYLE: u32 = 1;
pub const CFLAG_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;

pub const EINVAL: u32 = 22;
pub const EPERM: u32 = 1;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(d),
            Stream::Tcp(s) => s.set_read_timeout(d),
        }
    }

    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(d),
            Stream::Tcp(s) => s.set_write_timeout(d),
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub opt: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

/// One structured or extended reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

pub struct Conn {
    pub s: Stream,
}

impl Conn {
    pub fn new(s: Stream) -> Conn {
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("set_read_timeout");
        s.set_write_timeout(Some(IO_TIMEOUT)).expect("set_write_timeout");
        Conn { s }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap_or_else(|e| panic!("raw client: write failed: {e}"));
    }

    /// Write, reporting errors instead of panicking (for tests where the server may close).
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.s.read_exact(&mut buf).unwrap_or_else(|e| panic!("raw client: reading {n} bytes failed: {e}"));
        buf
    }

    pub fn try_recv(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.s.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    pub fn shutdown_write(&self) {
        let _ = self.s.shutdown(Shutdown::Write);
    }

    /// Read the newstyle greeting; returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let m = self.u64();
        assert_eq!(m, NBDMAGIC, "bad NBDMAGIC in greeting: {m:#x}");
        let m = self.u64();
        assert_eq!(m, IHAVEOPT, "bad IHAVEOPT in greeting (is the server in oldstyle mode?): {m:#x}");
        self.u16()
    }

    pub fn client_flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes());
    }

    /// Greeting plus client flags FIXED_NEWSTYLE|NO_ZEROES.
    pub fn start(&mut self) {
        let f = self.greeting();
        assert!(f & FLAG_FIXED_NEWSTYLE != 0, "server does not offer fixed newstyle: {f:#x}");
        assert!(f & FLAG_NO_ZEROES != 0, "server does not offer NO_ZEROES: {f:#x}");
        self.client_flags(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    }

    pub fn send_opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let m = self.u64();
        assert_eq!(m, OPT_REPLY_MAGIC, "bad option reply magic {m:#x}");
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32();
        assert!(len <= 64 << 20, "absurd option reply length {len}");
        let data = self.recv(len as usize);
        OptReply { opt, typ, data }
    }

    /// INFO/GO data: name, then info requests.
    pub fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    /// Send GO for `name` and read replies up to the ACK; returns (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        self.send_opt(OPT_GO, &Conn::info_data(name, &[]));
        let mut export = None;
        loop {
            let r = self.opt_reply();
            assert_eq!(r.opt, OPT_GO, "GO reply echoes option {}", r.opt);
            match r.typ {
                REP_INFO => {
                    assert!(r.data.len() >= 2, "short NBD_REP_INFO");
                    let ty = u16::from_be_bytes([r.data[0], r.data[1]]);
                    if ty == INFO_EXPORT {
                        assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT must be 12 bytes");
                        let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                        export = Some((size, flags));
                    }
                }
                REP_ACK => {
                    assert!(r.data.is_empty(), "ACK with data");
                    return export.expect("GO succeeded without NBD_INFO_EXPORT");
                }
                t => panic!("GO failed with reply type {t:#x}: {:?}", String::from_utf8_lossy(&r.data)),
            }
        }
    }

    /// Full handshake to transmission with compact headers and simple replies.
    pub fn handshake(&mut self) -> (u64, u16) {
        self.start();
        self.go("")
    }

    pub fn request(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&Conn::request_bytes(flags, typ, cookie, offset, len));
    }

    pub fn request_bytes(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    pub fn ext_request(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) {
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    /// Read a simple reply header: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let m = self.u32();
        assert_eq!(m, SIMPLE_REPLY_MAGIC, "expected a simple reply, got magic {m:#x}");
        let err = self.u32();
        let cookie = self.u64();
        (err, cookie)
    }

    /// Read a structured reply chunk (compact headers).
    pub fn structured_chunk(&mut self) -> Chunk {
        let m = self.u32();
        assert_eq!(m, STRUCTURED_REPLY_MAGIC, "expected a structured reply chunk, got magic {m:#x}");
        let flags = self.u16();
        let typ = self.u16();
        let cookie = self.u64();
        let len = self.u32();
        let payload = self.recv(len as usize);
        Chunk { flags, typ, cookie, payload }
    }

    /// Read an extended reply chunk; returns the chunk and the echoed offset.
    pub fn ext_chunk(&mut self) -> (Chunk, u64) {
        let m = self.u32();
        assert_eq!(m, EXT_REPLY_MAGIC, "expected an extended reply, got magic {m:#x}");
        let flags = self.u16();
        let typ = self.u16();
        let cookie = self.u64();
        let offset = self.u64();
        let len = self.u64();
        assert!(len <= 64 << 20, "absurd extended payload length {len}");
        let payload = self.recv(len as usize);
        (Chunk { flags, typ, cookie, payload }, offset)
    }

    /// Read until EOF (a reset counts as EOF) and return what arrived, failing if the server
    /// keeps the connection open longer than `timeout`.
    pub fn expect_closed(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "server kept the connection open for more than {timeout:?} (received {} bytes)",
                got.len()
            );
            self.s.set_read_timeout(Some(left.min(Duration::from_millis(200)))).unwrap();
            match self.s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted) => {}
                Err(_) => break, // ECONNRESET and friends: closed
            }
        }
        self.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        got
    }
}

/// Parse a simple reply from a byte buffer at `pos`; returns (error, cookie, new pos).
pub fn parse_simple_reply(buf: &[u8], pos: usize) -> Option<(u32, u64, usize)> {
    if buf.len() < pos + 16 {
        return None;
    }
    let magic = u32::from_be_bytes(buf[pos..pos + 4].try_into().unwrap());
    assert_eq!(magic, SIMPLE_REPLY_MAGIC, "bad simple reply magic {magic:#x} at byte {pos}");
    let err = u32::from_be_bytes(buf[pos + 4..pos + 8].try_into().unwrap());
    let cookie = u64::from_be_bytes(buf[pos + 8..pos + 16].try_into().unwrap());
    Some((err, cookie, pos + 16))
}
