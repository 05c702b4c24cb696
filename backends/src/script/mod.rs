//! The machinery behind the `sh` and `eval` backends: nbdkit's script plugins, where every
//! plugin method is a run of an external program (`script METHOD ARGS...`), answering through
//! its exit code, its stdout and its stderr.
//!
//! Everything runs on the event loop, as state machines:
//! - [`child`] runs one script process with nonblocking pipes and a pidfd watched by the loop,
//!   a timeout that kills it, and reaping that never leaves a zombie;
//! - [`gate`] caps how many processes run at once (`max-children`) and implements nbdkit's
//!   thread models, with server-wide FIFO queues that hand slots between loops;
//! - [`proto`] is the calling convention's text: exit codes, errno names, output formats;
//! - this module ties them into a [`BackendFactory`] and a per-connection [`Layer`]: `open`
//!   runs the script's `open`, `get_size` and `can_*` methods one after the other and completes
//!   with one `ExportInfo`, and every request is one more run.
//!
//! Before the server starts (load, config, thread_model...) and after it stops (unload) there
//! is no loop: those calls block, bounded by the same timeout.
//!
//! Where this differs from nbdkit 1.32, and why:
//! - `list_exports` (and `default_export` for the listing) runs once at start-up: the backend
//!   interface answers NBD_OPT_LIST synchronously, and a script cannot run on the loop.
//! - `preconnect` runs at the start of `open` (there is no hook at accept time), and
//!   `after_fork` right after `get_ready`, before the server forks into the background.
//! - Exit code 6 (drop the client at once) cannot close the connection from here: the request
//!   fails with ESHUTDOWN, as do all later ones (what 7 and 8 do after their own reply).
//!   Exit codes 4 to 8 follow nbdkit >= 1.34; 1.32 treated them as errors.
//! - A run that outlives `script-timeout` is killed (nbdkit waits forever); a `close` still
//!   running when the server shuts down is killed with its loop.

mod child;
mod gate;
mod proto;
#[allow(unsafe_code)]
mod sys;
mod tmpdir;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blocksmith_core::config::Params;
use blocksmith_core::control::ServerControl;
use blocksmith_core::error::Errno;
use blocksmith_core::layer::registry::ExportDesc;
use blocksmith_core::layer::{
    BackendFactory, Disconnect, Done, ExportInfo, Extents, Flags, Layer, OpenCx, ParamSpec, Support,
};
use blocksmith_core::{ConfigError, NbdError};

use child::{Call, Input, Sink};
use gate::{Gate, Hub, Permit};
use proto::{Effects, Reply, ThreadModel};

pub(crate) use tmpdir::TmpDir;

/// Default for `script-timeout=`.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for `max-children=`.
pub(crate) const DEFAULT_MAX_CHILDREN: usize = 64;
const MAX_CHILDREN_LIMIT: usize = 4096;
/// Stdout kept from methods other than pread (sizes, handles, extents, export lists).
pub(crate) const OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// The parameters blocksmith takes for itself; every other one goes to the script.
pub(crate) const COMMON_PARAMS: [ParamSpec; 2] = [
    ParamSpec {
        name: "max-children",
        help: "Most script processes running at once, server-wide (default 64). Requests beyond\n\
               that wait in one first-come, first-served queue. blocksmith's own parameter: it\n\
               never reaches the script's config method.",
    },
    ParamSpec {
        name: "script-timeout",
        help: "How long one run of the script may take (default 60s; units s, ms, m...). A run\n\
               that takes longer is killed with SIGKILL, with anything it started, and its\n\
               request fails with EIO. Also bounds load, config and the other start-up calls.\n\
               blocksmith's own parameter: it never reaches the script's config method.",
    },
];

/// `max-children=` and `script-timeout=`.
pub(crate) struct Settings {
    pub timeout: Duration,
    pub max_children: usize,
}

