//! One run of a script: spawn it, feed its stdin, collect its stdout and stderr, learn how it
//! ended — without ever blocking the loop.
//!
//! The pipes are nonblocking and watched by the loop (edge-triggered: each handler reads or
//! writes until `WouldBlock`). The exit is noticed through a pidfd, also watched; on kernels
//! without pidfds a short timer polls `try_wait` once both output pipes have closed. A run
//! completes when the process has exited and both output pipes are at EOF, as in nbdkit.
//!
//! A run that outlives the timeout gets SIGKILL (its whole process group: a script's own
//! children die with it) and its request fails at once; the process stays in the hub until it
//! is reaped, still holding its permits, so the cap on processes counts it until it is gone.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blocksmith_core::io::process::set_nonblocking;
use blocksmith_core::sched::{TimerId, WatchId};

use super::gate::{Hub, Permit};
use super::sys;
use super::Runtime;

/// What a script writes to stderr is kept up to this size (the first line is what matters).
const STDERR_LIMIT: usize = 64 * 1024;
/// Exit polling interval bounds for kernels without pidfds.
const POLL_FIRST: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(50);

static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

#[cfg(test)]
thread_local! {
    /// Tests set this to exercise the exit polling that kernels without pidfds get.
    pub(crate) static NO_PIDFD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn pidfd_for(pid: u32) -> Option<OwnedFd> {
    #[cfg(test)]
    if NO_PIDFD.with(|n| n.get()) {
        return None;
    }
    sys::pidfd_open(pid).ok()
}

/// What goes to the script's stdin.
pub(crate) enum Input {
    None,
    Bytes(Vec<u8>),
    /// This many zero bytes, streamed from a static buffer (zero falling back to pwrite).
    Zeroes(u64),
}

impl Input {
    fn len(&self) -> u64 {
        match self {
            Input::None => 0,
            Input::Bytes(b) => b.len() as u64,
            Input::Zeroes(n) => *n,
        }
    }
}

/// Where the script's stdout goes.
pub(crate) enum Sink {
    /// Exactly this buffer's length is expected (pread): read straight into it.
    Exact(Vec<u8>),
    /// Keep up to this many bytes, count the rest.
    Collect(usize),
}

/// One script invocation: `script METHOD ARGS...`.
pub(crate) struct Call {
    pub method: &'static str,
    pub args: Vec<OsString>,
    pub input: Input,
    pub sink: Sink,
}

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
    TimedOut(Duration),
    /// Could not be run at all (the message says why).
    Failed(String),
}

/// Everything a finished run produced.
pub(crate) struct Finished {
    pub exit: Exit,
    /// Stdout: the pread buffer, or what was collected.
    pub out: Vec<u8>,
    /// Bytes the script wrote to stdout in all (more than `out` holds if it wrote too much).
    pub out_total: u64,
    pub err: Vec<u8>,
}

impl Finished {
    fn failed(msg: String, sink: Sink) -> Finished {
        let out = match sink {
            Sink::Exact(b) => b,
            Sink::Collect(_) => Vec::new(),
        };
        Finished { exit: Exit::Failed(msg), out, out_total: 0, err: Vec::new() }
    }
}

fn exit_of(st: ExitStatus) -> Exit {
    match (st.code(), st.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Failed(format!("script ended oddly ({st})")),
    }
}

/// Collected output of one pipe.
struct Out {
    buf: Vec<u8>,
    /// Exact mode: bytes of `buf` filled so far.
    filled: usize,
    exact: bool,
    limit: usize,
    total: u64,
}

impl Out {
    fn new(sink: Sink) -> Out {
        match sink {
            Sink::Exact(buf) => Out { buf, filled: 0, exact: true, limit: 0, total: 0 },
            Sink::Collect(limit) => Out { buf: Vec::new(), filled: 0, exact: false, limit, total: 0 },
        }
    }

