//! The cache filter (nbdkit-cache-filter): keep blocks of the layer below in a temporary file.
//!
//! Modes (`cache=`): `writeback` (default) keeps writes in the cache until a flush writes the
//! dirty blocks back; `writethrough` writes through to the layer below at once; `unsafe` ignores
//! flushes (dirty blocks go back only when they are reclaimed). With `cache-on-read` blocks read
//! from below are kept too; cache (prefetch) requests always fill the cache.
//!
//! Blocks are `cache-min-block-size` (default 64K) or the temporary file system's block size,
//! whichever is larger. Each block is not cached, clean or dirty: two bits in memory. Without
//! `cache-max-size` block `b` lives at `b * blocksize` in a sparse temporary file. With it the
//! file holds at most that many bytes of blocks in numbered slots; once more than
//! `cache-high-threshold` percent are used, least recently used blocks are reclaimed (a clock
//! sweep, one reference bit per slot) until fewer than `cache-low-threshold` percent are. Unlike
//! nbdkit 1.32, which punches out reclaimed blocks whether dirty or not, a dirty block is written
//! back before its slot is reused, so reclaiming never loses a write.
//!
//! Requests that change blocks hold a lock on them for the whole read-modify-write (see
//! [`RangeLocks`]); so do write-backs, so a flush cannot write back a block half way through a
//! change. Readers pin the slots they read so a slot is not reused under them.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx,
    ParamSpec, Support,
};
use blocksmith_core::sched::Sched;

use crate::overlay::{
    copy_up, create_temp_file, lock, next_step, parse_block_size, read_at, write_at, CopyUp, Geometry,
    OnRead, RangeGuard, RangeLocks, States,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "cache",
    summary: "cache blocks of the layer below in a temporary file (writeback, writethrough or unsafe)",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "cache",
        help: "writeback (default): keep writes until a flush; writethrough: write through at once;\n\
               unsafe: ignore flushes.",
    },
    ParamSpec {
        name: "cache-min-block-size",
        help: "Smallest cache block: a power of two from 4K to 32M (default 64K, or the file\n\
               system's block size if larger).",
    },
    ParamSpec { name: "cache-max-size", help: "Largest size of the cache, e.g. 1G (default: unlimited)." },
    ParamSpec {
        name: "cache-high-threshold",
        help: "Percentage of cache-max-size at which reclaiming starts (default 95).",
    },
    ParamSpec {
        name: "cache-low-threshold",
        help: "Percentage of cache-max-size at which reclaiming stops (default 80).",
    },
    ParamSpec {
        name: "cache-on-read",
        help: "true: also cache blocks read from below; false (default): only writes and cache\n\
               requests; /PATH: cache reads while /PATH exists.",
    },
];

const NOT_CACHED: u8 = 0;
const CLEAN: u8 = 1;
const DIRTY: u8 = 3;

/// Most slots a limited cache may have: the slot tables cost about 24 bytes each.
const MAX_SLOTS: u64 = 1 << 24;

/// Largest read from below a cache request or a write-back makes at once.
const CHUNK: u64 = 1 << 20;

/// Dirty blocks one request may write back while reclaiming, bounding the latency it adds.
const RECLAIM_DIRTY_PER_REQUEST: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Writeback,
    Writethrough,
    Unsafe,
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    Ok(Arc::new(make_factory(p)?))
}

fn make_factory(p: &mut Params) -> Result<CacheFactory, ConfigError> {
    let err = |e: ConfigError| ConfigError::new(format!("cache: {}", e.0));
    let mode = match p.take("cache").as_deref() {
        None | Some("writeback") => Mode::Writeback,
        Some("writethrough") => Mode::Writethrough,
        Some("unsafe") => Mode::Unsafe,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "cache: cache={other}: expected writeback, writethrough or unsafe"
            )))
        }
    };
    let min_bs = parse_block_size("cache", "cache-min-block-size", p.take("cache-min-block-size"), 65536)?;
    let max_size = p.take_size("cache-max-size").map_err(err)?;
    let percent = |p: &mut Params, key: &str, default: u64| -> Result<u64, ConfigError> {
        match p.take(key) {
            None => Ok(default),
            Some(v) => match v.trim().trim_end_matches('%').parse::<u64>() {
                Ok(n) if (1..=100).contains(&n) => Ok(n),
                _ => Err(ConfigError::new(format!(
                    "cache: {key}: expected a percentage from 1 to 100, got '{v}'"
                ))),
            },
        }
    };
    let hi = percent(p, "cache-high-threshold", 95)?;
    let lo = percent(p, "cache-low-threshold", 80)?;
    if lo >= hi {
        return Err(ConfigError::new(format!(
            "cache: cache-low-threshold ({lo}) must be below cache-high-threshold ({hi})"
        )));
    }
    let on_read = OnRead::parse("cache", "cache-on-read", p.take("cache-on-read"))?;
    let file = create_temp_file("cache")
        .map_err(|e| ConfigError::new(format!("cache: cannot create the cache file: {e}")))?;
    // Blocks no smaller than the file system's, as nbdkit does, so a block is whole file blocks.
    let fs_block = file.metadata().map(|m| m.blksize()).unwrap_or(4096);
    let bs = if fs_block.is_power_of_two() { min_bs.max(fs_block.min(32 << 20)) } else { min_bs };
    let limit = match max_size {
        None => None,
        Some(m) => {
            let slots = m / bs;
            if slots == 0 {
                return Err(ConfigError::new(format!(
                    "cache: cache-max-size ({m}) is smaller than one cache block ({bs})"
                )));
            }
            if slots > MAX_SLOTS {
                return Err(ConfigError::new(format!(
                    "cache: cache-max-size ({m}) holds more than {MAX_SLOTS} blocks of {bs} bytes; \
                     use a larger cache-min-block-size"
                )));
            }
            Some(Limit { slots, hi: (slots * hi / 100).max(1), lo: slots * lo / 100 })
        }
    };
    Ok(CacheFactory(Arc::new(Shared {
        file: Arc::new(file),
        bs,
        mode,
        on_read,
        limit,
        locks: RangeLocks::new(),
        map: Mutex::new(Map { size: None, states: States::new(0), slots: None, reclaiming: false }),
    })))
}

