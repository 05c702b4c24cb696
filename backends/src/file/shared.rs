//! The open file and everything done to it off the event loop: each method here is one job
//! for the blocking pool (the event loop's own fast paths are in `mod.rs`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use blocksmith_core::error::Errno;
use blocksmith_core::layer::{Extents, Flags, EXTENT_HOLE, EXTENT_ZERO};
use blocksmith_core::NbdError;

use super::direct::Direct;
use super::{io_error, sys, CacheMode, Kind, Options, EVICT_WINDOWS, MAX_SEEK_STEPS, ZERO_CHUNK};

/// The open file, shared by every connection and every pool thread.
pub(super) struct Shared {
    /// Shared with READ replies that send a cached range with `sendfile` (`Lent::File`).
    pub file: Arc<File>,
    pub writable: bool,
    pub kind: Kind,
    pub rotational: bool,
    pub cache: CacheMode,
    pub can_extents: bool,
    // What the file system turned out to support; cleared on its first "not supported".
    pub punch_hole: AtomicBool,
    pub zero_range: AtomicBool,
    pub allocate: AtomicBool,
    pub discard: AtomicBool,
    pub zeroout: AtomicBool,
    /// cache=none: ranges written recently whose pages are still to be evicted.
    windows: Mutex<VecDeque<(u64, u64)>>,
    /// cache=none: the O_DIRECT descriptor for aligned reads and writes, when the file system
    /// takes one.
    pub direct: Option<Direct>,
    /// cache=default and `nowait-reads`: try reads with `preadv2(RWF_NOWAIT)` on the event loop
    /// first. Cleared if the kernel or file system turns out not to support it.
    pub nowait: AtomicBool,
    /// cache=default and `nowait-reads` on a file in memory (tmpfs without swap, ramfs) whose
    /// file system cannot do RWF_NOWAIT: plain reads on the loop, which cannot wait for a disk.
    /// (io_uring would hand each read to a kernel worker thread: 10% more CPU for 4K reads.)
    pub inline_reads: AtomicBool,
    /// The file's pages cannot be waiting on a disk (`sys::memory_resident`).
    pub resident: bool,
    /// cache=default: large cached reads are lent as file ranges and sent with `sendfile`.
    /// Cleared if the kernel has no cachestat(2) to say what is cached.
    pub lend: AtomicBool,
}

