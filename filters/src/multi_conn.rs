//! The multi-conn filter (nbdkit-multi-conn-filter): control the NBD_FLAG_CAN_MULTI_CONN
//! advertisement, emulate the consistency it promises, and skip flushes when nothing is dirty.
//!
//! `multi-conn-mode=`:
//! - `auto` (default): `plugin` if the layer below is multi-conn consistent, else `emulate`.
//! - `emulate`: advertise multi-conn and make a flush on any connection cover the writes of
//!   every connection (of the same export with `multi-conn-exportname=true`).
//! - `plugin`: advertise what the layer below advertises.
//! - `disable`: never advertise it.
//! - `unsafe`: advertise it without doing anything to make it true.
//!
//! `multi-conn-track-dirty=`: `conn` (default) and `fast` skip a flush when nothing was written
//! since the last one (in the connection's group); `off` always flushes.
//!
//! # How `emulate` works here
//!
//! nbdkit keeps a list of the open connections and, on a flush, flushes each dirty one through
//! its own stack. Here each connection's layers are `Rc` values living on their own event loop,
//! unreachable from another loop. But every connection of a stack shares the same backend
//! instance state (the one file, the one memory disk), so data written through any connection
//! is already visible through every other, and a flush through one connection flushes the
//! backend that holds everyone's writes. So a flush on any connection goes down through that
//! connection's own layers whenever any connection of the group has written since the last
//! flush, and then counts the whole group as clean. What this does not reach is per-connection
//! state in a filter between this one and the backend (a per-connection write-back cache would
//! not be flushed); no filter in this crate keeps such state.
//!
//! Dirtiness is a pair of counters per group (writes completed, and writes completed before
//! the last successful flush began), rather than nbdkit's flags, so a write that completes
//! while a flush is in flight stays dirty for the next flush.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec,
    Support,
};

pub const SPEC: FilterSpec = FilterSpec {
    name: "multi-conn",
    summary: "control, emulate or disable multi-conn consistency; skip needless flushes",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "multi-conn-mode",
        help: "auto (default), emulate (flush covers every connection), plugin (as the\n\
               layer below), disable (never advertise), unsafe (advertise without emulating).",
    },
    ParamSpec {
        name: "multi-conn-track-dirty",
        help: "conn (default) or fast: skip flushes when nothing was written; off: always flush.",
    },
    ParamSpec {
        name: "multi-conn-exportname",
        help: "true: connections to different export names are separate groups (default false).",
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Auto,
    Emulate,
    Plugin,
    Disable,
    Unsafe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Track {
    Conn,
    Fast,
    Off,
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let mode = match p.take("multi-conn-mode").as_deref() {
        None | Some("auto") => Mode::Auto,
        Some("emulate") => Mode::Emulate,
        Some("plugin") => Mode::Plugin,
        Some("disable") => Mode::Disable,
        Some("unsafe") => Mode::Unsafe,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "multi-conn: unknown multi-conn-mode '{other}' (auto, emulate, plugin, disable or unsafe)"
            )))
        }
    };
    let track = match p.take("multi-conn-track-dirty").as_deref() {
        None | Some("conn" | "connection") => Track::Conn,
        Some("fast") => Track::Fast,
        Some("off") => Track::Off,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "multi-conn: unknown multi-conn-track-dirty '{other}' (conn, fast or off)"
            )))
        }
    };
    let by_name = match (p.take_bool("multi-conn-exportname"), p.take_bool("multi-conn-export-name")) {
        (Err(e), _) | (_, Err(e)) => return Err(ConfigError::new(format!("multi-conn: {}", e.0))),
        (Ok(a), Ok(b)) => b.or(a).unwrap_or(false),
    };
    Ok(Arc::new(MultiConnFactory { mode, track, by_name, groups: Mutex::new(HashMap::new()) }))
}

/// Connections whose flushes cover each other, and whether they have unflushed writes.
#[derive(Default)]
struct Group {
    /// Writes completed so far.
    writes: AtomicU64,
    /// The value of `writes` when the last successful flush began.
    flushed: AtomicU64,
}

impl Group {
    fn dirty(&self) -> bool {
        self.writes.load(Ordering::SeqCst) != self.flushed.load(Ordering::SeqCst)
    }
}

struct MultiConnFactory {
    mode: Mode,
    track: Track,
    by_name: bool,
    /// The live groups by export name ("" for all when not grouping by name). Weak, so a group
    /// goes away with its last connection.
    groups: Mutex<HashMap<String, Weak<Group>>>,
}

impl FilterFactory for MultiConnFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let below = next.info();
        let mode = match self.mode {
            Mode::Auto if below.can_multi_conn => Mode::Plugin,
            Mode::Auto => Mode::Emulate,
            m => m,
        };
        if mode == Mode::Emulate && !below.can_flush {
            return Err(NbdError::inval("multi-conn: emulating multi-conn requires working flush"));
        }
        let name = if self.by_name { cx.export_name.clone() } else { String::new() };
        let group = {
            let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
            groups.retain(|_, g| g.strong_count() > 0);
            match groups.get(&name).and_then(Weak::upgrade) {
                Some(g) => g,
                None => {
                    let g = Arc::new(Group::default());
                    groups.insert(name, Arc::downgrade(&g));
                    g
                }
            }
        };
        let filter =
            MultiConnFilter { mode, track: self.track, group, below_multi_conn: below.can_multi_conn };
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

