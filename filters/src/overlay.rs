//! Machinery shared by the filters that keep blocks of the disk in a temporary file (`cow`,
//! `cache`): the temporary file itself, a compact per-block state array, asynchronous range locks
//! that work across event loops, and positional file IO (through the loop's io_uring, or the
//! blocking pool where there is none).
//!
//! RAM stays bounded: block data lives in the temporary file; in memory there are only two bits
//! per block and the locks of requests in flight.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blocksmith_core::config::parse_bool;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::io::uring;
use blocksmith_core::layer::{Done, Flags, Next};
use blocksmith_core::sched::Sched;

/// Where temporary files go when `$TMPDIR` is not set: like nbdkit, a directory meant for large
/// files rather than a RAM-backed /tmp.
const LARGE_TMPDIR: &str = "/var/tmp";

/// Create an empty temporary file for `what` (a filter name) and unlink it at once, so nothing
/// is left behind however the server exits: the space is freed when the descriptor closes.
pub(crate) fn create_temp_file(what: &str) -> io::Result<File> {
    let dir = std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(LARGE_TMPDIR));
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    for _ in 0..100 {
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("blocksmith-{what}-{}-{n}-{stamp:x}", std::process::id()));
        let opened = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path);
        match opened {
            Ok(f) => {
                std::fs::remove_file(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot unlink {}: {e}", path.display()))
                })?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        }
    }
    Err(io::Error::other(format!("{}: no free temporary file name", dir.display())))
}

/// A `*-on-read=` setting: never, always, or while a file exists (checked per request, so it
/// can be switched while the server runs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum OnRead {
    Never,
    Always,
    WhileExists(PathBuf),
}

impl OnRead {
    pub(crate) fn parse(filter: &str, key: &str, value: Option<String>) -> Result<OnRead, ConfigError> {
        let Some(v) = value else { return Ok(OnRead::Never) };
        if v.starts_with('/') {
            return Ok(OnRead::WhileExists(PathBuf::from(v)));
        }
        match parse_bool(&v) {
            Ok(true) => Ok(OnRead::Always),
            Ok(false) => Ok(OnRead::Never),
            Err(_) => Err(ConfigError::new(format!(
                "{filter}: {key}: expected true, false or an absolute path, got '{v}'"
            ))),
        }
    }

    /// Whether to copy what is read now. The check for a path is one stat(2) of a local file,
    /// which is what nbdkit does per request too.
    pub(crate) fn active(&self) -> bool {
        match self {
            OnRead::Never => false,
            OnRead::Always => true,
            OnRead::WhileExists(p) => Path::new(p).exists(),
        }
    }
}

/// Parse a block size parameter: a power of two of at least 4 KiB, and small enough that a
/// read-modify-write buffer stays a modest allocation.
pub(crate) fn parse_block_size(
    filter: &str,
    key: &str,
    value: Option<String>,
    default: u64,
) -> Result<u64, ConfigError> {
    const MAX: u64 = 32 << 20;
    let Some(v) = value else { return Ok(default) };
    let n = blocksmith_core::config::parse_size(&v)
        .map_err(|e| ConfigError::new(format!("{filter}: {key}: {}", e.0)))?;
    if n < 4096 || !n.is_power_of_two() || n > MAX {
        return Err(ConfigError::new(format!(
            "{filter}: {key}: must be a power of two between 4K and 32M, got '{v}'"
        )));
    }
    Ok(n)
}

/// Block arithmetic for a disk of `size` bytes cut into blocks of `bs` (a power of two). The last
/// block may be short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub bs: u64,
    pub size: u64,
}

impl Geometry {
    #[allow(dead_code)] // used by tests; callers size their maps from `size` directly
    pub(crate) fn blocks(&self) -> u64 {
        self.size.div_ceil(self.bs)
    }
    pub(crate) fn block_of(&self, offset: u64) -> u64 {
        offset / self.bs
    }
    pub(crate) fn start(&self, b: u64) -> u64 {
        b * self.bs
    }
    /// Where block `b` ends on the disk (short for the last block).
    pub(crate) fn end(&self, b: u64) -> u64 {
        (b * self.bs + self.bs).min(self.size)
    }
    /// First and last block touched by `[offset, offset + len)`, `len > 0`.
    pub(crate) fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        (self.block_of(offset), self.block_of(offset + len - 1))
    }
    /// Does `[offset, end)` cover all of block `b` that is on the disk?
    pub(crate) fn covers(&self, b: u64, offset: u64, end: u64) -> bool {
        offset <= self.start(b) && end >= self.end(b)
    }
}

