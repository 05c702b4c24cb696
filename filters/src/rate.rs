//! The rate filter (nbdkit-rate-filter): limit read and write bandwidth, per connection
//! (`connection-rate=`) and for the whole server (`rate=`), in bits per second.
//!
//! Token buckets, as in nbdkit: reads and writes have separate buckets, one pair per connection
//! and one pair for the server (shared by every loop behind a mutex). Buckets hold up to
//! `burstiness` seconds (default 2) of their rate and start full. A request takes its size in
//! bits from its buckets at once, possibly running them into debt, and waits — on a reactor
//! timer, never a sleep — until the debt would be repaid. Requests thus leave in order at the
//! configured rate, and the loop serves everything else meanwhile. Zero and trim requests carry
//! no data and are free, as in nbdkit.
//!
//! `rate-file=` and `connection-rate-file=` adjust the limits while the server runs: the file is
//! read (on the blocking pool) at most once a second, when requests arrive; a missing file keeps
//! the current rate.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blocksmith_core::config::{parse_size, Params};
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
};
use blocksmith_core::sched::Sched;

use crate::overlay::lock;
use crate::rng::absolute;

pub const SPEC: FilterSpec = FilterSpec {
    name: "rate",
    summary: "limit bandwidth per connection and for the whole server",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "rate", help: "Limit the whole server to BITSPERSEC, e.g. 1M (megabits per second)." },
    ParamSpec { name: "connection-rate", help: "Limit each connection to BITSPERSEC." },
    ParamSpec {
        name: "rate-file",
        help: "Read the server limit from this file while running (checked at most once a second).",
    },
    ParamSpec {
        name: "connection-rate-file",
        help: "Read the per-connection limit from this file while running.",
    },
    ParamSpec {
        name: "burstiness",
        help: "Bucket capacity in seconds of the rate: how long a client may burst after idling\n\
               (default 2.0).",
    },
];

/// How often a rate file is read at most.
const RATE_FILE_INTERVAL: Duration = Duration::from_secs(1);

/// A token bucket counting bits. `rate == 0` means no limit.
#[derive(Debug)]
struct Bucket {
    rate: u64,
    burst_secs: f64,
    /// May go negative: requests already admitted that the bucket has not paid for yet.
    level: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn new(rate: u64, burst_secs: f64) -> Bucket {
        Bucket { rate, burst_secs, level: rate as f64 * burst_secs, last: None }
    }

    fn capacity(&self) -> f64 {
        self.rate as f64 * self.burst_secs
    }

    fn adjust(&mut self, rate: u64) {
        if rate != self.rate {
            ::log::debug!("rate: adjusted from {} to {rate} bits per second", self.rate);
            self.rate = rate;
            self.level = self.level.min(self.capacity());
        }
    }

    /// Take `bits` at `now`; how long the request must wait before it goes.
    fn take(&mut self, bits: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        // Clocks of different loops may be a little apart: time never runs backwards here.
        let elapsed = self.last.map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        match self.last {
            Some(l) if l >= now => {}
            _ => self.last = Some(now),
        }
        self.level = (self.level + self.rate as f64 * elapsed.as_secs_f64()).min(self.capacity());
        self.level -= bits as f64;
        if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.rate as f64)
        }
    }
}

/// A file holding a rate, read now and then.
struct RateFile {
    path: PathBuf,
    state: Mutex<FileState>,
}

#[derive(Default)]
struct FileState {
    checked: Option<Instant>,
    reading: bool,
    value: Option<u64>,
}

impl RateFile {
    /// The last rate read, after starting a fresh read if it is due. `apply` runs with each new
    /// value on this loop.
    fn poll(self: &Arc<Self>, sched: &Sched, apply: impl FnOnce(u64) + 'static) -> Option<u64> {
        let now = sched.now();
        let mut st = lock(&self.state);
        let due = !st.reading
            && match st.checked {
                None => true,
                Some(c) => now.saturating_duration_since(c) >= RATE_FILE_INTERVAL,
            };
        if due {
            st.reading = true;
            st.checked = Some(now);
            let (me, path) = (self.clone(), self.path.clone());
            sched.blocking(
                move || read_rate(&path),
                move |v: Option<u64>| {
                    let mut st = lock(&me.state);
                    st.reading = false;
                    if let Some(v) = v {
                        st.value = Some(v);
                        drop(st);
                        apply(v);
                    }
                },
            );
        }
        st.value
    }
}

/// The rate in a file's first line, or `None` if it is missing or unreadable (not an error:
/// the current rate stays).
fn read_rate(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().next()?.trim();
    match parse_size(line) {
        Ok(v) => Some(v),
        Err(e) => {
            ::log::warn!("rate: {}: {}", path.display(), e.0);
            None
        }
    }
}

