//! The readahead filter (nbdkit-readahead-filter): when a client reads sequentially, fetch what
//! comes next before it is asked for.
//!
//! The window starts at 64 KiB and doubles with each sequential read, up to a bound; a read
//! elsewhere resets it. What is fetched depends on the layer below:
//! - if it supports cache (prefetch) requests, the window after each read is sent down as a
//!   cache request, as nbdkit ≥ 1.30 does, and the reads themselves pass through (put
//!   `--filter=cache` or `--filter=cow ... cow-on-cache=true` below to give prefetching a place
//!   to go);
//! - otherwise the window is read into a small per-connection buffer (at most 2 MiB, plus one
//!   read of the same size in flight) and later reads are served from it, as nbdkit's older
//!   readahead filter did. Reads that arrive while the window they fall in is still being
//!   fetched wait for it rather than read twice. Writes, trims and zeroes on the connection drop
//!   the buffer. Another connection's writes are not seen, so the export is not advertised as
//!   multi-conn consistent in this mode. The buffered window is reserved from the server's
//!   memory budget (`--memory-limit`); when the budget is spent there is no read-ahead and
//!   reads simply go below.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::budget::{Budget, Reservation};
use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, Support,
};

pub const SPEC: FilterSpec =
    FilterSpec { name: "readahead", summary: "prefetch data ahead of sequential reads", params: &[], make };

const INITIAL_WINDOW: u64 = 64 << 10;
/// Largest prefetch with cache requests (no memory of ours involved).
const MAX_CACHE_WINDOW: u64 = 8 << 20;
/// Largest buffered window per connection.
const MAX_BUFFER_WINDOW: u64 = 2 << 20;

fn make(_p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    Ok(Arc::new(ReadaheadFactory))
}

struct ReadaheadFactory;

impl FilterFactory for ReadaheadFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let info = next.info();
        let use_cache = info.cache != Support::None;
        let align = info.block_size.map_or(1, |b| u64::from(b.minimum.max(1)));
        let ra = Ra {
            size: info.size,
            align,
            use_cache,
            budget: cx.budget.clone(),
            st: RefCell::new(State { window: INITIAL_WINDOW, ..State::default() }),
        };
        Ok(Rc::new(FilterLayer { filter: Readahead(Rc::new(ra)), next }))
    }
}

struct Ra {
    size: u64,
    /// The layer below's minimum block size: prefetches start and end on it.
    align: u64,
    use_cache: bool,
    /// Buffered windows are reserved here: with the budget spent, reads just go below.
    budget: Budget,
    st: RefCell<State>,
}

type Waiter = (u64, Vec<u8>, Done<Vec<u8>>);

#[derive(Default)]
struct State {
    /// Where the last read ended: a read starting there is sequential.
    last_end: u64,
    window: u64,
    /// Cache mode: prefetched up to here.
    cached_until: u64,
    /// Buffer mode: the buffered window.
    buf_off: u64,
    buf: Rc<Vec<u8>>,
    /// The budget held by `buf`.
    held: Option<Reservation>,
    /// Buffer mode: the window being read, and the reads waiting for it.
    fetching: Option<(u64, u64, Vec<Waiter>)>,
    /// Bumped by writes: a window read before a write is stale.
    generation: u64,
}

struct Readahead(Rc<Ra>);

impl Ra {
    fn round_down(&self, x: u64) -> u64 {
        x - x % self.align
    }

    /// Note a read of `[offset, end)`: grow or reset the window. Returns whether it was
    /// sequential.
    fn note(&self, offset: u64, end: u64) -> bool {
        let mut st = self.st.borrow_mut();
        let sequential = offset == st.last_end && offset != 0;
        let max = if self.use_cache { MAX_CACHE_WINDOW } else { MAX_BUFFER_WINDOW };
        st.window = if sequential { (st.window * 2).min(max) } else { INITIAL_WINDOW };
        st.last_end = end;
        sequential
    }

    fn prefetch_cache(&self, next: &Next, end: u64) {
        let (from, to) = {
            let mut st = self.st.borrow_mut();
            let from = end.max(st.cached_until);
            let to = self.round_down((end + st.window).min(self.size)).max(from);
            if to > from {
                st.cached_until = to;
            }
            (from, to)
        };
        if to > from {
            next.cache(
                to - from,
                from,
                Flags::NONE,
                Done::new(move |r: Result<(), NbdError>| {
                    if let Err(e) = r {
                        ::log::debug!("readahead: prefetch of {from}+{}: {e}", to - from);
                    }
                }),
            );
        }
    }

