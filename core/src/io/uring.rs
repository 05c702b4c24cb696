//! File IO through io_uring, one ring per event loop, completions waking that same loop.
//!
//! Regular files cannot be watched with epoll, so without io_uring every file read goes to the
//! blocking pool and back (two thread hand-offs per request). With a ring, the loop submits the
//! read itself and the kernel posts the completion; the ring's fd becomes readable, the loop's
//! fd watch fires, and the completion callback runs on the loop that asked. Submissions made
//! during one turn of the loop go to the kernel in one `io_uring_enter` (a deferred task).
//!
//! Whether io_uring is used is decided once per process ([`set_enabled`], a probe at first use)
//! and logged; a backend asks [`for_loop`] and falls back to the blocking pool on `None`.
//!
//! Transfers use either an ordinary `Vec<u8>` (buffered IO) or an [`AlignedBuf`] (an O_DIRECT
//! descriptor: [`Uring::read_direct_at`], [`Uring::write_direct_at`]). [`read_nowait`] is the
//! other way to read without blocking: a `preadv2(RWF_NOWAIT)` that copies what the page cache
//! holds, on the calling thread, and never waits for the disk.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use slab::Slab;

use crate::io::aligned::AlignedBuf;
use crate::sched::{Sched, WatchId};

/// Entries in each loop's submission queue. Completions are bounded by what is in flight,
/// which the connections' in-flight caps bound in turn; an overfull queue is submitted early.
const RING_ENTRIES: u32 = 256;

const UNDECIDED: u8 = 0;
const ENABLED: u8 = 1;
const DISABLED: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// Turn io_uring off (`--io=pool`) or back on for the process; call before serving.
pub fn set_enabled(on: bool) {
    STATE.store(if on { UNDECIDED } else { DISABLED }, Ordering::SeqCst);
}

/// Whether io_uring is in use (after the first probe), for `-v` output and tests.
pub fn in_use() -> Option<bool> {
    match STATE.load(Ordering::SeqCst) {
        ENABLED => Some(true),
        DISABLED => Some(false),
        _ => None,
    }
}

thread_local! {
    static RING: RefCell<Option<Rc<Uring>>> = const { RefCell::new(None) };
}

/// This loop's ring, created on first use; `None` where io_uring is off or unusable (or the
/// scheduler cannot watch fds, as in the simulation).
pub fn for_loop(sched: &Sched) -> Option<Rc<Uring>> {
    if STATE.load(Ordering::SeqCst) == DISABLED {
        return None;
    }
    if let Some(r) = RING.with(|r| r.borrow().clone()) {
        return Some(r);
    }
    match Uring::new(sched) {
        Ok(r) => {
            if STATE.swap(ENABLED, Ordering::SeqCst) != ENABLED {
                log::debug!("file IO: io_uring ({RING_ENTRIES} entries per event loop)");
            }
            RING.with(|slot| *slot.borrow_mut() = Some(r.clone()));
            Some(r)
        }
        Err(e) => {
            if e.kind() != io::ErrorKind::Unsupported && STATE.swap(DISABLED, Ordering::SeqCst) != DISABLED {
                log::debug!("file IO: blocking thread pool (io_uring unavailable: {e})");
            }
            None
        }
    }
}

/// Completion of an exact read: the buffer comes back either way.
pub type ReadDone = Box<dyn FnOnce(io::Result<()>, Vec<u8>)>;
/// Completion of an exact O_DIRECT read: the aligned buffer comes back either way.
pub type DirectReadDone = Box<dyn FnOnce(io::Result<()>, AlignedBuf)>;
/// Completion of a write or sync.
pub type UnitDone = Box<dyn FnOnce(io::Result<()>)>;
/// Completion of a write whose buffer the caller wants back.
pub type WriteDone = Box<dyn FnOnce(io::Result<()>, Vec<u8>)>;

/// What a read that reaches the end of the file does with the rest of its range.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PastEof {
    /// Fails with `UnexpectedEof` (the file was expected to be that long).
    Error,
    /// Fills it with zeroes and succeeds (a sparse store whose file only grows as written).
    Zeroes,
}

