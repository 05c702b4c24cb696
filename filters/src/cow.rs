//! The cow filter (nbdkit-cow-filter): a copy-on-write overlay. Writes, trims and zeroes land in
//! a temporary file; the layer below is only ever read, so it may be read-only. Reads merge the
//! overlay's blocks with the layer below.
//!
//! The overlay is one per server and shared by every connection, as in nbdkit, so all clients
//! see the same disk. It is kept in whole blocks (`cow-block-size`, default 64K): a write that
//! covers only part of a block reads the rest of the block first (from the overlay or from
//! below) and writes the whole block. Each block is in one of three states, two bits in memory:
//! not in the overlay (read from below), in the overlay, or known to read as zeroes (trimmed or
//! zeroed whole, no data stored). The temporary file is created in `$TMPDIR` (default /var/tmp)
//! and unlinked at once, so it disappears with the server however it exits.
//!
//! Requests that change blocks hold a lock on the blocks they touch (see [`RangeLocks`]) for
//! the whole read-modify-write, so concurrent partial writes into one block, even from clients
//! on different event loops, never lose each other's bytes. Reads take no lock: a read racing a
//! write of the same bytes may see either, as the NBD protocol allows.

use std::fs::File;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx,
    ParamSpec, Support, EXTENT_HOLE, EXTENT_ZERO,
};
use blocksmith_core::sched::Sched;

use crate::overlay::{
    copy_up, create_temp_file, lock, next_step, parse_block_size, read_at, write_at, CopyUp, Geometry,
    OnRead, RangeGuard, RangeLocks, States,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "cow",
    summary: "copy-on-write overlay in a temporary file; the layer below is never written",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "cow-block-size",
        help: "Overlay block size: a power of two from 4K to 32M (default 64K).",
    },
    ParamSpec {
        name: "cow-on-cache",
        help: "true: cache (prefetch) requests copy blocks into the overlay;\n\
               false (default): they are passed to the layer below.",
    },
    ParamSpec {
        name: "cow-on-read",
        help: "true: copy blocks read from below into the overlay; false (default): do not;\n\
               /PATH: do so while /PATH exists.",
    },
];

/// Block states. Every block starts in the layer below.
const BELOW: u8 = 0;
const OVERLAY: u8 = 1;
const ZERO: u8 = 2;

/// Largest read from below that `cow-on-cache` makes at once, so a big cache request does not
/// allocate its whole length.
const CACHE_CHUNK: u64 = 1 << 20;

/// Most extents one block-status reply describes; the client asks again for the rest.
const MAX_EXTENTS: usize = 1024;

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let err = |e: ConfigError| ConfigError::new(format!("cow: {}", e.0));
    let bs = parse_block_size("cow", "cow-block-size", p.take("cow-block-size"), 65536)?;
    let on_cache = p.take_bool("cow-on-cache").map_err(err)?.unwrap_or(false);
    let on_read = OnRead::parse("cow", "cow-on-read", p.take("cow-on-read"))?;
    // Created now so a bad $TMPDIR is reported at start-up.
    let file = create_temp_file("cow")
        .map_err(|e| ConfigError::new(format!("cow: cannot create the overlay file: {e}")))?;
    Ok(Arc::new(CowFactory(Arc::new(Shared {
        file: Arc::new(file),
        bs,
        on_cache,
        on_read,
        locks: RangeLocks::new(),
        map: Mutex::new(Map { size: None, states: States::new(0) }),
    }))))
}

/// The overlay, shared by every connection on every loop.
struct Shared {
    file: Arc<File>,
    bs: u64,
    on_cache: bool,
    on_read: OnRead,
    locks: Arc<RangeLocks>,
    map: Mutex<Map>,
}

struct Map {
    /// The size of the layer below, fixed by the first connection.
    size: Option<u64>,
    states: States,
}

struct CowFactory(Arc<Shared>);

