//! The fua filter (nbdkit-fua-filter): change how Forced Unit Access and flush behave
//! (`fuamode=`), to test clients or to trade safety for speed.
//!
//! - `none` (default): FUA is not offered to the client.
//! - `emulate`: FUA is offered and done by a flush after the write (by the shim above, which is
//!   where emulation lives); needs a layer below that can flush.
//! - `native`: FUA is offered and passed down as FUA; needs a layer below that does FUA.
//! - `force`: every write, zero and trim is sent down with FUA, and flush does nothing.
//! - `pass`: FUA support is what the layer below offers.
//! - `discard`: FUA is accepted and dropped and flush does nothing: fast and unsafe.
//!
//! As in nbdkit, a read-only connection skips the checks: there is nothing to write.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
    ReadData, Support,
};

pub const SPEC: FilterSpec =
    FilterSpec { name: "fua", summary: "change how FUA and flush are handled", params: PARAMS, make };

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "fuamode",
    help: "none (default): no FUA; emulate: FUA by flush; native: pass FUA down;\n\
           force: FUA on every write, flush ignored; pass: as the layer below;\n\
           discard: FUA and flush ignored (unsafe).",
}];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    None,
    Emulate,
    Native,
    Force,
    Pass,
    Discard,
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let mode = match p.take("fuamode").as_deref() {
        None | Some("none") => Mode::None,
        Some("emulate") => Mode::Emulate,
        Some("native") => Mode::Native,
        Some("force") => Mode::Force,
        Some("pass") => Mode::Pass,
        Some("discard") => Mode::Discard,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "fua: unknown fuamode '{other}' (none, emulate, native, force, pass or discard)"
            )))
        }
    };
    Ok(Arc::new(FuaFactory(mode)))
}

struct FuaFactory(Mode);

impl FilterFactory for FuaFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let below = next.info();
        if !cx.readonly && below.can_write {
            match self.0 {
                Mode::Emulate if !below.can_flush => {
                    return Err(NbdError::inval("fua: fuamode 'emulate' requires flush support below"))
                }
                Mode::Native | Mode::Force if below.fua == Support::None => {
                    let name = if self.0 == Mode::Native { "native" } else { "force" };
                    return Err(NbdError::inval(format!("fua: fuamode '{name}' requires FUA support below")));
                }
                _ => {}
            }
        }
        Ok(Rc::new(FilterLayer { filter: FuaFilter(self.0), next }))
    }
}

struct FuaFilter(Mode);

impl FuaFilter {
    fn flags(&self, flags: Flags) -> Flags {
        match self.0 {
            Mode::Force => flags | Flags::FUA,
            Mode::Discard => flags.without(Flags::FUA),
            // none: the shim above never sends FUA; emulate: it strips it and flushes.
            Mode::None | Mode::Emulate | Mode::Native | Mode::Pass => flags,
        }
    }
}

impl Filter for FuaFilter {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        match self.0 {
            Mode::None => ExportInfo { fua: Support::None, ..below },
            Mode::Emulate => ExportInfo { fua: Support::Emulate, ..below },
            Mode::Native => ExportInfo { fua: Support::Native, ..below },
            // Our flush is a no-op that cannot fail, so it is offered whatever is below.
            Mode::Force | Mode::Discard => ExportInfo { fua: Support::Native, can_flush: true, ..below },
            Mode::Pass => below,
        }
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        next.pwrite(data, offset, self.flags(flags), done)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.zero(count, offset, self.flags(flags), done)
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.trim(count, offset, self.flags(flags), done)
    }

    fn flush(&self, next: &Next, flags: Flags, done: Done<()>) {
        match self.0 {
            // force: every write was already durable; discard: durability was given up.
            Mode::Force | Mode::Discard => done.ok(()),
            _ => next.flush(flags, done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::error::Errno;
    use blocksmith_core::sched::SimScheduler;

    fn run(mode: &str, below: impl FnOnce(&mut Ram)) -> (Result<Vec<String>, NbdError>, Option<ExportInfo>) {
        let sim = SimScheduler::new();
        let ram = Ram::with(65536, below);
        let top = match open(&configure(&SPEC, &[("fuamode", mode)]), &cx(&sim), ram.clone()) {
            Ok(t) => t,
            Err(e) => return (Err(e), None),
        };
        let info = top.info();
        let fua = if info.fua == Support::None { Flags::NONE } else { Flags::FUA };
        wait(&sim, |d| top.pwrite(vec![1; 8], 0, fua, d)).unwrap();
        wait(&sim, |d| top.zero(8, 8, fua, d)).unwrap();
        wait(&sim, |d| top.pwrite(vec![1; 8], 16, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        (Ok(ram.calls()), Some(info))
    }

    #[test]
    fn modes() {
        let (calls, info) = run("none", |_| {});
        assert_eq!(info.unwrap().fua, Support::None);
        assert_eq!(
            calls.unwrap(),
            ["pwrite 8@0 flags=0", "zero 8@8 flags=0", "pwrite 8@16 flags=0", "flush"]
        );

        let (calls, _) = run("emulate", |_| {});
        assert_eq!(
            calls.unwrap(),
            ["pwrite 8@0 flags=0", "flush", "zero 8@8 flags=0", "flush", "pwrite 8@16 flags=0", "flush"]
        );

        let (calls, _) = run("native", |_| {});
        assert_eq!(
            calls.unwrap(),
            ["pwrite 8@0 flags=1", "zero 8@8 flags=1", "pwrite 8@16 flags=0", "flush"]
        );

        let (calls, info) = run("force", |r| r.info.can_flush = false);
        assert!(info.unwrap().can_flush);
        assert_eq!(calls.unwrap(), ["pwrite 8@0 flags=1", "zero 8@8 flags=1", "pwrite 8@16 flags=1"]);

        let (calls, _) = run("discard", |_| {});
        assert_eq!(calls.unwrap(), ["pwrite 8@0 flags=0", "zero 8@8 flags=0", "pwrite 8@16 flags=0"]);

        let (calls, info) = run("pass", |r| r.info.fua = Support::Native);
        assert_eq!(info.unwrap().fua, Support::Native);
        assert_eq!(calls.unwrap()[0], "pwrite 8@0 flags=1");
    }

    #[test]
    fn modes_needing_support_below_fail_at_open() {
        let (r, _) = run("emulate", |r| {
            r.info.can_flush = false;
            r.info.fua = Support::None;
        });
        assert!(r.unwrap_err().message.unwrap().contains("'emulate' requires flush"));
        let (r, _) = run("native", |r| {
            r.info.can_flush = false;
            r.info.fua = Support::None;
        });
        assert_eq!(r.unwrap_err().errno, Errno::Inval);
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert!(make_err(&SPEC, &[("fuamode", "sometimes")]).starts_with("fua: unknown fuamode 'sometimes'"));
    }
}
