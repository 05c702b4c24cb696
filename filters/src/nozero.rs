//! The nozero filter (nbdkit-nozero-filter): weaken or remove efficient zeroing, to measure what
//! it is worth or to test client fallbacks.
//!
//! `zeromode=`:
//! - `none` (default): WRITE_ZEROES is not offered; clients write zeroes like any data.
//! - `emulate`: offered, but done by writing buffers of zeroes (the shim above emulates it),
//!   whatever the layer below could do.
//! - `notrim`: passed down without the may-trim flag, so no hole is ever punched.
//! - `plugin`: passed down unchanged (with `fastzeromode` to experiment).
//!
//! `fastzeromode=`:
//! - `default`: fast zero as the layer below (never fast when emulated);
//! - `slow`: fast zero requests fail at once with ENOTSUP;
//! - `ignore`: the fast flag is dropped and the zero done, however slowly;
//! - `none`: fast zero is not offered. The core's shim above advertises fast zero whenever
//!   zeroing is offered (and refuses it with ENOTSUP when the layer cannot do it fast), so a
//!   client may still send the flag; it then gets ENOTSUP, exactly as with `slow`.

use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
    ReadData, Support,
};

use crate::chunked::{sequence, CHUNK};

pub const SPEC: FilterSpec = FilterSpec {
    name: "nozero",
    summary: "disable or weaken WRITE_ZEROES and fast zero",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "zeromode",
        help: "none (default): no WRITE_ZEROES; emulate: zero by writing zeroes;\n\
               notrim: never punch holes; plugin: pass zero requests down unchanged.",
    },
    ParamSpec {
        name: "fastzeromode",
        help: "default: as the layer below; slow: fast zero fails with ENOTSUP;\n\
               ignore: drop the fast flag and zero anyway; none: do not offer fast zero.",
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroMode {
    None,
    Emulate,
    NoTrim,
    Plugin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FastMode {
    Default,
    Slow,
    Ignore,
    NoFast,
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let zero = match p.take("zeromode").as_deref() {
        None | Some("none") => ZeroMode::None,
        Some("emulate") => ZeroMode::Emulate,
        Some("notrim") => ZeroMode::NoTrim,
        Some("plugin") => ZeroMode::Plugin,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "nozero: unknown zeromode '{other}' (none, emulate, notrim or plugin)"
            )))
        }
    };
    let fast = match p.take("fastzeromode").as_deref() {
        None | Some("default") => FastMode::Default,
        Some("slow") => FastMode::Slow,
        Some("ignore") => FastMode::Ignore,
        Some("none") => FastMode::NoFast,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "nozero: unknown fastzeromode '{other}' (default, none, slow or ignore)"
            )))
        }
    };
    Ok(Arc::new(NozeroFactory { zero, fast }))
}

struct NozeroFactory {
    zero: ZeroMode,
    fast: FastMode,
}

impl FilterFactory for NozeroFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let below = next.info();
        if !cx.readonly
            && below.can_write
            && matches!(self.zero, ZeroMode::NoTrim | ZeroMode::Plugin)
            && below.zero == Support::None
        {
            let name = if self.zero == ZeroMode::NoTrim { "notrim" } else { "plugin" };
            return Err(NbdError::inval(format!("nozero: zeromode '{name}' requires zero support below")));
        }
        Ok(Rc::new(FilterLayer { filter: NozeroFilter { zero: self.zero, fast: self.fast }, next }))
    }
}

struct NozeroFilter {
    zero: ZeroMode,
    fast: FastMode,
}

