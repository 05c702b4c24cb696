//! The output queue: reply bytes waiting for the socket, kept as segments so headers and
//! payload buffers go out in one vectored write without copying the payload.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use crate::budget::Budget;
use crate::layer::{Lent, SharedBytes};

/// Small header bytes are appended to the last owned segment up to this size, so a burst of
/// small replies needs few iovecs.
const COALESCE_LIMIT: usize = 64 * 1024;
/// A new segment for encoded bytes starts with this much room (a structured reply's chunk
/// header is 20 bytes, an extended one 32).
const TAIL_CAPACITY: usize = 128;

enum Buf {
    /// Bytes owned by the queue: headers, option replies, or a whole READ buffer.
    Own(Vec<u8>),
    /// Part of a READ buffer split into several data chunks around holes.
    Shared(Arc<Vec<u8>>),
    /// Bytes a layer lent (its own storage; see `layer::lent`).
    Lent(SharedBytes),
    /// Zeroes, from [`ZEROS`].
    Zeros,
    /// A file range from `base` (the segment's start and end are relative to it), sent with
    /// `sendfile` by the driver; never part of an iovec.
    File(Arc<std::fs::File>, u64),
}

/// Written header segments kept per loop thread for the next replies' headers (each
/// [`TAIL_CAPACITY`] bytes; about 36 KiB in all with the allocator's own overhead). A READ reply
/// from lent pieces needs a header segment of its own, since nothing may be appended after the
/// lent data; recycling them keeps the request path free of allocations. 256 covers the replies
/// one loop has queued and unwritten at a time in a run of 1000 clients; past it a segment is
/// simply allocated.
pub const MAX_SPARE_HEADERS: usize = 256;

thread_local! {
    static SPARE_HEADERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty vector for encoded bytes, recycled when one is spare.
fn header_buf() -> Vec<u8> {
    SPARE_HEADERS.with(|s| s.borrow_mut().pop()).unwrap_or_else(|| Vec::with_capacity(TAIL_CAPACITY))
}

/// Keep a written header segment's vector for [`header_buf`], if there is room.
fn give_header_buf(mut v: Vec<u8>) {
    v.clear();
    SPARE_HEADERS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < MAX_SPARE_HEADERS {
            s.push(v);
        }
    });
}

/// Zero bytes for unallocated ranges read without structured replies.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

struct Segment {
    buf: Buf,
    /// Unwritten range of `buf`.
    start: usize,
    end: usize,
    /// Budget bytes to release once this segment (and so every reply queued before it) has
    /// been written.
    release: usize,
    /// Made by `with_tail` for small encoded bytes; payload buffers are never appended to.
    appendable: bool,
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match &self.buf {
            Buf::Own(v) => &v[self.start..self.end],
            Buf::Shared(a) => &a[self.start..self.end],
            Buf::Lent(a) => &a[self.start..self.end],
            Buf::Zeros => &ZEROS[self.start..self.end],
            // `fill` stops before a file segment; nothing else asks for its bytes.
            Buf::File(..) => &[],
        }
    }
}

/// A written payload buffer goes back to the pool (a shared one once its last chunk is out), a
/// header segment's vector to the spare headers.
fn recycle(buf: Buf, appendable: bool) {
    match buf {
        Buf::Own(v) if appendable && v.capacity() == TAIL_CAPACITY => give_header_buf(v),
        Buf::Own(v) => crate::bufpool::give(v),
        Buf::Shared(a) => {
            if let Ok(v) = Arc::try_unwrap(a) {
                crate::bufpool::give(v)
            }
        }
        Buf::Lent(_) | Buf::Zeros | Buf::File(..) => {}
    }
}

#[derive(Default)]
pub(super) struct OutQueue {
    segs: VecDeque<Segment>,
    bytes: usize,
}

impl OutQueue {
    /// Unwritten bytes queued.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Append encoded bytes with `f`, reusing the last owned segment when it is still small and
    /// carries no release marker (appending after a marker would delay that release).
    pub(super) fn with_tail(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let reuse = matches!(
            self.segs.back(),
            Some(Segment { buf: Buf::Own(v), release: 0, appendable: true, .. }) if v.len() < COALESCE_LIMIT
        );
        if !reuse {
            // Room for a few headers at once: encoding one then never reallocates.
            let buf = Buf::Own(header_buf());
            self.segs.push_back(Segment { buf, start: 0, end: 0, release: 0, appendable: true });
        }
        if let Some(Segment { buf: Buf::Own(v), end, .. }) = self.segs.back_mut() {
            let before = v.len();
            f(v);
            let added = v.len() - before;
            *end = v.len();
            self.bytes += added;
        }
    }

