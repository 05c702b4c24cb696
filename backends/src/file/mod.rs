//! `file`: serve a regular file or a block device (nbdkit-file-plugin, `file=` mode).
//!
//! The file is opened once, at configuration time, so a missing or unreadable file stops the
//! server at start-up; every connection shares that descriptor. Reads and writes use
//! `pread`/`pwrite` and never the file position, so sharing is safe from any thread (the only
//! seeks, SEEK_DATA/SEEK_HOLE/SEEK_END, return their answer and ignore the position too).
//!
//! No `Layer` method blocks the event loop. Reads, writes and fdatasync go to the loop's
//! io_uring, or to the blocking pool where there is none (`--io=pool`); everything else
//! (fallocate, lseek, ioctls) runs on the blocking pool. The one system call made on the loop
//! itself cannot wait either: with `cache=default` a read first tries `preadv2(RWF_NOWAIT)`,
//! which copies what the page cache already holds and returns at once, and only the rest is
//! queued (`nowait-reads`). What the file system cannot do (punch holes, zero ranges,
//! RWF_NOWAIT) is discovered by trying, as nbdkit does, and remembered so later requests go
//! straight to what works.
//!
//! `cache=none` opens a second descriptor with O_DIRECT (`direct`): aligned reads and writes
//! bypass the page cache through aligned bounce buffers, the rest get nbdkit's advisory
//! eviction.
//!
//! Layout: `shared` (the open file and the blocking jobs), `direct` (O_DIRECT), `sys` (the
//! system calls std lacks), and this module (parameters, and each request's path).

mod direct;
mod shared;
// Also the split backend's SEEK_DATA/SEEK_HOLE.
pub(crate) mod sys;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blocksmith_core::budget::{Budget, Reservation};
use blocksmith_core::config::Params;
use blocksmith_core::io::aligned::AlignedBuf;
use blocksmith_core::io::uring;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Extents, Flags, Layer, Lent, OpenCx, ParamSpec, ReadData,
    Support,
};
use blocksmith_core::sched::Sched;
use blocksmith_core::{ConfigError, NbdError};

use shared::Shared;

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
                   none: keep the page cache out of it. Reads and writes aligned to the device's\n\
                   logical block size use O_DIRECT (through aligned bounce buffers); the others\n\
                   drop their pages after each read and evict written pages a few writes later,\n\
                   as nbdkit does. Where the file system refuses O_DIRECT, every request gets\n\
                   the eviction (-v says which). Flush and FUA still run fdatasync.",
        },
        ParamSpec {
            name: "fadvise",
            help: "Access-pattern hint for the kernel, given once for the whole file when it is\n\
                   opened, as nbdkit does: normal (default), random (no read-ahead) or\n\
                   sequential (twice the read-ahead).",
        },
        ParamSpec {
            name: "nowait-reads",
            help: "true (default) or false. With cache=default, try each read on the event loop\n\
                   first with preadv2(RWF_NOWAIT), which copies what the page cache holds and\n\
                   never waits for the disk; only what is not cached goes to io_uring or the IO\n\
                   threads. false queues every read. blocksmith's own parameter.",
        },
        ParamSpec {
            name: "sendfile",
            help: "true (default) or false. With cache=default, a client's read of 64 KiB or more\n\
                   that cachestat(2) finds in the page cache goes to a plaintext socket with\n\
                   sendfile, without a copy through the server (blocksmith's own).",
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

/// The backend's parameters, parsed.
#[derive(Clone, Copy, Debug)]
struct Options {
    cache: CacheMode,
    /// POSIX_FADV_* for the whole file.
    fadvise: libc::c_int,
    /// cache=default: try reads with RWF_NOWAIT on the loop first.
    nowait_reads: bool,
    /// cache=default: send large cached reads with sendfile.
    sendfile: bool,
    /// cache=none: use O_DIRECT where the file system allows (off only in tests, to exercise
    /// the advisory fallback on file systems that do allow it).
    direct: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cache: CacheMode::Default,
            fadvise: libc::POSIX_FADV_NORMAL,
            nowait_reads: true,
            sendfile: true,
            direct: true,
        }
    }
}

/// An IO error for the wire: the errno mapped as nbdkit maps it, with the operation named. The
/// file's path is left out on purpose: messages reach clients in structured error replies.
/// Reads at least this large, when cached, go to the socket with `sendfile` (zero-copy). Below
/// it the copy costs less than the extra system call (measured: see tuning.md).
const LEND_FILE_MIN: usize = 64 * 1024;

/// fallocate mode for a trim: free the range, keep the file's size.
const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

