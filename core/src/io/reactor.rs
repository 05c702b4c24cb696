//! A loop's scheduler and the blocking pool.
//!
//! [`LoopCore`] is what layers on this loop see through `Sched`: timers, deferred tasks and
//! blocking work. It is single-threaded (`Rc`, `RefCell`); the only cross-thread path is the
//! blocking pool, whose workers send results back over a channel and wake the loop's poller.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

use slab::Slab;

use crate::sched::{
    BlockingThen, BlockingWork, Readiness, Sched, Scheduler, Task, TimerId, WatchId, WatchTask,
};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads for work that would block an event loop (syscalls on regular files,
/// which epoll cannot watch). Shared by every loop; sized by `--io-threads`.
pub struct BlockingPool {
    tx: Mutex<Sender<Job>>,
}

impl BlockingPool {
    pub fn new(threads: usize) -> Arc<BlockingPool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = thread::Builder::new().name(format!("blocksmith-io{i}")).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(guard) => guard.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(),
                    Err(_) => return, // every sender gone: the server is exiting
                }
            });
            if let Err(e) = spawned {
                log::error!("cannot start blocking IO thread: {e}");
            }
        }
        Arc::new(BlockingPool { tx: Mutex::new(tx) })
    }

    fn submit(&self, job: Job) {
        match self.tx.lock() {
            Ok(tx) => {
                if tx.send(job).is_err() {
                    log::error!("blocking pool is gone; work dropped");
                }
            }
            Err(_) => log::error!("blocking pool lock poisoned; work dropped"),
        }
    }
}

type BlockingResult = (usize, Box<dyn Any + Send>);

/// One event loop's scheduler state.
pub struct LoopCore {
    now: Cell<Instant>,
    next_timer: Cell<u64>,
    timers: RefCell<BTreeMap<(Instant, u64), Task>>,
    timer_at: RefCell<HashMap<u64, Instant>>,
    deferred: RefCell<VecDeque<Task>>,
    waiting: RefCell<Slab<BlockingThen>>,
    pool: Arc<BlockingPool>,
    results_tx: Sender<BlockingResult>,
    results_rx: Receiver<BlockingResult>,
    waker: Arc<mio::Waker>,
    registry: Registry,
    /// Watched fds; a task is taken out while it runs (so it may unwatch itself).
    watches: RefCell<Slab<Watch>>,
}

struct Watch {
    fd: RawFd,
    task: Option<WatchTask>,
}

/// Tokens `WATCH_BASE..WATCH_BASE + WATCH_LIMIT` belong to fd watches.
pub const WATCH_BASE: usize = 1 << 19;
pub const WATCH_LIMIT: usize = 1 << 19;
/// The token that wakes a loop from another thread.
pub const WAKER_TOKEN: Token = Token(0);

impl LoopCore {
    pub fn new(pool: Arc<BlockingPool>, waker: Arc<mio::Waker>, registry: Registry) -> LoopCore {
        let (results_tx, results_rx) = mpsc::channel();
        LoopCore {
            registry,
            watches: RefCell::new(Slab::new()),
            now: Cell::new(Instant::now()),
            next_timer: Cell::new(0),
            timers: RefCell::new(BTreeMap::new()),
            timer_at: RefCell::new(HashMap::new()),
            deferred: RefCell::new(VecDeque::new()),
            waiting: RefCell::new(Slab::new()),
            pool,
            results_tx,
            results_rx,
            waker,
        }
    }

    /// Refresh the cached clock (once per loop turn: layers read `now` often).
    pub fn tick(&self) -> Instant {
        let n = Instant::now();
        self.now.set(n);
        n
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.deferred.borrow().is_empty() {
            return Some(self.now.get());
        }
        self.timers.borrow().keys().next().map(|(at, _)| *at)
    }

    /// Run due timers, finished blocking work and deferred tasks. Returns how many ran.
    pub fn run_ready(&self) -> usize {
        let mut ran = 0;
        while let Ok((slot, value)) = self.results_rx.try_recv() {
            let then = self.waiting.borrow_mut().try_remove(slot);
            match then {
                Some(then) => then(value),
                None => debug_assert!(false, "blocking result for an unknown slot"),
            }
            ran += 1;
        }
        let now = self.now.get();
        loop {
            let task = {
                let mut timers = self.timers.borrow_mut();
                match timers.keys().next().copied() {
                    Some(key) if key.0 <= now => {
                        self.timer_at.borrow_mut().remove(&key.1);
                        timers.remove(&key)
                    }
                    _ => None,
                }
            };
            match task {
                Some(t) => {
                    t();
                    ran += 1;
                }
                None => break,
            }
        }
        // Only the tasks deferred before this point: a task that defers another must not starve
        // the poller.
        let n = self.deferred.borrow().len();
        for _ in 0..n {
            let task = self.deferred.borrow_mut().pop_front();
            if let Some(t) = task {
                t();
                ran += 1;
            }
        }
        ran
    }

    pub fn blocking_in_flight(&self) -> usize {
        self.waiting.borrow().len()
    }

    /// Deliver a readiness event for a watch token.
    pub fn dispatch_watch(&self, token: Token, ready: Readiness) {
        let key = token.0 - WATCH_BASE;
        let task = self.watches.borrow_mut().get_mut(key).and_then(|w| w.task.take());
        if let Some(mut task) = task {
            task(ready);
            // Put it back unless it unwatched itself (and the slot was maybe reused).
            if let Some(w) = self.watches.borrow_mut().get_mut(key) {
                if w.task.is_none() {
                    w.task = Some(task);
                }
            }
        }
    }
}

