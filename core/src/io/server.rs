//! Listeners, event loops and the connection driver.
//!
//! Each loop is one thread with its own mio `Poll`, its own connections in a `slab`, and its own
//! [`LoopCore`] scheduler. Every loop registers a duplicate of every listening socket and
//! accepts from it; the kernel hands each new connection to one of them. A connection never
//! moves between loops, so its layers are plain `Rc` values.
//!
//! Layer completions never re-enter the driver: they push onto the loop's completion queue,
//! which the loop drains between steps. That keeps a synchronous completion (RAM) and a late one
//! (a timer, the blocking pool) on the same path.
//!
//! TLS: after NBD_OPT_STARTTLS the driver flushes the plaintext ACK, then puts a
//! [`TlsSession`] between the socket and the `Conn` (ciphertext in → plaintext into
//! `Conn::read_buf`; `Conn::fill_iovecs` → session → ciphertext out). Sessions are sans IO like
//! `Conn`, so the same readiness contract applies and nothing ever waits on a handshake; a
//! client that stalls mid-handshake is dropped at the connection's handshake deadline. Without
//! STARTTLS the zero-copy plaintext path is unchanged.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};
use slab::Slab;

use super::moderation::Moderation;
use super::reactor::{readiness, BlockingPool, LoopCore, WATCH_BASE, WATCH_LIMIT};
use super::transport::Transport;
use crate::budget::Budget;
use crate::conn::{Conn, ConnConfig, Event, Op, Outcome, Request, RequestId};
use crate::control::ServerControl;
use crate::error::NbdError;
use crate::layer::{
    Disconnect, Done, Extents, Layer, Lent, OpenCx, Peer, PeerCred, ReadData, Sink, SinkToken, Stack,
};
use crate::sched::Sched;
use crate::tls::{ServerTls, TlsSession};

const WAKER: Token = super::reactor::WAKER_TOKEN;
const FIRST_LISTENER: usize = 1;
/// Connection tokens start here: `CONN_BASE + 2*key` (input) and `+1` (a separate output fd).
const CONN_BASE: usize = 1 << 20;
/// Reads per connection per service pass before others get a turn.
const READS_PER_PASS: usize = 8;
/// How long accepting pauses after EMFILE/ENFILE before it is tried again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How often a loop with budget-starved connections looks again even if nobody said their
/// turn came. Waiters are woken when budget frees up for the head of the line (from any loop,
/// through this loop's waker); this is only a safety net.
const BUDGET_RETRY: Duration = Duration::from_millis(100);
/// How long a finished connection waits for the client to close before we close anyway.
const LINGER: Duration = Duration::from_secs(2);
/// Replies are held (`io::moderation`) only when no client that waits on each reply has sent a
/// request for this long: the hold would delay it as well.
const SHALLOW_QUIET: Duration = Duration::from_millis(10);
/// How long a shutting-down server waits for in-flight requests before closing anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub conn: ConnConfig,
    /// Event loops (`--threads`).
    pub loops: usize,
    /// Threads for blocking IO (`--io-threads`).
    pub io_threads: usize,
    /// Payload budget (`--memory-limit`).
    pub memory_limit: usize,
    /// `-r`.
    pub readonly: bool,
    /// Credentials for STARTTLS; required when `conn.tls` is not `Off`.
    pub tls: Option<ServerTls>,
    /// How long a wake-up's replies may wait for more requests (`--reply-hold`; zero: never).
    pub reply_hold: Duration,
}

/// What to serve on.
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Listener {
    fn try_clone(&self) -> io::Result<Listener> {
        Ok(match self {
            Listener::Tcp(l) => Listener::Tcp(l.try_clone()?),
            Listener::Unix(l) => Listener::Unix(l.try_clone()?),
        })
    }
}

enum LoopListener {
    Tcp(mio::net::TcpListener),
    Unix(mio::net::UnixListener),
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Serve `listeners` until `shutdown` is triggered. Blocks the calling thread; starts
/// `cfg.loops` loop threads.
pub fn serve(
    cfg: ServerConfig,
    stack: Stack,
    listeners: Vec<Listener>,
    shutdown: Arc<ServerControl>,
) -> io::Result<()> {
    let pool = BlockingPool::new(cfg.io_threads);
    let budget = Budget::new(cfg.memory_limit);
    let n = cfg.loops.max(1);
    // Every loop's poller and waker exist before any loop runs, so loops can hand accepted
    // connections to each other from the start.
    let mut polls = Vec::with_capacity(n);
    let mut wakers = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let poll = Poll::new()?;
        wakers.push(Arc::new(Waker::new(poll.registry(), WAKER)?));
        polls.push(poll);
        let (tx, rx) = mpsc::channel();
        senders.push(tx);
        receivers.push(rx);
    }
    let set = Arc::new(LoopSet {
        load: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        handoff: senders,
        wakers: wakers.clone(),
    });
    let mut handles = Vec::new();
    for (i, (poll, inbox)) in polls.into_iter().zip(receivers).enumerate() {
        let mine = listeners.iter().map(|l| l.try_clone()).collect::<io::Result<Vec<_>>>()?;
        let (cfg, stack, shutdown, pool, budget) =
            (cfg.clone(), stack.clone(), shutdown.clone(), pool.clone(), budget.clone());
        let peers = Peers { index: i, set: set.clone(), inbox };
        let waker = wakers[i].clone();
        let h =
            thread::Builder::new().name(format!("blocksmith-loop{i}")).spawn(move || -> io::Result<()> {
                let mut lp = Loop::with_poll(poll, waker, cfg, stack, pool, budget, shutdown, Some(peers))?;
                for l in mine {
                    lp.add_listener(l)?;
                }
                lp.run(false)
            })?;
        handles.push(h);
    }
    drop(listeners);
    let mut result = Ok(());
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(io::Error::other("an event loop panicked")),
        }
    }
    result
}

