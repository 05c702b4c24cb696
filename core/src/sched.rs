//! What a layer may wait on: timers, and blocking work run off the event loop.
//!
//! Every per-connection layer gets a [`Sched`] for its connection's loop. Continuations always
//! run on that loop, never on another thread, so layers keep `Rc`/`RefCell` state without locks.
//! The real implementation is the mio event loop (`io::reactor`); [`SimScheduler`] is a
//! single-threaded virtual clock for tests, where 1000 requests delayed 100 ms finish at
//! virtual time 100 ms without anyone sleeping.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub type Task = Box<dyn FnOnce()>;
pub type BlockingWork = Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>;
pub type BlockingThen = Box<dyn FnOnce(Box<dyn Any + Send>)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerId(pub u64);

/// A registered fd watch (see [`Scheduler::watch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatchId(pub usize);

/// What a readiness event says about a watched fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// The peer hung up or the fd is in error: reads will return EOF or the error.
    pub closed: bool,
}

/// Called on each readiness event of a watched fd.
pub type WatchTask = Box<dyn FnMut(Readiness)>;

pub trait Scheduler {
    fn now(&self) -> Instant;
    /// Run `task` on this loop at or after `at`.
    fn set_timer(&self, at: Instant, task: Task) -> TimerId;
    /// Cancel a timer that has not fired; its task is dropped.
    fn cancel_timer(&self, id: TimerId);
    /// Run `work` on the blocking pool, then `then` with its result on this loop.
    fn spawn_blocking(&self, work: BlockingWork, then: BlockingThen);
    /// Run `task` on this loop after the current callback returns (breaks deep recursion).
    fn defer(&self, task: Task);
    /// Watch a nonblocking fd (a child's pipe, an upstream socket) on this loop. Readiness is
    /// edge-triggered: `task` runs when the fd may have become readable or writable and must
    /// read or write until `WouldBlock`, or it will not be called again for the same bytes. The
    /// fd must stay open until [`Scheduler::unwatch`]. Not every scheduler can watch fds (the
    /// simulation cannot): those return `Unsupported`.
    fn watch(&self, fd: RawFd, readable: bool, writable: bool, task: WatchTask) -> std::io::Result<WatchId> {
        let _ = (fd, readable, writable, task);
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this scheduler cannot watch file descriptors",
        ))
    }
    /// Stop watching; the task is dropped (it may be the task that is running now).
    fn unwatch(&self, id: WatchId) {
        let _ = id;
    }
}

/// A cloneable handle to a loop's scheduler.
#[derive(Clone)]
pub struct Sched(pub Rc<dyn Scheduler>);

impl Sched {
    pub fn new(s: Rc<dyn Scheduler>) -> Self {
        Sched(s)
    }
    pub fn now(&self) -> Instant {
        self.0.now()
    }
    pub fn at(&self, at: Instant, task: impl FnOnce() + 'static) -> TimerId {
        self.0.set_timer(at, Box::new(task))
    }
    pub fn after(&self, d: Duration, task: impl FnOnce() + 'static) -> TimerId {
        let at = self.0.now() + d;
        self.0.set_timer(at, Box::new(task))
    }
    pub fn cancel(&self, id: TimerId) {
        self.0.cancel_timer(id)
    }
    pub fn defer(&self, task: impl FnOnce() + 'static) {
        self.0.defer(Box::new(task))
    }
    /// See [`Scheduler::watch`].
    pub fn watch(
        &self,
        fd: RawFd,
        readable: bool,
        writable: bool,
        task: impl FnMut(Readiness) + 'static,
    ) -> std::io::Result<WatchId> {
        self.0.watch(fd, readable, writable, Box::new(task))
    }
    pub fn unwatch(&self, id: WatchId) {
        self.0.unwatch(id)
    }
    /// Run blocking `work` (a syscall on a regular file, say) on the pool; `then` gets its
    /// result back on this loop.
    pub fn blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
        then: impl FnOnce(R) + 'static,
    ) {
        self.0.spawn_blocking(
            Box::new(move || Box::new(work()) as Box<dyn Any + Send>),
            Box::new(move |any| match any.downcast::<R>() {
                Ok(r) => then(*r),
                Err(_) => unreachable!("blocking result type is fixed by construction"),
            }),
        )
    }
}

