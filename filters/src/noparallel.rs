//! The noparallel filter (nbdkit-noparallel-filter): take away parallelism below this filter,
//! for layers that misbehave when requests overlap (`serialize=`):
//!
//! - `requests` (default): one request at a time per connection; the others wait their turn in
//!   arrival order.
//! - `all-requests`: one request at a time across every connection.
//! - `connections`: one connection at a time, and multi-conn is no longer advertised. A second
//!   client completes its handshake (the connection layer answers it before any request), but
//!   its requests wait until every earlier connection has closed. nbdkit instead leaves the
//!   second client waiting in accept; the effect on the layers below is the same.
//!
//! Waiting is a queue of continuations (an asynchronous lock, see `xlock`), never a blocked
//! thread: the event loops keep serving everything else. The lock for `all-requests` and
//! `connections` is shared by every event loop.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use blocksmith_core::config::Params;
use blocksmith_core::error::{ConfigError, Errno, NbdError};
use blocksmith_core::layer::{
    Done, ExportInfo, Extents, Filter, FilterFactory, FilterLayer, FilterSpec, Flags, Layer, Next, OpenCx,
    ParamSpec,
};

use crate::xlock::{Guard, Mode, Waiter, XLock};

pub const SPEC: FilterSpec = FilterSpec {
    name: "noparallel",
    summary: "serialize requests or connections for the layers below",
    params: PARAMS,
    make,
};

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "serialize",
    help: "requests (default): one request at a time per connection;\n\
           all-requests: one request at a time in the whole server;\n\
           connections: one connection at a time. (Also spelled serialise.)",
}];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serialize {
    Requests,
    AllRequests,
    Connections,
}

fn make(p: &mut Params) -> Result<Arc<dyn FilterFactory>, ConfigError> {
    // nbdkit accepts the British spelling too (if both are given, that one is used).
    let v = match (p.take("serialize"), p.take("serialise")) {
        (_, Some(v)) | (Some(v), None) => Some(v),
        (None, None) => None,
    };
    let mode = match v.as_deref() {
        None | Some("requests") => Serialize::Requests,
        Some("all-requests" | "all_requests") => Serialize::AllRequests,
        Some("connections") => Serialize::Connections,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "noparallel: unknown serialize mode '{other}' (requests, all-requests or connections)"
            )))
        }
    };
    Ok(Arc::new(NoparallelFactory { mode, shared: XLock::new() }))
}

struct NoparallelFactory {
    mode: Serialize,
    /// The server-wide lock (all-requests, connections).
    shared: Arc<XLock>,
}

impl FilterFactory for NoparallelFactory {
    fn open(&self, cx: &OpenCx, next: Next) -> Result<Rc<dyn Layer>, NbdError> {
        let waiter = Rc::new(Waiter::new(cx.sched.clone()));
        let filter = match self.mode {
            Serialize::Requests => NoparallelFilter::PerRequest { lock: XLock::new(), waiter },
            Serialize::AllRequests => NoparallelFilter::PerRequest { lock: self.shared.clone(), waiter },
            Serialize::Connections => {
                let gate = Rc::new(Gate { guard: RefCell::new(None), queued: RefCell::new(VecDeque::new()) });
                let g = gate.clone();
                waiter.acquire(&self.shared, Mode::Exclusive, move |guard| g.open(guard));
                NoparallelFilter::PerConnection { gate, waiter }
            }
        };
        Ok(Rc::new(FilterLayer { filter, next }))
    }
}

/// A request waiting for its connection's turn: run it, or fail it with the reason.
type Queued = Box<dyn FnOnce(Result<(), NbdError>)>;

/// serialize=connections: this connection's turn, and what waits for it.
struct Gate {
    guard: RefCell<Option<Guard>>,
    queued: RefCell<VecDeque<Queued>>,
}

impl Gate {
    /// Our turn has come: keep the lock until the connection closes and run what waited.
    fn open(&self, guard: Guard) {
        *self.guard.borrow_mut() = Some(guard);
        let queued: Vec<Queued> = self.queued.borrow_mut().drain(..).collect();
        for q in queued {
            q(Ok(()));
        }
    }
}

