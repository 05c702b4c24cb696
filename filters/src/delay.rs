//! The delay filter (nbdkit-delay-filter): hold each request for a fixed time before passing it
//! on, to simulate a slow or distant server.
//!
//! A delay is a timer on the connection's event loop, never a sleep: the request waits in the
//! timer queue while the loop serves everything else, so a thousand reads delayed 100 ms all
//! complete about 100 ms later, not 100 s later.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use blocksmith_core::config::{parse_bool, parse_duration, Params};
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
};
use blocksmith_core::sched::Sched;

pub const SPEC: FilterSpec = FilterSpec {
    name: "delay",
    summary: "delay requests by a fixed time (simulate a slow or remote server)",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "rdelay", help: "Read delay, e.g. 2 (seconds) or 100ms. Same as delay-read." },
    ParamSpec { name: "delay-read", help: "Read delay in seconds or with a unit (100ms)." },
    ParamSpec { name: "delay-write", help: "Write delay in seconds or with a unit (100ms)." },
    ParamSpec { name: "delay-zero", help: "Write-zeroes delay in seconds or with a unit (100ms)." },
    ParamSpec { name: "delay-trim", help: "Trim delay in seconds or with a unit (100ms)." },
    ParamSpec { name: "delay-extents", help: "Block status delay in seconds or with a unit (100ms)." },
    ParamSpec { name: "delay-cache", help: "Cache delay in seconds or with a unit (100ms)." },
    ParamSpec { name: "delay-flush", help: "Flush delay in seconds or with a unit (100ms)." },
    ParamSpec { name: "wdelay", help: "Write, zero and trim delay (sets all three)." },
    ParamSpec {
        name: "delay-fast-zero",
        help: "true (default): fast zero requests wait like other zeroes;\n\
               false: with delay-zero set, fail them at once with ENOTSUP.",
    },
];

/// Every key this filter takes, including the undocumented aliases nbdkit also accepts.
const KEYS: &[&str] = &[
    "rdelay",
    "delay-read",
    "delay-reads",
    "wdelay",
    "delay-write",
    "delay-writes",
    "delay-zero",
    "delay-zeroes",
    "delay-trim",
    "delay-trims",
    "delay-discard",
    "delay-discards",
    "delay-extent",
    "delay-extents",
    "delay-cache",
    "delay-flush",
    "delay-fast-zero",
    "delay-open",
    "delay-close",
];

/// The configured delays; zero means "no delay".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delays {
    pub read: Duration,
    pub write: Duration,
    pub zero: Duration,
    pub trim: Duration,
    pub extents: Duration,
    pub cache: Duration,
    pub flush: Duration,
    /// Delay FAST_ZERO requests too (nbdkit's default), rather than refusing them at once.
    pub fast_zero: bool,
}

impl Default for Delays {
    fn default() -> Self {
        Delays {
            read: Duration::ZERO,
            write: Duration::ZERO,
            zero: Duration::ZERO,
            trim: Duration::ZERO,
            extents: Duration::ZERO,
            cache: Duration::ZERO,
            flush: Duration::ZERO,
            fast_zero: true,
        }
    }
}

impl Delays {
    /// Take this filter's keys from `p`, leaving the rest for the layers below.
    pub fn from_params(p: &mut Params) -> Result<Delays, ConfigError> {
        // nbdkit applies keys one by one in command-line order, and they interact: `wdelay=1
        // delay-zero=2` delays zeroes 2 s but `delay-zero=2 wdelay=1` delays them 1 s. Params::take
        // keeps only the last value of each key, so recover the order across keys first.
        let order: Vec<String> = p.keys().filter(|k| KEYS.contains(k)).map(str::to_owned).collect();
        let mut values: HashMap<&str, VecDeque<String>> =
            KEYS.iter().map(|k| (*k, VecDeque::from(p.take_all(k)))).collect();
        let mut d = Delays::default();
        for key in &order {
            // take_all returned exactly one value per occurrence of the key, in order.
            if let Some(value) = values.get_mut(key.as_str()).and_then(VecDeque::pop_front) {
                d.apply(key, &value)?;
            }
        }
        Ok(d)
    }

