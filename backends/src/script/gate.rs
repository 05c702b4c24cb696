//! Limits shared by every event loop, without blocking any of them.
//!
//! A [`Gate`] is a counting semaphore with one FIFO queue for the whole server: the cap on
//! concurrent script processes (`max-children`), and nbdkit's thread models (one request at a
//! time for everybody, one per connection, one connection at a time) are all gates. Requests
//! waiting for a gate wait in order of arrival, whichever loop they came from.
//!
//! Loops cannot call into each other, so a slot freed on one loop is handed to a waiter on
//! another through that loop's [`Hub`]: the grant goes into the hub's mailbox and one byte into
//! a socket the loop watches. The waiter's continuation then runs on its own loop, as
//! continuations must.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use blocksmith_core::sched::{Sched, WatchId};

use super::child::Running;

/// Every gate's queue entries are numbered from one sequence, so a hub can keep the
/// continuations of all its waiters in one map.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state behind these locks is a counter and a queue, updated in one step each: a panic
    // elsewhere cannot leave it half-changed.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) type Waiter = Box<dyn FnOnce(Permit)>;

/// A counting semaphore shared by every loop, with a server-wide FIFO queue.
pub(crate) struct Gate {
    state: Mutex<GateState>,
}

struct GateState {
    cap: usize,
    taken: usize,
    queue: VecDeque<(u64, Arc<Mailbox>)>,
}

impl Gate {
    pub(crate) fn new(cap: usize) -> Arc<Gate> {
        Arc::new(Gate { state: Mutex::new(GateState { cap: cap.max(1), taken: 0, queue: VecDeque::new() }) })
    }

    /// Run `then` with a permit: now if a slot is free and nobody is queued, else (later, on
    /// `hub`'s loop) when the slot is handed over.
    pub(crate) fn acquire(self: &Arc<Self>, hub: &Rc<Hub>, then: Waiter) {
        let mut st = lock(&self.state);
        if st.queue.is_empty() && st.taken < st.cap {
            st.taken += 1;
            drop(st);
            return then(Permit { gate: Some(self.clone()) });
        }
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        hub.waiting.borrow_mut().insert(ticket, then);
        st.queue.push_back((ticket, hub.mailbox.clone()));
    }

    /// A slot comes back: it passes straight to the first waiter, if any, so nobody can jump
    /// the queue between the release and the waiter's loop noticing.
    fn release(self: &Arc<Self>) {
        let next = {
            let mut st = lock(&self.state);
            let next = st.queue.pop_front();
            if next.is_none() {
                st.taken = st.taken.saturating_sub(1);
            }
            next
        };
        if let Some((ticket, mailbox)) = next {
            mailbox.grant(ticket, self.clone());
        }
    }
}

/// One slot of a gate, given back when dropped.
pub(crate) struct Permit {
    gate: Option<Arc<Gate>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(g) = self.gate.take() {
            g.release();
        }
    }
}

/// Where other threads leave grants for one loop.
struct Mailbox {
    granted: Mutex<Granted>,
    /// A wake-up byte is already on its way: one is enough however many grants follow.
    poked: AtomicBool,
    tx: UnixStream,
}

#[derive(Default)]
struct Granted {
    slots: Vec<(u64, Arc<Gate>)>,
    /// The loop is gone: a slot handed here would never be used, so it passes straight on.
    closed: bool,
}

impl Mailbox {
    fn grant(&self, ticket: u64, gate: Arc<Gate>) {
        {
            let mut g = lock(&self.granted);
            if g.closed {
                drop(g);
                drop(Permit { gate: Some(gate) });
                return;
            }
            g.slots.push((ticket, gate));
        }
        if !self.poked.swap(true, Ordering::SeqCst) {
            // Nonblocking: a full socket already holds a wake-up the loop has yet to read.
            let _ = (&self.tx).write(&[1]);
        }
    }

