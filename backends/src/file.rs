//! `file`: serve a regular file or a block device (nbdkit-file-plugin, `file=` mode).
//!
//! The file is opened once, at configuration time, so a missing or unreadable file stops the
//! server at start-up; every connection shares that descriptor. Reads and writes use
//! `pread`/`pwrite` and never the file position, so sharing is safe from any thread (the only
//! seeks, SEEK_DATA/SEEK_HOLE/SEEK_END, return their answer and ignore the position too).
//!
//! Every system call that may block — reads, writes, fdatasync, fallocate, lseek, ioctls — runs
//! on the blocking pool through `Sched::blocking`; a `Layer` method only packages the request
//! and returns. What the file system cannot do (punch holes, zero ranges) is discovered by
//! trying, as nbdkit does, and remembered so later requests go straight to what works.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use blocksmith_core::config::Params;
use blocksmith_core::error::Errno;
use blocksmith_core::io::uring;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Extents, Flags, Layer, OpenCx, ParamSpec, Support,
    EXTENT_HOLE, EXTENT_ZERO,
};
use blocksmith_core::sched::Sched;
use blocksmith_core::{ConfigError, NbdError};

const NAME: &str = "file";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "serve a regular file or block device (nbdkit-file-plugin)",
    magic: Some("file"),
    params: &[
        ParamSpec {
            name: "file",
            help: "(required) The file or block device to serve. Opened read-write if possible,\n\
                   else read-only (the export is then read-only).",
        },
        ParamSpec {
            name: "cache",
            help: "default: use the page cache normally.\n\
                   none: keep the page cache small, as nbdkit does: drop pages after each read and\n\
                   evict written pages a few writes later. This is advisory, NOT O_DIRECT.",
        },
        ParamSpec {
            name: "fadvise",
            help: "Access-pattern hint for the kernel: normal (default), random or sequential.",
        },
    ],
    make,
};

/// Writes kept in flight before the oldest is waited for and dropped from the page cache
/// (cache=none), as nbdkit and nbdcopy do.
const EVICT_WINDOWS: usize = 8;

/// Largest buffer of zeroes written at once when nothing faster can zero a range.
const ZERO_CHUNK: u64 = 1024 * 1024;

/// SEEK_DATA/SEEK_HOLE pairs one block-status request may make. A reply may describe less than
/// was asked, so a badly fragmented file answers in pieces rather than tying up a pool thread.
const MAX_SEEK_STEPS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CacheMode {
    Default,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Regular,
    /// A block device and its logical sector size (the alignment its ioctls want).
    Block {
        sector: u64,
    },
}