#[derive(Clone, Copy, Debug)]
struct Limit {
    slots: u64,
    hi: u64,
    lo: u64,
}

/// The cache, shared by every connection on every loop.
struct Shared {
    file: Arc<File>,
    bs: u64,
    mode: Mode,
    on_read: OnRead,
    limit: Option<Limit>,
    locks: Arc<RangeLocks>,
    map: Mutex<Map>,
}

struct Map {
    size: Option<u64>,
    states: States,
    /// With cache-max-size: where each cached block lives. Without, block `b` is at `b * bs`.
    slots: Option<Slots>,
    /// Between the high and the low threshold on the way down.
    reclaiming: bool,
}

const FREE: u64 = u64::MAX;

/// Slot tables of a size-limited cache. A slot may keep its block after the block stops being
/// cached (zeroed, trimmed): such a slot is reused first.
struct Slots {
    owner: Vec<u64>,
    slot_of: HashMap<u64, u32>,
    free: Vec<u32>,
    referenced: Vec<bool>,
    pins: Vec<u32>,
    hand: usize,
}

impl Slots {
    fn new(n: usize) -> Slots {
        Slots {
            owner: vec![FREE; n],
            slot_of: HashMap::new(),
            free: (0..n as u32).rev().collect(),
            referenced: vec![false; n],
            pins: vec![0; n],
            hand: 0,
        }
    }

    fn used(&self) -> u64 {
        (self.owner.len() - self.free.len()) as u64
    }

    fn assign(&mut self, s: u32, b: u64) {
        self.owner[s as usize] = b;
        self.slot_of.insert(b, s);
        self.referenced[s as usize] = true;
    }

    fn evict(&mut self, s: u32, states: &mut States) {
        let b = self.owner[s as usize];
        self.slot_of.remove(&b);
        states.set(b, NOT_CACHED);
        self.owner[s as usize] = FREE;
        self.free.push(s);
    }
}

impl Map {
    /// Where block `b` is (or would be) in the file, if it has a place.
    fn location(&self, b: u64, bs: u64) -> Option<u64> {
        match &self.slots {
            None => Some(b * bs),
            Some(s) => s.slot_of.get(&b).map(|x| u64::from(*x) * bs),
        }
    }

    fn touch(&mut self, b: u64) {
        if let Some(s) = &mut self.slots {
            if let Some(x) = s.slot_of.get(&b) {
                s.referenced[*x as usize] = true;
            }
        }
    }

    /// A place for block `b`: its own, a free slot, or the slot of a clean block nobody is
    /// using that was not referenced since the clock hand last passed. `None` if every slot is
    /// dirty, busy or pinned; the caller then goes around the cache.
    fn allocate(&mut self, b: u64, bs: u64, locks: &RangeLocks) -> Option<u64> {
        let Map { states, slots, .. } = self;
        let Some(sl) = slots else { return Some(b * bs) };
        if let Some(x) = sl.slot_of.get(&b) {
            return Some(u64::from(*x) * bs);
        }
        if let Some(x) = sl.free.pop() {
            sl.assign(x, b);
            return Some(u64::from(x) * bs);
        }
        let n = sl.owner.len();
        for _ in 0..2 * n {
            let x = sl.hand;
            sl.hand = (sl.hand + 1) % n;
            let owner = sl.owner[x];
            if sl.pins[x] > 0 || states.get(owner) == DIRTY || !locks.is_free(owner) {
                continue;
            }
            if sl.referenced[x] {
                sl.referenced[x] = false;
                continue;
            }
            sl.evict(x as u32, states);
            sl.free.pop();
            sl.assign(x as u32, b);
            return Some(x as u64 * bs);
        }
        None
    }
}

struct CacheFactory(Arc<Shared>);

impl FilterFactory for CacheFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let below = next.info();
        let size = below.size;
        {
            let mut map = lock(&self.0.map);
            match map.size {
                None => {
                    let blocks = size.div_ceil(self.0.bs);
                    map.states = States::for_disk("cache", size, self.0.bs, &cx.budget)?;
                    map.size = Some(size);
                    // A limit at least the size of the disk is no limit.
                    map.slots = match self.0.limit {
                        Some(l) if l.slots < blocks => Some(Slots::new(l.slots as usize)),
                        _ => None,
                    };
                }
                Some(s) if s != size => {
                    return Err(NbdError::io(format!(
                        "cache: the layer below is {size} bytes but the cache was made for {s}"
                    )))
                }
                Some(_) => {}
            }
        }
        let conn = CacheConn {
            sh: self.0.clone(),
            sched: cx.sched.clone(),
            geo: Geometry { bs: self.0.bs, size },
            below,
        };
        Ok(Rc::new(FilterLayer { filter: CacheFilter(Rc::new(conn)), next }))
    }
}

struct CacheConn {
    sh: Arc<Shared>,
    sched: Sched,
    geo: Geometry,
    below: ExportInfo,
}

impl CopyUp for CacheConn {
    fn sched(&self) -> &Sched {
        &self.sched
    }
    fn geometry(&self) -> Geometry {
        self.geo
    }
    fn next_run(&self, from: u64, last: u64) -> Option<(u64, u64)> {
        lock(&self.sh.map).states.run_in(NOT_CACHED, from, last, (CHUNK / self.geo.bs).max(1))
    }
    fn keep(self: &Rc<Self>, fb: u64, lb: u64, data: Vec<u8>, k: impl FnOnce() + 'static) {
        self.store_clean(fb, lb, data, k)
    }
}