/// Where a read lands, with the completion that gets that buffer back.
enum ReadInto {
    Buffered(Vec<u8>, ReadDone),
    Direct(AlignedBuf, DirectReadDone),
}

impl ReadInto {
    /// Hand the buffer back to its completion with `r`.
    fn finish(self, r: io::Result<()>) {
        match self {
            ReadInto::Buffered(buf, done) => done(r, buf),
            ReadInto::Direct(buf, done) => done(r, buf),
        }
    }
}

/// What a write sends. Held until the completion is reaped, then dropped (an aligned buffer
/// goes back to this loop's pool).
enum WriteFrom {
    Buffered(Vec<u8>),
    Direct(AlignedBuf),
    /// Handed back to its own completion when done.
    Returned(Vec<u8>, WriteDone),
}

impl WriteFrom {
    fn bytes(&self) -> &[u8] {
        match self {
            WriteFrom::Buffered(v) | WriteFrom::Returned(v, _) => v,
            WriteFrom::Direct(a) => a,
        }
    }

    /// Run the write's completion with `r`: the buffer's own, if it goes back, else `done`.
    fn finish(self, r: io::Result<()>, done: UnitDone) {
        match self {
            WriteFrom::Returned(v, back) => back(r, v),
            WriteFrom::Buffered(_) | WriteFrom::Direct(_) => done(r),
        }
    }
}

/// A transfer moves `buf[at..end]`; `pos` is the file offset of `buf[at]`. Both advance as
/// short transfers are continued.
enum Kind {
    Read { pos: u64, at: usize, end: usize, past_eof: PastEof, into: ReadInto },
    Write { pos: u64, at: usize, end: usize, from: WriteFrom, done: UnitDone },
    Fsync { done: UnitDone },
    Fallocate { mode: i32, offset: u64, len: u64, done: UnitDone },
}

/// An operation the kernel may be using: its buffer must not move or be freed until its
/// completion has been reaped, so it lives here until then.
struct Op {
    fd: RawFd,
    /// Keeps the file (and so `fd`) open while the kernel uses it.
    _keep: Keep,
    kind: Kind,
}

/// Why a direct transfer stopped short: O_DIRECT cannot continue from an offset that is not
/// block-aligned, and a regular file's direct read is short only at its end (it shrank).
fn short_direct(read: bool) -> io::Error {
    if read {
        io::Error::from(io::ErrorKind::UnexpectedEof)
    } else {
        io::Error::other("short O_DIRECT write (out of space?)")
    }
}

pub struct Uring {
    ring: RefCell<IoUring>,
    ops: RefCell<Slab<Op>>,
    sched: Sched,
    submit_pending: Cell<bool>,
    /// Completions taken from the ring in one pass of `reap`, kept for the next.
    reaped: Cell<Vec<(u64, i32)>>,
    watch: Cell<Option<WatchId>>,
    /// The kernel's io_uring has IORING_OP_FALLOCATE (5.6 and later).
    can_fallocate: bool,
}

