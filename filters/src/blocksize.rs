//! The blocksize filter (nbdkit-blocksize-filter): make every request that reaches the layer
//! below aligned to `minblock` and no larger than `maxdata` (reads, writes, cache) or `maxlen`
//! (zero, trim), whatever the client sends.
//!
//! Large requests are cut into pieces sent one after another. Unaligned reads read whole blocks
//! and keep the part asked for; an unaligned head or tail of a write or zero is a
//! read-modify-write of its block; the unaligned head and tail of a trim are ignored (trim is
//! advisory). The export is the size below rounded down to `minblock`.
//!
//! A read-modify-write must not interleave with another write to the same block, from this
//! connection or any other, or one of them is lost. So, as nbdkit does with a read-write lock,
//! a request that needs read-modify-write holds an exclusive lock for its duration and every
//! other write-like request a shared one. The lock is the factory's, shared by every connection
//! on every event loop (see `xlock`); waiting for it never blocks a loop. Reads take no lock.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    BlockSize, Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next,
    OpenCx, ParamSpec,
};

use crate::chunked::{sequence, Step};
use crate::xlock::{Guard, Mode, Waiter, XLock};

pub const SPEC: FilterSpec = FilterSpec {
    name: "blocksize",
    summary: "align and split requests to the block sizes the layer below needs",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "minblock",
        help: "Minimum block size and alignment passed down, a power of 2 <= 64k (default 1).\n\
               Unaligned writes become read-modify-write; the size is rounded down to it.",
    },
    ParamSpec {
        name: "maxdata",
        help: "Largest read or write passed down, a multiple of minblock (default 64M,\n\
               or maxlen if smaller). Larger requests are split.",
    },
    ParamSpec {
        name: "maxlen",
        help: "Largest zero or trim passed down, a multiple of minblock (default 4G-minblock).",
    },
];

const MIN_LIMIT: u64 = 64 * 1024;
const DEFAULT_MAXDATA: u64 = 64 * 1024 * 1024;

/// The configured limits, all validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Limits {
    minblock: u64,
    maxdata: u64,
    maxlen: u64,
}

fn parse(p: &mut Params, key: &str) -> Result<Option<u64>, ConfigError> {
    let Some(v) = p.take_size(key).map_err(|e| ConfigError::new(format!("blocksize: {}", e.0)))? else {
        return Ok(None);
    };
    if v == 0 {
        return Err(ConfigError::new(format!("blocksize: parameter '{key}' must be non-zero if specified")));
    }
    if v > u64::from(u32::MAX) {
        return Err(ConfigError::new(format!("blocksize: parameter '{key}' too large (at most 4G-1)")));
    }
    Ok(Some(v))
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let minblock = parse(p, "minblock")?;
    let maxdata = parse(p, "maxdata")?;
    let maxlen = parse(p, "maxlen")?;
    let limits = limits(minblock, maxdata, maxlen)?;
    Ok(Arc::new(BlocksizeFactory { limits, lock: XLock::new() }))
}

/// nbdkit's checks and defaults.
fn limits(minblock: Option<u64>, maxdata: Option<u64>, maxlen: Option<u64>) -> Result<Limits, ConfigError> {
    let minblock = minblock.unwrap_or(1);
    if !minblock.is_power_of_two() {
        return Err(ConfigError::new(format!("blocksize: minblock must be a power of 2 (got {minblock})")));
    }
    if minblock > MIN_LIMIT {
        return Err(ConfigError::new(format!(
            "blocksize: minblock must not exceed {MIN_LIMIT} (got {minblock})"
        )));
    }
    let multiple = |key: &str, v: u64| {
        if v.checked_rem(minblock) != Some(0) {
            Err(ConfigError::new(format!("blocksize: {key} must be a multiple of {minblock} (got {v})")))
        } else {
            Ok(v)
        }
    };
    let maxdata = match (maxdata, maxlen) {
        (Some(d), _) => multiple("maxdata", d)?,
        (None, Some(l)) => l.min(DEFAULT_MAXDATA),
        (None, None) => DEFAULT_MAXDATA,
    };
    let maxlen = match maxlen {
        Some(l) => multiple("maxlen", l)?,
        // The protocol's 32-bit limit, kept aligned.
        None => (1u64 << 32) - minblock,
    };
    Ok(Limits { minblock, maxdata, maxlen })
}