    /// Queue a whole buffer without copying it.
    pub(super) fn push_vec(&mut self, v: Vec<u8>) {
        if v.is_empty() {
            return;
        }
        self.bytes += v.len();
        let end = v.len();
        self.segs.push_back(Segment { buf: Buf::Own(v), start: 0, end, release: 0, appendable: false });
    }

    /// Queue `a[start..end]` without copying it.
    pub(super) fn push_shared(&mut self, a: &Arc<Vec<u8>>, start: usize, end: usize) {
        debug_assert!(start <= end && end <= a.len());
        if start == end {
            return;
        }
        self.bytes += end - start;
        let buf = Buf::Shared(a.clone());
        self.segs.push_back(Segment { buf, start, end, release: 0, appendable: false });
    }

    /// Queue a lent piece without copying it.
    pub(super) fn push_lent(&mut self, piece: Lent) {
        match piece {
            Lent::Bytes { page, start, end } => {
                debug_assert!(start <= end && end <= page.len());
                if start >= end {
                    return;
                }
                self.bytes += end - start;
                self.segs.push_back(Segment {
                    buf: Buf::Lent(page),
                    start,
                    end,
                    release: 0,
                    appendable: false,
                });
            }
            Lent::File { file, offset, len } => {
                if len == 0 {
                    return;
                }
                self.bytes += len;
                let buf = Buf::File(file, offset);
                self.segs.push_back(Segment { buf, start: 0, end: len, release: 0, appendable: false });
            }
            Lent::Zero(mut n) => {
                while n > 0 {
                    let take = n.min(ZEROS.len());
                    self.bytes += take;
                    self.segs.push_back(Segment {
                        buf: Buf::Zeros,
                        start: 0,
                        end: take,
                        release: 0,
                        appendable: false,
                    });
                    n -= take;
                }
            }
        }
    }

    /// Release `n` budget bytes once everything queued so far has been written.
    pub(super) fn mark_release(&mut self, n: usize, budget: &Budget) {
        if n == 0 {
            return;
        }
        match self.segs.back_mut() {
            Some(s) => s.release += n,
            None => budget.release(n),
        }
    }

    /// Iovecs for the queued bytes up to the first file segment (which goes by `sendfile`).
    pub(super) fn fill<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut i = 0;
        for s in &self.segs {
            if i == iov.len() || matches!(s.buf, Buf::File(..)) {
                break;
            }
            if s.start < s.end {
                iov[i] = IoSlice::new(s.bytes());
                i += 1;
            }
        }
        i
    }

    /// The file range at the front of the queue, if the next bytes to send are one: the file,
    /// the offset in it, and how many bytes.
    pub(super) fn front_file(&self) -> Option<(&std::fs::File, u64, usize)> {
        let s = self.segs.iter().find(|s| s.start < s.end)?;
        match &s.buf {
            Buf::File(f, base) => Some((f, base + s.start as u64, s.end - s.start)),
            _ => None,
        }
    }

    /// `n` bytes were written: drop finished segments and release their budget.
    pub(super) fn consume(&mut self, mut n: usize, budget: &Budget) {
        debug_assert!(n <= self.bytes, "wrote {n} bytes but only {} were queued", self.bytes);
        n = n.min(self.bytes);
        self.bytes -= n;
        while let Some(s) = self.segs.front_mut() {
            let avail = s.end - s.start;
            if n < avail {
                s.start += n;
                break;
            }
            n -= avail;
            let release = s.release;
            if let Some(done) = self.segs.pop_front() {
                recycle(done.buf, done.appendable);
            }
            budget.release(release);
        }
    }

    /// Drop everything unwritten (abort, drop) and give its budget back.
    pub(super) fn clear(&mut self, budget: &Budget) {
        for s in self.segs.drain(..) {
            budget.release(s.release);
        }
        self.bytes = 0;
    }
}