/// The system calls the file backend needs beyond std, each checked and wrapped once. The only
/// place in this crate allowed `unsafe`.
#[allow(unsafe_code)]
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    // Block-layer ioctls libc does not name. Each is _IO(0x12, nr); deriving them from
    // BLKSSZGET = _IO(0x12, 104) carries over the architecture's _IO encoding, which is not the
    // same everywhere (mips, powerpc and sparc put a direction bit in it).
    pub const BLKDISCARD: libc::Ioctl = libc::BLKSSZGET + (119 - 104);
    pub const BLKROTATIONAL: libc::Ioctl = libc::BLKSSZGET + (126 - 104);
    pub const BLKZEROOUT: libc::Ioctl = libc::BLKSSZGET + (127 - 104);

    fn off(v: u64) -> io::Result<libc::off_t> {
        libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
    }

    fn check(r: libc::c_int) -> io::Result<()> {
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn fallocate(f: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (o, l) = (off(offset)?, off(len)?);
        // SAFETY: fallocate takes only integers; the descriptor belongs to `f`, which is borrowed
        // for the duration of the call and so stays open.
        check(unsafe { libc::fallocate(f.as_raw_fd(), mode, o, l) })
    }

    /// lseek with SEEK_DATA or SEEK_HOLE. `None` means ENXIO: no data at or after `offset`.
    pub fn seek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let o = off(offset)?;
        // SAFETY: lseek takes only integers; `f` keeps the descriptor open during the call. The
        // file position it moves is never used (all IO is positional).
        let r = unsafe { libc::lseek(f.as_raw_fd(), o, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    }

    pub fn fadvise(f: &File, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
        let (o, l) = (off(offset)?, off(len)?);
        // SAFETY: posix_fadvise takes only integers; `f` keeps the descriptor open. It returns
        // the error number instead of setting errno.
        match unsafe { libc::posix_fadvise(f.as_raw_fd(), o, l, advice) } {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    pub fn sync_file_range(f: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
        let (o, l) = (off(offset)?, off(len)?);
        // SAFETY: sync_file_range takes only integers; `f` keeps the descriptor open.
        check(unsafe { libc::sync_file_range(f.as_raw_fd(), o, l, flags) })
    }

    /// BLKDISCARD or BLKZEROOUT over `[offset, offset + len)`.
    pub fn block_range(f: &File, request: libc::Ioctl, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: both ioctls read a `uint64_t[2]` {start, length} through the pointer, which
        // points at `range`, alive and correctly sized until the call returns.
        check(unsafe { libc::ioctl(f.as_raw_fd(), request, range.as_ptr()) })
    }

    /// The logical sector size of a block device (BLKSSZGET).
    pub fn sector_size(f: &File) -> io::Result<u64> {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one `int` through the pointer, which points at `size`.
        check(unsafe { libc::ioctl(f.as_raw_fd(), libc::BLKSSZGET, &mut size as *mut libc::c_int) })?;
        u64::try_from(size)
            .ok()
            .filter(|s| s.is_power_of_two())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad sector size"))
    }

    /// Whether a block device is rotational (BLKROTATIONAL).
    pub fn rotational(f: &File) -> io::Result<bool> {
        let mut rot: libc::c_ushort = 0;
        // SAFETY: BLKROTATIONAL writes one `unsigned short` through the pointer, which points at
        // `rot`.
        check(unsafe { libc::ioctl(f.as_raw_fd(), BLKROTATIONAL, &mut rot as *mut libc::c_ushort) })?;
        Ok(rot != 0)
    }

    /// "This file system or device cannot do that" (ENODEV is what old kernels said for
    /// fallocate on block devices; ENOTSUP is the same value as EOPNOTSUPP on Linux).
    pub fn unsupported(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENODEV | libc::ENOTTY))
    }
}

/// An IO error for the wire: the errno mapped as nbdkit maps it, with the operation named. The
/// file's path is left out on purpose: messages reach clients in structured error replies.
fn io_error(op: &str, e: &io::Error) -> NbdError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        // The file shrank under us since the connection measured it.
        return NbdError::io(format!("{op}: unexpected end of file"));
    }
    let mut n = NbdError::from_io(e);
    n.message = Some(format!("{op}: {e}"));
    n
}

/// The open file, shared by every connection and every pool thread.
struct Shared {
    file: File,
    writable: bool,
    kind: Kind,
    rotational: bool,
    cache: CacheMode,
    can_extents: bool,
    // What the file system turned out to support; cleared on its first "not supported".
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
    allocate: AtomicBool,
    discard: AtomicBool,
    zeroout: AtomicBool,
    /// cache=none: ranges written recently whose pages are still to be evicted.
    windows: Mutex<VecDeque<(u64, u64)>>,
}

