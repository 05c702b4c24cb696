//! An asynchronous FIFO lock, shared or exclusive, that connections on different event loops can
//! share: noparallel's `serialize=` modes and blocksize's read-modify-write use it.
//!
//! Nothing here blocks. A request that cannot have the lock leaves a continuation with its
//! connection's [`Waiter`] and returns. Whoever releases the lock grants it, under the lock's
//! mutex, to the tickets at the front of the queue, then wakes each ticket's waiter on the
//! waiter's own event loop, the only place its `Rc` state may be touched:
//!
//! - a waiter on the releasing thread (same loop) is woken with `Sched::defer`;
//! - a waiter on another loop is woken through its mailbox, one end of a Unix socket pair that
//!   its loop watches.
//!
//! A scheduler that cannot watch descriptors at all (the test simulation) is single-threaded, so
//! the first path is all it needs. A waiter that could not get or watch a socket pair on a real
//! loop (out of descriptors) polls its tickets on a short timer: slower, never stuck.
//!
//! Grants are strictly first come, first served: a shared request behind a waiting exclusive one
//! waits too, so a stream of readers cannot starve a writer.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};
use std::time::Duration;

use blocksmith_core::sched::{Readiness, Sched, TimerId, WatchId};

/// How a holder shares the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Any number of shared holders at once, but no exclusive one.
    Shared,
    /// One holder, nobody else.
    Exclusive,
}

static NEXT_WAITER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The waiters living on this thread's loop, by id, for same-thread wake-ups.
    static WAITERS: RefCell<HashMap<u64, Weak<WaiterInner>>> = RefCell::new(HashMap::new());
}

/// How often a waiter without a watched mailbox looks at its tickets.
const POLL: Duration = Duration::from_millis(1);

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const CANCELLED: u8 = 2;

/// The lock itself; `Send + Sync`, kept in a factory (`Arc`) to span loops or in a connection.
#[derive(Default)]
pub struct XLock {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    shared: usize,
    exclusive: bool,
    queue: VecDeque<Arc<Ticket>>,
}

/// One queued request for the lock. `status` only changes under the lock's mutex.
struct Ticket {
    mode: Mode,
    status: AtomicU8,
    /// Who is waiting: the waiter's thread and id, and its mailbox if it has one.
    thread: ThreadId,
    waiter: u64,
    mailbox: Option<Arc<Mailbox>>,
}

impl Ticket {
    /// Tell the waiter its ticket was granted. Called without the lock's mutex held.
    fn wake(&self) {
        if self.thread == thread::current().id() {
            let inner = WAITERS.with(|w| w.borrow().get(&self.waiter).and_then(Weak::upgrade));
            // A waiter that is gone has already given its tickets up.
            if let Some(inner) = inner {
                let weak = Rc::downgrade(&inner);
                inner.sched.defer(move || WaiterInner::wake(&weak));
            }
        } else if let Some(m) = &self.mailbox {
            m.poke();
        }
    }
}

impl State {
    fn compatible(&self, mode: Mode) -> bool {
        match mode {
            Mode::Shared => !self.exclusive,
            Mode::Exclusive => !self.exclusive && self.shared == 0,
        }
    }

    fn take(&mut self, mode: Mode) {
        match mode {
            Mode::Shared => self.shared += 1,
            Mode::Exclusive => self.exclusive = true,
        }
    }

    fn put(&mut self, mode: Mode) {
        match mode {
            Mode::Shared => self.shared = self.shared.saturating_sub(1),
            Mode::Exclusive => self.exclusive = false,
        }
    }

    /// Grant the lock to the front of the queue for as long as it is compatible; the tickets
    /// returned must be woken once the mutex is released.
    fn grant_waiting(&mut self) -> Vec<Arc<Ticket>> {
        let mut granted = Vec::new();
        while let Some(t) = self.queue.front() {
            if !self.compatible(t.mode) {
                break;
            }
            let mode = t.mode;
            self.take(mode);
            if let Some(t) = self.queue.pop_front() {
                t.status.store(GRANTED, Ordering::SeqCst);
                granted.push(t);
            }
        }
        granted
    }
}

