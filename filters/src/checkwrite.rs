//! The checkwrite filter (nbdkit-checkwrite-filter): check that what a client writes matches
//! what the layer below already holds, without writing anything. Used to verify copying tools:
//! copy an image onto the filter over the same image, and any difference is an error.
//!
//! The export is offered writable with every write-like capability (FUA, flush, trim, zero,
//! fast zero, multi-conn) whatever the layer below can do. A write reads the same range below
//! and compares; zero and trim check that the range reads as zeroes, skipping extents the layer
//! below reports as zero. A mismatch fails the request with EIO. Flush does nothing. A fast zero
//! that would need reading fails with ENOTSUP, so clients fall back to writing (and we compare).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx,
    ReadData, Support, EXTENT_ZERO,
};

use crate::chunked::{check_range, sequence, Step, CHUNK};

pub const SPEC: FilterSpec = FilterSpec {
    name: "checkwrite",
    summary: "check that writes match the existing data instead of writing (EIO if not)",
    params: &[],
    make,
};

fn make(_p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    Ok(Arc::new(CheckwriteFactory))
}

struct CheckwriteFactory;

impl FilterFactory for CheckwriteFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        // The layer below may be writable; nothing is ever written to it.
        Ok(Rc::new(FilterLayer { filter: CheckwriteFilter, next }))
    }
}

struct CheckwriteFilter;

fn mismatch() -> NbdError {
    NbdError::msg(Errno::Io, "checkwrite: data written does not match expected")
}

/// Check that `[offset, offset + count)` reads as zeroes below. Extents reported as zero are
/// taken on trust; the rest is read (or, for a fast zero, refused with ENOTSUP).
fn check_zero(next: &Next, count: u64, offset: u64, fast: bool, done: Done<()>) {
    struct State {
        pos: u64,
        /// Extents described ahead of `pos`: (length, reads as zero).
        ahead: VecDeque<(u64, bool)>,
    }
    let end = offset + count;
    let st = Rc::new(RefCell::new(State { pos: offset, ahead: VecDeque::new() }));
    let next = next.clone();
    sequence(
        move || -> Option<Step> {
            let mut s = st.borrow_mut();
            loop {
                if s.pos >= end {
                    return None;
                }
                let Some(&(len, zero)) = s.ahead.front() else {
                    // Ask what the next stretch is.
                    let (next, st, at) = (next.clone(), st.clone(), s.pos);
                    return Some(Box::new(move |k: Done<()>| {
                        next.extents(
                            end - at,
                            at,
                            Flags::NONE,
                            k.map(move |r: Result<Extents, NbdError>| {
                                let e = r?;
                                let mut s = st.borrow_mut();
                                let mut room = end - at;
                                for x in e.0 {
                                    let len = x.length.min(room);
                                    if len > 0 {
                                        s.ahead.push_back((len, x.flags & EXTENT_ZERO != 0));
                                    }
                                    room -= len;
                                }
                                if s.ahead.is_empty() {
                                    // Said nothing useful: treat the rest as data to read.
                                    s.ahead.push_back((end - at, false));
                                }
                                Ok(())
                            }),
                        )
                    }));
                };
                if zero {
                    s.pos += len;
                    s.ahead.pop_front();
                    continue;
                }
                if fast {
                    return Some(Box::new(|k: Done<()>| {
                        k.err(NbdError::msg(
                            Errno::NotSup,
                            "checkwrite: checking this zero request needs reads",
                        ))
                    }));
                }
                let (at, n) = (s.pos, len.min(CHUNK));
                s.pos += n;
                if n == len {
                    s.ahead.pop_front();
                } else if let Some(front) = s.ahead.front_mut() {
                    front.0 -= n;
                }
                let next = next.clone();
                return Some(Box::new(move |k: Done<()>| {
                    check_range(
                        &next,
                        at,
                        n,
                        |_, b| if b.iter().all(|x| *x == 0) { Ok(()) } else { Err(mismatch()) },
                        k,
                    )
                }));
            }
        },
        done,
    )
}

impl Filter for CheckwriteFilter {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        ExportInfo {
            can_write: true,
            can_flush: true,
            fua: Support::Native,
            can_trim: true,
            zero: Support::Native,
            can_fast_zero: true,
            can_multi_conn: true,
            ..below
        }
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, _flags: Flags, done: Done<()>) {
        let data = Rc::new(data);
        check_range(
            next,
            offset,
            data.len() as u64,
            move |o, got| {
                let i = (o - offset) as usize;
                if data[i..i + got.len()] == *got {
                    Ok(())
                } else {
                    Err(mismatch())
                }
            },
            done,
        )
    }

    fn flush(&self, _next: &Next, _flags: Flags, done: Done<()>) {
        // Nothing was written, so there is nothing to make durable.
        done.ok(())
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        check_zero(next, count, offset, false, done)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        check_zero(next, count, offset, flags.contains(Flags::FAST_ZERO), done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, open, wait, Ram, DATA_END};
    use blocksmith_core::sched::SimScheduler;

    #[test]
    fn matching_writes_succeed_and_nothing_is_written() {
        let sim = SimScheduler::new();
        // Read-only below, and only the first DATA_END bytes hold data; the rest reads as zero.
        let ram = Ram::with(3 << 20, |r| {
            r.info.can_write = false;
            r.data.get_mut()[DATA_END as usize..].fill(0);
        });
        let top = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        let info = top.info();
        assert!(info.can_write && info.can_trim && info.can_flush && info.can_multi_conn);

        let same = ram.data.borrow()[100..5000].to_vec();
        wait(&sim, |d| top.pwrite(same, 100, Flags::FUA, d)).unwrap();
        let mut other = ram.data.borrow()[100..200].to_vec();
        other[50] ^= 1;
        let e = wait(&sim, |d| top.pwrite(other, 100, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::Io);
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert!(
            ram.calls().iter().all(|c| c.starts_with("pread") || c.starts_with("extents")),
            "{:?}",
            ram.calls()
        );
    }

    #[test]
    fn zero_and_trim_check_for_zeroes_using_extents() {
        let sim = SimScheduler::new();
        let ram = Ram::with(3 << 20, |r| r.data.get_mut()[DATA_END as usize..].fill(0));
        let top = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        // The hole past DATA_END is known zero: checked without reading.
        wait(&sim, |d| top.zero(2 << 20, DATA_END, Flags::MAY_TRIM, d)).unwrap();
        wait(&sim, |d| top.zero(1 << 20, DATA_END, Flags::FAST_ZERO, d)).unwrap();
        assert!(ram.calls().iter().all(|c| c.starts_with("extents")), "{:?}", ram.calls());
        // Data that is not zero: EIO, and ENOTSUP for a fast zero (reading is not fast).
        assert_eq!(wait(&sim, |d| top.trim(8192, 0, Flags::NONE, d)).unwrap_err().errno, Errno::Io);
        assert_eq!(wait(&sim, |d| top.zero(10, 0, Flags::FAST_ZERO, d)).unwrap_err().errno, Errno::NotSup);
        // Data that happens to be zero is read and accepted.
        ram.data.borrow_mut()[..DATA_END as usize].fill(0);
        wait(&sim, |d| top.zero(DATA_END + 100, 0, Flags::NONE, d)).unwrap();
        assert!(ram.calls().iter().any(|c| c == &format!("pread {DATA_END}@0")));
    }
}