pub(crate) fn take_settings(params: &mut Params, name: &str) -> Result<Settings, ConfigError> {
    let timeout = params.take_duration("script-timeout").map_err(|e| crate::util::named(name, e))?;
    let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
    if timeout.is_zero() {
        return Err(ConfigError::new(format!("{name}: script-timeout must be more than zero")));
    }
    let max_children = match params.take("max-children") {
        None => DEFAULT_MAX_CHILDREN,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_CHILDREN_LIMIT).contains(&n) => n,
            _ => {
                return Err(ConfigError::new(format!(
                    "{name}: max-children: expected a number from 1 to {MAX_CHILDREN_LIMIT}, got '{v}'"
                )))
            }
        },
    };
    Ok(Settings { timeout, max_children })
}

/// Every parameter left, in command-line order (the script's config sees them in that order).
pub(crate) fn drain_params(params: &mut Params) -> Vec<(String, String)> {
    let keys: Vec<String> = params.keys().map(str::to_string).collect();
    let mut values: HashMap<String, VecDeque<String>> = HashMap::new();
    for k in &keys {
        if !values.contains_key(k) {
            let v = params.take_all(k);
            values.insert(k.clone(), v.into());
        }
    }
    keys.into_iter()
        .filter_map(|k| {
            let v = values.get_mut(&k)?.pop_front()?;
            Some((k, v))
        })
        .collect()
}

/// How a method is run.
pub(crate) enum Programs {
    /// `sh`: one executable for every method (run directly, or by /bin/sh when it has no
    /// `#!` line, as execvp would).
    Script(PathBuf),
    /// `eval`: one shell fragment per method in `dir`, run by /bin/sh; `dir/missing` for the
    /// methods not given.
    Fragments { dir: PathBuf, defined: BTreeSet<String> },
}

/// A configured script plugin, shared by every loop.
pub(crate) struct Runtime {
    name: &'static str,
    programs: Programs,
    tmpdir: TmpDir,
    pub(crate) timeout: Duration,
    /// The script turned out not to be directly executable (no `#!`): run it with /bin/sh.
    via_shell: AtomicBool,
    thread_model: ThreadModel,
    exports: Vec<ExportDesc>,
    children: Arc<Gate>,
    all_requests: Arc<Gate>,
    connections: Arc<Gate>,
}

impl Runtime {
    pub(crate) fn new(
        name: &'static str,
        programs: Programs,
        tmpdir: TmpDir,
        settings: &Settings,
    ) -> Runtime {
        Runtime {
            name,
            programs,
            tmpdir,
            timeout: settings.timeout,
            via_shell: AtomicBool::new(false),
            thread_model: ThreadModel::SerializeAllRequests,
            exports: vec![ExportDesc::default_export()],
            children: Gate::new(settings.max_children),
            all_requests: Gate::new(1),
            connections: Gate::new(1),
        }
    }

    fn command(&self, method: &str, args: &[OsString], stdin: bool, shell: bool) -> Command {
        let mut c = match &self.programs {
            Programs::Script(p) if shell => {
                let mut c = Command::new("/bin/sh");
                c.arg(p);
                c
            }
            Programs::Script(p) => Command::new(p),
            Programs::Fragments { dir, defined } => {
                let mut c = Command::new("/bin/sh");
                c.arg(dir.join(if defined.contains(method) { method } else { "missing" }));
                c
            }
        };
        c.arg(method)
            .args(args)
            .env("tmpdir", self.tmpdir.path())
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills whatever the script started too.
            .process_group(0);
        c
    }

    /// Start one run of `method`. Spawning is one fork+exec: short enough for the loop.
    pub(crate) fn launch(&self, method: &str, args: &[OsString], stdin: bool) -> std::io::Result<Child> {
        let shell = self.via_shell.load(Ordering::Relaxed);
        match self.command(method, args, stdin, shell).spawn() {
            Err(e)
                if !shell
                    && e.raw_os_error() == Some(libc::ENOEXEC)
                    && matches!(self.programs, Programs::Script(_)) =>
            {
                self.via_shell.store(true, Ordering::Relaxed);
                self.command(method, args, stdin, true).spawn()
            }
            r => r,
        }
    }