    fn apply(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let err = |e: ConfigError| ConfigError::new(format!("delay: {key}: {}", e.0));
        let dur = || parse_duration(value).map_err(err);
        match key {
            "rdelay" | "delay-read" | "delay-reads" => self.read = dur()?,
            // Historically wdelay sets every write-like delay.
            "wdelay" => {
                let d = dur()?;
                (self.write, self.zero, self.trim) = (d, d, d);
            }
            "delay-write" | "delay-writes" => self.write = dur()?,
            "delay-zero" | "delay-zeroes" => self.zero = dur()?,
            "delay-trim" | "delay-trims" | "delay-discard" | "delay-discards" => self.trim = dur()?,
            "delay-extent" | "delay-extents" => self.extents = dur()?,
            "delay-cache" => self.cache = dur()?,
            "delay-flush" => self.flush = dur()?,
            "delay-fast-zero" => self.fast_zero = parse_bool(value).map_err(err)?,
            // Filters open synchronously (FilterFactory::open returns the layer) and Layer::close
            // has no completion, so there is nothing a timer could hold back. Refusing is better
            // than silently not delaying what the user asked to delay.
            "delay-open" | "delay-close" => {
                return Err(ConfigError::new(format!(
                    "delay: {key} is not supported: blocksmith cannot delay opening or closing a \
                     connection yet"
                )))
            }
            _ => {}
        }
        Ok(())
    }
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    Ok(Arc::new(DelayFactory(Delays::from_params(p)?)))
}

struct DelayFactory(Delays);

impl FilterFactory for DelayFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        Ok(Rc::new(FilterLayer { filter: DelayFilter { d: self.0, sched: cx.sched.clone() }, next }))
    }
}

struct DelayFilter {
    d: Delays,
    sched: Sched,
}

impl DelayFilter {
    /// Run `op` once `delay` has passed, on this connection's loop.
    fn after(&self, delay: Duration, op: impl FnOnce() + 'static) {
        if delay.is_zero() {
            op()
        } else {
            self.sched.after(delay, op);
        }
    }
}