    /// Serve `[offset, offset + buf.len())` from the buffer if it is all there.
    fn serve_buffered(&self, offset: u64, mut buf: Vec<u8>) -> Result<Vec<u8>, Vec<u8>> {
        let st = self.st.borrow();
        let end = offset + buf.len() as u64;
        if offset >= st.buf_off && end <= st.buf_off + st.buf.len() as u64 {
            let at = (offset - st.buf_off) as usize;
            let n = buf.len();
            buf.copy_from_slice(&st.buf[at..at + n]);
            Ok(buf)
        } else {
            Err(buf)
        }
    }

    /// Start reading the window after `end` into the buffer, unless one is already being read
    /// or the buffer already reaches half a window past `end`.
    fn prefetch_buffer(self: &Rc<Self>, next: &Next, end: u64) {
        let (from, len, generation) = {
            let mut st = self.st.borrow_mut();
            let buf_end = st.buf_off + st.buf.len() as u64;
            if st.fetching.is_some() || (end >= st.buf_off && buf_end >= end + st.window / 2) {
                return;
            }
            let from = if end >= st.buf_off && end < buf_end { buf_end } else { end };
            let to = self.round_down((from + st.window).min(self.size));
            if to <= from {
                return;
            }
            st.fetching = Some((from, to - from, Vec::new()));
            (from, to - from, st.generation)
        };
        // The window being read and the one it replaces both count until the swap.
        let Some(reserved) = self.budget.reserve(len as usize) else {
            // Out of budget: no read-ahead now; waiting reads (none yet) would read for themselves.
            self.st.borrow_mut().fetching = None;
            return;
        };
        let (me, next2) = (self.clone(), next.clone());
        next.pread(
            vec![0; len as usize],
            from,
            Flags::NONE,
            Done::new(move |r: Result<Vec<u8>, NbdError>| {
                let waiters = {
                    let mut st = me.st.borrow_mut();
                    let waiters = st.fetching.take().map(|f| f.2).unwrap_or_default();
                    match r {
                        Ok(data) if st.generation == generation => {
                            st.buf_off = from;
                            st.buf = Rc::new(data);
                            st.held = Some(reserved);
                        }
                        Ok(_) => {}
                        Err(e) => ::log::debug!("readahead: reading ahead {from}+{len}: {e}"),
                    }
                    waiters
                };
                // Waiters get the new buffer, or read for themselves if it failed or went stale.
                let mut last = None;
                for (offset, buf, done) in waiters {
                    let end = offset + buf.len() as u64;
                    match me.serve_buffered(offset, buf) {
                        Ok(b) => done.ok(b),
                        Err(b) => next2.pread(b, offset, Flags::NONE, done),
                    }
                    last = Some(end);
                }
                if let Some(end) = last {
                    me.prefetch_buffer(&next2, end);
                }
            }),
        );
    }

    fn invalidate(&self) {
        let mut st = self.st.borrow_mut();
        st.generation += 1;
        st.buf = Rc::new(Vec::new());
        st.held = None;
        st.cached_until = 0;
    }
}