struct Limits {
    rate: u64,
    connection_rate: u64,
    burst: f64,
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let once = |p: &mut Params, key: &str| -> Result<u64, ConfigError> {
        let vals = p.take_all(key);
        if vals.len() > 1 {
            return Err(ConfigError::new(format!("rate: {key} set twice on the command line")));
        }
        match vals.first() {
            None => Ok(0),
            Some(v) => match parse_size(v) {
                Ok(0) => Err(ConfigError::new(format!("rate: {key} cannot be 0"))),
                Ok(n) => Ok(n),
                Err(e) => Err(ConfigError::new(format!("rate: {key}: {}", e.0))),
            },
        }
    };
    let rate = once(p, "rate")?;
    let connection_rate = once(p, "connection-rate")?;
    let burst = match p.take("burstiness") {
        None => 2.0,
        Some(v) => match v.trim().parse::<f64>() {
            Ok(b) if b.is_finite() && b > 0.0 && b <= 86400.0 => b,
            _ => {
                return Err(ConfigError::new(format!(
                    "rate: burstiness must be a number of seconds above 0, got '{v}'"
                )))
            }
        },
    };
    let file = |p: &mut Params, key: &str| {
        p.take(key)
            .map(|v| Arc::new(RateFile { path: absolute(&v), state: Mutex::new(FileState::default()) }))
    };
    let rate_file = file(p, "rate-file");
    let connection_rate_file = file(p, "connection-rate-file");
    let limits = Limits { rate, connection_rate, burst };
    Ok(Arc::new(RateFactory {
        read: Arc::new(Mutex::new(Bucket::new(limits.rate, burst))),
        write: Arc::new(Mutex::new(Bucket::new(limits.rate, burst))),
        limits,
        rate_file,
        connection_rate_file,
    }))
}

struct RateFactory {
    limits: Limits,
    /// The server's buckets.
    read: Arc<Mutex<Bucket>>,
    write: Arc<Mutex<Bucket>>,
    rate_file: Option<Arc<RateFile>>,
    connection_rate_file: Option<Arc<RateFile>>,
}

impl FilterFactory for RateFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let (rate, burst) = (self.limits.connection_rate, self.limits.burst);
        let filter = RateFilter {
            global: [self.read.clone(), self.write.clone()],
            conn: Rc::new([RefCell::new(Bucket::new(rate, burst)), RefCell::new(Bucket::new(rate, burst))]),
            rate_file: self.rate_file.clone(),
            connection_rate_file: self.connection_rate_file.clone(),
            sched: cx.sched.clone(),
        };
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

const READ: usize = 0;
const WRITE: usize = 1;

struct RateFilter {
    global: [Arc<Mutex<Bucket>>; 2],
    conn: Rc<[RefCell<Bucket>; 2]>,
    rate_file: Option<Arc<RateFile>>,
    connection_rate_file: Option<Arc<RateFile>>,
    sched: Sched,
}

impl RateFilter {
    /// How long a transfer of `bytes` in direction `dir` must wait.
    fn delay(&self, dir: usize, bytes: usize) -> Duration {
        if let Some(f) = &self.rate_file {
            let buckets = self.global.clone();
            // A new value applies to both server buckets as soon as it is read.
            let v = f.poll(&self.sched, move |v| buckets.iter().for_each(|b| lock(b).adjust(v)));
            if let Some(v) = v {
                lock(&self.global[dir]).adjust(v);
            }
        }
        if let Some(f) = &self.connection_rate_file {
            let conn = self.conn.clone();
            let v = f.poll(&self.sched, move |v| conn.iter().for_each(|b| b.borrow_mut().adjust(v)));
            if let Some(v) = v {
                self.conn[dir].borrow_mut().adjust(v);
            }
        }
        let now = self.sched.now();
        let bits = bytes as u64 * 8;
        let g = lock(&self.global[dir]).take(bits, now);
        let c = self.conn[dir].borrow_mut().take(bits, now);
        g.max(c)
    }

    fn after(&self, wait: Duration, op: impl FnOnce() + 'static) {
        if wait.is_zero() {
            op()
        } else {
            self.sched.after(wait, op);
        }
    }
}

