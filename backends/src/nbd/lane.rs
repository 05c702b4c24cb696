//! One upstream connection ("lane") on one event loop: connecting, the handshake, requests in
//! flight, and reconnecting after a drop.
//!
//! The socket is connected on the blocking pool (name resolution and `connect(2)` block; the
//! loop never does), then made nonblocking and watched on the loop. From then on everything is
//! readiness-driven: an event reads until `WouldBlock` (or a per-event byte budget, after which
//! the lane reschedules itself so one busy upstream cannot starve the loop), feeds the bytes to
//! the protocol [`Machine`], and writes queued requests until `WouldBlock`.
//!
//! Life cycle: `Down` → `Connecting` (blocking connect) → `Up` (handshake, then transmission).
//! Any failure — connect refused, handshake error or timeout, EOF, a protocol violation — fails
//! every request in flight with EIO and returns to `Down`, from where the lane reconnects with
//! exponential backoff for as long as some client uses it. Clients waiting in `open` for the
//! first handshake get nbdkit's `retry=N` semantics instead: N more attempts one second apart.
//!
//! While it has a socket or a pending timer or connect, the lane is kept alive by the callbacks
//! the loop holds (they own an `Rc` to it), so requests in flight always complete even after the
//! last client let go; closing unwatches and cancels, which drops those references.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use blocksmith_core::budget::{Budget, Reservation};
use blocksmith_core::error::NbdError;
use blocksmith_core::layer::{Done, Extents};
use blocksmith_core::sched::{Sched, TimerId, WatchId};
use blocksmith_core::tls::TlsSession;

use super::machine::{Completion, Machine, Op, Reply, UpstreamInfo};
use super::uri::Addr;
use super::Config;

/// Bound on a TCP connect to one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// From connected to ready; a server that accepts but never greets (or one at its client limit,
/// like qemu-nbd with its default `-e 1`) must not hold clients in `open` forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Delay between attempts while clients wait in `open` (nbdkit's `retry=` sleeps one second).
const OPEN_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Reconnect backoff after a drop: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bytes read per readiness event before the lane yields to the rest of the loop.
const READ_BUDGET: usize = 1024 * 1024;
const READ_CHUNK: usize = 64 * 1024;

/// The exponential reconnect delay after `failures` consecutive failed attempts (≥ 1).
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    BACKOFF_FIRST.saturating_mul(1 << shift).min(BACKOFF_MAX)
}

/// A connected upstream socket.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
    fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(b),
            Stream::Tcp(s) => s.write_vectored(b),
        }
    }
}

/// The socket as `Read`/`Write`, for a TLS session to move ciphertext through.
struct Io<'a>(&'a mut Stream);

impl Read for Io<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write_vectored(&[IoSlice::new(b)])
    }
    fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_vectored(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Blocking connect, for the blocking pool.
pub fn connect(addr: &Addr) -> io::Result<Stream> {
    match addr {
        Addr::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
        Addr::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let a = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            UnixStream::connect_addr(&a).map(Stream::Unix)
        }
        Addr::Tcp { host, port } => {
            let mut last = None;
            for a in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        // Requests are small and latency-bound: do not let Nagle hold them.
                        s.set_nodelay(true)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::other(format!("{host} has no addresses"))))
        }
    }
}

/// The completion waiting for a request's reply.
pub enum Waiter {
    Data(Done<Vec<u8>>),
    Unit(Done<()>),
    Extents(Done<Extents>),
}

impl Waiter {
    pub fn fail(self, e: NbdError) {
        match self {
            Waiter::Data(d) => d.err(e),
            Waiter::Unit(d) => d.err(e),
            Waiter::Extents(d) => d.err(e),
        }
    }

    fn complete(self, r: Result<Reply, NbdError>) {
        // The reply kind follows from the request type, which the machine keeps with the
        // cookie; a mismatch would be our bug, reported as EIO rather than a panic.
        let mismatch = || NbdError::io("internal error: reply kind does not match the request");
        match (self, r) {
            (w, Err(e)) => w.fail(e),
            (Waiter::Data(d), Ok(Reply::Data(v))) => d.ok(v),
            (Waiter::Unit(d), Ok(Reply::Done)) => d.ok(()),
            (Waiter::Extents(d), Ok(Reply::Extents(e))) => d.ok(e),
            (w, Ok(_)) => w.fail(mismatch()),
        }
    }
}

