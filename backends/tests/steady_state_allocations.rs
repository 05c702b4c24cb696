//! The request path allocates nothing in steady state (issue: "no per-connection allocation on
//! the request path"): once a connection has warmed up, 4 KiB reads and writes against the
//! `memory` backend, and reads of a cached file, reuse what earlier requests left behind
//! (pooled payload buffers, recycled header bytes, queues that keep their capacity) instead of
//! calling the allocator. (Writes to a file, and reads the page cache does not hold, wait for
//! the kernel through the ring or the pool, with a completion allocated per request.)
//!
//! The server runs in this process, so a counting global allocator sees every allocation its
//! loop makes. The client side of the measured window encodes into a vector it only ever clears
//! and reads into fixed arrays, with plain `read_exact`/`write_all`, which allocate nothing, so
//! what the counter sees is the server's. This file is its own test binary: the counting
//! allocator and the one test in it do not disturb others.

use std::alloc::System;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blocksmith_backends::memory::MemoryFactory;
use blocksmith_backends::registry;
use blocksmith_core::config::Params;
use blocksmith_core::conn::ConnConfig;
use blocksmith_core::control::ServerControl;
use blocksmith_core::io::server::{serve, Listener, ServerConfig};
use blocksmith_core::layer::Stack;
use blocksmith_core::proto::client::{decode_greeting_start, decode_reply_magic, GreetingKind, ReplyMagic};
use blocksmith_core::proto::{
    decode_option_reply_header, decode_simple_reply, decode_structured_header, encode_compact_request,
    encode_info_request, encode_option_request, RequestHeader, CMD_READ, CMD_WRITE, COMPACT_REQUEST_LEN,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPTION_REPLY_HEADER_LEN, OPT_GO, OPT_STRUCTURED_REPLY,
    REPLY_FLAG_DONE, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REP_ACK, REP_FLAG_ERROR,
    STRUCTURED_REPLY_HEADER_LEN,
};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const DISK: u64 = 64 << 20;
const BLOCK: usize = 4096;
const DEPTH: usize = 8;
const WARM_UP: usize = 4_000;
const MEASURED: usize = 40_000;

/// Newstyle handshake with structured replies, then NBD_OPT_GO for the default export.
fn handshake(s: &mut UnixStream) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    let start: &[u8; 16] = greeting[..16].try_into().expect("16 bytes");
    assert_eq!(decode_greeting_start(start), Ok(GreetingKind::Newstyle));
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).expect("client flags");
    for (option, data) in [(OPT_STRUCTURED_REPLY, Vec::new()), (OPT_GO, encode_info_request("", &[]))] {
        let mut o = Vec::new();
        encode_option_request(&mut o, option, &data);
        s.write_all(&o).expect("option");
        loop {
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            s.read_exact(&mut h).expect("option reply");
            let reply = decode_option_reply_header(&h).expect("option reply magic");
            assert_eq!(reply.opt, option);
            let kind = reply.reply_type;
            assert_eq!(kind & REP_FLAG_ERROR, 0, "option {option} refused with reply type {kind:#x}");
            let mut body = vec![0u8; reply.len as usize];
            s.read_exact(&mut body).expect("option reply data");
            if kind == REP_ACK {
                break;
            }
        }
    }
}

/// A connection driving 4 KiB requests `DEPTH` deep, on buffers allocated once.
struct Client {
    s: UnixStream,
    /// Every third request a write (else reads only).
    writes: bool,
    /// What every write carries (and so what every read must find).
    pattern: [u8; BLOCK],
    /// The request being sent: header, and payload for a write. Cleared, never shrunk.
    request: Vec<u8>,
    reply: [u8; 8 + BLOCK],
    rng: u64,
    sent: u64,
}

impl Client {
    fn new(s: UnixStream, writes: bool) -> Client {
        let mut pattern = [0u8; BLOCK];
        for (i, b) in pattern.iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        let request = Vec::with_capacity(COMPACT_REQUEST_LEN + BLOCK);
        Client { s, writes, pattern, request, reply: [0; 8 + BLOCK], rng: 0x9E37_79B9_7F4A_7C15, sent: 0 }
    }