/// `-s`: serve exactly one connection on stdin/stdout, on the calling thread, then return.
pub fn serve_stdio(cfg: ServerConfig, stack: Stack, shutdown: Arc<ServerControl>) -> io::Result<()> {
    let pool = BlockingPool::new(cfg.io_threads);
    let budget = Budget::new(cfg.memory_limit);
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let mut lp = Loop::with_poll(poll, waker, cfg, stack, pool, budget, shutdown, None)?;
    let t = Transport::stdio()?;
    let cred = t.peer_cred();
    lp.add_conn(t, "stdin".to_string(), cred)?;
    lp.run(true)
}

enum Completion {
    Request { key: usize, gen: u64, id: RequestId, result: Result<Outcome, NbdError> },
    Open { key: usize, gen: u64, probe: bool, result: Result<Rc<dyn Layer>, NbdError> },
}

/// The loop's completion queue: layers' results wait here until the loop drains them between
/// steps. It is the [`Sink`] every client request completes to, so starting a request costs a
/// reference count, not an allocation.
#[derive(Default)]
struct CompletionQueue {
    ready: RefCell<Vec<Completion>>,
}

impl CompletionQueue {
    fn is_empty(&self) -> bool {
        self.ready.borrow().is_empty()
    }
    fn push(&self, c: Completion) {
        self.ready.borrow_mut().push(c);
    }
    /// Move what is ready into `batch` (which must be empty), leaving `batch`'s old capacity
    /// here: the two vectors take turns, so draining never allocates.
    fn take_into(&self, batch: &mut Vec<Completion>) {
        debug_assert!(batch.is_empty());
        std::mem::swap(batch, &mut *self.ready.borrow_mut());
    }
    fn push_request(&self, token: SinkToken, result: Result<Outcome, NbdError>) {
        let [key, gen, id] = token.0;
        // The token was made from these three by `request_token`, so nothing is truncated.
        let (key, id) = (key as usize, RequestId(id as u32));
        self.push(Completion::Request { key, gen, id, result });
    }
}

/// The token a request completes with: its connection's slot and generation, and its index in
/// the connection's in-flight table.
fn request_token(key: usize, gen: u64, id: RequestId) -> SinkToken {
    SinkToken([key as u64, gen, u64::from(id.0)])
}

impl Sink<ReadData> for CompletionQueue {
    fn complete(&self, token: SinkToken, result: Result<ReadData, NbdError>) {
        let outcome = result.map(|d| match d {
            ReadData::Buf(v) => Outcome::Data(v),
            ReadData::Lent(pieces) => Outcome::Lent(pieces),
        });
        self.push_request(token, outcome)
    }
}

impl Sink<()> for CompletionQueue {
    fn complete(&self, token: SinkToken, result: Result<(), NbdError>) {
        self.push_request(token, result.map(|()| Outcome::Done))
    }
}

impl Sink<Extents> for CompletionQueue {
    fn complete(&self, token: SinkToken, result: Result<Extents, NbdError>) {
        self.push_request(token, result.map(Outcome::Extents))
    }
}

/// A completion for the request `token` names, delivered to the loop's queue.
fn to_queue<T>(queue: &Rc<CompletionQueue>, token: SinkToken) -> Done<T>
where
    CompletionQueue: Sink<T>,
{
    Done::to_sink(queue.clone(), token)
}

struct Slot {
    conn: Conn,
    io: Transport,
    gen: u64,
    id: u64,
    peer: String,
    layer: Option<Rc<dyn Layer>>,
    readable: bool,
    writable: bool,
    queued: bool,
    /// Served with its replies held this wake-up (`io::moderation`).
    held: bool,
    /// Has brought two or more requests in one service: a client that keeps several in
    /// flight, whose replies moderation may hold. A client that never has waits on each reply.
    pipelining: bool,
    deadline: Option<Instant>,
    read_eof: bool,
    /// Finished and half-closed: reading and discarding until the client closes too (or this
    /// deadline passes), so unread request bytes do not turn our close into a reset that could
    /// destroy the last replies in flight to the client.
    lingering: Option<Instant>,
    /// The TLS session after STARTTLS.
    tls: Option<TlsLink>,
    /// Unix-socket credentials of the client, if it is on one.
    cred: Option<PeerCred>,
    /// Set by a layer that wants this client dropped.
    disconnect: Disconnect,
}

struct TlsLink {
    session: Box<dyn TlsSession>,
    /// The plaintext ACK has been written and the session now carries every byte.
    active: bool,
    /// The handshake has completed (and was logged).
    established: bool,
    /// close_notify has been queued.
    notify_sent: bool,
}

/// The connection must be closed now (the reason has been logged).
struct Closed;

struct Loop {
    poll: Poll,
    core: Rc<LoopCore>,
    sched: Sched,
    cfg: ServerConfig,
    stack: Stack,
    budget: Budget,
    shutdown: Arc<ServerControl>,
    listeners: Vec<LoopListener>,
    accept_paused: bool,
    emfile_logged: bool,
    conns: Slab<Slot>,
    next_gen: u64,
    run_queue: VecDeque<usize>,
    completions: Rc<CompletionQueue>,
    /// The vector the last batch of completions was drained into, kept for the next batch.
    completion_batch: Vec<Completion>,
    /// Connections whose deadline timer fired: (key, generation).
    expired: Rc<RefCell<Vec<(usize, u64)>>>,
    /// Set by the accept-retry timer.
    accept_retry: Rc<RefCell<bool>>,
    /// Connections that stopped reading without a reason we can see from here (budget).
    stalled: Vec<(usize, u64)>,
    stall_timer_armed: Rc<RefCell<bool>>,
    /// Set (from any thread) when budget frees up for a connection of this loop that is at the
    /// head of the budget's line.
    budget_turn: Arc<AtomicBool>,
    shutting_down_since: Option<Instant>,
    /// The other loops, for balancing accepted connections (`None` for `-s`).
    peers: Option<Peers>,
    /// When to hold replies for a moment (`io::moderation`).
    moderation: Moderation,
    /// This serving's replies are held: services read and dispatch, but do not write.
    hold_writes: bool,
    /// A connection brought two or more requests in one service this wake-up.
    pipelined: bool,
    /// Requests this loop's connections have received (for moderation's accounting).
    received: u64,
    /// The most requests one connection sent while its replies were held, this wake-up.
    arrived_while_held: u64,
    /// Some connection's replies were held this wake-up.
    held_any: bool,
    /// When a client that does not pipeline last brought a request (holds wait for quiet).
    shallow_at: Option<Instant>,
}