impl FilterFactory for CowFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let size = next.info().size;
        {
            let mut map = lock(&self.0.map);
            match map.size {
                None => {
                    map.states = States::for_disk("cow", size, self.0.bs, &cx.budget)?;
                    map.size = Some(size);
                }
                Some(s) if s != size => {
                    return Err(NbdError::io(format!(
                        "cow: the layer below is {size} bytes but the overlay was made for {s}; \
                         the overlay cannot follow a resize"
                    )))
                }
                Some(_) => {}
            }
        }
        let conn =
            CowConn { sh: self.0.clone(), sched: cx.sched.clone(), geo: Geometry { bs: self.0.bs, size } };
        Ok(Rc::new(FilterLayer { filter: CowFilter(Rc::new(conn)), next }))
    }
}

/// One connection's handle on the overlay.
struct CowConn {
    sh: Arc<Shared>,
    sched: Sched,
    geo: Geometry,
}

impl CopyUp for CowConn {
    fn sched(&self) -> &Sched {
        &self.sched
    }
    fn geometry(&self) -> Geometry {
        self.geo
    }
    fn next_run(&self, from: u64, last: u64) -> Option<(u64, u64)> {
        lock(&self.sh.map).states.run_in(BELOW, from, last, (CACHE_CHUNK / self.geo.bs).max(1))
    }
    fn keep(self: &Rc<Self>, fb: u64, lb: u64, data: Vec<u8>, k: impl FnOnce() + 'static) {
        self.copy_into_overlay(fb, lb, data, k)
    }
}

struct CowFilter(Rc<CowConn>);

/// A run of blocks in one state, clipped to a request: `[off, off + len)` of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    state: u8,
    off: u64,
    len: u64,
}

type Segs = Rc<[Seg]>;

impl CowConn {
    fn state(&self, b: u64) -> u8 {
        lock(&self.sh.map).states.get(b)
    }

    fn set_states(&self, first: u64, last: u64, state: u8, only_full: Option<(u64, u64)>) {
        let mut map = lock(&self.sh.map);
        for b in first..=last {
            let wanted = match only_full {
                None => true,
                Some((o, e)) => self.geo.covers(b, o, e),
            };
            if wanted {
                map.states.set(b, state);
            }
        }
    }

    /// The request `[offset, offset + len)` cut into runs of blocks in the same state.
    fn segments(&self, offset: u64, len: u64) -> Segs {
        let (first, last) = self.geo.span(offset, len);
        let end = offset + len;
        let map = lock(&self.sh.map);
        let mut segs: Vec<Seg> = Vec::new();
        for b in first..=last {
            let state = map.states.get(b);
            let a = offset.max(self.geo.start(b));
            let e = end.min(self.geo.end(b));
            match segs.last_mut() {
                Some(l) if l.state == state && l.off + l.len == a => l.len += e - a,
                _ => segs.push(Seg { state, off: a, len: e - a }),
            }
        }
        segs.into()
    }

    #[allow(clippy::too_many_arguments)] // one asynchronous loop's state, passed along whole
    fn read_segs(
        c: Rc<Self>,
        next: Next,
        mut buf: Vec<u8>,
        base: u64,
        segs: Segs,
        mut i: usize,
        copy: bool,
        done: Done<Vec<u8>>,
    ) {
        loop {
            let Some(seg) = segs.get(i).copied() else { return done.ok(buf) };
            let (at, n) = ((seg.off - base) as usize, seg.len as usize);
            if seg.state == ZERO {
                buf[at..at + n].fill(0);
                i += 1;
                continue;
            }
            let (c2, next2, segs2) = (c.clone(), next.clone(), segs.clone());
            let k = move |r: Result<Vec<u8>, NbdError>| match r {
                Ok(buf) => {
                    let sched = c2.sched.clone();
                    next_step(&sched, i, move || {
                        CowConn::read_segs(c2, next2, buf, base, segs2, i + 1, copy, done)
                    })
                }
                Err(e) => done.err(e),
            };
            if seg.state == OVERLAY {
                return read_at(&c.sched, &c.sh.file, buf, at, n, seg.off, Done::new(k));
            }
            if !copy {
                return next.pread(
                    vec![0; n],
                    seg.off,
                    Flags::NONE,
                    Done::new(move |r: Result<Vec<u8>, NbdError>| {
                        k(r.map(|data| {
                            buf[at..at + n].copy_from_slice(&data);
                            buf
                        }))
                    }),
                );
            }
            // cow-on-read: read whole blocks so they can go into the overlay.
            let (fb, lb) = c.geo.span(seg.off, seg.len);
            let start = c.geo.start(fb);
            let whole = (c.geo.end(lb) - start) as usize;
            let c3 = c.clone();
            return next.pread(
                vec![0; whole],
                start,
                Flags::NONE,
                Done::new(move |r: Result<Vec<u8>, NbdError>| match r {
                    Ok(blocks) => {
                        let from = (seg.off - start) as usize;
                        buf[at..at + n].copy_from_slice(&blocks[from..from + n]);
                        c3.copy_into_overlay(fb, lb, blocks, move || k(Ok(buf)));
                    }
                    Err(e) => k(Err(e)),
                }),
            );
        }
    }