impl Filter for NozeroFilter {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        let (zero, can_fast_zero) = match (self.zero, self.fast) {
            (ZeroMode::None, _) => (Support::None, false),
            // Emulated zeroing is never fast; `ignore` must see the flag to drop it, so this
            // filter then does the writing itself and offers the zero as native.
            (ZeroMode::Emulate, FastMode::Ignore) => (Support::Native, true),
            (ZeroMode::Emulate, _) => (Support::Emulate, false),
            (_, FastMode::Default) => (below.zero, below.can_fast_zero),
            (_, FastMode::NoFast) => (below.zero, false),
            (_, FastMode::Slow | FastMode::Ignore) => (below.zero, true),
        };
        ExportInfo { zero, can_fast_zero, ..below }
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let mut flags = flags;
        if flags.contains(Flags::FAST_ZERO) {
            match self.fast {
                FastMode::Slow | FastMode::NoFast => {
                    return done.err(NbdError::msg(Errno::NotSup, "nozero: fast zero is not supported"))
                }
                FastMode::Ignore => flags = flags.without(Flags::FAST_ZERO),
                FastMode::Default => {}
            }
        }
        match self.zero {
            ZeroMode::NoTrim => next.zero(count, offset, flags.without(Flags::MAY_TRIM), done),
            ZeroMode::Plugin => next.zero(count, offset, flags, done),
            // Only reached with fastzeromode=ignore (see info): write the zeroes ourselves, FUA
            // on the last piece only.
            ZeroMode::Emulate => {
                let (next, end, fua) = (next.clone(), offset + count, flags.contains(Flags::FUA));
                let mut pos = offset;
                sequence(
                    move || {
                        if pos >= end {
                            return None;
                        }
                        let (at, n) = (pos, (end - pos).min(CHUNK));
                        pos += n;
                        let f = if fua && pos == end { Flags::FUA } else { Flags::NONE };
                        let next = next.clone();
                        Some(Box::new(move |k: Done<()>| next.pwrite(vec![0u8; n as usize], at, f, k)))
                    },
                    done,
                )
            }
            // Not offered: the shim above never sends one.
            ZeroMode::None => done.err(NbdError::inval("nozero: write zeroes is not supported")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn setup(params: &[(&str, &str)]) -> (Rc<SimScheduler>, Rc<Ram>, Rc<blocksmith_core::layer::shim::Shim>) {
        let sim = SimScheduler::new();
        let ram = Ram::new(4 << 20);
        let top = open(&configure(&SPEC, params), &cx(&sim), ram.clone()).unwrap();
        (sim, ram, top)
    }

    #[test]
    fn zeromode_none_hides_zero() {
        let (sim, _, top) = setup(&[]);
        assert_eq!(top.info().zero, Support::None);
        assert!(!top.info().can_fast_zero);
        assert_eq!(wait(&sim, |d| top.zero(8, 0, Flags::NONE, d)).unwrap_err().errno, Errno::Inval);
    }

    #[test]
    fn zeromode_emulate_writes_zeroes() {
        let (sim, ram, top) = setup(&[("zeromode", "emulate")]);
        assert_ne!(top.info().zero, Support::None);
        wait(&sim, |d| top.zero(3 << 20, 0, Flags::MAY_TRIM, d)).unwrap();
        assert!(ram.calls().iter().all(|c| c.starts_with("pwrite")), "{:?}", ram.calls());
        assert!(ram.data.borrow()[..3 << 20].iter().all(|b| *b == 0));
        // Emulated zeroing is never fast.
        assert_eq!(wait(&sim, |d| top.zero(8, 0, Flags::FAST_ZERO, d)).unwrap_err().errno, Errno::NotSup);

        let (sim, ram, top) = setup(&[("zeromode", "emulate"), ("fastzeromode", "ignore")]);
        wait(&sim, |d| top.zero((1 << 20) + 8, 8, Flags::FAST_ZERO | Flags::FUA, d)).unwrap();
        assert_eq!(ram.calls(), ["pwrite 1048576@8 flags=0", "pwrite 8@1048584 flags=1"]);
    }

    #[test]
    fn notrim_and_fast_modes() {
        let (sim, ram, top) = setup(&[("zeromode", "notrim")]);
        wait(&sim, |d| top.zero(8, 0, Flags::MAY_TRIM | Flags::FAST_ZERO, d)).unwrap();
        assert_eq!(ram.calls(), ["zero 8@0 flags=8"]);

        let (sim, ram, top) = setup(&[("zeromode", "plugin"), ("fastzeromode", "slow")]);
        assert!(top.info().can_fast_zero);
        assert_eq!(wait(&sim, |d| top.zero(8, 0, Flags::FAST_ZERO, d)).unwrap_err().errno, Errno::NotSup);
        wait(&sim, |d| top.zero(8, 0, Flags::MAY_TRIM, d)).unwrap();
        assert_eq!(ram.calls(), ["zero 8@0 flags=2"]);

        let (sim, ram, top) = setup(&[("zeromode", "plugin"), ("fastzeromode", "ignore")]);
        wait(&sim, |d| top.zero(8, 0, Flags::FAST_ZERO, d)).unwrap();
        assert_eq!(ram.calls(), ["zero 8@0 flags=0"]);

        let (sim, ram, top) = setup(&[("zeromode", "plugin"), ("fastzeromode", "none")]);
        assert_eq!(wait(&sim, |d| top.zero(8, 0, Flags::FAST_ZERO, d)).unwrap_err().errno, Errno::NotSup);
        assert!(ram.calls().is_empty());
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert!(make_err(&SPEC, &[("zeromode", "x")]).starts_with("nozero: unknown zeromode 'x'"));
        assert!(make_err(&SPEC, &[("fastzeromode", "x")]).starts_with("nozero: unknown fastzeromode 'x'"));
    }
}
