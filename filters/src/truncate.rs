//! The truncate filter (nbdkit-truncate-filter): change the size of the layer below, by a fixed
//! size (`truncate=`) and/or rounding it (`round-up=`, `round-down=`), applied in that order.
//!
//! Growing: the bytes past the real end read as zeroes, report as a hole, and accept writes of
//! zeroes (and zero/trim requests) that change nothing; writing anything else there fails with
//! ENOSPC, as nbdkit does. Shrinking simply hides the tail.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Lent, Next,
    OpenCx, ParamSpec, ReadData, EXTENT_HOLE, EXTENT_ZERO,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "truncate",
    summary: "truncate, extend or round the size of the layer below",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "truncate",
        help: "The new size, e.g. 1G. Past the real end the disk reads as zeroes and only\n\
               writes of zeroes succeed (others fail with ENOSPC).",
    },
    ParamSpec { name: "round-up", help: "Round the size up to a multiple of N (a power of 2)." },
    ParamSpec { name: "round-down", help: "Round the size down to a multiple of N (a power of 2)." },
];

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let err = |e: ConfigError| ConfigError::new(format!("truncate: {}", e.0));
    let truncate = p.take_size("truncate").map_err(err)?;
    let round_up = round_param(p, "round-up")?;
    let round_down = round_param(p, "round-down")?;
    Ok(Arc::new(TruncateFactory { truncate, round_up, round_down }))
}

/// `round-up=` and `round-down=`: a size, non-zero, at most 2^32-1 and a power of two, as nbdkit.
fn round_param(p: &mut Params, key: &str) -> Result<Option<u64>, ConfigError> {
    let Some(v) = p.take_size(key).map_err(|e| ConfigError::new(format!("truncate: {}", e.0)))? else {
        return Ok(None);
    };
    let problem = if v == 0 {
        Some("must be > 0")
    } else if v > u64::from(u32::MAX) {
        Some("is too large (at most 4G-1)")
    } else if !v.is_power_of_two() {
        Some("must be a power of 2")
    } else {
        None
    };
    match problem {
        Some(why) => Err(ConfigError::new(format!("truncate: {key}: {why} (got {v})"))),
        None => Ok(Some(v)),
    }
}

struct TruncateFactory {
    truncate: Option<u64>,
    round_up: Option<u64>,
    round_down: Option<u64>,
}

impl TruncateFactory {
    /// The new size for a layer below of `real` bytes.
    fn size(&self, real: u64) -> Result<u64, NbdError> {
        let mut size = self.truncate.unwrap_or(real);
        if let Some(n) = self.round_up {
            size = size.checked_next_multiple_of(n).filter(|s| *s <= i64::MAX as u64).ok_or_else(|| {
                NbdError::inval(format!("cannot round size {size} up to a multiple of {n}"))
            })?;
        }
        if let Some(n) = self.round_down {
            size -= size % n;
        }
        Ok(size)
    }
}

impl FilterFactory for TruncateFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        // Sizes never change during a connection, so both are fixed at open, as nbdkit does.
        let real = next.info().size;
        let size = self.size(real)?;
        Ok(Rc::new(FilterLayer { filter: TruncateFilter { real, size }, next }))
    }
}

struct TruncateFilter {
    /// The size of the layer below.
    real: u64,
    /// The size we serve.
    size: u64,
}

impl TruncateFilter {
    /// How many of `count` bytes from `offset` exist below (0 if the request is all past the end).
    fn below(&self, count: u64, offset: u64) -> u64 {
        self.real.saturating_sub(offset).min(count)
    }
}