/// A deterministic scheduler with a virtual clock, for tests without sockets or sleeps.
/// Blocking work runs inline when its turn comes, as if the pool were instant.
pub struct SimScheduler {
    start: Instant,
    state: RefCell<SimState>,
}

#[derive(Default)]
struct SimState {
    elapsed: Duration,
    next_id: u64,
    timers: BTreeMap<(Duration, u64), Task>,
    ready: VecDeque<Task>,
}

impl SimScheduler {
    pub fn new() -> Rc<Self> {
        Rc::new(SimScheduler { start: Instant::now(), state: RefCell::new(SimState::default()) })
    }
    pub fn sched(self: &Rc<Self>) -> Sched {
        Sched(self.clone())
    }
    /// Virtual time since creation.
    pub fn elapsed(&self) -> Duration {
        self.state.borrow().elapsed
    }
    /// Run ready tasks, then timers in time order (advancing the virtual clock), until nothing
    /// is left. Returns the number of tasks run.
    pub fn run_until_idle(&self) -> usize {
        let mut n = 0;
        loop {
            let task = {
                let mut st = self.state.borrow_mut();
                if let Some(t) = st.ready.pop_front() {
                    Some(t)
                } else if let Some(((at, id), _)) = st.timers.iter().next().map(|(k, _)| (*k, ())) {
                    let t = st.timers.remove(&(at, id));
                    if at > st.elapsed {
                        st.elapsed = at;
                    }
                    t
                } else {
                    None
                }
            };
            match task {
                Some(t) => {
                    t();
                    n += 1;
                }
                None => return n,
            }
        }
    }
}

impl Scheduler for SimScheduler {
    fn now(&self) -> Instant {
        self.start + self.state.borrow().elapsed
    }
    fn set_timer(&self, at: Instant, task: Task) -> TimerId {
        let mut st = self.state.borrow_mut();
        st.next_id += 1;
        let id = st.next_id;
        let when = at.saturating_duration_since(self.start).max(st.elapsed);
        st.timers.insert((when, id), task);
        TimerId(id)
    }
    fn cancel_timer(&self, id: TimerId) {
        self.state.borrow_mut().timers.retain(|(_, i), _| *i != id.0);
    }
    fn spawn_blocking(&self, work: BlockingWork, then: BlockingThen) {
        self.state.borrow_mut().ready.push_back(Box::new(move || then(work())));
    }
    fn defer(&self, task: Task) {
        self.state.borrow_mut().ready.push_back(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn timers_run_in_virtual_time_order() {
        let sim = SimScheduler::new();
        let s = sim.sched();
        let log = Rc::new(RefCell::new(Vec::new()));
        for (i, ms) in [(1, 300u64), (2, 100), (3, 200)] {
            let log = log.clone();
            s.after(Duration::from_millis(ms), move || log.borrow_mut().push(i));
        }
        let cancelled = Rc::new(Cell::new(false));
        let c = cancelled.clone();
        let id = s.after(Duration::from_millis(50), move || c.set(true));
        s.cancel(id);
        sim.run_until_idle();
        assert_eq!(*log.borrow(), vec![2, 3, 1]);
        assert!(!cancelled.get());
        assert_eq!(sim.elapsed(), Duration::from_millis(300));
    }

    #[test]
    fn blocking_work_returns_on_loop() {
        let sim = SimScheduler::new();
        let got = Rc::new(Cell::new(0));
        let g = got.clone();
        sim.sched().blocking(|| 21 * 2, move |v: i32| g.set(v));
        sim.run_until_idle();
        assert_eq!(got.get(), 42);
    }
}