/// Largest block-state map a filter makes (a quarter of this many blocks: 4 Gi blocks of 64K
/// is 256 TiB). Anything bigger is refused rather than allocated.
const MAX_STATE_BYTES: u64 = 1 << 30;

/// Two bits of state per block, packed. Every state is 0 initially.
pub(crate) struct States {
    bits: Vec<u8>,
    /// The map's bytes, reserved from the server's memory budget for as long as it lives.
    _held: Option<blocksmith_core::budget::Reservation>,
}

impl States {
    /// A map for a disk of `size` bytes in blocks of `bs`, or why it would be too big.
    pub(crate) fn for_disk(
        filter: &str,
        size: u64,
        bs: u64,
        budget: &blocksmith_core::budget::Budget,
    ) -> Result<States, NbdError> {
        let bytes = size.div_ceil(bs).div_ceil(4);
        if bytes > MAX_STATE_BYTES {
            return Err(NbdError::msg(
                blocksmith_core::error::Errno::NoMem,
                format!(
                    "{filter}: a disk of {size} bytes in blocks of {bs} needs {bytes} bytes of block map; \
                     use a larger block size"
                ),
            ));
        }
        let held = budget.reserve(bytes as usize).ok_or_else(|| {
            NbdError::msg(
                blocksmith_core::error::Errno::NoMem,
                format!("{filter}: the block map needs {bytes} bytes and the memory budget is spent"),
            )
        })?;
        Ok(States { _held: Some(held), ..States::new(size.div_ceil(bs)) })
    }

    pub(crate) fn new(blocks: u64) -> States {
        States { bits: vec![0; blocks.div_ceil(4) as usize], _held: None }
    }
    pub(crate) fn get(&self, b: u64) -> u8 {
        let byte = self.bits.get((b / 4) as usize).copied().unwrap_or(0);
        (byte >> ((b % 4) * 2)) & 3
    }
    pub(crate) fn set(&mut self, b: u64, v: u8) {
        if let Some(byte) = self.bits.get_mut((b / 4) as usize) {
            let shift = (b % 4) * 2;
            *byte = (*byte & !(3 << shift)) | ((v & 3) << shift);
        }
    }
    /// The first run of blocks in `state` within `[from, to]`, at most `max` blocks long, as
    /// (first, last).
    pub(crate) fn run_in(&self, state: u8, from: u64, to: u64, max: u64) -> Option<(u64, u64)> {
        let first = (from..=to).find(|b| self.get(*b) == state)?;
        let mut last = first;
        while last < to && last - first + 1 < max && self.get(last + 1) == state {
            last += 1;
        }
        Some((first, last))
    }

    /// Blocks in `[from, to]` whose state is not 0, as (first, last, state) runs — found a byte
    /// at a time, so scanning a large, mostly empty map is quick.
    pub(crate) fn nonzero_runs(&self, from: u64, to: u64, mut f: impl FnMut(u64, u64, u8) -> bool) {
        let mut b = from;
        while b <= to {
            if b & 3 == 0 && self.bits.get((b / 4) as usize) == Some(&0) {
                b += 4;
                continue;
            }
            let s = self.get(b);
            if s == 0 {
                b += 1;
                continue;
            }
            let start = b;
            while b < to && self.get(b + 1) == s {
                b += 1;
            }
            if !f(start, b, s) {
                return;
            }
            b += 1;
        }
    }
}

/// Lock a mutex, carrying on if another thread panicked while holding it: the protected data are
/// plain bitmaps and counters that stay consistent between statements.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Range locks
// ---------------------------------------------------------------------------------------------

/// How often a request waiting for a lock held on another event loop looks again. Contention on
/// the same blocks from different loops is rare (two clients writing into one block at once);
/// waiters on the holder's own loop are woken directly.
const CROSS_LOOP_POLL: Duration = Duration::from_millis(1);

