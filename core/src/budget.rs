//! The server-wide memory budget for request and reply payloads (`--memory-limit`).
//!
//! A connection reserves a request's payload bytes before it accepts the request header, and
//! releases them when the reply has left the process. When a reservation fails the connection
//! stops reading (backpressure) instead of allocating: bytes in flight never exceed the limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct Budget(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget(Arc::new(Inner { limit, used: AtomicUsize::new(0) }))
    }
    /// Reserve `n` bytes; false when that would exceed the limit.
    pub fn try_reserve(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let mut cur = self.0.used.load(Ordering::Relaxed);
        loop {
            let next = match cur.checked_add(n) {
                Some(v) if v <= self.0.limit => v,
                _ => return false,
            };
            match self.0.used.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let prev = self.0.used.fetch_sub(n, Ordering::AcqRel);
        assert!(prev >= n, "budget released more than was reserved");
    }
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }
    pub fn limit(&self) -> usize {
        self.0.limit
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
}