impl XLock {
    pub fn new() -> Arc<XLock> {
        Arc::new(XLock::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a few counters and a queue, consistent after every statement that
        // could panic; a poisoned mutex is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take the lock at once if it is free and nobody is queued.
    fn try_take(&self, mode: Mode) -> bool {
        let mut st = self.state();
        let free = st.queue.is_empty() && st.compatible(mode);
        if free {
            st.take(mode);
        }
        free
    }

    fn release(&self, mode: Mode) {
        let granted = {
            let mut st = self.state();
            st.put(mode);
            st.grant_waiting()
        };
        for t in granted {
            t.wake();
        }
    }

    /// Give up a ticket: dequeue it if it is still waiting, release it if it was granted.
    fn cancel(&self, ticket: &Arc<Ticket>) {
        let granted = {
            let mut st = self.state();
            match ticket.status.load(Ordering::SeqCst) {
                GRANTED => {
                    st.put(ticket.mode);
                    ticket.status.store(CANCELLED, Ordering::SeqCst);
                }
                WAITING => {
                    st.queue.retain(|t| !Arc::ptr_eq(t, ticket));
                    ticket.status.store(CANCELLED, Ordering::SeqCst);
                }
                _ => {}
            }
            // A waiting exclusive ticket at the front may have held shared ones back.
            st.grant_waiting()
        };
        for t in granted {
            t.wake();
        }
    }

    /// Holders right now: (shared, exclusive). For tests and debugging.
    #[cfg(test)]
    pub fn holders(&self) -> (usize, bool) {
        let st = self.state();
        (st.shared, st.exclusive)
    }
}

/// Holding the lock; dropping it releases the lock (from any thread).
pub struct Guard {
    lock: Arc<XLock>,
    mode: Mode,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.lock.release(self.mode)
    }
}

/// A wake-up channel into one event loop: the loop watches `rx`, anyone writes to `tx`.
struct Mailbox {
    rx: UnixStream,
    tx: UnixStream,
}

impl Mailbox {
    fn new() -> std::io::Result<Mailbox> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Mailbox { rx, tx })
    }

    fn poke(&self) {
        // A full socket buffer means a wake-up is already pending, which is all a poke asks.
        let _ = (&self.tx).write(&[1]);
    }

    fn drain(&self) {
        let mut sink = [0u8; 256];
        while let Ok(n) = (&self.rx).read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
}

struct Pending {
    lock: Arc<XLock>,
    ticket: Arc<Ticket>,
    cont: Box<dyn FnOnce(Guard)>,
}

/// One connection's (or one layer instance's) side of waiting: the continuations of its queued
/// tickets, run on its loop when granted. Dropping it gives up every ticket it still holds.
pub struct Waiter {
    inner: Rc<WaiterInner>,
}

struct WaiterInner {
    id: u64,
    sched: Sched,
    mailbox: RefCell<Option<Arc<Mailbox>>>,
    /// No mailbox could be made or watched: poll instead.
    polling: Cell<bool>,
    /// The scheduler cannot watch descriptors, so it is single-threaded: no cross-loop grants.
    local_only: Cell<bool>,
    watch: Cell<Option<WatchId>>,
    timer: Cell<Option<TimerId>>,
    pending: RefCell<VecDeque<Pending>>,
}

impl Waiter {
    pub fn new(sched: Sched) -> Waiter {
        let id = NEXT_WAITER.fetch_add(1, Ordering::Relaxed);
        let inner = Rc::new(WaiterInner {
            id,
            sched,
            mailbox: RefCell::new(None),
            polling: Cell::new(false),
            local_only: Cell::new(false),
            watch: Cell::new(None),
            timer: Cell::new(None),
            pending: RefCell::new(VecDeque::new()),
        });
        WAITERS.with(|w| w.borrow_mut().insert(id, Rc::downgrade(&inner)));
        Waiter { inner }
    }

    /// Run `cont` holding `lock` in `mode`: now if the lock is free and nobody is queued, else
    /// later on this loop, in arrival order.
    pub fn acquire(&self, lock: &Arc<XLock>, mode: Mode, cont: impl FnOnce(Guard) + 'static) {
        if lock.try_take(mode) {
            return cont(Guard { lock: lock.clone(), mode });
        }
        // Contended: only now is a mailbox worth its two descriptors. Made outside the mutex,
        // so the lock may have come free meanwhile: look again before queueing.
        let mailbox = self.inner.mailbox();
        let ticket = {
            let mut st = lock.state();
            if st.queue.is_empty() && st.compatible(mode) {
                st.take(mode);
                None
            } else {
                let t = Arc::new(Ticket {
                    mode,
                    status: AtomicU8::new(WAITING),
                    thread: thread::current().id(),
                    waiter: self.inner.id,
                    mailbox,
                });
                st.queue.push_back(t.clone());
                Some(t)
            }
        };
        match ticket {
            None => cont(Guard { lock: lock.clone(), mode }),
            Some(ticket) => {
                self.inner.pending.borrow_mut().push_back(Pending {
                    lock: lock.clone(),
                    ticket,
                    cont: Box::new(cont),
                });
                WaiterInner::arm(&self.inner);
            }
        }
    }