    /// A call with no loop (configuration, unload): blocks until the script is done.
    fn call_sync(&self, method: &'static str, args: &[&str]) -> (Reply, Vec<u8>) {
        let fin = child::run_blocking(self, method, args.iter().map(OsString::from).collect());
        let (reply, fx) = proto::classify(method, &fin.exit, &fin.err);
        if fx != Effects::default() {
            log::debug!("{}: {method}: exit codes 4 to 8 mean nothing before the server runs", self.name);
        }
        (reply, fin.out)
    }

    fn config_error(&self, e: NbdError) -> ConfigError {
        ConfigError::new(format!(
            "{}: {}",
            self.name,
            e.message.unwrap_or_else(|| e.errno.name().to_string())
        ))
    }

    /// A method whose exit status is all that matters and that may be missing.
    fn expect_ok(&self, method: &'static str) -> Result<(), ConfigError> {
        match self.call_sync(method, &[]).0 {
            Reply::Ok | Reply::Missing => Ok(()),
            Reply::False => Err(self.config_error(proto::unexpected_false(method))),
            Reply::Err(e) => Err(self.config_error(e)),
        }
    }

    /// `load` (sh only: eval has none).
    pub(crate) fn load(&self) -> Result<(), ConfigError> {
        self.expect_ok("load")
    }

    /// The key bare command-line values belong to, if the script names one.
    pub(crate) fn magic_config_key(&self) -> Result<Option<String>, ConfigError> {
        match self.call_sync("magic_config_key", &[]) {
            (Reply::Ok, out) => Ok(Some(proto::chomp(&out).trim().to_string()).filter(|k| !k.is_empty())),
            (Reply::Missing, _) => Ok(None),
            (Reply::False, _) => Err(self.config_error(proto::unexpected_false("magic_config_key"))),
            (Reply::Err(e), _) => Err(self.config_error(e)),
        }
    }

    /// `config KEY VALUE`; `missing` words the error when the script has no config method.
    pub(crate) fn config(
        &self,
        key: &str,
        value: &str,
        missing: impl Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        match self.call_sync("config", &[key, value]).0 {
            Reply::Ok => Ok(()),
            Reply::Missing => Err(ConfigError::new(format!("{}: {}", self.name, missing(key)))),
            Reply::False => Err(self.config_error(proto::unexpected_false("config"))),
            Reply::Err(e) => Err(self.config_error(e)),
        }
    }

    /// config_complete, thread_model, get_ready and after_fork, in nbdkit's order, then the
    /// export list (asked once: listing exports cannot wait for a script, see `list_exports`).
    pub(crate) fn finish_config(&mut self) -> Result<(), ConfigError> {
        self.expect_ok("config_complete")?;
        self.thread_model = match self.call_sync("thread_model", &[]) {
            (Reply::Ok, out) => ThreadModel::parse(&out),
            // The safe default for scripts that do not say, as nbdkit.
            (Reply::Missing, _) => ThreadModel::SerializeAllRequests,
            (Reply::False, _) => return Err(self.config_error(proto::unexpected_false("thread_model"))),
            (Reply::Err(e), _) => return Err(self.config_error(e)),
        };
        log::debug!("{}: thread model {}", self.name, self.thread_model.name());
        self.expect_ok("get_ready")?;
        // nbdkit calls this after forking into the background; blocksmith configures before it
        // forks, and a script cannot tell the difference except by $PPID.
        self.expect_ok("after_fork")?;
        self.exports = self.list_exports_now();
        Ok(())
    }