enum NoparallelFilter {
    /// One request at a time under `lock` (this connection's, or the server's).
    PerRequest { lock: Arc<XLock>, waiter: Rc<Waiter> },
    /// One connection at a time.
    PerConnection { gate: Rc<Gate>, waiter: Rc<Waiter> },
}

impl NoparallelFilter {
    /// Run `op` when its turn comes; its completion (`done`) ends the turn.
    fn serialized<T: 'static>(&self, done: Done<T>, op: impl FnOnce(Done<T>) + 'static) {
        match self {
            NoparallelFilter::PerRequest { lock, waiter } => {
                waiter.acquire(lock, Mode::Exclusive, move |guard| {
                    op(Done::new(move |r| {
                        // Released before the reply goes on, so the next request starts at once.
                        drop(guard);
                        done.call(r)
                    }))
                })
            }
            NoparallelFilter::PerConnection { gate, .. } => {
                if gate.guard.borrow().is_some() {
                    return op(done);
                }
                gate.queued.borrow_mut().push_back(Box::new(move |r| match r {
                    Ok(()) => op(done),
                    Err(e) => done.err(e),
                }));
            }
        }
    }
}

impl Filter for NoparallelFilter {
    fn info(&self, next: &Next) -> ExportInfo {
        match self {
            // Clients cannot spread work over connections that never run at the same time.
            NoparallelFilter::PerConnection { .. } => ExportInfo { can_multi_conn: false, ..next.info() },
            NoparallelFilter::PerRequest { .. } => next.info(),
        }
    }

    fn pread(&self, next: &Next, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
        let next = next.clone();
        self.serialized(done, move |d| next.pread(buf, offset, flags, d))
    }

    fn pwrite(&self, next: &Next, data: Vec<u8>, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.serialized(done, move |d| next.pwrite(data, offset, flags, d))
    }

    fn flush(&self, next: &Next, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.serialized(done, move |d| next.flush(flags, d))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.serialized(done, move |d| next.trim(count, offset, flags, d))
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.serialized(done, move |d| next.zero(count, offset, flags, d))
    }

    fn extents(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<Extents>) {
        let next = next.clone();
        self.serialized(done, move |d| next.extents(count, offset, flags, d))
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags, done: Done<()>) {
        let next = next.clone();
        self.serialized(done, move |d| next.cache(count, offset, flags, d))
    }

    fn close(&self, next: &Next) {
        if let NoparallelFilter::PerConnection { gate, waiter } = self {
            // Give up our place in line (or our turn) so the next connection can go. Requests
            // still waiting can never run now: fail them, the client is gone.
            waiter.cancel_all();
            gate.guard.borrow_mut().take();
            let queued: Vec<Queued> = gate.queued.borrow_mut().drain(..).collect();
            for q in queued {
                q(Err(NbdError::msg(Errno::Shutdown, "noparallel: the connection closed before its turn")));
            }
        }
        next.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cx, make as configure, make_err, open, Ram};
    use blocksmith_core::layer::{ExportInfo, Layer};
    use blocksmith_core::sched::{Sched, SimScheduler};
    use std::cell::Cell;
    use std::time::Duration;

    /// Reads take 10 ms and record the most requests ever in flight at once.
    struct Slow {
        ram: Rc<Ram>,
        sched: Sched,
        in_flight: Rc<Cell<usize>>,
        peak: Rc<Cell<usize>>,
    }

    impl Layer for Slow {
        fn info(&self) -> ExportInfo {
            self.ram.info()
        }
        fn pread(&self, buf: Vec<u8>, offset: u64, flags: Flags, done: Done<Vec<u8>>) {
            self.in_flight.set(self.in_flight.get() + 1);
            self.peak.set(self.peak.get().max(self.in_flight.get()));
            let (ram, n) = (self.ram.clone(), self.in_flight.clone());
            self.sched.after(Duration::from_millis(10), move || {
                n.set(n.get() - 1);
                ram.pread(buf, offset, flags, done)
            });
        }
    }

    struct Rig {
        sim: Rc<SimScheduler>,
        in_flight: Rc<Cell<usize>>,
        peak: Rc<Cell<usize>>,
        ram: Rc<Ram>,
    }