    /// On a wake-up: the grants handed over so far. The order of the three steps is what
    /// keeps wake-ups from being lost: the socket is drained *before* `poked` is cleared, so a
    /// byte written by a grant that raced with us is never swallowed while `poked` stays set
    /// (which would make every later grant skip its byte, and the loop sleep through them).
    /// A grant that slips in after the flag is cleared sends a fresh byte; one that lands
    /// before that is in the slots taken last.
    fn collect(&self, rx: &UnixStream) -> Vec<(u64, Arc<Gate>)> {
        let mut sink = [0u8; 64];
        loop {
            match (&*rx).read(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.poked.store(false, Ordering::SeqCst);
        std::mem::take(&mut lock(&self.granted).slots)
    }

    /// Stop taking grants, and pass on the ones that arrived too late to be used.
    fn close(&self) {
        let late = {
            let mut g = lock(&self.granted);
            g.closed = true;
            std::mem::take(&mut g.slots)
        };
        for (_, gate) in late {
            drop(Permit { gate: Some(gate) });
        }
    }
}

/// This loop's side of the script machinery: the wake-up socket, the continuations of waiting
/// requests, and the script processes running on this loop (which it owns, so that when the
/// loop's thread ends they are killed and reaped rather than leaked).
pub(crate) struct Hub {
    pub(crate) sched: Sched,
    mailbox: Arc<Mailbox>,
    rx: UnixStream,
    watch: Cell<Option<WatchId>>,
    waiting: RefCell<HashMap<u64, Waiter>>,
    pub(crate) children: RefCell<HashMap<u64, Rc<RefCell<Running>>>>,
    next_child: Cell<u64>,
}

/// This thread's hubs. A running script holds its request's continuation, which holds the
/// connection, which holds the hub: when the loop's thread ends with scripts still running (the
/// server shut down while a `close` ran), that cycle must be broken by hand.
struct Hubs(Vec<(usize, Rc<Hub>)>);

impl Drop for Hubs {
    fn drop(&mut self) {
        for (_, hub) in self.0.drain(..) {
            hub.teardown();
        }
    }
}

thread_local! {
    /// One hub per loop (keyed by the loop's scheduler), living as long as the loop's thread.
    static HUBS: RefCell<Hubs> = const { RefCell::new(Hubs(Vec::new())) };
}

fn sched_key(s: &Sched) -> usize {
    Rc::as_ptr(&s.0) as *const () as usize
}

impl Hub {
    /// The hub of the loop `sched` belongs to, made on first use. Fails on a scheduler that
    /// cannot watch file descriptors (the simulation used by some tests).
    pub(crate) fn for_loop(sched: &Sched) -> io::Result<Rc<Hub>> {
        let key = sched_key(sched);
        let found = HUBS.with(|h| h.borrow().0.iter().find(|(k, _)| *k == key).map(|(_, hub)| hub.clone()));
        if let Some(hub) = found {
            return Ok(hub);
        }
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        let hub = Rc::new(Hub {
            sched: sched.clone(),
            mailbox: Arc::new(Mailbox {
                granted: Mutex::new(Granted::default()),
                poked: AtomicBool::new(false),
                tx,
            }),
            rx,
            watch: Cell::new(None),
            waiting: RefCell::new(HashMap::new()),
            children: RefCell::new(HashMap::new()),
            next_child: Cell::new(0),
        });
        // The watch holds the hub weakly: the thread-local list owns it.
        let weak: Weak<Hub> = Rc::downgrade(&hub);
        let id = sched.watch(hub.rx.as_raw_fd(), true, false, move |_| {
            if let Some(h) = weak.upgrade() {
                h.deliver();
            }
        })?;
        hub.watch.set(Some(id));
        HUBS.with(|h| h.borrow_mut().0.push((key, hub.clone())));
        Ok(hub)
    }

    /// Run the continuations whose permits other loops (or this one) handed over.
    fn deliver(&self) {
        for (ticket, gate) in self.mailbox.collect(&self.rx) {
            let permit = Permit { gate: Some(gate) };
            let then = self.waiting.borrow_mut().remove(&ticket);
            match then {
                Some(then) => then(permit),
                // Nobody to give it to: pass the slot on rather than lose it.
                None => drop(permit),
            }
        }
    }

    pub(crate) fn adopt(&self, child: Rc<RefCell<Running>>) -> u64 {
        let key = self.next_child.get() + 1;
        self.next_child.set(key);
        self.children.borrow_mut().insert(key, child);
        key
    }

    pub(crate) fn release_child(&self, key: u64) {
        // Dropped outside the borrow: dropping a child gives back its permits.
        let child = self.children.borrow_mut().remove(&key);
        drop(child);
    }

    /// Script processes on this loop.
    #[cfg(test)]
    pub(crate) fn running(&self) -> usize {
        self.children.borrow().len()
    }

    /// Script processes, and runs still waiting for a gate, on this loop.
    #[cfg(test)]
    pub(crate) fn busy(&self) -> usize {
        self.children.borrow().len() + self.waiting.borrow().len()
    }
}

impl Hub {
    /// The loop is gone: kill and reap whatever still runs (while the loop's scheduler is still
    /// there to unwatch from), and drop the continuations of requests that can no longer
    /// complete.
    fn teardown(&self) {
        // Tickets of this loop may still wait in gate queues: their slots must pass on to the
        // other loops when their turn comes, or the gate would lose them for good.
        self.mailbox.close();
        let children = std::mem::take(&mut *self.children.borrow_mut());
        drop(children);
        let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
        drop(waiting);
        if let Some(id) = self.watch.take() {
            self.sched.unwatch(id);
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One thread hands grants to a mailbox as fast as it can while another collects them,
    /// sleeping in poll(2) on the wake-up socket as a loop would: every grant must arrive, and
    /// no grant may be left in the mailbox with nothing to wake the collector.
    #[test]
    fn grants_from_another_thread_always_wake_the_loop() {
        const GRANTS: u64 = 200_000;
        let (tx, rx) = UnixStream::pair().unwrap();
        tx.set_nonblocking(true).unwrap();
        rx.set_nonblocking(true).unwrap();
        let mailbox =
            Arc::new(Mailbox { granted: Mutex::new(Granted::default()), poked: AtomicBool::new(false), tx });
        // Far more slots than grants, so handing one back never queues.
        let gate = Gate::new(usize::MAX);
        let granter = {
            let (mailbox, gate) = (mailbox.clone(), gate.clone());
            std::thread::spawn(move || {
                for ticket in 0..GRANTS {
                    mailbox.grant(ticket, gate.clone());
                }
            })
        };
        let mut got = 0;
        while got < GRANTS {
            let mut fds = [libc::pollfd { fd: rx.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            let ready = super::super::sys::poll(&mut fds, 5000).unwrap();
            assert!(ready == 1, "lost wake-up: {got} of {GRANTS} grants arrived, then silence");
            got += mailbox.collect(&rx).len() as u64;
        }
        granter.join().unwrap();
        assert_eq!(got, GRANTS);
    }
}
