//! The file backend's unit tests, on the simulated scheduler (so through the blocking pool
//! and the loop's own fast path; io_uring is covered by `tests/io_paths.rs`).

use super::*;
use crate::testutil::{make_err, open, try_open, Conn};
use blocksmith_core::error::Errno;
use blocksmith_core::layer::{EXTENT_HOLE, EXTENT_ZERO};
use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;

const HZ: u32 = EXTENT_HOLE | EXTENT_ZERO;
const MIB: u64 = 1 << 20;

/// A file under the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(len: u64) -> TempFile {
        TempFile::new_in(&std::env::temp_dir(), len)
    }
    /// A file next to the test executable: on the build's own (disk) file system, which takes
    /// O_DIRECT, whatever the temp directory is.
    fn on_disk(len: u64) -> TempFile {
        let exe = std::env::current_exe().unwrap();
        TempFile::new_in(exe.parent().unwrap(), len)
    }
    fn new_in(dir: &Path, len: u64) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name =
            format!("blocksmith-file-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        TempFile(path)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
    /// 512-byte blocks the file system has allocated.
    fn blocks(&self) -> u64 {
        std::fs::metadata(&self.0).unwrap().blocks()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn factory(t: &TempFile, cache: CacheMode) -> Arc<FileFactory> {
    factory_with(t, Options { cache, ..Options::default() })
}

fn factory_with(t: &TempFile, opts: Options) -> Arc<FileFactory> {
    Arc::new(FileFactory::open_path(t.path(), &opts).unwrap())
}

fn conn(t: &TempFile) -> (Arc<FileFactory>, Conn) {
    let f = factory(t, CacheMode::Default);
    let c = open(f.clone(), false);
    (f, c)
}

#[test]
fn read_write_round_trip() {
    let t = TempFile::new(MIB);
    let (_, c) = conn(&t);
    let i = c.info();
    assert_eq!(i.size, MIB);
    assert!(i.can_write && i.can_flush && i.can_trim && i.can_multi_conn && i.can_fast_zero);
    assert_eq!((i.fua, i.zero, i.cache), (Support::Native, Support::Native, Support::Native));
    assert_eq!(c.read(4096, 8192).unwrap(), vec![0; 4096]);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    c.write(&data, 12_345, Flags::NONE).unwrap();
    c.write(b"fua", 500_000, Flags::FUA).unwrap();
    c.flush().unwrap();
    c.cache(MIB, 0).unwrap();
    assert_eq!(c.read(data.len(), 12_345).unwrap(), data);
    let disk = t.contents();
    assert_eq!(&disk[12_345..22_345], &data[..]);
    assert_eq!(&disk[500_000..500_003], b"fua");
    // Past the end is refused by the shim before any syscall.
    assert_eq!(c.write(b"x", MIB, Flags::NONE).unwrap_err().errno, Errno::NoSpc);
}

/// Start a read and say whether it completed before the scheduler ran anything, then finish it.
fn read_inline(c: &Conn, len: usize, offset: u64) -> (bool, Vec<u8>) {
    let got = Rc::new(RefCell::new(None));
    let g = got.clone();
    c.layer.pread(vec![0xa5; len], offset, Flags::NONE, Done::new(move |r| *g.borrow_mut() = Some(r)));
    let inline = got.borrow().is_some();
    c.sim.run_until_idle();
    let r = got.borrow_mut().take().expect("read completed");
    (inline, r.unwrap())
}

#[test]
fn blocking_io_runs_on_the_pool_not_the_loop() {
    let t = TempFile::new(MIB);
    let f = factory_with(&t, Options { nowait_reads: false, ..Options::default() });
    let c = open(f, false);
    let (inline, _) = read_inline(&c, 512, 0);
    assert!(!inline, "a file read completed without going through the scheduler");
    let done = Rc::new(Cell::new(false));
    let d = done.clone();
    c.layer.pwrite(vec![1; 512], 0, Flags::NONE, Done::new(move |r| d.set(r.is_ok())));
    assert!(!done.get(), "a file write completed without going through the scheduler");
    c.sim.run_until_idle();
    assert!(done.get());
}

#[test]
fn cached_reads_complete_on_the_loop() {
    let t = TempFile::on_disk(MIB);
    let data: Vec<u8> = (0..64 << 10).map(|i| (i % 253) as u8).collect();
    std::fs::write(&t.0, &data).unwrap();
    // Just written through the page cache, so cached: the read needs no trip to the pool.
    let (_, c) = conn(&t);
    let (inline, got) = read_inline(&c, 8192, 4096);
    assert!(inline, "a cached read went to the pool");
    assert_eq!(got, &data[4096..12288]);
    // Past the end of the (shrunk) file nothing is cached: queued, and the error comes back.
    OpenOptions::new().write(true).open(&t.0).unwrap().set_len(16384).unwrap();
    let e = c.read(8192, 12288).unwrap_err();
    assert!(e.message.unwrap().contains("end of file"));
    // cache=none never reads on the loop: its reads are followed by eviction or are direct.
    let c = open(factory(&t, CacheMode::None), false);
    let (inline, got) = read_inline(&c, 4096, 4096);
    assert!(!inline);
    assert_eq!(got, &data[4096..8192]);
}

/// On tmpfs (no RWF_NOWAIT there) reads complete on the loop when no swap is active, since
/// they cannot wait for a disk; with swap they are queued. Either way the bytes are right, and
/// the end of the file still comes back as an error from the queued path.
#[test]
fn reads_of_a_file_in_memory_complete_on_the_loop_unless_it_can_swap() {
    let shm = Path::new("/dev/shm");
    assert!(shm.is_dir(), "/dev/shm (tmpfs) is needed for this test");
    let t = TempFile::new_in(shm, 0);
    let data: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
    std::fs::write(&t.0, &data).unwrap();
    let no_swap = std::fs::read_to_string("/proc/swaps").unwrap().lines().count() <= 1;
    let (_, c) = conn(&t);
    for round in 0..2 {
        let (inline, got) = read_inline(&c, 8192, 4096 + round * 100);
        assert_eq!(got, &data[4096 + round as usize * 100..][..8192]);
        // The first read finds out RWF_NOWAIT is unsupported; both take the same path.
        assert_eq!(inline, no_swap, "round {round}: swap active: {}", !no_swap);
    }
    // Shrunk under the server: the inline read comes up short, the queued one reports it.
    OpenOptions::new().write(true).open(&t.0).unwrap().set_len(16384).unwrap();
    let e = c.read(8192, 12288).unwrap_err();
    assert!(e.message.unwrap().contains("end of file"));
}

#[test]
fn a_partly_cached_read_is_finished_by_the_pool() {
    let t = TempFile::new(0);
    let data: Vec<u8> = (0..32 << 10).map(|i| (i % 241) as u8).collect();
    std::fs::write(&t.0, &data).unwrap();
    let f = factory(&t, CacheMode::Default);
    // As the loop leaves it after a short RWF_NOWAIT read: the first 5000 bytes filled.
    let mut buf = vec![0xee; 20_000];
    buf[..5000].copy_from_slice(&data[1000..6000]);
    let got = f.shared.read_from(buf, 1000, 5000).unwrap();
    assert_eq!(got, &data[1000..21_000]);
}

#[test]
fn trim_makes_a_hole() {
    let t = TempFile::new(MIB);
    let (_, c) = conn(&t);
    assert!(c.info().can_extents, "temp dir without SEEK_HOLE");
    assert_eq!(c.extents(MIB, 0, Flags::NONE).unwrap(), vec![(MIB, HZ)]);
    c.write(&vec![0xab; 256 << 10], 256 << 10, Flags::NONE).unwrap();
    assert_eq!(
        c.extents(MIB, 0, Flags::NONE).unwrap(),
        vec![(256 << 10, HZ), (256 << 10, 0), (512 << 10, HZ)]
    );
    assert_eq!(c.extents(MIB - (300 << 10), 300 << 10, Flags::REQ_ONE).unwrap(), vec![(212 << 10, 0)]);
    let before = t.blocks();
    c.trim(128 << 10, 256 << 10, Flags::FUA).unwrap();
    assert!(t.blocks() < before, "trim freed nothing");
    assert_eq!(
        c.extents(MIB, 0, Flags::NONE).unwrap(),
        vec![(384 << 10, HZ), (128 << 10, 0), (512 << 10, HZ)]
    );
    assert_eq!(c.read(128 << 10, 256 << 10).unwrap(), vec![0; 128 << 10]);
    assert_eq!(c.read(10, 384 << 10).unwrap(), vec![0xab; 10]);
}

#[test]
fn zero_variants() {
    let t = TempFile::new(MIB);
    let (_, c) = conn(&t);
    c.write(&vec![0xcd; MIB as usize], 0, Flags::NONE).unwrap();
    // Unaligned zero that must stay allocated.
    c.zero(1000, 3000, Flags::NONE).unwrap();
    let d = t.contents();
    assert_eq!(&d[2990..3000], &[0xcd; 10]);
    assert!(d[3000..4000].iter().all(|&b| b == 0));
    assert_eq!(&d[4000..4010], &[0xcd; 10]);
    // MAY_TRIM punches a hole, which block status shows.
    c.zero(64 << 10, 128 << 10, Flags::MAY_TRIM | Flags::FUA).unwrap();
    let e = c.extents(64 << 10, 128 << 10, Flags::NONE).unwrap();
    assert_eq!(e, vec![(64 << 10, HZ)]);
    // Fast zero is possible here (fallocate works), so it succeeds.
    c.zero(8192, 512 << 10, Flags::FAST_ZERO).unwrap();
    let d = t.contents();
    assert!(d[(128 << 10)..(192 << 10)].iter().all(|&b| b == 0));
    assert!(d[(512 << 10)..(512 << 10) + 8192].iter().all(|&b| b == 0));
    assert_eq!(d[(512 << 10) + 8192], 0xcd);
    assert_eq!(d[(512 << 10) - 1], 0xcd);
}

#[test]
fn zero_falls_back_to_writing() {
    let t = TempFile::new(MIB);
    let (f, c) = conn(&t);
    c.write(&vec![0xee; 64 << 10], 0, Flags::NONE).unwrap();
    // As on a file system without fallocate: only writing zeroes is left.
    for flag in [&f.shared.punch_hole, &f.shared.zero_range, &f.shared.allocate] {
        flag.store(false, Ordering::Relaxed);
    }
    let e = c.zero(4096, 0, Flags::FAST_ZERO).unwrap_err();
    assert_eq!(e.errno, Errno::NotSup);
    assert_eq!(c.read(4096, 0).unwrap(), vec![0xee; 4096], "failed fast zero changed data");
    c.zero((64 << 10) - 4097, 4097, Flags::MAY_TRIM).unwrap();
    let d = t.contents();
    assert_eq!(&d[..4097], &[0xee; 4097][..]);
    assert!(d[4097..(64 << 10)].iter().all(|&b| b == 0));
    // Trim without punch-hole support succeeds and leaves the data (it is advisory).
    c.write(b"keep", 100, Flags::NONE).unwrap();
    c.trim(4096, 0, Flags::NONE).unwrap();
    assert_eq!(c.read(4, 100).unwrap(), b"keep");
}

#[test]
fn zero_without_zero_range_punches_and_reallocates() {
    let t = TempFile::new(MIB);
    let (f, c) = conn(&t);
    c.write(&vec![1; 8192], 0, Flags::NONE).unwrap();
    f.shared.zero_range.store(false, Ordering::Relaxed);
    // Punch-then-allocate still zeroes quickly and leaves the range allocated.
    c.zero(4096, 0, Flags::FAST_ZERO).unwrap();
    let r = c.read(8192, 0).unwrap();
    assert_eq!((&r[..4096], &r[4096..]), (&[0; 4096][..], &[1; 4096][..]));
    assert_eq!(c.extents(8192, 0, Flags::NONE).unwrap(), vec![(8192, 0)]);
}

#[test]
fn read_only() {
    let t = TempFile::new(4096);
    let f = factory(&t, CacheMode::Default);
    let ro = open(f.clone(), true);
    assert!(!ro.info().can_write);
    assert_eq!(ro.write(b"x", 0, Flags::NONE).unwrap_err().errno, Errno::Perm);
    assert_eq!(ro.read(4096, 0).unwrap(), vec![0; 4096]);
    // The same factory still gives writable connections when not asked for read-only.
    assert!(open(f, false).info().can_write);
}

#[test]
fn shrinking_file_gives_eio_not_a_panic() {
    let t = TempFile::new(MIB);
    let (_, c) = conn(&t);
    OpenOptions::new().write(true).open(&t.0).unwrap().set_len(4096).unwrap();
    let e = c.read(4096, MIB - 4096).unwrap_err();
    assert_eq!(e.errno, Errno::Io);
    assert!(e.message.unwrap().contains("end of file"));
    // Block status past the new end is a hole, not an error.
    assert_eq!(c.extents(8192, MIB - 8192, Flags::NONE).unwrap(), vec![(8192, HZ)]);
}

#[test]
fn size_is_measured_per_connection() {
    let t = TempFile::new(4096);
    let f = factory(&t, CacheMode::Default);
    assert_eq!(open(f.clone(), false).info().size, 4096);
    OpenOptions::new().write(true).open(&t.0).unwrap().set_len(MIB).unwrap();
    assert_eq!(open(f, false).info().size, MIB);
}

#[test]
fn cache_none_round_trip() {
    let t = TempFile::new(MIB);
    // The advisory path, as where O_DIRECT is refused.
    let f = factory_with(&t, Options { cache: CacheMode::None, direct: false, ..Options::default() });
    assert!(f.shared.direct.is_none());
    let c = open(f, false);
    // More writes than eviction windows, so old windows are waited for and dropped.
    for i in 0..(EVICT_WINDOWS as u64 + 4) {
        c.write(&[i as u8 + 1; 4096], i * 4096, Flags::NONE).unwrap();
    }
    for i in 0..(EVICT_WINDOWS as u64 + 4) {
        assert_eq!(c.read(4096, i * 4096).unwrap(), vec![i as u8 + 1; 4096]);
    }
}

#[test]
fn cache_none_uses_o_direct_for_aligned_requests() {
    let t = TempFile::on_disk(MIB);
    let f = factory(&t, CacheMode::None);
    let align = match &f.shared.direct {
        Some(d) => d.align,
        None => panic!("no O_DIRECT on the build directory's file system"),
    };
    assert!(align.is_power_of_two() && align <= 4096);
    let c = open(f.clone(), false);
    let a = align as usize;
    let pattern = |n: usize, seed: u8| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(seed)).collect() };
    // Aligned: direct. Unaligned offset, unaligned length: buffered with eviction.
    let w1 = pattern(4 * a, 3);
    c.write(&w1, 8 * align, Flags::NONE).unwrap();
    let w2 = pattern(a + 100, 5);
    c.write(&w2, 20 * align + 7, Flags::FUA).unwrap();
    let w3 = pattern(a - 1, 7);
    c.write(&w3, 30 * align, Flags::NONE).unwrap();
    // A direct write over part of what a buffered write left, and the other way round.
    let w4 = pattern(a, 11);
    c.write(&w4, 21 * align, Flags::FUA).unwrap();
    c.flush().unwrap();
    let disk = t.contents();
    let at = |o: u64, n: usize| disk[o as usize..o as usize + n].to_vec();
    assert_eq!(at(8 * align, w1.len()), w1);
    assert_eq!(at(20 * align + 7, a - 7), w2[..a - 7]);
    assert_eq!(at(21 * align, a), w4);
    assert_eq!(at(30 * align, w3.len()), w3);
    // Read back aligned (direct) and unaligned (buffered), including across both kinds.
    assert_eq!(c.read(4 * a, 8 * align).unwrap(), w1);
    assert_eq!(c.read(a, 21 * align).unwrap(), w4);
    assert_eq!(c.read(3, 21 * align - 3).unwrap(), w2[a - 10..a - 7]);
    assert_eq!(c.read(2 * a, 30 * align).unwrap()[..a - 1], w3[..]);
    // The whole file, aligned: everything written is there.
    assert_eq!(c.read(MIB as usize, 0).unwrap(), t.contents());
}