    impl Rig {
        fn new() -> Rig {
            Rig {
                sim: SimScheduler::new(),
                in_flight: Rc::default(),
                peak: Rc::default(),
                ram: Ram::new(65536),
            }
        }
        fn below(&self) -> Rc<Slow> {
            Rc::new(Slow {
                ram: self.ram.clone(),
                sched: self.sim.sched(),
                in_flight: self.in_flight.clone(),
                peak: self.peak.clone(),
            })
        }
        fn reads(&self, top: &Rc<blocksmith_core::layer::shim::Shim>, n: usize, ok: &Rc<Cell<usize>>) {
            for i in 0..n {
                let ok = ok.clone();
                top.pread(
                    vec![0; 512],
                    i as u64 * 512,
                    Flags::NONE,
                    Done::new(move |r: Result<Vec<u8>, NbdError>| {
                        if r.is_ok() {
                            ok.set(ok.get() + 1)
                        }
                    }),
                );
            }
        }
    }

    #[test]
    fn requests_run_one_at_a_time_per_connection() {
        let rig = Rig::new();
        let f = configure(&SPEC, &[]);
        let a = open(&f, &cx(&rig.sim), rig.below()).unwrap();
        let b = open(&f, &cx(&rig.sim), rig.below()).unwrap();
        let ok = Rc::new(Cell::new(0));
        rig.reads(&a, 5, &ok);
        rig.reads(&b, 5, &ok);
        rig.sim.run_until_idle();
        assert_eq!(ok.get(), 10);
        assert_eq!(rig.peak.get(), 2, "one per connection, the connections in parallel");
        assert_eq!(rig.sim.elapsed(), Duration::from_millis(50));
    }

    #[test]
    fn all_requests_run_one_at_a_time_in_the_server() {
        let rig = Rig::new();
        let f = configure(&SPEC, &[("serialize", "all-requests")]);
        let a = open(&f, &cx(&rig.sim), rig.below()).unwrap();
        let b = open(&f, &cx(&rig.sim), rig.below()).unwrap();
        let ok = Rc::new(Cell::new(0));
        rig.reads(&a, 5, &ok);
        rig.reads(&b, 5, &ok);
        rig.sim.run_until_idle();
        assert_eq!(ok.get(), 10);
        assert_eq!(rig.peak.get(), 1);
        assert_eq!(rig.sim.elapsed(), Duration::from_millis(100));
    }

    #[test]
    fn connections_take_turns() {
        let rig = Rig::new();
        let f = configure(&SPEC, &[("serialise", "connections")]);
        let a = open(&f, &cx(&rig.sim), rig.below()).unwrap();
        let b = open(&f, &cx(&rig.sim), rig.below()).unwrap();
        assert!(!a.info().can_multi_conn);
        let (ok_a, ok_b) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        rig.reads(&b, 3, &ok_b);
        rig.reads(&a, 3, &ok_a);
        rig.sim.run_until_idle();
        assert_eq!((ok_a.get(), ok_b.get()), (3, 0), "b waits while a is connected");
        assert_eq!(rig.peak.get(), 3, "within a connection requests still overlap");
        a.close();
        rig.sim.run_until_idle();
        assert_eq!(ok_b.get(), 3, "b runs once a has gone");

        // A connection that closes while waiting fails what it queued and frees its place.
        let c = open(&f, &cx(&rig.sim), rig.below()).unwrap();
        let failed = Rc::new(Cell::new(false));
        let fl = failed.clone();
        c.pread(
            vec![0; 1],
            0,
            Flags::NONE,
            Done::new(move |r: Result<Vec<u8>, NbdError>| fl.set(r.is_err())),
        );
        c.close();
        assert!(failed.get());
        b.close();
        let d = open(&f, &cx(&rig.sim), rig.below()).unwrap();
        let ok_d = Rc::new(Cell::new(0));
        rig.reads(&d, 1, &ok_d);
        rig.sim.run_until_idle();
        assert_eq!(ok_d.get(), 1);
    }

    #[test]
    fn bad_parameters_are_rejected_clearly() {
        assert!(make_err(&SPEC, &[("serialize", "some")])
            .starts_with("noparallel: unknown serialize mode 'some'"));
    }
}
