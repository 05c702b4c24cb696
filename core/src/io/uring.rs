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

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU8, Ordering};

use io_uring::{opcode, types, IoUring};
use slab::Slab;

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
/// Completion of a write or sync.
pub type UnitDone = Box<dyn FnOnce(io::Result<()>)>;

enum Kind {
    Read { offset: u64, filled: usize, done: ReadDone },
    Write { offset: u64, written: usize, done: UnitDone },
    Fsync { done: UnitDone },
}

/// An operation the kernel may be using: its buffer must not move or be freed until its
/// completion has been reaped, so it lives here until then.
struct Op {
    fd: RawFd,
    buf: Vec<u8>,
    /// Keeps the file (and so `fd`) open while the kernel uses it.
    _keep: Box<dyn Any>,
    kind: Kind,
}

pub struct Uring {
    ring: RefCell<IoUring>,
    ops: RefCell<Slab<Op>>,
    sched: Sched,
    submit_pending: Cell<bool>,
    watch: Cell<Option<WatchId>>,
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
        let fd = ring.as_raw_fd();
        let u = Rc::new(Uring {
            ring: RefCell::new(ring),
            ops: RefCell::new(Slab::new()),
            sched: sched.clone(),
            submit_pending: Cell::new(false),
            watch: Cell::new(None),
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
    pub fn read_exact_at(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Box<dyn Any>,
        buf: Vec<u8>,
        offset: u64,
        done: ReadDone,
    ) {
        if buf.is_empty() {
            return done(Ok(()), buf);
        }
        self.start(Op { fd, buf, _keep: keep, kind: Kind::Read { offset, filled: 0, done } });
    }

    /// Write all of `data` at `offset`.
    pub fn write_all_at(
        self: &Rc<Self>,
        fd: RawFd,
        keep: Box<dyn Any>,
        data: Vec<u8>,
        offset: u64,
        done: UnitDone,
    ) {
        if data.is_empty() {
            return done(Ok(()));
        }
        self.start(Op { fd, buf: data, _keep: keep, kind: Kind::Write { offset, written: 0, done } });
    }

    /// fdatasync.
    pub fn datasync(self: &Rc<Self>, fd: RawFd, keep: Box<dyn Any>, done: UnitDone) {
        self.start(Op { fd, buf: Vec::new(), _keep: keep, kind: Kind::Fsync { done } });
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
            match &op.kind {
                Kind::Read { offset, filled, .. } => {
                    let rest = &mut op.buf[*filled..];
                    let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
                    opcode::Read::new(fd, rest.as_mut_ptr(), len).offset(offset + *filled as u64).build()
                }
                Kind::Write { offset, written, .. } => {
                    let rest = &op.buf[*written..];
                    let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
                    opcode::Write::new(fd, rest.as_ptr(), len).offset(offset + *written as u64).build()
                }
                Kind::Fsync { .. } => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            }
            .user_data(key as u64)
        };
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the entry points into `op.buf`, a heap buffer owned by the op table entry
        // `key`, which stays in the table (neither moved nor freed: the Vec's heap block does
        // not move when the table grows) until this entry's completion is reaped in `reap`,
        // and on drop we wait for every outstanding completion first. The fd is kept open by
        // `_keep` for as long.
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
        let op = self.ops.borrow_mut().try_remove(key);
        if let Some(op) = op {
            match op.kind {
                Kind::Read { done, .. } => done(Err(e), op.buf),
                Kind::Write { done, .. } | Kind::Fsync { done } => done(Err(e)),
            }
        }
    }

    /// Run the callbacks of every completion posted so far.
    fn reap(self: &Rc<Self>) {
        loop {
            let batch: Vec<(u64, i32)> = {
                let mut ring = self.ring.borrow_mut();
                ring.completion().map(|c| (c.user_data(), c.result())).collect()
            };
            if batch.is_empty() {
                return;
            }
            for (user, res) in batch {
                self.complete(user as usize, res);
            }
        }
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
        let more = {
            let mut ops = self.ops.borrow_mut();
            let Some(op) = ops.get_mut(key) else { return };
            match &mut op.kind {
                Kind::Read { filled, .. } => {
                    if n == 0 {
                        None
                    } else {
                        *filled += n;
                        Some(*filled < op.buf.len())
                    }
                }
                Kind::Write { written, .. } => {
                    *written += n;
                    Some(*written < op.buf.len())
                }
                Kind::Fsync { .. } => Some(false),
            }
        };
        match more {
            None => self.fail(key, io::Error::from(io::ErrorKind::UnexpectedEof)),
            Some(true) => self.push(key),
            Some(false) => {
                let op = self.ops.borrow_mut().try_remove(key);
                if let Some(op) = op {
                    match op.kind {
                        Kind::Read { done, .. } => done(Ok(()), op.buf),
                        Kind::Write { done, .. } | Kind::Fsync { done } => done(Ok(())),
                    }
                }
            }
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

/// The kind of entry a backend needs to keep its file alive in [`Uring`] calls.
pub fn keep<T: Any>(v: T) -> Box<dyn Any> {
    Box::new(v)
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
}