struct CacheFilter(Rc<CacheConn>);

/// Where a run of a read comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Below,
    File(u64),
}

#[derive(Clone, Copy, Debug)]
struct Seg {
    src: Src,
    off: u64,
    len: u64,
}

/// Slots a read is using; unpinned when the read is done.
struct Pins {
    sh: Arc<Shared>,
    slots: Vec<u32>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        if self.slots.is_empty() {
            return;
        }
        let mut map = lock(&self.sh.map);
        if let Some(sl) = &mut map.slots {
            for s in &self.slots {
                sl.pins[*s as usize] = sl.pins[*s as usize].saturating_sub(1);
            }
        }
    }
}

/// A write or zero in progress, shared by its per-block steps.
struct WriteReq {
    offset: u64,
    len: u64,
    /// `None`: zeroes.
    data: Option<Vec<u8>>,
    fua: bool,
}

impl WriteReq {
    fn part(&self, a: u64, e: u64) -> Vec<u8> {
        match &self.data {
            Some(d) => d[(a - self.offset) as usize..(e - self.offset) as usize].to_vec(),
            None => vec![0; (e - a) as usize],
        }
    }
}

impl CacheConn {
    /// Flags for a write to the layer below: FUA only if it can honour it.
    fn below_flags(&self, fua: bool) -> Flags {
        if fua && self.below.fua != Support::None {
            Flags::FUA
        } else {
            Flags::NONE
        }
    }

    fn segments(&self, offset: u64, len: u64) -> (Vec<Seg>, Pins) {
        let (first, last) = self.geo.span(offset, len);
        let end = offset + len;
        let mut pins = Pins { sh: self.sh.clone(), slots: Vec::new() };
        let mut segs: Vec<Seg> = Vec::new();
        let mut map = lock(&self.sh.map);
        for b in first..=last {
            let start = self.geo.start(b);
            let (a, e) = (offset.max(start), end.min(self.geo.end(b)));
            let src = match map.states.get(b) {
                NOT_CACHED => Src::Below,
                _ => match map.location(b, self.sh.bs) {
                    Some(loc) => {
                        map.touch(b);
                        if let Some(sl) = &mut map.slots {
                            if let Some(x) = sl.slot_of.get(&b).copied() {
                                sl.pins[x as usize] += 1;
                                pins.slots.push(x);
                            }
                        }
                        Src::File(loc + (a - start))
                    }
                    None => Src::Below,
                },
            };
            match segs.last_mut() {
                Some(l) if l.off + l.len == a && contiguous(l, src) => l.len += e - a,
                _ => segs.push(Seg { src, off: a, len: e - a }),
            }
        }
        (segs, pins)
    }

    #[allow(clippy::too_many_arguments)] // one asynchronous step's state, passed along whole
    fn read_segs(
        c: Rc<Self>,
        next: Next,
        buf: Vec<u8>,
        base: u64,
        segs: Rc<[Seg]>,
        i: usize,
        store: bool,
        pins: Pins,
        done: Done<Vec<u8>>,
    ) {
        let Some(seg) = segs.get(i).copied() else {
            drop(pins);
            return done.ok(buf);
        };
        let (at, n) = ((seg.off - base) as usize, seg.len as usize);
        let (c2, next2, segs2) = (c.clone(), next.clone(), segs.clone());
        let k = move |r: Result<Vec<u8>, NbdError>| match r {
            Ok(buf) => {
                let sched = c2.sched.clone();
                next_step(&sched, i, move || {
                    CacheConn::read_segs(c2, next2, buf, base, segs2, i + 1, store, pins, done)
                })
            }
            Err(e) => done.err(e),
        };
        match seg.src {
            Src::File(loc) => read_at(&c.sched, &c.sh.file, buf, at, n, loc, Done::new(k)),
            Src::Below if !store => {
                let mut buf = buf;
                next.pread(
                    vec![0; n],
                    seg.off,
                    Flags::NONE,
                    Done::new(move |r: Result<Vec<u8>, NbdError>| {
                        k(r.map(|d| {
                            buf[at..at + n].copy_from_slice(&d);
                            buf
                        }))
                    }),
                )
            }
            Src::Below => {
                // cache-on-read: whole blocks, kept clean in the cache.
                let (fb, lb) = c.geo.span(seg.off, seg.len);
                let start = c.geo.start(fb);
                let whole = (c.geo.end(lb) - start) as usize;
                let mut buf = buf;
                let c3 = c.clone();
                next.pread(
                    vec![0; whole],
                    start,
                    Flags::NONE,
                    Done::new(move |r: Result<Vec<u8>, NbdError>| match r {
                        Ok(blocks) => {
                            let from = (seg.off - start) as usize;
                            buf[at..at + n].copy_from_slice(&blocks[from..from + n]);
                            c3.store_clean(fb, lb, blocks, move || k(Ok(buf)))
                        }
                        Err(e) => k(Err(e)),
                    }),
                )
            }
        }
    }

    /// Keep blocks `[fb, lb]`, just read from below, in the cache as clean — unless a request is
    /// changing them, they are already cached, or there is no room: it is only a copy.
    fn store_clean(self: &Rc<Self>, fb: u64, lb: u64, data: Vec<u8>, k: impl FnOnce() + 'static) {
        let Some(guard) = self.sh.locks.try_acquire(&self.sched, fb, lb) else { return k() };
        let places: Option<Vec<u64>> = {
            let mut map = lock(&self.sh.map);
            if (fb..=lb).all(|b| map.states.get(b) == NOT_CACHED) {
                (fb..=lb).map(|b| map.allocate(b, self.sh.bs, &self.sh.locks)).collect()
            } else {
                None
            }
        };
        let Some(places) = places else {
            drop(guard);
            return k();
        };
        CacheConn::store_blocks(self.clone(), fb, places, 0, Rc::new(data), guard, Box::new(k))
    }

