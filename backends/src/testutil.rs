//! Test helpers: configure a backend from `key=value` pairs and open it the way the server
//! does (through a `Stack`, so the real validating shim sits on top), on a virtual-clock
//! scheduler that runs blocking work inline.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::layer::{BackendFactory, BackendSpec, Done, ExportInfo, Flags, Layer, OpenCx, Stack};
use blocksmith_core::sched::SimScheduler;
use blocksmith_core::{ConfigError, NbdError};

pub fn params(kv: &[(&str, &str)]) -> Params {
    let mut p = Params::new();
    for (k, v) in kv {
        p.push(*k, *v);
    }
    p
}

/// Run a spec's constructor on `kv`.
pub fn make(spec: &BackendSpec, kv: &[(&str, &str)]) -> Result<Arc<dyn BackendFactory>, ConfigError> {
    (spec.make)(&mut params(kv))
}

/// The error a spec's constructor gives for `kv` (panics if it accepts them).
pub fn make_err(spec: &BackendSpec, kv: &[(&str, &str)]) -> String {
    match make(spec, kv) {
        Ok(_) => panic!("{} accepted {kv:?}", spec.name),
        Err(e) => e.0,
    }
}

/// One connection: the top shim over an open backend.
pub struct Conn {
    pub sim: Rc<SimScheduler>,
    pub layer: Rc<dyn Layer>,
}

pub fn open(factory: Arc<dyn BackendFactory>, readonly: bool) -> Conn {
    try_open(factory, readonly).expect("backend opens")
}

pub fn try_open(factory: Arc<dyn BackendFactory>, readonly: bool) -> Result<Conn, NbdError> {
    let sim = SimScheduler::new();
    let cx = OpenCx {
        export_name: String::new(),
        readonly,
        is_tls: false,
        tls_subject: None,
        peer: "test".into(),
        conn_id: 1,
        sched: sim.sched(),
        control: blocksmith_core::control::ServerControl::new(),
        peer_cred: None,
        disconnect: Default::default(),
        budget: blocksmith_core::budget::Budget::new(1 << 30),
    };
    let stack = Stack::new(("test".into(), factory), vec![]);
    let layer = run(&sim, |d| stack.open(&cx, d))?;
    Ok(Conn { sim, layer })
}

/// Start an operation, let the scheduler finish any blocking work, return the result.
pub fn run<T: 'static>(sim: &SimScheduler, f: impl FnOnce(Done<T>)) -> Result<T, NbdError> {
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    f(Done::new(move |r| *o.borrow_mut() = Some(r)));
    sim.run_until_idle();
    let r = out.borrow_mut().take();
    r.expect("operation completed")
}

impl Conn {
    pub fn info(&self) -> ExportInfo {
        self.layer.info()
    }
    pub fn read(&self, len: usize, offset: u64) -> Result<Vec<u8>, NbdError> {
        run(&self.sim, |d| self.layer.pread(vec![0xa5; len], offset, Flags::NONE, d))
    }
    pub fn write(&self, data: &[u8], offset: u64, flags: Flags) -> Result<(), NbdError> {
        run(&self.sim, |d| self.layer.pwrite(data.to_vec(), offset, flags, d))
    }
    pub fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<(), NbdError> {
        run(&self.sim, |d| self.layer.zero(count, offset, flags, d))
    }
    pub fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<(), NbdError> {
        run(&self.sim, |d| self.layer.trim(count, offset, flags, d))
    }
    pub fn flush(&self) -> Result<(), NbdError> {
        run(&self.sim, |d| self.layer.flush(Flags::NONE, d))
    }
    pub fn cache(&self, count: u64, offset: u64) -> Result<(), NbdError> {
        run(&self.sim, |d| self.layer.cache(count, offset, Flags::NONE, d))
    }
    /// Extents as `(length, flags)` pairs.
    pub fn extents(&self, count: u64, offset: u64, flags: Flags) -> Result<Vec<(u64, u32)>, NbdError> {
        let e = run(&self.sim, |d| self.layer.extents(count, offset, flags, d))?;
        Ok(e.0.iter().map(|x| (x.length, x.flags)).collect())
    }
}