    fn list_exports_now(&self) -> Vec<ExportDesc> {
        let fallback = || vec![ExportDesc::default_export()];
        match self.call_sync("list_exports", &["false", "false"]) {
            (Reply::Ok, out) => match proto::parse_export_list(&out) {
                Ok(list) => {
                    list.into_iter().map(|(name, description)| ExportDesc { name, description }).collect()
                }
                Err(e) => {
                    log::warn!("{}: list_exports: {e}; listing the default export only", self.name);
                    fallback()
                }
            },
            (Reply::Missing, _) => {
                let name = match self.call_sync("default_export", &["false", "false"]) {
                    (Reply::Ok, out) => first_name(&out),
                    _ => String::new(),
                };
                vec![ExportDesc { name, description: None }]
            }
            (Reply::False, _) => fallback(),
            (Reply::Err(e), _) => {
                log::warn!("{}: list_exports failed ({e}); listing the default export only", self.name);
                fallback()
            }
        }
    }
}

/// The first name of a list printed in any of list_exports's forms ("" if none).
fn first_name(out: &[u8]) -> String {
    proto::parse_export_list(out).ok().and_then(|l| l.into_iter().next()).map(|(n, _)| n).unwrap_or_default()
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // In the parent of a server that forked into the background, the child serves on and
        // will unload and clean up when it exits.
        if !self.tmpdir.release() {
            log::debug!("{}: $tmpdir is still used by another process: leaving it to that one", self.name);
            return;
        }
        // Errors from unload are ignored, as nbdkit ignores them.
        let _ = self.call_sync("unload", &[]);
        self.tmpdir.remove();
    }
}

/// The factory the registry hands out.
pub(crate) struct ScriptBackend {
    rt: Arc<Runtime>,
}

impl ScriptBackend {
    pub(crate) fn new(rt: Runtime) -> ScriptBackend {
        ScriptBackend { rt: Arc::new(rt) }
    }
}

impl BackendFactory for ScriptBackend {
    fn open(&self, cx: &OpenCx, done: Done<Rc<dyn Layer>>) {
        let hub = match Hub::for_loop(&cx.sched) {
            Ok(h) => h,
            Err(e) => {
                return done
                    .err(NbdError::io(format!("{}: cannot watch script processes: {e}", self.rt.name)))
            }
        };
        let model = self.rt.thread_model;
        let st = Rc::new(ConnState {
            rt: self.rt.clone(),
            hub: hub.clone(),
            control: cx.control.clone(),
            disconnect: cx.disconnect.clone(),
            handle: RefCell::new(OsString::new()),
            own: matches!(model, ThreadModel::SerializeRequests | ThreadModel::SerializeConnections)
                .then(|| Gate::new(1)),
            in_flight: Cell::new(0),
            opened: Cell::new(false),
            closing: Cell::new(false),
            closed: Cell::new(false),
            disconnected: Cell::new(false),
            conn_permit: RefCell::new(None),
        });
        let probe = Box::new(Probe {
            st,
            readonly: cx.readonly,
            tls: cx.is_tls,
            export: cx.export_name.clone(),
            next: 0,
            info: ExportInfo { can_multi_conn: false, ..ExportInfo::read_only(0) },
            can_zero: false,
            done,
        });
        if model == ThreadModel::SerializeConnections {
            self.rt.connections.acquire(
                &hub,
                Box::new(move |permit| {
                    *probe.st.conn_permit.borrow_mut() = Some(permit);
                    Probe::advance(probe)
                }),
            );
        } else {
            Probe::advance(probe)
        }
    }

    /// Asked at start-up: this interface cannot wait for a script, and running one here would
    /// stall the loop. nbdkit asks on every NBD_OPT_LIST instead.
    fn list_exports(&self) -> Vec<ExportDesc> {
        self.rt.exports.clone()
    }
}

