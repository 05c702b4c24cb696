//! `null`: a bit bucket (nbdkit-null-plugin). Reads return zeroes, writes are discarded, every
//! operation succeeds, and block status reports one big hole.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{
    BackendFactory, BackendSpec, Done, ExportInfo, Extents, Flags, Layer, OpenCx, ParamSpec, Support,
    EXTENT_HOLE, EXTENT_ZERO,
};
use blocksmith_core::ConfigError;

use crate::util;

const NAME: &str = "null";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "writes are discarded, reads return zeroes (nbdkit-null-plugin)",
    magic: Some("size"),
    params: &[ParamSpec { name: "size", help: "Size of the disk (default 0, at most 2^63-1)." }],
    make,
};

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let size = util::take_size(params, NAME)?.unwrap_or(0);
    params.finish(NAME)?;
    Ok(Arc::new(NullFactory { size }))
}

struct NullFactory {
    size: u64,
}

impl BackendFactory for NullFactory {
    fn open(&self, _cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(Null { size: self.size }))
    }
}

struct Null {
    size: u64,
}

impl Layer for Null {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            can_write: true,
            // Nothing is kept, so nothing needs flushing: flush and FUA succeed at once.
            can_flush: true,
            fua: Support::Native,
            can_trim: true,
            zero: Support::Native,
            can_fast_zero: true,
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
        done.ok(())
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        done.ok(())
    }

    fn trim(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.ok(())
    }

    fn zero(&self, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        done.ok(())
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
    fn parameters() {
        assert_eq!(open(make(&SPEC, &[]).unwrap(), false).info().size, 0);
        assert_eq!(open(make(&SPEC, &[("size", "1G")]).unwrap(), false).info().size, 1 << 30);
        assert!(make_err(&SPEC, &[("size", "8E")]).starts_with("null: size:"));
        assert!(make_err(&SPEC, &[("size", "1M"), ("byte", "1")]).contains("unknown parameter 'byte'"));
    }

    #[test]
    fn discards_writes_and_reads_zeroes() {
        let c = open(make(&SPEC, &[("size", "1M")]).unwrap(), false);
        let i = c.info();
        assert!(i.can_write && i.can_flush && i.can_trim && i.can_fast_zero && i.can_multi_conn);
        c.write(&[0xff; 4096], 512, Flags::FUA).unwrap();
        assert_eq!(c.read(8192, 0).unwrap(), vec![0; 8192]);
        c.zero(1 << 20, 0, Flags::FAST_ZERO).unwrap();
        c.trim(4096, 0, Flags::FUA).unwrap();
        c.flush().unwrap();
        c.cache(1 << 20, 0).unwrap();
        assert_eq!(c.extents(1 << 20, 0, Flags::NONE).unwrap(), vec![(1 << 20, EXTENT_HOLE | EXTENT_ZERO)]);
        assert_eq!(c.extents(100, 1000, Flags::REQ_ONE).unwrap(), vec![(100, EXTENT_HOLE | EXTENT_ZERO)]);
    }
}
