//! The exitwhen filter (nbdkit-exitwhen-filter): shut the server down gracefully when an event
//! happens. After the event new clients are refused, and the server exits as soon as no client
//! is connected.
//!
//! Events (any number, any of them triggers): `exit-when-file-created=FILE`,
//! `exit-when-file-deleted=FILE`, `exit-when-pipe-closed=FD` (the write end of a pipe whose read
//! end we were given closes; the pipe is never read), `exit-when-process-exits=PID` and
//! `exit-when-script=SCRIPT` (exit status 88 means the event happened, 0 that it did not, 1-87 is
//! logged as an error). The blocksmith spellings `exitwhen-file-created`, `exitwhen-fd-closed`
//! and so on are accepted too.
//!
//! Events are looked at when a client opens or closes the export, and every `exit-when-poll`
//! seconds (default 60) on a reactor timer — every 100 ms once the event has happened, so the
//! server goes soon after the last client. Scripts run on the blocking pool, never on the loop.
//! The pipe is watched by the event loop itself.
//!
//! Difference from nbdkit: filters have no hook that runs when the server starts, so the
//! polling starts with the first client; an event before any client has connected is noticed
//! when the first one does (it is refused and the server exits).

use std::path::PathBuf;
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blocksmith_core::config::{parse_duration, Params};
use blocksmith_core::control::ServerControl;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx, ParamSpec, ReadData,
};
use blocksmith_core::sched::Sched;

use crate::rng::absolute;

pub const SPEC: FilterSpec = FilterSpec {
    name: "exitwhen",
    summary: "shut the server down gracefully when an event happens",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "exit-when-file-created", help: "Exit when FILE is created (may be repeated)." },
    ParamSpec { name: "exit-when-file-deleted", help: "Exit when FILE is deleted (may be repeated)." },
    ParamSpec {
        name: "exit-when-pipe-closed",
        help: "Exit when the other end of the pipe open on descriptor FD closes.",
    },
    ParamSpec { name: "exit-when-process-exits", help: "Exit when process PID exits." },
    ParamSpec {
        name: "exit-when-script",
        help: "Run SCRIPT with /bin/sh when polling; exit status 88 means exit.",
    },
    ParamSpec {
        name: "exit-when-poll",
        help: "How often to look for events while idle, in seconds or with a unit (default 60).",
    },
];

/// How often to look once the event has happened and clients are still connected.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// The exit status of a script that saw its event.
const SCRIPT_EVENT: i32 = 88;

#[derive(Debug, Default)]
struct Events {
    created: Vec<PathBuf>,
    deleted: Vec<PathBuf>,
    pipe: Option<i32>,
    pids: Vec<u32>,
    scripts: Vec<String>,
}

/// Every value of a key and of its alias, in order.
fn take(p: &mut Params, key: &str, alias: &[&str]) -> Vec<String> {
    let mut v = p.take_all(key);
    for a in alias {
        v.extend(p.take_all(a));
    }
    v
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    let bad = |key: &str, v: &str, what: &str| ConfigError::new(format!("exitwhen: {key}: '{v}': {what}"));
    let mut ev = Events {
        created: take(p, "exit-when-file-created", &["exitwhen-file-created"])
            .iter()
            .map(|s| absolute(s))
            .collect(),
        deleted: take(p, "exit-when-file-deleted", &["exitwhen-file-deleted"])
            .iter()
            .map(|s| absolute(s))
            .collect(),
        scripts: take(p, "exit-when-script", &["exitwhen-script"]),
        ..Events::default()
    };
    for v in take(p, "exit-when-pipe-closed", &["exitwhen-pipe-closed", "exitwhen-fd-closed"]) {
        let fd: i32 =
            v.trim().parse().map_err(|_| bad("exit-when-pipe-closed", &v, "expected a descriptor number"))?;
        if fd < 0 || !std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists() {
            return Err(bad("exit-when-pipe-closed", &v, "no such open file descriptor"));
        }
        ev.pipe = Some(fd);
    }
    for v in take(p, "exit-when-process-exits", &["exitwhen-process-exits"]) {
        let pid: u32 = v
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("exit-when-process-exits", &v, "expected a process id"))?;
        ev.pids.push(pid);
    }
    let poll = match take(p, "exit-when-poll", &["exitwhen-poll"]).pop() {
        None => Duration::from_secs(60),
        Some(v) => match parse_duration(&v) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => return Err(bad("exit-when-poll", &v, "must be more than 0")),
            Err(e) => return Err(ConfigError::new(format!("exitwhen: exit-when-poll: {}", e.0))),
        },
    };
    Ok(Arc::new(ExitwhenFactory(Arc::new(Shared {
        ev,
        poll,
        triggered: AtomicBool::new(false),
        polling: AtomicBool::new(false),
        script_running: AtomicBool::new(false),
    }))))
}