#[test]
fn o_direct_bounce_buffers_are_charged_to_the_budget() {
    let t = TempFile::on_disk(MIB);
    let f = factory(&t, CacheMode::None);
    assert!(f.shared.direct.is_some());
    let c = open(f.clone(), false);
    c.write(&[9; 8192], 0, Flags::NONE).unwrap();
    // A connection whose budget is all used: aligned requests still work, through the
    // buffered path, rather than waiting or failing.
    let sim = blocksmith_core::sched::SimScheduler::new();
    let budget = blocksmith_core::budget::Budget::new(4096);
    assert!(budget.try_reserve(4096));
    let layer = FileLayer {
        shared: f.shared.clone(),
        sched: sim.sched(),
        budget: budget.clone(),
        size: MIB,
        can_write: true,
    };
    assert!(layer.direct_for(0, 8192).is_none());
    let got = crate::testutil::run(&sim, |d| layer.pread(vec![0; 8192], 0, Flags::NONE, d)).unwrap();
    assert_eq!(got, vec![9; 8192]);
    budget.release(4096);
    let (_, r) = layer.direct_for(0, 4096).expect("aligned, with room in the budget");
    assert_eq!(budget.used(), 4096);
    drop(r);
    assert_eq!(budget.used(), 0);
    assert!(layer.direct_for(1, 4096).is_none() && layer.direct_for(0, 100).is_none());
}

