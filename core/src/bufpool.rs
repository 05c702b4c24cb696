//! Recycled payload buffers, per event-loop thread.
//!
//! A 1 MiB READ needs a 1 MiB buffer. Allocating it fresh each time costs a page fault per 4 KiB
//! page (the allocator hands large blocks back to the kernel on free) — measured at about half
//! the server's CPU per GB on 1 MiB sequential reads. So the connection takes buffers from this
//! pool and the output queue gives them back once their bytes are on the socket.
//!
//! Buffers are kept by power-of-two size class, at most [`MAX_PER_CLASS`] per class and
//! [`MAX_POOLED_BYTES`] in all per thread: a fixed, documented overhead beside the request
//! budget. A recycled buffer is not cleared: it may hold bytes of an earlier request, which is
//! why every layer's `pread` must fill the whole buffer it is given (the layer contract).

use std::cell::RefCell;

/// Smallest pooled size: below it, allocation is cheap and pooling is not worth it.
const MIN_CLASS: usize = 4096;
/// Largest pooled size (the largest request we serve).
const MAX_CLASS: usize = 64 * 1024 * 1024;
/// Buffers kept per size class.
pub const MAX_PER_CLASS: usize = 64;
/// Bytes kept in all, per event-loop thread.
pub const MAX_POOLED_BYTES: usize = 64 * 1024 * 1024;

#[derive(Default)]
struct Pool {
    /// `classes[k]` holds buffers of capacity `MIN_CLASS << k`, each with `len == capacity`.
    classes: Vec<Vec<Vec<u8>>>,
    bytes: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

fn class_of(capacity: usize) -> Option<usize> {
    if !(MIN_CLASS..=MAX_CLASS).contains(&capacity) || !capacity.is_power_of_two() {
        return None;
    }
    Some((capacity / MIN_CLASS).trailing_zeros() as usize)
}

/// A buffer of exactly `len` bytes (contents unspecified: zeroes or an earlier request's bytes).
pub fn take(len: usize) -> Vec<u8> {
    if !(MIN_CLASS..=MAX_CLASS).contains(&len) {
        return vec![0u8; len];
    }
    let class = len.next_power_of_two();
    let recycled = class_of(class).and_then(|k| {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            let v = p.classes.get_mut(k)?.pop()?;
            p.bytes -= v.capacity();
            Some(v)
        })
    });
    let mut v = recycled.unwrap_or_else(|| vec![0u8; class]);
    v.truncate(len);
    v
}

/// Give a buffer back for reuse (buffers not from [`take`] are simply dropped).
pub fn give(mut v: Vec<u8>) {
    let Some(k) = class_of(v.capacity()) else { return };
    let cap = v.capacity();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.bytes + cap > MAX_POOLED_BYTES {
            return;
        }
        if p.classes.len() <= k {
            p.classes.resize_with(k + 1, Vec::new);
        }
        if p.classes[k].len() >= MAX_PER_CLASS {
            return;
        }
        // Keep the invariant len == capacity; this zeroes only the tail a shorter request left.
        v.resize(cap, 0);
        p.bytes += cap;
        p.classes[k].push(v);
    });
}

/// Bytes pooled on this thread (for tests and `-v` statistics).
pub fn pooled_bytes() -> usize {
    POOL.with(|p| p.borrow().bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_recycled_by_class_and_bounded() {
        let a = take(1 << 20);
        assert_eq!(a.len(), 1 << 20);
        let ptr = a.as_ptr();
        give(a);
        assert_eq!(pooled_bytes(), 1 << 20);
        let b = take(1000 * 1000);
        assert_eq!(b.len(), 1000 * 1000);
        assert_eq!(b.as_ptr(), ptr, "the same buffer came back");
        give(b);
        // Small and odd-sized buffers are not pooled.
        give(vec![0u8; 100]);
        give(Vec::with_capacity(5000));
        assert_eq!(pooled_bytes(), 1 << 20);
        // The per-thread cap holds.
        let many: Vec<_> = (0..100).map(|_| take(1 << 20)).collect();
        for v in many {
            give(v);
        }
        assert!(pooled_bytes() <= MAX_POOLED_BYTES);
    }
}