    fn store_blocks(
        c: Rc<Self>,
        fb: u64,
        places: Vec<u64>,
        i: usize,
        data: Rc<Vec<u8>>,
        guard: RangeGuard,
        k: Box<dyn FnOnce()>,
    ) {
        let Some(loc) = places.get(i).copied() else {
            let mut map = lock(&c.sh.map);
            for b in fb..fb + places.len() as u64 {
                map.states.set(b, CLEAN);
            }
            drop(map);
            drop(guard);
            return k();
        };
        let b = fb + i as u64;
        let from = (c.geo.start(b) - c.geo.start(fb)) as usize;
        let n = (c.geo.end(b) - c.geo.start(b)) as usize;
        let c2 = c.clone();
        let block = data[from..from + n].to_vec();
        write_at(
            &c.sched,
            &c.sh.file,
            block,
            0,
            n,
            loc,
            Done::new(move |r: Result<Vec<u8>, NbdError>| match r {
                Ok(_) => {
                    let sched = c2.sched.clone();
                    next_step(&sched, i, move || {
                        CacheConn::store_blocks(c2, fb, places, i + 1, data, guard, k)
                    })
                }
                Err(e) => {
                    // Blocks stored so far stay uncached: a partial run is not worth the trouble.
                    ::log::debug!("cache: storing block {b}: {e}");
                    drop(guard);
                    k()
                }
            }),
        )
    }

    /// Write one block's part of `req` (blocks are locked by the caller), then continue with `k`.
    fn write_block(self: &Rc<Self>, next: &Next, req: &Rc<WriteReq>, b: u64, k: Done<()>) {
        let start = self.geo.start(b);
        let n = (self.geo.end(b) - start) as usize;
        let req_end = req.offset + req.len;
        let (a, e) = (req.offset.max(start), req_end.min(start + n as u64));
        let full = a == start && e == start + n as u64;
        let (state, place) = {
            let mut map = lock(&self.sh.map);
            let state = map.states.get(b);
            let place = map.allocate(b, self.sh.bs, &self.sh.locks);
            (state, place)
        };
        let through = self.sh.mode == Mode::Writethrough || (self.sh.mode == Mode::Writeback && req.fua);
        let Some(loc) = place else {
            // No room in the cache: straight to the layer below. The block is not cached, so no
            // cached copy can go stale.
            let flags = if self.sh.mode == Mode::Unsafe { Flags::NONE } else { self.below_flags(req.fua) };
            return next.pwrite(req.part(a, e), a, flags, k);
        };
        let (c, next2, req2) = (self.clone(), next.clone(), req.clone());
        let modify = move |r: Result<Vec<u8>, NbdError>| match r {
            Ok(mut block) => {
                let at = (a - start) as usize;
                match &req2.data {
                    Some(d) => block[at..at + (e - a) as usize]
                        .copy_from_slice(&d[(a - req2.offset) as usize..(e - req2.offset) as usize]),
                    None => block[at..at + (e - a) as usize].fill(0),
                }
                c.store_written(&next2, b, loc, block, through, req2.fua, k)
            }
            Err(e) => k.err(e),
        };
        if full {
            modify(Ok(vec![0; n]))
        } else if state == NOT_CACHED {
            next.pread(vec![0; n], start, Flags::NONE, Done::new(modify))
        } else {
            read_at(&self.sched, &self.sh.file, vec![0; n], 0, n, loc, Done::new(modify))
        }
    }

    /// The new contents of block `b` go into the cache (dirty), or through to below and into the
    /// cache (clean).
    #[allow(clippy::too_many_arguments)] // one asynchronous step's state, passed along whole
    fn store_written(
        self: &Rc<Self>,
        next: &Next,
        b: u64,
        loc: u64,
        block: Vec<u8>,
        through: bool,
        fua: bool,
        k: Done<()>,
    ) {
        let c = self.clone();
        let n = block.len();
        let to_cache = move |block: Vec<u8>, state: u8, k: Done<()>| {
            let c2 = c.clone();
            write_at(
                &c.sched,
                &c.sh.file,
                block,
                0,
                n,
                loc,
                Done::new(move |r: Result<Vec<u8>, NbdError>| {
                    let mut map = lock(&c2.sh.map);
                    match r {
                        Ok(_) => {
                            map.states.set(b, state);
                            map.touch(b);
                            drop(map);
                            k.ok(())
                        }
                        Err(e) => {
                            // The cached copy may be half written: only below is to be trusted,
                            // and that is only right if the block was written through.
                            if state == CLEAN {
                                map.states.set(b, NOT_CACHED);
                                drop(map);
                                k.ok(())
                            } else {
                                drop(map);
                                k.err(e)
                            }
                        }
                    }
                }),
            )
        };
        if !through {
            return to_cache(block, DIRTY, k);
        }
        let start = self.geo.start(b);
        let flags = self.below_flags(fua);
        let (c3, block2) = (self.clone(), block.clone());
        next.pwrite(
            block,
            start,
            flags,
            Done::new(move |r: Result<(), NbdError>| match r {
                Ok(()) => to_cache(block2, CLEAN, k),
                Err(e) => {
                    // Below may be half written; a stale clean copy must not hide that.
                    let mut map = lock(&c3.sh.map);
                    if map.states.get(b) == CLEAN {
                        map.states.set(b, NOT_CACHED);
                    }
                    drop(map);
                    k.err(e)
                }
            }),
        )
    }