/// What the loops share to balance connections: each loop's connection count, and a way to
/// hand a connection to another loop.
struct LoopSet {
    load: Vec<AtomicUsize>,
    handoff: Vec<mpsc::Sender<Handoff>>,
    wakers: Vec<Arc<Waker>>,
}

struct Peers {
    index: usize,
    set: Arc<LoopSet>,
    inbox: mpsc::Receiver<Handoff>,
}

/// An accepted connection moving to another loop before it has been served at all.
struct Handoff {
    io: Transport,
    addr: String,
    cred: Option<PeerCred>,
}

impl Loop {
    #[allow(clippy::too_many_arguments)]
    fn with_poll(
        poll: Poll,
        waker: Arc<Waker>,
        cfg: ServerConfig,
        stack: Stack,
        pool: Arc<BlockingPool>,
        budget: Budget,
        shutdown: Arc<ServerControl>,
        peers: Option<Peers>,
    ) -> io::Result<Loop> {
        shutdown.add_waker(waker.clone());
        let budget_turn = Arc::new(AtomicBool::new(false));
        let budget = {
            let (turn, waker) = (budget_turn.clone(), waker.clone());
            budget.with_notify(Arc::new(move || {
                turn.store(true, Ordering::SeqCst);
                let _ = waker.wake();
            }))
        };
        let core = Rc::new(LoopCore::new(pool, waker, poll.registry().try_clone()?));
        let sched = Sched::new(core.clone());
        let moderation = Moderation::new(cfg.reply_hold, Instant::now());
        Ok(Loop {
            poll,
            core,
            sched,
            cfg,
            stack,
            budget,
            shutdown,
            listeners: Vec::new(),
            accept_paused: false,
            emfile_logged: false,
            conns: Slab::new(),
            next_gen: 0,
            run_queue: VecDeque::new(),
            completions: Rc::default(),
            completion_batch: Vec::new(),
            expired: Rc::new(RefCell::new(Vec::new())),
            accept_retry: Rc::new(RefCell::new(false)),
            stalled: Vec::new(),
            stall_timer_armed: Rc::new(RefCell::new(false)),
            budget_turn,
            shutting_down_since: None,
            peers,
            moderation,
            hold_writes: false,
            pipelined: false,
            received: 0,
            arrived_while_held: 0,
            held_any: false,
            shallow_at: None,
        })
    }

