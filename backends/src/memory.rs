//! `memory`: a sparse RAM disk of up to 2^63-1 bytes, shared by every connection
//! (nbdkit-memory-plugin with its default `allocator=sparse`).
//!
//! The disk is a set of 32 KiB pages (nbdkit's sparse array uses the same page size), allocated
//! on first non-zero write and freed again when trimmed or zeroed, or when a write leaves them
//! all zero. Absent pages read as zeroes and are reported as holes. The invariant "a present page
//! is never all zeroes" (at rest) is what lets block status answer from the page map alone.
//!
//! Locking: pages live in [`SHARDS`] page indexes, the 16 MiB chunk `c` in shard `c % SHARDS`,
//! each behind a `RwLock`. Readers on different event-loop threads proceed in parallel; writers
//! only contend when they touch pages of the same shard, and then for one page copy. Each lock is
//! held for one page at a time and always released before a completion runs. NBD does not
//! promise atomicity for overlapping requests in flight at once, so a read racing a write may
//! see some pages old and some new — as with a real disk.

use std::collections::BTreeMap;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use blocksmith_core::config::Params;
use blocksmith_core::error::Errno;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Extents, Flags, Layer, Lent, LentPieces, OpenCx,
    ParamSpec, ReadData, SharedBytes, Support, EXTENT_HOLE, EXTENT_ZERO,
};
use blocksmith_core::{ConfigError, NbdError};

use crate::util;

const NAME: &str = "memory";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "a sparse RAM disk shared by all clients, up to 2^63-1 bytes (nbdkit-memory-plugin)",
    magic: Some("size"),
    params: &[
        ParamSpec {
            name: "size",
            help: "(required) Size of the RAM disk, at most 2^63-1 bytes. Suffixes: b, s (512), K, M, G, T, P, E.",
        },
        ParamSpec {
            name: "allocator",
            help: "Only 'sparse' (the default) is implemented: 32 KiB pages allocated on write and\n\
                   freed when trimmed or zeroed. nbdkit's malloc and zstd allocators are not.",
        },
    ],
    make,
};

/// Page size of the sparse store, as nbdkit's sparse array.
pub const PAGE_SIZE: u64 = 32 * 1024;

/// Number of independently locked page maps. A power of two a little above the core count of a
/// typical server keeps writers on different threads from meeting; more only costs a little
/// more work when looking for the next allocated page.
const SHARDS: usize = 16;

/// Pages one block-status request may inspect. A reply may describe less than was asked, so an
/// extents request over a huge, densely written range answers the first 512 MiB of it instead of
/// walking the whole map while the event loop waits.
const EXTENTS_PAGE_BUDGET: usize = 16 * 1024;

/// A page is shared with READ replies still being sent (they lend it instead of copying): a
/// writer that finds it shared writes into a copy (`Arc::make_mut`), so a reply always carries
/// the bytes as they were when its read completed.
type Page = SharedBytes;
/// Pages per chunk of the page index: 512 × 32 KiB = 16 MiB of disk per chunk.
const CHUNK_PAGES: u64 = 512;

/// One shard's page index: a small ordered map of 16 MiB chunks, each a flat array of page
/// slots. A lookup is a walk of a tree that stays in cache (a 1 GiB disk has 64 chunks) and one
/// array index, where a tree keyed by page took several cold cache misses per read.
#[derive(Default)]
struct PageMap {
    chunks: BTreeMap<u64, Chunk>,
}

struct Chunk {
    slots: Box<[Option<Page>]>,
    present: usize,
}

fn split_index(idx: u64) -> (u64, usize) {
    (idx / CHUNK_PAGES, (idx % CHUNK_PAGES) as usize)
}

impl PageMap {
    fn get(&self, idx: &u64) -> Option<&Page> {
        let (c, i) = split_index(*idx);
        self.chunks.get(&c)?.slots[i].as_ref()
    }

    fn get_mut(&mut self, idx: &u64) -> Option<&mut Page> {
        let (c, i) = split_index(*idx);
        self.chunks.get_mut(&c)?.slots[i].as_mut()
    }

    fn contains_key(&self, idx: &u64) -> bool {
        self.get(idx).is_some()
    }

