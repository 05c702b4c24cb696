//! The noextents filter (nbdkit-noextents-filter): hide block status from the client, so the
//! whole disk is reported as allocated data, to test clients without sparseness information.
//! Reporting the capability off is all it takes: the shim above then answers block status
//! requests itself ("all data") and never calls down.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ReadData,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "noextents",
    summary: "hide block status: report the whole disk as allocated data",
    params: &[],
    make,
};

fn make(_p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    Ok(Arc::new(NoextentsFactory))
}

struct NoextentsFactory;

impl FilterFactory for NoextentsFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        Ok(Rc::new(FilterLayer { filter: NoextentsFilter, next }))
    }
}

struct NoextentsFilter;

impl Filter for NoextentsFilter {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn info(&self, next: &Next) -> ExportInfo {
        ExportInfo { can_extents: false, ..next.info() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, open, wait, Ram};
    use blocksmith_core::layer::{Extent, Flags};
    use blocksmith_core::sched::SimScheduler;

    #[test]
    fn everything_is_data_and_the_layer_below_is_not_asked() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let top = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        let e = wait(&sim, |d| top.extents(65536, 0, Flags::NONE, d)).unwrap();
        assert_eq!(e.0, [Extent { length: 65536, flags: 0 }]);
        assert!(ram.calls().is_empty());
    }
}
