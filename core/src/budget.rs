//! The server-wide memory budget for request and reply payloads (`--memory-limit`).
//!
//! A connection reserves a request's payload bytes before it accepts the request header, and
//! releases them when the reply has left the process. When a reservation fails the connection
//! stops reading (backpressure) instead of allocating: bytes in flight never exceed the limit.
//!
//! Connections that wait take a place in one server-wide line and are served first come, first
//! served ([`Budget::reserve_in_turn`]): without it, the connections already holding budget
//! take it back the moment they release it (their next request is decoded in the same pass),
//! and a waiting client can starve for as long as the flood lasts. Only the head of the line
//! may reserve, and whoever frees enough for it calls the head's [`Notify`], so its loop
//! retries at once instead of polling.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Called (from any thread) when the head of the line may now get what it asked for: it
/// should make the waiting connection's loop retry soon. Called with no lock held.
pub type Notify = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
    /// How waiters that queue through this handle are told their turn has come.
    notify: Option<Notify>,
}

struct Inner {
    limit: usize,
    used: AtomicUsize,
    /// How many wait in `line`, so the uncontended path never takes the lock.
    waiting: AtomicUsize,
    line: Mutex<Line>,
}

#[derive(Default)]
struct Line {
    next_id: u64,
    queue: VecDeque<Waiter>,
}

struct Waiter {
    id: u64,
    wanted: usize,
    notify: Option<Notify>,
}

fn lock(m: &Mutex<Line>) -> MutexGuard<'_, Line> {
    // Every update of the line is one push, pop or removal: a panic elsewhere cannot leave it
    // half-changed.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("limit", &self.inner.limit)
            .field("used", &self.used())
            .field("waiting", &self.inner.waiting.load(SeqCst))
            .finish()
    }
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        let inner =
            Inner { limit, used: AtomicUsize::new(0), waiting: AtomicUsize::new(0), line: Mutex::default() };
        Budget { inner: Arc::new(inner), notify: None }
    }

    /// The same budget, with `notify` telling waiters that queue through the returned handle
    /// that their turn has come (each event loop has its own).
    pub fn with_notify(&self, notify: Notify) -> Budget {
        Budget { inner: self.inner.clone(), notify: Some(notify) }
    }

    /// Reserve `n` bytes regardless of the line; false when that would exceed the limit. For
    /// reservations that fail rather than wait (caches, TLS sessions).
    pub fn try_reserve(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let mut cur = self.inner.used.load(SeqCst);
        loop {
            let next = match cur.checked_add(n) {
                Some(v) if v <= self.inner.limit => v,
                _ => return false,
            };
            match self.inner.used.compare_exchange_weak(cur, next, SeqCst, SeqCst) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Reserve `n` bytes in turn: now if nobody waits and they fit; otherwise `place` holds
    /// (or keeps) this caller's place in the line and the answer is false until the caller is
    /// at the head and `n` fits. Call again with the same `place` when notified (or at any
    /// time: out of turn it is a cheap no). Dropping the place leaves the line.
    pub fn reserve_in_turn(&self, n: usize, place: &mut Option<Place>) -> bool {
        if n == 0 {
            *place = None;
            return true;
        }
        if place.is_none() && self.inner.waiting.load(SeqCst) == 0 && self.try_reserve(n) {
            return true;
        }
        let mut line = lock(&self.inner.line);
        let Some(p) = place.as_ref() else {
            // Counted as waiting *before* the last try: a release that missed the count
            // happened before it, so the try sees those bytes (and one that sees the count
            // wakes the head, which may be us).
            self.inner.waiting.fetch_add(1, SeqCst);
            if line.queue.is_empty() && self.try_reserve(n) {
                self.inner.waiting.fetch_sub(1, SeqCst);
                return true;
            }
            let id = line.next_id;
            line.next_id += 1;
            line.queue.push_back(Waiter { id, wanted: n, notify: self.notify.clone() });
            *place = Some(Place { id, inner: self.inner.clone(), queued: true });
            return false;
        };
        match line.queue.front_mut() {
            Some(head) if head.id == p.id => head.wanted = n,
            _ => return false,
        }
        if !self.try_reserve(n) {
            return false;
        }
        line.queue.pop_front();
        self.inner.waiting.fetch_sub(1, SeqCst);
        let next = self.inner.head_to_wake(&line);
        drop(line);
        if let Some(mut p) = place.take() {
            p.queued = false;
        }
        if let Some(wake) = next {
            wake();
        }
        true
    }

    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let prev = self.inner.used.fetch_sub(n, SeqCst);
        assert!(prev >= n, "budget released more than was reserved");
        // Read after the bytes are back: a waiter that queued too late to be counted here
        // tried to reserve after they were back.
        if self.inner.waiting.load(SeqCst) > 0 {
            let next = self.inner.head_to_wake(&lock(&self.inner.line));
            if let Some(wake) = next {
                wake();
            }
        }
    }

    pub fn used(&self) -> usize {
        self.inner.used.load(SeqCst)
    }

    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Connections waiting in line.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(SeqCst)
    }
}

impl Inner {
    /// The head's notify, if what it wants fits now.
    fn head_to_wake(&self, line: &Line) -> Option<Notify> {
        let head = line.queue.front()?;
        let free = self.limit.saturating_sub(self.used.load(SeqCst));
        if head.wanted <= free {
            head.notify.clone()
        } else {
            None
        }
    }
}

/// A waiter's place in the budget's line; dropping it leaves the line (a connection that
/// closes while waiting), passing the turn on if it was at the head.
pub struct Place {
    id: u64,
    inner: Arc<Inner>,
    queued: bool,
}

