//! The scan filter (nbdkit-scan-filter): while clients are connected, prefetch the whole disk
//! from start to end with cache requests to the layer below, so a client that later reads it
//! finds it warm. Put `--filter=cache` (or `--filter=cow ... cow-on-cache=true`) below it for
//! layers that have no cache of their own.
//!
//! One scan runs for the whole server, on the event loop of a connected client, one request of
//! `scan-size` (default 2M) at a time: the pace is bounded by the layer below. If the client
//! running it disconnects, the next request of another client takes it over.
//!
//! - `scan-ahead=true` (default): when a client reads past the scan, the scan skips ahead to
//!   after that read.
//! - `scan-clock=true` (default): when every client has gone and one comes back, the scan
//!   resumes where it stopped; `false` starts again from the beginning.
//! - `scan-forever=false` (default): scan once; `true`: start over at the end, as long as
//!   clients are connected.
//!
//! As in nbdkit, only the default export is scanned, and nothing is done if the layer below
//! cannot cache at all (a warning is logged).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use blocksmith_core::config::Params;
use blocksmith_core::control::ServerControl;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec, Support,
};
use blocksmith_core::sched::Sched;

use crate::overlay::lock;

pub const SPEC: FilterSpec = FilterSpec {
    name: "scan",
    summary: "prefetch the whole disk in the background while clients are connected",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "scan-ahead", help: "true (default): skip ahead when a client reads past the scan." },
    ParamSpec {
        name: "scan-clock",
        help: "true (default): resume where the scan stopped when clients come back;\n\
               false: start again from the beginning.",
    },
    ParamSpec { name: "scan-forever", help: "true: start over at the end; false (default): scan once." },
    ParamSpec { name: "scan-size", help: "Prefetch request size: a power of two (default 2M)." },
];

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let err = |e: ConfigError| ConfigError::new(format!("scan: {}", e.0));
    let ahead = p.take_bool("scan-ahead").map_err(err)?.unwrap_or(true);
    let clock = p.take_bool("scan-clock").map_err(err)?.unwrap_or(true);
    let forever = p.take_bool("scan-forever").map_err(err)?.unwrap_or(false);
    let size = p.take_size("scan-size").map_err(err)?.unwrap_or(2 << 20);
    if !size.is_power_of_two() || !(512..=(64 << 20)).contains(&size) {
        return Err(ConfigError::new(format!(
            "scan: scan-size must be a power of two from 512 to 64M, got {size}"
        )));
    }
    Ok(Arc::new(ScanFactory(Arc::new(Shared {
        ahead,
        clock,
        forever,
        size,
        pos: Mutex::new(Pos { next: 0, finished: false }),
        running: AtomicBool::new(false),
        clients: AtomicUsize::new(0),
        warned: AtomicBool::new(false),
    }))))
}

struct Shared {
    ahead: bool,
    clock: bool,
    forever: bool,
    size: u64,
    pos: Mutex<Pos>,
    /// A connection's loop is running the scan.
    running: AtomicBool,
    clients: AtomicUsize,
    warned: AtomicBool,
}

struct Pos {
    /// Where the next prefetch starts.
    next: u64,
    finished: bool,
}

struct ScanFactory(Arc<Shared>);

impl FilterFactory for ScanFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let info = next.info();
        let scannable = cx.export_name.is_empty() && info.cache != Support::None;
        if info.cache == Support::None && !self.0.warned.swap(true, Ordering::Relaxed) {
            ::log::warn!(
                "scan: the layer below cannot cache; nothing will be prefetched (add --filter=cache)"
            );
        }
        self.0.clients.fetch_add(1, Ordering::SeqCst);
        let conn = Rc::new(ScanConn {
            sh: self.0.clone(),
            sched: cx.sched.clone(),
            control: cx.control.clone(),
            disk: info.size,
            scannable,
            closed: Cell::new(false),
            scanning: Cell::new(false),
        });
        conn.try_start(&next);
        Ok(Rc::new(FilterLayer { filter: Scan(conn), next }))
    }
}

struct ScanConn {
    sh: Arc<Shared>,
    sched: Sched,
    control: Arc<ServerControl>,
    disk: u64,
    scannable: bool,
    closed: Cell<bool>,
    /// This connection runs the scan.
    scanning: Cell<bool>,
}

impl ScanConn {
    fn try_start(self: &Rc<Self>, next: &Next) {
        if !self.scannable || self.closed.get() || lock(&self.sh.pos).finished {
            return;
        }
        if self.sh.running.swap(true, Ordering::SeqCst) {
            return;
        }
        self.scanning.set(true);
        ScanConn::step(self.clone(), next.clone());
    }

    fn stop(&self) {
        self.scanning.set(false);
        self.sh.running.store(false, Ordering::SeqCst);
    }