impl Filter for RateFilter {
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let wait = self.delay(READ, buf.len());
        let next = next.clone();
        self.after(wait, move || next.pread(buf, offset, flags, done))
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let wait = self.delay(WRITE, data.len());
        let next = next.clone();
        self.after(wait, move || next.pwrite(data, offset, flags, done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;
    use std::cell::Cell;

    const MIB: usize = 1 << 20;

    /// Read `n` chunks of `chunk` bytes back to back (each issued when the last completes) and
    /// return the virtual time it took.
    fn stream(
        sim: &Rc<SimScheduler>,
        top: &Rc<impl Layer + ?Sized + 'static>,
        chunk: usize,
        n: usize,
    ) -> Duration {
        let start = sim.elapsed();
        for _ in 0..n {
            wait(sim, |d| top.pread(vec![0; chunk], 0, Flags::NONE, d)).unwrap();
        }
        sim.elapsed() - start
    }

    #[test]
    fn a_connection_is_held_to_its_rate_after_the_burst() {
        let sim = SimScheduler::new();
        // 8 Mbit/s = 1 MiB/s (size suffixes are powers of 1024), 1 s of burst.
        let f = configure(&SPEC, &[("connection-rate", "8M"), ("burstiness", "1")]);
        let top = open(&f, &cx(&sim), Ram::new(MIB)).unwrap();
        // The first MiB is the burst: no wait.
        assert_eq!(stream(&sim, &top, 64 << 10, 16), Duration::ZERO);
        // Then 4 MiB take 4 s.
        let t = stream(&sim, &top, 64 << 10, 64);
        assert!((t.as_secs_f64() - 4.0).abs() < 0.01, "{t:?}");
        // Writes have their own bucket, full at first.
        let t0 = sim.elapsed();
        wait(&sim, |d| top.pwrite(vec![0; 1000], 0, Flags::NONE, d)).unwrap();
        assert_eq!(sim.elapsed(), t0);
    }

    #[test]
    fn the_server_limit_is_shared_by_connections() {
        let sim = SimScheduler::new();
        let f = configure(&SPEC, &[("rate", "8M"), ("burstiness", "0.5")]);
        let a = open(&f, &cx(&sim), Ram::new(MIB)).unwrap();
        let b = open(&f, &cx(&sim), Ram::new(MIB)).unwrap();
        // Two connections each read 2 MiB at once: 4 MiB at 1 MiB/s less the half-second burst.
        let done = Rc::new(Cell::new(0));
        for top in [&a, &b] {
            for _ in 0..32 {
                let d = done.clone();
                top.pread(
                    vec![0; 64 << 10],
                    0,
                    Flags::NONE,
                    Done::new(move |r: Result<Vec<u8>, NbdError>| {
                        r.unwrap();
                        d.set(d.get() + 1)
                    }),
                );
            }
        }
        sim.run_until_idle();
        assert_eq!(done.get(), 64);
        assert!((sim.elapsed().as_secs_f64() - 3.5).abs() < 0.01, "{:?}", sim.elapsed());
    }

    #[test]
    fn no_limit_means_no_timer() {
        let sim = SimScheduler::new();
        let top = open(&configure(&SPEC, &[]), &cx(&sim), Ram::new(MIB)).unwrap();
        assert_eq!(stream(&sim, &top, MIB, 10), Duration::ZERO);
        // Zero and trim are free.
        let f = configure(&SPEC, &[("rate", "1")]);
        let top = open(&f, &cx(&sim), Ram::new(MIB)).unwrap();
        let t0 = sim.elapsed();
        wait(&sim, |d| top.zero(MIB as u64, 0, Flags::NONE, d)).unwrap();
        assert_eq!(sim.elapsed(), t0);
    }

    #[test]
    fn rate_file_adjusts_the_limit() {
        let sim = SimScheduler::new();
        let path = std::env::temp_dir().join(format!("bs-ratefile-{}", std::process::id()));
        std::fs::write(&path, "80M\n").unwrap();
        let p = path.to_string_lossy().into_owned();
        let f =
            configure(&SPEC, &[("connection-rate", "8M"), ("connection-rate-file", &p), ("burstiness", "1")]);
        let top = open(&f, &cx(&sim), Ram::new(MIB)).unwrap();
        // The first request finds the file unread and goes at 8M; the value read (10 MiB/s)
        // applies from then on.
        stream(&sim, &top, 64 << 10, 16);
        let t = stream(&sim, &top, 64 << 10, 160);
        assert!(t.as_secs_f64() < 1.2, "{t:?}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(make_err(&SPEC, &[("rate", "0")]).contains("cannot be 0"));
        assert!(make_err(&SPEC, &[("rate", "1M"), ("rate", "2M")]).contains("set twice"));
        assert!(make_err(&SPEC, &[("connection-rate", "fast")]).contains("connection-rate"));
        assert!(make_err(&SPEC, &[("burstiness", "0")]).contains("burstiness"));
    }
}
