//! The error filter (nbdkit-error-filter): inject errors into requests, at random, to test how
//! clients cope.
//!
//! `error=`, `error-rate=` and `error-file=` set the errno, the probability and the trigger file
//! for reads, writes, trims, zeroes, block status and cache requests together; `error-OP`,
//! `error-OP-rate` and `error-OP-file` set them for one of `pread`, `pwrite`, `trim`, `zero`,
//! `extents`, `cache`. Keys apply in command-line order, so a later general key overrides an
//! earlier specific one, as in nbdkit. `error-flush*` is a blocksmith extension: flushes fail
//! only if it is given (nbdkit cannot inject errors into flushes).
//!
//! With a trigger file, errors are injected only while the file exists. It is looked at with one
//! stat(2) per request at most every millisecond per connection — a local, cheap system call,
//! the same check nbdkit makes per request. Each connection draws from its own generator, seeded
//! from the clock and the connection number.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
};
use blocksmith_core::sched::Sched;

use crate::rng::{absolute, parse_probability, splitmix64, time_seed, Rng};

pub const SPEC: FilterSpec = FilterSpec {
    name: "error",
    summary: "inject errors into requests at random (test how clients cope)",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "error",
        help: "The error to inject: EPERM, EIO (default), ENOMEM, EINVAL, ENOSPC, ESHUTDOWN,\n\
               EOVERFLOW or ENOTSUP.",
    },
    ParamSpec {
        name: "error-rate",
        help: "How often to inject: 10%, 0.1 or 1:10 (default 0: never; 100% or 1: always).",
    },
    ParamSpec { name: "error-file", help: "Inject errors only while this file exists." },
    ParamSpec {
        name: "error-pread",
        help: "error-pread, error-pread-rate, error-pread-file: the same for reads only;\n\
               likewise error-pwrite*, error-trim*, error-zero*, error-extents*, error-cache*\n\
               and (blocksmith only) error-flush*.",
    },
];

/// Operations in the order of [`Settings`]. The general keys cover all but flush.
const OPS: [&str; 7] = ["pread", "pwrite", "trim", "zero", "extents", "cache", "flush"];
const FLUSH: usize = 6;

#[derive(Clone, Debug, PartialEq)]
struct Setting {
    errno: Errno,
    rate: f64,
    file: Option<PathBuf>,
}

impl Default for Setting {
    fn default() -> Self {
        Setting { errno: Errno::Io, rate: 0.0, file: None }
    }
}

type Settings = [Setting; 7];

fn parse_errno(key: &str, v: &str) -> Result<Errno, ConfigError> {
    Errno::from_name(v).ok_or_else(|| ConfigError::new(format!("error: {key}: unknown error name '{v}'")))
}

fn apply(s: &mut Settings, key: &str, value: &str) -> Result<(), ConfigError> {
    // "error", "error-rate", "error-file" or "error-OP", "error-OP-rate", "error-OP-file".
    let rest = key.strip_prefix("error").unwrap_or(key);
    let (op, what) = match rest.strip_prefix('-') {
        None => (None, ""),
        Some(r) => match OPS.iter().position(|op| r == *op || r.starts_with(&format!("{op}-"))) {
            Some(i) => (Some(i), &r[OPS[i].len()..]),
            None => (None, rest),
        },
    };
    let targets: Vec<usize> = match op {
        Some(i) => vec![i],
        None => (0..FLUSH).collect(),
    };
    match what.trim_start_matches('-') {
        "" => {
            let e = parse_errno(key, value)?;
            targets.iter().for_each(|i| s[*i].errno = e);
        }
        "rate" => {
            let r = parse_probability(key, value).map_err(|e| ConfigError::new(format!("error: {}", e.0)))?;
            targets.iter().for_each(|i| s[*i].rate = r);
        }
        "file" => {
            let f = absolute(value);
            targets.iter().for_each(|i| s[*i].file = Some(f.clone()));
        }
        _ => return Err(ConfigError::new(format!("error: unknown parameter '{key}'"))),
    }
    Ok(())
}

fn keys() -> Vec<String> {
    let mut k = vec!["error".to_string(), "error-rate".to_string(), "error-file".to_string()];
    for op in OPS {
        k.push(format!("error-{op}"));
        k.push(format!("error-{op}-rate"));
        k.push(format!("error-{op}-file"));
    }
    k
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    Ok(Arc::new(ErrorFactory { settings: Arc::new(settings_from(p)?) }))
}

fn settings_from(p: &mut Params) -> Result<Settings, ConfigError> {
    let keys = keys();
    // Keys interact (a general key resets what an earlier specific one set), so apply them in
    // command-line order.
    let order: Vec<String> = p.keys().filter(|k| keys.iter().any(|x| x == k)).map(str::to_owned).collect();
    let mut values: HashMap<String, VecDeque<String>> =
        keys.iter().map(|k| (k.clone(), VecDeque::from(p.take_all(k)))).collect();
    let mut s: Settings = Default::default();
    for key in &order {
        if let Some(v) = values.get_mut(key).and_then(VecDeque::pop_front) {
            apply(&mut s, key, &v)?;
        }
    }
    Ok(s)
}

struct ErrorFactory {
    settings: Arc<Settings>,
}

impl FilterFactory for ErrorFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let filter = ErrorFilter {
            settings: self.settings.clone(),
            rng: RefCell::new(Rng::new(time_seed() ^ splitmix64(cx.conn_id))),
            triggers: Default::default(),
            sched: cx.sched.clone(),
        };
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

/// How long a look at a trigger file is trusted.
const TRIGGER_TTL: Duration = Duration::from_millis(1);

struct ErrorFilter {
    settings: Arc<Settings>,
    rng: RefCell<Rng>,
    /// Per operation: when its trigger file was last looked at, and whether it existed.
    triggers: [Cell<Option<(Instant, bool)>>; 7],
    sched: Sched,
}

