//! Test helpers: a small RAM layer that records what reaches it, and a way to open a filter over
//! it exactly as the stack does (shim, filter, shim) on a virtual-clock scheduler.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{Errno, NbdError};
use blocksmith_core::layer::shim::Shim;
use blocksmith_core::layer::{
    Done, ExportInfo, Extents, FilterFactory, FilterSpec, Flags, Layer, OpenCx, Support, EXTENT_HOLE,
    EXTENT_ZERO,
};
use blocksmith_core::sched::SimScheduler;

/// Bytes `[0, DATA_END)` are reported as data by `extents`, the rest as a hole.
pub const DATA_END: u64 = 4096;

/// A writable RAM disk. Byte `i` starts as `i % 251` so every offset is recognisable. Requests
/// touching `fail_at` fail with EIO.
pub struct Ram {
    pub data: RefCell<Vec<u8>>,
    pub calls: RefCell<Vec<String>>,
    pub info: ExportInfo,
    pub fail_at: Option<u64>,
}

impl Ram {
    pub fn new(size: usize) -> Rc<Ram> {
        let mut info = ExportInfo::read_only(size as u64);
        info.can_write = true;
        info.can_flush = true;
        info.fua = Support::Native;
        info.can_trim = true;
        info.zero = Support::Native;
        info.can_fast_zero = true;
        info.can_extents = true;
        info.cache = Support::Native;
        let data = (0..size).map(|i| (i % 251) as u8).collect();
        Rc::new(Ram { data: RefCell::new(data), calls: RefCell::default(), info, fail_at: None })
    }

    pub fn with(size: usize, f: impl FnOnce(&mut Ram)) -> Rc<Ram> {
        let mut r = Rc::try_unwrap(Ram::new(size)).ok().expect("fresh Rc");
        f(&mut r);
        Rc::new(r)
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }

    fn record(&self, what: String, count: u64, offset: u64) -> Result<(), NbdError> {
        self.calls.borrow_mut().push(what);
        match self.fail_at {
            Some(f) if f >= offset && f < offset + count => Err(NbdError::msg(Errno::Io, "injected")),
            _ => Ok(()),
        }
    }
}

impl Layer for Ram {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }
    fn pread(&self, mut buf: Vec<u8>, offset: u64, _f: Flags, done: Done<Vec<u8>>) {
        let n = buf.len() as u64;
        if let Err(e) = self.record(format!("pread {n}@{offset}"), n, offset) {
            return done.err(e);
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.data.borrow()[o..o + n as usize]);
        done.ok(buf)
    }
    fn pwrite(&self, data: Vec<u8>, offset: u64, f: Flags, done: Done<()>) {
        let n = data.len() as u64;
        if let Err(e) = self.record(format!("pwrite {n}@{offset} flags={}", f.bits()), n, offset) {
            return done.err(e);
        }
        let o = offset as usize;
        self.data.borrow_mut()[o..o + data.len()].copy_from_slice(&data);
        done.ok(())
    }
    fn flush(&self, _f: Flags, done: Done<()>) {
        self.calls.borrow_mut().push("flush".into());
        done.ok(())
    }
    fn trim(&self, count: u64, offset: u64, f: Flags, done: Done<()>) {
        done.call(self.record(format!("trim {count}@{offset} flags={}", f.bits()), count, offset))
    }
    fn zero(&self, count: u64, offset: u64, f: Flags, done: Done<()>) {
        if let Err(e) = self.record(format!("zero {count}@{offset} flags={}", f.bits()), count, offset) {
            return done.err(e);
        }
        let o = offset as usize;
        self.data.borrow_mut()[o..o + count as usize].fill(0);
        done.ok(())
    }
    fn extents(&self, count: u64, offset: u64, _f: Flags, done: Done<Extents>) {
        if let Err(e) = self.record(format!("extents {count}@{offset}"), count, offset) {
            return done.err(e);
        }
        // Describe everything from `offset` to the end, more than was asked, as plugins may.
        let mut e = Extents::new();
        if offset < DATA_END {
            e.push(DATA_END - offset, 0);
        }
        e.push(self.info.size - offset.max(DATA_END), EXTENT_HOLE | EXTENT_ZERO);
        done.ok(e)
    }
    fn cache(&self, count: u64, offset: u64, _f: Flags, done: Done<()>) {
        done.call(self.record(format!("cache {count}@{offset}"), count, offset))
    }
}

pub fn cx(sim: &Rc<SimScheduler>) -> OpenCx {
    OpenCx {
        export_name: String::new(),
        readonly: false,
        is_tls: false,
        tls_subject: None,
        peer: "test".into(),
        conn_id: 1,
        sched: sim.sched(),
        control: blocksmith_core::control::ServerControl::new(),
        peer_cred: None,
        disconnect: Default::default(),
        budget: blocksmith_core::budget::Budget::new(1 << 30),
    }
}

/// Configure a filter from `key=value` pairs (all of which it must take).
pub fn make(spec: &FilterSpec, params: &[(&str, &str)]) -> Arc<dyn FilterFactory> {
    let mut p = Params::new();
    for (k, v) in params {
        p.push(*k, *v);
    }
    let f = (spec.make)(&mut p).unwrap_or_else(|e| panic!("{} {params:?}: {e}", spec.name));
    assert!(p.is_empty(), "{} left keys: {:?}", spec.name, p.keys().collect::<Vec<_>>());
    f
}

/// The configuration error for these parameters.
pub fn make_err(spec: &FilterSpec, params: &[(&str, &str)]) -> String {
    let mut p = Params::new();
    for (k, v) in params {
        p.push(*k, *v);
    }
    match (spec.make)(&mut p) {
        Ok(_) => panic!("{} accepted {params:?}", spec.name),
        Err(e) => e.0,
    }
}

/// Open `factory` over `below` the way the stack does: shim, filter, shim.
pub fn open(
    factory: &Arc<dyn FilterFactory>,
    cx: &OpenCx,
    below: Rc<dyn Layer>,
) -> Result<Rc<Shim>, NbdError> {
    let layer = factory.open(cx, Shim::new(below, false))?;
    Ok(Shim::new(layer, cx.readonly))
}

/// Start an operation, let the scheduler run everything, and return the result.
pub fn wait<T: 'static>(sim: &SimScheduler, f: impl FnOnce(Done<T>)) -> Result<T, NbdError> {
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    f(Done::new(move |r| *o.borrow_mut() = Some(r)));
    sim.run_until_idle();
    let r = out.borrow_mut().take();
    r.expect("operation completed")
}