impl Filter for DelayFilter {
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let next = next.clone();
        self.after(self.d.read, move || next.pread(buf, offset, flags, done))
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.after(self.d.write, move || next.pwrite(data, offset, flags, done))
    }

    fn flush(&self, next: &Next, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.after(self.d.flush, move || next.flush(flags, done))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.after(self.d.trim, move || next.trim(count, offset, flags, done))
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        if flags.contains(Flags::FAST_ZERO) && !self.d.zero.is_zero() && !self.d.fast_zero {
            // The client asked to be told at once when zeroing is slow, and it is.
            return done
                .err(NbdError::msg(Errno::NotSup, "zero requests are delayed (delay-fast-zero=false)"));
        }
        let next = next.clone();
        self.after(self.d.zero, move || next.zero(count, offset, flags, done))
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        let next = next.clone();
        self.after(self.d.extents, move || next.extents(count, offset, flags, done))
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.after(self.d.cache, move || next.cache(count, offset, flags, done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::layer::Support;
    use blocksmith_core::sched::SimScheduler;
    use std::cell::{Cell, RefCell};

    const MS: Duration = Duration::from_millis(1);

    fn delays(params: &[(&str, &str)]) -> Delays {
        let mut p = Params::new();
        for (k, v) in params {
            p.push(*k, *v);
        }
        let d = Delays::from_params(&mut p).unwrap_or_else(|e| panic!("{params:?}: {e}"));
        assert!(p.is_empty());
        d
    }

    #[test]
    fn thousand_concurrent_reads_take_one_delay_not_a_thousand() {
        let sim = SimScheduler::new();
        let ram = Ram::new(1 << 20);
        let top = open(&configure(&SPEC, &[("rdelay", "100ms")]), &cx(&sim), ram.clone()).unwrap();

        let completed = Rc::new(Cell::new(0usize));
        let finished_at = Rc::new(RefCell::new(Vec::new()));
        for i in 0..1000u64 {
            let (completed, finished_at, sim2) = (completed.clone(), finished_at.clone(), sim.clone());
            let offset = i * 512;
            top.pread(
                vec![0; 512],
                offset,
                Flags::NONE,
                Done::new(move |r: Result<Vec<u8>, NbdError>| {
                    let buf = r.expect("read succeeds");
                    assert_eq!(buf[0], (offset % 251) as u8, "data from the right offset");
                    completed.set(completed.get() + 1);
                    finished_at.borrow_mut().push(sim2.elapsed());
                }),
            );
        }
        // Nothing reached the backend yet: every read is waiting on a timer, none on a sleep.
        assert_eq!(completed.get(), 0);
        assert!(ram.calls().is_empty());

        sim.run_until_idle();
        assert_eq!(completed.get(), 1000);
        assert_eq!(ram.calls().len(), 1000);
        assert_eq!(sim.elapsed(), 100 * MS);
        assert!(finished_at.borrow().iter().all(|t| *t == 100 * MS));
    }

    #[test]
    fn each_operation_gets_its_own_delay() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let f = configure(
            &SPEC,
            &[
                ("delay-read", "1ms"),
                ("delay-write", "2ms"),
                ("delay-zero", "3ms"),
                ("delay-trim", "4ms"),
                ("delay-extents", "5ms"),
                ("delay-cache", "6ms"),
                ("delay-flush", "7ms"),
            ],
        );
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        let took = |op: &dyn Fn(Done<()>)| {
            let start = sim.elapsed();
            wait(&sim, op).unwrap();
            sim.elapsed() - start
        };
        assert_eq!(took(&|d| top.pread(vec![0; 1], 0, Flags::NONE, d.map(|r| r.map(drop)))), MS);
        assert_eq!(took(&|d| top.pwrite(vec![1; 1], 0, Flags::FUA, d)), 2 * MS);
        assert_eq!(took(&|d| top.zero(512, 0, Flags::MAY_TRIM, d)), 3 * MS);
        assert_eq!(took(&|d| top.trim(512, 0, Flags::NONE, d)), 4 * MS);
        assert_eq!(took(&|d| top.extents(512, 0, Flags::NONE, d.map(|r| r.map(drop)))), 5 * MS);
        assert_eq!(took(&|d| top.cache(512, 0, Flags::NONE, d)), 6 * MS);
        assert_eq!(took(&|d| top.flush(Flags::NONE, d)), 7 * MS);
        // Requests and their flags arrive below unchanged.
        assert_eq!(
            ram.calls(),
            [
                "pread 1@0",
                "pwrite 1@0 flags=1",
                "zero 512@0 flags=2",
                "trim 512@0 flags=0",
                "extents 512@0",
                "cache 512@0",
                "flush"
            ]
        );
    }

    #[test]
    fn emulated_zero_is_delayed_as_a_zero() {
        // Below, zeroing is emulated by writes; the delay filter must still see (and delay) one
        // zero request rather than a write per emulation chunk.
        let sim = SimScheduler::new();
        let ram = Ram::with(4 << 20, |r| r.info.zero = Support::Emulate);
        let top =
            open(&configure(&SPEC, &[("delay-zero", "10ms"), ("delay-write", "1s")]), &cx(&sim), ram.clone())
                .unwrap();
        wait(&sim, |d| top.zero(3 << 20, 0, Flags::NONE, d)).unwrap();
        assert_eq!(sim.elapsed(), 10 * MS);
        assert_eq!(ram.calls().len(), 3, "emulated by three 1 MiB writes below the filter");
        assert!(ram.data.borrow()[..3 << 20].iter().all(|b| *b == 0));
    }

    #[test]
    fn fast_zero_fails_at_once_when_asked_not_to_delay_it() {
        let sim = SimScheduler::new();
        let ram = Ram::new(65536);
        let f = configure(&SPEC, &[("delay-zero", "1s"), ("delay-fast-zero", "false")]);
        let top = open(&f, &cx(&sim), ram.clone()).unwrap();
        assert!(top.info().can_fast_zero);
        let e = wait(&sim, |d| top.zero(512, 0, Flags::FAST_ZERO, d)).unwrap_err();
        assert_eq!(e.errno, Errno::NotSup);
        assert_eq!(sim.elapsed(), Duration::ZERO);
        assert!(ram.calls().is_empty());
        // A plain zero still waits.
        wait(&sim, |d| top.zero(512, 0, Flags::NONE, d)).unwrap();
        assert_eq!(sim.elapsed(), Duration::from_secs(1));

        // By default a fast zero is delayed like any other.
        let sim = SimScheduler::new();
        let top = open(&configure(&SPEC, &[("delay-zero", "1s")]), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.zero(512, 0, Flags::FAST_ZERO, d)).unwrap();
        assert_eq!(sim.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn no_delay_means_no_timer() {
        let sim = SimScheduler::new();
        let top = open(&configure(&SPEC, &[]), &cx(&sim), Ram::new(4096)).unwrap();
        let done = Rc::new(Cell::new(false));
        let d2 = done.clone();
        top.pread(
            vec![0; 1],
            0,
            Flags::NONE,
            Done::new(move |r: Result<Vec<u8>, NbdError>| d2.set(r.is_ok())),
        );
        assert!(done.get(), "completed synchronously, without a trip through the scheduler");
        assert_eq!(sim.run_until_idle(), 0);
    }

    #[test]
    fn parameters_follow_nbdkit() {
        let s = Duration::from_secs(1);
        assert_eq!(delays(&[("rdelay", "2")]).read, 2 * s);
        assert_eq!(delays(&[("delay-reads", "100ms")]).read, 100 * MS);
        let d = delays(&[("wdelay", "1")]);
        assert_eq!((d.write, d.zero, d.trim), (s, s, s));
        // Later keys override earlier ones, across aliases and wdelay, in command-line order.
        let d = delays(&[("wdelay", "1"), ("delay-zero", "2")]);
        assert_eq!((d.write, d.zero, d.trim), (s, 2 * s, s));
        let d = delays(&[("delay-zero", "2"), ("wdelay", "1")]);
        assert_eq!(d.zero, s);
        assert_eq!(delays(&[("delay-read", "5"), ("rdelay", "3"), ("delay-read", "4")]).read, 4 * s);
        assert_eq!(delays(&[("delay-discard", "7ms")]).trim, 7 * MS);
        assert_eq!(delays(&[("delay-extent", "8ms")]).extents, 8 * MS);
        assert!(delays(&[]).fast_zero);
        assert!(!delays(&[("delay-fast-zero", "off")]).fast_zero);
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        let e = make_err(&SPEC, &[("rdelay", "soon")]);
        assert!(e.starts_with("delay: rdelay: could not parse duration 'soon'"), "{e}");
        // Every occurrence is checked, not just the last one.
        let e = make_err(&SPEC, &[("delay-write", "-1"), ("delay-write", "1")]);
        assert!(e.contains("delay-write"), "{e}");
        let e = make_err(&SPEC, &[("delay-trim", "5 fortnights")]);
        assert!(e.contains("unknown unit"), "{e}");
        let e = make_err(&SPEC, &[("delay-fast-zero", "perhaps")]);
        assert!(e.starts_with("delay: delay-fast-zero: could not parse boolean"), "{e}");
        let e = make_err(&SPEC, &[("delay-open", "1")]);
        assert!(e.contains("delay-open is not supported"), "{e}");
        let e = make_err(&SPEC, &[("delay-close", "1")]);
        assert!(e.contains("delay-close is not supported"), "{e}");
    }
}
