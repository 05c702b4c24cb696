//! One client connection as a sans-IO state machine (quinn-proto's shape): bytes and `now` go
//! in, events and bytes come out. It never touches a socket, a clock or a layer; the driver in
//! `io::server` does that. Phases: greeting → option haggling → transmission → closing.
//!
//! Driver contract:
//! - Read from the socket into [`Conn::read_buf`] (empty when the connection does not want
//!   input), then call [`Conn::handle_read`] with the count (0 = EOF).
//! - Write what [`Conn::fill_iovecs`] offers, then report it with [`Conn::handle_written`].
//! - Drain [`Conn::poll_event`] after every call: open an export, list exports, or run a request
//!   through the layer stack and hand back the result with [`Conn::handle_result`].
//! - Call [`Conn::process`] when something it was waiting on may have changed (budget freed,
//!   a request completed); it decodes at most `REQUESTS_PER_TURN` requests per call and says
//!   whether more buffered input remains, for fairness between connections on one loop.
//! - Arm a timer for [`Conn::poll_deadline`] and call [`Conn::handle_timeout`] when it fires.
//! - Close the socket when [`Conn::is_aborted`], or when [`Conn::is_finished`] and no output
//!   remains.
//! - On `Event::StartTls` (the ACK to NBD_OPT_STARTTLS is queued and the connection reads
//!   nothing more): write the queued output as plaintext, then put a TLS session between the
//!   socket and the connection and call [`Conn::handle_tls_started`]. From then on
//!   `read_buf`/`fill_iovecs` carry the session's plaintext.
//!
//! Helpers beyond that contract: [`Conn::wants_process`] (buffered input could be decoded now,
//! e.g. after `handle_read` stopped at `REQUESTS_PER_TURN`), [`Conn::waiting_for_budget`] (call
//! `process` again once budget is freed), [`Conn::abort_reason`] (for the log line).
//! `handle_export`, `handle_export_list` and `handle_written` (when the output drops back under
//! its cap) decode pipelined input themselves, so drain events after them too.

mod options;
mod output;
mod transmission;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::{Duration, Instant};

use crate::budget::{Budget, Place};
use crate::error::NbdError;
use crate::layer::registry::ExportDesc;
use crate::layer::{ExportInfo, Extents, Flags};
use crate::limits;
use crate::proto::{self, InfoRequest};
use crate::tls::TlsPolicy;

use output::OutQueue;

/// Per-connection settings, fixed for the server's life (from the command line).
#[derive(Clone, Debug)]
pub struct ConnConfig {
    /// Oldstyle handshake (`-o`): no options; the default export is opened at once.
    pub oldstyle: bool,
    /// Largest READ/WRITE payload (`--max-request`).
    pub max_request: u32,
    pub max_option_bytes: u32,
    pub max_options: u32,
    pub max_in_flight: usize,
    pub max_queued_reply_bytes: usize,
    /// Handshake deadline (`--timeout`); `None` = no deadline.
    pub handshake_timeout: Option<Duration>,
    /// `--no-sr`: refuse NBD_OPT_STRUCTURED_REPLY (and so meta contexts and DF).
    pub structured_replies: bool,
    /// `--no-mc`: refuse meta-context negotiation.
    pub meta_contexts: bool,
    /// Offer NBD_OPT_EXTENDED_HEADERS.
    pub extended_headers: bool,
    /// `--mask-handshake`: handshake flags offered (bit 0 FIXED_NEWSTYLE, bit 1 NO_ZEROES).
    pub handshake_flags: u16,
    /// `--tls`: NOTLS, SELECTIVETLS or FORCEDTLS (checklist §F). The driver must be able to
    /// start a session whenever this is not `Off`.
    pub tls: TlsPolicy,
    /// Budget reserved for each TLS session from STARTTLS until the connection is dropped
    /// (`tls::SESSION_BUDGET_BYTES`).
    pub tls_session_budget: usize,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            oldstyle: false,
            max_request: limits::MAX_REQUEST_BYTES,
            max_option_bytes: limits::MAX_OPTION_BYTES,
            max_options: limits::MAX_OPTIONS_PER_CONN,
            max_in_flight: limits::MAX_IN_FLIGHT_PER_CONN,
            max_queued_reply_bytes: limits::MAX_QUEUED_REPLY_BYTES,
            handshake_timeout: Some(limits::HANDSHAKE_TIMEOUT),
            structured_replies: true,
            meta_contexts: true,
            extended_headers: true,
            handshake_flags: 3,
            tls: TlsPolicy::Off,
            tls_session_budget: crate::tls::SESSION_BUDGET_BYTES,
        }
    }
}