impl Shared {
    /// Open and probe `path`. Runs at configuration time, before any event loop exists, so it
    /// may block.
    fn open(path: &str, cache: CacheMode, fadvise: libc::c_int) -> Result<Shared, String> {
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
        if let Err(e) = sys::fadvise(&file, 0, 0, fadvise) {
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
        Ok(Shared {
            file,
            writable,
            kind,
            rotational,
            cache,
            can_extents,
            punch_hole: AtomicBool::new(!is_block),
            zero_range: AtomicBool::new(!is_block),
            allocate: AtomicBool::new(!is_block),
            discard: AtomicBool::new(is_block),
            zeroout: AtomicBool::new(is_block),
            windows: Mutex::new(VecDeque::new()),
        })
    }

    fn size(&self) -> Result<u64, NbdError> {
        let r = match self.kind {
            Kind::Regular => self.file.metadata().map(|m| m.len()),
            // A device's length is not in its metadata; seeking to the end finds it.
            Kind::Block { .. } => (&self.file).seek(SeekFrom::End(0)),
        };
        r.map_err(|e| io_error("size", &e))
    }

    fn read(&self, mut buf: Vec<u8>, offset: u64) -> Result<Vec<u8>, NbdError> {
        self.file.read_exact_at(&mut buf, offset).map_err(|e| io_error("pread", &e))?;
        if self.cache == CacheMode::None {
            // Advisory: a failure costs only some page-cache memory.
            let _ = sys::fadvise(&self.file, offset, buf.len() as u64, libc::POSIX_FADV_DONTNEED);
        }
        Ok(buf)
    }

    fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), NbdError> {
        self.file.write_all_at(data, offset).map_err(|e| io_error("pwrite", &e))?;
        if fua {
            self.flush()?;
        }
        if self.cache == CacheMode::None {
            self.evict_later(offset, data.len() as u64)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), NbdError> {
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
    fn trim(&self, count: u64, offset: u64, fua: bool) -> Result<(), NbdError> {
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

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<(), NbdError> {
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
    fn extents(&self, count: u64, offset: u64, req_one: bool) -> Result<Extents, NbdError> {
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

    fn prefetch(&self, count: u64, offset: u64) {
        // CACHE is advisory: if the kernel will not read ahead, the client loses nothing.
        if let Err(e) = sys::fadvise(&self.file, offset, count, libc::POSIX_FADV_WILLNEED) {
            log::debug!("file: posix_fadvise WILLNEED: {e} (ignored)");
        }
    }
}

/// The configured backend.
pub struct FileFactory {
    shared: Arc<Shared>,
}

impl FileFactory {
    fn open_path(path: &str, cache: CacheMode, fadvise: libc::c_int) -> Result<Self, ConfigError> {
        let shared =
            Shared::open(path, cache, fadvise).map_err(|e| ConfigError::new(format!("{NAME}: {e}")))?;
        Ok(FileFactory { shared: Arc::new(shared) })
    }
}

impl BackendFactory for FileFactory {
    fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        // The size is measured per connection, like nbdkit, so a file that grew between
        // connections is served whole; measuring is a syscall, so it goes to the pool too.
        let shared = self.shared.clone();
        let measure = self.shared.clone();
        let sched = cx.sched.clone();
        let can_write = self.shared.writable && !cx.readonly;
        cx.sched.blocking(
            move || measure.size(),
            move |r: Result<u64, NbdError>| match r {
                Ok(size) => done.ok(Rc::new(FileLayer { shared, sched, size, can_write })),
                Err(e) => done.err(e),
            },
        );
    }
}

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let err = |m: String| ConfigError::new(format!("{NAME}: {m}"));
    // Say plainly which nbdkit modes are missing rather than calling them unknown.
    for key in ["dir", "directory", "fd", "dirfd"] {
        if params.take(key).is_some() {
            return Err(err(format!("{key}= is not implemented; use file=")));
        }
    }
    let path = params.take("file").ok_or_else(|| err("you must supply [file=]FILENAME".into()))?;
    let cache = match params.take("cache").as_deref() {
        None | Some("default") => CacheMode::Default,
        Some("none") => CacheMode::None,
        Some(other) => return Err(err(format!("unknown cache mode '{other}' (expected default or none)"))),
    };
    let fadvise = match params.take("fadvise").as_deref() {
        None | Some("normal") => libc::POSIX_FADV_NORMAL,
        Some("random") => libc::POSIX_FADV_RANDOM,
        Some("sequential") => libc::POSIX_FADV_SEQUENTIAL,
        Some(other) => {
            return Err(err(format!(
                "unknown fadvise mode '{other}' (expected normal, random or sequential)"
            )))
        }
    };
    params.finish(NAME)?;
    Ok(Arc::new(FileFactory::open_path(&path, cache, fadvise)?))
}

/// One connection's handle: the shared file plus this connection's loop and size.
struct FileLayer {
    shared: Arc<Shared>,
    sched: Sched,
    size: u64,
    can_write: bool,
}

impl FileLayer {
    /// This loop's io_uring, for reads, writes and syncs, unless `cache=none` wants its page
    /// cache advice after each transfer (that path stays on the pool, where it is one job).
    fn ring(&self) -> Option<Rc<uring::Uring>> {
        if self.shared.cache == CacheMode::None {
            return None;
        }
        uring::for_loop(&self.sched)
    }

    /// Run `work` on the blocking pool; its result completes `done` back on this loop.
    fn offload<T: Send + 'static>(
        &self,
        done: Done<T>,
        work: impl FnOnce(&Shared) -> Result<T, NbdError> + Send + 'static,
    ) {
        let shared = self.shared.clone();
        self.sched.blocking(move || work(&shared), move |r| done.call(r));
    }
}

impl Layer for FileLayer {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            size: self.size,
            can_write: self.can_write,
            can_flush: true,
            // FUA is done in the same pool job as the write: one trip instead of two.
            fua: Support::Native,
            can_trim: true,
            zero: Support::Native,
            can_fast_zero: true,
            can_extents: self.shared.can_extents,
            cache: Support::Native,
            can_multi_conn: true,
            is_rotational: self.shared.rotational,
            block_size: None,
            description: None,
        }
    }