    /// Store blocks `[fb, lb]` just read from below in the overlay, unless another request is
    /// changing them or already has: it is only a copy, so it gives way rather than waits.
    fn copy_into_overlay(self: &Rc<Self>, fb: u64, lb: u64, data: Vec<u8>, k: impl FnOnce() + 'static) {
        let Some(guard) = self.sh.locks.try_acquire(&self.sched, fb, lb) else { return k() };
        // Under the lock: a block written since it was read must keep the newer data.
        if !(fb..=lb).all(|b| self.state(b) == BELOW) {
            drop(guard);
            return k();
        }
        let c = self.clone();
        let len = data.len();
        write_at(
            &self.sched,
            &self.sh.file,
            data,
            0,
            len,
            self.geo.start(fb),
            Done::new(move |r: Result<Vec<u8>, NbdError>| {
                match r {
                    Ok(_) => c.set_states(fb, lb, OVERLAY, None),
                    // The client's read succeeded; only the copy failed. Leave the blocks below.
                    Err(e) => ::log::debug!("cow: copying blocks {fb}..={lb} into the overlay: {e}"),
                }
                drop(guard);
                k()
            }),
        )
    }

    /// Read block `b` as the client would see it into `buf[at..]`.
    fn fetch_block(self: &Rc<Self>, next: &Next, b: u64, mut buf: Vec<u8>, at: usize, done: Done<Vec<u8>>) {
        let start = self.geo.start(b);
        let n = (self.geo.end(b) - start) as usize;
        match self.state(b) {
            OVERLAY => read_at(&self.sched, &self.sh.file, buf, at, n, start, done),
            ZERO => {
                buf[at..at + n].fill(0);
                done.ok(buf)
            }
            _ => next.pread(
                vec![0; n],
                start,
                Flags::NONE,
                done.map(move |r: Result<Vec<u8>, NbdError>| {
                    r.map(|d| {
                        buf[at..at + n].copy_from_slice(&d);
                        buf
                    })
                }),
            ),
        }
    }

    /// Write `data` (or zeroes) over `[offset, offset + len)` with the blocks locked by `guard`.
    fn mutate(
        c: Rc<Self>,
        next: Next,
        offset: u64,
        len: u64,
        data: Option<Vec<u8>>,
        guard: RangeGuard,
        done: Done<()>,
    ) {
        let end = offset + len;
        let (first, last) = c.geo.span(offset, len);
        let head_full = c.geo.covers(first, offset, end);
        let tail_full = c.geo.covers(last, offset, end);
        let Some(data) = data else {
            // Zero: whole blocks just change state; partial ones are read, zeroed and written.
            c.set_states(first, last, ZERO, Some((offset, end)));
            let mut partial = Vec::new();
            if !head_full {
                partial.push(first);
            }
            if !tail_full && last != first {
                partial.push(last);
            }
            return CowConn::zero_partial(c, next, partial, offset, end, guard, done);
        };
        let c2 = c.clone();
        let finish = move |r: Result<Vec<u8>, NbdError>| {
            if r.is_ok() {
                c2.set_states(first, last, OVERLAY, None);
            }
            drop(guard);
            done.call(r.map(drop))
        };
        if head_full && tail_full {
            return write_at(&c.sched, &c.sh.file, data, 0, len as usize, offset, Done::new(finish));
        }
        // Unaligned: assemble whole blocks, reading the parts of the end blocks not written.
        let bstart = c.geo.start(first);
        let total = (c.geo.end(last) - bstart) as usize;
        let tail_at = (c.geo.start(last) - bstart) as usize;
        let need_tail = !tail_full && (last != first || head_full);
        let c3 = c.clone();
        let assemble = move |r: Result<Vec<u8>, NbdError>| match r {
            Ok(mut buf) => {
                let at = (offset - bstart) as usize;
                buf[at..at + data.len()].copy_from_slice(&data);
                write_at(&c3.sched, &c3.sh.file, buf, 0, total, bstart, Done::new(finish));
            }
            Err(e) => finish(Err(e)),
        };
        let buf = vec![0u8; total];
        let (c4, next4) = (c.clone(), next.clone());
        let tail = move |r: Result<Vec<u8>, NbdError>| match r {
            Ok(buf) if need_tail => c4.fetch_block(&next4, last, buf, tail_at, Done::new(assemble)),
            other => assemble(other),
        };
        if head_full {
            tail(Ok(buf))
        } else {
            c.fetch_block(&next, first, buf, 0, Done::new(tail))
        }
    }