type Wake = Box<dyn FnOnce()>;

thread_local! {
    /// Continuations of requests on this thread waiting for a range lock, by ticket.
    static WAITING: RefCell<HashMap<u64, Wake>> = RefCell::new(HashMap::new());
}

static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

/// Exclusive locks on ranges of block numbers, shared by every loop. A request that mutates
/// blocks holds the range it touches for the whole read-modify-write, so two partial writes into
/// one block cannot lose each other's bytes. Waiting never blocks a thread: the continuation is
/// parked and run when the range is granted. Grants are first come, first served among
/// overlapping requests, so a large range cannot be starved by a stream of small ones.
#[derive(Default)]
pub(crate) struct RangeLocks {
    state: Mutex<LockState>,
}

#[derive(Default)]
struct LockState {
    held: Vec<(u64, u64)>,
    queue: VecDeque<Queued>,
    /// Tickets granted to waiters on other threads, which collect them when they poll.
    granted: HashSet<u64>,
}

struct Queued {
    ticket: u64,
    first: u64,
    last: u64,
    thread: ThreadId,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

impl LockState {
    fn free(&self, r: (u64, u64)) -> bool {
        !self.held.iter().any(|h| overlaps(*h, r))
    }
}

/// A held range; dropping it releases the range and wakes whoever can go next.
pub(crate) struct RangeGuard {
    locks: Arc<RangeLocks>,
    range: (u64, u64),
    sched: Sched,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.locks.release(self.range, &self.sched);
    }
}

impl RangeLocks {
    pub(crate) fn new() -> Arc<RangeLocks> {
        Arc::new(RangeLocks::default())
    }

    /// Take `[first, last]` if nobody holds or waits for any of it.
    pub(crate) fn try_acquire(self: &Arc<Self>, sched: &Sched, first: u64, last: u64) -> Option<RangeGuard> {
        let mut st = lock(&self.state);
        let r = (first, last);
        if st.free(r) && !st.queue.iter().any(|q| overlaps((q.first, q.last), r)) {
            st.held.push(r);
            Some(RangeGuard { locks: self.clone(), range: r, sched: sched.clone() })
        } else {
            None
        }
    }

    /// Is block `b` neither held nor waited for right now?
    pub(crate) fn is_free(&self, b: u64) -> bool {
        let st = lock(&self.state);
        st.free((b, b)) && !st.queue.iter().any(|q| overlaps((q.first, q.last), (b, b)))
    }

    /// Run `then` with `[first, last]` held, now or once it is free.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        sched: &Sched,
        first: u64,
        last: u64,
        then: impl FnOnce(RangeGuard) + 'static,
    ) {
        if let Some(g) = self.try_acquire(sched, first, last) {
            return then(g);
        }
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        // The guard is only made once the range is granted: dropping an ungranted one would
        // release a range held by someone else.
        let (locks, s2) = (self.clone(), sched.clone());
        let wake: Wake = Box::new(move || then(RangeGuard { locks, range: (first, last), sched: s2 }));
        WAITING.with(|w| w.borrow_mut().insert(ticket, wake));
        let granted_now = {
            let mut st = lock(&self.state);
            // Re-check under the lock: the range may have been released in between.
            let r = (first, last);
            if st.free(r) && !st.queue.iter().any(|q| overlaps((q.first, q.last), r)) {
                st.held.push(r);
                true
            } else {
                st.queue.push_back(Queued { ticket, first, last, thread: thread::current().id() });
                false
            }
        };
        if granted_now {
            run_waiting(ticket);
        } else {
            self.poll(sched.clone(), ticket);
        }
    }

    /// Look for a grant made by a release on another thread.
    fn poll(self: &Arc<Self>, sched: Sched, ticket: u64) {
        let me = self.clone();
        let s2 = sched.clone();
        sched.after(CROSS_LOOP_POLL, move || {
            // Woken directly by a release on this thread: nothing left to do.
            if !WAITING.with(|w| w.borrow().contains_key(&ticket)) {
                return;
            }
            if lock(&me.state).granted.remove(&ticket) {
                run_waiting(ticket);
            } else {
                me.poll(s2, ticket);
            }
        });
    }

    fn release(&self, range: (u64, u64), sched: &Sched) {
        let here = thread::current().id();
        let mut local = Vec::new();
        {
            let mut st = lock(&self.state);
            if let Some(i) = st.held.iter().position(|h| *h == range) {
                st.held.swap_remove(i);
            }
            // Grant, in order, every waiter whose range is free and not wanted by an earlier
            // waiter that is still waiting.
            let mut i = 0;
            let mut blocked: Vec<(u64, u64)> = Vec::new();
            while let Some(q) = st.queue.get(i) {
                let r = (q.first, q.last);
                if !st.free(r) || blocked.iter().any(|b| overlaps(*b, r)) {
                    blocked.push(r);
                    i += 1;
                    continue;
                }
                if let Some(q) = st.queue.remove(i) {
                    st.held.push(r);
                    if q.thread == here {
                        local.push(q.ticket);
                    } else {
                        st.granted.insert(q.ticket);
                    }
                }
            }
        }
        for ticket in local {
            // Not run inline: the releaser may be deep in its own completion.
            sched.defer(move || run_waiting(ticket));
        }
    }
}