struct Shared {
    ev: Events,
    poll: Duration,
    triggered: AtomicBool,
    polling: AtomicBool,
    script_running: AtomicBool,
}

impl Shared {
    fn trigger(&self, why: &str) {
        if !self.triggered.swap(true, Ordering::SeqCst) {
            ::log::info!("exitwhen: {why}: the server will exit when the last client disconnects");
        }
    }

    /// Look at the events that are cheap to check (a stat each); start the scripts in the
    /// background. True if the event has happened.
    fn check(self: &Arc<Self>, control: &Arc<ServerControl>, sched: &Sched) -> bool {
        if self.triggered.load(Ordering::SeqCst) {
            return true;
        }
        if let Some(f) = self.ev.created.iter().find(|f| f.exists()) {
            self.trigger(&format!("{} was created", f.display()));
        } else if let Some(f) = self.ev.deleted.iter().find(|f| !f.exists()) {
            self.trigger(&format!("{} was deleted", f.display()));
        } else if let Some(pid) =
            self.ev.pids.iter().find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        {
            self.trigger(&format!("process {pid} exited"));
        } else if !self.ev.scripts.is_empty() && !self.script_running.swap(true, Ordering::SeqCst) {
            let (me, scripts, control, s2) =
                (self.clone(), self.ev.scripts.clone(), control.clone(), sched.clone());
            sched.blocking(
                move || scripts.iter().map(|s| (s.clone(), run_script(s))).collect::<Vec<_>>(),
                move |results: Vec<(String, Result<i32, String>)>| {
                    me.script_running.store(false, Ordering::SeqCst);
                    for (script, r) in results {
                        match r {
                            Ok(0) => {}
                            Ok(SCRIPT_EVENT) => me.trigger(&format!("script '{script}' exited with 88")),
                            Ok(n) => ::log::error!("exitwhen: script '{script}' exited with status {n}"),
                            Err(e) => ::log::error!("exitwhen: script '{script}': {e}"),
                        }
                    }
                    if me.triggered.load(Ordering::SeqCst) {
                        me.maybe_exit(&control, &s2);
                    }
                },
            );
        }
        self.triggered.load(Ordering::SeqCst)
    }

    /// Exit if the event happened and nobody is connected.
    fn maybe_exit(self: &Arc<Self>, control: &Arc<ServerControl>, sched: &Sched) {
        if self.check(control, sched) && control.connections() == 0 && !control.is_shutting_down() {
            ::log::debug!("exitwhen: no clients left, shutting down");
            control.shutdown();
        }
    }

    fn start_polling(self: &Arc<Self>, control: &Arc<ServerControl>, sched: &Sched) {
        if self.polling.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(fd) = self.ev.pipe {
            // The loop tells us when the writer goes away; the pipe itself is never read.
            let (me, c2, s2) = (self.clone(), control.clone(), sched.clone());
            let watched = sched.watch(fd, true, false, move |r| {
                if r.closed {
                    me.trigger(&format!("the pipe on descriptor {fd} was closed"));
                    me.maybe_exit(&c2, &s2);
                }
            });
            if let Err(e) = watched {
                ::log::error!("exitwhen: cannot watch descriptor {fd}: {e}");
            }
        }
        tick(self.clone(), control.clone(), sched.clone());
    }
}

fn tick(sh: Arc<Shared>, control: Arc<ServerControl>, sched: Sched) {
    if control.is_shutting_down() {
        return;
    }
    sh.maybe_exit(&control, &sched);
    let every = if sh.triggered.load(Ordering::SeqCst) { DRAIN_POLL } else { sh.poll };
    let s2 = sched.clone();
    sched.after(every, move || tick(sh, control, s2));
}

/// Run one script with /bin/sh; its exit status.
fn run_script(script: &str) -> Result<i32, String> {
    let st = Command::new("/bin/sh").arg("-c").arg(script).status().map_err(|e| e.to_string())?;
    st.code().ok_or_else(|| format!("killed by a signal ({st})"))
}

struct ExitwhenFactory(Arc<Shared>);