/// One connection's state, shared by its layer and the runs in flight for it.
struct ConnState {
    rt: Arc<Runtime>,
    hub: Rc<Hub>,
    control: Arc<ServerControl>,
    /// Drops this client when the script says so (exit 6 at once, 7 and 8 gracefully).
    disconnect: Disconnect,
    /// What `open` printed, passed to every later method.
    handle: RefCell<OsString>,
    /// One run at a time for this connection (thread models serialize_requests and
    /// serialize_connections).
    own: Option<Arc<Gate>>,
    in_flight: Cell<usize>,
    opened: Cell<bool>,
    closing: Cell<bool>,
    closed: Cell<bool>,
    /// The script asked for this client to be dropped (exit 6, 7, 8).
    disconnected: Cell<bool>,
    /// serialize_connections: this connection's turn, until `close` has run.
    conn_permit: RefCell<Option<Permit>>,
}

/// A finished run as a method sees it.
struct Outcome {
    reply: Reply,
    out: Vec<u8>,
    out_total: u64,
}

fn acquire_all(
    hub: &Rc<Hub>,
    mut gates: VecDeque<Arc<Gate>>,
    held: Vec<Permit>,
    then: Box<dyn FnOnce(Vec<Permit>)>,
) {
    let Some(g) = gates.pop_front() else { return then(held) };
    let h = hub.clone();
    g.acquire(
        hub,
        Box::new(move |p| {
            let mut held = held;
            held.push(p);
            acquire_all(&h, gates, held, then)
        }),
    );
}

impl ConnState {
    fn handle(&self) -> OsString {
        self.handle.borrow().clone()
    }

    /// The gates a run for this connection passes, always in this order (so no two runs can
    /// each hold what the other waits for): the connection's own, everybody's, the process cap.
    fn gates(&self) -> VecDeque<Arc<Gate>> {
        let mut g = VecDeque::with_capacity(3);
        if let Some(own) = &self.own {
            g.push_back(own.clone());
        }
        if self.rt.thread_model == ThreadModel::SerializeAllRequests {
            g.push_back(self.rt.all_requests.clone());
        }
        g.push_back(self.rt.children.clone());
        g
    }

    /// Run the script for this connection; `then` gets the outcome on this loop.
    fn call(self: &Rc<Self>, call: Call, then: impl FnOnce(Outcome) + 'static) {
        self.in_flight.set(self.in_flight.get() + 1);
        let st = self.clone();
        acquire_all(
            &self.hub,
            self.gates(),
            Vec::new(),
            Box::new(move |permits| {
                let method = call.method;
                let after = st.clone();
                child::spawn(&st.rt, &st.hub, call, permits, move |fin| {
                    let (reply, fx) = proto::classify(method, &fin.exit, &fin.err);
                    if let Reply::Err(e) = &reply {
                        log::debug!("{}: {e}", after.rt.name);
                    }
                    if fx.shutdown {
                        log::info!("{}: {method}: the script asked the server to shut down", after.rt.name);
                        after.control.shutdown();
                    }
                    if fx.disconnect {
                        log::info!("{}: {method}: the script asked to drop this client", after.rt.name);
                        after.disconnected.set(true);
                        // Exit 6 drops the client without answering; 7 and 8 answer what is
                        // in flight first.
                        after.disconnect.request(matches!(fin.exit, child::Exit::Code(6)));
                    }
                    after.in_flight.set(after.in_flight.get() - 1);
                    then(Outcome { reply, out: fin.out, out_total: fin.out_total });
                    after.maybe_close();
                });
            }),
        );
    }

    /// A client request: refused once the script has dropped the client.
    fn request(self: &Rc<Self>, call: Call, then: impl FnOnce(Outcome) + 'static) {
        if self.disconnected.get() {
            let e = NbdError::msg(Errno::Shutdown, "the script has disconnected this client");
            return then(Outcome { reply: Reply::Err(e), out: Vec::new(), out_total: 0 });
        }
        self.call(call, then)
    }

    fn begin_close(self: &Rc<Self>) {
        if !self.closing.replace(true) {
            self.maybe_close();
        }
    }