/// Called once the lane is ready (or out of retries) for a client waiting in `open`.
pub type OpenDone = Box<dyn FnOnce(Result<UpstreamInfo, NbdError>)>;

struct OpenWaiter {
    failures: u32,
    done: OpenDone,
}

struct Live {
    sock: Stream,
    watch: Option<WatchId>,
    m: Machine<Waiter>,
    rbuf: Vec<u8>,
    /// After STARTTLS: every socket byte goes through this session.
    tls: Option<Box<dyn TlsSession>>,
    /// The session's memory, charged to `--memory-limit` like a client's TLS session.
    tls_reserved: Option<Reservation>,
    budget: Budget,
}

enum State {
    Down,
    Connecting,
    Up(Box<Live>),
}

/// What one pass over the socket found.
enum Pumped {
    Fine { more: bool, became_ready: bool },
    Failed(String),
}

pub struct Lane {
    pub id: u64,
    cfg: Arc<Config>,
    sched: Sched,
    /// The server's `--memory-limit`, which pays for TLS sessions to the upstream.
    budget: Budget,
    me: Weak<Lane>,
    /// Told when this lane retires (so no new client picks it).
    on_retire: Box<dyn Fn(u64)>,
    state: RefCell<State>,
    /// Bumped whenever a socket or attempt ends; callbacks from an older one do nothing.
    gen: Cell<u64>,
    /// The handshake deadline while `Up` and not ready, the next attempt while `Down`.
    timer: Cell<Option<TimerId>>,
    failures: Cell<u32>,
    users: Cell<usize>,
    retired: Cell<bool>,
    info: RefCell<Option<UpstreamInfo>>,
    waiters: RefCell<Vec<OpenWaiter>>,
}

impl Lane {
    pub fn new(
        id: u64,
        cfg: Arc<Config>,
        sched: Sched,
        budget: Budget,
        on_retire: Box<dyn Fn(u64)>,
    ) -> Rc<Lane> {
        Rc::new_cyclic(|me| Lane {
            id,
            cfg,
            sched,
            budget,
            me: me.clone(),
            on_retire,
            state: RefCell::new(State::Down),
            gen: Cell::new(0),
            timer: Cell::new(None),
            failures: Cell::new(0),
            users: Cell::new(0),
            retired: Cell::new(false),
            info: RefCell::new(None),
            waiters: RefCell::new(Vec::new()),
        })
    }

    fn rc(&self) -> Option<Rc<Lane>> {
        self.me.upgrade()
    }

    pub fn users(&self) -> usize {
        self.users.get()
    }

    pub fn is_ready(&self) -> bool {
        matches!(&*self.state.borrow(), State::Up(l) if l.m.is_ready())
    }

    pub fn in_flight(&self) -> usize {
        match &*self.state.borrow() {
            State::Up(l) => l.m.in_flight(),
            _ => 0,
        }
    }

    pub fn add_user(&self) {
        self.users.set(self.users.get() + 1);
    }

    /// A client let go. An unshared lane nobody uses is closed (after what is in flight).
    pub fn remove_user(&self) {
        self.users.set(self.users.get().saturating_sub(1));
        if self.users.get() == 0 && self.waiters.borrow().is_empty() && !self.cfg.shared {
            self.retire();
        }
    }

    /// Make sure the lane is connected or on its way there (a client now depends on it).
    pub fn wake(&self) {
        if self.retired.get() || !matches!(*self.state.borrow(), State::Down) {
            return;
        }
        if let Some(t) = self.timer.take() {
            self.sched.cancel(t);
        }
        self.connect_now();
    }

