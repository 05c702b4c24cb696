//! `full`: a disk that is always full (nbdkit-full-plugin), like Linux's /dev/full. Reads return
//! zeroes; every write, trim and zero fails with ENOSPC. Block status reports one big hole.
//!
//! Like nbdkit 1.32's, it has no flush, so FUA is not offered either.

use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{BackendFactory, BackendSpec, ParamSpec};
use blocksmith_core::ConfigError;

use crate::constant::{Constant, Writes};
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
    Ok(Arc::new(Constant { size, byte: 0, hole: true, writes: Writes::NoSpace(NAME) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open};
    use blocksmith_core::error::Errno;
    use blocksmith_core::layer::{Flags, Support, EXTENT_HOLE, EXTENT_ZERO};

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