    /// `close` runs once the last request in flight is done, as nbdkit guarantees.
    fn maybe_close(self: &Rc<Self>) {
        if !self.closing.get() || self.closed.get() || self.in_flight.get() > 0 {
            return;
        }
        self.closed.set(true);
        if !self.opened.get() {
            self.conn_permit.borrow_mut().take();
            return;
        }
        let st = self.clone();
        // Errors from close are ignored, as nbdkit ignores them.
        self.call(query("close", vec![self.handle()]), move |_| {
            st.conn_permit.borrow_mut().take();
        });
    }
}

fn query(method: &'static str, args: Vec<OsString>) -> Call {
    Call { method, args, input: Input::None, sink: Sink::Collect(OUTPUT_LIMIT) }
}

fn tf(b: bool) -> OsString {
    OsString::from(if b { "true" } else { "false" })
}

fn num(n: impl ToString) -> OsString {
    OsString::from(n.to_string())
}

/// The questions asked at open, in nbdkit's order (can_flush moved before can_fua, whose
/// default depends on it).
#[derive(Clone, Copy, Debug)]
enum Step {
    Preconnect,
    DefaultExport,
    Open,
    GetSize,
    CanWrite,
    CanZero,
    CanFastZero,
    CanTrim,
    CanFlush,
    CanFua,
    IsRotational,
    CanMultiConn,
    CanCache,
    CanExtents,
    BlockSize,
    Description,
}

const STEPS: [Step; 16] = [
    Step::Preconnect,
    Step::DefaultExport,
    Step::Open,
    Step::GetSize,
    Step::CanWrite,
    Step::CanZero,
    Step::CanFastZero,
    Step::CanTrim,
    Step::CanFlush,
    Step::CanFua,
    Step::IsRotational,
    Step::CanMultiConn,
    Step::CanCache,
    Step::CanExtents,
    Step::BlockSize,
    Step::Description,
];

/// An open in progress: one script run per step, the next started when the last finishes.
struct Probe {
    st: Rc<ConnState>,
    readonly: bool,
    tls: bool,
    export: String,
    next: usize,
    info: ExportInfo,
    can_zero: bool,
    done: Done<Rc<dyn Layer>>,
}