impl Filter for TruncateFilter {
    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        ExportInfo {
            size: self.size,
            // The tail past the real end is a hole we describe ourselves, and zeroing it is
            // instant, so both are offered whatever the layer below does.
            can_extents: true,
            can_fast_zero: below.zero != blocksmith_core::layer::Support::None,
            ..below
        }
    }

    fn pread(&self, next: &Next, mut buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let count = buf.len() as u64;
        let n = self.below(count, offset);
        if n == count {
            return next.pread(buf, offset, flags, done);
        }
        if n == 0 {
            buf.fill(0);
            return done.ok(buf);
        }
        let len = buf.len();
        buf.truncate(n as usize);
        next.pread(
            buf,
            offset,
            flags,
            done.map(move |r: Result<Vec<u8>, NbdError>| {
                r.map(|mut b| {
                    b.resize(len, 0);
                    b
                })
            }),
        )
    }

    /// As `pread`, keeping what the layer below lends: the part past its end is a hole.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        let n = self.below(count as u64, offset) as usize;
        if n == count {
            return next.pread_lent(count, offset, flags, done);
        }
        if n == 0 {
            return done.ok(ReadData::one(Lent::Zero(count)));
        }
        let tail = count - n;
        next.pread_lent(
            n,
            offset,
            flags,
            done.map(move |r: Result<ReadData, NbdError>| {
                r.map(|d| match d {
                    ReadData::Lent(mut pieces) => {
                        pieces.push(Lent::Zero(tail));
                        ReadData::Lent(pieces)
                    }
                    ReadData::Buf(mut b) => {
                        b.resize(n + tail, 0);
                        ReadData::Buf(b)
                    }
                })
            }),
        )
    }

    fn pwrite(&self, next: &Next, mut data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let count = data.len() as u64;
        let n = self.below(count, offset);
        if n < count {
            // Checked before anything is written, so a refused write changes nothing (nbdkit
            // writes the part that exists first).
            if data[n as usize..].iter().any(|b| *b != 0) {
                return done
                    .err(NbdError::msg(Errno::NoSpc, "truncate: write beyond end of underlying device"));
            }
            if n == 0 {
                return done.ok(());
            }
            data.truncate(n as usize);
        }
        next.pwrite(data, offset, flags, done)
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.below(count, offset) {
            0 => done.ok(()),
            n => next.trim(n, offset, flags, done),
        }
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.below(count, offset) {
            0 => done.ok(()),
            // FAST_ZERO goes down with it: the shim below refuses it if the layer cannot.
            n => next.zero(n, offset, flags, done),
        }
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        let n = self.below(count, offset);
        if n == 0 {
            let mut e = Extents::new();
            e.push(count, EXTENT_HOLE | EXTENT_ZERO);
            return done.ok(e);
        }
        let tail = count - n;
        let req_one = flags.contains(Flags::REQ_ONE);
        next.extents(
            n,
            offset,
            flags,
            done.map(move |r: Result<Extents, NbdError>| {
                r.map(|mut e| {
                    // The layer below described up to the real end: the rest is our hole.
                    if tail > 0 && !req_one && e.total() >= n {
                        e.push(tail, EXTENT_HOLE | EXTENT_ZERO);
                    }
                    e
                })
            }),
        )
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.below(count, offset) {
            0 => done.ok(()),
            n => next.cache(n, offset, flags, done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::layer::Extent;
    use blocksmith_core::sched::SimScheduler;

    fn size_of(params: &[(&str, &str)], below: usize) -> Result<u64, NbdError> {
        let sim = SimScheduler::new();
        open(&configure(&SPEC, params), &cx(&sim), Ram::new(below)).map(|l| l.info().size)
    }

    #[test]
    fn sizes_follow_nbdkit() {
        assert_eq!(size_of(&[], 1000).unwrap(), 1000);
        assert_eq!(size_of(&[("truncate", "4k")], 1000).unwrap(), 4096);
        assert_eq!(size_of(&[("truncate", "100")], 1000).unwrap(), 100);
        assert_eq!(size_of(&[("round-up", "512")], 1000).unwrap(), 1024);
        assert_eq!(size_of(&[("round-down", "512")], 1000).unwrap(), 512);
        assert_eq!(size_of(&[("round-up", "512")], 1024).unwrap(), 1024);
        // Applied in order: truncate, then round up, then round down.
        assert_eq!(
            size_of(&[("truncate", "3000"), ("round-up", "1k"), ("round-down", "2k")], 10).unwrap(),
            2048
        );
        let huge = (i64::MAX as u64 - 10).to_string();
        let e = size_of(&[("truncate", &huge), ("round-up", "1k")], 10).unwrap_err();
        assert!(e.message.unwrap().contains("cannot round size"));
    }

    #[test]
    fn growing_reads_zeroes_and_accepts_only_zero_writes_past_the_end() {
        let sim = SimScheduler::new();
        let ram = Ram::new(1000);
        let top = open(&configure(&SPEC, &[("truncate", "4096")]), &cx(&sim), ram.clone()).unwrap();
        let b = wait(&sim, |d| top.pread(vec![9; 100], 950, Flags::NONE, d)).unwrap();
        assert_eq!(&b[..50], &ram.data.borrow()[950..1000]);
        assert!(b[50..].iter().all(|x| *x == 0));
        let b = wait(&sim, |d| top.pread(vec![9; 100], 2000, Flags::NONE, d)).unwrap();
        assert_eq!(b, vec![0; 100]);
        // Client reads (lent or not below) get the same bytes, the tail as a hole.
        let d = wait(&sim, |d| top.pread_lent(100, 950, Flags::NONE, d)).unwrap();
        assert_eq!(d.into_vec().unwrap()[..], [&ram.data.borrow()[950..1000], &[0u8; 50][..]].concat());
        let d = wait(&sim, |d| top.pread_lent(100, 2000, Flags::NONE, d)).unwrap();
        assert!(matches!(d, ReadData::Lent(ref p) if matches!(p.as_slice(), [Lent::Zero(100)])));

        let mut w = vec![7u8; 50];
        w.extend([0u8; 50]);
        wait(&sim, |d| top.pwrite(w, 950, Flags::FUA, d)).unwrap();
        assert_eq!(&ram.data.borrow()[950..1000], &[7; 50]);
        wait(&sim, |d| top.pwrite(vec![0; 100], 3000, Flags::NONE, d)).unwrap();
        let calls = ram.calls().len();
        let e = wait(&sim, |d| top.pwrite(vec![1; 100], 980, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NoSpc);
        assert_eq!(ram.calls().len(), calls, "a refused write writes nothing");
        assert_eq!(&ram.data.borrow()[980..1000], &[7; 20]);

        wait(&sim, |d| top.zero(2000, 900, Flags::MAY_TRIM, d)).unwrap();
        wait(&sim, |d| top.trim(1000, 3000, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.cache(3000, 500, Flags::NONE, d)).unwrap();
        let zero_fast = wait(&sim, |d| top.zero(100, 3000, Flags::FAST_ZERO, d));
        assert!(zero_fast.is_ok(), "zeroing the tail is fast");
        assert!(top.info().can_fast_zero);
        assert_eq!(
            ram.calls()[calls..],
            ["zero 100@900 flags=2".to_string(), "cache 500@500".to_string()],
            "only the part that exists reaches the layer below"
        );
    }

    #[test]
    fn extents_add_the_hole_past_the_end() {
        let sim = SimScheduler::new();
        // Ram reports data for its first 4096 bytes, then a hole.
        let ram = Ram::new(6000);
        let top = open(&configure(&SPEC, &[("truncate", "10000")]), &cx(&sim), ram.clone()).unwrap();
        let e = wait(&sim, |d| top.extents(10000, 0, Flags::NONE, d)).unwrap();
        assert_eq!(
            e.0,
            [
                Extent { length: 4096, flags: 0 },
                Extent { length: 10000 - 4096, flags: EXTENT_HOLE | EXTENT_ZERO }
            ]
        );
        let e = wait(&sim, |d| top.extents(100, 7000, Flags::NONE, d)).unwrap();
        assert_eq!(e.0, [Extent { length: 100, flags: EXTENT_HOLE | EXTENT_ZERO }]);
        let e = wait(&sim, |d| top.extents(5000, 5000, Flags::REQ_ONE, d)).unwrap();
        assert_eq!(e.0, [Extent { length: 1000, flags: EXTENT_HOLE | EXTENT_ZERO }]);
    }

    #[test]
    fn shrinking_hides_the_tail() {
        let sim = SimScheduler::new();
        let ram = Ram::new(8192);
        let top = open(&configure(&SPEC, &[("truncate", "1000")]), &cx(&sim), ram.clone()).unwrap();
        assert_eq!(top.info().size, 1000);
        let e = wait(&sim, |d| top.pread(vec![0; 2], 999, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::Inval, "the shim above checks against the new size");
        wait(&sim, |d| top.pwrite(vec![5; 10], 990, Flags::NONE, d)).unwrap();
        assert_eq!(&ram.data.borrow()[990..1000], &[5; 10]);
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert_eq!(make_err(&SPEC, &[("round-up", "0")]), "truncate: round-up: must be > 0 (got 0)");
        assert_eq!(
            make_err(&SPEC, &[("round-down", "1000")]),
            "truncate: round-down: must be a power of 2 (got 1000)"
        );
        assert!(make_err(&SPEC, &[("round-up", "8G")]).contains("too large"));
        assert!(
            make_err(&SPEC, &[("truncate", "1x")]).starts_with("truncate: truncate: could not parse size")
        );
    }
}