    /// Zero the parts of the (at most two) partially covered blocks, one after the other.
    fn zero_partial(
        c: Rc<Self>,
        next: Next,
        mut blocks: Vec<u64>,
        offset: u64,
        end: u64,
        guard: RangeGuard,
        done: Done<()>,
    ) {
        let Some(b) = blocks.pop() else {
            drop(guard);
            return done.ok(());
        };
        let start = c.geo.start(b);
        let n = (c.geo.end(b) - start) as usize;
        let (c2, next2) = (c.clone(), next.clone());
        c.fetch_block(
            &next,
            b,
            vec![0; n],
            0,
            Done::new(move |r: Result<Vec<u8>, NbdError>| match r {
                Ok(mut buf) => {
                    let from = (offset.max(start) - start) as usize;
                    let to = (end.min(start + n as u64) - start) as usize;
                    buf[from..to].fill(0);
                    let c3 = c2.clone();
                    write_at(
                        &c2.sched,
                        &c2.sh.file,
                        buf,
                        0,
                        n,
                        start,
                        Done::new(move |r: Result<Vec<u8>, NbdError>| match r {
                            Ok(_) => {
                                c3.set_states(b, b, OVERLAY, None);
                                CowConn::zero_partial(c3, next2, blocks, offset, end, guard, done)
                            }
                            Err(e) => {
                                drop(guard);
                                done.err(e)
                            }
                        }),
                    )
                }
                Err(e) => {
                    drop(guard);
                    done.err(e)
                }
            }),
        )
    }

    fn extents_segs(
        c: Rc<Self>,
        next: Next,
        segs: Segs,
        i: usize,
        mut out: Extents,
        req_one: bool,
        done: Done<Extents>,
    ) {
        for (j, seg) in segs.iter().enumerate().skip(i) {
            if (req_one && !out.0.is_empty()) || out.0.len() >= MAX_EXTENTS {
                break;
            }
            match seg.state {
                OVERLAY => out.push(seg.len, 0),
                ZERO => out.push(seg.len, EXTENT_HOLE | EXTENT_ZERO),
                _ => {
                    let (c2, next2, segs2) = (c.clone(), next.clone(), segs.clone());
                    let flags = if req_one { Flags::REQ_ONE } else { Flags::NONE };
                    let want = seg.len;
                    return next.extents(
                        want,
                        seg.off,
                        flags,
                        Done::new(move |r: Result<Extents, NbdError>| match r {
                            Ok(below) => {
                                let mut covered = 0;
                                for e in below.0 {
                                    let n = e.length.min(want - covered);
                                    out.push(n, e.flags);
                                    covered += n;
                                    if covered == want {
                                        break;
                                    }
                                }
                                if covered < want {
                                    // Below described less: say what is known, the client asks
                                    // again from there.
                                    return done.ok(out);
                                }
                                let sched = c2.sched.clone();
                                next_step(&sched, j, move || {
                                    CowConn::extents_segs(c2, next2, segs2, j + 1, out, req_one, done)
                                })
                            }
                            Err(e) => done.err(e),
                        }),
                    );
                }
            }
        }
        done.ok(out)
    }
}