fn io_error(op: &str, e: &io::Error) -> NbdError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        // The file shrank under us since the connection measured it.
        return NbdError::io(format!("{op}: unexpected end of file"));
    }
    let mut n = NbdError::from_io(e);
    n.message = Some(format!("{op}: {e}"));
    n
}

/// The configured backend.
pub struct FileFactory {
    shared: Arc<Shared>,
}

impl FileFactory {
    fn open_path(path: &str, opts: &Options) -> Result<Self, ConfigError> {
        let shared = Shared::open(path, opts).map_err(|e| ConfigError::new(format!("{NAME}: {e}")))?;
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
        let budget = cx.budget.clone();
        let can_write = self.shared.writable && !cx.readonly;
        cx.sched.blocking(
            move || measure.size(),
            move |r: Result<u64, NbdError>| match r {
                Ok(size) => done.ok(Rc::new(FileLayer { shared, sched, budget, size, can_write })),
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
    // nbdkit < 1.2 had these here; nbdkit now points at the delay filter, and so do we.
    for key in ["rdelay", "wdelay"] {
        if params.take(key).is_some() {
            return Err(err(format!("{key}= is not a file parameter: add --filter=delay")));
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
    let nowait_reads = params.take_bool("nowait-reads")?.unwrap_or(true);
    let sendfile = params.take_bool("sendfile")?.unwrap_or(true);
    params.finish(NAME)?;
    let opts = Options { cache, fadvise, nowait_reads, sendfile, ..Options::default() };
    Ok(Arc::new(FileFactory::open_path(&path, &opts)?))
}

/// One connection's handle: the shared file plus this connection's loop and size.
struct FileLayer {
    shared: Arc<Shared>,
    sched: Sched,
    /// The server's memory budget, which the O_DIRECT bounce buffers are charged to.
    budget: Budget,
    size: u64,
    can_write: bool,
}

impl FileLayer {
    /// This loop's io_uring for buffered reads, writes and syncs, unless `cache=none` wants its
    /// page cache advice after each transfer (that path stays on the pool, where it is one job).
    fn ring(&self) -> Option<Rc<uring::Uring>> {
        if self.shared.cache == CacheMode::None {
            return None;
        }
        uring::for_loop(&self.sched)
    }

    /// Whether a request goes through O_DIRECT: cache=none with a direct descriptor, the range
    /// aligned, and room in the memory budget for its bounce buffer (if there is none, the
    /// request takes the buffered path rather than waiting). The reservation lives as long as
    /// the bounce buffer.
    fn direct_for(&self, offset: u64, len: usize) -> Option<(&direct::Direct, Reservation)> {
        let d = self.direct_covering(offset, len)?;
        let r = self.budget.reserve(len)?;
        Some((d, r))
    }

    /// The direct descriptor, when cache=none has one and the range is aligned for it.
    fn direct_covering(&self, offset: u64, len: usize) -> Option<&direct::Direct> {
        self.shared.direct.as_ref().filter(|d| d.covers(offset, len))
    }

    /// This loop's ring when a regular file's fallocate can go through it.
    fn fallocate_ring(&self) -> Option<Rc<uring::Uring>> {
        if self.shared.kind != Kind::Regular {
            return None;
        }
        self.ring().filter(|r| r.can_fallocate())
    }

    /// What a ring completion needs to carry on (FUA, or falling back to the pool).
    fn after_ring(&self) -> AfterRing {
        AfterRing { sched: self.sched.clone(), shared: self.shared.clone() }
    }

    /// Run `work` on the blocking pool; its result completes `done` back on this loop.
    fn offload<T: Send + 'static>(
        &self,
        done: Done<T>,
        work: impl FnOnce(&Shared) -> Result<T, NbdError> + Send + 'static,
    ) {
        self.after_ring().offload(done, work)
    }

    /// The page-cache part of a buffered read: how many leading bytes of `buf` a read that
    /// cannot wait for a disk filled (all of them when the range is cached), or 0 where such
    /// reads are not available.
    fn try_read_cached(&self, buf: &mut [u8], offset: u64) -> usize {
        if self.shared.nowait.load(Ordering::Relaxed) || self.shared.inline_reads.load(Ordering::Relaxed) {
            self.read_cached(buf, offset)
        } else {
            0
        }
    }

    /// The rest of a buffered read, from `filled` on, through the ring or the pool.
    fn read_queued(&self, buf: Vec<u8>, offset: u64, filled: usize, done: Done<Vec<u8>>) {
        if let Some(ring) = self.ring() {
            let fd = self.shared.file.as_raw_fd();
            return ring.read_rest_at(
                fd,
                uring::keep(self.shared.clone()),
                buf,
                offset,
                filled,
                Box::new(move |r, buf| done.call(r.map(|()| buf).map_err(|e| io_error("pread", &e)))),
            );
        }
        self.offload(done, move |sh| sh.read_from(buf, offset, filled))
    }

    /// The page-cache fast path: copy what is cached right here, without waiting. Returns how
    /// many leading bytes of `buf` it filled (all of them when the range was cached).
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> usize {
        if self.shared.inline_reads.load(Ordering::Relaxed) {
            return self.read_resident(buf, offset);
        }
        match uring::read_nowait(self.shared.file.as_fd(), buf, offset) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Unsupported || e.raw_os_error() == Some(libc::ENOSYS) => {
                if self.shared.nowait.swap(false, Ordering::Relaxed) {
                    if self.shared.resident {
                        self.shared.inline_reads.store(true, Ordering::Relaxed);
                        log::debug!(
                            "file: RWF_NOWAIT reads unsupported here ({e}), but the file is in memory \
                             (tmpfs without swap, or ramfs): reads complete on the loop"
                        );
                        return self.read_resident(buf, offset);
                    }
                    log::debug!("file: RWF_NOWAIT reads unsupported here ({e}); every read is queued");
                }
                0
            }
            // EAGAIN: not cached. Any other error: the queued read will meet it and report it.
            Err(_) => 0,
        }
    }

    /// A plain read on the loop, for a file that lives in memory. Returns how many leading
    /// bytes it filled; a short count (end of file, an error) leaves the rest to the queued
    /// read, which reports what went wrong.
    fn read_resident(&self, buf: &mut [u8], offset: u64) -> usize {
        use std::os::unix::fs::FileExt;
        let mut filled = 0;
        while filled < buf.len() {
            match self.shared.file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        filled
    }
}

/// The parts of a [`FileLayer`] a ring completion needs: to make a write durable (FUA) or to
/// hand the rest of an operation to the pool.
struct AfterRing {
    sched: Sched,
    shared: Arc<Shared>,
}

impl AfterRing {
    fn offload<T: Send + 'static>(
        &self,
        done: Done<T>,
        work: impl FnOnce(&Shared) -> Result<T, NbdError> + Send + 'static,
    ) {
        let shared = self.shared.clone();
        self.sched.blocking(move || work(&shared), move |r| done.call(r));
    }

    /// Complete `done`, after an fdatasync if `fua`.
    fn finish(self, fua: bool, done: Done<()>) {
        if !fua {
            return done.ok(());
        }
        match uring::for_loop(&self.sched) {
            Some(ring) => ring.datasync(
                self.shared.file.as_raw_fd(),
                uring::keep(self.shared.clone()),
                Box::new(move |r| done.call(r.map_err(|e| io_error("fdatasync", &e)))),
            ),
            None => self.offload(done, |sh| sh.flush()),
        }
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

    fn pread(&self, mut buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        if let Some((d, reservation)) = self.direct_for(offset, buf.len()) {
            if let Some(ring) = uring::for_loop(&self.sched) {
                let bounce = AlignedBuf::new(buf.len());
                return ring.read_direct_at(
                    d.file.as_raw_fd(),
                    uring::keep(self.shared.clone()),
                    bounce,
                    offset,
                    Box::new(move |r, bounce| {
                        let r = r.map(|()| {
                            buf.copy_from_slice(&bounce);
                            buf
                        });
                        drop((bounce, reservation));
                        done.call(r.map_err(|e| io_error("pread", &e)))
                    }),
                );
            }
            return self.offload(done, move |sh| {
                let r = sh.read_direct(buf, offset);
                drop(reservation);
                r
            });
        }
        let filled = self.try_read_cached(&mut buf, offset);
        if filled == buf.len() {
            return done.ok(buf);
        }
        self.read_queued(buf, offset, filled, done)
    }

    /// A client's READ of a large, cached range is lent as the file range itself, so the reply
    /// goes to the socket with `sendfile`, never through a buffer of ours.
    fn pread_lent(&self, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        if count >= LEND_FILE_MIN
            && self.shared.cache == CacheMode::Default
            && self.shared.lend.load(Ordering::Relaxed)
        {
            match sys::all_cached(&self.shared.file, offset, count as u64) {
                Some(true) => {
                    let file = self.shared.file.clone();
                    return done.ok(ReadData::one(Lent::File { file, offset, len: count }));
                }
                Some(false) => {}
                None => {
                    if self.shared.lend.swap(false, Ordering::Relaxed) {
                        log::debug!("file: no cachestat(2) here: reads are copied, never sent with sendfile");
                    }
                }
            }
        }
        let mut buf = blocksmith_core::bufpool::take(count);
        if self.direct_covering(offset, count).is_some() {
            return self.pread(buf, offset, flags, done.map(|r| r.map(ReadData::Buf)));
        }
        // What `pread` does, with the cached case answered here: that read (the common one)
        // then completes without wrapping `done` in a closure, so it allocates nothing.
        let filled = self.try_read_cached(&mut buf, offset);
        if filled == count {
            return done.ok(ReadData::Buf(buf));
        }
        self.read_queued(buf, offset, filled, done.map(|r| r.map(ReadData::Buf)))
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let fua = flags.contains(Flags::FUA);
        let fd = self.shared.file.as_raw_fd();
        if let Some((d, reservation)) = self.direct_for(offset, data.len()) {
            if let Some(ring) = uring::for_loop(&self.sched) {
                let mut bounce = AlignedBuf::new(data.len());
                bounce.copy_from_slice(&data);
                // The payload is copied: its buffer can serve the next request on this loop.
                blocksmith_core::bufpool::give(data);
                let after = self.after_ring();
                return ring.write_direct_at(
                    d.file.as_raw_fd(),
                    uring::keep(self.shared.clone()),
                    bounce,
                    offset,
                    Box::new(move |r| {
                        drop(reservation);
                        match r {
                            Err(e) => done.err(io_error("pwrite", &e)),
                            // O_DIRECT is not durability: FUA still syncs.
                            Ok(()) => after.finish(fua, done),
                        }
                    }),
                );
            }
            return self.offload(done, move |sh| {
                let r = sh.write_direct(&data, offset, fua);
                drop(reservation);
                r
            });
        }
        if let Some(ring) = self.ring() {
            let after = self.after_ring();
            return ring.write_all_at(
                fd,
                uring::keep(self.shared.clone()),
                data,
                offset,
                Box::new(move |r| match r {
                    Err(e) => done.err(io_error("pwrite", &e)),
                    Ok(()) => after.finish(fua, done),
                }),
            );
        }
        self.offload(done, move |sh| sh.write(&data, offset, fua))
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        // fdatasync on the buffered descriptor covers what went through the direct one too: it
        // is the same file, and the device's write cache is flushed either way.
        self.after_ring().finish(true, done)
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let fua = flags.contains(Flags::FUA);
        let ring = self.fallocate_ring().filter(|_| self.shared.punch_hole.load(Ordering::Relaxed));
        let Some(ring) = ring else {
            return self.offload(done, move |sh| sh.trim(count, offset, fua));
        };
        let after = self.after_ring();
        let fd = self.shared.file.as_raw_fd();
        ring.fallocate(
            fd,
            uring::keep(self.shared.clone()),
            PUNCH_HOLE,
            offset,
            count,
            Box::new(move |r| {
                if let Err(e) = r {
                    if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EIO)) {
                        return done.err(io_error("trim", &e));
                    }
                    // A trim is advice: one the file system cannot take is dropped.
                    if sys::unsupported(&e) {
                        after.shared.punch_hole.store(false, Ordering::Relaxed);
                    }
                    log::debug!("file: ignoring failed trim of {count} bytes at {offset}: {e}");
                }
                after.finish(fua, done)
            }),
        )
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        // The common cases are one fallocate through io_uring: a hole where the client allows
        // one, else ZERO_RANGE. Everything else (block devices, a file system that refuses
        // both, writing zeroes) runs on the pool, which also finds out what works.
        let sh = &self.shared;
        let mode = if flags.contains(Flags::MAY_TRIM) && sh.punch_hole.load(Ordering::Relaxed) {
            PUNCH_HOLE
        } else if sh.zero_range.load(Ordering::Relaxed) {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            return self.offload(done, move |sh| sh.zero(count, offset, flags));
        };
        let Some(ring) = self.fallocate_ring() else {
            return self.offload(done, move |sh| sh.zero(count, offset, flags));
        };
        let after = self.after_ring();
        ring.fallocate(
            sh.file.as_raw_fd(),
            uring::keep(sh.clone()),
            mode,
            offset,
            count,
            Box::new(move |r| match r {
                Ok(()) => after.finish(flags.contains(Flags::FUA), done),
                Err(e) if sys::unsupported(&e) => {
                    let sh = &after.shared;
                    let flag = if mode == PUNCH_HOLE { &sh.punch_hole } else { &sh.zero_range };
                    flag.store(false, Ordering::Relaxed);
                    after.offload(done, move |sh| sh.zero(count, offset, flags))
                }
                Err(e) => done.err(io_error("zero", &e)),
            }),
        )
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