struct BlocksizeFactory {
    limits: Limits,
    /// Shared by every connection: see the module docs.
    lock: Arc<XLock>,
}

impl FilterFactory for BlocksizeFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let below = next.info().size;
        let size = below - below % self.limits.minblock;
        if size == 0 && below != 0 {
            return Err(NbdError::inval(format!(
                "blocksize: the disk ({below} bytes) is smaller than minblock ({})",
                self.limits.minblock
            )));
        }
        let filter = BlocksizeFilter {
            l: self.limits,
            size,
            lock: self.lock.clone(),
            waiter: Rc::new(Waiter::new(cx.sched.clone())),
        };
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

struct BlocksizeFilter {
    l: Limits,
    size: u64,
    lock: Arc<XLock>,
    waiter: Rc<Waiter>,
}

/// One piece of a request, in the order they are sent down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// Bytes `[block + skip, block + skip + len)` inside the block starting at `block`.
    Head { block: u64, skip: u64, len: u64 },
    /// Whole blocks `[offset, offset + len)`.
    Body { offset: u64, len: u64 },
    /// Bytes `[block, block + len)` at the start of the block at `block`.
    Tail { block: u64, len: u64 },
}

impl Cut {
    /// Where the piece's bytes start, and how many there are.
    fn span(self) -> (u64, u64) {
        match self {
            Cut::Head { block, skip, len } => (block + skip, len),
            Cut::Body { offset, len } => (offset, len),
            Cut::Tail { block, len } => (block, len),
        }
    }
}

/// Cuts `[pos, end)` into an unaligned head, aligned bodies of at most `max`, an unaligned tail.
struct Cutter {
    pos: u64,
    end: u64,
    block: u64,
    max: u64,
}

impl Iterator for Cutter {
    type Item = Cut;
    fn next(&mut self) -> Option<Cut> {
        let left = self.end - self.pos;
        if left == 0 {
            return None;
        }
        let skip = self.pos % self.block;
        let cut = if skip != 0 {
            Cut::Head { block: self.pos - skip, skip, len: (self.block - skip).min(left) }
        } else if left >= self.block {
            Cut::Body { offset: self.pos, len: self.max.min(left - left % self.block) }
        } else {
            Cut::Tail { block: self.pos, len: left }
        };
        self.pos += cut.span().1;
        Some(cut)
    }
}

impl BlocksizeFilter {
    fn cutter(&self, count: u64, offset: u64, max: u64) -> Cutter {
        Cutter { pos: offset, end: offset + count, block: self.l.minblock, max }
    }

    fn aligned(&self, count: u64, offset: u64) -> bool {
        offset.checked_rem(self.l.minblock) == Some(0) && count.checked_rem(self.l.minblock) == Some(0)
    }

    /// Run `op` holding the lock in `mode` (at once, without locking, when nothing can need a
    /// read-modify-write). The guard is released when `op`'s completion runs.
    fn locked(&self, mode: Mode, done: Done<()>, op: impl FnOnce(Done<()>) + 'static) {
        if self.l.minblock == 1 {
            return op(done);
        }
        self.waiter.acquire(&self.lock, mode, move |guard: Guard| {
            op(Done::new(move |r| {
                drop(guard);
                done.call(r)
            }))
        })
    }

    /// The flags for each piece of a write-like request, and whether FUA must be done by one
    /// flush at the end instead (cheaper than a FUA per piece when the layer can flush).
    fn piece_flags(next: &Next, flags: Flags, pieces: bool) -> (Flags, bool) {
        if pieces && flags.contains(Flags::FUA) && next.info().can_flush {
            (flags.without(Flags::FUA), true)
        } else {
            (flags, false)
        }
    }
}

/// Read-modify-write of one block: read it, let `patch` change it, write it back.
fn rmw(
    next: &Next,
    block: u64,
    size: u64,
    flags: Flags,
    patch: impl FnOnce(&mut [u8]) + 'static,
    k: Done<()>,
) {
    let n2 = next.clone();
    next.pread(
        vec![0u8; size as usize],
        block,
        Flags::NONE,
        Done::new(move |r: Result<Vec<u8>, NbdError>| match r {
            Ok(mut b) => {
                patch(&mut b);
                n2.pwrite(b, block, flags, k)
            }
            Err(e) => k.err(e),
        }),
    )
}

