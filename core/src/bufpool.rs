//! Recycled payload buffers, per event-loop thread.
//!
//! A 1 MiB READ needs a 1 MiB buffer. Allocating it fresh each time costs a page fault per 4 KiB
//! page (the allocator hands large blocks back to the kernel on free) — measured at about half
//! the server's CPU per GB on 1 MiB sequential reads. So the connection takes buffers from this
//! pool and the output queue gives them back once their bytes are on the socket.
//!
//! # How this fits the memory bound
//!
//! Payload bytes in flight are bounded by the budget (`--memory-limit`). A pooled buffer is
//! not in flight, so it is not in the budget: it is overhead beside it, and kept small and
//! explicit:
//!
//! - **The pool shrinks with the limit.** Each loop keeps at most [`pool_cap`]`(limit, loops)`
//!   = min([`MAX_POOLED_BYTES`], limit / [`POOL_SHARE_OF_LIMIT`] / loops) bytes, so all loops
//!   together keep at most 1/8 of the limit, and never more than 64 MiB per loop (the old fixed
//!   cap, which is what a 1 GiB limit on 2 cores gives anyway). At most [`MAX_PER_CLASS`]
//!   buffers of one size are kept. [`configure`] sets it at start-up; until then (tests that
//!   build a server in-process) the cap is [`MAX_POOLED_BYTES`].
//! - **A buffer in use is no bigger than its request.** Buffers are pooled by power-of-two
//!   size, and only requests of exactly such a size (4 KiB to 64 MiB) take one: a 3 MiB
//!   request gets a fresh 3 MiB allocation, never a recycled 4 MiB buffer whose pages were all
//!   touched before. So the memory of a request in flight is its reservation, rounded up to a
//!   page.
//! - **Freed memory can be reused by every loop.** glibc gives each thread its own malloc
//!   arena, and each arena keeps what it once held. With the budget moving between loops, N
//!   arenas could together keep up to N times a loop's share of the limit. [`configure`]
//!   therefore asks glibc for a single arena (`M_ARENA_MAX` = 1), unless the operator chose
//!   otherwise with `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES`. Measured with 200 clients writing
//!   16 MiB each under a 64 MiB limit on 2 loops: peak RSS 98 MiB with one arena, 162 MiB with
//!   one per thread, and fewer page faults too (41 k against 466 k), since a buffer freed on
//!   one loop is reused by the other. Small allocations still come from glibc's per-thread
//!   caches without the lock; 4 KiB and 1 MiB request rates measured the same either way on 2
//!   loops. With many more loops, the one arena's lock is the thing to watch in a profile
//!   (`MALLOC_ARENA_MAX=N` restores more arenas).
//!
//! What the rest of the overhead beside the budget is made of, and its bound, is written once,
//! at `limits::memory_overhead`.
//!
//! A recycled buffer is not cleared: it may hold bytes of an earlier request, which is why
//! every layer's `pread` must fill the whole buffer it is given (the layer contract).

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Smallest pooled size: below it, allocation is cheap and pooling is not worth it.
const MIN_CLASS: usize = 4096;
/// Largest pooled size (the largest request we serve).
const MAX_CLASS: usize = 64 * 1024 * 1024;
/// Buffers kept per size class.
pub const MAX_PER_CLASS: usize = 64;
/// Most bytes kept per event-loop thread, whatever the memory limit.
pub const MAX_POOLED_BYTES: usize = 64 * 1024 * 1024;
/// All loops' pools together keep at most 1/N of the memory limit.
pub const POOL_SHARE_OF_LIMIT: usize = 8;

/// The per-thread cap in force (set once by [`configure`], read on every [`give`]).
static POOL_CAP: AtomicUsize = AtomicUsize::new(MAX_POOLED_BYTES);