impl Probe {
    fn method(step: Step) -> &'static str {
        match step {
            Step::Preconnect => "preconnect",
            Step::DefaultExport => "default_export",
            Step::Open => "open",
            Step::GetSize => "get_size",
            Step::CanWrite => "can_write",
            Step::CanZero => "can_zero",
            Step::CanFastZero => "can_fast_zero",
            Step::CanTrim => "can_trim",
            Step::CanFlush => "can_flush",
            Step::CanFua => "can_fua",
            Step::IsRotational => "is_rotational",
            Step::CanMultiConn => "can_multi_conn",
            Step::CanCache => "can_cache",
            Step::CanExtents => "can_extents",
            Step::BlockSize => "block_size",
            Step::Description => "export_description",
        }
    }

    /// The arguments for `step`, or None when nbdkit would not ask (a read-only connection is
    /// never asked about writing; one that cannot write, not about zero, trim or FUA).
    fn args(&self, step: Step) -> Option<Vec<OsString>> {
        let writes = !self.readonly && self.info.can_write;
        Some(match step {
            Step::Preconnect => vec![tf(self.readonly)],
            Step::DefaultExport if !self.export.is_empty() => return None,
            Step::DefaultExport => vec![tf(self.readonly), tf(self.tls)],
            Step::Open => vec![tf(self.readonly), OsString::from(&self.export), tf(self.tls)],
            Step::CanWrite if self.readonly => return None,
            Step::CanZero | Step::CanFastZero | Step::CanTrim | Step::CanFua if !writes => return None,
            _ => vec![self.st.handle()],
        })
    }

    fn advance(mut p: Box<Probe>) {
        while let Some(&step) = STEPS.get(p.next) {
            p.next += 1;
            let Some(args) = p.args(step) else { continue };
            let st = p.st.clone();
            return st.call(query(Probe::method(step), args), move |o| match p.absorb(step, o) {
                Ok(()) => Probe::advance(p),
                Err(e) => (*p).fail(e),
            });
        }
        (*p).finish()
    }

    /// Take in one step's answer, applying nbdkit's default when the method is missing.
    fn absorb(&mut self, step: Step, o: Outcome) -> Result<(), NbdError> {
        let method = Probe::method(step);
        if let Reply::Err(e) = o.reply {
            return Err(e);
        }
        let missing = matches!(o.reply, Reply::Missing);
        let truth = matches!(o.reply, Reply::Ok);
        // Methods that are not questions must not answer "false".
        let not_a_question = matches!(
            step,
            Step::Preconnect | Step::DefaultExport | Step::Open | Step::GetSize | Step::CanFua
        ) || matches!(step, Step::CanCache | Step::BlockSize | Step::Description);
        if not_a_question && matches!(o.reply, Reply::False) {
            return Err(proto::unexpected_false(method));
        }
        match step {
            Step::Preconnect => {}
            Step::DefaultExport => self.export = if missing { String::new() } else { first_name(&o.out) },
            Step::Open => {
                let mut h = o.out;
                if h.last() == Some(&b'\n') {
                    h.pop();
                }
                // Missing open: the handle is "".
                *self.st.handle.borrow_mut() = if missing { OsString::new() } else { OsString::from_vec(h) };
                self.st.opened.set(true);
            }
            Step::GetSize if missing => {
                return Err(NbdError::io("get_size: the script has no get_size method"))
            }
            Step::GetSize => self.info.size = proto::parse_size_output(method, &o.out)?,
            Step::CanWrite => self.info.can_write = truth,
            Step::CanZero => self.can_zero = truth,
            // Missing: fast zero is promised exactly when zeroing is emulated (fails at once).
            Step::CanFastZero => self.info.can_fast_zero = if missing { !self.can_zero } else { truth },
            Step::CanTrim => self.info.can_trim = truth,
            Step::CanFlush => self.info.can_flush = truth,
            Step::CanFua if missing => {
                self.info.fua = if self.info.can_flush { Support::Emulate } else { Support::None }
            }
            Step::CanFua => self.info.fua = proto::parse_support(method, &o.out)?,
            Step::IsRotational => self.info.is_rotational = truth,
            Step::CanMultiConn => self.info.can_multi_conn = truth,
            Step::CanCache if missing => self.info.cache = Support::None,
            Step::CanCache => self.info.cache = proto::parse_support(method, &o.out)?,
            Step::CanExtents => self.info.can_extents = truth,
            Step::BlockSize if missing => self.info.block_size = None,
            Step::BlockSize => self.info.block_size = Some(proto::parse_block_size(&o.out)?),
            Step::Description if missing => self.info.description = None,
            Step::Description => self.info.description = Some(proto::chomp(&o.out)).filter(|d| !d.is_empty()),
        }
        Ok(())
    }

    fn fail(self, e: NbdError) {
        let Probe { st, done, .. } = self;
        // close runs if open did, and the connection's turn passes on.
        st.begin_close();
        done.err(e)
    }

    fn finish(self) {
        let Probe { st, mut info, can_zero, readonly, done, .. } = self;
        if readonly || !info.can_write {
            info.can_write = false;
            info.can_trim = false;
            info.can_fast_zero = false;
            info.fua = Support::None;
            info.zero = Support::None;
        } else {
            // A writable export always takes WRITE_ZEROES: natively, or as writes of zeroes.
            info.zero = if can_zero { Support::Native } else { Support::Emulate };
        }
        done.ok(Rc::new(ScriptLayer { st, info }))
    }
}

/// One connection's layer: every request is one run of the script.
struct ScriptLayer {
    st: Rc<ConnState>,
    info: ExportInfo,
}

impl Drop for ScriptLayer {
    fn drop(&mut self) {
        // Dropped without close() (the connection vanished mid-open): close all the same.
        self.st.begin_close();
    }
}