/// A step that flushes, for FUA done once at the end.
fn flush_step(next: &Next) -> Step {
    let next = next.clone();
    Box::new(move |k: Done<()>| next.flush(Flags::NONE, k))
}

impl Filter for BlocksizeFilter {
    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        // Clients may send anything from one byte up: this filter absorbs it.
        let preferred = below.block_size.map_or(4096, |b| b.preferred).max(self.l.minblock as u32).max(512);
        ExportInfo {
            size: self.size,
            block_size: Some(BlockSize { minimum: 1, preferred, maximum: u32::MAX }),
            ..below
        }
    }

    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let count = buf.len() as u64;
        if self.aligned(count, offset) && count <= self.l.maxdata {
            return next.pread(buf, offset, flags, done);
        }
        let out = Rc::new(RefCell::new(buf));
        let (o2, next, block) = (out.clone(), next.clone(), self.l.minblock);
        let mut cuts = self.cutter(count, offset, self.l.maxdata);
        sequence(
            move || {
                let cut = cuts.next()?;
                let (next, out) = (next.clone(), o2.clone());
                Some(Box::new(move |k: Done<()>| {
                    let (start, len) = cut.span();
                    let (at, skip, n) = match cut {
                        Cut::Body { offset, len } => (offset, 0, len),
                        Cut::Head { block: b, skip, .. } => (b, skip, block),
                        Cut::Tail { block: b, .. } => (b, 0, block),
                    };
                    let dst = (start - offset) as usize;
                    next.pread(
                        vec![0u8; n as usize],
                        at,
                        Flags::NONE,
                        k.map(move |r: Result<Vec<u8>, NbdError>| {
                            let b = r?;
                            let (skip, len) = (skip as usize, len as usize);
                            out.borrow_mut()[dst..dst + len].copy_from_slice(&b[skip..skip + len]);
                            Ok(())
                        }),
                    )
                }))
            },
            done.map(move |r: Result<(), NbdError>| r.map(|()| out.take())),
        )
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let count = data.len() as u64;
        let aligned = self.aligned(count, offset);
        let next = next.clone();
        if aligned && count <= self.l.maxdata {
            return self.locked(Mode::Shared, done, move |d| next.pwrite(data, offset, flags, d));
        }
        let (pflags, flush_at_end) = Self::piece_flags(&next, flags, true);
        let mut cuts = self.cutter(count, offset, self.l.maxdata);
        let block = self.l.minblock;
        let data = Rc::new(data);
        let mode = if aligned { Mode::Shared } else { Mode::Exclusive };
        self.locked(mode, done, move |d| {
            let mut flushed = !flush_at_end;
            sequence(
                move || {
                    let Some(cut) = cuts.next() else {
                        if flushed {
                            return None;
                        }
                        flushed = true;
                        return Some(flush_step(&next));
                    };
                    let (next, data) = (next.clone(), data.clone());
                    let (start, len) = cut.span();
                    let src = (start - offset) as usize..(start - offset + len) as usize;
                    Some(Box::new(move |k: Done<()>| match cut {
                        Cut::Body { offset, .. } => next.pwrite(data[src].to_vec(), offset, pflags, k),
                        Cut::Head { block: at, skip, .. } => {
                            let skip = skip as usize;
                            let patch =
                                move |b: &mut [u8]| b[skip..skip + src.len()].copy_from_slice(&data[src]);
                            rmw(&next, at, block, pflags, patch, k)
                        }
                        Cut::Tail { block: at, .. } => {
                            let patch = move |b: &mut [u8]| b[..src.len()].copy_from_slice(&data[src]);
                            rmw(&next, at, block, pflags, patch, k)
                        }
                    }))
                },
                d,
            )
        })
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        if self.aligned(count, offset) && count <= self.l.maxlen {
            return self.locked(Mode::Shared, done, move |d| next.trim(count, offset, flags, d));
        }
        // Trim is advisory: the unaligned head and tail are simply not trimmed.
        let (pflags, flush_at_end) = Self::piece_flags(&next, flags, true);
        let mut cuts = self.cutter(count, offset, self.l.maxlen);
        self.locked(Mode::Shared, done, move |d| {
            let mut flushed = !flush_at_end;
            sequence(
                move || loop {
                    match cuts.next() {
                        Some(Cut::Body { offset, len }) => {
                            let next = next.clone();
                            return Some(Box::new(move |k: Done<()>| next.trim(len, offset, pflags, k)));
                        }
                        Some(_) => continue,
                        None if flushed => return None,
                        None => {
                            flushed = true;
                            return Some(flush_step(&next));
                        }
                    }
                },
                d,
            )
        })
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let aligned = self.aligned(count, offset);
        if flags.contains(Flags::FAST_ZERO) && (!aligned || count > self.l.maxlen) {
            // A zero that needs several calls below is not fast: the first piece could succeed
            // and a later one fail with ENOTSUP, after time was spent.
            return done.err(NbdError::msg(Errno::NotSup, "blocksize: this zero request would be split"));
        }
        let next = next.clone();
        if aligned && count <= self.l.maxlen {
            return self.locked(Mode::Shared, done, move |d| next.zero(count, offset, flags, d));
        }
        let (pflags, flush_at_end) = Self::piece_flags(&next, flags, true);
        // Head and tail are written, not zeroed: a write cannot punch a hole.
        let wflags = pflags.without(Flags::MAY_TRIM);
        let mut cuts = self.cutter(count, offset, self.l.maxlen);
        let block = self.l.minblock;
        let mode = if aligned { Mode::Shared } else { Mode::Exclusive };
        self.locked(mode, done, move |d| {
            let mut flushed = !flush_at_end;
            sequence(
                move || {
                    let Some(cut) = cuts.next() else {
                        if flushed {
                            return None;
                        }
                        flushed = true;
                        return Some(flush_step(&next));
                    };
                    let next = next.clone();
                    Some(Box::new(move |k: Done<()>| match cut {
                        Cut::Body { offset, len } => next.zero(len, offset, pflags, k),
                        Cut::Head { block: at, skip, len } => {
                            let (skip, len) = (skip as usize, len as usize);
                            rmw(&next, at, block, wflags, move |b| b[skip..skip + len].fill(0), k)
                        }
                        Cut::Tail { block: at, len } => {
                            rmw(&next, at, block, wflags, move |b| b[..len as usize].fill(0), k)
                        }
                    }))
                },
                d,
            )
        })
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        // Ask from the start of the block, then drop what precedes the request. Less than was
        // asked is a valid answer, so maxlen simply caps the question.
        // Whole blocks, which stay inside the export since its size is a multiple of minblock.
        let skip = offset % self.l.minblock;
        let ask = (count + skip).next_multiple_of(self.l.minblock).min(self.l.maxlen);
        // With an unaligned start, one extent might not reach past the skipped bytes.
        let flags = if skip > 0 { flags.without(Flags::REQ_ONE) } else { flags };
        let block = self.l.minblock;
        next.extents(
            ask,
            offset - skip,
            flags,
            done.map(move |r: Result<Extents, NbdError>| {
                let e = r?;
                let mut out = Extents::new();
                let mut drop = skip;
                for x in e.0 {
                    let cut = drop.min(x.length);
                    drop -= cut;
                    out.push(x.length - cut, x.flags);
                }
                if out.0.is_empty() {
                    // Nothing was said past the skipped bytes: "data" is always a safe answer.
                    out.push((block - skip).min(count), 0);
                }
                Ok(out)
            }),
        )
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        // Round out to whole blocks (the size is a multiple of minblock, so this stays inside).
        let start = offset - offset % self.l.minblock;
        let end = (offset + count).next_multiple_of(self.l.minblock);
        if end - start <= self.l.maxdata {
            return next.cache(end - start, start, flags, done);
        }
        let (next, max) = (next.clone(), self.l.maxdata);
        let mut pos = start;
        sequence(
            move || {
                if pos >= end {
                    return None;
                }
                let (at, n) = (pos, (end - pos).min(max));
                pos += n;
                let next = next.clone();
                Some(Box::new(move |k: Done<()>| next.cache(n, at, flags, k)))
            },
            done,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::layer::{Extent, EXTENT_HOLE, EXTENT_ZERO};
    use blocksmith_core::sched::SimScheduler;
    use std::time::Duration;

    fn pattern(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    /// Every request that reached `ram` respects the limits.
    fn assert_obeyed(ram: &Ram, minblock: u64, maxdata: u64, maxlen: u64) {
        for c in ram.calls() {
            let mut it = c.split_whitespace();
            let op = it.next().unwrap_or_default();
            let Some((n, o)) = it.next().and_then(|s| s.split_once('@')) else { continue };
            let (n, o): (u64, u64) = (n.parse().expect("count"), o.parse().expect("offset"));
            assert_eq!(o % minblock, 0, "unaligned {c}");
            assert_eq!(n % minblock, 0, "unaligned {c}");
            let max = if matches!(op, "zero" | "trim" | "extents") { maxlen } else { maxdata };
            assert!(n <= max, "too large: {c}");
        }
    }

    #[test]
    fn limits_follow_nbdkit() {
        assert_eq!(
            limits(None, None, None).unwrap(),
            Limits { minblock: 1, maxdata: 64 << 20, maxlen: (1 << 32) - 1 }
        );
        assert_eq!(limits(Some(512), None, Some(1 << 20)).unwrap().maxdata, 1 << 20);
        assert_eq!(limits(Some(4096), None, None).unwrap().maxlen, (1 << 32) - 4096);
        assert!(limits(Some(3), None, None).is_err());
        assert!(limits(Some(128 << 10), None, None).is_err());
        assert!(limits(Some(512), Some(1000), None).is_err());
        assert!(limits(Some(512), None, Some(1000)).is_err());
    }

    #[test]
    fn unaligned_and_large_requests_are_reshaped() {
        let sim = SimScheduler::new();
        let ram = Ram::new(1 << 20);
        let f = configure(&SPEC, &[("minblock", "512"), ("maxdata", "4k"), ("maxlen", "8k")]);
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();

        let b = wait(&sim, |d| top.pread(vec![0; 10000], 100, Flags::NONE, d)).unwrap();
        assert_eq!(b, pattern(100, 10000));
        let b = wait(&sim, |d| top.pread(vec![0; 7], 1000, Flags::NONE, d)).unwrap();
        assert_eq!(b, pattern(1000, 7));

        let mut expect = pattern(0, 1 << 20);
        let w: Vec<u8> = (0..20000).map(|i| (i * 7 % 256) as u8).collect();
        wait(&sim, |d| top.pwrite(w.clone(), 333, Flags::NONE, d)).unwrap();
        expect[333..20333].copy_from_slice(&w);
        assert_eq!(*ram.data.borrow(), expect);

        wait(&sim, |d| top.zero(30000, 1001, Flags::MAY_TRIM, d)).unwrap();
        expect[1001..31001].fill(0);
        assert_eq!(*ram.data.borrow(), expect);

        wait(&sim, |d| top.trim(20000, 700, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.cache(100000, 3, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.extents(5000, 700, Flags::NONE, d)).unwrap();
        assert_obeyed(&ram, 512, 4096, 8192);
        let trims: Vec<String> = ram.calls().into_iter().filter(|c| c.starts_with("trim")).collect();
        assert_eq!(trims, ["trim 8192@1024 flags=0", "trim 8192@9216 flags=0", "trim 3072@17408 flags=0"]);
    }

    #[test]
    fn a_large_write_over_maxdata_is_split_in_order_with_one_flush_for_fua() {
        let sim = SimScheduler::new();
        let ram = Ram::new(2 << 20);
        let top = open(&configure(&SPEC, &[("maxdata", "4k")]), &cx(&sim), ram.clone()).unwrap();
        let w: Vec<u8> = (0..(1 << 20)).map(|i| (i % 253) as u8).collect();
        wait(&sim, |d| top.pwrite(w.clone(), 4096, Flags::FUA, d)).unwrap();
        assert_eq!(&ram.data.borrow()[4096..4096 + (1 << 20)], &w[..]);
        let calls = ram.calls();
        assert_eq!(calls.len(), 257);
        assert_eq!(calls[0], "pwrite 4096@4096 flags=0");
        assert_eq!(calls[256], "flush");
        let b = wait(&sim, |d| top.pread(vec![0; 1 << 20], 4096, Flags::NONE, d)).unwrap();
        assert_eq!(b, w);
    }

    #[test]
    fn size_rounds_down_and_block_size_is_advertised() {
        let sim = SimScheduler::new();
        let top = open(&configure(&SPEC, &[("minblock", "4k")]), &cx(&sim), Ram::new(1_000_000)).unwrap();
        assert_eq!(top.info().size, 999_424);
        assert_eq!(top.info().block_size, Some(BlockSize { minimum: 1, preferred: 4096, maximum: u32::MAX }));
        let e = open(&configure(&SPEC, &[("minblock", "4k")]), &cx(&sim), Ram::new(100))
            .err()
            .expect("too small");
        assert!(e.message.unwrap().contains("smaller than minblock"));
    }

    #[test]
    fn fast_zero_that_would_split_fails_at_once() {
        let sim = SimScheduler::new();
        let ram = Ram::new(1 << 20);
        let top = open(&configure(&SPEC, &[("minblock", "512"), ("maxlen", "4k")]), &cx(&sim), ram.clone())
            .unwrap();
        let e = wait(&sim, |d| top.zero(100, 0, Flags::FAST_ZERO, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NotSup);
        let e = wait(&sim, |d| top.zero(8192, 0, Flags::FAST_ZERO, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NotSup);
        wait(&sim, |d| top.zero(4096, 0, Flags::FAST_ZERO, d)).unwrap();
        assert_eq!(ram.calls(), ["zero 4096@0 flags=8"]);
    }

    #[test]
    fn extents_skip_the_unaligned_head() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &[("minblock", "512")]), &cx(&sim), ram.clone()).unwrap();
        let e = wait(&sim, |d| top.extents(8000, 4000, Flags::NONE, d)).unwrap();
        assert_eq!(e.0[0], Extent { length: 96, flags: 0 });
        assert_eq!(e.0[1].flags, EXTENT_HOLE | EXTENT_ZERO);
        assert_eq!(ram.calls(), ["extents 8704@3584"], "whole blocks from the block holding the start");
    }

    /// Writes reach the RAM disk only after a delay, so requests overlap.
    struct SlowRam {
        ram: Rc<Ram>,
        sched: blocksmith_core::sched::Sched,
    }

    impl Layer for SlowRam {
        fn info(&self) -> ExportInfo {
            self.ram.info()
        }
        fn pread(&self, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
            let ram = self.ram.clone();
            self.sched.after(Duration::from_millis(1), move || ram.pread(buf, offset, flags, done));
        }
        fn pwrite(&self, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
            let ram = self.ram.clone();
            self.sched.after(Duration::from_millis(1), move || ram.pwrite(data, offset, flags, done));
        }
    }

    #[test]
    fn concurrent_read_modify_writes_on_two_connections_do_not_lose_data() {
        // Two connections write different bytes of the same 4 KiB block at once. Without the
        // shared lock both would read the old block and the second write-back would undo the
        // first.
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let f = configure(&SPEC, &[("minblock", "4k")]);
        let below = || Rc::new(SlowRam { ram: ram.clone(), sched: sim.sched() });
        let a = open(&f, &cx(&sim), below()).unwrap();
        let b = open(&f, &cx(&sim), below()).unwrap();
        let results = Rc::new(RefCell::new(Vec::new()));
        for (top, byte, at) in [(&a, 0xaau8, 10u64), (&b, 0xbb, 20), (&a, 0xcc, 4000)] {
            let r = results.clone();
            top.pwrite(vec![byte; 4], at, Flags::NONE, Done::new(move |x| r.borrow_mut().push(x)));
        }
        sim.run_until_idle();
        assert_eq!(results.borrow().len(), 3);
        assert!(results.borrow().iter().all(|r| r.is_ok()));
        let d = ram.data.borrow();
        assert_eq!(
            (&d[10..14], &d[20..24], &d[4000..4004]),
            (&[0xaa; 4][..], &[0xbb; 4][..], &[0xcc; 4][..])
        );
        assert_eq!(d[14], 14, "bytes around the writes are untouched");
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert_eq!(
            make_err(&SPEC, &[("minblock", "1000")]),
            "blocksize: minblock must be a power of 2 (got 1000)"
        );
        assert_eq!(
            make_err(&SPEC, &[("minblock", "0")]),
            "blocksize: parameter 'minblock' must be non-zero if specified"
        );
        assert!(make_err(&SPEC, &[("minblock", "128k")]).contains("must not exceed 65536"));
        assert!(make_err(&SPEC, &[("minblock", "4k"), ("maxdata", "6k")])
            .contains("maxdata must be a multiple of 4096"));
        assert!(make_err(&SPEC, &[("maxlen", "8G")]).contains("too large"));
        assert!(make_err(&SPEC, &[("maxdata", "x")]).starts_with("blocksize: maxdata: could not parse size"));
    }
}