    fn pread(&self, buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        if let Some(ring) = self.ring() {
            let fd = self.shared.file.as_raw_fd();
            return ring.read_exact_at(
                fd,
                uring::keep(self.shared.clone()),
                buf,
                offset,
                Box::new(move |r, buf| done.call(r.map(|()| buf).map_err(|e| io_error("pread", &e)))),
            );
        }
        self.offload(done, move |sh| sh.read(buf, offset))
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let fua = flags.contains(Flags::FUA);
        if let Some(ring) = self.ring() {
            let fd = self.shared.file.as_raw_fd();
            let (ring2, keep2) = (ring.clone(), self.shared.clone());
            return ring.write_all_at(
                fd,
                uring::keep(self.shared.clone()),
                data,
                offset,
                Box::new(move |r| match r {
                    Err(e) => done.err(io_error("pwrite", &e)),
                    Ok(()) if fua => ring2.datasync(
                        fd,
                        uring::keep(keep2),
                        Box::new(move |r| done.call(r.map_err(|e| io_error("fdatasync", &e)))),
                    ),
                    Ok(()) => done.ok(()),
                }),
            );
        }
        self.offload(done, move |sh| sh.write(&data, offset, fua))
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        if let Some(ring) = self.ring() {
            let fd = self.shared.file.as_raw_fd();
            return ring.datasync(
                fd,
                uring::keep(self.shared.clone()),
                Box::new(move |r| done.call(r.map_err(|e| io_error("fdatasync", &e)))),
            );
        }
        self.offload(done, |sh| sh.flush())
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let fua = flags.contains(Flags::FUA);
        self.offload(done, move |sh| sh.trim(count, offset, fua))
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        self.offload(done, move |sh| sh.zero(count, offset, flags))
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        let req_one = flags.contains(Flags::REQ_ONE);
        self.offload(done, move |sh| sh.extents(count, offset, req_one))
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        self.offload(done, move |sh| {
            sh.prefetch(count, offset);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make_err, open, try_open, Conn};
    use std::cell::Cell;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    const HZ: u32 = EXTENT_HOLE | EXTENT_ZERO;
    const MIB: u64 = 1 << 20;

    /// A file under the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(len: u64) -> TempFile {
            static N: AtomicUsize = AtomicUsize::new(0);
            let name =
                format!("blocksmith-file-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
            let path = std::env::temp_dir().join(name);
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
        Arc::new(FileFactory::open_path(t.path(), cache, libc::POSIX_FADV_NORMAL).unwrap())
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

    #[test]
    fn io_runs_on_the_pool_not_the_loop() {
        let t = TempFile::new(MIB);
        let (_, c) = conn(&t);
        let got = Rc::new(Cell::new(false));
        let g = got.clone();
        c.layer.pread(vec![0; 512], 0, Flags::NONE, Done::new(move |r| g.set(r.is_ok())));
        assert!(!got.get(), "a file read completed without going through the scheduler");
        c.sim.run_until_idle();
        assert!(got.get());
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
        let f = factory(&t, CacheMode::None);
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
    }
}