/// Index of a request in the connection's in-flight table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub u32);

/// A request for the layer stack, already checked against the protocol (known command, flags
/// valid for the command and negotiated, payload within limits). Range and capability checks
/// are the shim's job.
#[derive(Debug)]
pub struct Request {
    pub id: RequestId,
    pub op: Op,
    pub offset: u64,
    pub flags: Flags,
}

#[derive(Debug)]
pub enum Op {
    /// Read `count` bytes (already reserved from the budget by the connection), answered with
    /// [`Outcome::Data`] or [`Outcome::Lent`].
    Read {
        count: usize,
    },
    Write {
        data: Vec<u8>,
    },
    Flush,
    Trim {
        count: u64,
    },
    Zero {
        count: u64,
    },
    BlockStatus {
        count: u64,
    },
    Cache {
        count: u64,
    },
}

/// A completed request's result, handed back with [`Conn::handle_result`].
#[derive(Debug)]
pub enum Outcome {
    Done,
    Data(Vec<u8>),
    /// READ data lent by the layer, queued without copying.
    Lent(crate::layer::LentPieces),
    Extents(Extents),
}

/// What the connection needs the driver to do.
#[derive(Debug)]
pub enum Event {
    /// Open the named export. `probe` = for NBD_OPT_INFO (close it after answering); otherwise
    /// it is the export the client will use (GO, EXPORT_NAME, oldstyle). Answer with
    /// [`Conn::handle_export`].
    OpenExport { name: String, probe: bool },
    /// Answer with [`Conn::handle_export_list`].
    ListExports,
    /// Run through the layer stack; answer with [`Conn::handle_result`].
    Request(Request),
    /// NBD_OPT_STARTTLS was accepted and its ACK queued. Flush the output as plaintext, then
    /// start the TLS session and call [`Conn::handle_tls_started`]; nothing is read before.
    StartTls,
}

/// The client broke the protocol; the connection is dropped and this is logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

/// The state machine. See the module docs for the driver contract.
pub struct Conn {
    cfg: ConnConfig,
    budget: Budget,
    phase: Phase,
    /// Header bytes read but not yet decoded.
    inbuf: InBuf,
    /// What the bytes after the last decoded header belong to.
    instate: InState,
    /// Where the last `read_buf` pointed, so `handle_read` knows what was filled.
    read_target: ReadTarget,
    out: OutQueue,
    events: VecDeque<Event>,

    // ---- negotiation ----
    /// Handshake flags we advertised.
    handshake_flags: u16,
    /// The client set C_NO_ZEROES.
    no_zeroes: bool,
    /// The client set C_FIXED_NEWSTYLE, without which TLS cannot be negotiated (§F item 71).
    fixed_newstyle: bool,
    tls: TlsState,
    /// Budget held for the TLS session, released when the connection is dropped.
    tls_reserved: usize,
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    structured: bool,
    /// NBD_OPT_EXTENDED_HEADERS was acknowledged (implies structured replies).
    extended: bool,
    /// The export name `base:allocation` was selected for by the last SET_META_CONTEXT.
    meta_export: Option<String>,
    options_seen: u32,
    /// An OpenExport or ListExports the driver has not answered yet; nothing else is processed
    /// meanwhile, so replies stay in order.
    pending: Option<Pending>,
    deadline: Option<Instant>,

    // ---- transmission ----
    export: Option<Export>,
    slots: Slots,