fn done_with(method: &'static str, done: Done<()>, missing_ok: bool) -> impl FnOnce(Outcome) {
    move |o| {
        done.call(match o.reply {
            Reply::Ok => Ok(()),
            Reply::Missing if missing_ok => Ok(()),
            Reply::Missing => Err(NbdError::io(format!("{method}: the script has no {method} method"))),
            Reply::False => Err(proto::unexpected_false(method)),
            Reply::Err(e) => Err(e),
        })
    }
}

impl Layer for ScriptLayer {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    fn pread(&self, buf: Vec<u8>, offset: u64, _flags: Flags, done: Done<Vec<u8>>) {
        let count = buf.len();
        let call = Call {
            method: "pread",
            args: vec![self.st.handle(), num(count), num(offset)],
            input: Input::None,
            sink: Sink::Exact(buf),
        };
        self.st.request(call, move |o| {
            done.call(match o.reply {
                Reply::Ok if o.out_total == count as u64 => Ok(o.out),
                Reply::Ok => Err(NbdError::io(format!(
                    "pread: incorrect amount of data read: expecting {count} bytes but received {} bytes \
                     from the script",
                    o.out_total
                ))),
                Reply::Missing => Err(NbdError::io("pread: the script has no pread method")),
                Reply::False => Err(proto::unexpected_false("pread")),
                Reply::Err(e) => Err(e),
            })
        })
    }

    fn pwrite(&self, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let args =
            vec![self.st.handle(), num(data.len()), num(offset), OsString::from(proto::flags_arg(flags))];
        let call = Call { method: "pwrite", args, input: Input::Bytes(data), sink: Sink::Collect(0) };
        self.st.request(call, done_with("pwrite", done, false))
    }

    fn flush(&self, _flags: Flags, done: Done<()>) {
        self.st.request(query("flush", vec![self.st.handle()]), done_with("flush", done, true))
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let args = vec![self.st.handle(), num(count), num(offset), OsString::from(proto::flags_arg(flags))];
        self.st.request(query("trim", args), done_with("trim", done, true))
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let args = vec![self.st.handle(), num(count), num(offset), OsString::from(proto::flags_arg(flags))];
        let st = self.st.clone();
        self.st.request(query("zero", args), move |o| match o.reply {
            Reply::Ok => done.ok(()),
            Reply::False => done.err(proto::unexpected_false("zero")),
            // Missing, or ENOTSUP: nbdkit falls back to writing zeroes, unless asked to be fast.
            Reply::Missing if flags.contains(Flags::FAST_ZERO) => {
                done.err(NbdError::msg(Errno::NotSup, "zero: the script cannot zero quickly"))
            }
            Reply::Err(e) if e.errno != Errno::NotSup || flags.contains(Flags::FAST_ZERO) => done.err(e),
            Reply::Missing | Reply::Err(_) => {
                let flags = flags.without(Flags::MAY_TRIM).without(Flags::FAST_ZERO);
                let args =
                    vec![st.handle(), num(count), num(offset), OsString::from(proto::flags_arg(flags))];
                let call =
                    Call { method: "pwrite", args, input: Input::Zeroes(count), sink: Sink::Collect(0) };
                st.request(call, done_with("pwrite", done, false))
            }
        })
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        let args = vec![self.st.handle(), num(count), num(offset), OsString::from(proto::flags_arg(flags))];
        self.st.request(query("extents", args), move |o| {
            done.call(match o.reply {
                Reply::Ok => proto::parse_extents(&o.out, offset),
                Reply::Missing => {
                    Err(NbdError::io("extents: can_extents said true, but there is no extents method"))
                }
                Reply::False => Err(proto::unexpected_false("extents")),
                Reply::Err(e) => Err(e),
            })
        })
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags, done: Done<()>) {
        let args = vec![self.st.handle(), num(count), num(offset)];
        self.st.request(query("cache", args), done_with("cache", done, true))
    }

    fn close(&self) {
        self.st.begin_close();
    }
}

#[cfg(test)]
mod tests;