fn run_waiting(ticket: u64) {
    let wake = WAITING.with(|w| w.borrow_mut().remove(&ticket));
    if let Some(wake) = wake {
        wake()
    }
}

// ---------------------------------------------------------------------------------------------
// File IO: the loop's io_uring, or the blocking pool
// ---------------------------------------------------------------------------------------------

/// Read `len` bytes at `file_off` into `buf[at..at + len]`; the buffer comes back through
/// `done`. Bytes past the end of the file read as zeroes (blocks are written whole, so that only
/// happens for a file that was never extended that far). Through this loop's io_uring (the
/// completion wakes this loop) or, where there is none (`--io=pool`), the blocking pool.
pub(crate) fn read_at(
    sched: &Sched,
    file: &Arc<File>,
    mut buf: Vec<u8>,
    at: usize,
    len: usize,
    file_off: u64,
    done: Done<Vec<u8>>,
) {
    if let Some(ring) = uring::for_loop(sched) {
        let fd = file.as_raw_fd();
        return ring.read_range_at(
            fd,
            uring::keep(file.clone()),
            buf,
            at..at + len,
            file_off,
            Box::new(move |r, buf| give_back(done, r, buf)),
        );
    }
    let file = file.clone();
    sched.blocking(
        move || {
            let r = read_full(&file, &mut buf[at..at + len], file_off);
            (buf, r)
        },
        move |(buf, r): (Vec<u8>, io::Result<()>)| give_back(done, r, buf),
    )
}

/// Complete a store transfer: the buffer back on success, the error as an NBD error.
fn give_back(done: Done<Vec<u8>>, r: io::Result<()>, buf: Vec<u8>) {
    match r {
        Ok(()) => done.ok(buf),
        Err(e) => done.err(NbdError::from_io(&e)),
    }
}