    /// Call `done` when the lane is ready, or when the attempts `retry=` allows have failed.
    pub fn wait_ready(&self, done: OpenDone) {
        if self.is_ready() {
            let info = self.info.borrow().clone();
            match info {
                Some(i) => return done(Ok(i)),
                None => return done(Err(NbdError::io("internal error: ready lane without export info"))),
            }
        }
        self.waiters.borrow_mut().push(OpenWaiter { failures: 0, done });
        self.wake();
    }

    /// Send a request, or fail it with EIO at once if the lane is not connected.
    pub fn submit(&self, op: Op, offset: u64, flags: u16, w: Waiter) {
        let rejected = {
            let mut st = self.state.borrow_mut();
            match &mut *st {
                State::Up(live) => live.m.submit(op, offset, flags, w).err(),
                _ => Some(w),
            }
        };
        if let Some(w) = rejected {
            return w.fail(NbdError::io(format!(
                "upstream {} is not connected (reconnecting)",
                self.cfg.addr_text()
            )));
        }
        // Write now rather than wait for a writable edge: the socket is usually writable, and
        // an edge only comes after a WouldBlock.
        let failed = {
            let mut st = self.state.borrow_mut();
            match &mut *st {
                State::Up(live) => flush(live).err(),
                _ => None,
            }
        };
        if let Some(why) = failed {
            self.drop_connection(&why);
        }
    }

    // ---- Connecting --------------------------------------------------------------------------

    fn connect_now(&self) {
        let Some(me) = self.rc() else { return };
        let gen = self.gen.get() + 1;
        self.gen.set(gen);
        *self.state.borrow_mut() = State::Connecting;
        let addr = self.cfg.addr.clone();
        log::debug!("nbd: lane {} connecting to {}", self.id, self.cfg.addr_text());
        self.sched.blocking(move || connect(&addr), move |r: io::Result<Stream>| me.connected(gen, r));
    }

    fn connected(&self, gen: u64, r: io::Result<Stream>) {
        if gen != self.gen.get() || self.retired.get() {
            // Abandoned meanwhile; the socket (if any) closes here.
            return;
        }
        let sock = match r.and_then(|s| s.set_nonblocking().map(|_| s)) {
            Ok(s) => s,
            Err(e) => {
                *self.state.borrow_mut() = State::Down;
                return self.attempt_failed(&format!("connect: {e}"));
            }
        };
        let Some(me) = self.rc() else { return };
        let fd = sock.fd();
        let live = Live {
            sock,
            watch: None,
            m: Machine::with_tls(&self.cfg.export, self.cfg.tls_mode),
            rbuf: vec![0; READ_CHUNK],
            tls: None,
            tls_reserved: None,
            budget: self.budget.clone(),
        };
        *self.state.borrow_mut() = State::Up(Box::new(live));
        // Edge-triggered: registering reports what is already readable, so a greeting that
        // arrived before the watch is not missed.
        let watched = self.sched.watch(fd, true, true, move |_ready| me.pump(gen));
        match watched {
            Ok(w) => {
                if let State::Up(live) = &mut *self.state.borrow_mut() {
                    live.watch = Some(w);
                }
            }
            Err(e) => return self.drop_connection(&format!("cannot watch the socket: {e}")),
        }
        let me = self.rc();
        let t = self.sched.after(self.cfg.handshake_timeout, move || {
            if let Some(me) = me {
                if me.gen.get() == gen && !me.is_ready() {
                    me.timer.set(None);
                    me.drop_connection("handshake timed out");
                }
            }
        });
        self.timer.set(Some(t));
    }