struct MultiConnFilter {
    /// Never `Auto`: resolved at open.
    mode: Mode,
    track: Track,
    group: Arc<Group>,
    below_multi_conn: bool,
}

impl MultiConnFilter {
    /// Count a write-like request once it has completed (whatever its result: a failed write may
    /// still have changed something).
    fn counted(&self, flags: Flags, done: Done<()>) -> Done<()> {
        // A FUA write is durable by itself, unless FUA is emulated by the flush that follows.
        if self.track == Track::Off || (flags.contains(Flags::FUA) && self.mode != Mode::Emulate) {
            return done;
        }
        let group = self.group.clone();
        Done::new(move |r| {
            group.writes.fetch_add(1, Ordering::SeqCst);
            done.call(r)
        })
    }
}

impl Filter for MultiConnFilter {
    fn info(&self, next: &Next) -> ExportInfo {
        let below = next.info();
        let can_multi_conn = match self.mode {
            Mode::Emulate | Mode::Unsafe => true,
            Mode::Disable => false,
            Mode::Plugin | Mode::Auto => below.can_multi_conn,
        };
        // With emulation, a FUA write must flush the group: better a write plus our flush
        // (emulated by the shim above) than a native FUA that only covers this connection.
        let fua = match (self.mode, below.fua) {
            (Mode::Emulate, Support::None) => Support::None,
            (Mode::Emulate, _) => Support::Emulate,
            (_, f) => f,
        };
        ExportInfo { can_multi_conn, fua, ..below }
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        next.pwrite(data, offset, flags, self.counted(flags, done))
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.zero(count, offset, flags, self.counted(flags, done))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        next.trim(count, offset, flags, self.counted(flags, done))
    }