    /// Write (or zero) blocks `b..=last` of `req` one after the other, then release the lock.
    fn write_blocks(
        c: Rc<Self>,
        next: Next,
        req: Rc<WriteReq>,
        b: u64,
        last: u64,
        guard: RangeGuard,
        done: Done<()>,
    ) {
        if b > last {
            drop(guard);
            return CacheConn::reclaim(c, next, 0, done);
        }
        let (c2, next2, req2) = (c.clone(), next.clone(), req.clone());
        c.write_block(
            &next,
            &req,
            b,
            Done::new(move |r: Result<(), NbdError>| match r {
                Ok(()) => {
                    let sched = c2.sched.clone();
                    next_step(&sched, (b % 16) as usize, move || {
                        CacheConn::write_blocks(c2, next2, req2, b + 1, last, guard, done)
                    })
                }
                Err(e) => {
                    drop(guard);
                    done.err(e)
                }
            }),
        )
    }

    /// Drop whole blocks of `[offset, end)` from the cache (they are about to be zeroed or
    /// trimmed below, which makes any cached copy, even a dirty one, obsolete).
    fn drop_whole(&self, offset: u64, end: u64) {
        let (first, last) = self.geo.span(offset, end - offset);
        let mut map = lock(&self.sh.map);
        for b in first..=last {
            if self.geo.covers(b, offset, end) {
                map.states.set(b, NOT_CACHED);
            }
        }
    }

    /// Write back dirty blocks from `from` on, a run at a time, then flush below. Keeps going
    /// after an error and reports the first one, as nbdkit does.
    fn flush_from(
        c: Rc<Self>,
        next: Next,
        from: u64,
        step: usize,
        first_err: Option<NbdError>,
        done: Done<()>,
    ) {
        let last_block = c.geo.size.div_ceil(c.geo.bs).saturating_sub(1);
        let limited = lock(&c.sh.map).slots.is_some();
        let max_run = if limited { 1 } else { (CHUNK / c.geo.bs).max(1) };
        let mut run = None;
        if c.geo.size > 0 && from <= last_block {
            lock(&c.sh.map).states.nonzero_runs(from, last_block, |a, b, s| {
                if s == DIRTY {
                    run = Some((a, b.min(a + max_run - 1)));
                    false
                } else {
                    true
                }
            });
        }
        let Some((fb, lb)) = run else {
            let below_flush = c.below.can_flush;
            let finish = move |r: Result<(), NbdError>| match first_err {
                Some(e) => done.err(e),
                None => done.call(r),
            };
            return if below_flush { next.flush(Flags::NONE, Done::new(finish)) } else { finish(Ok(())) };
        };
        let (c2, next2) = (c.clone(), next.clone());
        c.sh.locks.clone().acquire(&c.sched, fb, lb, move |guard| {
            let (c3, next3) = (c2.clone(), next2.clone());
            c2.write_back(&next2, fb, lb, guard, move |r| {
                let err = first_err.or(r.err());
                let sched = c3.sched.clone();
                next_step(&sched, step, move || CacheConn::flush_from(c3, next3, lb + 1, step + 1, err, done))
            })
        })
    }

    /// With `[fb, lb]` locked: write the blocks of it that are still dirty back to below and
    /// mark them clean.
    fn write_back(
        self: &Rc<Self>,
        next: &Next,
        fb: u64,
        lb: u64,
        guard: RangeGuard,
        k: impl FnOnce(Result<(), NbdError>) + 'static,
    ) {
        // Only the leading blocks still dirty (the run was found before the lock was taken).
        let (lb, loc) = {
            let map = lock(&self.sh.map);
            let mut end = fb;
            if map.states.get(fb) != DIRTY {
                drop(map);
                drop(guard);
                return k(Ok(()));
            }
            while end < lb && map.states.get(end + 1) == DIRTY {
                end += 1;
            }
            (end, map.location(fb, self.sh.bs))
        };
        let Some(loc) = loc else {
            drop(guard);
            return k(Err(NbdError::io("cache: dirty block without a place in the cache")));
        };
        let start = self.geo.start(fb);
        let n = (self.geo.end(lb) - start) as usize;
        let (c, next2) = (self.clone(), next.clone());
        read_at(
            &self.sched,
            &self.sh.file,
            vec![0; n],
            0,
            n,
            loc,
            Done::new(move |r: Result<Vec<u8>, NbdError>| match r {
                Ok(data) => next2.pwrite(
                    data,
                    start,
                    Flags::NONE,
                    Done::new(move |r: Result<(), NbdError>| {
                        if r.is_ok() {
                            let mut map = lock(&c.sh.map);
                            for b in fb..=lb {
                                map.states.set(b, CLEAN);
                            }
                        }
                        drop(guard);
                        k(r)
                    }),
                ),
                Err(e) => {
                    drop(guard);
                    k(Err(e))
                }
            }),
        )
    }

