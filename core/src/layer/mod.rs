//! The layer model: one nonblocking interface shared by backends and filters.
//!
//! A request enters a layer as a method call carrying a completion callback (`Done`). The layer
//! either calls `done` before returning (RAM, generated data) or arranges for it to be called
//! later from the same event loop — after a timer, blocking work on the pool, or a request to the
//! layer below. Nothing blocks. `done` is called exactly once; dropping it uncalled is a bug (the
//! client would wait forever), so `Done` asserts on drop in debug builds.
//!
//! Per-connection layer instances live on one event loop and are `!Send` (`Rc`); the factories
//! that make them are shared by every loop (`Arc`, `Send + Sync`).
//!
//! Filters implement [`Filter`], whose every method defaults to passing the call through to
//! `next`; [`FilterLayer`] adapts a `Filter` plus its `next` into a [`Layer`]. Between every
//! pair of layers sits a [`shim::Shim`] that validates ranges, flags and capabilities and
//! emulates what a layer lacks, so no backend or filter repeats those checks.

pub mod lent;
pub mod registry;
pub mod shim;
pub mod stack;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use crate::control::ServerControl;
use crate::error::{Errno, NbdError};
use crate::sched::Sched;

pub use lent::{Lent, LentPieces, ReadData, SharedBytes};
pub use registry::{BackendFactory, BackendSpec, FilterFactory, FilterSpec, ParamSpec};
pub use stack::Stack;

/// Completion callback for a layer operation. Called exactly once, on the loop that started
/// the operation.
///
/// Either a closure (what layers make when they wrap a completion) or a [`Sink`] and a
/// [`SinkToken`]: the connection driver hands every client request to its loop's completion
/// queue that way, which costs a reference count where a boxed closure would cost an
/// allocation per request.
pub struct Done<T>(Option<Target<T>>);

type Callback<T> = Box<dyn FnOnce(Result<T, NbdError>)>;

enum Target<T> {
    Callback(Callback<T>),
    Sink(Rc<dyn Sink<T>>, SinkToken),
}

/// Takes the results of many operations, told apart by the [`SinkToken`] each was started with.
pub trait Sink<T> {
    fn complete(&self, token: SinkToken, result: Result<T, NbdError>);
}

/// Names an operation to its [`Sink`]; opaque to layers (the driver packs its connection slot,
/// the connection's generation and the request's index into it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkToken(pub [u64; 3]);

thread_local! {
    /// Set while an event loop tears down: completions dropped then belong to requests whose
    /// connections are gone, and dropping them is expected.
    static TEARING_DOWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Mark this thread's loop as tearing down (see [`Done`]'s drop check).
pub fn tearing_down() {
    TEARING_DOWN.with(|t| t.set(true));
}

impl<T> Done<T> {
    pub fn new(f: impl FnOnce(Result<T, NbdError>) + 'static) -> Self {
        Done(Some(Target::Callback(Box::new(f))))
    }
    /// A completion that hands the result to `sink` with `token`.
    pub fn to_sink(sink: Rc<dyn Sink<T>>, token: SinkToken) -> Self {
        Done(Some(Target::Sink(sink, token)))
    }
    /// Complete the operation.
    pub fn call(mut self, r: Result<T, NbdError>) {
        match self.0.take() {
            Some(Target::Callback(f)) => f(r),
            Some(Target::Sink(sink, token)) => sink.complete(token, r),
            None => {}
        }
    }
    pub fn ok(self, v: T) {
        self.call(Ok(v))
    }
    pub fn err(self, e: impl Into<NbdError>) {
        self.call(Err(e.into()))
    }
    /// Wrap: run `f` on the result before handing it on.
    pub fn map<U: 'static>(
        self,
        f: impl FnOnce(Result<U, NbdError>) -> Result<T, NbdError> + 'static,
    ) -> Done<U>
    where
        T: 'static,
    {
        Done::new(move |r| self.call(f(r)))
    }
}

impl<T> Drop for Done<T> {
    fn drop(&mut self) {
        // A dropped, uncalled completion leaves a client request hanging forever.
        if self.0.is_some() && !std::thread::panicking() && !TEARING_DOWN.with(|t| t.get()) {
            debug_assert!(false, "layer completion dropped without being called");
        }
    }
}

/// Request flags as seen by layers (not the wire bits: the connection translates).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(u32);

impl Flags {
    pub const NONE: Flags = Flags(0);
    /// Force unit access: durable before the reply.
    pub const FUA: Flags = Flags(1);
    /// WRITE_ZEROES may punch a hole (the wire flag NO_HOLE clears it).
    pub const MAY_TRIM: Flags = Flags(2);
    /// BLOCK_STATUS: one extent is enough.
    pub const REQ_ONE: Flags = Flags(4);
    /// WRITE_ZEROES: fail with ENOTSUP rather than zero slowly.
    pub const FAST_ZERO: Flags = Flags(8);