    // ---- lifecycle ----
    violation: Option<Violation>,
    /// EOF or ABORT: nothing more will be read or answered.
    finished: bool,
    /// DISC, an oversized WRITE, or a GO completed during shutdown: read no further requests;
    /// finish once every request in flight has been answered.
    closing: bool,
    shutting_down: bool,
    /// Requests acted on so far, DISC aside (for the driver's reply moderation).
    requests: u64,
    /// A READ/WRITE header is buffered but its budget reservation failed.
    budget_blocked: bool,
    /// This connection's place in the budget's line while it waits (first come, first served).
    budget_place: Option<Place>,
    /// The last `run` stopped at `REQUESTS_PER_TURN` with input left to decode.
    turn_limited: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TlsState {
    Plain,
    /// STARTTLS acknowledged; waiting for the driver to start the session. Nothing is read.
    Starting,
    Active,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Oldstyle: waiting for the default export to open before the greeting goes out.
    Oldstyle,
    ClientFlags,
    Options,
    Transmission,
}

enum InState {
    /// Between messages: the next bytes are a header.
    Idle,
    /// Collecting the data of a known option (bounded by the option's own limit).
    OptData { code: u32, need: usize, data: Vec<u8> },
    /// Throwing away bytes the client sent (unknown or refused option data, a refused WRITE's
    /// payload), then answering.
    Skip { remaining: u64, then: AfterSkip },
    /// Reading an accepted WRITE's payload straight into the buffer the layer will get.
    Payload { id: RequestId, data: Vec<u8>, filled: usize },
}

enum AfterSkip {
    /// An option reply (`REP_ACK` or an error) for option `code`.
    OptReply { code: u32, reply: u32, msg: String },
    /// An error reply to a request.
    ReqError { cookie: u64, offset: u64, err: NbdError },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadTarget {
    InBuf,
    Payload,
}

enum Pending {
    Oldstyle,
    ExportName { name: String },
    Info { code: u32, req: InfoRequest },
    List,
}

/// The export chosen for transmission, and what the client was told about it.
#[derive(Clone, Debug)]
struct Export {
    name: String,
    size: u64,
    description: Option<String>,
    transmission_flags: u16,
    min_block: u32,
    preferred_block: u32,
    /// Largest READ/WRITE payload accepted (the advertised maximum block size).
    max_payload: u32,
    /// `base:allocation` was selected for this export, so BLOCK_STATUS works.
    meta: bool,
}

/// Header buffer (`limits::READ_BUFFER_BYTES`), taken from the loop's buffer pool only while
/// there are bytes to hold: an idle connection owns none, so thousands of quiet clients cost
/// little memory.
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new() -> Self {
        InBuf { buf: Vec::new(), start: 0, end: 0 }
    }
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    /// Forget everything buffered (plaintext that arrived behind STARTTLS).
    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    fn has_space(&self) -> bool {
        self.buf.is_empty() || self.end - self.start < self.buf.len()
    }
    /// Free space to read into. Leftover bytes move to the front only when the tail gets short,
    /// so the copy is amortised.
    fn space(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = crate::bufpool::take(limits::READ_BUFFER_BYTES);
        }
        if self.start > 0 && self.buf.len() - self.end < self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }
    fn filled(&mut self, n: usize) {
        debug_assert!(n <= self.buf.len() - self.end, "driver reported more bytes than read_buf offered");
        self.end = (self.end + n).min(self.buf.len());
    }
    /// Give the buffer back to the pool when it holds nothing.
    fn release_if_empty(&mut self) {
        if self.is_empty() && !self.buf.is_empty() {
            crate::bufpool::give(std::mem::take(&mut self.buf));
            self.start = 0;
            self.end = 0;
        }
    }
}

/// A request handed to the driver and not yet answered.
#[derive(Debug)]
struct Slot {
    cookie: u64,
    cmd: u16,
    offset: u64,
    /// Requested length (READ, BLOCK_STATUS, ...).
    count: u64,
    flags: Flags,
    df: bool,
    /// Budget reserved for this request, released when its reply has been written.
    reserved: usize,
}

/// The in-flight table; `RequestId` is an index into it.
#[derive(Default)]
struct Slots {
    v: Vec<Option<Slot>>,
    free: Vec<u32>,
    count: usize,
}

