//! The nocache filter (nbdkit-nocache-filter): change how NBD_CMD_CACHE is handled
//! (`cachemode=`), to measure what the layer below's caching is worth.
//!
//! - `none` (default): CACHE is not offered to the client.
//! - `emulate`: offered, and done by reading the range and discarding the data (by the shim
//!   above, where emulation lives), whatever the layer below could do.
//! - `nop`: offered, and every request succeeds at once without doing anything.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
    ReadData, Support,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "nocache",
    summary: "disable, emulate or ignore cache requests",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "cachemode",
    help: "none (default): do not offer CACHE; emulate: cache by reading;\n\
           nop: accept cache requests and do nothing.",
}];

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let mode = match p.take("cachemode").as_deref() {
        None | Some("none") => Support::None,
        Some("emulate") => Support::Emulate,
        // Native, served by this filter's own no-op.
        Some("nop") => Support::Native,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "nocache: unknown cachemode '{other}' (none, emulate or nop)"
            )))
        }
    };
    Ok(Arc::new(NocacheFactory(mode)))
}

struct NocacheFactory(Support);

impl FilterFactory for NocacheFactory {
    fn open(&self, _cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        Ok(Rc::new(FilterLayer { filter: NocacheFilter(self.0), next }))
    }
}

struct NocacheFilter(Support);

impl Filter for NocacheFilter {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn info(&self, next: &Next) -> ExportInfo {
        ExportInfo { cache: self.0, ..next.info() }
    }

    fn cache(&self, _next: &Next, _count: u64, _offset: u64, _flags: Flags, done: Done<()>) {
        // Only `nop` reaches here (emulation reads through pread; `none` is never called): a
        // cache request promises nothing, so success is always a correct answer.
        done.ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn run(mode: &str) -> (Support, Vec<String>) {
        let sim = SimScheduler::new();
        let ram = Ram::new(8192);
        let top = open(&configure(&SPEC, &[("cachemode", mode)]), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.cache(4096, 0, Flags::NONE, d)).unwrap();
        (top.info().cache, ram.calls())
    }

    #[test]
    fn modes() {
        assert_eq!(run("none"), (Support::None, vec![]));
        assert_eq!(run("emulate"), (Support::Native, vec!["pread 4096@0".to_string()]));
        assert_eq!(run("nop"), (Support::Native, vec![]));
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert_eq!(
            make_err(&SPEC, &[("cachemode", "x")]),
            "nocache: unknown cachemode 'x' (none, emulate or nop)"
        );
    }
}