    /// Prefetch the next chunk, then go on from the loop's queue.
    fn step(c: Rc<Self>, next: Next) {
        if c.closed.get() || c.control.is_shutting_down() {
            return c.stop();
        }
        let chunk = {
            let mut pos = lock(&c.sh.pos);
            if pos.next >= c.disk {
                if c.sh.forever && c.disk > 0 {
                    pos.next = 0;
                } else {
                    pos.finished = true;
                }
            }
            if pos.finished {
                None
            } else {
                let from = pos.next;
                let len = c.sh.size.min(c.disk - from);
                pos.next = from + len;
                Some((from, len))
            }
        };
        let Some((from, len)) = chunk else {
            ::log::debug!("scan: finished scanning the disk");
            return c.stop();
        };
        let (c2, next2) = (c.clone(), next.clone());
        next.cache(
            len,
            from,
            Flags::NONE,
            Done::new(move |r: Result<(), NbdError>| {
                if let Err(e) = r {
                    ::log::debug!("scan: prefetching {from}+{len}: {e}");
                }
                let sched = c2.sched.clone();
                sched.defer(move || ScanConn::step(c2, next2));
            }),
        )
    }
}

struct Scan(Rc<ScanConn>);

impl Filter for Scan {
    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let c = &self.0;
        if c.scannable {
            if c.sh.ahead {
                let end = offset + buf.len() as u64;
                let mut pos = lock(&c.sh.pos);
                if end > pos.next && !pos.finished {
                    // Keep chunks aligned to the scan size.
                    pos.next = end.next_multiple_of(c.sh.size).min(c.disk);
                }
            }
            // The scanning client may have gone: carry on from here.
            c.try_start(next);
        }
        next.pread(buf, offset, flags, done)
    }

    fn close(&self, next: &Next) {
        let c = &self.0;
        c.closed.set(true);
        if c.scanning.get() {
            c.stop();
        }
        if c.sh.clients.fetch_sub(1, Ordering::SeqCst) == 1 && !c.sh.clock {
            *lock(&c.sh.pos) = Pos { next: 0, finished: false };
        }
        next.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn caches(ram: &Ram) -> Vec<String> {
        ram.calls().into_iter().filter(|c| c.starts_with("cache")).collect()
    }

    #[test]
    fn scans_the_whole_disk_once_in_chunks() {
        let sim = SimScheduler::new();
        let ram = Ram::new(5 << 20);
        let _top = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        sim.run_until_idle();
        assert_eq!(caches(&ram), ["cache 2097152@0", "cache 2097152@2097152", "cache 1048576@4194304"]);
    }

    #[test]
    fn reads_past_the_scan_skip_it_ahead() {
        let sim = SimScheduler::new();
        let ram = Ram::new(8 << 20);
        let top = open(&configure(&SPEC, &[("scan-size", "1M")]), &cx(&sim), ram.clone()).unwrap();
        // The first chunk is on its way (issued at open); the read lands at 5M.
        top.pread(
            vec![0; 4096],
            5 << 20,
            Flags::NONE,
            Done::new(|r: Result<Vec<u8>, NbdError>| drop(r.unwrap())),
        );
        sim.run_until_idle();
        let c = caches(&ram);
        assert_eq!(c.first().map(String::as_str), Some("cache 1048576@0"));
        assert_eq!(c[1], "cache 1048576@6291456", "{c:?}");
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn forever_stops_with_the_last_client_and_clock_resets() {
        // scan-forever never goes idle, so this turns a real loop for a bounded time.
        use blocksmith_core::io::reactor::LocalLoop;
        use std::time::Duration;
        let mut lp = LocalLoop::new().unwrap();
        let ram = Ram::new(1 << 20);
        let f = configure(&SPEC, &[("scan-size", "512k"), ("scan-forever", "true"), ("scan-clock", "false")]);
        let c = OpenCx::for_tests(lp.sched());
        let top = open(&f, &c, ram.clone()).unwrap();
        assert!(lp.run_until(Duration::from_secs(5), || caches(&ram).len() >= 7), "goes round and round");
        assert_eq!(caches(&ram)[2], "cache 524288@0");
        top.close();
        lp.run_until(Duration::from_millis(50), || false);
        let n = caches(&ram).len();
        lp.run_until(Duration::from_millis(50), || false);
        assert_eq!(caches(&ram).len(), n, "stopped with the last client");
        // A new client starts from the beginning (scan-clock=false).
        let top = open(&f, &c, ram.clone()).unwrap();
        assert_eq!(caches(&ram)[n], "cache 524288@0");
        top.close();
    }

    #[test]
    fn nothing_to_do_without_cache_below_or_for_other_exports() {
        let sim = SimScheduler::new();
        let ram = Ram::with(1 << 20, |r| r.info.cache = Support::None);
        let _a = open(&configure(&SPEC, &[]), &cx(&sim), ram.clone()).unwrap();
        let ram2 = Ram::new(1 << 20);
        let mut c = cx(&sim);
        c.export_name = "other".into();
        let _b = open(&configure(&SPEC, &[]), &c, ram2.clone()).unwrap();
        sim.run_until_idle();
        assert!(caches(&ram).is_empty() && caches(&ram2).is_empty());
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(make_err(&SPEC, &[("scan-size", "3M")]).contains("power of two"));
        assert!(make_err(&SPEC, &[("scan-ahead", "x")]).contains("scan-ahead"));
    }
}