impl ErrorFilter {
    /// The error to inject into this request of operation `op`, if any.
    fn inject(&self, op: usize) -> Option<NbdError> {
        let s = &self.settings[op];
        if s.rate <= 0.0 {
            return None;
        }
        if let Some(f) = &s.file {
            let now = self.sched.now();
            let exists = match self.triggers[op].get() {
                Some((at, e)) if now.saturating_duration_since(at) < TRIGGER_TTL => e,
                _ => {
                    let e = f.exists();
                    self.triggers[op].set(Some((now, e)));
                    e
                }
            };
            if !exists {
                return None;
            }
        }
        if !self.rng.borrow_mut().chance(s.rate) {
            return None;
        }
        let msg = format!("injecting {} error into {}", s.errno.name(), OPS[op]);
        ::log::debug!("error filter: {msg}");
        Some(NbdError::msg(s.errno, msg))
    }
}

impl Filter for ErrorFilter {
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        match self.inject(0) {
            Some(e) => done.err(e),
            None => next.pread(buf, offset, flags, done),
        }
    }
    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        match self.inject(1) {
            Some(e) => done.err(e),
            None => next.pwrite(data, offset, flags, done),
        }
    }
    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.inject(2) {
            Some(e) => done.err(e),
            None => next.trim(count, offset, flags, done),
        }
    }
    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.inject(3) {
            Some(e) => done.err(e),
            None => next.zero(count, offset, flags, done),
        }
    }
    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        match self.inject(4) {
            Some(e) => done.err(e),
            None => next.extents(count, offset, flags, done),
        }
    }
    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        match self.inject(5) {
            Some(e) => done.err(e),
            None => next.cache(count, offset, flags, done),
        }
    }
    fn flush(&self, next: &Next, flags: Flags, done: Done<()>) {
        match self.inject(FLUSH) {
            Some(e) => done.err(e),
            None => next.flush(flags, done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn settings(params: &[(&str, &str)]) -> Settings {
        let mut p = Params::new();
        for (k, v) in params {
            p.push(*k, *v);
        }
        let s = settings_from(&mut p).unwrap_or_else(|e| panic!("{params:?}: {e}"));
        assert!(p.is_empty(), "left {:?}", p.keys().collect::<Vec<_>>());
        s
    }

    #[test]
    fn keys_apply_in_order_and_per_operation() {
        let s = settings(&[("error-rate", "10%"), ("error-pread-rate", "0"), ("error", "ENOSPC")]);
        assert_eq!(s[0].rate, 0.0);
        assert_eq!(s[1].rate, 0.1);
        assert!(s[..FLUSH].iter().all(|x| x.errno == Errno::NoSpc));
        assert_eq!(s[FLUSH].rate, 0.0, "general keys leave flush alone");
        let s = settings(&[("error-pread-rate", "0"), ("error-rate", "1")]);
        assert_eq!(s[0].rate, 1.0, "a later general key wins");
        let s =
            settings(&[("error-flush-rate", "1:2"), ("error-flush", "EPERM"), ("error-cache-file", "/x")]);
        assert_eq!((s[FLUSH].rate, s[FLUSH].errno), (0.5, Errno::Perm));
        assert_eq!(s[5].file, Some(PathBuf::from("/x")));
        let s = settings(&[("error-file", "rel")]);
        assert!(s[0].file.as_ref().unwrap().is_absolute());
    }

    #[test]
    fn always_and_never() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let f = configure(&SPEC, &[("error-pwrite-rate", "100%"), ("error", "ENOSPC")]);
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        let e = wait(&sim, |d| top.pwrite(vec![1; 10], 0, Flags::NONE, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NoSpc);
        assert_eq!(e.message.as_deref(), Some("injecting ENOSPC error into pwrite"));
        wait(&sim, |d| top.pread(vec![0; 10], 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert_eq!(ram.calls(), ["pread 10@0", "flush"]);
    }

    #[test]
    fn rate_is_roughly_honoured() {
        let sim = SimScheduler::new();
        let top = open(&configure(&SPEC, &[("error-rate", "25%")]), &cx(&sim), Ram::new(4096)).unwrap();
        let failed =
            (0..4000).filter(|_| wait(&sim, |d| top.pread(vec![0; 1], 0, Flags::NONE, d)).is_err()).count();
        assert!((800..1200).contains(&failed), "{failed} of 4000");
    }

    #[test]
    fn trigger_file_switches_errors_on_and_off() {
        let sim = SimScheduler::new();
        let dir = std::env::temp_dir().join(format!("bs-errtrig-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let path = dir.to_string_lossy().into_owned();
        let f = configure(&SPEC, &[("error-rate", "1"), ("error-file", &path)]);
        let top = open(&f, &cx(&sim), Ram::new(4096)).unwrap();
        let ok = |sim: &SimScheduler| wait(sim, |d| top.pread(vec![0; 1], 0, Flags::NONE, d)).is_ok();
        assert!(ok(&sim));
        std::fs::write(&dir, b"").unwrap();
        // The last look is trusted for a millisecond of (virtual) time.
        sim.sched().after(Duration::from_millis(2), || {});
        sim.run_until_idle();
        assert!(!ok(&sim));
        std::fs::remove_file(&dir).unwrap();
        sim.sched().after(Duration::from_millis(2), || {});
        sim.run_until_idle();
        assert!(ok(&sim));
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(make_err(&SPEC, &[("error", "EWHATEVER")]).contains("unknown error name"));
        assert!(make_err(&SPEC, &[("error-rate", "200%")]).contains("out of range"));
        assert!(make_err(&SPEC, &[("error-zero-rate", "often")]).contains("could not parse"));
    }
}