impl fmt::Debug for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Place").field("id", &self.id).field("queued", &self.queued).finish()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.queued {
            return;
        }
        let next = {
            let mut line = lock(&self.inner.line);
            let Some(at) = line.queue.iter().position(|w| w.id == self.id) else { return };
            line.queue.remove(at);
            self.inner.waiting.fetch_sub(1, SeqCst);
            if at == 0 {
                self.inner.head_to_wake(&line)
            } else {
                None
            }
        };
        if let Some(wake) = next {
            wake();
        }
    }
}

/// Bytes reserved from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Budget,
    bytes: usize,
}

impl Budget {
    /// Reserve `n` bytes for as long as the returned value lives; `None` when over the limit.
    /// Does not wait in line (see [`Budget::try_reserve`]).
    pub fn reserve(&self, n: usize) -> Option<Reservation> {
        self.try_reserve(n).then(|| Reservation { budget: self.clone(), bytes: n })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Condvar;
    use std::time::Duration;

    #[test]
    fn reserve_and_release() {
        let b = Budget::new(100);
        assert!(b.try_reserve(60));
        assert!(!b.try_reserve(41));
        assert!(b.try_reserve(40));
        assert_eq!(b.used(), 100);
        b.release(100);
        assert_eq!(b.used(), 0);
        assert!(b.try_reserve(0));
        let r = b.reserve(70).unwrap();
        assert!(b.reserve(31).is_none());
        drop(r);
        assert_eq!(b.used(), 0);
    }

    /// A handle whose waiters count how often they were told their turn came.
    fn counting(b: &Budget) -> (Budget, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (
            b.with_notify(Arc::new(move || {
                m.fetch_add(1, SeqCst);
            })),
            n,
        )
    }

    #[test]
    fn waiters_are_served_in_order_of_arrival() {
        let b = Budget::new(100);
        assert!(b.try_reserve(90));
        let (big, big_told) = counting(&b);
        let (small, small_told) = counting(&b);
        let (mut big_place, mut small_place) = (None, None);
        // 50 does not fit: the big one queues...
        assert!(!big.reserve_in_turn(50, &mut big_place));
        // ...and 5 would fit, but may not jump the line.
        assert!(!small.reserve_in_turn(5, &mut small_place));
        assert_eq!(b.waiting(), 2);
        assert!(!small.reserve_in_turn(5, &mut small_place), "out of turn");
        // Freeing too little for the head tells nobody.
        b.release(30);
        assert_eq!((big_told.load(SeqCst), small_told.load(SeqCst)), (0, 0));
        // Enough for the head: only the head hears of it.
        b.release(20);
        assert_eq!((big_told.load(SeqCst), small_told.load(SeqCst)), (1, 0));
        assert!(big.reserve_in_turn(50, &mut big_place));
        assert!(big_place.is_none());
        // Its success passes the turn on to the next, which fits too.
        assert_eq!(small_told.load(SeqCst), 1);
        assert!(small.reserve_in_turn(5, &mut small_place));
        assert_eq!((b.waiting(), b.used()), (0, 95));
        // An empty line is the fast path again.
        assert!(b.reserve_in_turn(5, &mut None));
    }

    #[test]
    fn a_waiter_that_leaves_passes_its_turn_on() {
        let b = Budget::new(100);
        assert!(b.try_reserve(100));
        let (first, _) = counting(&b);
        let (second, second_told) = counting(&b);
        let (mut p1, mut p2) = (None, None);
        assert!(!first.reserve_in_turn(80, &mut p1));
        assert!(!second.reserve_in_turn(10, &mut p2));
        b.release(20);
        assert_eq!(second_told.load(SeqCst), 0, "the head wants 80");
        drop(p1);
        assert_eq!(second_told.load(SeqCst), 1, "the new head fits: told at once");
        assert!(second.reserve_in_turn(10, &mut p2));
        assert_eq!(b.waiting(), 0);
        // Leaving from the middle of the line keeps the order of the rest.
        let (mut a, mut m, mut z) = (None, None, None);
        assert!(!b.reserve_in_turn(50, &mut a));
        assert!(!b.reserve_in_turn(50, &mut m));
        assert!(!b.reserve_in_turn(50, &mut z));
        drop(m);
        b.release(90);
        assert!(!b.reserve_in_turn(50, &mut z), "z is behind a");
        assert!(b.reserve_in_turn(50, &mut a));
        assert!(b.reserve_in_turn(50, &mut z));
        assert_eq!((b.used(), b.waiting()), (100, 0));
    }

    /// Threads take and give back budget in a tight loop, sleeping on a condition variable
    /// when they must wait, as event loops would: nobody may wait forever (a lost notify), and
    /// the limit is never exceeded.
    #[test]
    fn many_threads_never_lose_a_turn() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 20_000;
        let b = Budget::new(100);
        let over = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let b = b.clone();
                let over = over.clone();
                std::thread::spawn(move || {
                    let bell = Arc::new((Mutex::new(false), Condvar::new()));
                    let ring = bell.clone();
                    let mine = b.with_notify(Arc::new(move || {
                        *ring.0.lock().unwrap() = true;
                        ring.1.notify_one();
                    }));
                    let mut place = None;
                    for i in 0..ROUNDS {
                        let n = 20 + (i * 7 + t * 13) % 60;
                        while !mine.reserve_in_turn(n, &mut place) {
                            let (m, cv) = &*bell;
                            let rung = m.lock().unwrap();
                            let (mut rung, to) =
                                cv.wait_timeout_while(rung, Duration::from_secs(10), |r| !*r).unwrap();
                            assert!(!to.timed_out(), "thread {t}: round {i}: never told its turn came");
                            *rung = false;
                        }
                        if mine.used() > 100 {
                            over.store(true, SeqCst);
                        }
                        mine.release(n);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert!(!over.load(SeqCst));
        assert_eq!((b.used(), b.waiting()), (0, 0));
    }
}