#[test]
fn parameters() {
    let t = TempFile::new(4096);
    let p = t.path();
    let ok = |kv: &[(&str, &str)]| crate::testutil::make(&SPEC, kv).map(|f| try_open(f, false).is_ok());
    assert_eq!(ok(&[("file", p)]), Ok(true));
    assert_eq!(ok(&[("file", p), ("cache", "none"), ("fadvise", "sequential")]), Ok(true));
    assert_eq!(ok(&[("file", p), ("cache", "default"), ("fadvise", "random")]), Ok(true));
    assert!(make_err(&SPEC, &[]).contains("[file=]FILENAME"));
    assert!(make_err(&SPEC, &[("file", "/nonexistent/blocksmith")]).contains("No such file"));
    assert!(make_err(&SPEC, &[("file", "")]).contains("empty"));
    let dir = std::env::temp_dir();
    assert!(make_err(&SPEC, &[("file", dir.to_str().unwrap())]).contains("directory"));
    assert!(make_err(&SPEC, &[("file", "/dev/null")]).contains("not a regular file"));
    // A FIFO is refused before it is opened (opening it would wait for a writer).
    let fifo = TempFile::new(0);
    std::fs::remove_file(&fifo.0).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&fifo.0).status().unwrap();
    assert!(made.success());
    assert!(make_err(&SPEC, &[("file", fifo.path())]).contains("not a regular file"));
    assert!(make_err(&SPEC, &[("file", p), ("cache", "unsafe")]).contains("cache mode 'unsafe'"));
    assert!(make_err(&SPEC, &[("file", p), ("fadvise", "fast")]).contains("fadvise mode"));
    assert!(make_err(&SPEC, &[("file", p), ("bogus", "1")]).contains("unknown parameter 'bogus'"));
    assert!(make_err(&SPEC, &[("dir", "/tmp")]).contains("not implemented"));
    assert!(make_err(&SPEC, &[("file", p), ("rdelay", "1s")]).contains("--filter=delay"));
    assert_eq!(ok(&[("file", p), ("nowait-reads", "false")]), Ok(true));
    assert!(make_err(&SPEC, &[("file", p), ("nowait-reads", "maybe")]).contains("maybe"));
}
