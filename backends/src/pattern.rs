//! `pattern`: a read-only disk where every 8-byte aligned word holds its own offset, big-endian
//! (nbdkit-pattern-plugin). Handy for spotting requests that land in the wrong place.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Flags, Layer, OpenCx, ParamSpec, Support,
};
use blocksmith_core::ConfigError;

use crate::util;

const NAME: &str = "pattern";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "read-only disk where each 8-byte word holds its own offset, big-endian (nbdkit-pattern-plugin)",
    magic: Some("size"),
    params: &[ParamSpec { name: "size", help: "Size of the disk (default 0, at most 2^63-1)." }],
    make,
};

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    // nbdkit's help says "required" but its code defaults to 0; so do we.
    let size = util::take_size(params, NAME)?.unwrap_or(0);
    params.finish(NAME)?;
    Ok(Arc::new(PatternFactory { size }))
}

/// Fill `buf` with the pattern as it appears from `offset`, which need not be aligned.
pub fn fill(buf: &mut [u8], offset: u64) {
    let mut pos = offset;
    let mut rest = buf;
    while !rest.is_empty() {
        let word = (pos & !7).to_be_bytes();
        let k = (pos & 7) as usize;
        let n = (8 - k).min(rest.len());
        let (head, tail) = rest.split_at_mut(n);
        head.copy_from_slice(&word[k..k + n]);
        rest = tail;
        pos += n as u64;
    }
}

struct PatternFactory {
    size: u64,
}

impl BackendFactory for PatternFactory {
    fn open(&self, _cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(Pattern { size: self.size }))
    }
}

struct Pattern {
    size: u64,
}

impl Layer for Pattern {
    fn info(&self) -> ExportInfo {
        // Computed on demand: caching is a no-op. No extents: the shim reports "all data".
        ExportInfo { cache: Support::Native, ..ExportInfo::read_only(self.size) }
    }

    fn pread(&self, mut buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        fill(&mut buf, offset);
        done.ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open};
    use blocksmith_core::error::Errno;

    /// The defining property, byte by byte.
    fn expected(pos: u64) -> u8 {
        (pos & !7).to_be_bytes()[(pos & 7) as usize]
    }

    #[test]
    fn aligned_words_hold_their_offset() {
        let c = open(make(&SPEC, &[("size", "1M")]).unwrap(), false);
        let r = c.read(24, 4096).unwrap();
        assert_eq!(&r[..8], &4096u64.to_be_bytes());
        assert_eq!(&r[8..16], &4104u64.to_be_bytes());
        assert_eq!(&r[16..], &4112u64.to_be_bytes());
    }

    #[test]
    fn unaligned_reads() {
        let size = 1u64 << 20;
        let c = open(make(&SPEC, &[("size", "1M")]).unwrap(), false);
        for (off, len) in [(1u64, 1usize), (3, 5), (5, 3), (7, 2), (8191, 17), (12345, 4099), (size - 3, 3)] {
            let r = c.read(len, off).unwrap();
            let want: Vec<u8> = (off..off + len as u64).map(expected).collect();
            assert_eq!(r, want, "read {len} at {off}");
        }
        // Big offsets put bytes in the high half of the word too.
        let mut b = vec![0; 11];
        fill(&mut b, 0x0102_0304_0506_0703);
        assert_eq!(b, [0x04, 0x05, 0x06, 0x07, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06]);
        assert_eq!(c.extents(size, 0, Flags::NONE).unwrap(), vec![(size, 0)]);
    }

    #[test]
    fn read_only_and_parameters() {
        let c = open(make(&SPEC, &[("size", "4K")]).unwrap(), false);
        assert!(!c.info().can_write);
        assert_eq!(c.write(b"x", 0, Flags::NONE).unwrap_err().errno, Errno::Perm);
        assert_eq!(c.zero(1, 0, Flags::NONE).unwrap_err().errno, Errno::Perm);
        assert_eq!(open(make(&SPEC, &[]).unwrap(), false).info().size, 0);
        assert!(make_err(&SPEC, &[("size", "lots")]).starts_with("pattern: size:"));
        assert!(make_err(&SPEC, &[("size", "1"), ("x", "1")]).contains("unknown parameter 'x'"));
    }
}