    fn offset(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % (DISK / BLOCK as u64)) * BLOCK as u64
    }

    /// Send one request: a read, or every third a write; `fill` writes the disk in order.
    fn send(&mut self, fill: bool) {
        let write = fill || (self.writes && self.sent % 3 == 0);
        let offset = if fill { self.sent * BLOCK as u64 % DISK } else { self.offset() };
        let typ = if write { CMD_WRITE } else { CMD_READ };
        // The command in the cookie's high half, so a reply says what it answers.
        let cookie = u64::from(typ) << 32 | self.sent;
        self.request.clear();
        let header = RequestHeader { flags: 0, typ, cookie, offset, length: BLOCK as u64 };
        encode_compact_request(&mut self.request, &header);
        if write {
            self.request.extend_from_slice(&self.pattern);
        }
        self.s.write_all(&self.request).expect("send request");
        self.sent += 1;
    }

    /// Read one whole reply and check it succeeded.
    fn receive(&mut self) {
        let mut header = [0u8; STRUCTURED_REPLY_HEADER_LEN];
        self.s.read_exact(&mut header[..4]).expect("reply magic");
        let magic = decode_reply_magic(header[..4].try_into().expect("4 bytes")).expect("reply magic");
        let header_len = magic.header_len();
        self.s.read_exact(&mut header[4..header_len]).expect("reply header");
        let header = &header[..header_len];
        match magic {
            ReplyMagic::Simple => {
                let reply = decode_simple_reply(header.try_into().expect("simple reply")).expect("magic");
                assert_eq!(reply.error, 0, "request failed");
                // Reads negotiated structured replies, so a simple reply answers a write.
                assert_eq!(reply.cookie >> 32, u64::from(CMD_WRITE));
            }
            ReplyMagic::Structured => {
                let chunk =
                    decode_structured_header(header.try_into().expect("chunk header")).expect("magic");
                assert_eq!(chunk.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE, "one chunk per reply here");
                let len = chunk.len as usize;
                match chunk.typ {
                    REPLY_TYPE_NONE => assert_eq!(len, 0),
                    REPLY_TYPE_OFFSET_DATA => assert_eq!(len, 8 + BLOCK),
                    other => panic!("unexpected reply chunk type {other}"),
                }
                self.s.read_exact(&mut self.reply[..len]).expect("reply data");
                if chunk.typ == REPLY_TYPE_OFFSET_DATA {
                    // Every block was written with the same pattern before the window.
                    assert_eq!(&self.reply[8..], &self.pattern[..], "read data");
                }
            }
            ReplyMagic::Extended => panic!("an extended reply without extended headers"),
        }
    }

    /// Keep `DEPTH` requests in flight for `n` replies.
    fn run(&mut self, n: usize, fill: bool) {
        for _ in 0..DEPTH {
            self.send(fill);
        }
        for i in 0..n {
            self.receive();
            if i + DEPTH < n {
                self.send(fill);
            }
        }
    }
}

/// Serve `stack` in this process, fill its disk, warm up, then count the allocations of
/// `MEASURED` requests. Returns allocations and reallocations.
fn count_allocations(name: &str, stack: Stack, writes: bool) -> (usize, usize) {
    let path = PathBuf::from(format!("/tmp/blocksmith-alloc-test-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let control = ServerControl::new();
    let cfg = ServerConfig {
        conn: ConnConfig::default(),
        loops: 1,
        io_threads: 1,
        memory_limit: 256 << 20,
        readonly: false,
        tls: None,
        reply_hold: blocksmith_core::limits::DEFAULT_REPLY_HOLD,
    };
    let c = control.clone();
    let server = std::thread::spawn(move || serve(cfg, stack, vec![Listener::Unix(listener)], c));

    let mut s = UnixStream::connect(&path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    handshake(&mut s);
    let mut client = Client::new(s, writes);
    // Fill the disk (so reads find data, not holes), then warm up the workload.
    client.run((DISK / BLOCK as u64) as usize, true);
    client.run(WARM_UP, false);

    let region = Region::new(GLOBAL);
    client.run(MEASURED, false);
    let change = region.change();

    control.shutdown();
    drop(client);
    server.join().expect("server thread").expect("server");
    let _ = std::fs::remove_file(&path);
    eprintln!(
        "{name}: {MEASURED} requests, {} allocations, {} reallocations",
        change.allocations, change.reallocations
    );
    (change.allocations, change.reallocations)
}

/// Timers and the odd queue growing may allocate now and then; one allocation per request (or
/// even per hundred) is what this guards against.
fn assert_allocates_nothing_per_request(name: &str, (allocations, reallocations): (usize, usize)) {
    assert!(
        (allocations + reallocations) * 100 < MEASURED,
        "{name}: the request path allocates: {allocations} allocations and {reallocations} \
         reallocations over {MEASURED} requests"
    );
}

// One test, so that nothing else runs while the global counter is read.
#[test]
fn requests_in_steady_state_allocate_nothing() {
    let memory = Stack::new(("memory".into(), Arc::new(MemoryFactory::new(DISK))), vec![]);
    assert_allocates_nothing_per_request("memory", count_allocations("memory", memory, true));

    // Under the build directory, whose file system (unlike a tmpfs /tmp with swap) serves
    // cached reads on the loop: with RWF_NOWAIT, or plainly when it lives in memory.
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("blocksmith-alloc-test-{}.img", std::process::id()));
    std::fs::File::create(&file).and_then(|f| f.set_len(DISK)).expect("create the file");
    let spec = registry().iter().find(|b| b.name == "file").expect("the file backend");
    let mut params = Params::new();
    params.push("file", file.to_str().expect("a UTF-8 temporary path"));
    let factory = (spec.make)(&mut params).expect("open the file");
    let counted = count_allocations("file", Stack::new(("file".into(), factory), vec![]), false);
    let _ = std::fs::remove_file(&file);
    assert_allocates_nothing_per_request("file", counted);
}