    /// Size-limited cache over its high threshold: reclaim least recently used blocks until
    /// under the low one. Clean blocks go at once; up to a few dirty ones are written back (the
    /// next sweep reclaims them). Runs before the request that filled the cache completes, so
    /// the work is paced by the requests that cause it.
    fn reclaim(c: Rc<Self>, next: Next, dirty_done: usize, done: Done<()>) {
        let Some(limit) = c.sh.limit else { return done.ok(()) };
        // Decided under the map lock; acted on after it is released (a completion must never run
        // with the lock held).
        let victim = (|| {
            let mut guard = lock(&c.sh.map);
            let map = &mut *guard;
            let sl = map.slots.as_mut()?;
            let used = sl.used();
            if map.reclaiming && used < limit.lo.max(1) {
                map.reclaiming = false;
            } else if !map.reclaiming && used > limit.hi {
                map.reclaiming = true;
            }
            if !map.reclaiming || dirty_done >= RECLAIM_DIRTY_PER_REQUEST {
                return None;
            }
            let n = sl.owner.len();
            let mut victim = None;
            let mut evicted = 0u64;
            for _ in 0..2 * n {
                if sl.used() < limit.lo.max(1) {
                    break;
                }
                let x = sl.hand;
                sl.hand = (sl.hand + 1) % n;
                let owner = sl.owner[x];
                if owner == FREE || sl.pins[x] > 0 || !c.sh.locks.is_free(owner) {
                    continue;
                }
                if sl.referenced[x] {
                    sl.referenced[x] = false;
                    continue;
                }
                if map.states.get(owner) == DIRTY {
                    victim = Some(owner);
                    break;
                }
                sl.evict(x as u32, &mut map.states);
                evicted += 1;
            }
            if evicted > 0 {
                ::log::debug!("cache: reclaimed {evicted} clean blocks");
            }
            victim
        })();
        let Some(b) = victim else { return done.ok(()) };
        let Some(guard) = c.sh.locks.try_acquire(&c.sched, b, b) else { return done.ok(()) };
        let (c2, next2) = (c.clone(), next.clone());
        c.write_back(&next, b, b, guard, move |r| {
            if let Err(e) = r {
                // Reclaiming is housekeeping: the request that triggered it has succeeded.
                ::log::warn!("cache: writing back block {b} to reclaim it: {e}");
                return done.ok(());
            }
            CacheConn::reclaim(c2, next2, dirty_done + 1, done)
        })
    }
}

fn contiguous(prev: &Seg, src: Src) -> bool {
    match (prev.src, src) {
        (Src::Below, Src::Below) => true,
        (Src::File(a), Src::File(b)) => a + prev.len == b,
        _ => false,
    }
}

impl Filter for CacheFilter {
    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        let w = below.can_write;
        ExportInfo {
            // Flush writes back dirty blocks even if the layer below has no flush of its own.
            can_flush: w || below.can_flush,
            fua: if w { Support::Native } else { Support::None },
            zero: if w { Support::Native } else { Support::None },
            can_fast_zero: w,
            can_extents: true,
            cache: Support::Native,
            ..below
        }
    }

    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        let (segs, pins) = self.0.segments(offset, buf.len() as u64);
        let store = segs.iter().any(|s| s.src == Src::Below) && self.0.sh.on_read.active();
        CacheConn::read_segs(self.0.clone(), next.clone(), buf, offset, segs.into(), 0, store, pins, done)
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let len = data.len() as u64;
        let req = Rc::new(WriteReq { offset, len, data: Some(data), fua: flags.contains(Flags::FUA) });
        let (first, last) = self.0.geo.span(offset, len);
        let (c, next) = (self.0.clone(), next.clone());
        self.0.sh.locks.acquire(&self.0.sched, first, last, move |guard| {
            CacheConn::write_blocks(c, next, req, first, last, guard, done)
        })
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let g = self.0.geo;
        let end = offset + count;
        let (first, last) = g.span(offset, count);
        let head_full = g.covers(first, offset, end);
        let tail_full = g.covers(last, offset, end);
        if flags.contains(Flags::FAST_ZERO) && !(head_full && tail_full) {
            return done.err(NbdError::msg(Errno::NotSup, "cache: zeroing part of a block is not fast"));
        }
        // Whole blocks are zeroed below and dropped from the cache; the partial blocks at the
        // ends are written like any other write.
        let mid_start = if head_full { g.start(first) } else { g.end(first) };
        let mid_end = if tail_full { end } else { g.start(last) };
        let fua = flags.contains(Flags::FUA);
        let below_flags = self.0.below_flags(fua)
            | (if flags.contains(Flags::MAY_TRIM) { Flags::MAY_TRIM } else { Flags::NONE })
            | (if flags.contains(Flags::FAST_ZERO) { Flags::FAST_ZERO } else { Flags::NONE });
        let (c, next) = (self.0.clone(), next.clone());
        self.0.sh.locks.acquire(&self.0.sched, first, last, move |guard| {
            let ends = move |c: Rc<CacheConn>, next: Next, guard: RangeGuard, done: Done<()>| {
                let mut partial = Vec::new();
                if !head_full {
                    partial.push(first);
                }
                if !tail_full && (last != first || head_full) {
                    partial.push(last);
                }
                let req = Rc::new(WriteReq { offset, len: count, data: None, fua });
                CacheConn::zero_ends(c, next, req, partial, guard, done)
            };
            if mid_end > mid_start {
                c.drop_whole(mid_start, mid_end);
                let (c2, next2) = (c.clone(), next.clone());
                next.zero(
                    mid_end - mid_start,
                    mid_start,
                    below_flags,
                    Done::new(move |r: Result<(), NbdError>| match r {
                        Ok(()) => ends(c2, next2, guard, done),
                        Err(e) => {
                            drop(guard);
                            done.err(e)
                        }
                    }),
                )
            } else {
                ends(c, next, guard, done)
            }
        })
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        // Whole blocks leave the cache (their contents no longer matter); the trim itself goes
        // below. Partial blocks keep what is cached, which a trim allows.
        let (first, last) = self.0.geo.span(offset, count);
        let flags = self.0.below_flags(flags.contains(Flags::FUA));
        let (c, next) = (self.0.clone(), next.clone());
        self.0.sh.locks.acquire(&self.0.sched, first, last, move |guard| {
            c.drop_whole(offset, offset + count);
            next.trim(
                count,
                offset,
                flags,
                Done::new(move |r| {
                    drop(guard);
                    done.call(r)
                }),
            )
        })
    }

    fn flush(&self, next: &Next, _flags: Flags, done: Done<()>) {
        if self.0.sh.mode == Mode::Unsafe {
            return done.ok(());
        }
        CacheConn::flush_from(self.0.clone(), next.clone(), 0, 0, None, done)
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        // Clean blocks are what is below; dirty ones are data whatever below says.
        let (first, last) = self.0.geo.span(offset, count);
        let mut dirty_from = None;
        let mut dirty_to = first;
        lock(&self.0.sh.map).states.nonzero_runs(first, last, |a, b, s| {
            if s != DIRTY {
                return true;
            }
            dirty_from = Some(a);
            dirty_to = b;
            false
        });
        let g = self.0.geo;
        match dirty_from {
            // The request starts in dirty blocks: they are data.
            Some(a) if a == first => {
                let mut e = Extents::new();
                e.push(g.end(dirty_to).min(offset + count) - offset, 0);
                done.ok(e)
            }
            // Ask below about the clean part before the first dirty block.
            Some(a) => {
                let limit = g.start(a) - offset;
                next.extents(
                    limit,
                    offset,
                    flags,
                    done.map(move |r: Result<Extents, NbdError>| r.map(|e| clip(e, limit))),
                )
            }
            None => next.extents(count, offset, flags, done),
        }
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        let (first, last) = self.0.geo.span(offset, count);
        copy_up(self.0.clone(), next.clone(), first, last, 0, done)
    }
}