#[derive(Default)]
struct Pool {
    /// `classes[k]` holds buffers of capacity `MIN_CLASS << k`, each with `len == capacity`.
    classes: Vec<Vec<Vec<u8>>>,
    bytes: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Bytes each loop's pool may keep under `memory_limit` with `loops` event loops:
/// min([`MAX_POOLED_BYTES`], `memory_limit` / [`POOL_SHARE_OF_LIMIT`] / `loops`).
pub fn pool_cap(memory_limit: usize, loops: usize) -> usize {
    (memory_limit / POOL_SHARE_OF_LIMIT / loops.max(1)).min(MAX_POOLED_BYTES)
}

/// Size the pools for the server's memory limit and number of loops, and make freed memory
/// reusable across loops (one malloc arena; see the module docs). Call once at start-up,
/// before the loops start. Returns the per-loop cap.
pub fn configure(memory_limit: usize, loops: usize) -> usize {
    let cap = pool_cap(memory_limit, loops);
    POOL_CAP.store(cap, Ordering::Relaxed);
    crate::io::process::single_malloc_arena();
    cap
}

/// The per-thread cap in force.
pub fn cap() -> usize {
    POOL_CAP.load(Ordering::Relaxed)
}

/// The class of a pooled buffer: its size, a power of two from `MIN_CLASS` to `MAX_CLASS`.
fn class_of(size: usize) -> Option<usize> {
    if !(MIN_CLASS..=MAX_CLASS).contains(&size) || !size.is_power_of_two() {
        return None;
    }
    Some((size / MIN_CLASS).trailing_zeros() as usize)
}

/// A buffer of exactly `len` bytes (contents unspecified: zeroes or an earlier request's bytes).
/// Only power-of-two sizes are recycled; any other size is a fresh allocation of `len` bytes,
/// so a request never holds more memory than it reserved.
pub fn take(len: usize) -> Vec<u8> {
    let Some(k) = class_of(len) else { return vec![0u8; len] };
    let recycled = POOL.with(|p| {
        let mut p = p.borrow_mut();
        let v = p.classes.get_mut(k)?.pop()?;
        p.bytes -= v.capacity();
        Some(v)
    });
    match recycled {
        Some(mut v) => {
            v.truncate(len);
            v
        }
        None => vec![0u8; len],
    }
}

/// Give a buffer back for reuse. Only buffers of a power-of-two capacity (as [`take`] makes
/// them) are kept, within this thread's cap; anything else is simply dropped.
pub fn give(mut v: Vec<u8>) {
    let cap = v.capacity();
    let Some(k) = class_of(cap) else { return };
    let limit = POOL_CAP.load(Ordering::Relaxed);
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.bytes + cap > limit {
            return;
        }
        if p.classes.len() <= k {
            p.classes.resize_with(k + 1, Vec::new);
        }
        if p.classes[k].len() >= MAX_PER_CLASS {
            return;
        }
        // Keep the invariant len == capacity; this zeroes only the tail a shorter user left.
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
        let b = take(1 << 20);
        assert_eq!(b.len(), 1 << 20);
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

    #[test]
    fn odd_sizes_get_their_own_exact_buffer() {
        give(take(1 << 20));
        let before = pooled_bytes();
        assert!(before >= 1 << 20);
        // A request just under a class does not take (and fully touch) the class's buffer.
        let odd = take(1000 * 1000);
        assert_eq!((odd.len(), odd.capacity()), (1000 * 1000, 1000 * 1000));
        assert_eq!(pooled_bytes(), before);
        // Nor is it pooled when given back.
        give(odd);
        assert_eq!(pooled_bytes(), before);
        assert_eq!(take(0).len(), 0);
        assert_eq!(take(100).len(), 100);
    }

    #[test]
    fn the_pool_shrinks_with_the_memory_limit() {
        const MIB: usize = 1 << 20;
        // 1/8 of the limit over all loops, at most 64 MiB per loop.
        assert_eq!(pool_cap(64 * MIB, 2), 4 * MIB);
        assert_eq!(pool_cap(256 * MIB, 2), 16 * MIB);
        assert_eq!(pool_cap(1024 * MIB, 2), 64 * MIB);
        assert_eq!(pool_cap(3013 * MIB, 2), 64 * MIB);
        assert_eq!(pool_cap(16384 * MIB, 64), 32 * MIB);
        assert_eq!(pool_cap(128 * MIB, 0), 16 * MIB, "0 loops counts as 1");
        for (limit, loops) in [(128 * MIB, 1), (64 * MIB, 16), (1 << 40, 3)] {
            assert!(pool_cap(limit, loops) * loops <= limit / POOL_SHARE_OF_LIMIT);
        }
    }
}