fn read_full(file: &File, mut out: &mut [u8], mut off: u64) -> io::Result<()> {
    while !out.is_empty() {
        match file.read_at(out, off) {
            Ok(0) => {
                out.fill(0);
                return Ok(());
            }
            Ok(n) => {
                out = &mut out[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Write `data[at..at + len]` at `file_off` (as [`read_at`]: io_uring or the pool); the buffer
/// comes back.
pub(crate) fn write_at(
    sched: &Sched,
    file: &Arc<File>,
    data: Vec<u8>,
    at: usize,
    len: usize,
    file_off: u64,
    done: Done<Vec<u8>>,
) {
    if let Some(ring) = uring::for_loop(sched) {
        let fd = file.as_raw_fd();
        return ring.write_range_at(
            fd,
            uring::keep(file.clone()),
            data,
            at..at + len,
            file_off,
            Box::new(move |r, data| give_back(done, r, data)),
        );
    }
    let file = file.clone();
    sched.blocking(
        move || {
            let r = file.write_all_at(&data[at..at + len], file_off);
            (data, r)
        },
        move |(data, r): (Vec<u8>, io::Result<()>)| give_back(done, r, data),
    )
}

/// A filter that copies runs of blocks from the layer below into its own store: `cache` filling
/// itself on NBD_CMD_CACHE, `cow` with `cow-on-cache`.
pub(crate) trait CopyUp: Sized + 'static {
    fn sched(&self) -> &Sched;
    fn geometry(&self) -> Geometry;
    /// The next run of blocks in `[from, last]` still to copy, a bounded chunk at most.
    fn next_run(&self, from: u64, last: u64) -> Option<(u64, u64)>;
    /// Keep blocks `[fb, lb]`, read from below as `data`, then call `k`.
    fn keep(self: &Rc<Self>, fb: u64, lb: u64, data: Vec<u8>, k: impl FnOnce() + 'static);
}

/// Copy every run [`CopyUp::next_run`] finds in `[b, last]` up, one run at a time.
pub(crate) fn copy_up<C: CopyUp>(c: Rc<C>, next: Next, b: u64, last: u64, step: usize, done: Done<()>) {
    let Some((fb, lb)) = c.next_run(b, last) else { return done.ok(()) };
    let geo = c.geometry();
    let start = geo.start(fb);
    let len = (geo.end(lb) - start) as usize;
    let below = next.clone();
    next.pread(
        vec![0; len],
        start,
        Flags::NONE,
        Done::new(move |r: Result<Vec<u8>, NbdError>| match r {
            Ok(data) => {
                let c2 = c.clone();
                c.keep(fb, lb, data, move || {
                    let sched = c2.sched().clone();
                    next_step(&sched, step, move || copy_up(c2, below, lb + 1, last, step + 1, done))
                })
            }
            Err(e) => done.err(e),
        }),
    )
}

/// Continue a loop of asynchronous steps: directly, except every 16th step, which goes through
/// the loop's queue so a long run of synchronous completions cannot grow the stack without bound.
pub(crate) fn next_step(sched: &Sched, step: usize, k: impl FnOnce() + 'static) {
    if step % 16 == 15 {
        sched.defer(k)
    } else {
        k()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocksmith_core::sched::SimScheduler;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn the_block_map_comes_from_the_budget() {
        let budget = blocksmith_core::budget::Budget::new(1000);
        // 64 MiB in 64 KiB blocks: 1024 blocks, 256 bytes of map.
        let m = States::for_disk("cow", 64 << 20, 64 << 10, &budget).unwrap();
        assert_eq!(budget.used(), 256);
        let e = States::for_disk("cow", 1 << 30, 64 << 10, &budget).err().unwrap();
        assert!(e.message.unwrap().contains("memory budget"));
        drop(m);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn runs_of_one_state_are_bounded() {
        let mut s = States::new(20);
        for b in [3, 4, 5, 6, 9] {
            s.set(b, 2);
        }
        assert_eq!(s.run_in(2, 0, 19, 16), Some((3, 6)));
        assert_eq!(s.run_in(2, 0, 19, 2), Some((3, 4)));
        assert_eq!(s.run_in(2, 5, 19, 16), Some((5, 6)));
        assert_eq!(s.run_in(2, 3, 4, 16), Some((3, 4)), "stops at the range's end");
        assert_eq!(s.run_in(2, 7, 19, 16), Some((9, 9)));
        assert_eq!(s.run_in(2, 10, 19, 16), None);
        assert_eq!(s.run_in(0, 3, 19, 3), Some((7, 8)));
    }

    #[test]
    fn states_pack_two_bits_per_block() {
        let mut s = States::new(10);
        s.set(0, 1);
        s.set(3, 2);
        s.set(4, 3);
        s.set(9, 1);
        assert_eq!((0..10).map(|b| s.get(b)).collect::<Vec<_>>(), [1, 0, 0, 2, 3, 0, 0, 0, 0, 1]);
        s.set(3, 0);
        assert_eq!(s.get(3), 0);
        assert_eq!(s.get(100), 0, "out of range reads as 0");
        let mut runs = Vec::new();
        s.set(5, 3);
        s.nonzero_runs(0, 9, |a, b, v| {
            runs.push((a, b, v));
            true
        });
        assert_eq!(runs, [(0, 0, 1), (4, 5, 3), (9, 9, 1)]);
    }

    #[test]
    fn geometry_handles_a_short_last_block() {
        let g = Geometry { bs: 4096, size: 10000 };
        assert_eq!(g.blocks(), 3);
        assert_eq!(g.end(2), 10000);
        assert!(g.covers(2, 8192, 10000));
        assert!(!g.covers(1, 4097, 10000));
        assert_eq!(g.span(4095, 2), (0, 1));
    }

    #[test]
    fn on_read_parses_bools_and_paths() {
        assert_eq!(OnRead::parse("f", "k", None).unwrap(), OnRead::Never);
        assert_eq!(OnRead::parse("f", "k", Some("on".into())).unwrap(), OnRead::Always);
        assert!(matches!(OnRead::parse("f", "k", Some("/x".into())).unwrap(), OnRead::WhileExists(_)));
        assert!(OnRead::parse("f", "k", Some("maybe".into())).unwrap_err().0.contains("absolute path"));
        assert!(!OnRead::WhileExists("/nonexistent/blocksmith".into()).active());
    }

    #[test]
    fn block_size_must_be_a_power_of_two() {
        assert_eq!(parse_block_size("f", "k", None, 65536).unwrap(), 65536);
        assert_eq!(parse_block_size("f", "k", Some("4k".into()), 1).unwrap(), 4096);
        for bad in ["1000", "2k", "64M", "x"] {
            assert!(parse_block_size("f", "k", Some(bad.into()), 1).is_err(), "{bad}");
        }
    }

    #[test]
    fn temp_file_is_unlinked_and_usable() {
        let f = create_temp_file("test").unwrap();
        f.write_all_at(b"hello", 4096).unwrap();
        let mut b = [0u8; 5];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"hello");
        // Unlinked: the descriptor's path in /proc says "(deleted)".
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        assert!(link.to_string_lossy().ends_with("(deleted)"), "{link:?}");
    }

    #[test]
    fn range_locks_serialize_overlapping_and_admit_disjoint() {
        let sim = SimScheduler::new();
        let s = sim.sched();
        let locks = RangeLocks::new();
        let order = Rc::new(RefCell::new(Vec::new()));
        let g1 = locks.try_acquire(&s, 0, 3).unwrap();
        assert!(locks.try_acquire(&s, 3, 5).is_none());
        let o = order.clone();
        locks.acquire(&s, 2, 2, move |_g| o.borrow_mut().push("overlapping"));
        // Disjoint from what is held and from every waiter: it goes at once.
        let o = order.clone();
        locks.acquire(&s, 10, 11, move |_g| o.borrow_mut().push("disjoint"));
        // Overlaps the queued waiter for block 2, so it queues behind it (first come, first
        // served among overlapping requests).
        let got = Rc::new(Cell::new(false));
        let g = got.clone();
        locks.acquire(&s, 1, 2, move |_g| g.set(true));
        assert_eq!(*order.borrow(), ["disjoint"]);
        drop(g1);
        sim.run_until_idle();
        assert_eq!(*order.borrow(), ["disjoint", "overlapping"]);
        assert!(got.get());
        assert!(locks.try_acquire(&s, 0, 100).is_some(), "everything released");
    }

    #[test]
    fn range_locks_wake_waiters_on_other_loops() {
        use blocksmith_core::io::reactor::LocalLoop;
        let locks = RangeLocks::new();
        let mut lp = LocalLoop::new().unwrap();
        let held = locks.try_acquire(&lp.sched(), 0, 0).unwrap();
        let l2 = locks.clone();
        let other = std::thread::spawn(move || {
            let mut lp = LocalLoop::new().unwrap();
            let got = Rc::new(Cell::new(false));
            let g = got.clone();
            l2.acquire(&lp.sched(), 0, 0, move |_guard| g.set(true));
            lp.run_until(Duration::from_secs(10), || got.get())
        });
        lp.run_until(Duration::from_millis(20), || false);
        drop(held);
        assert!(other.join().unwrap(), "the waiter on the other loop got the lock");
    }
}