impl Slots {
    fn insert(&mut self, s: Slot) -> RequestId {
        self.count += 1;
        if let Some(i) = self.free.pop() {
            self.v[i as usize] = Some(s);
            return RequestId(i);
        }
        // The table never holds more than max_in_flight entries, far below u32::MAX.
        let i = self.v.len() as u32;
        self.v.push(Some(s));
        RequestId(i)
    }
    fn get(&self, id: RequestId) -> Option<&Slot> {
        self.v.get(id.0 as usize).and_then(|s| s.as_ref())
    }
    fn remove(&mut self, id: RequestId) -> Option<Slot> {
        let s = self.v.get_mut(id.0 as usize)?.take()?;
        self.count -= 1;
        self.free.push(id.0);
        Some(s)
    }
}

impl Conn {
    /// A new connection: queues the newstyle greeting, or for oldstyle emits
    /// `OpenExport { name: "", probe: false }` and sends the greeting after `handle_export`.
    pub fn new(cfg: ConnConfig, budget: Budget, now: Instant) -> Conn {
        let deadline = cfg.handshake_timeout.and_then(|t| now.checked_add(t));
        // Only the flags the spec defines may be advertised, whatever the mask says.
        let handshake_flags = cfg.handshake_flags & proto::HANDSHAKE_FLAGS_KNOWN;
        let mut c = Conn {
            phase: if cfg.oldstyle { Phase::Oldstyle } else { Phase::ClientFlags },
            cfg,
            budget,
            inbuf: InBuf::new(),
            instate: InState::Idle,
            read_target: ReadTarget::InBuf,
            out: OutQueue::default(),
            events: VecDeque::new(),
            handshake_flags,
            no_zeroes: false,
            fixed_newstyle: false,
            tls: TlsState::Plain,
            tls_reserved: 0,
            structured: false,
            extended: false,
            meta_export: None,
            options_seen: 0,
            pending: None,
            deadline,
            export: None,
            slots: Slots::default(),
            violation: None,
            finished: false,
            closing: false,
            requests: 0,
            shutting_down: false,
            budget_blocked: false,
            budget_place: None,
            turn_limited: false,
        };
        if c.phase == Phase::Oldstyle {
            c.pending = Some(Pending::Oldstyle);
            c.events.push_back(Event::OpenExport { name: String::new(), probe: false });
        } else {
            c.out.with_tail(|v| proto::encode_newstyle_greeting(v, handshake_flags));
        }
        c
    }

    /// Where to read socket bytes: the header buffer, or — while a WRITE payload is being
    /// received and no header bytes are buffered — the unfilled tail of the payload buffer
    /// itself, so large writes are read without an extra copy. Empty when no input is wanted.
    pub fn read_buf(&mut self) -> &mut [u8] {
        self.read_target = ReadTarget::InBuf;
        if !self.wants_read() {
            return &mut [];
        }
        let direct = matches!(self.instate, InState::Payload { .. }) && self.inbuf.is_empty();
        if direct {
            if let InState::Payload { data, filled, .. } = &mut self.instate {
                self.read_target = ReadTarget::Payload;
                return &mut data[*filled..];
            }
        }
        self.inbuf.space()
    }

    /// `n` bytes were read into the last [`Conn::read_buf`]; 0 means EOF.
    pub fn handle_read(&mut self, n: usize, now: Instant) {
        let _ = now;
        if self.is_dead() {
            return;
        }
        if n == 0 {
            self.on_eof();
            return;
        }
        match self.read_target {
            ReadTarget::InBuf => self.inbuf.filled(n),
            ReadTarget::Payload => {
                if let InState::Payload { data, filled, .. } = &mut self.instate {
                    debug_assert!(n <= data.len() - *filled, "driver reported more bytes than offered");
                    *filled = (*filled + n).min(data.len());
                }
            }
        }
        self.read_target = ReadTarget::InBuf;
        self.run();
    }

    /// Decode what is buffered (at most `REQUESTS_PER_TURN` requests) and retry whatever was
    /// blocked (budget). Returns true when it stopped at that limit with input left, i.e. calling
    /// it again will make progress.
    pub fn process(&mut self, now: Instant) -> bool {
        let _ = now;
        if self.is_dead() {
            return false;
        }
        self.run();
        self.turn_limited
    }

