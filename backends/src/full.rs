//! `full`: a disk that is always full (nbdkit-full-plugin), like Linux's /dev/full. Reads return
//! zeroes; every write, trim and zero fails with ENOSPC. Block status reports one big hole.
//!
//! Like nbdkit 1.32's, it has no flush, so FUA is not offered either.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::Errno;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Extents, Flags, Layer, OpenCx, ParamSpec, Support,
    EXTENT_HOLE, EXTENT_ZERO,
};
use blocksmith_core::{ConfigError, NbdError};

use crate::util;

const NAME: &str = "full";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "reads return zeroes, every write fails with ENOSPC (nbdkit-full-plugin)",
    magic: Some("size"),
    params: &[ParamSpec { name: "size", help: "(required) Size of the disk, at most 2^63-1." }],
    make,
};

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let size = util::require_size(params, NAME)?;
    params.finish(NAME)?;
    Ok(Arc::new(FullFactory { size }))
}

struct FullFactory {
    size: u64,
}

impl BackendFactory for FullFactory {
    fn open(&self, _cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(Full { size: self.size }))
    }
}

struct Full {
    size: u64,
}

fn no_space() -> NbdError {
    NbdError::msg(Errno::NoSpc, "full: the disk is full")
}

impl Layer for Full {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            // Writable, so clients try to write and get ENOSPC rather than EPERM.
            can_write: true,
            can_trim: true,
            zero: Support::Native,
            // As nbdkit's full plugin: FAST_ZERO is refused with ENOTSUP (by the shim) before
            // the ENOSPC a plain zero gets.
            can_fast_zero: false,
            can_extents: true,
            cache: Support::Native,
            ..ExportInfo::read_only(self.size)
        }
    }

    fn pread(&self, mut buf: Vec<u8>, _offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        buf.fill(0);
        done.ok(buf)
    }

    fn pwrite(&self, _data: Vec<u8>, _offset: u64, _flags: Flags, done: Done<()>) {
        done.err(no_space())
    }

    fn trim(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.err(no_space())
    }

    fn zero(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.err(no_space())
    }

    fn extents(&self, count: u64, _offset: u64, _flags: Flags, done: Done<Extents>) {
        let mut e = Extents::new();
        e.push(count, EXTENT_HOLE | EXTENT_ZERO);
        done.ok(e)
    }

    fn cache(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open};

    #[test]
    fn everything_but_reads_is_enospc() {
        let c = open(make(&SPEC, &[("size", "1M")]).unwrap(), false);
        let i = c.info();
        assert!(i.can_write && i.can_trim && !i.can_flush);
        assert_eq!(i.fua, Support::None);
        assert_eq!(c.read(4096, 1000).unwrap(), vec![0; 4096]);
        for e in [
            c.write(b"data", 0, Flags::NONE).unwrap_err(),
            c.trim(4096, 0, Flags::NONE).unwrap_err(),
            c.zero(4096, 0, Flags::MAY_TRIM).unwrap_err(),
        ] {
            assert_eq!(e.errno, Errno::NoSpc);
            assert!(e.message.as_deref().is_some_and(|m| m.contains("full")));
        }
        assert_eq!(c.extents(1 << 20, 0, Flags::NONE).unwrap(), vec![(1 << 20, EXTENT_HOLE | EXTENT_ZERO)]);
        assert_eq!(c.read(4, 0).unwrap(), vec![0; 4]);
        // Fast zero is still advertised to clients, and refused quickly.
        assert!(i.can_fast_zero);
        assert_eq!(c.zero(4096, 0, Flags::FAST_ZERO).unwrap_err().errno, Errno::NotSup);
    }

    #[test]
    fn parameters() {
        assert!(make_err(&SPEC, &[]).contains("size"));
        assert!(make_err(&SPEC, &[("size", "-5")]).starts_with("full: size:"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("byte", "1")]).contains("unknown parameter"));
    }
}
