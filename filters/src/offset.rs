//! The offset filter (nbdkit-offset-filter): serve the byte range `[offset, offset + range)` of
//! the layer below as a whole export.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx,
    ParamSpec, ReadData,
};

pub const SPEC: FilterSpec =
    FilterSpec { name: "offset", summary: "serve a byte range of the layer below", params: PARAMS, make };

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "offset", help: "The start offset to serve (default 0), e.g. 1M." },
    ParamSpec {
        name: "range",
        help: "The length to serve (default: from offset to the end).\n\
               offset+range beyond the end of the layer below is an error.",
    },
];

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let err = |e: ConfigError| ConfigError::new(format!("offset: {}", e.0));
    let offset = p.take_size("offset").map_err(err)?.unwrap_or(0);
    let range = p.take_size("range").map_err(err)?;
    Ok(Arc::new(OffsetFactory { offset, range }))
}

struct OffsetFactory {
    offset: u64,
    range: Option<u64>,
}

impl FilterFactory for OffsetFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        // The size below is only known per connection (it may differ between exports), so the
        // window is checked here rather than at start-up, as nbdkit checks it in get_size.
        let size = window(self.offset, self.range, next.info().size)?;
        Ok(Rc::new(FilterLayer { filter: OffsetFilter { offset: self.offset, size }, next }))
    }
}

/// The size of the window, or why it does not fit in `below` bytes. Like nbdkit, a window that
/// runs past the end is an error rather than silently shortened: it is almost always a wrong
/// partition start or length, and serving less than asked would hide that.
fn window(offset: u64, range: Option<u64>, below: u64) -> Result<u64, NbdError> {
    match range {
        Some(range) => match offset.checked_add(range) {
            Some(end) if end <= below => Ok(range),
            _ => Err(NbdError::inval(format!(
                "offset+range ({offset}+{range}) is larger than the real size ({below}) of the layer below"
            ))),
        },
        None => below.checked_sub(offset).ok_or_else(|| {
            NbdError::inval(format!(
                "offset ({offset}) is larger than the real size ({below}) of the layer below"
            ))
        }),
    }
}

struct OffsetFilter {
    offset: u64,
    size: u64,
}

impl OffsetFilter {
    /// Where a request at `offset` lands below. The shim above has already checked the request
    /// against our size, and open checked `self.offset + size` against the size below, so this
    /// cannot overflow; it is still checked so a broken invariant is an error, not a wrap.
    fn below(&self, offset: u64) -> Result<u64, NbdError> {
        offset.checked_add(self.offset).ok_or_else(|| NbdError::inval("offset overflows the layer below"))
    }
}