    fn flush(&self, next: &Next, flags: Flags, done: Done<()>) {
        if self.track != Track::Off && !self.group.dirty() {
            // Nothing written since the last flush, by anyone in the group.
            return done.ok(());
        }
        let at_start = self.group.writes.load(Ordering::SeqCst);
        // Outside emulation, a flush through a layer that is not multi-conn consistent only
        // covers this connection, so with per-connection tracking the group stays dirty.
        let cleans_group = match (self.mode, self.track) {
            (_, Track::Off) => false,
            (Mode::Emulate, _) | (_, Track::Fast) => true,
            (_, Track::Conn) => self.below_multi_conn,
        };
        let group = self.group.clone();
        next.flush(
            flags,
            Done::new(move |r: Result<(), NbdError>| {
                if r.is_ok() && cleans_group {
                    group.flushed.fetch_max(at_start, Ordering::SeqCst);
                }
                done.call(r)
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, wait, Ram};
    use blocksmith_core::sched::SimScheduler;

    fn flushes(ram: &Ram) -> usize {
        ram.calls().iter().filter(|c| *c == "flush").count()
    }

    #[test]
    fn advertisement_per_mode() {
        let sim = SimScheduler::new();
        let adv = |mode: &str, below_mc: bool| {
            let ram = Ram::with(4096, |r| r.info.can_multi_conn = below_mc);
            let top = open(&configure(&SPEC, &[("multi-conn-mode", mode)]), &cx(&sim), ram).unwrap();
            top.info().can_multi_conn
        };
        assert!(adv("auto", true) && adv("auto", false));
        assert!(adv("emulate", false) && adv("unsafe", false));
        assert!(!adv("plugin", false) && adv("plugin", true));
        assert!(!adv("disable", true));
        let ram = Ram::with(4096, |r| {
            r.info.can_multi_conn = false;
            r.info.can_flush = false;
        });
        let e = open(&configure(&SPEC, &[]), &cx(&sim), ram).err().expect("needs flush");
        assert!(e.message.unwrap().contains("requires working flush"));
    }

    #[test]
    fn emulated_flush_covers_every_connection_and_skips_when_clean() {
        let sim = SimScheduler::new();
        let ram = Ram::with(65536, |r| r.info.can_multi_conn = false);
        let f = configure(&SPEC, &[]);
        let a = open(&f, &cx(&sim), ram.clone()).unwrap();
        let b = open(&f, &cx(&sim), ram.clone()).unwrap();
        assert!(a.info().can_multi_conn);
        wait(&sim, |d| a.flush(Flags::NONE, d)).unwrap();
        assert_eq!(flushes(&ram), 0, "nothing written yet");
        wait(&sim, |d| a.pwrite(vec![1; 8], 0, Flags::NONE, d)).unwrap();
        // b never wrote, but a's write is unflushed: b's flush must flush.
        wait(&sim, |d| b.flush(Flags::NONE, d)).unwrap();
        assert_eq!(flushes(&ram), 1);
        wait(&sim, |d| a.flush(Flags::NONE, d)).unwrap();
        assert_eq!(flushes(&ram), 1, "b's flush covered a's write");
        // FUA is emulated by a flush of the group.
        wait(&sim, |d| b.pwrite(vec![2; 8], 8, Flags::FUA, d)).unwrap();
        assert_eq!(ram.calls()[ram.calls().len() - 2..], ["pwrite 8@8 flags=0", "flush"]);
    }

    #[test]
    fn a_write_completing_during_a_flush_stays_dirty() {
        // Start a flush whose completion we hold back, complete a write, then finish the flush.
        let held = Rc::new(std::cell::RefCell::new(None));
        let h = held.clone();
        let group = {
            let mc = MultiConnFilter {
                mode: Mode::Emulate,
                track: Track::Conn,
                group: Arc::new(Group::default()),
                below_multi_conn: true,
            };
            mc.group.writes.store(1, Ordering::SeqCst);
            let next: Next = Rc::new(HoldFlush(h));
            mc.flush(&next, Flags::NONE, Done::new(|r: Result<(), NbdError>| assert!(r.is_ok())));
            mc.group.writes.fetch_add(1, Ordering::SeqCst);
            mc.group.clone()
        };
        let finish: Done<()> = held.borrow_mut().take().expect("flush started");
        finish.ok(());
        assert!(group.dirty(), "the second write was not covered by that flush");
    }

    /// A layer whose flush completes only when the test says so.
    struct HoldFlush(Rc<std::cell::RefCell<Option<Done<()>>>>);

    impl Layer for HoldFlush {
        fn info(&self) -> ExportInfo {
            ExportInfo::read_only(4096)
        }
        fn pread(&self, buf: Vec<u8>, _offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
            done.ok(buf)
        }
        fn flush(&self, _flags: Flags, done: Done<()>) {
            *self.0.borrow_mut() = Some(done);
        }
    }

    #[test]
    fn plugin_mode_tracking() {
        let sim = SimScheduler::new();
        // Below is multi-conn consistent: one flush cleans the group.
        let ram = Ram::new(4096);
        let f = configure(&SPEC, &[("multi-conn-mode", "plugin")]);
        let (a, b) = (open(&f, &cx(&sim), ram.clone()).unwrap(), open(&f, &cx(&sim), ram.clone()).unwrap());
        wait(&sim, |d| a.pwrite(vec![1], 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| a.flush(Flags::NONE, d)).unwrap();
        wait(&sim, |d| b.flush(Flags::NONE, d)).unwrap();
        assert_eq!(flushes(&ram), 1);
        // track-dirty=off flushes every time.
        let ram = Ram::new(4096);
        let top =
            open(&configure(&SPEC, &[("multi-conn-track-dirty", "off")]), &cx(&sim), ram.clone()).unwrap();
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        wait(&sim, |d| top.flush(Flags::NONE, d)).unwrap();
        assert_eq!(flushes(&ram), 2);
        // Below not consistent, disable mode: a flush cannot clean the group for others.
        let ram = Ram::with(4096, |r| r.info.can_multi_conn = false);
        let f = configure(&SPEC, &[("multi-conn-mode", "disable")]);
        let (a, b) = (open(&f, &cx(&sim), ram.clone()).unwrap(), open(&f, &cx(&sim), ram.clone()).unwrap());
        wait(&sim, |d| a.pwrite(vec![1], 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| a.flush(Flags::NONE, d)).unwrap();
        wait(&sim, |d| b.flush(Flags::NONE, d)).unwrap();
        assert_eq!(flushes(&ram), 2);
    }

    #[test]
    fn groups_by_export_name() {
        let sim = SimScheduler::new();
        let ram = Ram::with(4096, |r| r.info.can_multi_conn = false);
        let f = configure(&SPEC, &[("multi-conn-exportname", "true")]);
        let mut other = cx(&sim);
        other.export_name = "b".into();
        let a = open(&f, &cx(&sim), ram.clone()).unwrap();
        let b = open(&f, &other, ram.clone()).unwrap();
        wait(&sim, |d| a.pwrite(vec![1], 0, Flags::NONE, d)).unwrap();
        wait(&sim, |d| b.flush(Flags::NONE, d)).unwrap();
        assert_eq!(flushes(&ram), 0, "a different group has nothing to flush");
        wait(&sim, |d| a.flush(Flags::NONE, d)).unwrap();
        assert_eq!(flushes(&ram), 1);
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert!(make_err(&SPEC, &[("multi-conn-mode", "on")])
            .starts_with("multi-conn: unknown multi-conn-mode 'on'"));
        assert!(
            make_err(&SPEC, &[("multi-conn-track-dirty", "x")]).contains("unknown multi-conn-track-dirty")
        );
        assert!(make_err(&SPEC, &[("multi-conn-exportname", "x")]).contains("could not parse boolean"));
    }
}