    pub fn contains(self, f: Flags) -> bool {
        self.0 & f.0 == f.0 && f.0 != 0
    }
    pub fn without(self, f: Flags) -> Flags {
        Flags(self.0 & !f.0)
    }
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, o: Flags) -> Flags {
        Flags(self.0 | o.0)
    }
}

/// How a layer supports FUA, cache and zero: not at all, by emulation in the shim, or natively.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Support {
    None,
    Emulate,
    Native,
}

/// Block size constraints a layer advertises (NBD_INFO_BLOCK_SIZE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// What a layer is and can do, asked once per connection after open (nbdkit's get_size and
/// can_* callbacks, all at once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub can_write: bool,
    pub can_flush: bool,
    pub fua: Support,
    pub can_trim: bool,
    pub zero: Support,
    pub can_fast_zero: bool,
    pub can_extents: bool,
    pub cache: Support,
    pub can_multi_conn: bool,
    pub is_rotational: bool,
    pub block_size: Option<BlockSize>,
    pub description: Option<String>,
}

impl ExportInfo {
    /// A read-only disk of `size` bytes that supports nothing beyond reads.
    pub fn read_only(size: u64) -> Self {
        ExportInfo {
            size,
            can_write: false,
            can_flush: false,
            fua: Support::None,
            can_trim: false,
            zero: Support::None,
            can_fast_zero: false,
            can_extents: false,
            cache: Support::None,
            can_multi_conn: true,
            is_rotational: false,
            block_size: None,
            description: None,
        }
    }
}

/// Allocation status bits (base:allocation).
pub const EXTENT_HOLE: u32 = 1;
pub const EXTENT_ZERO: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// Extents describing a range from the request's offset on, in order, without gaps. A layer may
/// describe less than was asked (at least one byte) or more; the shim clips.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extents(pub Vec<Extent>);

impl Extents {
    pub fn new() -> Self {
        Extents(Vec::new())
    }
    /// Append, merging with the previous extent when the flags match.
    pub fn push(&mut self, length: u64, flags: u32) {
        if length == 0 {
            return;
        }
        if let Some(last) = self.0.last_mut() {
            if last.flags == flags {
                last.length += length;
                return;
            }
        }
        self.0.push(Extent { length, flags });
    }
    pub fn total(&self) -> u64 {
        self.0.iter().map(|e| e.length).sum()
    }
}

/// The credentials of a client on a Unix socket (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// A client as seen before any export is opened: at accept (preconnect) and when it lists
/// exports.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// Address as text (`127.0.0.1:4321`, `unix`, `stdin`).
    pub addr: String,
    pub cred: Option<PeerCred>,
    pub is_tls: bool,
    pub tls_subject: Option<String>,
}

/// Lets a layer ask the server to drop its client (nbdkit's `nbdkit_disconnect`): gracefully
/// (requests in flight are answered first) or at once.
#[derive(Clone, Default)]
pub struct Disconnect(Rc<DisconnectState>);

#[derive(Default)]
struct DisconnectState {
    requested: Cell<Option<bool>>,
    /// Makes the loop look at the connection (which may be idle) soon.
    wake: Option<Box<dyn Fn()>>,
}

impl Disconnect {
    /// A handle whose requests call `wake` (the driver's way to notice an idle connection).
    pub fn new(wake: impl Fn() + 'static) -> Self {
        Disconnect(Rc::new(DisconnectState { requested: Cell::new(None), wake: Some(Box::new(wake)) }))
    }
    /// Ask for the connection to be closed; `force` drops it without answering what is in
    /// flight. A forced request wins over a graceful one.
    pub fn request(&self, force: bool) {
        let force = force || self.0.requested.get() == Some(true);
        self.0.requested.set(Some(force));
        if let Some(w) = &self.0.wake {
            w();
        }
    }
    /// `None` until requested; then whether it must be forced.
    pub fn requested(&self) -> Option<bool> {
        self.0.requested.get()
    }
}

impl std::fmt::Debug for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Disconnect({:?})", self.requested())
    }
}

/// Who is asking, handed to every layer at open.
#[derive(Clone)]
pub struct OpenCx {
    pub export_name: String,
    pub readonly: bool,
    pub is_tls: bool,
    /// The subject of the client's TLS certificate, when it sent one that was verified.
    pub tls_subject: Option<String>,
    /// Peer address as text (`127.0.0.1:4321`, `unix`, `stdin`).
    pub peer: String,
    /// Server-unique connection number, for logs.
    pub conn_id: u64,
    /// Timers, blocking work and fd readiness for this connection's loop.
    pub sched: Sched,
    /// The server as a whole: shut it down, count its clients.
    pub control: Arc<ServerControl>,
    /// Unix-socket peer credentials, when the client is on one.
    pub peer_cred: Option<PeerCred>,
    /// Drop this client.
    pub disconnect: Disconnect,
    /// The server's payload budget (`--memory-limit`): a layer that holds data in RAM beyond
    /// a request (readahead buffers, say) reserves it here and does without when it is spent.
    pub budget: crate::budget::Budget,
}

