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

use std::io::IoSlice;
use std::time::{Duration, Instant};

use crate::budget::Budget;
use crate::error::NbdError;
use crate::layer::registry::ExportDesc;
use crate::layer::{ExportInfo, Extents, Flags};
use crate::limits;

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
    /// Fill `buf` (allocated by the connection from the budget; its length is the count).
    Read {
        buf: Vec<u8>,
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
}

/// The client broke the protocol; the connection is dropped and this is logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

/// The state machine. See the module docs for the driver contract.
pub struct Conn {
    cfg: ConnConfig,
    budget: Budget,
}

impl Conn {
    /// A new connection: queues the newstyle greeting, or for oldstyle emits
    /// `OpenExport { name: "", probe: false }` and sends the greeting after `handle_export`.
    pub fn new(cfg: ConnConfig, budget: Budget, now: Instant) -> Conn {
        let _ = now;
        Conn { cfg, budget }
    }
    pub fn read_buf(&mut self) -> &mut [u8] {
        &mut []
    }
    pub fn handle_read(&mut self, n: usize, now: Instant) {
        let _ = (n, now, &self.cfg, &self.budget);
    }
    pub fn process(&mut self, now: Instant) -> bool {
        let _ = now;
        false
    }
    pub fn wants_read(&self) -> bool {
        false
    }
    pub fn has_output(&self) -> bool {
        false
    }
    pub fn fill_iovecs<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let _ = iov;
        0
    }
    pub fn handle_written(&mut self, n: usize) {
        let _ = n;
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        None
    }
    pub fn handle_export(&mut self, r: Result<ExportInfo, NbdError>, now: Instant) {
        let _ = (r, now);
    }
    pub fn handle_export_list(&mut self, list: Vec<ExportDesc>) {
        let _ = list;
    }
    pub fn handle_result(&mut self, id: RequestId, r: Result<Outcome, NbdError>) {
        let _ = (id, r);
    }
    pub fn poll_deadline(&self) -> Option<Instant> {
        None
    }
    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
    }
    /// Drop the socket now (protocol violation, deadline, abuse); pending output is discarded.
    pub fn is_aborted(&self) -> bool {
        false
    }
    /// Nothing more will happen: close once the output has drained (after ABORT, or DISC with
    /// every in-flight request answered, or EOF).
    pub fn is_finished(&self) -> bool {
        true
    }
    pub fn in_transmission(&self) -> bool {
        false
    }
    pub fn in_flight(&self) -> usize {
        0
    }
    /// The server is shutting down: answer further options with NBD_REP_ERR_SHUTDOWN, stop
    /// reading requests, finish those in flight, then finish.
    pub fn shutdown(&mut self) {}
}