/// Readiness from a mio event.
pub fn readiness(ev: &mio::event::Event) -> Readiness {
    Readiness {
        readable: ev.is_readable(),
        writable: ev.is_writable(),
        closed: ev.is_read_closed() || ev.is_write_closed() || ev.is_error(),
    }
}

/// A single event loop with nothing but a scheduler, for tests of layers that wait on real
/// fds, timers or the blocking pool (the simulation cannot watch fds).
pub struct LocalLoop {
    poll: Poll,
    core: Rc<LoopCore>,
}

impl LocalLoop {
    pub fn new() -> std::io::Result<LocalLoop> {
        let poll = Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER_TOKEN)?);
        let registry = poll.registry().try_clone()?;
        let core = Rc::new(LoopCore::new(BlockingPool::new(2), waker, registry));
        Ok(LocalLoop { poll, core })
    }

    pub fn sched(&self) -> Sched {
        Sched::new(self.core.clone())
    }

    /// Turn the loop until `done()` or `limit` passes; returns whether `done()` became true.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + limit;
        let mut events = Events::with_capacity(64);
        loop {
            let now = self.core.tick();
            self.core.run_ready();
            if done() {
                return true;
            }
            if now >= end {
                return false;
            }
            let timeout =
                self.core.next_deadline().map_or(end, |d| d.min(end)).saturating_duration_since(now);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return false;
                }
            }
            self.core.tick();
            for ev in events.iter() {
                let t = ev.token().0;
                if (WATCH_BASE..WATCH_BASE + WATCH_LIMIT).contains(&t) {
                    self.core.dispatch_watch(ev.token(), readiness(ev));
                }
            }
        }
    }
}

impl Scheduler for LoopCore {
    fn now(&self) -> Instant {
        self.now.get()
    }

    fn set_timer(&self, at: Instant, task: Task) -> TimerId {
        let id = self.next_timer.get() + 1;
        self.next_timer.set(id);
        self.timers.borrow_mut().insert((at, id), task);
        self.timer_at.borrow_mut().insert(id, at);
        TimerId(id)
    }

    fn cancel_timer(&self, id: TimerId) {
        let at = self.timer_at.borrow_mut().remove(&id.0);
        if let Some(at) = at {
            let task = self.timers.borrow_mut().remove(&(at, id.0));
            drop(task);
        }
    }

    fn spawn_blocking(&self, work: BlockingWork, then: BlockingThen) {
        let slot = self.waiting.borrow_mut().insert(then);
        let tx = self.results_tx.clone();
        let waker = self.waker.clone();
        self.pool.submit(Box::new(move || {
            let value = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
                Ok(v) => v,
                Err(_) => {
                    // A panic in blocking work is a bug in a backend; its request would hang.
                    log::error!("panic in blocking work; aborting");
                    std::process::abort();
                }
            };
            // The loop may have exited (server shutting down): nothing to deliver to then.
            if tx.send((slot, value)).is_ok() {
                let _ = waker.wake();
            }
        }));
    }

    fn defer(&self, task: Task) {
        self.deferred.borrow_mut().push_back(task);
    }

    fn watch(&self, fd: RawFd, readable: bool, writable: bool, task: WatchTask) -> std::io::Result<WatchId> {
        let interest = match (readable, writable) {
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (false, true) => Interest::WRITABLE,
            _ => Interest::READABLE,
        };
        let mut watches = self.watches.borrow_mut();
        let entry = watches.vacant_entry();
        let key = entry.key();
        if key >= WATCH_LIMIT {
            return Err(std::io::Error::other("too many watched file descriptors on this loop"));
        }
        self.registry.register(&mut SourceFd(&fd), Token(WATCH_BASE + key), interest)?;
        entry.insert(Watch { fd, task: Some(task) });
        Ok(WatchId(key))
    }

    fn unwatch(&self, id: WatchId) {
        let removed = self.watches.borrow_mut().try_remove(id.0);
        if let Some(w) = removed {
            let _ = self.registry.deregister(&mut SourceFd(&w.fd));
            drop(w.task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn watched_fd_wakes_the_loop_and_can_unwatch_itself() {
        let mut lp = LocalLoop::new().unwrap();
        let sched = lp.sched();
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let got = Rc::new(RefCell::new(Vec::new()));
        let id = Rc::new(Cell::new(None));
        let (g, i, s2) = (got.clone(), id.clone(), sched.clone());
        let mut reader = b;
        let w = sched
            .watch(reader.as_raw_fd(), true, false, move |ready| {
                let mut buf = [0u8; 16];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => g.borrow_mut().extend_from_slice(&buf[..n]),
                        Err(_) => break,
                    }
                }
                if ready.closed || g.borrow().len() >= 5 {
                    if let Some(id) = i.get() {
                        s2.unwatch(id);
                    }
                }
            })
            .unwrap();
        id.set(Some(w));
        // A timer and blocking work share the loop with the watch.
        let fired = Rc::new(Cell::new(false));
        let f = fired.clone();
        sched.after(Duration::from_millis(20), move || f.set(true));
        let blocked = Rc::new(Cell::new(0));
        let bl = blocked.clone();
        sched.blocking(|| 6 * 7, move |v| bl.set(v));
        a.write_all(b"hello").unwrap();
        assert!(lp.run_until(Duration::from_secs(5), || got.borrow().len() == 5
            && fired.get()
            && blocked.get() == 42));
        assert_eq!(&*got.borrow(), b"hello");
    }
}