impl OpenCx {
    /// A context for tests: default export, a fresh server control, peer "test".
    pub fn for_tests(sched: Sched) -> OpenCx {
        OpenCx {
            export_name: String::new(),
            readonly: false,
            is_tls: false,
            tls_subject: None,
            peer: "test".into(),
            conn_id: 1,
            sched,
            control: ServerControl::new(),
            peer_cred: None,
            disconnect: Disconnect::default(),
            budget: crate::budget::Budget::new(crate::limits::DEFAULT_MEMORY_LIMIT),
        }
    }
}

/// One open instance of a layer (a backend, or a filter over its `next`). See the module docs
/// for the completion contract. The shim guarantees every call is in range, uses only flags the
/// layer's `ExportInfo` allows, and never asks for a capability the layer lacks; methods for
/// capabilities a layer does not advertise are never called and may keep the defaults.
pub trait Layer {
    fn info(&self) -> ExportInfo;
    /// Fill `buf` (its length is the count) from `offset`.
    fn pread(&self, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>);
    /// Read `count` bytes from `offset`, lending the data instead of copying it where the layer
    /// can (see [`Lent`]); this is what the connection calls for a client's READ. The default
    /// reads into a pooled buffer with [`Layer::pread`].
    fn pread_lent(&self, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        let buf = crate::bufpool::take(count);
        self.pread(buf, offset, flags, done.map(|r| r.map(ReadData::Buf)))
    }
    fn pwrite(&self, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let _ = (data, offset, flags);
        done.err(Errno::Perm)
    }
    fn flush(&self, flags: Flags, done: Done<()>) {
        let _ = flags;
        done.err(Errno::Inval)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let _ = (count, offset, flags);
        done.err(Errno::Inval)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let _ = (count, offset, flags);
        done.err(Errno::Inval)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        let _ = flags;
        let mut e = Extents::new();
        e.push(count, 0);
        let _ = offset;
        done.ok(e)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let _ = (count, offset, flags);
        done.ok(())
    }
    /// The connection is going away. Requests still in flight will still complete.
    fn close(&self) {}
}

/// The layer below a filter.
pub type Next = Rc<dyn Layer>;

/// A filter's per-connection instance. Every method defaults to passing the call to `next`
/// unchanged, so a filter implements only what it changes.
pub trait Filter {
    fn info(&self, next: &Next) -> ExportInfo {
        next.info()
    }
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        next.pread(buf, offset, flags, done)
    }
    /// A client's READ. The default goes through this filter's own `pread` into a buffer, since
    /// a filter may change read data. A filter that never touches read data (it may change the
    /// offset) forwards to `next.pread_lent`, keeping replies zero-copy through it.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        let buf = crate::bufpool::take(count);
        self.pread(next, buf, offset, flags, done.map(|r| r.map(ReadData::Buf)))
    }
    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        next.pwrite(data, offset, flags, done)
    }
    fn flush(&self, next: &Next, flags: Flags, done: Done<()>) {
        next.flush(flags, done)
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.trim(count, offset, flags, done)
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.zero(count, offset, flags, done)
    }
    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        next.extents(count, offset, flags, done)
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.cache(count, offset, flags, done)
    }
    fn close(&self, next: &Next) {
        next.close()
    }
}

/// A [`Filter`] bound to the layer below it.
pub struct FilterLayer<F: Filter> {
    pub filter: F,
    pub next: Next,
}

impl<F: Filter> Layer for FilterLayer<F> {
    fn info(&self) -> ExportInfo {
        self.filter.info(&self.next)
    }
    fn pread(&self, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        self.filter.pread(&self.next, buf, offset, flags, done)
    }
    fn pread_lent(&self, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        self.filter.pread_lent(&self.next, count, offset, flags, done)
    }
    fn pwrite(&self, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        self.filter.pwrite(&self.next, data, offset, flags, done)
    }
    fn flush(&self, flags: Flags, done: Done<()>) {
        self.filter.flush(&self.next, flags, done)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        self.filter.trim(&self.next, count, offset, flags, done)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        self.filter.zero(&self.next, count, offset, flags, done)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        self.filter.extents(&self.next, count, offset, flags, done)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        self.filter.cache(&self.next, count, offset, flags, done)
    }
    fn close(&self) {
        self.filter.close(&self.next)
    }
}