    pub fn wants_read(&self) -> bool {
        if self.is_dead() || self.tls == TlsState::Starting {
            return false;
        }
        match self.instate {
            // Bytes of a message already under way are always welcome, even while closing:
            // the request they belong to must complete (or be refused) in order.
            InState::OptData { .. } | InState::Skip { .. } | InState::Payload { .. } => return true,
            InState::Idle => {}
        }
        match self.phase {
            // The oldstyle client says nothing before our greeting.
            Phase::Oldstyle => false,
            Phase::ClientFlags | Phase::Options => self.inbuf.has_space(),
            Phase::Transmission => !self.closing && !self.blocked() && self.inbuf.has_space(),
        }
    }

    pub fn has_output(&self) -> bool {
        self.violation.is_none() && self.out.bytes() > 0
    }

    pub fn fill_iovecs<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        if self.violation.is_some() {
            return 0;
        }
        self.out.fill(iov)
    }

    /// When the next bytes to send are a lent file range (see `layer::Lent::File`): send them
    /// with `sendfile` (`fill_iovecs` stops before them) and report with `handle_written`.
    pub fn output_file(&self) -> Option<(&std::fs::File, u64, usize)> {
        if self.violation.is_some() {
            return None;
        }
        self.out.front_file()
    }

    /// `n` bytes of what [`Conn::fill_iovecs`] offered were written. Budget held by fully
    /// written replies is released here. If the output queue drops back under its cap, buffered
    /// requests are decoded again (drain [`Conn::poll_event`] afterwards).
    pub fn handle_written(&mut self, n: usize) {
        let was_over = self.out.bytes() > self.cfg.max_queued_reply_bytes;
        self.out.consume(n, &self.budget);
        if was_over && self.out.bytes() <= self.cfg.max_queued_reply_bytes && !self.is_dead() {
            self.run();
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The answer to `Event::OpenExport`. Pipelined input behind the option is processed at
    /// once (drain [`Conn::poll_event`] afterwards).
    pub fn handle_export(&mut self, r: Result<ExportInfo, NbdError>, now: Instant) {
        let _ = now;
        if self.is_dead() {
            return;
        }
        self.on_export(r);
        self.run();
    }

    /// The answer to `Event::ListExports`.
    pub fn handle_export_list(&mut self, list: Vec<ExportDesc>) {
        if self.is_dead() {
            return;
        }
        self.on_export_list(list);
        self.run();
    }

    /// The result of `Event::Request(id)`. Queues the reply; call [`Conn::process`] afterwards
    /// since a slot in the in-flight table has been freed.
    pub fn handle_result(&mut self, id: RequestId, r: Result<Outcome, NbdError>) {
        self.on_result(id, r);
    }

    pub fn poll_deadline(&self) -> Option<Instant> {
        if self.is_dead() || self.phase == Phase::Transmission {
            return None;
        }
        self.deadline
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.poll_deadline() {
            Some(d) if now >= d => {
                let limit = self.cfg.handshake_timeout.unwrap_or_default();
                self.abort(format!("handshake not completed within {limit:?}"));
            }
            _ => {}
        }
    }

    /// Drop the socket now (protocol violation, deadline, abuse); pending output is discarded.
    pub fn is_aborted(&self) -> bool {
        self.violation.is_some()
    }

    /// Nothing more will happen: close once the output has drained (after ABORT, or DISC with
    /// every in-flight request answered, or EOF).
    pub fn is_finished(&self) -> bool {
        self.finished
            || self.violation.is_some()
            || ((self.closing || self.shutting_down && self.phase == Phase::Transmission)
                && self.slots.count == 0
                && matches!(self.instate, InState::Idle))
    }

    pub fn in_transmission(&self) -> bool {
        self.phase == Phase::Transmission
    }

    pub fn in_flight(&self) -> usize {
        self.slots.count
    }

    /// Transmission requests received so far (each counted once it is acted on; DISC is not
    /// a request awaiting a reply and is not counted).
    pub fn requests_received(&self) -> u64 {
        self.requests
    }

    /// The server is shutting down: answer further options with NBD_REP_ERR_SHUTDOWN; finish
    /// the requests in flight, answering any that arrive meanwhile with ESHUTDOWN (§E item 68);
    /// then finish.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// The driver has flushed the STARTTLS ACK and put a TLS session in place: from now on
    /// every byte in and out is the session's plaintext. Everything negotiated in plaintext is
    /// forgotten (§F item 76, CVE-2021-3716): structured replies, extended headers, the meta
    /// context selection; and no plaintext byte received before survives (§F item 77).
    pub fn handle_tls_started(&mut self) {
        if self.tls != TlsState::Starting || self.is_dead() {
            return;
        }
        self.tls = TlsState::Active;
        self.structured = false;
        self.extended = false;
        self.meta_export = None;
        self.inbuf.clear();
        self.instate = InState::Idle;
    }

    /// TLS is up on this connection (STARTTLS done).
    pub fn is_tls(&self) -> bool {
        self.tls == TlsState::Active
    }

    // ---- public helpers beyond the driver contract ----

    /// Why the connection was aborted, for the driver's log line.
    pub fn abort_reason(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    /// A READ/WRITE header is waiting for budget: call [`Conn::process`] when budget is freed.
    pub fn waiting_for_budget(&self) -> bool {
        self.budget_blocked && !self.is_dead()
    }

    /// Calling [`Conn::process`] now would decode something: input is buffered and nothing
    /// (in-flight cap, output cap, a pending export, a failed budget reservation) holds it
    /// back. After a budget-blocked request, [`Conn::waiting_for_budget`] says when to retry.
    pub fn wants_process(&self) -> bool {
        if self.is_dead() || self.inbuf.is_empty() || self.tls == TlsState::Starting {
            return false;
        }
        match self.phase {
            Phase::Oldstyle => false,
            Phase::ClientFlags => true,
            Phase::Options => self.pending.is_none(),
            Phase::Transmission => !self.closing && !self.blocked(),
        }
    }

    // ---- internals ----

    fn is_dead(&self) -> bool {
        self.violation.is_some() || self.finished
    }

    /// Transmission input is held back by the in-flight cap, the output cap or the budget.
    fn blocked(&self) -> bool {
        self.budget_blocked
            // A cap of 0 would never let a request through; treat it as 1.
            || self.slots.count >= self.cfg.max_in_flight.max(1)
            || self.out.bytes() > self.cfg.max_queued_reply_bytes
    }

    fn request_header_len(&self) -> usize {
        if self.extended {
            proto::EXTENDED_REQUEST_LEN
        } else {
            proto::COMPACT_REQUEST_LEN
        }
    }

    fn structured_replies(&self) -> bool {
        self.structured || self.extended
    }

    /// Hard disconnect: log, discard output, stop everything.
    fn abort(&mut self, why: String) {
        if self.violation.is_some() {
            return;
        }
        log::warn!("dropping NBD client: {why}");
        self.violation = Some(Violation(why));
        self.budget_place = None;
        self.out.clear(&self.budget);
        // Queued requests will never run; their budget comes back when the slots are dropped.
        self.events.clear();
        self.instate = InState::Idle;
    }

    fn on_eof(&mut self) {
        log::debug!("NBD client closed its connection ({} requests in flight)", self.slots.count);
        self.finished = true;
        if let InState::Payload { id, .. } = std::mem::replace(&mut self.instate, InState::Idle) {
            // The partly received WRITE never reaches a layer.
            if let Some(s) = self.slots.remove(id) {
                self.budget.release(s.reserved);
            }
        }
    }

    /// Decode and act on buffered input until more is needed or something blocks.
    fn run(&mut self) {
        self.turn_limited = false;
        self.budget_blocked = false;
        let mut decoded = 0usize;
        while !self.is_dead() && self.step(&mut decoded) {}
        if !self.budget_blocked {
            // Not waiting (any more): a place kept in line would hold up everyone behind it.
            self.budget_place = None;
        }
        self.inbuf.release_if_empty();
    }

    /// The socket has no more bytes for now: hand back the read buffer if it holds nothing, so
    /// an idle connection owns no buffer.
    pub fn handle_would_block(&mut self) {
        self.inbuf.release_if_empty();
    }

    /// One step of input processing; false when nothing more can be done now.
    fn step(&mut self, decoded: &mut usize) -> bool {
        if self.tls == TlsState::Starting {
            return false;
        }
        match &mut self.instate {
            InState::Idle => {}
            InState::OptData { need, data, .. } => {
                let avail = self.inbuf.pending();
                let take = (*need - data.len()).min(avail.len());
                data.extend_from_slice(&avail[..take]);
                self.inbuf.consume(take);
                if data.len() < *need {
                    return false;
                }
                if let InState::OptData { code, data, .. } =
                    std::mem::replace(&mut self.instate, InState::Idle)
                {
                    self.option_data(code, data);
                }
                return true;
            }
            InState::Skip { remaining, .. } => {
                let avail = self.inbuf.pending().len();
                let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(avail);
                *remaining -= take as u64;
                self.inbuf.consume(take);
                if *remaining > 0 {
                    return false;
                }
                if let InState::Skip { then, .. } = std::mem::replace(&mut self.instate, InState::Idle) {
                    self.after_skip(then);
                }
                return true;
            }
            InState::Payload { data, filled, .. } => {
                let avail = self.inbuf.pending();
                let take = (data.len() - *filled).min(avail.len());
                data[*filled..*filled + take].copy_from_slice(&avail[..take]);
                *filled += take;
                self.inbuf.consume(take);
                if *filled < data.len() {
                    return false;
                }
                if let InState::Payload { id, data, .. } = std::mem::replace(&mut self.instate, InState::Idle)
                {
                    self.write_payload_complete(id, data);
                }
                return true;
            }
        }
        match self.phase {
            Phase::Oldstyle => false,
            Phase::ClientFlags => {
                let Some(b) = self.peek::<4>() else { return false };
                self.inbuf.consume(4);
                self.client_flags(u32::from_be_bytes(b));
                true
            }
            Phase::Options => {
                if self.pending.is_some() {
                    return false;
                }
                if *decoded >= limits::REQUESTS_PER_TURN {
                    self.turn_limited = self.inbuf.pending().len() >= proto::OPTION_HEADER_LEN;
                    return false;
                }
                let Some(b) = self.peek::<{ proto::OPTION_HEADER_LEN }>() else { return false };
                self.inbuf.consume(proto::OPTION_HEADER_LEN);
                *decoded += 1;
                match proto::decode_option_header(&b) {
                    Ok(h) => self.option_header(h),
                    Err(m) => self.abort(format!("option header with {m}")),
                }
                true
            }
            Phase::Transmission => {
                if self.closing || self.blocked() {
                    return false;
                }
                if *decoded >= limits::REQUESTS_PER_TURN {
                    self.turn_limited = self.inbuf.pending().len() >= self.request_header_len();
                    return false;
                }
                let (hdr, len) = if self.extended {
                    let Some(b) = self.peek::<{ proto::EXTENDED_REQUEST_LEN }>() else { return false };
                    (proto::decode_extended_request(&b), proto::EXTENDED_REQUEST_LEN)
                } else {
                    let Some(b) = self.peek::<{ proto::COMPACT_REQUEST_LEN }>() else { return false };
                    (proto::decode_compact_request(&b), proto::COMPACT_REQUEST_LEN)
                };
                match hdr {
                    Ok(h) => {
                        // The header stays buffered if the request must wait for budget.
                        if !self.request_header(h, len) {
                            return false;
                        }
                        *decoded += 1;
                        true
                    }
                    Err(m) => {
                        self.abort(format!("request header with {m}"));
                        false
                    }
                }
            }
        }
    }

    /// The next `N` buffered bytes, if that many have arrived (not consumed).
    fn peek<const N: usize>(&self) -> Option<[u8; N]> {
        let p = self.inbuf.pending();
        if p.len() < N {
            return None;
        }
        let mut a = [0u8; N];
        a.copy_from_slice(&p[..N]);
        Some(a)
    }

    fn after_skip(&mut self, then: AfterSkip) {
        match then {
            AfterSkip::OptReply { code, reply, msg } => self.opt_reply(code, reply, &msg),
            AfterSkip::ReqError { cookie, offset, err } => self.reply_error(cookie, offset, &err, 0),
        }
    }
}

impl Drop for Conn {
    /// Give back every budget byte this connection still holds: unanswered requests and
    /// unwritten replies.
    fn drop(&mut self) {
        for s in self.slots.v.drain(..).flatten() {
            self.budget.release(s.reserved);
        }
        self.budget.release(std::mem::take(&mut self.tls_reserved));
        self.out.clear(&self.budget);
    }
}