impl Filter for OffsetFilter {
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        match self.below(offset) {
            Ok(o) => next.pread_lent(count, o, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn info(&self, next: &Next) -> ExportInfo {
        ExportInfo { size: self.size, ..next.info() }
    }

    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        match self.below(offset) {
            Ok(o) => next.pread(buf, o, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        match self.below(offset) {
            Ok(o) => next.pwrite(data, o, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.below(offset) {
            Ok(o) => next.trim(count, o, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.below(offset) {
            Ok(o) => next.zero(count, o, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        // Extents are lengths counted from the request's offset, so they need no shifting. Any
        // that run past the end of the window are cut by the shim above, which clips to our size.
        match self.below(offset) {
            Ok(o) => next.extents(count, o, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.below(offset) {
            Ok(o) => next.cache(count, o, flags, done),
            Err(e) => done.err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram, DATA_END};
    use blocksmith_core::error::Errno;
    use blocksmith_core::layer::{Extent, EXTENT_HOLE, EXTENT_ZERO};
    use blocksmith_core::sched::SimScheduler;

    fn size_of(params: &[(&str, &str)], below: usize) -> Result<u64, NbdError> {
        let sim = SimScheduler::new();
        open(&configure(&SPEC, params), &cx(&sim), Ram::new(below)).map(|l| l.info().size)
    }

    #[test]
    fn window_sizes() {
        assert_eq!(size_of(&[], 8192).unwrap(), 8192);
        assert_eq!(size_of(&[("offset", "1k")], 8192).unwrap(), 7168);
        assert_eq!(size_of(&[("offset", "1k"), ("range", "2k")], 8192).unwrap(), 2048);
        assert_eq!(size_of(&[("offset", "6k"), ("range", "2k")], 8192).unwrap(), 2048);
        assert_eq!(size_of(&[("offset", "8k")], 8192).unwrap(), 0);
        assert_eq!(size_of(&[("range", "0")], 8192).unwrap(), 0);
    }

    #[test]
    fn windows_past_the_end_fail_at_open() {
        let e = size_of(&[("offset", "9k")], 8192).unwrap_err();
        assert_eq!(e.errno, Errno::Inval);
        assert!(e.message.unwrap().contains("offset (9216) is larger than the real size (8192)"));
        let e = size_of(&[("offset", "7k"), ("range", "2k")], 8192).unwrap_err();
        assert_eq!(e.errno, Errno::Inval);
        assert!(e.message.unwrap().contains("offset+range (7168+2048)"));
        assert!(size_of(&[("range", "8193")], 8192).is_err());
        // Largest accepted sizes do not overflow when added.
        let max = (i64::MAX as u64).to_string();
        assert!(size_of(&[("offset", &max), ("range", &max)], 8192).is_err());
    }

    #[test]
    fn requests_are_shifted() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &[("offset", "1000"), ("range", "8000")]), &cx(&sim), ram.clone())
            .unwrap();

        let buf = wait(&sim, |d| top.pread(vec![0; 4], 0, Flags::NONE, d)).unwrap();
        assert_eq!(buf, [(1000 % 251) as u8, (1001 % 251) as u8, (1002 % 251) as u8, (1003 % 251) as u8]);
        wait(&sim, |d| top.pwrite(vec![0xaa; 4], 7996, Flags::FUA, d)).unwrap();
        assert_eq!(&ram.data.borrow()[8996..9000], &[0xaa; 4]);
        wait(&sim, |d| top.zero(10, 20, Flags::MAY_TRIM, d)).unwrap();
        assert!(ram.data.borrow()[1020..1030].iter().all(|b| *b == 0));
        wait(&sim, |d| top.trim(100, 200, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.cache(100, 300, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert_eq!(
            ram.calls(),
            [
                "pread 4@1000",
                "pwrite 4@8996 flags=1",
                "zero 10@1020 flags=2",
                "trim 100@1200 flags=0",
                "cache 100@1300",
                "flush"
            ]
        );

        // The shim above the filter checks against the window, not the whole disk below.
        let e = wait(&sim, |d| top.pread(vec![0; 2], 7999, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::Inval);
        let e = wait(&sim, |d| top.pwrite(vec![0; 1], 8000, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NoSpc);
        assert_eq!(ram.calls().len(), 6, "out-of-window requests never reach the layer below");
    }

    #[test]
    fn extents_are_shifted_and_clipped_to_the_window() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &[("offset", "1024"), ("range", "8192")]), &cx(&sim), ram.clone())
            .unwrap();
        // Below: data up to DATA_END (4096), then a hole to 64 KiB. Our window starts at 1024, so
        // data for 3072 bytes, then a hole that must end at the window's end.
        let e = wait(&sim, |d| top.extents(8192, 0, Flags::NONE, d)).unwrap();
        assert_eq!(
            e.0,
            [
                Extent { length: DATA_END - 1024, flags: 0 },
                Extent { length: 8192 - (DATA_END - 1024), flags: EXTENT_HOLE | EXTENT_ZERO },
            ]
        );
        let e = wait(&sim, |d| top.extents(100, 8000, Flags::NONE, d)).unwrap();
        assert_eq!(e.0, [Extent { length: 192, flags: EXTENT_HOLE | EXTENT_ZERO }]);
        assert_eq!(ram.calls(), ["extents 8192@1024", "extents 100@9024"]);
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        let e = make_err(&SPEC, &[("offset", "-1")]);
        assert!(e.starts_with("offset: offset: could not parse size '-1'"), "{e}");
        let e = make_err(&SPEC, &[("range", "1x")]);
        assert!(e.starts_with("offset: range: could not parse size '1x'"), "{e}");
        let e = make_err(&SPEC, &[("range", "9223372036854775808")]);
        assert!(e.contains("too large"), "{e}");
    }
}