    /// An attempt (or an established connection) failed: tell waiting opens, then schedule the
    /// next attempt if anyone still needs this lane.
    fn attempt_failed(&self, why: &str) {
        let failures = self.failures.get() + 1;
        self.failures.set(failures);
        let err = NbdError::io(format!("cannot connect to upstream {}: {why}", self.cfg.addr_text()));
        let given_up: Vec<OpenWaiter> = {
            let mut ws = self.waiters.borrow_mut();
            let mut out = Vec::new();
            let mut i = 0;
            while i < ws.len() {
                ws[i].failures += 1;
                if ws[i].failures > self.cfg.retry {
                    out.push(ws.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            out
        };
        if !given_up.is_empty() {
            log::warn!("nbd: {err}");
        }
        for w in given_up {
            (w.done)(Err(err.clone()));
        }
        if self.retired.get() {
            return;
        }
        let waiting = !self.waiters.borrow().is_empty();
        if self.users.get() == 0 && !waiting {
            if self.cfg.shared {
                // Nobody needs it now; the next open wakes it.
                return;
            }
            return self.retire();
        }
        let delay = if waiting { OPEN_RETRY_DELAY } else { backoff(failures) };
        log::debug!("nbd: lane {} attempt {failures} failed ({why}); next in {delay:?}", self.id);
        let me = self.rc();
        let gen = self.gen.get();
        let t = self.sched.after(delay, move || {
            if let Some(me) = me {
                if me.gen.get() == gen && matches!(*me.state.borrow(), State::Down) {
                    me.timer.set(None);
                    me.connect_now();
                }
            }
        });
        if let Some(old) = self.timer.replace(Some(t)) {
            self.sched.cancel(old);
        }
    }

    fn handshake_done(&self) {
        if let Some(t) = self.timer.take() {
            self.sched.cancel(t);
        }
        self.failures.set(0);
        let info = match &*self.state.borrow() {
            State::Up(l) => l.m.info(),
            _ => None,
        };
        let Some(info) = info else { return };
        let previous = self.info.replace(Some(info.clone()));
        match previous {
            Some(p) if p.size != info.size || p.flags != info.flags => log::warn!(
                "nbd: upstream {} came back changed (size {} -> {}, flags {:#x} -> {:#x}); clients \
                 opened before keep the old view",
                self.cfg.addr_text(),
                p.size,
                info.size,
                p.flags,
                info.flags
            ),
            Some(_) => log::info!("nbd: reconnected to upstream {}", self.cfg.addr_text()),
            None => log::debug!(
                "nbd: lane {} ready: size {} flags {:#x} structured={} extents={} block sizes {:?}",
                self.id,
                info.size,
                info.flags,
                info.structured,
                info.extents,
                info.block_size
            ),
        }
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            (w.done)(Ok(info.clone()));
        }
    }

    // ---- Readiness ---------------------------------------------------------------------------

    /// Read, decode, write; deliver what completed. Called on readiness and by itself when it
    /// stopped early.
    fn pump(&self, gen: u64) {
        if gen != self.gen.get() {
            return;
        }
        let (outcome, completions) = {
            let mut st = self.state.borrow_mut();
            let State::Up(live) = &mut *st else { return };
            let was_ready = live.m.is_ready();
            let outcome = read_some(live, &self.cfg);
            let mut completions = live.m.take_completions();
            let outcome = match outcome {
                Ok(more) => match flush(live) {
                    Ok(()) => Pumped::Fine { more, became_ready: !was_ready && live.m.is_ready() },
                    Err(e) => Pumped::Failed(e),
                },
                Err(e) => Pumped::Failed(e),
            };
            completions.append(&mut live.m.take_completions());
            (outcome, completions)
        };
        deliver(completions);
        match outcome {
            Pumped::Failed(why) => self.drop_connection(&why),
            Pumped::Fine { more, became_ready } => {
                if became_ready {
                    self.handshake_done();
                }
                if self.retired.get() && self.in_flight() == 0 {
                    self.close();
                } else if more {
                    // Edge-triggered: the rest of the bytes will not announce themselves again.
                    if let Some(me) = self.rc() {
                        self.sched.defer(move || me.pump(gen));
                    }
                }
            }
        }
    }

    /// Tear the connection down: requests in flight fail with EIO, then reconnect (or not).
    fn drop_connection(&self, why: &str) {
        let old = std::mem::replace(&mut *self.state.borrow_mut(), State::Down);
        self.gen.set(self.gen.get() + 1);
        if let Some(t) = self.timer.take() {
            self.sched.cancel(t);
        }
        let State::Up(mut live) = old else {
            return self.attempt_failed(why);
        };
        if let Some(w) = live.watch.take() {
            self.sched.unwatch(w);
        }
        let was_ready = live.m.is_ready();
        let err = NbdError::io(format!("upstream {}: {why}", self.cfg.addr_text()));
        let failed = live.m.fail_all(&err);
        drop(live);
        if was_ready {
            log::warn!(
                "nbd: lost upstream {} ({why}); {} request(s) failed with EIO; reconnecting",
                self.cfg.addr_text(),
                failed.len()
            );
        }
        deliver(failed);
        self.attempt_failed(why);
    }

    /// No client will use this lane again: leave the pool, and close once idle.
    fn retire(&self) {
        if self.retired.replace(true) {
            return;
        }
        (self.on_retire)(self.id);
        if let Some(t) = self.timer.take() {
            self.sched.cancel(t);
        }
        let up = matches!(*self.state.borrow(), State::Up(_));
        if !up {
            // Down, or a connect still running (its result will be dropped: gen moves on).
            self.gen.set(self.gen.get() + 1);
            *self.state.borrow_mut() = State::Down;
        } else if self.in_flight() == 0 {
            self.close();
        }
    }

    /// The loop is going away: close whatever state the lane is in, for good.
    pub fn shut_down(&self) {
        self.retired.set(true);
        self.users.set(0);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            (w.done)(Err(NbdError::new(blocksmith_core::error::Errno::Shutdown)));
        }
        self.close();
    }

    /// Close an idle connection politely (NBD_CMD_DISC) and let go of the loop's callbacks.
    fn close(&self) {
        let old = std::mem::replace(&mut *self.state.borrow_mut(), State::Down);
        self.gen.set(self.gen.get() + 1);
        if let Some(t) = self.timer.take() {
            self.sched.cancel(t);
        }
        if let State::Up(mut live) = old {
            live.m.disconnect();
            if live.tls.is_some() {
                // close_notify after the DISC, which this flush encrypts first.
                let _ = flush(&mut live);
                if let Some(s) = live.tls.as_mut() {
                    s.send_close_notify();
                }
            }
            // Best effort: a 28-byte DISC fits any socket buffer; if not, closing is enough.
            let _ = flush(&mut live);
            if let Some(w) = live.watch.take() {
                self.sched.unwatch(w);
            }
            let failed = live.m.fail_all(&NbdError::io("upstream connection closed"));
            deliver(failed);
            log::debug!("nbd: lane {} closed", self.id);
        }
    }
}

/// Read until `WouldBlock` or the budget; feed the machine. `Ok(true)`: stopped on the budget.
fn read_some(live: &mut Live, cfg: &Config) -> Result<bool, String> {
    if live.tls.is_some() {
        return read_some_tls(live);
    }
    let Live { sock, m, rbuf, .. } = live;
    let mut budget = READ_BUDGET;
    loop {
        if budget == 0 {
            return Ok(true);
        }
        // Data of a large read goes straight into the request's buffer; everything else
        // (headers, small replies, many at a time) through our buffer.
        let r = match m.data_target() {
            Some(dst) => sock.read(dst).map(|n| (n, true)),
            None => sock.read(rbuf).map(|n| (n, false)),
        };
        match r {
            Ok((0, _)) => return Err("upstream closed the connection".to_string()),
            Ok((n, true)) => {
                budget = budget.saturating_sub(n);
                m.data_received(n);
            }
            Ok((n, false)) => {
                budget = budget.saturating_sub(n);
                m.feed(&rbuf[..n]).map_err(|f| format!("protocol error: {}", f.0))?;
                if m.wants_tls() {
                    // STARTTLS was accepted: from here on the socket carries TLS records.
                    start_tls(live, cfg)?;
                    return read_some_tls(live);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Begin the TLS handshake: the session's ClientHello goes out with the next flush.
fn start_tls(live: &mut Live, cfg: &Config) -> Result<(), String> {
    let Some(client) = &cfg.tls else {
        return Err("internal error: STARTTLS without TLS credentials".to_string());
    };
    if !live.m.out().is_empty() {
        return Err("internal error: plaintext queued across STARTTLS".to_string());
    }
    let reserved = live.budget.reserve(blocksmith_core::tls::SESSION_BUDGET_BYTES).ok_or_else(|| {
        "no memory left for a TLS session to the upstream (--memory-limit); will retry".to_string()
    })?;
    let session = client.new_session().map_err(|e| format!("TLS: {e}"))?;
    live.tls = Some(session);
    live.tls_reserved = Some(reserved);
    Ok(())
}

/// [`read_some`] inside TLS: ciphertext from the socket into the session, plaintext from the
/// session into the machine (READ data straight into the request's buffer).
fn read_some_tls(live: &mut Live) -> Result<bool, String> {
    let Live { sock, m, rbuf, tls, .. } = live;
    let Some(s) = tls.as_mut() else { return Ok(false) };
    let mut budget = READ_BUDGET;
    loop {
        // Take what is decrypted first.
        loop {
            let r = match m.data_target() {
                Some(dst) => s.read_plain(dst).map(|n| (n, true)),
                None => s.read_plain(rbuf).map(|n| (n, false)),
            };
            match r {
                Ok((0, _)) => return Err("upstream closed the TLS session".to_string()),
                Ok((n, true)) => m.data_received(n),
                Ok((n, false)) => m.feed(&rbuf[..n]).map_err(|f| format!("protocol error: {}", f.0))?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err("upstream closed the connection".to_string())
                }
                Err(e) => return Err(format!("TLS: {e}")),
            }
        }
        if m.wants_tls() && !s.is_handshaking() {
            m.tls_established();
            log::debug!("nbd: TLS with upstream: {}", s.describe());
        }
        if budget == 0 {
            return Ok(true);
        }
        if !s.wants_read() {
            // Closed, or input it cannot take yet: nothing more to do on this event.
            return Ok(false);
        }
        match s.read_tls(&mut Io(sock)) {
            Ok(0) => {
                // The rest of what was decrypted is taken above on the next turn; a peer that
                // hung up mid-stream is reported by `read_plain`.
                s.process().map_err(|e| format!("TLS: {e}"))?;
                budget = budget.saturating_sub(1);
                if s.wants_read() {
                    return Err("upstream closed the connection".to_string());
                }
            }
            Ok(n) => {
                budget = budget.saturating_sub(n);
                if let Err(e) = s.process() {
                    // Best effort: tell the server why (the alert), then drop.
                    let _ = s.write_tls(&mut Io(sock));
                    return Err(format!("TLS: {e}"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Write queued bytes until done or `WouldBlock`.
fn flush(live: &mut Live) -> Result<(), String> {
    let Live { sock, m, tls, .. } = live;
    let out = m.out();
    if let Some(s) = tls.as_mut() {
        loop {
            // Encrypt what is queued (as much as the session takes), then send ciphertext.
            if !out.is_empty() && !s.is_handshaking() {
                let mut iov = [IoSlice::new(&[]); 64];
                let n = out.iovecs(&mut iov);
                let w = s.write_plain(&iov[..n]).map_err(|e| format!("TLS: {e}"))?;
                out.consume(w);
            }
            if !s.wants_write() {
                return Ok(());
            }
            match s.write_tls(&mut Io(sock)) {
                Ok(0) => return Err("upstream stopped accepting data".to_string()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
    }
    while !out.is_empty() {
        let mut iov = [IoSlice::new(&[]); 64];
        let n = out.iovecs(&mut iov);
        match sock.write_vectored(&iov[..n]) {
            Ok(0) => return Err("upstream stopped accepting data".to_string()),
            Ok(w) => out.consume(w),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    Ok(())
}

/// Run completions, with no borrow of any lane held (a completion may submit again).
fn deliver(v: Vec<Completion<Waiter>>) {
    for (w, r) in v {
        w.complete(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(5), Duration::from_millis(800));
        assert_eq!(backoff(7), BACKOFF_MAX);
        assert_eq!(backoff(1000), BACKOFF_MAX);
        assert_eq!(backoff(0), Duration::from_millis(50));
    }
}