impl Uring {
    fn new(sched: &Sched) -> io::Result<Rc<Uring>> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in
            [(opcode::Read::CODE, "read"), (opcode::Write::CODE, "write"), (opcode::Fsync::CODE, "fsync")]
        {
            if !probe.is_supported(code) {
                return Err(io::Error::other(format!("the kernel's io_uring lacks {name}")));
            }
        }
        let can_fallocate = probe.is_supported(opcode::Fallocate::CODE);
        let fd = ring.as_raw_fd();
        let u = Rc::new(Uring {
            ring: RefCell::new(ring),
            ops: RefCell::new(Slab::new()),
            sched: sched.clone(),
            submit_pending: Cell::new(false),
            reaped: Cell::new(Vec::new()),
            watch: Cell::new(None),
            can_fallocate,
        });
        // The watch holds the ring weakly: the loop's watch table must not keep it alive.
        let weak: Weak<Uring> = Rc::downgrade(&u);
        let id = sched.watch(fd, true, false, move |_| {
            if let Some(u) = weak.upgrade() {
                u.reap();
            }
        })?;
        u.watch.set(Some(id));
        Ok(u)
    }

    /// Read exactly `buf.len()` bytes at `offset` (short reads are continued; end of file is
    /// `UnexpectedEof`).
    pub fn read_exact_at(self: &Rc<Self>, fd: RawFd, keep: Keep, buf: Vec<u8>, offset: u64, done: ReadDone) {
        self.read_rest_at(fd, keep, buf, offset, 0, done)
    }

    /// As [`Uring::read_exact_at`] when `buf[..filled]` already holds the bytes at `offset`
    /// (from a [`read_nowait`] that found only part of the range cached): reads the rest.
    pub fn read_rest_at(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Keep,
        buf: Vec<u8>,
        offset: u64,
        filled: usize,
        done: ReadDone,
    ) {
        let end = buf.len();
        let pos = offset + filled as u64;
        self.read(fd, keep, ReadInto::Buffered(buf, done), filled..end, pos, PastEof::Error)
    }

    /// Read `buf[range]` from `offset` on. Bytes past the end of the file read as zeroes (a
    /// store file that only grows as it is written). The whole buffer comes back.
    pub fn read_range_at(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Keep,
        buf: Vec<u8>,
        range: Range<usize>,
        offset: u64,
        done: ReadDone,
    ) {
        if range.end > buf.len() {
            return done(Err(io::Error::from(io::ErrorKind::InvalidInput)), buf);
        }
        self.read(fd, keep, ReadInto::Buffered(buf, done), range, offset, PastEof::Zeroes)
    }

    /// Read exactly `buf.len()` bytes at `offset` from an O_DIRECT descriptor (`offset` and the
    /// length aligned as the file requires; the buffer is). A short read is `UnexpectedEof`.
    pub fn read_direct_at(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Keep,
        buf: AlignedBuf,
        offset: u64,
        done: DirectReadDone,
    ) {
        let end = buf.len();
        self.read(fd, keep, ReadInto::Direct(buf, done), 0..end, offset, PastEof::Error)
    }

    /// Read into `into[range]` from file offset `pos` on (an empty range completes at once).
    fn read(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Keep,
        into: ReadInto,
        range: Range<usize>,
        pos: u64,
        past_eof: PastEof,
    ) {
        if range.is_empty() {
            return into.finish(Ok(()));
        }
        let kind = Kind::Read { pos, at: range.start, end: range.end, past_eof, into };
        self.start(Op { fd, _keep: keep, kind });
    }

    /// Write all of `data` at `offset`.
    pub fn write_all_at(self: &Rc<Self>, fd: RawFd, keep: Keep, data: Vec<u8>, offset: u64, done: UnitDone) {
        let end = data.len();
        self.write(fd, keep, WriteFrom::Buffered(data), 0..end, offset, done)
    }

    /// Write `data[range]` at `offset`; the whole buffer comes back.
    pub fn write_range_at(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Keep,
        data: Vec<u8>,
        range: Range<usize>,
        offset: u64,
        done: WriteDone,
    ) {
        if range.end > data.len() {
            return done(Err(io::Error::from(io::ErrorKind::InvalidInput)), data);
        }
        self.write(fd, keep, WriteFrom::Returned(data, done), range, offset, Box::new(|_| ()))
    }

    /// Write all of `data` at `offset` through an O_DIRECT descriptor (aligned as for
    /// [`Uring::read_direct_at`]). The buffer is recycled once the kernel is done with it.
    pub fn write_direct_at(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Keep,
        data: AlignedBuf,
        offset: u64,
        done: UnitDone,
    ) {
        let end = data.len();
        self.write(fd, keep, WriteFrom::Direct(data), 0..end, offset, done)
    }

    fn write(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Keep,
        from: WriteFrom,
        range: Range<usize>,
        offset: u64,
        done: UnitDone,
    ) {
        if range.is_empty() {
            return from.finish(Ok(()), done);
        }
        let kind = Kind::Write { pos: offset, at: range.start, end: range.end, from, done };
        self.start(Op { fd, _keep: keep, kind });
    }

    /// fdatasync.
    pub fn datasync(self: &Rc<Self>, fd: RawFd, keep: Keep, done: UnitDone) {
        self.start(Op { fd, _keep: keep, kind: Kind::Fsync { done } });
    }

    /// Whether this kernel's io_uring has IORING_OP_FALLOCATE (5.6 and later).
    pub fn can_fallocate(&self) -> bool {
        self.can_fallocate
    }

    /// `fallocate(fd, mode, offset, len)`: punch a hole, zero a range. Fails with EOPNOTSUPP
    /// where [`Uring::can_fallocate`] is false.
    pub fn fallocate(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Keep,
        mode: i32,
        offset: u64,
        len: u64,
        done: UnitDone,
    ) {
        if !self.can_fallocate {
            return done(Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
        }
        self.start(Op { fd, _keep: keep, kind: Kind::Fallocate { mode, offset, len, done } });
    }

    fn start(self: &Rc<Self>, op: Op) {
        let key = self.ops.borrow_mut().insert(op);
        self.push(key);
    }

    /// Queue the submission entry for op `key` (first time or continuing a short transfer).
    fn push(self: &Rc<Self>, key: usize) {
        let entry = {
            let mut ops = self.ops.borrow_mut();
            let Some(op) = ops.get_mut(key) else { return };
            let fd = types::Fd(op.fd);
            match &mut op.kind {
                Kind::Read { pos, at, end, into, .. } => {
                    let buf: &mut [u8] = match into {
                        ReadInto::Buffered(v, _) => v,
                        ReadInto::Direct(a, _) => a,
                    };
                    let rest = &mut buf[*at..*end];
                    let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
                    opcode::Read::new(fd, rest.as_mut_ptr(), len).offset(*pos).build()
                }
                Kind::Write { pos, at, end, from, .. } => {
                    let rest = &from.bytes()[*at..*end];
                    let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
                    opcode::Write::new(fd, rest.as_ptr(), len).offset(*pos).build()
                }
                Kind::Fsync { .. } => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
                Kind::Fallocate { mode, offset, len, .. } => {
                    opcode::Fallocate::new(fd, *len).offset(*offset).mode(*mode).build()
                }
            }
            .user_data(key as u64)
        };
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the entry points into the op's buffer (a `Vec`'s or an `AlignedBuf`'s heap
        // block) owned by the op table entry `key`, which stays in the table (neither moved nor
        // freed: the heap block does not move when the table grows) until this entry's
        // completion is reaped in `reap`, and on drop we wait for every outstanding completion
        // first. The fd is kept open by `_keep` for as long.
        let pushed = unsafe { ring.submission().push(&entry) };
        if pushed.is_err() {
            // Queue full: hand what is queued to the kernel now, then there is room.
            if let Err(e) = ring.submit() {
                log::warn!("io_uring submit: {e}");
            }
            // SAFETY: as above.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                drop(ring);
                return self.fail(key, io::Error::other("io_uring submission queue is full"));
            }
        }
        drop(ring);
        if !self.submit_pending.replace(true) {
            let me = self.clone();
            self.sched.defer(move || me.submit());
        }
    }

    /// Hand every queued entry to the kernel in one system call.
    fn submit(&self) {
        self.submit_pending.set(false);
        if let Err(e) = self.ring.borrow_mut().submit() {
            log::warn!("io_uring submit: {e}");
        }
    }

    fn fail(&self, key: usize, e: io::Error) {
        self.finish(key, Err(e));
    }

    /// Take op `key` out of the table and run its completion with `r`.
    fn finish(&self, key: usize, r: io::Result<()>) {
        let op = self.ops.borrow_mut().try_remove(key);
        if let Some(op) = op {
            match op.kind {
                Kind::Read { into, .. } => into.finish(r),
                Kind::Write { from, done, .. } => from.finish(r, done),
                Kind::Fsync { done } | Kind::Fallocate { done, .. } => done(r),
            }
        }
    }

    /// Run the callbacks of every completion posted so far.
    fn reap(self: &Rc<Self>) {
        // The batch vector is kept between wake-ups, so reaping allocates nothing.
        let mut batch = self.reaped.take();
        loop {
            batch.extend(self.ring.borrow_mut().completion().map(|c| (c.user_data(), c.result())));
            if batch.is_empty() {
                break;
            }
            for (user, res) in batch.drain(..) {
                self.complete(user as usize, res);
            }
        }
        self.reaped.set(batch);
    }

    fn complete(self: &Rc<Self>, key: usize, res: i32) {
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            if e.kind() == io::ErrorKind::Interrupted {
                return self.push(key);
            }
            return self.fail(key, e);
        }
        let n = res as usize;
        // Continue a short transfer, or finish.
        let more: io::Result<bool> = {
            let mut ops = self.ops.borrow_mut();
            let Some(op) = ops.get_mut(key) else { return };
            match &mut op.kind {
                Kind::Read { pos, at, end, past_eof, into } => {
                    *at += n;
                    *pos += n as u64;
                    match into {
                        _ if n == 0 && *past_eof == PastEof::Zeroes => {
                            if let ReadInto::Buffered(v, _) = into {
                                v[*at..*end].fill(0);
                            }
                            Ok(false)
                        }
                        _ if n == 0 => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                        ReadInto::Direct(..) if *at < *end => Err(short_direct(true)),
                        _ => Ok(*at < *end),
                    }
                }
                Kind::Write { pos, at, end, from, .. } => {
                    *at += n;
                    *pos += n as u64;
                    if matches!(from, WriteFrom::Direct(_)) && *at < *end {
                        Err(short_direct(false))
                    } else {
                        Ok(*at < *end)
                    }
                }
                Kind::Fsync { .. } | Kind::Fallocate { .. } => Ok(false),
            }
        };
        match more {
            Err(e) => self.fail(key, e),
            Ok(true) => self.push(key),
            Ok(false) => self.finish(key, Ok(())),
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if let Some(id) = self.watch.take() {
            self.sched.unwatch(id);
        }
        // The kernel may still be writing into buffers we own: wait for every completion
        // before they are freed. Their callbacks are dropped (the loop is gone).
        let ring = self.ring.get_mut();
        let ops = self.ops.get_mut();
        while !ops.is_empty() {
            if ring.submit_and_wait(1).is_err() {
                // Cannot wait: leak the buffers rather than free memory the kernel may write.
                std::mem::forget(std::mem::take(ops));
                return;
            }
            let done: Vec<u64> = ring.completion().map(|c| c.user_data()).collect();
            for key in done {
                if let Some(op) = ops.try_remove(key as usize) {
                    // A continuation would need a resubmission; the loop is gone, so drop it.
                    drop(op);
                }
            }
        }
    }
}

