//! A loop's scheduler and the blocking pool.
//!
//! [`LoopCore`] is what layers on this loop see through `Sched`: timers, deferred tasks and
//! blocking work. It is single-threaded (`Rc`, `RefCell`); the only cross-thread path is the
//! blocking pool, whose workers send results back over a channel and wake the loop's poller.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use slab::Slab;

use crate::sched::{BlockingThen, BlockingWork, Scheduler, Task, TimerId};

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
}

impl LoopCore {
    pub fn new(pool: Arc<BlockingPool>, waker: Arc<mio::Waker>) -> LoopCore {
        let (results_tx, results_rx) = mpsc::channel();
        LoopCore {
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
}