impl CacheConn {
    fn zero_ends(
        c: Rc<Self>,
        next: Next,
        req: Rc<WriteReq>,
        mut blocks: Vec<u64>,
        guard: RangeGuard,
        done: Done<()>,
    ) {
        let Some(b) = blocks.pop() else {
            drop(guard);
            return CacheConn::reclaim(c, next, 0, done);
        };
        let (c2, next2, req2) = (c.clone(), next.clone(), req.clone());
        c.write_block(
            &next,
            &req,
            b,
            Done::new(move |r: Result<(), NbdError>| match r {
                Ok(()) => CacheConn::zero_ends(c2, next2, req2, blocks, guard, done),
                Err(e) => {
                    drop(guard);
                    done.err(e)
                }
            }),
        )
    }
}

/// Cut an extent list at `limit` bytes.
fn clip(e: Extents, limit: u64) -> Extents {
    let mut out = Extents::new();
    let mut covered = 0;
    for x in e.0 {
        if covered >= limit {
            break;
        }
        let n = x.length.min(limit - covered);
        out.push(n, x.flags);
        covered += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::layer::{Extent, EXTENT_HOLE, EXTENT_ZERO};
    use blocksmith_core::sched::SimScheduler;
    use std::cell::RefCell;

    fn pattern(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    fn read(sim: &SimScheduler, top: &Rc<impl Layer + ?Sized>, offset: u64, len: usize) -> Vec<u8> {
        wait(sim, |d| top.pread(vec![0; len], offset, Flags::NONE, d)).unwrap()
    }

    fn count(ram: &Ram, prefix: &str) -> usize {
        ram.calls().iter().filter(|c| c.starts_with(prefix)).count()
    }

    fn bs4k(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![("cache-min-block-size", "4k")];
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn writeback_keeps_writes_until_flush() {
        let sim = SimScheduler::new();
        let ram = Ram::new(1 << 20);
        let f = configure(&SPEC, &bs4k(&[]));
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.pwrite(vec![1; 4096], 8192, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.pwrite(vec![2; 100], 50, Flags::NONE, d)).unwrap();
        assert_eq!(count(&ram, "pwrite"), 0, "{:?}", ram.calls());
        assert_eq!(ram.data.borrow()[8192], (8192 % 251) as u8);
        let mut expect = pattern(0, 16384);
        expect[8192..12288].fill(1);
        expect[50..150].fill(2);
        assert_eq!(read(&sim, &top, 0, 16384), expect);
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert_eq!(ram.data.borrow()[..16384], expect[..]);
        let calls = ram.calls();
        assert_eq!(calls.last().map(String::as_str), Some("flush"));
        assert_eq!(count(&ram, "pwrite"), 2, "two dirty blocks written back: {calls:?}");
        // Clean now: a second flush writes nothing back.
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert_eq!(count(&ram, "pwrite"), 2);
        // FUA writes through at once.
        wait(&sim, |d| top.pwrite(vec![3; 10], 20000, Flags::FUA, d)).unwrap();
        assert_eq!(ram.data.borrow()[20000], 3);
        assert!(ram.calls().iter().any(|c| c == "pwrite 4096@16384 flags=1"), "{:?}", ram.calls());
    }

    #[test]
    fn writethrough_and_unsafe() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top =
            open(&configure(&SPEC, &bs4k(&[("cache", "writethrough")])), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.pwrite(vec![1; 10], 10, Flags::NONE, d)).unwrap();
        assert_eq!(ram.data.borrow()[10..20], [1; 10]);
        // Cached clean: reading does not go below.
        let reads = count(&ram, "pread");
        assert_eq!(read(&sim, &top, 0, 100)[10..20], [1; 10]);
        assert_eq!(count(&ram, "pread"), reads);

        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &bs4k(&[("cache", "unsafe")])), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.pwrite(vec![1; 10], 10, Flags::FUA, d)).unwrap();
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert_eq!(count(&ram, "pwrite") + count(&ram, "flush"), 0, "{:?}", ram.calls());
        assert_eq!(read(&sim, &top, 10, 10), [1; 10]);
    }

    #[test]
    fn cache_on_read_and_cache_requests_fill_the_cache() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top =
            open(&configure(&SPEC, &bs4k(&[("cache-on-read", "true")])), &cx(&sim), ram.clone()).unwrap();
        assert_eq!(read(&sim, &top, 5000, 10), pattern(5000, 10));
        assert_eq!(ram.calls(), ["pread 4096@4096"]);
        assert_eq!(read(&sim, &top, 4096, 4096), pattern(4096, 4096));
        assert_eq!(ram.calls().len(), 1);

        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &bs4k(&[])), &cx(&sim), ram.clone()).unwrap();
        read(&sim, &top, 0, 10);
        read(&sim, &top, 0, 10);
        assert_eq!(count(&ram, "pread"), 2, "without cache-on-read reads are not kept");
        wait(&sim, |d| top.cache(8192, 0, Flags::NONE, d)).unwrap();
        assert_eq!(count(&ram, "pread"), 3);
        read(&sim, &top, 0, 8192);
        assert_eq!(count(&ram, "pread"), 3, "served from the cache");
    }

    #[test]
    fn max_size_reclaims_without_losing_dirty_blocks() {
        let sim = SimScheduler::new();
        let ram = Ram::new(1 << 20);
        // 8 slots of 4K; reclaim above 6, down to 4.
        let mut p = Params::new();
        for (k, v) in
            bs4k(&[("cache-max-size", "32k"), ("cache-high-threshold", "75"), ("cache-low-threshold", "50")])
        {
            p.push(k, v);
        }
        let factory = Arc::new(make_factory(&mut p).unwrap());
        let shared = factory.0.clone();
        let f: Arc<dyn FilterFactory> = factory;
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        let mut expect = pattern(0, 1 << 20);
        for i in 0..64u64 {
            let v = vec![i as u8 + 1; 4096];
            expect[(i * 8192) as usize..(i * 8192 + 4096) as usize].copy_from_slice(&v);
            wait(&sim, |d| top.pwrite(v, i * 8192, Flags::NONE, d)).unwrap();
            let used = lock(&shared.map).slots.as_ref().map(Slots::used).expect("a limited cache");
            assert!(used <= 8, "cache holds at most 8 blocks, has {used}");
        }
        // Some dirty blocks were written back to make room; none was lost.
        assert!(count(&ram, "pwrite") > 0);
        assert_eq!(read(&sim, &top, 0, 1 << 20), expect);
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert_eq!(*ram.data.borrow(), expect);
    }

    #[test]
    fn zero_trim_and_extents() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &bs4k(&[])), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.pwrite(vec![1; 8192], 8192, Flags::NONE, d)).unwrap();
        // A dirty block reads as data even where below is a hole.
        let e = wait(&sim, |d| top.extents(65536 - 8192, 8192, Flags::NONE, d)).unwrap();
        assert_eq!(e.0, [Extent { length: 8192, flags: 0 }]);
        let e = wait(&sim, |d| top.extents(65536, 0, Flags::NONE, d)).unwrap();
        assert_eq!(e.0[0], Extent { length: 4096, flags: 0 });
        assert_eq!(e.0[1], Extent { length: 4096, flags: EXTENT_HOLE | EXTENT_ZERO });

        // Zero across partial and whole blocks: whole ones go below at once and leave the cache.
        wait(&sim, |d| top.zero(8192 + 200, 8192 - 100, Flags::NONE, d)).unwrap();
        let mut expect = pattern(0, 20000);
        expect[8192..16384].fill(1);
        expect[8092..16384 + 100].fill(0);
        assert_eq!(read(&sim, &top, 0, 20000), expect);
        assert!(ram.calls().iter().any(|c| c == "zero 8192@8192 flags=0"), "{:?}", ram.calls());
        let e = wait(&sim, |d| top.zero(100, 0, Flags::FAST_ZERO, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NotSup);
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert_eq!(ram.data.borrow()[..20000], expect[..]);
        // Trim goes below.
        wait(&sim, |d| top.trim(4096, 0, Flags::NONE, d)).unwrap();
        assert!(ram.calls().iter().any(|c| c == "trim 4096@0 flags=0"));
    }

    #[test]
    fn concurrent_writes_and_flushes_keep_every_byte() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &bs4k(&[])), &cx(&sim), ram.clone()).unwrap();
        let results = Rc::new(RefCell::new(Vec::new()));
        for i in 0..8u64 {
            let r = results.clone();
            top.pwrite(
                vec![0x80 + i as u8; 100],
                i * 500,
                Flags::NONE,
                Done::new(move |x| r.borrow_mut().push(x)),
            );
            let r = results.clone();
            top.flush(Flags::NONE, Done::new(move |x| r.borrow_mut().push(x)));
        }
        sim.run_until_idle();
        assert_eq!(results.borrow().len(), 16);
        assert!(results.borrow().iter().all(|r| r.is_ok()));
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        let data = ram.data.borrow();
        for i in 0..8usize {
            assert!(
                data[i * 500..i * 500 + 100].iter().all(|b| *b == 0x80 + i as u8),
                "write {i} lost below"
            );
        }
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(make_err(&SPEC, &[("cache", "sometimes")]).contains("writeback, writethrough or unsafe"));
        assert!(make_err(&SPEC, &[("cache-min-block-size", "3000")]).contains("power of two"));
        assert!(make_err(&SPEC, &[("cache-high-threshold", "50"), ("cache-low-threshold", "60")])
            .contains("must be below"));
        assert!(make_err(&SPEC, &[("cache-high-threshold", "0")]).contains("percentage"));
        assert!(make_err(&SPEC, &[("cache-max-size", "1k")]).contains("smaller than one cache block"));
        assert!(make_err(&SPEC, &[("cache-on-read", "x")]).contains("absolute path"));
    }
}