/// What keeps an operation's file open while the kernel uses it: a reference to whatever owns
/// the descriptor. The caller's own `Arc`, so that starting an operation costs a reference
/// count rather than an allocation.
pub type Keep = Arc<dyn Any + Send + Sync>;

/// The [`Keep`] for a file (or whatever holds it) that is already shared.
pub fn keep<T: Any + Send + Sync>(v: Arc<T>) -> Keep {
    v
}

/// Read into `buf` at `offset` only what the page cache already holds, without waiting for the
/// disk: `preadv2(RWF_NOWAIT)`. Returns the bytes copied (short when only the start of the range
/// is cached, 0 at end of file). `WouldBlock` (EAGAIN) means nothing is cached; `Unsupported`
/// (EOPNOTSUPP) that this kernel or file system cannot do it at all, so there is no point in
/// asking again.
pub fn read_nowait(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: `iov` describes `buf`, writable and borrowed for the call; the kernel writes at
    // most `iov_len` bytes into it. `fd` is a borrowed, open descriptor.
    let r = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => io::Error::new(io::ErrorKind::Unsupported, e),
            _ => e,
        });
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::reactor::LocalLoop;
    use std::fs::File;
    use std::io::Write;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn read_write_sync_through_the_ring() {
        let mut lp = LocalLoop::new().unwrap();
        let Some(ring) = for_loop(&lp.sched()) else {
            panic!("io_uring is not available on this kernel; the server would fall back to the pool")
        };
        let path = std::env::temp_dir().join(format!("blocksmith-uring-{}", std::process::id()));
        let mut f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let f = Arc::new(f);
        let _ = std::fs::remove_file(&path);
        let fd = f.as_raw_fd();
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        let r2 = ring.clone();
        let f2 = f.clone();
        ring.write_all_at(
            fd,
            keep(f.clone()),
            vec![9u8; 4096],
            4096,
            Box::new(move |r| {
                r.unwrap();
                let r3 = r2.clone();
                r2.datasync(
                    fd,
                    keep(f2.clone()),
                    Box::new(move |r| {
                        r.unwrap();
                        r3.read_exact_at(
                            fd,
                            keep(f2),
                            vec![0u8; 8192],
                            0,
                            Box::new(move |r, buf| *g.borrow_mut() = Some((r.is_ok(), buf))),
                        );
                    }),
                );
            }),
        );
        assert!(lp.run_until(Duration::from_secs(10), || got.borrow().is_some()));
        let (ok, buf) = got.borrow_mut().take().unwrap();
        assert!(ok);
        assert!(buf[..4096].iter().all(|&b| b == 7) && buf[4096..].iter().all(|&b| b == 9));
        // Reading past the end is an error, not a hang or a short buffer.
        let eof = Rc::new(RefCell::new(None));
        let e2 = eof.clone();
        ring.read_exact_at(
            fd,
            keep(f),
            vec![0u8; 10],
            8190,
            Box::new(move |r, _| *e2.borrow_mut() = Some(r)),
        );
        assert!(lp.run_until(Duration::from_secs(10), || eof.borrow().is_some()));
        let r = eof.borrow_mut().take().unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Transfers of a window of a buffer (what the overlay filters' store files use): only the
    /// window moves, the buffer comes back whole, and a read past the end of the file fills
    /// the rest of its window with zeroes.
    #[test]
    fn ranges_of_a_buffer_and_zeroes_past_the_end() {
        let mut lp = LocalLoop::new().unwrap();
        let ring = for_loop(&lp.sched()).expect("io_uring");
        let path = std::env::temp_dir().join(format!("blocksmith-uring-range-{}", std::process::id()));
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let f = Arc::new(f);
        let fd = f.as_raw_fd();
        let mut data = vec![0xaau8; 300];
        data[100..200].fill(0x42);
        let wrote = Rc::new(RefCell::new(None));
        let w = wrote.clone();
        ring.write_range_at(
            fd,
            keep(f.clone()),
            data,
            100..200,
            50,
            Box::new(move |r, v| *w.borrow_mut() = Some((r, v))),
        );
        assert!(lp.run_until(Duration::from_secs(10), || wrote.borrow().is_some()));
        let (r, back) = wrote.borrow_mut().take().unwrap();
        r.unwrap();
        assert_eq!(back.len(), 300, "the whole buffer comes back");
        assert_eq!(f.metadata().unwrap().len(), 150, "only the window was written");
        // Read [40, 190) of a 150-byte file into buf[10..160]: 10 zero bytes (a hole at the
        // start of the file), the 100 written, then 40 past the end as zeroes.
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        ring.read_range_at(
            fd,
            keep(f.clone()),
            vec![0x77u8; 170],
            10..160,
            40,
            Box::new(move |r, v| *g.borrow_mut() = Some((r, v))),
        );
        assert!(lp.run_until(Duration::from_secs(10), || got.borrow().is_some()));
        let (r, buf) = got.borrow_mut().take().unwrap();
        r.unwrap();
        assert!(
            buf[..10].iter().all(|&b| b == 0x77) && buf[160..].iter().all(|&b| b == 0x77),
            "outside the window"
        );
        assert!(buf[10..20].iter().all(|&b| b == 0));
        assert!(buf[20..120].iter().all(|&b| b == 0x42));
        assert!(buf[120..160].iter().all(|&b| b == 0), "past the end of the file");
        // A window outside the buffer is refused, not a panic.
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        ring.read_range_at(
            fd,
            keep(f),
            vec![0u8; 4],
            2..8,
            0,
            Box::new(move |r, _| *g.borrow_mut() = Some(r)),
        );
        assert_eq!(got.borrow_mut().take().unwrap().unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    /// A file next to the test executable (the build's disk file system, which takes O_DIRECT
    /// whatever the temp directory is), unlinked at once, opened buffered and direct.
    fn two_descriptors(len: usize) -> (Arc<File>, Arc<File>) {
        use std::os::unix::fs::OpenOptionsExt;
        let exe = std::env::current_exe().unwrap();
        let path = exe.parent().unwrap().join(format!("blocksmith-uring-direct-{}", std::process::id()));
        let mut f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        let d = File::options().read(true).write(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        (Arc::new(f), Arc::new(d))
    }

    #[test]
    fn direct_transfers_and_partial_reads() {
        use crate::io::aligned::{AlignedBuf, ALIGN};
        use std::os::unix::fs::FileExt;
        let mut lp = LocalLoop::new().unwrap();
        let ring = for_loop(&lp.sched()).expect("io_uring");
        let (f, d) = two_descriptors(4 * ALIGN);
        // An aligned write through the direct descriptor, read back buffered and direct.
        let mut data = AlignedBuf::new(2 * ALIGN);
        data.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 199) as u8);
        let want = data.to_vec();
        let wrote = Rc::new(RefCell::new(None));
        let w = wrote.clone();
        ring.write_direct_at(
            d.as_raw_fd(),
            keep(d.clone()),
            data,
            ALIGN as u64,
            Box::new(move |r| *w.borrow_mut() = Some(r)),
        );
        assert!(lp.run_until(Duration::from_secs(10), || wrote.borrow().is_some()));
        wrote.borrow_mut().take().unwrap().unwrap();
        let mut plain = vec![0u8; 2 * ALIGN];
        f.read_exact_at(&mut plain, ALIGN as u64).unwrap();
        assert_eq!(plain, want);
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        ring.read_direct_at(
            d.as_raw_fd(),
            keep(d.clone()),
            AlignedBuf::new(2 * ALIGN),
            ALIGN as u64,
            Box::new(move |r, buf| *g.borrow_mut() = Some((r, buf.to_vec()))),
        );
        assert!(lp.run_until(Duration::from_secs(10), || got.borrow().is_some()));
        let (r, buf) = got.borrow_mut().take().unwrap();
        r.unwrap();
        assert_eq!(buf, want);
        // A direct read that meets the end of the file is an error, not a short buffer.
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        ring.read_direct_at(
            d.as_raw_fd(),
            keep(d.clone()),
            AlignedBuf::new(2 * ALIGN),
            3 * ALIGN as u64,
            Box::new(move |r, _| *g.borrow_mut() = Some(r)),
        );
        assert!(lp.run_until(Duration::from_secs(10), || got.borrow().is_some()));
        let r = got.borrow_mut().take().unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // The rest of a read whose start is already in the buffer: the start is left alone.
        let mut start = vec![0xeeu8; 3 * ALIGN];
        start[..100].fill(0x11);
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        ring.read_rest_at(
            f.as_raw_fd(),
            keep(f.clone()),
            start,
            0,
            100,
            Box::new(move |r, buf| *g.borrow_mut() = Some((r, buf))),
        );
        assert!(lp.run_until(Duration::from_secs(10), || got.borrow().is_some()));
        let (r, buf) = got.borrow_mut().take().unwrap();
        r.unwrap();
        assert_eq!(&buf[..100], &[0x11; 100][..]);
        assert_eq!(&buf[100..ALIGN], &vec![0u8; ALIGN - 100][..]);
        assert_eq!(&buf[ALIGN..], &want[..]);
    }

    #[test]
    fn nowait_reads_copy_what_is_cached() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        let (f, _) = two_descriptors(8192);
        f.write_all_at(&[3u8; 8192], 0).unwrap();
        // Just written, so in the page cache.
        let mut buf = vec![0u8; 8192];
        assert_eq!(read_nowait(f.as_fd(), &mut buf, 0).unwrap(), 8192);
        assert_eq!(buf, vec![3u8; 8192]);
        // At the end of the file: nothing to copy.
        assert_eq!(read_nowait(f.as_fd(), &mut buf, 8192).unwrap(), 0);
    }
}
