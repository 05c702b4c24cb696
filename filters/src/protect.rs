//! The protect filter (nbdkit-protect-filter): write-protect byte ranges of the layer below
//! (`protect=START-END`, inclusive, repeatable; `~START-END` protects everything else).
//!
//! As in nbdkit, a write that touches a protected range is allowed only if it would not change
//! it: the protected bytes are read from the layer below and compared with the data (for a
//! write) or with zeroes (for zero and trim). Any difference fails the whole request with EPERM
//! and nothing is written. Rewriting identical data, as copying tools do, succeeds.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::{parse_size, Params};
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec, ReadData,
};

use crate::chunked::{check_range, sequence, Step};

pub const SPEC: FilterSpec =
    FilterSpec { name: "protect", summary: "write-protect ranges of bytes", params: PARAMS, make };

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "protect",
    help: "Protect bytes START-END (inclusive), e.g. 0-511. Either end may be omitted\n\
           (START- to the end, -END from 0). ~START-END protects all but that range.\n\
           Repeat to protect several ranges. Writes that would change them fail with EPERM.",
}];

/// The largest offset a range may name: protect ranges end at 2^63-1, as nbdkit's do.
const END: u64 = i64::MAX as u64;

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let mut ranges = Vec::new();
    for v in p.take_all("protect") {
        parse_range(&v, &mut ranges).map_err(|m| ConfigError::new(format!("protect: {m}")))?;
    }
    Ok(Arc::new(ProtectFactory { ranges: Arc::new(merge(ranges)) }))
}

/// A number: decimal, 0x-prefixed hex, or a size with a suffix (1M).
fn parse_offset(s: &str, whole: &str) -> Result<u64, String> {
    let t = s.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => parse_size(t).ok(),
    };
    v.ok_or_else(|| format!("cannot parse '{t}' in range '{whole}'"))
}

/// Parse `START-END` (or `~START-END`) into inclusive ranges.
fn parse_range(value: &str, out: &mut Vec<(u64, u64)>) -> Result<(), String> {
    let (negate, body) = match value.strip_prefix('~') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let Some((a, b)) = body.split_once('-') else {
        return Err(format!("cannot parse range, missing '-': {value}"));
    };
    let start = if a.trim().is_empty() { 0 } else { parse_offset(a, value)? };
    let end = if b.trim().is_empty() { END } else { parse_offset(b, value)?.min(END) };
    if end < start {
        return Err(format!("invalid range, end < start: {value}"));
    }
    if !negate {
        out.push((start, end));
    } else {
        if start > 0 {
            out.push((0, start - 1));
        }
        if end < END {
            out.push((end + 1, END));
        }
    }
    Ok(())
}

/// Sort and combine overlapping and adjacent ranges.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

struct ProtectFactory {
    /// Sorted, disjoint, non-adjacent inclusive ranges.
    ranges: Arc<Vec<(u64, u64)>>,
}

impl FilterFactory for ProtectFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        Ok(Rc::new(FilterLayer { filter: ProtectFilter { ranges: self.ranges.clone() }, next }))
    }
}

struct ProtectFilter {
    ranges: Arc<Vec<(u64, u64)>>,
}

impl ProtectFilter {
    /// The protected parts of `[offset, offset + count)`, as (offset, length).
    fn protected(&self, count: u64, offset: u64) -> Vec<(u64, u64)> {
        if count == 0 {
            return Vec::new();
        }
        let last = offset + (count - 1);
        // Ranges are sorted: skip those that end before the request.
        let first = self.ranges.partition_point(|r| r.1 < offset);
        self.ranges[first..]
            .iter()
            .take_while(|r| r.0 <= last)
            .map(|&(s, e)| {
                let (a, b) = (s.max(offset), e.min(last));
                (a, b - a + 1)
            })
            .collect()
    }

    /// Check that the protected parts of the request would not change: they must read back as
    /// `expected(offset_in_request)` (the data of a write), or as zeroes if there is no data.
    fn check(&self, next: &Next, offset: u64, count: u64, data: Option<Rc<Vec<u8>>>, done: Done<()>) {
        let mut parts = self.protected(count, offset).into_iter();
        let next = next.clone();
        sequence(
            move || {
                let (at, len) = parts.next()?;
                let (next, data) = (next.clone(), data.clone());
                Some(Box::new(move |k: Done<()>| {
                    check_range(
                        &next,
                        at,
                        len,
                        move |o, got| {
                            let same = match &data {
                                Some(d) => {
                                    let i = (o - offset) as usize;
                                    d[i..i + got.len()] == *got
                                }
                                None => got.iter().all(|b| *b == 0),
                            };
                            if same {
                                Ok(())
                            } else {
                                Err(NbdError::msg(
                                    Errno::Perm,
                                    format!(
                                        "protect: write to protected range {at}-{} refused",
                                        at + len - 1
                                    ),
                                ))
                            }
                        },
                        k,
                    )
                }) as Step)
            },
            done,
        )
    }
}