impl FilterFactory for ExitwhenFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        self.0.start_polling(&cx.control, &cx.sched);
        if self.0.check(&cx.control, &cx.sched) {
            return Err(NbdError::msg(Errno::Shutdown, "exitwhen: the server is exiting, no new clients"));
        }
        let filter = Exitwhen { sh: self.0.clone(), control: cx.control.clone(), sched: cx.sched.clone() };
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

struct Exitwhen {
    sh: Arc<Shared>,
    control: Arc<ServerControl>,
    sched: Sched,
}

impl Filter for Exitwhen {
    /// Read data passes through untouched: replies stay zero-copy.
    fn pread_lent(&self, next: &Next, count: usize, offset: u64, flags: Flags, done: Done<ReadData>) {
        next.pread_lent(count, offset, flags, done)
    }

    fn close(&self, next: &Next) {
        next.close();
        // Deferred: the server still counts this connection until the close returns.
        let (sh, control, s2) = (self.sh.clone(), self.control.clone(), self.sched.clone());
        self.sched.defer(move || sh.maybe_exit(&control, &s2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{make as configure, make_err, Ram};
    use blocksmith_core::io::reactor::LocalLoop;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("bs-exitwhen-{}-{name}", std::process::id()))
    }

    // The poll re-arms itself for as long as the server runs, so these tests turn a real loop
    // for a bounded time instead of running a simulation until it is idle.

    #[test]
    fn file_created_refuses_new_clients_and_shuts_down() {
        let mut lp = LocalLoop::new().unwrap();
        let f = tmp("created");
        let _ = std::fs::remove_file(&f);
        let factory =
            configure(&SPEC, &[("exit-when-file-created", f.to_str().unwrap()), ("exit-when-poll", "20ms")]);
        let c = OpenCx::for_tests(lp.sched());
        let a = factory.open(&c, Ram::new(4096)).unwrap();
        assert!(!lp.run_until(Duration::from_millis(100), || c.control.is_shutting_down()));
        std::fs::write(&f, b"").unwrap();
        // The test's server control counts no connections, so the poll shuts down at once.
        assert!(lp.run_until(Duration::from_secs(5), || c.control.is_shutting_down()));
        let e = factory.open(&c, Ram::new(4096)).err().unwrap();
        assert_eq!(e.errno, Errno::Shutdown);
        a.close();
        std::fs::remove_file(&f).unwrap();
    }

    #[test]
    fn script_status_88_triggers_and_0_does_not() {
        let mut lp = LocalLoop::new().unwrap();
        let flag = tmp("script");
        let _ = std::fs::remove_file(&flag);
        let script = format!("test -e {} && exit 88; exit 0", flag.display());
        let f = configure(&SPEC, &[("exit-when-script", &script), ("exit-when-poll", "20ms")]);
        let c = OpenCx::for_tests(lp.sched());
        let a = f.open(&c, Ram::new(4096)).unwrap();
        assert!(!lp.run_until(Duration::from_millis(200), || c.control.is_shutting_down()));
        assert!(f.open(&c, Ram::new(4096)).is_ok(), "status 0: business as usual");
        std::fs::write(&flag, b"").unwrap();
        assert!(lp.run_until(Duration::from_secs(5), || c.control.is_shutting_down()));
        assert!(f.open(&c, Ram::new(4096)).is_err(), "refused after the script said 88");
        a.close();
        std::fs::remove_file(&flag).unwrap();
    }

    #[test]
    fn pipe_closed_triggers() {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;
        let mut lp = LocalLoop::new().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd().to_string();
        let f = configure(&SPEC, &[("exit-when-pipe-closed", &fd)]);
        let c = OpenCx::for_tests(lp.sched());
        let a = f.open(&c, Ram::new(4096)).unwrap();
        assert!(!lp.run_until(Duration::from_millis(100), || c.control.is_shutting_down()));
        drop(theirs);
        assert!(lp.run_until(Duration::from_secs(5), || c.control.is_shutting_down()));
        a.close();
        // The descriptor stays open (the filter never owned it) until here.
        drop(ours);
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(
            make_err(&SPEC, &[("exit-when-pipe-closed", "9999")]).contains("no such open file descriptor")
        );
        assert!(make_err(&SPEC, &[("exit-when-process-exits", "x")]).contains("process id"));
        assert!(make_err(&SPEC, &[("exit-when-poll", "0")]).contains("more than 0"));
        assert!(make_err(&SPEC, &[("exitwhen-poll", "soon")]).contains("could not parse duration"));
    }
}