    /// Take the connections other loops handed to this one.
    fn take_handoffs(&mut self) {
        let Some(p) = &self.peers else { return };
        let incoming: Vec<Handoff> = p.inbox.try_iter().collect();
        for h in incoming {
            if self.shutting_down_since.is_some() {
                // Too late to serve it; dropping it closes the socket.
                if let Some(p) = &self.peers {
                    p.set.load[p.index].fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
            if let Err(e) = self.add_conn_counted(h.io, h.addr, h.cred) {
                log::warn!("cannot register connection: {e}");
            }
        }
    }

    /// Where a newly accepted connection should go: the least loaded loop, this one on a tie.
    fn pick_loop(&self) -> Option<usize> {
        let p = self.peers.as_ref()?;
        let mine = p.set.load[p.index].load(Ordering::Relaxed);
        let (best, load) = p
            .set
            .load
            .iter()
            .enumerate()
            .map(|(i, l)| (i, l.load(Ordering::Relaxed)))
            .min_by_key(|&(i, l)| (l, i != p.index))?;
        (best != p.index && load < mine).then_some(best)
    }

    fn add_listener(&mut self, l: Listener) -> io::Result<()> {
        let token = Token(FIRST_LISTENER + self.listeners.len());
        let mut ml = match l {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                LoopListener::Tcp(mio::net::TcpListener::from_std(l))
            }
            Listener::Unix(l) => {
                l.set_nonblocking(true)?;
                LoopListener::Unix(mio::net::UnixListener::from_std(l))
            }
        };
        match &mut ml {
            LoopListener::Tcp(l) => self.poll.registry().register(l, token, mio::Interest::READABLE)?,
            LoopListener::Unix(l) => self.poll.registry().register(l, token, mio::Interest::READABLE)?,
        }
        self.listeners.push(ml);
        Ok(())
    }

    fn add_conn(&mut self, io: Transport, peer: String, cred: Option<PeerCred>) -> io::Result<()> {
        if let Some(p) = &self.peers {
            p.set.load[p.index].fetch_add(1, Ordering::Relaxed);
        }
        self.add_conn_counted(io, peer, cred)
    }

    /// Register a connection already counted in this loop's load.
    fn add_conn_counted(
        &mut self,
        mut io: Transport,
        peer: String,
        cred: Option<PeerCred>,
    ) -> io::Result<()> {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) =
            io.register(self.poll.registry(), Token(CONN_BASE + 2 * key), Token(CONN_BASE + 2 * key + 1))
        {
            if let Some(p) = &self.peers {
                p.set.load[p.index].fetch_sub(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        self.next_gen += 1;
        let now = self.core.tick();
        let conn = Conn::new(self.cfg.conn.clone(), self.budget.clone(), now);
        let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
        self.shutdown.connection_opened();
        log::debug!("connection {id} from {peer}");
        entry.insert(Slot {
            conn,
            io,
            gen: self.next_gen,
            id,
            peer,
            layer: None,
            // The server speaks first: nothing can be waiting yet, and a read now would only
            // return EAGAIN. Registration reports the first bytes (epoll checks readiness when
            // a descriptor is added, so bytes that came before are not missed either).
            readable: false,
            writable: true,
            queued: false,
            held: false,
            pipelining: false,
            deadline: None,
            read_eof: false,
            lingering: None,
            tls: None,
            cred,
            disconnect: {
                let (expired, gen) = (self.expired.clone(), self.next_gen);
                Disconnect::new(move || expired.borrow_mut().push((key, gen)))
            },
        });
        self.enqueue(key);
        Ok(())
    }

    fn enqueue(&mut self, key: usize) {
        if let Some(s) = self.conns.get_mut(key) {
            if !s.queued {
                s.queued = true;
                self.run_queue.push_back(key);
            }
        }
    }

    /// The loop. `single`: return when the last connection closes (`-s`).
    fn run(&mut self, single: bool) -> io::Result<()> {
        let r = self.run_inner(single);
        // Timers and blocking work still pending hold completions of connections that are gone.
        crate::layer::tearing_down();
        r
    }

    fn run_inner(&mut self, single: bool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = self.core.tick();
            if self.shutdown.is_shutting_down() && self.shutting_down_since.is_none() {
                self.begin_shutdown(now);
            }
            if let Some(since) = self.shutting_down_since {
                if self.conns.is_empty() || now.duration_since(since) > SHUTDOWN_GRACE {
                    return Ok(());
                }
            }
            if single && self.conns.is_empty() {
                return Ok(());
            }
            let timeout = if !self.run_queue.is_empty() || !self.completions.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.core.next_deadline().map(|d| d.saturating_duration_since(now))
            };
            let timeout = match self.shutting_down_since {
                Some(_) => {
                    Some(timeout.map_or(Duration::from_millis(100), |t| t.min(Duration::from_millis(100))))
                }
                None => timeout,
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.core.tick();
            let readable = self.take_events(&events);
            let holding = self.moderation.hold().is_some();
            match self.moderation.hold().filter(|_| readable) {
                Some(hold) => {
                    // Serve this wake-up with its replies held, let the requests on their way
                    // arrive, then serve again and send everything (`io::moderation`).
                    // Only pipelining clients' replies wait; the others are answered at once.
                    // The hold sleeps the loop, so a client waiting on each reply that was
                    // active lately calls it off: it would wait out the hold too.
                    self.hold_writes = true;
                    self.held_any = false;
                    self.serve_ready();
                    self.hold_writes = false;
                    let now = self.core.tick();
                    let quiet = self.shallow_at.map_or(true, |t| now.duration_since(t) > SHALLOW_QUIET);
                    if !quiet {
                        self.serve_ready();
                    } else if self.held_any {
                        std::thread::sleep(hold);
                        if self.poll.poll(&mut events, Some(Duration::ZERO)).is_ok() {
                            self.take_events(&events);
                        }
                        self.arrived_while_held = 0;
                        self.serve_ready();
                        let now = self.core.tick();
                        self.moderation.held(now, self.received, self.arrived_while_held);
                    }
                }
                None => {
                    self.pipelined = false;
                    self.serve_ready();
                    let now = self.core.tick();
                    self.moderation.served(now, self.received, self.pipelined);
                }
            }
            if self.moderation.hold().is_some() != holding {
                let how = if holding { "stops holding" } else { "holds" };
                log::debug!("reply moderation: this loop {how} replies for pipelining clients");
            }
        }
    }

    /// Note what `events` say is ready (connections go on the run queue). True when some
    /// connection became readable.
    fn take_events(&mut self, events: &Events) -> bool {
        let mut readable = false;
        for ev in events.iter() {
            let t = ev.token().0;
            if t == WAKER.0 {
                // Blocking results are drained by run_ready below; connections handed over
                // by other loops are taken here.
                self.take_handoffs();
            } else if (WATCH_BASE..WATCH_BASE + WATCH_LIMIT).contains(&t) {
                self.core.dispatch_watch(ev.token(), readiness(ev));
            } else if t < CONN_BASE {
                if !self.accept_paused && self.shutting_down_since.is_none() {
                    self.accept(t - FIRST_LISTENER);
                }
            } else {
                let key = (t - CONN_BASE) / 2;
                if let Some(s) = self.conns.get_mut(key) {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        s.readable = true;
                        readable = true;
                    }
                    if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                        s.writable = true;
                    }
                    self.enqueue(key);
                }
            }
        }
        readable
    }

    /// Run what is ready: tasks and completions, then the queued connections.
    fn serve_ready(&mut self) {
        self.core.run_ready();
        self.after_callbacks();
        self.run_services();
    }

    /// Handle what timers and completions left behind.
    fn after_callbacks(&mut self) {
        let expired: Vec<_> = self.expired.borrow_mut().drain(..).collect();
        let now = self.core.tick();
        for (key, gen) in expired {
            if let Some(s) = self.conns.get_mut(key) {
                if s.gen == gen {
                    if s.lingering.is_some_and(|d| d <= now) {
                        self.close(key, false);
                        continue;
                    }
                    if s.deadline.is_some_and(|d| d <= now) {
                        s.deadline = None;
                        s.conn.handle_timeout(now);
                    }
                    self.enqueue(key);
                }
            }
        }
        if std::mem::take(&mut *self.accept_retry.borrow_mut()) {
            self.accept_paused = false;
            for i in 0..self.listeners.len() {
                self.accept(i);
            }
        }
        self.drain_completions();
        let turn = self.budget_turn.swap(false, Ordering::SeqCst);
        if !self.stalled.is_empty() && (turn || !*self.stall_timer_armed.borrow()) {
            let stalled = std::mem::take(&mut self.stalled);
            for (key, gen) in stalled {
                if self.conns.get(key).is_some_and(|s| s.gen == gen) {
                    self.enqueue(key);
                }
            }
        }
    }