    fn insert(&mut self, idx: u64, page: Page) {
        let (c, i) = split_index(idx);
        let chunk = self.chunks.entry(c).or_insert_with(|| Chunk {
            slots: vec![None; CHUNK_PAGES as usize].into_boxed_slice(),
            present: 0,
        });
        if chunk.slots[i].replace(page).is_none() {
            chunk.present += 1;
        }
    }

    fn remove(&mut self, idx: &u64) -> Option<Page> {
        let (c, i) = split_index(*idx);
        let chunk = self.chunks.get_mut(&c)?;
        let page = chunk.slots[i].take()?;
        chunk.present -= 1;
        if chunk.present == 0 {
            self.chunks.remove(&c);
        }
        Some(page)
    }

    /// Take every page with an index in `range` out of the map.
    fn remove_range(&mut self, range: Range<u64>) -> Vec<Page> {
        let mut out = Vec::new();
        let (first, _) = split_index(range.start);
        let mut emptied = Vec::new();
        for (&c, chunk) in self.chunks.range_mut(first..) {
            let base = c * CHUNK_PAGES;
            if base >= range.end {
                break;
            }
            let lo = range.start.saturating_sub(base).min(CHUNK_PAGES) as usize;
            let hi = (range.end - base).min(CHUNK_PAGES) as usize;
            for slot in &mut chunk.slots[lo..hi] {
                if let Some(p) = slot.take() {
                    chunk.present -= 1;
                    out.push(p);
                }
            }
            if chunk.present == 0 {
                emptied.push(c);
            }
        }
        for c in emptied {
            self.chunks.remove(&c);
        }
        out
    }

    /// The lowest present page index at or above `from`.
    fn first_at_or_after(&self, from: u64) -> Option<u64> {
        let (first, _) = split_index(from);
        for (&c, chunk) in self.chunks.range(first..) {
            let base = c * CHUNK_PAGES;
            let lo = from.saturating_sub(base) as usize;
            if let Some(i) = chunk.slots.iter().skip(lo).position(Option::is_some) {
                return Some(base + (lo + i) as u64);
            }
        }
        None
    }
}

/// The shared store behind every connection to one `memory` backend.
pub struct MemoryDisk {
    size: u64,
    shards: Box<[RwLock<PageMap>]>,
    pages: AtomicU64,
}

/// A panic while a lock was held cannot leave a page half-typed (pages are plain bytes, and
/// NBD makes no promise about a failed write's contents), so a poisoned lock is used as is.
fn rd(l: &RwLock<PageMap>) -> RwLockReadGuard<'_, PageMap> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn wr(l: &RwLock<PageMap>) -> RwLockWriteGuard<'_, PageMap> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// Split `len` bytes from `offset` into per-page pieces: (page index, offset in the page,
/// length, offset in the caller's buffer).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let in_page = (pos % PAGE_SIZE) as usize;
        let n = (PAGE_SIZE as usize - in_page).min(len - at);
        let piece = (pos / PAGE_SIZE, in_page, n, at);
        at += n;
        Some(piece)
    })
}

/// A new page holding `src` at `at` and zeroes around it. ENOSPC when a page's worth of memory
/// cannot be had, rather than aborting the whole server: the write went to a hole, which
/// block status reports as allowed to fail that way (the spec asks servers to avoid ENOMEM).
fn new_page(at: usize, src: &[u8]) -> Result<Page, NbdError> {
    let page = PAGE_SIZE as usize;
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(page).map_err(|_| NbdError::msg(Errno::NoSpc, "memory: cannot allocate a page"))?;
    if at == 0 && src.len() == page {
        // A whole page written: no zeroes to fill in.
        v.extend_from_slice(src);
    } else {
        v.resize(page, 0);
        v[at..at + src.len()].copy_from_slice(src);
    }
    // The vector becomes the page as it is: no second allocation, no copy.
    Ok(Arc::new(v))
}