impl Filter for CowFilter {
    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        // Whatever the layer below can do, the overlay can write, trim, zero, flush (a no-op:
        // the overlay does not outlive the server) and describe its blocks.
        ExportInfo {
            size: self.0.geo.size,
            can_write: true,
            can_flush: true,
            fua: Support::Native,
            can_trim: true,
            zero: Support::Native,
            can_fast_zero: true,
            can_extents: true,
            cache: Support::Native,
            can_multi_conn: true,
            ..below
        }
    }

    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        let segs = self.0.segments(offset, buf.len() as u64);
        let copy = segs.iter().any(|s| s.state == BELOW) && self.0.sh.on_read.active();
        CowConn::read_segs(self.0.clone(), next.clone(), buf, offset, segs, 0, copy, done)
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, _flags: Flags, done: Done<()>) {
        // FUA needs nothing: the overlay is not meant to survive the server.
        let len = data.len() as u64;
        let (first, last) = self.0.geo.span(offset, len);
        let (c, next) = (self.0.clone(), next.clone());
        self.0.sh.locks.acquire(&self.0.sched, first, last, move |g| {
            CowConn::mutate(c, next, offset, len, Some(data), g, done)
        })
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let g = self.0.geo;
        let (first, last) = g.span(offset, count);
        let end = offset + count;
        let whole = g.covers(first, offset, end) && g.covers(last, offset, end);
        // Whole blocks are zeroed in memory alone, which is fast; partial ones need a
        // read-modify-write, which is not.
        if flags.contains(Flags::FAST_ZERO) && !whole {
            return done.err(NbdError::msg(Errno::NotSup, "cow: zeroing part of a block is not fast"));
        }
        let (c, next) = (self.0.clone(), next.clone());
        self.0.sh.locks.acquire(&self.0.sched, first, last, move |guard| {
            CowConn::mutate(c, next, offset, count, None, guard, done)
        })
    }

    fn trim(&self, _next: &Next, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        // Whole blocks read as zeroes afterwards; the parts of blocks at the ends keep their data
        // (a trim is advisory).
        let (first, last) = self.0.geo.span(offset, count);
        let c = self.0.clone();
        self.0.sh.locks.acquire(&self.0.sched, first, last, move |guard| {
            c.set_states(first, last, ZERO, Some((offset, offset + count)));
            drop(guard);
            done.ok(())
        })
    }

    fn flush(&self, _next: &Next, _flags: Flags, done: Done<()>) {
        done.ok(())
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        let segs = self.0.segments(offset, count);
        let req_one = flags.contains(Flags::REQ_ONE);
        CowConn::extents_segs(self.0.clone(), next.clone(), segs, 0, Extents::new(), req_one, done)
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        if !self.0.sh.on_cache {
            return next.cache(count, offset, flags, done);
        }
        let (first, last) = self.0.geo.span(offset, count);
        copy_up(self.0.clone(), next.clone(), first, last, 0, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram, DATA_END};
    use blocksmith_core::layer::Extent;
    use blocksmith_core::sched::SimScheduler;
    use std::cell::RefCell;

    fn pattern(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    fn read(sim: &SimScheduler, top: &Rc<impl Layer + ?Sized>, offset: u64, len: usize) -> Vec<u8> {
        wait(sim, |d| top.pread(vec![0; len], offset, Flags::NONE, d)).unwrap()
    }

    fn writes_below(ram: &Ram) -> Vec<String> {
        ram.calls().into_iter().filter(|c| !c.starts_with("pread") && !c.starts_with("extents")).collect()
    }

    #[test]
    fn writes_land_in_the_overlay_only() {
        let sim = SimScheduler::new();
        let ram = Ram::with(1 << 20, |r| r.info.can_write = false);
        let before = ram.data.borrow().clone();
        let f = configure(&SPEC, &[("cow-block-size", "4k")]);
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        let info = top.info();
        assert!(info.can_write && info.can_trim && info.can_extents && info.can_flush);

        // Aligned, unaligned within one block, and unaligned across blocks.
        wait(&sim, |d| top.pwrite(vec![1; 4096], 8192, Flags::FUA, d)).unwrap();
        wait(&sim, |d| top.pwrite(vec![2; 10], 100, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.pwrite(vec![3; 5000], 20000, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();

        let mut expect = before.clone();
        expect[8192..12288].fill(1);
        expect[100..110].fill(2);
        expect[20000..25000].fill(3);
        assert_eq!(read(&sim, &top, 0, 65536), expect[..65536]);
        assert_eq!(read(&sim, &top, 99, 12), expect[99..111]);
        assert_eq!(*ram.data.borrow(), before, "the layer below is untouched");
        assert!(writes_below(&ram).is_empty(), "{:?}", ram.calls());
    }

    #[test]
    fn zero_and_trim_read_back_as_zeroes() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &[("cow-block-size", "4k")]), &cx(&sim), ram.clone()).unwrap();
        // Whole blocks and partial ends.
        wait(&sim, |d| top.zero(9000, 3000, Flags::MAY_TRIM, d)).unwrap();
        let got = read(&sim, &top, 0, 16384);
        let mut expect = pattern(0, 16384);
        expect[3000..12000].fill(0);
        assert_eq!(got, expect);
        // Fast zero: whole blocks only.
        wait(&sim, |d| top.zero(8192, 16384, Flags::FAST_ZERO, d)).unwrap();
        let e = wait(&sim, |d| top.zero(100, 16384, Flags::FAST_ZERO, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NotSup);
        // Trim zeroes whole blocks and leaves the partial ends alone.
        wait(&sim, |d| top.trim(8192 + 200, 32768 - 100, Flags::NONE, d)).unwrap();
        let got = read(&sim, &top, 32768 - 100, 8192 + 200);
        let mut expect = pattern(32768 - 100, 8192 + 200);
        expect[100..100 + 8192].fill(0);
        assert_eq!(got, expect);
        assert!(writes_below(&ram).is_empty());
        // Writing into a zeroed block keeps the rest of it zero.
        wait(&sim, |d| top.pwrite(vec![9; 4], 16390, Flags::NONE, d)).unwrap();
        assert_eq!(read(&sim, &top, 16384, 12), [0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 0, 0]);
    }

    #[test]
    fn extents_merge_overlay_and_below() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &[("cow-block-size", "4k")]), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.pwrite(vec![1; 4096], 8192, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.zero(4096, 0, Flags::NONE, d)).unwrap();
        let e = wait(&sim, |d| top.extents(65536, 0, Flags::NONE, d)).unwrap();
        // Below, only [0, DATA_END = 4K) is data. Above: [0,4K) zeroed in the overlay, [4K,8K)
        // from below (a hole), [8K,12K) written (data), the rest from below (a hole).
        assert_eq!(DATA_END, 4096);
        assert_eq!(
            e.0,
            [
                Extent { length: 8192, flags: EXTENT_HOLE | EXTENT_ZERO },
                Extent { length: 4096, flags: 0 },
                Extent { length: 65536 - 12288, flags: EXTENT_HOLE | EXTENT_ZERO },
            ]
        );
        let e = wait(&sim, |d| top.extents(8192, 8192, Flags::REQ_ONE, d)).unwrap();
        assert_eq!(e.0, [Extent { length: 4096, flags: 0 }]);
    }

    #[test]
    fn cow_on_read_copies_blocks_so_later_reads_stay_above() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let f = configure(&SPEC, &[("cow-block-size", "4k"), ("cow-on-read", "true")]);
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        assert_eq!(read(&sim, &top, 5000, 100), pattern(5000, 100));
        assert_eq!(ram.calls(), ["pread 4096@4096"], "whole block read");
        ram.data.borrow_mut().fill(0xee);
        assert_eq!(read(&sim, &top, 4096, 4096), pattern(4096, 4096), "served from the overlay");
        assert_eq!(ram.calls().len(), 1);
    }

    #[test]
    fn cow_on_cache_copies_and_plain_cache_passes_down() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &[("cow-block-size", "4k")]), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.cache(100, 0, Flags::NONE, d)).unwrap();
        assert_eq!(ram.calls(), ["cache 100@0"]);

        let ram = Ram::new(65536);
        let f = configure(&SPEC, &[("cow-block-size", "4k"), ("cow-on-cache", "true")]);
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.pwrite(vec![7; 4096], 4096, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.cache(16384, 0, Flags::NONE, d)).unwrap();
        // The block already in the overlay is skipped.
        assert_eq!(ram.calls(), ["pread 4096@0", "pread 8192@8192"]);
        ram.data.borrow_mut().fill(0);
        let mut expect = pattern(0, 16384);
        expect[4096..8192].fill(7);
        assert_eq!(read(&sim, &top, 0, 16384), expect);
    }

    #[test]
    fn short_last_block_and_shared_overlay() {
        let sim = SimScheduler::new();
        let ram = Ram::new(10000);
        let f = configure(&SPEC, &[("cow-block-size", "4k")]);
        let a = open(&f, &cx(&sim), ram.clone()).unwrap();
        let b = open(&f, &cx(&sim), ram.clone()).unwrap();
        assert_eq!(a.info().size, 10000);
        wait(&sim, |d| a.pwrite(vec![5; 10], 9990, Flags::NONE, d)).unwrap();
        let mut expect = pattern(8192, 1808);
        expect[1798..].fill(5);
        assert_eq!(read(&sim, &b, 8192, 1808), expect, "the other connection sees the write");
        wait(&sim, |d| b.zero(1808, 8192, Flags::FAST_ZERO, d)).unwrap();
        assert_eq!(read(&sim, &a, 8192, 1808), vec![0; 1808]);
        // A layer below of another size cannot share the overlay.
        let e = open(&f, &cx(&sim), Ram::new(20000)).err().unwrap();
        assert!(e.message.unwrap().contains("resize"));
    }

    #[test]
    fn an_absurdly_large_disk_is_refused_not_allocated() {
        let sim = SimScheduler::new();
        let huge = Ram::with(0, |r| r.info.size = 1 << 62);
        let e = open(&configure(&SPEC, &[("cow-block-size", "4k")]), &cx(&sim), huge).err().unwrap();
        assert!(e.message.unwrap().contains("larger block size"));
    }

    #[test]
    fn concurrent_partial_writes_into_one_block_both_survive() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let f = configure(&SPEC, &[("cow-block-size", "64k")]);
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        let results = Rc::new(RefCell::new(Vec::new()));
        // Issued together: without the block lock, each would read the old block and the second
        // write would put back the bytes the first one changed.
        for i in 0..8u64 {
            let r = results.clone();
            top.pwrite(
                vec![0x80 + i as u8; 100],
                i * 1000,
                Flags::NONE,
                Done::new(move |x| r.borrow_mut().push(x)),
            );
        }
        sim.run_until_idle();
        assert_eq!(results.borrow().len(), 8);
        assert!(results.borrow().iter().all(|r| r.is_ok()));
        let got = read(&sim, &top, 0, 8000);
        for i in 0..8usize {
            assert!(got[i * 1000..i * 1000 + 100].iter().all(|b| *b == 0x80 + i as u8), "write {i} lost");
            assert_eq!(got[i * 1000 + 100..(i + 1) * 1000], pattern(i * 1000 + 100, 900)[..]);
        }
    }

    #[test]
    fn errors_from_below_reach_the_client() {
        let sim = SimScheduler::new();
        let ram = Ram::with(65536, |r| r.fail_at = Some(70));
        let top = open(&configure(&SPEC, &[("cow-block-size", "4k")]), &cx(&sim), ram.clone()).unwrap();
        assert_eq!(wait(&sim, |d| top.pread(vec![0; 10], 65, Flags::NONE, d)).unwrap_err().errno, Errno::Io);
        // The read-modify-write of a partial block fails too, and leaves the block alone.
        let e = wait(&sim, |d| top.pwrite(vec![1; 10], 4000, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::Io);
        // A whole-block write needs nothing from below.
        wait(&sim, |d| top.pwrite(vec![1; 4096], 0, Flags::NONE, d)).unwrap();
        assert_eq!(read(&sim, &top, 60, 20), vec![1; 20]);
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(make_err(&SPEC, &[("cow-block-size", "1000")]).contains("power of two"));
        assert!(make_err(&SPEC, &[("cow-on-read", "sometimes")]).contains("absolute path"));
        assert!(make_err(&SPEC, &[("cow-on-cache", "maybe")]).starts_with("cow: cow-on-cache"));
    }
}