    /// Give up every ticket still waiting; their continuations are dropped uncalled, so they
    /// must not own anything that has to be completed.
    pub fn cancel_all(&self) {
        self.inner.cancel_all();
    }

    /// Tickets waiting right now.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.inner.pending.borrow().len()
    }
}

impl WaiterInner {
    fn mailbox(&self) -> Option<Arc<Mailbox>> {
        if self.polling.get() {
            return None;
        }
        let mut slot = self.mailbox.borrow_mut();
        if slot.is_none() {
            match Mailbox::new() {
                Ok(m) => *slot = Some(Arc::new(m)),
                Err(e) => {
                    ::log::warn!("cannot create a wake-up socket pair ({e}); waiting by polling");
                    self.polling.set(true);
                }
            }
        }
        slot.clone()
    }

    /// Make sure a grant from another loop will reach the pending tickets: a watch on the
    /// mailbox, else a polling timer. (Grants from this loop arrive through `defer`.)
    fn arm(this: &Rc<WaiterInner>) {
        if this.watch.get().is_some() || this.timer.get().is_some() || this.local_only.get() {
            return;
        }
        if !this.polling.get() {
            let fd = this.mailbox.borrow().as_ref().map(|m| m.rx.as_raw_fd());
            if let Some(fd) = fd {
                let weak = Rc::downgrade(this);
                match this.sched.watch(fd, true, false, move |_: Readiness| WaiterInner::wake(&weak)) {
                    Ok(id) => {
                        this.watch.set(Some(id));
                        return;
                    }
                    // Only a single-threaded scheduler cannot watch: every grant is local.
                    Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                        this.local_only.set(true);
                        return;
                    }
                    Err(e) => {
                        ::log::warn!("cannot watch a wake-up socket ({e}); waiting by polling");
                        this.polling.set(true);
                    }
                }
            }
        }
        let weak = Rc::downgrade(this);
        let id = this.sched.after(POLL, move || {
            if let Some(inner) = weak.upgrade() {
                inner.timer.set(None);
                WaiterInner::wake(&weak);
            }
        });
        this.timer.set(Some(id));
    }

    /// Run the continuations of granted tickets, in order; stop watching when none is left.
    fn wake(weak: &Weak<WaiterInner>) {
        let Some(this) = weak.upgrade() else { return };
        if let Some(m) = this.mailbox.borrow().as_ref() {
            m.drain();
        }
        let granted: Vec<Pending> = {
            let mut pending = this.pending.borrow_mut();
            let (ready, waiting): (VecDeque<Pending>, VecDeque<Pending>) =
                pending.drain(..).partition(|p| p.ticket.status.load(Ordering::SeqCst) == GRANTED);
            *pending = waiting;
            ready.into_iter().collect()
        };
        for p in granted {
            // The ticket was granted to us: from now on it is an ordinary guard.
            (p.cont)(Guard { lock: p.lock, mode: p.ticket.mode });
        }
        if this.pending.borrow().is_empty() {
            this.disarm();
        } else if this.watch.get().is_none() {
            WaiterInner::arm(&this);
        }
    }

    fn disarm(&self) {
        if let Some(id) = self.watch.take() {
            self.sched.unwatch(id);
        }
        if let Some(id) = self.timer.take() {
            self.sched.cancel(id);
        }
    }

    fn cancel_all(&self) {
        let pending: Vec<Pending> = self.pending.borrow_mut().drain(..).collect();
        for p in pending {
            p.lock.cancel(&p.ticket);
        }
        self.disarm();
    }
}

