//! `zero`: a read-only disk of zero bytes (nbdkit-zero-plugin), for corner-case testing. Like
//! nbdkit's, it takes no parameters at all.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{BackendFactory, BackendSpec, Done, ExportInfo, Flags, Layer, OpenCx, Support};
use blocksmith_core::ConfigError;

const NAME: &str = "zero";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "a read-only disk of size 0 (nbdkit-zero-plugin)",
    magic: None,
    params: &[],
    make,
};

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    params.finish(NAME)?;
    Ok(Arc::new(ZeroFactory))
}

struct ZeroFactory;

impl BackendFactory for ZeroFactory {
    fn open(&self, _cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        done.ok(Rc::new(Zero))
    }
}

struct Zero;

impl Layer for Zero {
    fn info(&self) -> ExportInfo {
        ExportInfo { cache: Support::Native, ..ExportInfo::read_only(0) }
    }

    /// Only ever asked for zero bytes (the shim refuses anything else on an empty disk).
    fn pread(&self, mut buf: Vec<u8>, _offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        buf.fill(0);
        done.ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open};
    use blocksmith_core::error::Errno;

    #[test]
    fn empty_and_read_only() {
        let c = open(make(&SPEC, &[]).unwrap(), false);
        let i = c.info();
        assert_eq!(i.size, 0);
        assert!(!i.can_write && i.can_multi_conn);
        assert_eq!(c.read(0, 0).unwrap(), Vec::<u8>::new());
        assert_eq!(c.read(1, 0).unwrap_err().errno, Errno::Inval);
        assert_eq!(c.write(b"x", 0, Flags::NONE).unwrap_err().errno, Errno::Perm);
    }

    #[test]
    fn takes_no_parameters() {
        assert!(make_err(&SPEC, &[("size", "1M")]).contains("unknown parameter 'size'"));
    }
}