impl Shared {
    /// Open and probe `path`. Runs at configuration time, before any event loop exists, so it
    /// may block.
    pub fn open(path: &str, opts: &Options) -> Result<Shared, String> {
        if path.is_empty() {
            return Err("file= must not be empty".into());
        }
        let kind_of = |ft: std::fs::FileType| {
            if ft.is_file() || ft.is_block_device() {
                Ok(())
            } else if ft.is_dir() {
                Err(format!("{path} is a directory (serving a directory, dir=, is not implemented)"))
            } else {
                Err(format!("{path} is not a regular file or block device"))
            }
        };
        // Check before opening: opening a FIFO, say, could block start-up indefinitely.
        kind_of(std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?.file_type())?;
        let (file, writable) = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => (f, true),
            Err(e) => {
                log::debug!("file: cannot open {path} read-write ({e}), serving it read-only");
                (File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?, false)
            }
        };
        // Look at what was opened, not at what the path named a moment ago.
        let ft = file.metadata().map_err(|e| format!("{path}: {e}"))?.file_type();
        kind_of(ft)?;
        let kind = if ft.is_block_device() {
            // 4096 is safe for every device when the kernel will not say.
            Kind::Block { sector: sys::sector_size(&file).unwrap_or(4096) }
        } else {
            Kind::Regular
        };
        // As nbdkit: the whole file, once at open (the hint belongs to the open file, which
        // every connection shares here).
        if let Err(e) = sys::fadvise(&file, 0, 0, opts.fadvise) {
            log::debug!("file: posix_fadvise on {path}: {e} (ignored: it is only a hint)");
        }
        let rotational = match kind {
            Kind::Block { .. } => sys::rotational(&file).unwrap_or(false),
            Kind::Regular => false,
        };
        // Block status needs SEEK_HOLE; devices have no holes to report, so the shim's "all
        // data" answer is exact for them.
        let can_extents = kind == Kind::Regular && sys::seek(&file, 0, libc::SEEK_HOLE).is_ok();
        let is_block = matches!(kind, Kind::Block { .. });
        let direct = match opts.cache {
            CacheMode::None if opts.direct => {
                let size = measure(&file, kind).map_err(|e| format!("{path}: {e}"))?;
                match Direct::open(path, &file, writable, kind, size) {
                    Ok(d) => {
                        log::info!("file: cache=none: O_DIRECT, alignment {}", d.align);
                        Some(d)
                    }
                    Err(e) => {
                        log::info!(
                            "file: cache=none: O_DIRECT unavailable ({e}); evicting from the page \
                             cache after each transfer instead"
                        );
                        None
                    }
                }
            }
            CacheMode::None => {
                log::info!(
                    "file: cache=none: O_DIRECT off; evicting from the page cache after each transfer"
                );
                None
            }
            CacheMode::Default => None,
        };
        let resident = super::sys::memory_resident(&file);
        Ok(Shared {
            file: Arc::new(file),
            writable,
            kind,
            rotational,
            cache: opts.cache,
            can_extents,
            punch_hole: AtomicBool::new(!is_block),
            zero_range: AtomicBool::new(!is_block),
            allocate: AtomicBool::new(!is_block),
            discard: AtomicBool::new(is_block),
            zeroout: AtomicBool::new(is_block),
            windows: Mutex::new(VecDeque::new()),
            direct,
            nowait: AtomicBool::new(opts.cache == CacheMode::Default && opts.nowait_reads),
            inline_reads: AtomicBool::new(false),
            resident,
            lend: AtomicBool::new(opts.cache == CacheMode::Default && opts.sendfile),
        })
    }

    pub fn size(&self) -> Result<u64, NbdError> {
        measure(&self.file, self.kind).map_err(|e| io_error("size", &e))
    }

    /// Read `buf[filled..]` from `offset + filled`: `buf[..filled]` already holds the start of
    /// the range (a non-blocking read on the loop found it cached).
    pub fn read_from(&self, mut buf: Vec<u8>, offset: u64, filled: usize) -> Result<Vec<u8>, NbdError> {
        let start = filled.min(buf.len());
        self.file
            .read_exact_at(&mut buf[start..], offset + start as u64)
            .map_err(|e| io_error("pread", &e))?;
        if self.cache == CacheMode::None {
            // Advisory: a failure costs only some page-cache memory.
            let _ = sys::fadvise(&self.file, offset, buf.len() as u64, libc::POSIX_FADV_DONTNEED);
        }
        Ok(buf)
    }

    /// An aligned read through the O_DIRECT descriptor (the buffered path if there is none).
    pub fn read_direct(&self, mut buf: Vec<u8>, offset: u64) -> Result<Vec<u8>, NbdError> {
        let Some(d) = &self.direct else { return self.read_from(buf, offset, 0) };
        d.read(&mut buf, offset).map_err(|e| io_error("pread", &e))?;
        Ok(buf)
    }

    /// An aligned write through the O_DIRECT descriptor (the buffered path if there is none).
    /// The data goes around the page cache, so there is nothing to evict afterwards.
    pub fn write_direct(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), NbdError> {
        let Some(d) = &self.direct else { return self.write(data, offset, fua) };
        d.write(data, offset).map_err(|e| io_error("pwrite", &e))?;
        if fua {
            // O_DIRECT does not make the write durable: the device may cache it, and the
            // file's metadata may not be on disk yet.
            self.flush()?;
        }
        Ok(())
    }

    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), NbdError> {
        self.file.write_all_at(data, offset).map_err(|e| io_error("pwrite", &e))?;
        if fua {
            self.flush()?;
        }
        if self.cache == CacheMode::None {
            self.evict_later(offset, data.len() as u64)?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), NbdError> {
        self.file.sync_data().map_err(|e| io_error("fdatasync", &e))
    }

    /// cache=none after a write: start writing this range back now, and wait for and drop from
    /// the page cache the range written [`EVICT_WINDOWS`] writes ago. By then its writeback has
    /// usually finished, so the wait is short; evicting every write at once would make each
    /// one wait for the disk.
    fn evict_later(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        sys::sync_file_range(&self.file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
            .map_err(|e| io_error("sync_file_range", &e))?;
        let oldest = {
            let mut w = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
            w.push_back((offset, len));
            if w.len() > EVICT_WINDOWS {
                w.pop_front()
            } else {
                None
            }
        };
        if let Some((o, l)) = oldest {
            let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            sys::sync_file_range(&self.file, o, l, all).map_err(|e| io_error("sync_file_range", &e))?;
            let _ = sys::fadvise(&self.file, o, l, libc::POSIX_FADV_DONTNEED);
        }
        Ok(())
    }

    /// Trim is advisory: only EPERM and EIO are reported, as by nbdkit; anything else (the
    /// file system cannot punch holes, the device cannot discard) leaves the data in place.
    pub fn trim(&self, count: u64, offset: u64, fua: bool) -> Result<(), NbdError> {
        let r = match self.kind {
            Kind::Regular if self.punch_hole.load(Ordering::Relaxed) => Some((
                &self.punch_hole,
                sys::fallocate(
                    &self.file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    count,
                ),
            )),
            Kind::Block { sector } if self.discard.load(Ordering::Relaxed) => {
                // BLKDISCARD wants whole sectors; partial sectors at the edges stay as they are.
                let start = offset.div_ceil(sector) * sector;
                let end = (offset + count) / sector * sector;
                (start < end).then(|| {
                    (&self.discard, sys::block_range(&self.file, sys::BLKDISCARD, start, end - start))
                })
            }
            _ => None,
        };
        if let Some((flag, Err(e))) = r {
            match e.raw_os_error() {
                Some(libc::EPERM | libc::EIO) => return Err(io_error("trim", &e)),
                _ if sys::unsupported(&e) => flag.store(false, Ordering::Relaxed),
                _ => {}
            }
            log::debug!("file: ignoring failed trim of {count} bytes at {offset}: {e}");
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    pub fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<(), NbdError> {
        if !self.zero_fast(count, offset, flags.contains(Flags::MAY_TRIM))? {
            if flags.contains(Flags::FAST_ZERO) {
                return Err(NbdError::msg(Errno::NotSup, "file: no fast way to zero this range"));
            }
            self.write_zeroes(count, offset)?;
        }
        if flags.contains(Flags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    /// One fallocate attempt: Ok(true) done, Ok(false) unsupported (and `flag` cleared so it is
    /// not tried again), Err for a real failure.
    fn try_fallocate(
        &self,
        flag: &AtomicBool,
        mode: libc::c_int,
        offset: u64,
        count: u64,
    ) -> Result<bool, NbdError> {
        match sys::fallocate(&self.file, mode, offset, count) {
            Ok(()) => Ok(true),
            Err(e) if sys::unsupported(&e) => {
                flag.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(io_error("zero", &e)),
        }
    }

    /// Zero without writing data, in nbdkit's order of preference. Ok(false) when only writing
    /// zeroes is left.
    fn zero_fast(&self, count: u64, offset: u64, may_trim: bool) -> Result<bool, NbdError> {
        use libc::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
        const PUNCH: libc::c_int = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        match self.kind {
            Kind::Regular => {
                if may_trim
                    && self.punch_hole.load(Ordering::Relaxed)
                    && self.try_fallocate(&self.punch_hole, PUNCH, offset, count)?
                {
                    return Ok(true);
                }
                if self.zero_range.load(Ordering::Relaxed)
                    && self.try_fallocate(&self.zero_range, FALLOC_FL_ZERO_RANGE, offset, count)?
                {
                    return Ok(true);
                }
                // No ZERO_RANGE (tmpfs, older NFS...): punch a hole and allocate it again, which
                // zeroes without the client's "no hole" wish being ignored.
                if self.punch_hole.load(Ordering::Relaxed)
                    && self.allocate.load(Ordering::Relaxed)
                    && self.try_fallocate(&self.punch_hole, PUNCH, offset, count)?
                    && self.try_fallocate(&self.allocate, 0, offset, count)?
                {
                    return Ok(true);
                }
                Ok(false)
            }
            Kind::Block { sector } => {
                // `sector` is a power of two (checked when probed), so a mask tests alignment.
                if self.zeroout.load(Ordering::Relaxed) && (offset | count) & (sector - 1) == 0 {
                    match sys::block_range(&self.file, sys::BLKZEROOUT, offset, count) {
                        Ok(()) => return Ok(true),
                        Err(e) if sys::unsupported(&e) => self.zeroout.store(false, Ordering::Relaxed),
                        Err(e) => return Err(io_error("zero", &e)),
                    }
                }
                Ok(false)
            }
        }
    }

    fn write_zeroes(&self, count: u64, offset: u64) -> Result<(), NbdError> {
        let buf = vec![0u8; count.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < count {
            let n = (count - done).min(ZERO_CHUNK) as usize;
            self.file.write_all_at(&buf[..n], offset + done).map_err(|e| io_error("pwrite", &e))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Allocation from SEEK_DATA/SEEK_HOLE: holes are HOLE|ZERO, the rest data.
    pub fn extents(&self, count: u64, offset: u64, req_one: bool) -> Result<Extents, NbdError> {
        let end = offset + count;
        let mut e = Extents::new();
        let mut pos = offset;
        for _ in 0..MAX_SEEK_STEPS {
            // No data after `pos` (ENXIO): the rest is the file's final hole, or beyond an end
            // the file shrank to since this connection measured it.
            let data = sys::seek(&self.file, pos, libc::SEEK_DATA)
                .map_err(|e| io_error("lseek SEEK_DATA", &e))?
                .map_or(end, |d| d.min(end));
            if data > pos {
                e.push(data - pos, EXTENT_HOLE | EXTENT_ZERO);
                if req_one {
                    break;
                }
            }
            pos = data;
            if pos >= end {
                break;
            }
            let hole = sys::seek(&self.file, pos, libc::SEEK_HOLE)
                .map_err(|e| io_error("lseek SEEK_HOLE", &e))?
                .map_or(end, |h| h.min(end));
            if hole > pos {
                e.push(hole - pos, 0);
                if req_one {
                    break;
                }
            }
            pos = hole;
            if pos >= end {
                break;
            }
        }
        if e.0.is_empty() {
            // Only if the file kept changing under every seek: "data" is always a true answer.
            e.push(count, 0);
        }
        Ok(e)
    }

    pub fn prefetch(&self, count: u64, offset: u64) {
        // CACHE is advisory: if the kernel will not read ahead, the client loses nothing.
        if let Err(e) = sys::fadvise(&self.file, offset, count, libc::POSIX_FADV_WILLNEED) {
            log::debug!("file: posix_fadvise WILLNEED: {e} (ignored)");
        }
    }
}

/// The size of the file or device.
fn measure(file: &File, kind: Kind) -> io::Result<u64> {
    match kind {
        Kind::Regular => file.metadata().map(|m| m.len()),
        // A device's length is not in its metadata; seeking to the end finds it.
        Kind::Block { .. } => (&*file).seek(SeekFrom::End(0)),
    }
}