    /// Read until the pipe is empty for now (false) or closed (true). A read error other than
    /// `WouldBlock` counts as closed: nothing more will come.
    fn drain(&mut self, r: &mut impl Read) -> bool {
        let mut scratch = [0u8; 16 * 1024];
        loop {
            let direct = self.exact && self.filled < self.buf.len();
            let res = if direct { r.read(&mut self.buf[self.filled..]) } else { r.read(&mut scratch) };
            match res {
                Ok(0) => return true,
                Ok(n) => {
                    self.total += n as u64;
                    if direct {
                        self.filled += n;
                    } else if !self.exact {
                        let room = self.limit.saturating_sub(self.buf.len());
                        self.buf.extend_from_slice(&scratch[..n.min(room)]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }
}

enum Fed {
    All,
    Blocked,
    /// The script closed its stdin (or it broke): it does not want the rest, which is its call
    /// to make; its exit status says whether the request worked (nbdkit agrees).
    Closed,
}

fn feed(w: &mut impl Write, input: &Input, pos: &mut u64) -> Fed {
    loop {
        let len = input.len();
        if *pos >= len {
            return Fed::All;
        }
        let chunk: &[u8] = match input {
            Input::None => return Fed::All,
            Input::Bytes(b) => &b[*pos as usize..],
            Input::Zeroes(n) => &ZEROES[..(n - *pos).min(ZEROES.len() as u64) as usize],
        };
        match w.write(chunk) {
            Ok(0) => return Fed::Closed,
            Ok(n) => *pos += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fed::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Fed::Closed,
        }
    }
}

type OnDone = Box<dyn FnOnce(Finished)>;

/// A script process in flight on one loop (owned by that loop's [`Hub`]).
pub(crate) struct Running {
    key: u64,
    hub: Weak<Hub>,
    pid: u32,
    /// Until reaped.
    child: Option<Child>,
    status: Option<ExitStatus>,
    pidfd: Option<OwnedFd>,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    w_in: Option<WatchId>,
    w_out: Option<WatchId>,
    w_err: Option<WatchId>,
    w_pid: Option<WatchId>,
    input: Input,
    fed: u64,
    out: Out,
    err: Out,
    timeout: Duration,
    timer: Option<TimerId>,
    poll_timer: Option<TimerId>,
    poll_every: Duration,
    done: Option<OnDone>,
    /// Gate slots held until the process is reaped.
    _permits: Vec<Permit>,
}

/// Start `call` on `hub`'s loop; `done` runs there once it has finished (never before this
/// returns). `permits` are held until the process is gone.
pub(crate) fn spawn(
    rt: &Arc<Runtime>,
    hub: &Rc<Hub>,
    call: Call,
    permits: Vec<Permit>,
    done: impl FnOnce(Finished) + 'static,
) {
    let Call { method, args, input, sink } = call;
    let mut child = match rt.launch(method, &args, !matches!(input, Input::None)) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot run the script for {method}: {e}");
            drop(permits);
            return hub.sched.defer(move || done(Finished::failed(msg, sink)));
        }
    };
    let pid = child.id();
    let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let nonblocking = [
        pipes.0.as_ref().map(|p| p.as_raw_fd()),
        pipes.1.as_ref().map(|p| p.as_raw_fd()),
        pipes.2.as_ref().map(|p| p.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    .try_for_each(set_nonblocking);
    let running = Rc::new(RefCell::new(Running {
        key: 0,
        hub: Rc::downgrade(hub),
        pid,
        child: Some(child),
        status: None,
        // Without a pidfd (old kernels) the exit is polled for instead.
        pidfd: pidfd_for(pid),
        stdin: pipes.0,
        stdout: pipes.1,
        stderr: pipes.2,
        w_in: None,
        w_out: None,
        w_err: None,
        w_pid: None,
        input,
        fed: 0,
        out: Out::new(sink),
        err: Out::new(Sink::Collect(STDERR_LIMIT)),
        timeout: rt.timeout,
        timer: None,
        poll_timer: None,
        poll_every: POLL_FIRST,
        done: Some(Box::new(done)),
        _permits: permits,
    }));
    let key = hub.adopt(running.clone());
    running.borrow_mut().key = key;
    if let Err(e) = nonblocking.and_then(|()| start(&running, hub)) {
        // Dropping it kills and reaps the process; report the failure from the loop.
        let fin = {
            let mut r = running.borrow_mut();
            let sink =
                if r.out.exact { Sink::Exact(std::mem::take(&mut r.out.buf)) } else { Sink::Collect(0) };
            r.done
                .take()
                .map(|d| (d, Finished::failed(format!("cannot watch the script for {method}: {e}"), sink)))
        };
        drop(running);
        hub.release_child(key);
        if let Some((d, f)) = fin {
            hub.sched.defer(move || d(f));
        }
    }
}

/// Register the watches and the timeout.
fn start(rc: &Rc<RefCell<Running>>, hub: &Rc<Hub>) -> io::Result<()> {
    let sched = &hub.sched;
    let watch = |fd: i32, write: bool, handler: fn(&mut Running)| {
        let weak = Rc::downgrade(rc);
        sched.watch(fd, !write, write, move |_| {
            if let Some(rc) = weak.upgrade() {
                handler(&mut rc.borrow_mut());
                Running::settle(&rc);
            }
        })
    };
    let (fin, fout, ferr, fpid) = {
        let r = rc.borrow();
        (
            r.stdin.as_ref().map(|p| p.as_raw_fd()),
            r.stdout.as_ref().map(|p| p.as_raw_fd()),
            r.stderr.as_ref().map(|p| p.as_raw_fd()),
            r.pidfd.as_ref().map(|p| p.as_raw_fd()),
        )
    };
    if let Some(fd) = fout {
        let id = watch(fd, false, Running::on_stdout)?;
        rc.borrow_mut().w_out = Some(id);
    }
    if let Some(fd) = ferr {
        let id = watch(fd, false, Running::on_stderr)?;
        rc.borrow_mut().w_err = Some(id);
    }
    if let Some(fd) = fin {
        let id = watch(fd, true, Running::on_stdin)?;
        rc.borrow_mut().w_in = Some(id);
    }
    if let Some(fd) = fpid {
        match watch(fd, false, Running::on_exit) {
            Ok(id) => rc.borrow_mut().w_pid = Some(id),
            // Poll for the exit instead.
            Err(_) => rc.borrow_mut().pidfd = None,
        }
    }
    let weak = Rc::downgrade(rc);
    let timeout = rc.borrow().timeout;
    let t = sched.after(timeout, move || {
        if let Some(rc) = weak.upgrade() {
            Running::on_timeout(&rc);
            Running::settle(&rc);
        }
    });
    rc.borrow_mut().timer = Some(t);
    Ok(())
}

impl Running {
    fn sched_unwatch(&self, id: Option<WatchId>) {
        if let (Some(id), Some(hub)) = (id, self.hub.upgrade()) {
            hub.sched.unwatch(id);
        }
    }

    fn close_stdin(&mut self) {
        let id = self.w_in.take();
        self.sched_unwatch(id);
        self.stdin = None;
    }

    fn close_stdout(&mut self) {
        let id = self.w_out.take();
        self.sched_unwatch(id);
        self.stdout = None;
    }

    fn close_stderr(&mut self) {
        let id = self.w_err.take();
        self.sched_unwatch(id);
        self.stderr = None;
    }

    fn on_stdout(&mut self) {
        let eof = match self.stdout.as_mut() {
            Some(p) => self.out.drain(p),
            None => return,
        };
        if eof {
            self.close_stdout();
        }
    }

    fn on_stderr(&mut self) {
        let eof = match self.stderr.as_mut() {
            Some(p) => self.err.drain(p),
            None => return,
        };
        if eof {
            self.close_stderr();
        }
    }

    fn on_stdin(&mut self) {
        let fed = match self.stdin.as_mut() {
            Some(p) => feed(p, &self.input, &mut self.fed),
            None => return,
        };
        if !matches!(fed, Fed::Blocked) {
            // Closing the pipe is the script's end-of-data.
            self.close_stdin();
            self.input = Input::None;
        }
    }

    fn on_exit(&mut self) {
        let Some(child) = self.child.as_mut() else { return };
        match child.try_wait() {
            Ok(Some(st)) => {
                self.status = Some(st);
                self.child = None;
                let id = self.w_pid.take();
                self.sched_unwatch(id);
                self.pidfd = None;
            }
            Ok(None) => {}
            Err(e) => {
                // ECHILD: someone else reaped it. Treat as gone, with an error status.
                log::debug!("waiting for script process {}: {e}", self.pid);
                self.status = Some(ExitStatus::from_raw(255 << 8));
                self.child = None;
                let id = self.w_pid.take();
                self.sched_unwatch(id);
                self.pidfd = None;
            }
        }
    }

    fn on_timeout(rc: &Rc<RefCell<Running>>) {
        let fin = {
            let mut r = rc.borrow_mut();
            r.timer = None;
            if r.status.is_some() && r.done.is_none() {
                return;
            }
            log::warn!("script process {} timed out after {:?}: killing it", r.pid, r.timeout);
            if r.child.is_some() {
                if let Err(e) = sys::kill_group(r.pid) {
                    log::debug!("killing script process group {}: {e}", r.pid);
                }
            } else {
                // Already reaped, but something it started still holds the pipes open: the
                // group id cannot have been reused while such a member is alive.
                let _ = sys::kill_group(r.pid);
            }
            r.close_stdin();
            r.close_stdout();
            r.close_stderr();
            let timeout = r.timeout;
            r.done.take().map(|d| (d, r.finished(Exit::TimedOut(timeout))))
        };
        if let Some((d, f)) = fin {
            d(f);
        }
    }

    fn finished(&mut self, exit: Exit) -> Finished {
        Finished {
            exit,
            out: std::mem::take(&mut self.out.buf),
            out_total: self.out.total,
            err: std::mem::take(&mut self.err.buf),
        }
    }

    /// After any event: complete the request if everything is in, start exit polling if needed,
    /// and leave the hub once the process is reaped and its pipes are closed.
    fn settle(rc: &Rc<RefCell<Running>>) {
        let (fin, gone, hub) = {
            let mut r = rc.borrow_mut();
            let pipes_closed = r.stdout.is_none() && r.stderr.is_none();
            let mut fin = None;
            if pipes_closed && r.status.is_some() {
                if let (Some(t), Some(hub)) = (r.timer.take(), r.hub.upgrade()) {
                    hub.sched.cancel(t);
                }
                // Whatever it did not read of its stdin, it did not want.
                r.close_stdin();
                if let (Some(d), Some(st)) = (r.done.take(), r.status) {
                    fin = Some((d, r.finished(exit_of(st))));
                }
            }
            if pipes_closed && r.status.is_none() && r.pidfd.is_none() && r.poll_timer.is_none() {
                r.schedule_poll(rc);
            }
            (fin, pipes_closed && r.status.is_some(), r.hub.upgrade())
        };
        if let Some((d, f)) = fin {
            d(f);
        }
        if gone {
            if let Some(hub) = hub {
                let key = rc.borrow().key;
                hub.release_child(key);
            }
        }
    }

    fn schedule_poll(&mut self, rc: &Rc<RefCell<Running>>) {
        let Some(hub) = self.hub.upgrade() else { return };
        let weak = Rc::downgrade(rc);
        let every = self.poll_every;
        self.poll_every = (every * 2).min(POLL_MAX);
        let t = hub.sched.after(every, move || {
            if let Some(rc) = weak.upgrade() {
                {
                    let mut r = rc.borrow_mut();
                    r.poll_timer = None;
                    r.on_exit();
                }
                Running::settle(&rc);
            }
        });
        self.poll_timer = Some(t);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only a run that never finished gets here with work left: the loop is going away, or
        // starting it failed. Stop watching before the pipes close, then kill and reap.
        for id in [self.w_in.take(), self.w_out.take(), self.w_err.take(), self.w_pid.take()] {
            self.sched_unwatch(id);
        }
        if let Some(hub) = self.hub.upgrade() {
            for t in [self.timer.take(), self.poll_timer.take()].into_iter().flatten() {
                hub.sched.cancel(t);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = sys::kill_group(self.pid);
            let _ = child.kill();
            // Blocking, but the process has just been sent SIGKILL.
            let _ = child.wait();
        }
    }
}

/// Run a call to completion before the server starts (configuration) or after it stopped
/// (unload), when there is no loop: poll(2) on the pipes and the pidfd, bounded by the timeout.
pub(crate) fn run_blocking(rt: &Runtime, method: &'static str, args: Vec<OsString>) -> Finished {
    let mut child = match rt.launch(method, &args, false) {
        Ok(c) => c,
        Err(e) => {
            return Finished::failed(format!("cannot run the script for {method}: {e}"), Sink::Collect(0))
        }
    };
    let pid = child.id();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    for fd in
        [stdout.as_ref().map(|p| p.as_raw_fd()), stderr.as_ref().map(|p| p.as_raw_fd())].into_iter().flatten()
    {
        if let Err(e) = set_nonblocking(fd) {
            let _ = sys::kill_group(pid);
            let _ = child.kill();
            let _ = child.wait();
            return Finished::failed(format!("script pipes: {e}"), Sink::Collect(0));
        }
    }
    let pidfd = pidfd_for(pid);
    let mut out = Out::new(Sink::Collect(super::OUTPUT_LIMIT));
    let mut err = Out::new(Sink::Collect(STDERR_LIMIT));
    let mut status: Option<ExitStatus> = None;
    let deadline = Instant::now() + rt.timeout;
    loop {
        if let Some(p) = stdout.as_mut() {
            if out.drain(p) {
                stdout = None;
            }
        }
        if let Some(p) = stderr.as_mut() {
            if err.drain(p) {
                stderr = None;
            }
        }
        if status.is_none() {
            match child.try_wait() {
                Ok(s) => status = s,
                Err(e) => return Finished::failed(format!("waiting for the script: {e}"), Sink::Collect(0)),
            }
        }
        if let (None, None, Some(st)) = (&stdout, &stderr, status) {
            return Finished { exit: exit_of(st), out: out.buf, out_total: out.total, err: err.buf };
        }
        let now = Instant::now();
        if now >= deadline {
            log::warn!("script timed out after {:?} in {method}: killing it", rt.timeout);
            let _ = sys::kill_group(pid);
            let _ = child.kill();
            let _ = child.wait();
            return Finished {
                exit: Exit::TimedOut(rt.timeout),
                out: out.buf,
                out_total: out.total,
                err: err.buf,
            };
        }
        let mut fds = Vec::with_capacity(3);
        for fd in [stdout.as_ref().map(|p| p.as_raw_fd()), stderr.as_ref().map(|p| p.as_raw_fd())]
            .into_iter()
            .flatten()
        {
            fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
        let mut wait = deadline - now;
        match (&pidfd, status) {
            (Some(p), None) => fds.push(libc::pollfd { fd: p.as_raw_fd(), events: libc::POLLIN, revents: 0 }),
            (None, None) => wait = wait.min(POLL_MAX),
            _ => {}
        }
        let ms = libc::c_int::try_from(wait.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        if let Err(e) = sys::poll(&mut fds, ms) {
            if e.kind() != io::ErrorKind::Interrupted {
                let _ = sys::kill_group(pid);
                let _ = child.kill();
                let _ = child.wait();
                return Finished::failed(format!("poll: {e}"), Sink::Collect(0));
            }
        }
    }
}