impl Drop for WaiterInner {
    fn drop(&mut self) {
        // Tickets nobody will run must not hold the lock (or their place in line) forever.
        self.cancel_all();
        let id = self.id;
        // At thread exit the registry may already be gone, and with it any need to clean up.
        let _ = WAITERS.try_with(|w| w.borrow_mut().remove(&id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocksmith_core::sched::SimScheduler;

    type Log = Rc<RefCell<Vec<String>>>;
    type Held = Rc<RefCell<Vec<Guard>>>;

    fn recorder() -> (Log, Held) {
        (Rc::new(RefCell::new(Vec::new())), Rc::new(RefCell::new(Vec::new())))
    }

    #[test]
    fn free_lock_runs_at_once_and_exclusive_excludes() {
        let sim = SimScheduler::new();
        let lock = XLock::new();
        let w = Waiter::new(sim.sched());
        let (log, held) = recorder();
        for i in 0..3 {
            let (log, held) = (log.clone(), held.clone());
            w.acquire(&lock, Mode::Exclusive, move |g| {
                log.borrow_mut().push(format!("x{i}"));
                held.borrow_mut().push(g);
            });
        }
        assert_eq!(*log.borrow(), ["x0"], "only the first runs");
        assert_eq!(w.waiting(), 2);
        sim.run_until_idle();
        assert_eq!(*log.borrow(), ["x0"], "still held");
        held.borrow_mut().clear();
        sim.run_until_idle();
        assert_eq!(*log.borrow(), ["x0", "x1"]);
        held.borrow_mut().clear();
        sim.run_until_idle();
        assert_eq!(*log.borrow(), ["x0", "x1", "x2"]);
        held.borrow_mut().clear();
        assert_eq!(lock.holders(), (0, false));
    }

    #[test]
    fn shared_holders_overlap_but_wait_behind_a_queued_exclusive() {
        let sim = SimScheduler::new();
        let lock = XLock::new();
        let a = Waiter::new(sim.sched());
        let b = Waiter::new(sim.sched());
        let (log, held) = recorder();
        let take = |w: &Waiter, mode: Mode, name: &'static str| {
            let (log, held) = (log.clone(), held.clone());
            w.acquire(&lock, mode, move |g| {
                log.borrow_mut().push(name.to_string());
                held.borrow_mut().push(g);
            });
        };
        take(&a, Mode::Shared, "s1");
        take(&b, Mode::Shared, "s2");
        take(&a, Mode::Exclusive, "x");
        take(&b, Mode::Shared, "s3");
        assert_eq!(*log.borrow(), ["s1", "s2"]);
        assert_eq!(lock.holders(), (2, false));
        held.borrow_mut().clear();
        sim.run_until_idle();
        assert_eq!(*log.borrow(), ["s1", "s2", "x"], "s3 waits behind the exclusive request");
        held.borrow_mut().clear();
        sim.run_until_idle();
        assert_eq!(*log.borrow(), ["s1", "s2", "x", "s3"]);
    }

    #[test]
    fn dropping_a_waiter_gives_up_its_tickets() {
        let sim = SimScheduler::new();
        let lock = XLock::new();
        let a = Waiter::new(sim.sched());
        let (log, held) = recorder();
        let h = held.clone();
        a.acquire(&lock, Mode::Exclusive, move |g| h.borrow_mut().push(g));
        {
            let b = Waiter::new(sim.sched());
            let l = log.clone();
            b.acquire(&lock, Mode::Exclusive, move |_| l.borrow_mut().push("never".into()));
            assert_eq!(b.waiting(), 1);
        }
        let l = log.clone();
        a.acquire(&lock, Mode::Exclusive, move |_| l.borrow_mut().push("third".into()));
        held.borrow_mut().clear();
        sim.run_until_idle();
        assert_eq!(*log.borrow(), ["third"], "the dropped waiter's ticket was skipped");
        assert_eq!(lock.holders(), (0, false));
    }

    #[test]
    fn grants_cross_threads_through_the_mailbox() {
        // The releasing side runs on another thread, as another event loop would; the waiter
        // is woken through its socket pair (read here directly, since the simulation cannot
        // watch descriptors).
        let lock = XLock::new();
        lock.state().take(Mode::Exclusive);
        let holder = Guard { lock: lock.clone(), mode: Mode::Exclusive };
        let mailbox = Arc::new(Mailbox::new().expect("socket pair"));
        let ticket = Arc::new(Ticket {
            mode: Mode::Shared,
            status: AtomicU8::new(WAITING),
            thread: thread::current().id(),
            waiter: 0,
            mailbox: Some(mailbox.clone()),
        });
        lock.state().queue.push_back(ticket.clone());
        std::thread::spawn(move || drop(holder)).join().expect("releasing thread");
        assert_eq!(ticket.status.load(Ordering::SeqCst), GRANTED);
        let mut byte = [0u8; 1];
        assert_eq!((&mailbox.rx).read(&mut byte).expect("poked"), 1);
        assert_eq!(lock.holders(), (1, false));
    }
}
