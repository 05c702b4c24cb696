//! `null`: a bit bucket (nbdkit-null-plugin). Reads return zeroes, writes are discarded, every
//! operation succeeds, and block status reports one big hole.

use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{BackendFactory, BackendSpec, ParamSpec};
use blocksmith_core::ConfigError;

use crate::constant::{Constant, Writes};
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
    Ok(Arc::new(Constant { size, byte: 0, hole: true, writes: Writes::Discarded }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open};
    use blocksmith_core::layer::{Flags, EXTENT_HOLE, EXTENT_ZERO};

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