    fn run_services(&mut self) {
        // One pass over the connections that were queued when the pass began; a connection with
        // more to do goes to the back of the queue (fairness).
        let n = self.run_queue.len();
        for _ in 0..n {
            let Some(key) = self.run_queue.pop_front() else { break };
            if let Some(s) = self.conns.get_mut(key) {
                s.queued = false;
                self.service(key);
            }
            self.drain_completions();
        }
    }

    /// Accept every waiting client on listener `index`, until the backlog is empty or the
    /// process is out of descriptors.
    ///
    /// Out of descriptors (EMFILE: this process's `ulimit -n`; ENFILE: the system's) is the
    /// server's state, not one loop's: every loop fails at once, and keeps failing while clients
    /// wait. So it is logged once when it begins (whichever loop sees it first), and the end is
    /// noted (at info, `-v`) when a loop finds the backlog empty again. Meanwhile the loop pauses
    /// accepting ([`Loop::pause_accept`]); waiting clients stay in the kernel's backlog, and
    /// one is taken each time a descriptor frees (a connection closing, or the retry timer).
    fn accept(&mut self, index: usize) {
        /// Process-wide, as descriptors are: one warning per shortage, however many loops.
        static OUT_OF_DESCRIPTORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        loop {
            let Some(listener) = self.listeners.get(index) else { return };
            let accepted = match listener {
                LoopListener::Tcp(l) => l.accept().map(|(s, a)| {
                    let _ = s.set_nodelay(true);
                    (Transport::Tcp(s), a.to_string())
                }),
                LoopListener::Unix(l) => l.accept().map(|(s, _)| (Transport::Unix(s), "unix".to_string())),
            };
            match accepted {
                Ok((t, addr)) => {
                    let cred = t.peer_cred();
                    let peer = Peer { addr, cred, is_tls: false, tls_subject: None };
                    // nbdkit's preconnect: a refused client is closed before it is served.
                    if let Err(e) = self.stack.preconnect(&peer) {
                        log::warn!("refusing connection from {}: {e}", peer.addr);
                        continue;
                    }
                    // Balance: a burst of connections all accepted by whichever loop woke first
                    // would otherwise pile onto one core.
                    if let (Some(target), Some(p)) = (self.pick_loop(), &self.peers) {
                        p.set.load[target].fetch_add(1, Ordering::Relaxed);
                        let h = Handoff { io: t, addr: peer.addr, cred };
                        match p.set.handoff[target].send(h) {
                            Ok(()) => {
                                let _ = p.set.wakers[target].wake();
                            }
                            Err(mpsc::SendError(h)) => {
                                // That loop has exited: serve it here.
                                p.set.load[target].fetch_sub(1, Ordering::Relaxed);
                                if let Err(e) = self.add_conn(h.io, h.addr, h.cred) {
                                    log::warn!("cannot register connection: {e}");
                                }
                            }
                        }
                        continue;
                    }
                    if let Err(e) = self.add_conn(t, peer.addr, cred) {
                        log::warn!("cannot register connection: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nobody is waiting any more: a shortage this loop saw is over.
                    if std::mem::take(&mut self.emfile_logged)
                        && OUT_OF_DESCRIPTORS.swap(false, Ordering::Relaxed)
                    {
                        log::info!("accept: descriptors available again; every waiting client accepted");
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // Out of descriptors: do not spin on accept. Stop, say so once, and try again
                    // after a pause or when one of our connections closes.
                    self.emfile_logged = true;
                    if !OUT_OF_DESCRIPTORS.swap(true, Ordering::Relaxed) {
                        log::warn!("accept: {e}; pausing new connections until a descriptor frees");
                    }
                    self.pause_accept();
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection only.
                    log::debug!("accept: {e}");
                    continue;
                }
            }
        }
    }

    /// Stop accepting until the retry timer fires or a connection of this loop closes (either
    /// sets `accept_retry`). At most one retry timer is pending: it holds a clone of the flag
    /// until it runs, so a second clone means one is armed. (Re-arming on every pause would add
    /// a timer per connection closed during a shortage, each retrying every `ACCEPT_RETRY`.)
    fn pause_accept(&mut self) {
        if self.accept_paused {
            return;
        }
        self.accept_paused = true;
        if Rc::strong_count(&self.accept_retry) > 1 {
            return;
        }
        let flag = self.accept_retry.clone();
        self.sched.after(ACCEPT_RETRY, move || *flag.borrow_mut() = true);
    }

    fn begin_shutdown(&mut self, now: Instant) {
        self.shutting_down_since = Some(now);
        for l in &mut self.listeners {
            let _ = match l {
                LoopListener::Tcp(l) => self.poll.registry().deregister(l),
                LoopListener::Unix(l) => self.poll.registry().deregister(l),
            };
        }
        self.listeners.clear();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            if let Some(s) = self.conns.get_mut(key) {
                s.conn.shutdown();
            }
            self.enqueue(key);
        }
    }

    fn drain_completions(&mut self) {
        loop {
            let mut batch = std::mem::take(&mut self.completion_batch);
            self.completions.take_into(&mut batch);
            if batch.is_empty() {
                self.completion_batch = batch;
                return;
            }
            for c in batch.drain(..) {
                match c {
                    Completion::Request { key, gen, id, result } => {
                        if let Some(s) = self.conns.get_mut(key) {
                            if s.gen == gen {
                                let result = match result {
                                    // A TLS session must see the bytes: read lent file ranges
                                    // (cached, so quick) into a buffer.
                                    Ok(Outcome::Lent(p))
                                        if s.tls.is_some() && p.iter().any(Lent::is_file) =>
                                    {
                                        ReadData::Lent(p).into_vec().map(Outcome::Data).map_err(|e| {
                                            NbdError::io(format!("reading a lent file range: {e}"))
                                        })
                                    }
                                    other => other,
                                };
                                s.conn.handle_result(id, result);
                                self.enqueue(key);
                            }
                        }
                    }
                    Completion::Open { key, gen, probe, result } => {
                        let Some(s) = self.conns.get_mut(key).filter(|s| s.gen == gen) else {
                            // The connection went away while its export was opening.
                            if let Ok(layer) = result {
                                layer.close();
                            }
                            continue;
                        };
                        if s.gen != gen {
                            if let Ok(layer) = result {
                                layer.close();
                            }
                            continue;
                        }
                        let now = self.core.now_instant();
                        match result {
                            Ok(layer) => {
                                let info = layer.info();
                                if probe {
                                    layer.close();
                                } else if let Some(old) = s.layer.replace(layer) {
                                    old.close();
                                }
                                s.conn.handle_export(Ok(info), now);
                            }
                            Err(e) => s.conn.handle_export(Err(e), now),
                        }
                        self.enqueue(key);
                    }
                }
            }
            self.completion_batch = batch;
        }
    }

    /// One service pass for one connection: read, decode, dispatch, write, maybe close.
    fn service(&mut self, key: usize) {
        let now = self.core.now_instant();
        let mut more = false;
        if self.conns.get(key).is_some_and(|s| s.lingering.is_some()) {
            return self.linger(key, now);
        }
        let requests_before = self.conns.get(key).map_or(0, |s| s.conn.requests_received());
        {
            let Some(s) = self.conns.get_mut(key) else { return };
            let read = if s.tls_active() { s.read_tls(now) } else { s.read_plain(now) };
            match read {
                Ok(m) => more |= m,
                Err(Closed) => return self.close(key, false),
            }
            if s.conn.process(now) {
                more = true;
            }
            // Processing may have unblocked reading (a request waiting for budget got it): the
            // socket's unread bytes raise no new edge, so come back for them.
            if s.readable && !s.read_eof && s.conn.wants_read() {
                more = true;
            }
        }
        self.dispatch_events(key);
        self.drain_completions();
        let Some(s) = self.conns.get_mut(key) else { return };
        if s.disconnect.requested() == Some(true) {
            // Forced: drop the client without answering what is in flight.
            log::debug!("connection {}: a layer dropped the client", s.id);
            return self.close(key, false);
        }
        let received = s.conn.requests_received().saturating_sub(requests_before);
        self.received += received;
        if received >= 2 {
            self.pipelined = true;
            s.pipelining = true;
        } else if received > 0 && !s.pipelining {
            self.shallow_at = Some(now);
        }
        if self.hold_writes && s.pipelining {
            // Replies wait for the second serving of this wake-up (`io::moderation`).
            s.held = true;
            self.held_any = true;
            return self.enqueue(key);
        }
        if std::mem::take(&mut s.held) {
            // What this client sent while its replies waited.
            self.arrived_while_held = self.arrived_while_held.max(received);
        }
        // Write what is queued.
        let written = if s.tls_active() { s.write_tls() } else { s.write_plain() };
        let mut wrote = match written {
            Ok(w) => w,
            Err(Closed) => return self.close(key, false),
        };
        // STARTTLS: once its ACK has gone out in plaintext, the session takes over the socket.
        if let Some(link) = s.tls.as_mut() {
            if !link.active && !s.conn.has_output() && !s.conn.is_aborted() {
                link.active = true;
                s.conn.handle_tls_started();
                log::debug!("connection {}: STARTTLS acknowledged, TLS handshake starts", s.id);
                // The client's ClientHello may already be waiting: come back to read it.
                wrote = true;
            }
        }
        // Graceful: read no more requests, answer those in flight, then close.
        if s.disconnect.requested() == Some(false) && !s.conn.is_finished() {
            s.conn.shutdown();
        }
        if s.conn.is_aborted() {
            if let Some(v) = s.conn.abort_reason() {
                log::warn!("connection {} from {}: {}; disconnecting", s.id, s.peer, v.0);
            }
            return self.close(key, false);
        }
        if s.conn.is_finished() && !s.conn.has_output() && (s.conn.in_flight() == 0 || s.read_eof) {
            if s.tls_active() {
                // The last replies may still be ciphertext inside the session: end the session
                // properly (close_notify) and let it all drain before closing.
                if let Some(link) = s.tls.as_mut().filter(|l| !l.notify_sent) {
                    link.notify_sent = true;
                    link.session.send_close_notify();
                }
                if s.write_tls().is_err() {
                    return self.close(key, false);
                }
                if s.tls.as_ref().is_some_and(|l| l.session.wants_write()) {
                    // The writable event brings us back.
                    return;
                }
            }
            if s.read_eof {
                return self.close(key, true);
            }
            s.io.shutdown_write();
            s.lingering = Some(now + LINGER);
            let expired = self.expired.clone();
            let gen = s.gen;
            self.sched.at(now + LINGER, move || expired.borrow_mut().push((key, gen)));
            return self.linger(key, now);
        }
        // Deadline bookkeeping.
        let deadline = s.conn.poll_deadline();
        if deadline != s.deadline {
            s.deadline = deadline;
            if let Some(at) = deadline {
                let expired = self.expired.clone();
                let gen = s.gen;
                self.sched.at(at, move || expired.borrow_mut().push((key, gen)));
            }
        }
        // Waiting in the budget's line: the notify set up in `with_poll` brings the connection
        // back when its turn comes; the timer is a safety net.
        if s.conn.waiting_for_budget() {
            self.stalled.push((key, s.gen));
            if !*self.stall_timer_armed.borrow() {
                *self.stall_timer_armed.borrow_mut() = true;
                let armed = self.stall_timer_armed.clone();
                self.sched.after(BUDGET_RETRY, move || *armed.borrow_mut() = false);
            }
        }
        // Writing may have let the connection decode more (its output cap), and that leaves
        // events for the next pass.
        if more || wrote || s.conn.wants_process() {
            self.enqueue(key);
        }
    }

    /// A finished, half-closed connection: discard what the client still sends until it closes.
    fn linger(&mut self, key: usize, now: Instant) {
        let Some(s) = self.conns.get_mut(key) else { return };
        let mut sink = [0u8; 4096];
        loop {
            match s.io.read(&mut sink) {
                Ok(0) => return self.close(key, false),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.close(key, false),
            }
        }
        s.readable = false;
        if s.lingering.is_some_and(|d| d <= now) {
            self.close(key, false);
        }
    }

    fn dispatch_events(&mut self, key: usize) {
        loop {
            let Some(s) = self.conns.get_mut(key) else { return };
            let Some(ev) = s.conn.poll_event() else { return };
            let gen = s.gen;
            match ev {
                Event::ListExports => {
                    let (is_tls, tls_subject) = match &s.tls {
                        Some(l) if l.active => (true, l.session.peer_subject()),
                        _ => (false, None),
                    };
                    let peer = Peer { addr: s.peer.clone(), cred: s.cred, is_tls, tls_subject };
                    let list = self.stack.list_exports(&peer);
                    s.conn.handle_export_list(list);
                }
                Event::OpenExport { name, probe } => {
                    let (is_tls, tls_subject) = match &s.tls {
                        Some(l) if l.active => (true, l.session.peer_subject()),
                        _ => (false, None),
                    };
                    if is_tls {
                        log::debug!(
                            "connection {}: opening export {name:?} over TLS, client certificate {}",
                            s.id,
                            tls_subject.as_deref().unwrap_or("(none)")
                        );
                    }
                    let cx = OpenCx {
                        export_name: name,
                        readonly: self.cfg.readonly,
                        is_tls,
                        tls_subject,
                        peer: s.peer.clone(),
                        conn_id: s.id,
                        sched: self.sched.clone(),
                        control: self.shutdown.clone(),
                        peer_cred: s.cred,
                        disconnect: s.disconnect.clone(),
                        budget: self.budget.clone(),
                    };
                    let c = self.completions.clone();
                    self.stack.open(
                        &cx,
                        Done::new(move |result| c.push(Completion::Open { key, gen, probe, result })),
                    );
                }
                Event::Request(req) => match s.layer.clone() {
                    Some(layer) => start_request(&layer, req, key, gen, &self.completions),
                    None => s.conn.handle_result(req.id, Err(NbdError::io("no export is open"))),
                },
                Event::StartTls => {
                    if s.begin_tls(self.cfg.tls.as_ref()).is_err() {
                        return self.close(key, false);
                    }
                }
            }
        }
    }

    fn close(&mut self, key: usize, graceful: bool) {
        if !self.conns.contains(key) {
            return;
        }
        let mut s = self.conns.remove(key);
        if graceful {
            s.io.shutdown_write();
        }
        s.io.deregister(self.poll.registry());
        if let Some(layer) = s.layer.take() {
            layer.close();
        }
        log::debug!("connection {} from {} closed", s.id, s.peer);
        drop(s);
        self.shutdown.connection_closed();
        if let Some(p) = &self.peers {
            p.set.load[p.index].fetch_sub(1, Ordering::Relaxed);
        }
        // A descriptor just freed: if accepting was paused for EMFILE, try again now.
        if self.accept_paused {
            *self.accept_retry.borrow_mut() = true;
        }
    }
}

impl Slot {
    fn tls_active(&self) -> bool {
        self.tls.as_ref().is_some_and(|l| l.active)
    }

    /// Socket bytes straight into the connection's buffers (no TLS).
    fn read_plain(&mut self, now: Instant) -> Result<bool, Closed> {
        for _ in 0..READS_PER_PASS {
            if !self.readable || self.read_eof || !self.conn.wants_read() {
                break;
            }
            let buf = self.conn.read_buf();
            if buf.is_empty() {
                break;
            }
            let offered = buf.len();
            match self.io.read(buf) {
                Ok(0) => {
                    self.read_eof = true;
                    self.conn.handle_read(0, now);
                }
                Ok(n) => {
                    // A short read drained the socket: anything arriving later raises a fresh
                    // edge, so skip the read that would only say EAGAIN. Requests that arrive
                    // meanwhile are read together on the next pass (fewer, larger reads).
                    if n < offered {
                        self.readable = false;
                    }
                    self.conn.handle_read(n, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    self.conn.handle_would_block();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("connection {}: read: {e}", self.id);
                    return Err(Closed);
                }
            }
        }
        Ok(self.readable && !self.read_eof && self.conn.wants_read())
    }

    /// Replies straight from the connection's queue to the socket (no TLS). True when bytes
    /// were written.
    fn write_plain(&mut self) -> Result<bool, Closed> {
        let mut wrote = false;
        while self.writable && self.conn.has_output() {
            if let Some((file, offset, len)) = self.conn.output_file() {
                match self.io.sendfile(file, offset, len) {
                    Ok(0) => {
                        // The file shrank under a reply whose length is already on the wire.
                        log::warn!("connection {}: sendfile: the file ended early; disconnecting", self.id);
                        return Err(Closed);
                    }
                    Ok(n) => {
                        wrote = true;
                        self.conn.handle_written(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!("connection {}: sendfile: {e}", self.id);
                        return Err(Closed);
                    }
                }
                continue;
            }
            let mut iov = [IoSlice::new(&[]); 64];
            let n = self.conn.fill_iovecs(&mut iov);
            if n == 0 {
                break;
            }
            match self.io.write_vectored(&iov[..n]) {
                Ok(0) => {
                    self.writable = false;
                    break;
                }
                Ok(w) => {
                    wrote = true;
                    self.conn.handle_written(w)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("connection {}: write: {e}", self.id);
                    return Err(Closed);
                }
            }
        }
        Ok(wrote)
    }

    /// Through the TLS session: decrypted bytes first (the connection is waiting for them),
    /// then ciphertext from the socket when the session has none. True when it stopped at the
    /// per-pass limit with more to do.
    fn read_tls(&mut self, now: Instant) -> Result<bool, Closed> {
        let Slot { conn, io, tls, readable, read_eof, id, peer, .. } = self;
        let Some(link) = tls.as_mut() else { return Ok(false) };
        for _ in 0..READS_PER_PASS {
            if *read_eof || !conn.wants_read() {
                return Ok(false);
            }
            let buf = conn.read_buf();
            if buf.is_empty() {
                return Ok(false);
            }
            match link.session.read_plain(buf) {
                Ok(0) => {
                    // close_notify: a clean end of the client's input.
                    *read_eof = true;
                    conn.handle_read(0, now);
                    return Ok(false);
                }
                Ok(n) => {
                    conn.handle_read(n, now);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // The socket closed without close_notify: for NBD just an EOF (the protocol
                    // has its own end markers), as nbdkit treats it.
                    *read_eof = true;
                    conn.handle_read(0, now);
                    return Ok(false);
                }
                Err(e) => {
                    log::warn!("connection {id} from {peer}: TLS: {e}; disconnecting");
                    return Err(Closed);
                }
            }
            // Nothing decrypted: bring in ciphertext. While handshake records wait to be sent
            // the session wants none; the write phase flushes them and brings us back.
            if !*readable || !link.session.wants_read() {
                return Ok(false);
            }
            match link.session.read_tls(io) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *readable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("connection {id}: read: {e}");
                    return Err(Closed);
                }
            }
            if let Err(e) = link.session.process() {
                let what = if link.established { "TLS error" } else { "TLS handshake failed" };
                log::warn!("connection {id} from {peer}: {what}: {e}; disconnecting");
                // The alert the session queued, best effort: the client learns why.
                let _ = link.session.write_tls(io);
                return Err(Closed);
            }
            if !link.established && !link.session.is_handshaking() {
                link.established = true;
                log::debug!("connection {id} from {peer}: TLS established: {}", link.session.describe());
            }
        }
        Ok(conn.wants_read() && !*read_eof)
    }

    /// Replies into the session (bounded by its buffer), ciphertext out to the socket, until
    /// one of them is full. True when anything moved.
    fn write_tls(&mut self) -> Result<bool, Closed> {
        let Slot { conn, io, tls, writable, id, peer, .. } = self;
        let Some(link) = tls.as_mut() else { return Ok(false) };
        let mut wrote = false;
        loop {
            while conn.has_output() {
                let mut iov = [IoSlice::new(&[]); 64];
                let n = conn.fill_iovecs(&mut iov);
                if n == 0 {
                    break;
                }
                match link.session.write_plain(&iov[..n]) {
                    Ok(0) => break,
                    Ok(w) => {
                        conn.handle_written(w);
                        wrote = true;
                    }
                    Err(e) => {
                        log::warn!("connection {id} from {peer}: TLS: {e}; disconnecting");
                        return Err(Closed);
                    }
                }
            }
            if !*writable || !link.session.wants_write() {
                return Ok(wrote);
            }
            match link.session.write_tls(io) {
                Ok(0) => {
                    *writable = false;
                    return Ok(wrote);
                }
                Ok(_) => wrote = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *writable = false;
                    return Ok(wrote);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("connection {id}: write: {e}");
                    return Err(Closed);
                }
            }
        }
    }

    /// `Event::StartTls`: make the session. It joins the byte path once the ACK is written.
    fn begin_tls(&mut self, creds: Option<&ServerTls>) -> Result<(), Closed> {
        let Some(creds) = creds else {
            log::error!("connection {}: STARTTLS accepted but no TLS credentials are loaded", self.id);
            return Err(Closed);
        };
        let session = creds.new_session().map_err(|e| {
            log::warn!("connection {} from {}: cannot start TLS: {e}", self.id, self.peer);
            Closed
        })?;
        // The ACK has not been written yet, so the client cannot have started its handshake:
        // any byte already in the socket is injected plaintext (checklist §F item 77). The
        // connection has already dropped any it had buffered; this catches what the kernel
        // holds. Bytes arriving later go to the TLS engine, which rejects them.
        let mut probe = [0u8; 1];
        match self.io.read(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
            // Not checked this time; such bytes still meet the TLS engine, never the options.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(0) => {
                log::debug!("connection {}: client closed after STARTTLS", self.id);
                return Err(Closed);
            }
            Ok(_) => {
                log::warn!(
                    "connection {} from {}: plaintext sent after NBD_OPT_STARTTLS before its reply; \
                     disconnecting",
                    self.id,
                    self.peer
                );
                return Err(Closed);
            }
            Err(e) => {
                log::debug!("connection {}: read: {e}", self.id);
                return Err(Closed);
            }
        }
        self.tls = Some(TlsLink { session, active: false, established: false, notify_sent: false });
        Ok(())
    }
}

impl LoopCore {
    fn now_instant(&self) -> Instant {
        crate::sched::Scheduler::now(self)
    }
}

/// Hand a decoded request to the layer stack; its completion lands on the loop's queue.
fn start_request(layer: &Rc<dyn Layer>, req: Request, key: usize, gen: u64, queue: &Rc<CompletionQueue>) {
    let Request { id, op, offset, flags } = req;
    let token = request_token(key, gen, id);
    match op {
        Op::Read { count } => layer.pread_lent(count, offset, flags, to_queue(queue, token)),
        Op::Write { data } => layer.pwrite(data, offset, flags, to_queue(queue, token)),
        Op::Flush => layer.flush(flags, to_queue(queue, token)),
        Op::Trim { count } => layer.trim(count, offset, flags, to_queue(queue, token)),
        Op::Zero { count } => layer.zero(count, offset, flags, to_queue(queue, token)),
        Op::Cache { count } => layer.cache(count, offset, flags, to_queue(queue, token)),
        Op::BlockStatus { count } => layer.extents(count, offset, flags, to_queue(queue, token)),
    }
}