impl MemoryDisk {
    pub fn new(size: u64) -> Self {
        MemoryDisk {
            size,
            shards: (0..SHARDS).map(|_| RwLock::new(PageMap::default())).collect(),
            pages: AtomicU64::new(0),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of page memory currently allocated (for `--memory-limit` accounting).
    pub fn allocated_bytes(&self) -> u64 {
        self.pages.load(Ordering::Relaxed) * PAGE_SIZE
    }

    fn shard(&self, idx: u64) -> &RwLock<PageMap> {
        &self.shards[((idx / CHUNK_PAGES) % SHARDS as u64) as usize]
    }

    /// Fill `buf` from `offset`. The range must lie within the disk (the shim checks).
    pub fn read(&self, buf: &mut [u8], offset: u64) {
        for (idx, at, n, b) in pieces(offset, buf.len()) {
            let dst = &mut buf[b..b + n];
            let map = rd(self.shard(idx));
            match map.get(&idx) {
                Some(p) => dst.copy_from_slice(&p[at..at + n]),
                None => dst.fill(0),
            }
        }
    }

    /// The pieces of `count` bytes from `offset`, lent from the pages: present pages shared,
    /// absent ones as holes. The range must lie within the disk (the shim checks).
    pub fn read_lent(&self, count: usize, offset: u64) -> LentPieces {
        // Inline for a read that spans at most two pages; one allocation for a larger one.
        let mut out = LentPieces::with_capacity(count.div_ceil(PAGE_SIZE as usize) + 1);
        for (idx, at, n, _) in pieces(offset, count) {
            let page = rd(self.shard(idx)).get(&idx).cloned();
            match (page, out.last_mut()) {
                (Some(page), _) => out.push(Lent::Bytes { page, start: at, end: at + n }),
                (None, Some(Lent::Zero(z))) => *z += n,
                (None, _) => out.push(Lent::Zero(n)),
            }
        }
        out
    }

    /// Store `data` at `offset`. Zeroes written to an absent page allocate nothing, and a page a
    /// write leaves all zero is freed, keeping "present means non-zero".
    pub fn write(&self, data: &[u8], offset: u64) -> Result<(), NbdError> {
        for (idx, at, n, b) in pieces(offset, data.len()) {
            let src = &data[b..b + n];
            // Cheap for real data: the scan stops at the first non-zero 64 bytes.
            let src_zero = util::is_zero(src);
            let mut map = wr(self.shard(idx));
            if let Some(p) = map.get_mut(&idx) {
                Arc::make_mut(p)[at..at + n].copy_from_slice(src);
                if src_zero && util::is_zero(p) {
                    let freed = map.remove(&idx);
                    self.pages.fetch_sub(1, Ordering::Relaxed);
                    drop(map);
                    drop(freed);
                }
            } else if !src_zero {
                map.insert(idx, new_page(at, src)?);
                self.pages.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Zero `count` bytes from `offset` (also trim: both free whole pages). Partial pages at
    /// either end are cleared, and freed if nothing else is left in them.
    pub fn zero(&self, count: u64, offset: u64) {
        if count == 0 {
            return;
        }
        let end = offset + count;
        let whole = offset.div_ceil(PAGE_SIZE)..end / PAGE_SIZE;
        if whole.start < whole.end {
            self.drop_pages(whole);
        }
        let first = offset / PAGE_SIZE;
        let last = (end - 1) / PAGE_SIZE;
        self.zero_part(first, offset, end);
        if last != first {
            self.zero_part(last, offset, end);
        }
    }

    /// Clear the part of page `idx` that lies in `[offset, end)`, unless that is the whole page
    /// (whole pages are dropped by `drop_pages`).
    fn zero_part(&self, idx: u64, offset: u64, end: u64) {
        let start = idx * PAGE_SIZE;
        let s = offset.max(start);
        let e = end.min(start + PAGE_SIZE);
        if s == start && e == start + PAGE_SIZE {
            return;
        }
        let mut map = wr(self.shard(idx));
        if let Some(p) = map.get_mut(&idx) {
            Arc::make_mut(p)[(s - start) as usize..(e - start) as usize].fill(0);
            if util::is_zero(p) {
                let freed = map.remove(&idx);
                self.pages.fetch_sub(1, Ordering::Relaxed);
                drop(map);
                drop(freed);
            }
        }
    }

    /// Free every allocated page with an index in `range`. Costs O(allocated pages in range),
    /// not O(range): zeroing a whole 2^63-byte disk is instant.
    fn drop_pages(&self, range: Range<u64>) {
        for shard in self.shards.iter() {
            let mut map = wr(shard);
            let freed = map.remove_range(range.clone());
            self.pages.fetch_sub(freed.len() as u64, Ordering::Relaxed);
            // Return the memory after unlocking, so readers of this shard do not wait on free().
            drop(map);
            drop(freed);
        }
    }

    fn is_present(&self, idx: u64) -> bool {
        rd(self.shard(idx)).contains_key(&idx)
    }

    /// The lowest allocated page index at or above `from`.
    fn next_present(&self, from: u64) -> Option<u64> {
        self.shards.iter().filter_map(|s| rd(s).first_at_or_after(from)).min()
    }

    /// Allocation from `offset`: absent pages as HOLE|ZERO, present ones as data. Stops after
    /// [`EXTENTS_PAGE_BUDGET`] pages, so the answer may cover less than `count`, never nothing.
    pub fn extents(&self, count: u64, offset: u64) -> Extents {
        self.extents_within(count, offset, EXTENTS_PAGE_BUDGET)
    }

    fn extents_within(&self, count: u64, offset: u64, mut budget: usize) -> Extents {
        let end = offset + count;
        let mut e = Extents::new();
        let mut pos = offset;
        while pos < end && budget > 0 {
            let idx = pos / PAGE_SIZE;
            budget -= 1;
            let stop = if self.is_present(idx) {
                let mut next = idx + 1;
                while budget > 0 && next * PAGE_SIZE < end && self.is_present(next) {
                    next += 1;
                    budget -= 1;
                }
                let stop = (next * PAGE_SIZE).min(end);
                e.push(stop - pos, 0);
                stop
            } else {
                // A hole runs to the next allocated page, however far: one lookup per shard.
                let stop = self.next_present(idx + 1).map_or(end, |n| (n * PAGE_SIZE).min(end));
                e.push(stop - pos, EXTENT_HOLE | EXTENT_ZERO);
                stop
            };
            pos = stop;
        }
        e
    }
}

/// The configured backend: one store, shared by every connection on every loop.
pub struct MemoryFactory {
    disk: Arc<MemoryDisk>,
}

impl MemoryFactory {
    pub fn new(size: u64) -> Self {
        MemoryFactory { disk: Arc::new(MemoryDisk::new(size)) }
    }

    /// The shared store (for accounting, such as a memory limit).
    pub fn disk(&self) -> &Arc<MemoryDisk> {
        &self.disk
    }
}

impl BackendFactory for MemoryFactory {
    fn open(&self, _cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(MemoryLayer { disk: self.disk.clone() }))
    }
}

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let size = util::require_size(params, NAME)?;
    if let Some(a) = params.take("allocator") {
        if a.trim() != "sparse" {
            return Err(ConfigError::new(format!(
                "{NAME}: allocator '{a}' is not supported (only allocator=sparse is implemented)"
            )));
        }
    }
    params.finish(NAME)?;
    Ok(Arc::new(MemoryFactory::new(size)))
}

/// One connection's view of the shared store.
struct MemoryLayer {
    disk: Arc<MemoryDisk>,
}

impl Layer for MemoryLayer {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            size: self.disk.size,
            can_write: true,
            // RAM is as durable as it gets: flush and FUA have nothing to do.
            can_flush: true,
            fua: Support::Native,
            can_trim: true,
            zero: Support::Native,
            can_fast_zero: true,
            can_extents: true,
            cache: Support::Native,
            // Every connection sees the same store, and a write is visible to all at once.
            can_multi_conn: true,
            ..ExportInfo::read_only(self.disk.size)
        }
    }

    fn pread(&self, mut buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        self.disk.read(&mut buf, offset);
        done.ok(buf)
    }

    fn pread_lent(&self, count: usize, offset: u64, _flags: Flags, done: Done<ReadData>) {
        done.ok(ReadData::Lent(self.disk.read_lent(count, offset)))
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, _flags: Flags, done: Done<()>) {
        let r = self.disk.write(&data, offset);
        // The bytes are copied into pages: the buffer can serve the next request.
        blocksmith_core::bufpool::give(data);
        done.call(r)
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        done.ok(())
    }

    fn trim(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        self.disk.zero(count, offset);
        done.ok(())
    }

    fn zero(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        // Freeing pages is how zeroing works here, with or without MAY_TRIM, and it is always fast.
        self.disk.zero(count, offset);
        done.ok(())
    }

    fn extents(&self, count: u64, offset: u64, _flags: Flags, done: Done<Extents>) {
        let e = self.disk.extents(count, offset);
        done.ok(e)
    }

    fn cache(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        // Already in memory.
        done.ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make_err, open, params};
    use blocksmith_core::layer::Extent;

    const HZ: u32 = EXTENT_HOLE | EXTENT_ZERO;
    const P: u64 = PAGE_SIZE;

    fn factory(size: u64) -> Arc<MemoryFactory> {
        Arc::new(MemoryFactory::new(size))
    }

    #[test]
    fn parameters() {
        let f = make(&mut params(&[("size", "1M")])).unwrap();
        let c = open(f, false);
        assert_eq!(c.info().size, 1 << 20);
        assert!(make(&mut params(&[("size", "1M"), ("allocator", "sparse")])).is_ok());
        assert!(make_err(&SPEC, &[]).contains("size"));
        assert!(make_err(&SPEC, &[("size", "1X")]).starts_with("memory: size:"));
        assert!(make_err(&SPEC, &[("size", "9223372036854775808")]).contains("too large"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("allocator", "malloc")]).contains("malloc"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("bogus", "1")]).contains("unknown parameter 'bogus'"));
    }

    #[test]
    fn lent_reads_share_pages_and_writes_copy_them() {
        let d = MemoryDisk::new(4 * P);
        d.write(&[7; 100], P - 50).unwrap();
        // [P-60, 2P+60): the tail of page 0, all of page 1, then the head of page 2, a hole.
        let pieces = d.read_lent(120 + P as usize, P - 60);
        let flat = ReadData::Lent(pieces.clone()).into_vec().unwrap();
        let mut want = vec![0u8; 120 + P as usize];
        want[10..110].fill(7);
        assert_eq!(flat, want);
        assert!(
            matches!(pieces.as_slice(), [Lent::Bytes { .. }, Lent::Bytes { .. }, Lent::Zero(n)] if *n == 60)
        );
        // A write while the pages are lent changes the disk, not the lent bytes.
        d.write(&[9; 20], P - 55).unwrap();
        assert_eq!(ReadData::Lent(pieces).into_vec().unwrap(), want);
        let mut now = vec![0u8; 60];
        d.read(&mut now, P - 60);
        assert_eq!(&now[..5], &[0; 5]);
        assert_eq!(&now[5..25], &[9; 20]);
        assert_eq!(&now[25..], &[7; 35]);
        // Zeroing a lent page frees it from the disk; the reply keeps its copy.
        let lent = d.read_lent(10, P);
        d.zero(P, P);
        assert_eq!(ReadData::Lent(lent).into_vec().unwrap(), vec![7; 10]);
        assert!(matches!(d.read_lent(10, P).as_slice(), [Lent::Zero(10)]));
    }

    #[test]
    fn page_index_spans_chunks() {
        let d = MemoryDisk::new(3 * CHUNK_PAGES * P);
        for idx in [0, CHUNK_PAGES - 1, CHUNK_PAGES, 2 * CHUNK_PAGES + 5] {
            d.write(&[1], idx * P + 3).unwrap();
        }
        assert_eq!(d.allocated_bytes(), 4 * P);
        assert_eq!(d.next_present(1), Some(CHUNK_PAGES - 1));
        assert_eq!(d.next_present(CHUNK_PAGES + 1), Some(2 * CHUNK_PAGES + 5));
        d.zero((CHUNK_PAGES + 1) * P, (CHUNK_PAGES - 1) * P);
        assert_eq!(d.allocated_bytes(), 2 * P);
        assert_eq!(d.next_present(1), Some(2 * CHUNK_PAGES + 5));
        d.zero(P, 0);
        assert_eq!(d.next_present(0), Some(2 * CHUNK_PAGES + 5));
    }

    #[test]
    fn capabilities() {
        let c = open(factory(1 << 20), false);
        let i = c.info();
        assert!(i.can_write && i.can_flush && i.can_trim && i.can_extents && i.can_multi_conn);
        assert!(i.can_fast_zero);
        assert_eq!((i.fua, i.zero, i.cache), (Support::Native, Support::Native, Support::Native));
        let ro = open(factory(1 << 20), true);
        assert!(!ro.info().can_write);
        assert_eq!(ro.write(b"x", 0, Flags::NONE).unwrap_err().errno, Errno::Perm);
    }

    #[test]
    fn read_write_across_pages() {
        let f = factory(1 << 20);
        let c = open(f.clone(), false);
        assert_eq!(c.read(100, 5000).unwrap(), vec![0; 100]);
        // Unaligned, spanning three pages.
        let data: Vec<u8> = (0..2 * P as usize + 10).map(|i| (i % 253) as u8 + 1).collect();
        let off = P - 7;
        c.write(&data, off, Flags::FUA).unwrap();
        assert_eq!(c.read(data.len(), off).unwrap(), data);
        let around = c.read(data.len() + 20, off - 10).unwrap();
        assert_eq!(&around[..10], &[0; 10]);
        assert_eq!(&around[10..10 + data.len()], &data[..]);
        assert_eq!(&around[10 + data.len()..], &[0; 10]);
        // Pages 0..=3 touched.
        assert_eq!(f.disk().allocated_bytes(), 4 * P);
        c.flush().unwrap();
        c.cache(1 << 20, 0).unwrap();
    }

    #[test]
    fn sparse_accounting() {
        let f = factory(1 << 20);
        let c = open(f.clone(), false);
        let disk = f.disk();
        // Zeroes written to absent pages allocate nothing.
        c.write(&vec![0; 3 * P as usize], 0, Flags::NONE).unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
        c.write(b"x", 3 * P + 5, Flags::NONE).unwrap();
        assert_eq!(disk.allocated_bytes(), P);
        c.write(&vec![7; 4 * P as usize], 4 * P, Flags::NONE).unwrap();
        assert_eq!(disk.allocated_bytes(), 5 * P);
        // Trim of whole pages frees them; a partial trim only clears bytes.
        c.trim(2 * P, 4 * P, Flags::NONE).unwrap();
        assert_eq!(disk.allocated_bytes(), 3 * P);
        c.trim(10, 6 * P + 100, Flags::NONE).unwrap();
        assert_eq!(disk.allocated_bytes(), 3 * P);
        let r = c.read(120, 6 * P).unwrap();
        assert_eq!(&r[..100], &[7; 100][..]);
        assert_eq!(&r[100..110], &[0; 10]);
        assert_eq!(&r[110..], &[7; 10]);
        // Zeroing the only non-zero byte of a page frees the page, as nbdkit's sparse array does.
        c.zero(1, 3 * P + 5, Flags::NONE).unwrap();
        assert_eq!(disk.allocated_bytes(), 2 * P);
        // So does overwriting a page's only data with zeroes.
        c.write(b"y", 20 * P, Flags::NONE).unwrap();
        assert_eq!(disk.allocated_bytes(), 3 * P);
        c.write(b"\0", 20 * P, Flags::NONE).unwrap();
        assert_eq!(disk.allocated_bytes(), 2 * P);
        // Zero spanning two partial pages and nothing whole.
        c.zero(P, 6 * P + P / 2, Flags::MAY_TRIM).unwrap();
        assert_eq!(disk.allocated_bytes(), 2 * P);
        assert_eq!(c.read(P as usize, 6 * P + P / 2).unwrap(), vec![0; P as usize]);
        assert_eq!(c.read(10, 6 * P + P / 2 - 10).unwrap(), vec![7; 10]);
        assert_eq!(c.read(10, 7 * P + P / 2).unwrap(), vec![7; 10]);
        // Zero everything.
        c.zero(1 << 20, 0, Flags::FAST_ZERO).unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
        assert_eq!(c.read(1 << 16, 6 * P).unwrap(), vec![0; 1 << 16]);
    }

    #[test]
    fn extents_follow_allocation() {
        let c = open(factory(1 << 20), false);
        assert_eq!(c.extents(1 << 20, 0, Flags::NONE).unwrap(), vec![(1 << 20, HZ)]);
        c.write(b"abc", P + 10, Flags::NONE).unwrap();
        c.write(&vec![1; 2 * P as usize], 5 * P, Flags::NONE).unwrap();
        assert_eq!(
            c.extents(1 << 20, 0, Flags::NONE).unwrap(),
            vec![(P, HZ), (P, 0), (3 * P, HZ), (2 * P, 0), ((1 << 20) - 7 * P, HZ)]
        );
        // From an unaligned offset, clipped to the request.
        assert_eq!(c.extents(P, P + 100, Flags::NONE).unwrap(), vec![(P - 100, 0), (100, HZ)]);
        assert_eq!(c.extents((1 << 20) - 3 * P, 3 * P, Flags::REQ_ONE).unwrap(), vec![(2 * P, HZ)]);
        c.trim(P, P, Flags::NONE).unwrap();
        assert_eq!(c.extents(5 * P, 0, Flags::NONE).unwrap(), vec![(5 * P, HZ)]);
    }

    #[test]
    fn extents_are_bounded() {
        let disk = MemoryDisk::new(100 * P);
        disk.write(&vec![9; 20 * P as usize], 0).unwrap();
        // A long data run stops when the budget is spent: less than asked, but never nothing.
        assert_eq!(disk.extents_within(100 * P, 0, 8).0, vec![Extent { length: 8 * P, flags: 0 }]);
        assert_eq!(disk.extents_within(100 * P, 5, 1).0, vec![Extent { length: P - 5, flags: 0 }]);
        // Alternating pages: each hole and each data run costs one.
        for i in (30..40).step_by(2) {
            disk.write(b"x", i * P).unwrap();
        }
        let e = disk.extents_within(100 * P, 20 * P, 4).0;
        let e: Vec<_> = e.iter().map(|x| (x.length, x.flags)).collect();
        assert_eq!(e, vec![(10 * P, HZ), (P, 0), (P, HZ), (P, 0)]);
        // The full budget covers the whole disk here.
        assert_eq!(disk.extents(100 * P, 0).total(), 100 * P);
    }

    #[test]
    fn largest_disk() {
        let size = i64::MAX as u64;
        let f = factory(size);
        let c = open(f.clone(), false);
        assert_eq!(c.info().size, size);
        // The last 10 bytes, and a write crossing the last page boundary.
        c.write(b"0123456789", size - 10, Flags::NONE).unwrap();
        assert_eq!(c.read(10, size - 10).unwrap(), b"0123456789");
        let last_page = (size - 1) / P * P;
        c.write(b"ABCD", last_page - 2, Flags::NONE).unwrap();
        assert_eq!(c.read(4, last_page - 2).unwrap(), b"ABCD");
        assert_eq!(f.disk().allocated_bytes(), 2 * P);
        // One past the end is refused by the shim, not a panic here.
        assert_eq!(c.write(b"x", size, Flags::NONE).unwrap_err().errno, Errno::NoSpc);
        // Block status over the whole disk is quick: one hole, then data.
        let e = c.extents(size, 0, Flags::NONE).unwrap();
        assert_eq!(e, vec![(last_page - P, HZ), (size - (last_page - P), 0)]);
        // Zeroing all of it frees both pages without walking 2^48 page slots.
        c.zero(size, 0, Flags::MAY_TRIM).unwrap();
        assert_eq!(f.disk().allocated_bytes(), 0);
        assert_eq!(c.read(10, size - 10).unwrap(), vec![0; 10]);
        assert_eq!(c.extents(size, 0, Flags::NONE).unwrap(), vec![(size, HZ)]);
    }

    #[test]
    fn shared_between_connections_and_threads() {
        let f = factory(64 * P);
        let a = open(f.clone(), false);
        let b = open(f.clone(), false);
        a.write(b"hello", 3, Flags::NONE).unwrap();
        assert_eq!(b.read(5, 3).unwrap(), b"hello");
        // The store itself is used from many event-loop threads at once.
        let disk = f.disk().clone();
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let disk = &disk;
                s.spawn(move || {
                    let off = u64::from(t) * 16 * P;
                    let data = vec![t + 1; 16 * P as usize];
                    for _ in 0..20 {
                        disk.write(&data, off).unwrap();
                        let mut back = vec![0; data.len()];
                        disk.read(&mut back, off);
                        assert_eq!(back, data);
                    }
                });
            }
        });
        assert_eq!(disk.allocated_bytes(), 64 * P);
        assert_eq!(b.read(1, 63 * P).unwrap(), vec![4]);
    }
}