impl Filter for Readahead {
    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        if self.0.use_cache {
            below
        } else {
            ExportInfo { can_multi_conn: false, ..below }
        }
    }

    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let ra = &self.0;
        let end = offset + buf.len() as u64;
        let sequential = ra.note(offset, end);
        if ra.use_cache {
            if sequential {
                ra.prefetch_cache(next, end);
            }
            return next.pread(buf, offset, flags, done);
        }
        let buf = match ra.serve_buffered(offset, buf) {
            Ok(b) => {
                done.ok(b);
                return ra.prefetch_buffer(next, end);
            }
            Err(b) => b,
        };
        {
            let mut st = ra.st.borrow_mut();
            if let Some((f, l, waiters)) = &mut st.fetching {
                if offset >= *f && end <= *f + *l {
                    waiters.push((offset, buf, done));
                    return;
                }
            }
        }
        next.pread(buf, offset, flags, done);
        if sequential {
            ra.prefetch_buffer(next, end);
        }
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        self.0.invalidate();
        next.pwrite(data, offset, flags, done)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        self.0.invalidate();
        next.zero(count, offset, flags, done)
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        self.0.invalidate();
        next.trim(count, offset, flags, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn pattern(offset: u64, len: usize) -> Vec<u8> {
        (offset..offset + len as u64).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn sequential_reads_send_growing_cache_requests_down() {
        let sim = SimScheduler::new();
        let ram = Ram::new(4 << 20);
        let top = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        for i in 0..4u64 {
            let got = wait(&sim, |d| top.pread(vec![0; 4096], i * 4096, Flags::NONE, d)).unwrap();
            assert_eq!(got, pattern(i * 4096, 4096));
        }
        // The first read is not sequential; then windows of 128K, 256K, 512K after each read,
        // less what was already prefetched, sent down before the read itself.
        assert_eq!(
            ram.calls(),
            [
                "pread 4096@0",
                "cache 131072@8192",
                "pread 4096@4096",
                "cache 135168@139264",
                "pread 4096@8192",
                "cache 266240@274432",
                "pread 4096@12288",
            ]
        );
        // A random read resets the window and prefetches nothing.
        wait(&sim, |d| top.pread(vec![0; 512], 3 << 20, Flags::NONE, d)).unwrap();
        assert_eq!(ram.calls().last().map(String::as_str), Some("pread 512@3145728"));
    }

    #[test]
    fn without_cache_below_reads_are_served_from_a_buffer() {
        let sim = SimScheduler::new();
        let ram = Ram::with(4 << 20, |r| r.info.cache = Support::None);
        let top = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        assert!(!top.info().can_multi_conn);
        for i in 0..64u64 {
            let got = wait(&sim, |d| top.pread(vec![0; 4096], i * 4096, Flags::NONE, d)).unwrap();
            assert_eq!(got, pattern(i * 4096, 4096), "read {i}");
        }
        let calls = ram.calls();
        assert!(calls.len() < 10, "64 reads took {} reads below: {calls:?}", calls.len());
        // A write drops the buffer so the next read sees it.
        wait(&sim, |d| top.pwrite(vec![7; 4096], 64 * 4096, Flags::NONE, d)).unwrap();
        let got = wait(&sim, |d| top.pread(vec![0; 4096], 64 * 4096, Flags::NONE, d)).unwrap();
        assert_eq!(got, vec![7; 4096]);
    }

    #[test]
    fn buffered_windows_come_from_the_budget() {
        let sim = SimScheduler::new();
        let ram = Ram::with(4 << 20, |r| r.info.cache = Support::None);
        // A budget too small for any window: no read-ahead, every read goes below, all correct.
        let mut c = cx(&sim);
        c.budget = blocksmith_core::budget::Budget::new(1024);
        let top = open(&configure(&SPEC, &[]), &c, ram.clone()).unwrap();
        for i in 0..16u64 {
            let got = wait(&sim, |d| top.pread(vec![0; 4096], i * 4096, Flags::NONE, d)).unwrap();
            assert_eq!(got, pattern(i * 4096, 4096), "read {i}");
        }
        assert_eq!(ram.calls().len(), 16, "no read-ahead without budget");
        // With budget, the window is held while buffered and given back when dropped.
        let mut c = cx(&sim);
        let budget = blocksmith_core::budget::Budget::new(64 << 20);
        c.budget = budget.clone();
        let top = open(&configure(&SPEC, &[]), &c, ram.clone()).unwrap();
        for i in 0..16u64 {
            wait(&sim, |d| top.pread(vec![0; 4096], i * 4096, Flags::NONE, d)).unwrap();
        }
        assert!(budget.used() > 0, "the buffered window is reserved");
        drop(top);
        assert_eq!(budget.used(), 0, "and released with the connection");
    }

    #[test]
    fn reads_waiting_for_a_window_are_served_once_it_arrives() {
        let sim = SimScheduler::new();
        let ram = Ram::with(1 << 20, |r| r.info.cache = Support::None);
        let top = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.pread(vec![0; 4096], 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.pread(vec![0; 4096], 4096, Flags::NONE, d)).unwrap();
        let got = wait(&sim, |d| top.pread(vec![0; 8192], 8192, Flags::NONE, d)).unwrap();
        assert_eq!(got, pattern(8192, 8192));
        // The last read came from the window read after the second.
        assert_eq!(
            ram.calls(),
            ["pread 4096@0", "pread 4096@4096", "pread 131072@8192", "pread 262144@139264"]
        );
    }

    #[test]
    fn failed_readahead_falls_back_to_plain_reads() {
        let sim = SimScheduler::new();
        let ram = Ram::with(1 << 20, |r| {
            r.info.cache = Support::None;
            r.fail_at = Some(100_000);
        });
        let top = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        for i in 0..4u64 {
            let got = wait(&sim, |d| top.pread(vec![0; 4096], i * 4096, Flags::NONE, d)).unwrap();
            assert_eq!(got, pattern(i * 4096, 4096));
        }
        let e = wait(&sim, |d| top.pread(vec![0; 4096], 98304, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, blocksmith_core::error::Errno::Io);
    }
}
