//! `ones`: every byte reads as 0xff, or the byte given by `byte=`; writes, trims and zeroes are
//! accepted and discarded (nbdkit-ones-plugin, nbdkit 1.36). Block status says "all data".

use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{BackendFactory, BackendSpec, ParamSpec};
use blocksmith_core::ConfigError;

use crate::constant::{Constant, Writes};
use crate::util;

const NAME: &str = "ones";

pub const SPEC: BackendSpec = BackendSpec {
    name: NAME,
    summary: "reads return 0xff (or byte=N), writes are discarded (nbdkit-ones-plugin)",
    magic: Some("size"),
    params: &[
        ParamSpec { name: "size", help: "Size of the disk (default 0, at most 2^63-1)." },
        ParamSpec {
            name: "byte",
            help: "The byte every read returns: 0-255, decimal, 0x hex or 0 octal (default 255).",
        },
    ],
    make,
};

fn make(params: &mut Params) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    let size = util::take_size(params, NAME)?.unwrap_or(0);
    let byte = match params.take("byte") {
        Some(b) => util::parse_u8("byte", &b).map_err(|e| util::named(NAME, e))?,
        None => 0xff,
    };
    params.finish(NAME)?;
    // Fully allocated, never zero (even for byte=0, as nbdkit reports it).
    Ok(Arc::new(Constant { size, byte, hole: false, writes: Writes::Discarded }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make, make_err, open};
    use blocksmith_core::layer::Flags;

    #[test]
    fn reads_the_byte_and_discards_writes() {
        let c = open(make(&SPEC, &[("size", "64K")]).unwrap(), false);
        assert_eq!(c.read(1000, 7).unwrap(), vec![0xff; 1000]);
        c.write(&[1, 2, 3], 7, Flags::FUA).unwrap();
        c.zero(4096, 0, Flags::FAST_ZERO).unwrap();
        c.trim(4096, 0, Flags::NONE).unwrap();
        c.flush().unwrap();
        assert_eq!(c.read(4096, 0).unwrap(), vec![0xff; 4096]);
        assert_eq!(c.extents(65536, 0, Flags::NONE).unwrap(), vec![(65536, 0)]);
    }

    #[test]
    fn parameters() {
        let c = open(make(&SPEC, &[("size", "1K"), ("byte", "0x5a")]).unwrap(), false);
        assert_eq!(c.read(3, 1021).unwrap(), vec![0x5a; 3]);
        assert_eq!(open(make(&SPEC, &[]).unwrap(), false).info().size, 0);
        assert!(make_err(&SPEC, &[("byte", "256")]).starts_with("ones: byte:"));
        assert!(make_err(&SPEC, &[("byte", "x")]).contains("could not parse"));
        assert!(make_err(&SPEC, &[("size", "1.5M")]).contains("size"));
        assert!(make_err(&SPEC, &[("pattern", "1")]).contains("unknown parameter"));
    }
}
