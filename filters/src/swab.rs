//! The swab filter (nbdkit-swab-filter): swap the bytes of every 16-, 32- or 64-bit word read
//! from or written to the layer below (`swab-bits=`, default 16; 8 changes nothing), for disks
//! written by a machine of the other endianness.
//!
//! Requests must be aligned to the word size: a half word cannot be swapped. Such requests fail
//! with EINVAL, and the word size is advertised as the minimum block size so well-behaved
//! clients never send them. Block status is not offered, as in nbdkit: extents of the layer
//! below need not be word aligned.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    BlockSize, Done, ExportInfo, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx,
    ParamSpec,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "swab",
    summary: "swap the byte order of 16, 32 or 64 bit words",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] =
    &[ParamSpec { name: "swab-bits", help: "Word size in bits: 8 (no change), 16 (default), 32 or 64." }];

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let bytes = match p.take("swab-bits").as_deref().map(str::trim) {
        None | Some("16") => 2,
        Some("8") => 1,
        Some("32") => 4,
        Some("64") => 8,
        Some(other) => {
            return Err(ConfigError::new(format!("swab: invalid swab-bits '{other}' (8, 16, 32 or 64)")))
        }
    };
    Ok(Arc::new(SwabFactory { bytes }))
}

struct SwabFactory {
    /// Word size in bytes.
    bytes: usize,
}

impl FilterFactory for SwabFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        Ok(Rc::new(FilterLayer { filter: SwabFilter { bytes: self.bytes }, next }))
    }
}

struct SwabFilter {
    bytes: usize,
}

impl SwabFilter {
    fn aligned(&self, count: u64, offset: u64) -> Result<(), NbdError> {
        let w = self.bytes as u64;
        if count.checked_rem(w) == Some(0) && offset.checked_rem(w) == Some(0) {
            Ok(())
        } else {
            Err(NbdError::inval(format!(
                "swab: requests to this filter must be aligned to {w} bytes (got {count} bytes at offset {offset})"
            )))
        }
    }

    /// Reverse each word in place; the same operation in both directions.
    fn swap(&self, buf: &mut [u8]) {
        if self.bytes > 1 {
            buf.chunks_exact_mut(self.bytes).for_each(<[u8]>::reverse);
        }
    }
}

impl Filter for SwabFilter {
    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        let w = self.bytes as u32;
        let block_size = match below.block_size {
            Some(b) => BlockSize {
                minimum: b.minimum.max(w),
                preferred: b.preferred.max(w),
                maximum: (b.maximum - b.maximum % w).max(w),
            },
            None => BlockSize { minimum: w, preferred: 512, maximum: u32::MAX - u32::MAX % w },
        };
        ExportInfo { can_extents: false, block_size: Some(block_size), ..below }
    }

    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        if let Err(e) = self.aligned(buf.len() as u64, offset) {
            return done.err(e);
        }
        let bytes = self.bytes;
        next.pread(
            buf,
            offset,
            flags,
            done.map(move |r: Result<Vec<u8>, NbdError>| {
                r.map(|mut b| {
                    SwabFilter { bytes }.swap(&mut b);
                    b
                })
            }),
        )
    }

    fn pwrite(&self, next: &Next, mut data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        if let Err(e) = self.aligned(data.len() as u64, offset) {
            return done.err(e);
        }
        // The buffer is ours: swap it in place rather than copying it.
        self.swap(&mut data);
        next.pwrite(data, offset, flags, done)
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.aligned(count, offset) {
            Ok(()) => next.trim(count, offset, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.aligned(count, offset) {
            Ok(()) => next.zero(count, offset, flags, done),
            Err(e) => done.err(e),
        }
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.aligned(count, offset) {
            Ok(()) => next.cache(count, offset, flags, done),
            Err(e) => done.err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::error::Errno;
    use blocksmith_core::sched::SimScheduler;

    #[test]
    fn words_are_swapped_both_ways() {
        for (bits, expect) in [
            ("8", [0u8, 1, 2, 3, 4, 5, 6, 7]),
            ("16", [1, 0, 3, 2, 5, 4, 7, 6]),
            ("32", [3, 2, 1, 0, 7, 6, 5, 4]),
            ("64", [7, 6, 5, 4, 3, 2, 1, 0]),
        ] {
            let sim = SimScheduler::new();
            let ram = Ram::new(4096);
            let top = open(&configure(&SPEC, &[("swab-bits", bits)]), &cx(&sim), ram.clone()).unwrap();
            let b = wait(&sim, |d| top.pread(vec![0; 8], 0, Flags::NONE, d)).unwrap();
            assert_eq!(b, expect, "swab-bits={bits}");
            wait(&sim, |d| top.pwrite(vec![10, 11, 12, 13, 14, 15, 16, 17], 8, Flags::NONE, d)).unwrap();
            let raw = ram.data.borrow()[8..16].to_vec();
            let mut back = raw.clone();
            SwabFilter { bytes: bits.parse::<usize>().unwrap() / 8 }.swap(&mut back);
            assert_eq!(back, [10, 11, 12, 13, 14, 15, 16, 17], "swab-bits={bits}: stored {raw:?}");
            let b = wait(&sim, |d| top.pread(vec![0; 8], 8, Flags::NONE, d)).unwrap();
            assert_eq!(b, [10, 11, 12, 13, 14, 15, 16, 17], "a round trip is the identity");
        }
    }

    #[test]
    fn unaligned_requests_fail_and_word_size_is_advertised() {
        let sim = SimScheduler::new();
        let ram = Ram::new(4096);
        let top = open(&configure(&SPEC, &[("swab-bits", "32")]), &cx(&sim), ram.clone()).unwrap();
        let info = top.info();
        assert_eq!(info.block_size.map(|b| b.minimum), Some(4));
        assert!(!info.can_extents);
        assert_eq!(wait(&sim, |d| top.pread(vec![0; 3], 0, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
        assert_eq!(
            wait(&sim, |d| top.pwrite(vec![0; 4], 2, Flags::NONE, d)).unwrap_err().errno,
            Errno::Inval
        );
        assert_eq!(wait(&sim, |d| top.zero(6, 0, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
        assert_eq!(wait(&sim, |d| top.trim(4, 1, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
        assert_eq!(wait(&sim, |d| top.cache(4, 1, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
        wait(&sim, |d| top.zero(8, 4, Flags::NONE, d)).unwrap();
        assert!(ram.calls().iter().all(|c| c.starts_with("zero 8@4")), "{:?}", ram.calls());
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert_eq!(make_err(&SPEC, &[("swab-bits", "24")]), "swab: invalid swab-bits '24' (8, 16, 32 or 64)");
    }
}