impl Filter for ProtectFilter {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let count = data.len() as u64;
        if self.protected(count, offset).is_empty() {
            return next.pwrite(data, offset, flags, done);
        }
        let data = Rc::new(data);
        let (n2, d2) = (next.clone(), data.clone());
        self.check(
            next,
            offset,
            count,
            Some(d2),
            Done::new(move |r: Result<(), NbdError>| match r {
                Ok(()) => {
                    // The checks have finished and dropped their reference.
                    let data = Rc::try_unwrap(data).unwrap_or_else(|rc| (*rc).clone());
                    n2.pwrite(data, offset, flags, done)
                }
                Err(e) => done.err(e),
            }),
        )
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let n2 = next.clone();
        self.check(
            next,
            offset,
            count,
            None,
            Done::new(move |r: Result<(), NbdError>| match r {
                Ok(()) => n2.zero(count, offset, flags, done),
                Err(e) => done.err(e),
            }),
        )
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let n2 = next.clone();
        self.check(
            next,
            offset,
            count,
            None,
            Done::new(move |r: Result<(), NbdError>| match r {
                Ok(()) => n2.trim(count, offset, flags, done),
                Err(e) => done.err(e),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn ranges(values: &[&str]) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for s in values {
            parse_range(s, &mut v).unwrap();
        }
        merge(v)
    }

    #[test]
    fn ranges_parse_and_merge() {
        assert_eq!(ranges(&["0-511"]), [(0, 511)]);
        assert_eq!(ranges(&["1M-"]), [(1 << 20, END)]);
        assert_eq!(ranges(&["-0x1ff"]), [(0, 511)]);
        assert_eq!(ranges(&["~1000-1999"]), [(0, 999), (2000, END)]);
        assert_eq!(ranges(&["~0-"]), []);
        assert_eq!(ranges(&["100-200", "0-99", "150-300", "302-400"]), [(0, 300), (302, 400)]);
        let mut v = Vec::new();
        assert!(parse_range("5", &mut v).unwrap_err().contains("missing '-'"));
        assert!(parse_range("9-5", &mut v).unwrap_err().contains("end < start"));
        assert!(parse_range("x-5", &mut v).unwrap_err().contains("cannot parse 'x'"));
    }

    #[test]
    fn only_changes_to_protected_bytes_are_refused() {
        let sim = SimScheduler::new();
        let ram = Ram::new(8192);
        let top = open(&configure(&SPEC, &[("protect", "1000-1999")]), &cx(&sim), ram.clone()).unwrap();
        // Outside: straight through, no read.
        wait(&sim, |d| top.pwrite(vec![7; 100], 0, Flags::NONE, d)).unwrap();
        assert_eq!(ram.calls(), ["pwrite 100@0 flags=0"]);
        // Overlapping with different data: refused, nothing written.
        let e = wait(&sim, |d| top.pwrite(vec![7; 100], 950, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::Perm);
        assert_eq!(ram.calls()[1..], ["pread 50@1000"]);
        // Overlapping, but the protected bytes are unchanged: allowed.
        let mut same = vec![9u8; 50];
        same.extend_from_slice(&ram.data.borrow()[1000..1050]);
        wait(&sim, |d| top.pwrite(same, 950, Flags::FUA, d)).unwrap();
        assert_eq!(&ram.data.borrow()[950..1000], &[9; 50]);
        // Zero and trim need the range to read as zeroes already.
        assert_eq!(wait(&sim, |d| top.zero(10, 1995, Flags::NONE, d)).unwrap_err().errno, Errno::Perm);
        assert_eq!(wait(&sim, |d| top.trim(4096, 0, Flags::NONE, d)).unwrap_err().errno, Errno::Perm);
        ram.data.borrow_mut()[1000..2000].fill(0);
        wait(&sim, |d| top.zero(4096, 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.trim(4096, 0, Flags::NONE, d)).unwrap();
    }

    #[test]
    fn protected_parts_of_a_request() {
        let f = ProtectFilter { ranges: Arc::new(ranges(&["10-19", "30-39", "100-"])) };
        assert_eq!(f.protected(5, 0), []);
        assert_eq!(f.protected(100, 0), [(10, 10), (30, 10)]);
        assert_eq!(f.protected(10, 15), [(15, 5)]);
        assert_eq!(f.protected(10, 95), [(100, 5)]);
        assert_eq!(f.protected(1, 39), [(39, 1)]);
        assert_eq!(f.protected(1, 40), []);
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert_eq!(make_err(&SPEC, &[("protect", "10")]), "protect: cannot parse range, missing '-': 10");
        assert_eq!(make_err(&SPEC, &[("protect", "10-5")]), "protect: invalid range, end < start: 10-5");
    }
}
